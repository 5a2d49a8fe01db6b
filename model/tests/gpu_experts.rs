//! The routed experts on a CUDA GPU (`GpuExperts`) inside the model's forward pass, against the CPU path. Without a
//! GPU (or without the `cuda` feature) it prints why it skipped and passes: CI has no GPU; `scripts/gpu-check.sh`
//! runs it on one.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use switchyard_model::checkpoint::{Checkpoint, ExpertWeights};
use switchyard_model::config::ModelConfig;
use switchyard_model::{ActivationPrecision, Device, GpuExperts, Llama4Model, LoadOptions, LogitsFor, ModelError};

/// The CPU parity fixture with FP8 experts (tests/golden/maverick-fp8), its routed experts computed on the GPU,
/// against the same model computing them on the CPU with per-token FP8 activations. The expert outputs differ by
/// f32 summation order (a relative ~1e-6) and, rarely, by a one-step flip of a re-quantised SwiGLU code; through
/// four layers that stays under 1% of the logit scale (docs/cuda.md). Skips with a printed reason without a GPU.
#[test]
fn fp8_fixture_on_the_gpu_matches_the_cpu_path() {
    let mut gpu = match GpuExperts::new(Device::Cuda(0)) {
        Ok(gpu) => gpu,
        Err(ModelError::Kernel(reason)) => {
            println!("SKIPPED fp8 fixture on the GPU: {reason}");
            return;
        }
        Err(other) => panic!("{other}"),
    };
    // The path compiled in, or (a test binary carried to the GPU machine, run from the repository root there)
    // the working directory's.
    let dir = [std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), std::path::PathBuf::from(".")]
        .into_iter()
        .map(|root| root.join("tests/golden/maverick-fp8"))
        .find(|dir| dir.join("config.json").is_file())
        .expect("tests/golden/maverick-fp8 (run from the repository root)");
    let config = ModelConfig::from_file(dir.join("config.json")).expect("config parses");
    let checkpoint = Checkpoint::open(&dir).expect("checkpoint opens");
    let options = LoadOptions { activation_precision: ActivationPrecision::Fp8PerToken, ..LoadOptions::default() };
    let mut model = Llama4Model::load(&checkpoint, &config, &options, &mut |_, _| {}).expect("model loads");
    let text = &config.text;
    let prompt: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % text.vocab_size as u32).collect();
    let cpu = model.forward(&prompt, &mut model.new_cache().expect("cache"), LogitsFor::All).expect("cpu forward");
    for layer in (0..text.num_hidden_layers).filter(|&l| text.is_moe_layer(l)) {
        let weights: Vec<ExpertWeights> =
            (0..text.num_local_experts).map(|e| checkpoint.expert(layer, e, text).expect("expert loads")).collect();
        gpu.insert_layer(layer, weights.iter().enumerate().map(|(e, w)| (e as u32, w))).expect("upload");
    }
    model.set_routed_experts(Arc::new(gpu));
    let on_gpu = model.forward(&prompt, &mut model.new_cache().expect("cache"), LogitsFor::All).expect("gpu forward");
    let scale = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = cpu.iter().zip(&on_gpu).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("fp8 fixture: GPU experts vs CPU: max |diff| = {diff:e} (logit scale {scale})");
    assert!(diff <= 0.01 * scale, "GPU experts moved logits by {diff} (scale {scale})");
}
