//! The whole forward pass on a CUDA GPU (`GpuModel`) against the CPU forward pass (`Llama4Model`) on the golden
//! fixtures: prefill, decode through the device KV cache (across chunk boundaries, on RoPE/chunked and NoPE/global
//! layers with temperature tuning), batches with chunked prefill, bf16 dense weights, a bf16 KV cache, FP8 experts on
//! the GPU, and the error contract. Without a GPU (or without the `cuda` feature) each GPU test prints "SKIPPED
//! <reason>" and passes: CI has no GPU; `scripts/gpu-check.sh` runs it on one, where a skip counts as a failure.
//!
//! Tolerances (docs/cuda.md, "The attention-side path"):
//! - f32 dense weights: the GPU computes the CPU's arithmetic in another order (cuBLASLt's f32 GEMM without TF32,
//!   the online softmax, `sincosf`/`expf` within ulps), as transformers does in yet another order; the CPU agrees
//!   with transformers on these fixtures to 1e-4 (tests/parity.rs). Held to `1e-4 * (1 + max |logit|)`.
//! - bf16 dense weights: weights and GEMM inputs rounded to bf16 (2^-9 relative each, so each product within 2^-8
//!   relative): about 2^-9 relative per GEMM output with random-sign terms, a percent or two after four layers. A
//!   token whose top-1 router choice flips (two expert logits within that percent) gets another expert's output, so
//!   the check is per row: the median relative L2 error of a row's logits <= 5e-2, and at most 1/8 of the rows above
//!   0.15. A layout or indexing bug moves every row by O(1).
//! - bf16 KV with f32 dense weights: each key and value rounded to bf16 once (2^-8 relative at most) moves attention
//!   outputs by a few 1e-3 relative with random-sign rounding errors, and logits' rows by about as much: median row
//!   error <= 1e-2, the same 1/8 of rows allowed above 0.15 for router flips. bf16 weights and bf16 KV (the GPU's
//!   defaults) are held to the bf16 dense bounds, the dense rounding dominating.
//! - FP8 experts on the GPU (maverick-fp8): docs/cuda.md's 1% of the logit scale for GPU experts in the CPU forward
//!   pass, doubled: the f32 dense path now differs from the CPU's by ~1e-6 relative, which can move a per-token FP8
//!   activation code one step where a value sits on a rounding boundary (as the GPU experts' own re-quantisation
//!   can).

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use switchyard_model::checkpoint::{Checkpoint, ExpertWeights};
use switchyard_model::config::ModelConfig;
use switchyard_model::{
    ActivationPrecision, DenseDtype, Device, ForwardPass, GpuExperts, GpuModel, GpuModelOptions, KvBlockPool, KvCache,
    KvDtype, Llama4Model, LoadOptions, LogitsFor, ModelError, SequenceStep,
};

/// tests/golden/`name`: the path compiled in, or (a test binary carried to the GPU machine, run from the repository
/// root there) the working directory's.
fn fixture(name: &str) -> PathBuf {
    [std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), PathBuf::from(".")]
        .into_iter()
        .map(|root| root.join("tests/golden").join(name))
        .find(|dir| dir.join("config.json").is_file())
        .unwrap_or_else(|| panic!("tests/golden/{name} (run from the repository root)"))
}

fn load_cpu(name: &str, precision: ActivationPrecision) -> (Checkpoint, ModelConfig, Llama4Model) {
    let dir = fixture(name);
    let config = ModelConfig::from_file(dir.join("config.json")).expect("config parses");
    let checkpoint = Checkpoint::open(&dir).expect("checkpoint opens");
    let options = LoadOptions { activation_precision: precision, ..LoadOptions::default() };
    let model = Llama4Model::load(&checkpoint, &config, &options, &mut |_, _| {}).expect("model loads");
    (checkpoint, config, model)
}

/// The model on GPU 0, or `None` after printing why there is none.
fn upload(model: &Llama4Model, options: &GpuModelOptions, test: &str) -> Option<GpuModel> {
    match GpuModel::upload(model, Device::Cuda(0), options) {
        Ok(gpu) => Some(gpu),
        Err(ModelError::Kernel(reason)) => {
            println!("SKIPPED {test}: {reason}");
            None
        }
        Err(other) => panic!("{test}: {other}"),
    }
}

fn f32_options() -> GpuModelOptions {
    GpuModelOptions { dense_dtype: DenseDtype::F32, kv_blocks: 256, block_size: 4, kv_dtype: KvDtype::F32 }
}

/// A prompt crossing three chunk boundaries (the fixtures' chunk is 8) and the NoPE layer's temperature steps
/// (floor_scale 4).
fn prompt(vocab: usize) -> Vec<u32> {
    (0..24u32).map(|i| (i * 37 + 11) % vocab as u32).collect()
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The f32 allowance (module docs) for logits `cpu`.
fn assert_f32_close(what: &str, gpu: &[f32], cpu: &[f32]) {
    let (diff, scale) = (max_abs_diff(gpu, cpu), max_abs(cpu));
    println!("{what}: max |gpu - cpu| = {diff:e} (logit scale {scale})");
    assert!(diff <= 1e-4 * (1.0 + scale), "{what}: GPU and CPU logits differ by {diff} (scale {scale})");
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

/// Prefill, then greedy decode through the device KV cache past a chunk boundary (positions 24..30: the chunked
/// layers release the previous chunk's blocks at 24), every step's logits against the CPU's.
#[test]
fn f32_dense_matches_the_cpu_forward_in_prefill_and_decode() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let Some(gpu) = upload(&model, &f32_options(), "f32 dense forward") else { return };
    let vocab = model.config().vocab_size;
    let prompt = prompt(vocab);
    // The CPU cache in blocks of the GPU arena's size, so that both release the same blocks at chunk boundaries.
    let cpu_pool = KvBlockPool::new(model.config(), f32_options().block_size, usize::MAX).expect("host pool");
    let mut cpu_cache = KvCache::in_pool(model.config(), cpu_pool);
    let mut gpu_cache = gpu.new_cache().expect("cache");
    assert!(gpu_cache.pool().is_on_device());
    let cpu = model.forward(&prompt, &mut cpu_cache, LogitsFor::All).expect("cpu prefill");
    let on_gpu = gpu.forward(&prompt, &mut gpu_cache, LogitsFor::All).expect("gpu prefill");
    assert_eq!(on_gpu.len(), prompt.len() * vocab);
    assert_f32_close("f32 prefill", &on_gpu, &cpu);
    let mut token = argmax(&cpu[(prompt.len() - 1) * vocab..]);
    for step in 0..6 {
        let cpu = model.forward(&[token], &mut cpu_cache, LogitsFor::Last).expect("cpu decode");
        let on_gpu = gpu.forward(&[token], &mut gpu_cache, LogitsFor::Last).expect("gpu decode");
        assert_f32_close(&format!("f32 decode step {step} (position {})", prompt.len() + step), &on_gpu, &cpu);
        token = argmax(&cpu);
    }
    assert_eq!(gpu_cache.len(), cpu_cache.len());
    assert_eq!(gpu_cache.blocks_held(), cpu_cache.blocks_held(), "the same blocks held on both sides");
    assert_eq!(gpu.kv_pool().in_use(), gpu_cache.blocks_held());
    drop(gpu_cache);
    assert_eq!(gpu.kv_pool().in_use(), 0, "a dropped cache gives its blocks back");
}

/// Two sequences in one step, one of them prefilled in two chunks (the first with no logits), against the CPU doing
/// the same steps: block tables of several sequences, LogitsFor::None/Last/All, queries of a step after keys of an
/// earlier one.
#[test]
fn batches_and_chunked_prefill_match_the_cpu() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let Some(gpu) = upload(&model, &f32_options(), "batched forward") else { return };
    let vocab = model.config().vocab_size;
    let a = prompt(vocab);
    let b: Vec<u32> = (0..13u32).map(|i| (i * 53 + 7) % vocab as u32).collect();
    let models: [&dyn ForwardPass; 2] = [&model, &gpu];
    let mut results = Vec::new();
    for m in models {
        let (mut cache_a, mut cache_b) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
        let first = m
            .forward_batch(&mut [
                SequenceStep { tokens: &a[..10], cache: &mut cache_a, logits: LogitsFor::None },
                SequenceStep { tokens: &b, cache: &mut cache_b, logits: LogitsFor::Last },
            ])
            .expect("first step");
        assert_eq!(first[0].len(), 0, "LogitsFor::None gives no logits");
        assert_eq!(first[1].len(), vocab);
        let second = m
            .forward_batch(&mut [
                SequenceStep { tokens: &[b[0]], cache: &mut cache_b, logits: LogitsFor::All },
                SequenceStep { tokens: &a[10..], cache: &mut cache_a, logits: LogitsFor::All },
            ])
            .expect("second step");
        assert_eq!(second[1].len(), (a.len() - 10) * vocab);
        assert_eq!((cache_a.len(), cache_b.len()), (a.len(), b.len() + 1));
        results.push((first, second));
    }
    let (cpu, on_gpu) = (&results[0], &results[1]);
    assert_f32_close("batch step 1, sequence b (last)", &on_gpu.0[1], &cpu.0[1]);
    assert_f32_close("batch step 2, sequence b (decode)", &on_gpu.1[0], &cpu.1[0]);
    assert_f32_close("batch step 2, sequence a (second prefill chunk)", &on_gpu.1[1], &cpu.1[1]);
}

/// Bf16 dense weights: close to the f32 CPU forward pass row by row (module docs: median relative error <= 5e-2,
/// at most 1/8 of the rows above 0.15).
#[test]
fn bf16_dense_stays_close_to_the_cpu_forward() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let options = GpuModelOptions { dense_dtype: DenseDtype::Bf16, ..f32_options() };
    let Some(gpu) = upload(&model, &options, "bf16 dense forward") else { return };
    assert_eq!(gpu.dense_dtype(), DenseDtype::Bf16);
    let vocab = model.config().vocab_size;
    let prompt = prompt(vocab);
    let cpu = model.forward(&prompt, &mut model.new_cache().expect("cache"), LogitsFor::All).expect("cpu prefill");
    let on_gpu = gpu.forward(&prompt, &mut gpu.new_cache().expect("cache"), LogitsFor::All).expect("gpu prefill");
    assert_rows_close("bf16 prefill", &on_gpu, &cpu, vocab, 5e-2);
}

/// The per-row check of the bf16 tests (module docs): the relative L2 error of each row of `gpu` logits against `cpu`
/// (rows of `vocab`), median at most `median_bound`, at most 1/8 of the rows above 0.15 (router flips).
fn assert_rows_close(what: &str, gpu: &[f32], cpu: &[f32], vocab: usize, median_bound: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    let mut errors: Vec<f32> = cpu
        .chunks_exact(vocab)
        .zip(gpu.chunks_exact(vocab))
        .map(|(c, g)| {
            let diff: f32 = c.iter().zip(g).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let norm: f32 = c.iter().map(|a| a * a).sum::<f32>().sqrt();
            diff / norm.max(f32::MIN_POSITIVE)
        })
        .collect();
    println!("{what}: per-row relative errors {errors:?}");
    errors.sort_by(f32::total_cmp);
    let median = errors[errors.len() / 2];
    let outliers = errors.iter().filter(|&&e| e.is_nan() || e > 0.15).count();
    assert!(median <= median_bound, "{what}: median row error {median}");
    assert!(outliers * 8 <= errors.len(), "{what}: {outliers} of {} rows off by more than 0.15", errors.len());
}

/// A bf16 KV arena (f32 dense weights, so the KV's rounding is the only new error): prefill and decode steps that
/// read keys written by earlier steps, close to the f32 CPU forward pass row by row (docs/cuda.md: median relative
/// error <= 1e-2, at most 1/8 of the rows above 0.15); then the defaults (bf16 weights and bf16 KV) within the bf16
/// dense test's bounds.
#[test]
fn bf16_kv_stays_close_to_the_cpu_forward() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    assert_eq!(GpuModelOptions::default().kv_dtype, KvDtype::Bf16, "bf16 KV is the GPU's default");
    let options = GpuModelOptions { kv_dtype: KvDtype::Bf16, ..f32_options() };
    let Some(gpu) = upload(&model, &options, "bf16 KV forward") else { return };
    assert_eq!(gpu.kv_dtype(), KvDtype::Bf16);
    let pool = gpu.kv_pool();
    assert_eq!(gpu.kv_bytes(), pool.capacity() * pool.block_floats() * 2, "2 bytes per key or value");
    let vocab = model.config().vocab_size;
    let prompt = prompt(vocab);
    let cpu_pool = KvBlockPool::new(model.config(), options.block_size, usize::MAX).expect("host pool");
    let mut cpu_cache = KvCache::in_pool(model.config(), cpu_pool);
    let mut gpu_cache = gpu.new_cache().expect("cache");
    let mut cpu = model.forward(&prompt, &mut cpu_cache, LogitsFor::All).expect("cpu prefill");
    let mut on_gpu = gpu.forward(&prompt, &mut gpu_cache, LogitsFor::All).expect("gpu prefill");
    let mut token = argmax(&cpu[(prompt.len() - 1) * vocab..]);
    // Decode past the chunk boundary at 24 (the CPU's tokens on both sides, so both see the same sequence).
    for _ in 0..6 {
        let step_cpu = model.forward(&[token], &mut cpu_cache, LogitsFor::Last).expect("cpu decode");
        let step_gpu = gpu.forward(&[token], &mut gpu_cache, LogitsFor::Last).expect("gpu decode");
        token = argmax(&step_cpu);
        cpu.extend_from_slice(&step_cpu);
        on_gpu.extend_from_slice(&step_gpu);
    }
    assert_rows_close("bf16 KV (f32 weights), prefill and decode", &on_gpu, &cpu, vocab, 1e-2);

    let defaults =
        GpuModelOptions { kv_blocks: options.kv_blocks, block_size: options.block_size, ..Default::default() };
    let Some(gpu) = upload(&model, &defaults, "bf16 weights and KV") else { return };
    let on_gpu = gpu.forward(&prompt, &mut gpu.new_cache().expect("cache"), LogitsFor::All).expect("gpu prefill");
    assert_rows_close("bf16 weights and KV, prefill", &on_gpu, &cpu[..prompt.len() * vocab], vocab, 5e-2);
}

/// The FP8 fixture with its routed experts on the GPU too (`GpuExperts`), the whole model on the device, against the
/// CPU with per-token FP8 activations (module docs: 2% of the logit scale).
#[test]
fn fp8_fixture_with_gpu_experts_matches_the_cpu_path() {
    let (checkpoint, config, model) = load_cpu("maverick-fp8", ActivationPrecision::Fp8PerToken);
    let Some(mut gpu) = upload(&model, &f32_options(), "fp8 fixture on the GPU") else { return };
    let text = &config.text;
    let mut experts = GpuExperts::new(Device::Cuda(0)).expect("the GPU the model went to");
    for layer in (0..text.num_hidden_layers).filter(|&l| text.is_moe_layer(l)) {
        let weights: Vec<ExpertWeights> =
            (0..text.num_local_experts).map(|e| checkpoint.expert(layer, e, text).expect("expert loads")).collect();
        experts.insert_layer(layer, weights.iter().enumerate().map(|(e, w)| (e as u32, w))).expect("upload");
    }
    gpu.set_routed_experts(Arc::new(experts));
    let prompt = prompt(text.vocab_size);
    let cpu = model.forward(&prompt, &mut model.new_cache().expect("cache"), LogitsFor::All).expect("cpu forward");
    let mut cache = gpu.new_cache().expect("cache");
    let on_gpu = gpu.forward(&prompt, &mut cache, LogitsFor::All).expect("gpu forward");
    let (diff, scale) = (max_abs_diff(&on_gpu, &cpu), max_abs(&cpu));
    println!("fp8 fixture, whole model on the GPU: max |diff| = {diff:e} (logit scale {scale})");
    assert!(diff <= 0.02 * scale, "the GPU moved logits by {diff} (scale {scale})");
    let token = argmax(&cpu[(prompt.len() - 1) * text.vocab_size..]);
    let mut cpu_cache = model.new_cache().expect("cache");
    model.forward(&prompt, &mut cpu_cache, LogitsFor::None).expect("cpu prefill");
    let cpu = model.forward(&[token], &mut cpu_cache, LogitsFor::Last).expect("cpu decode");
    let on_gpu = gpu.forward(&[token], &mut cache, LogitsFor::Last).expect("gpu decode");
    let diff = max_abs_diff(&on_gpu, &cpu);
    println!("fp8 fixture decode step: max |diff| = {diff:e}");
    assert!(diff <= 0.02 * scale, "the GPU moved decode logits by {diff} (scale {scale})");
}

/// Bad input gets the CPU's errors, a foreign or full pool a clear one, and no cache moves; the model still computes
/// correctly afterwards.
#[test]
fn errors_leave_every_cache_where_it_was() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let options = GpuModelOptions { kv_blocks: 8, ..f32_options() };
    let Some(gpu) = upload(&model, &options, "forward errors") else { return };
    let vocab = model.config().vocab_size;
    let prompt = prompt(vocab);
    let bad = [1, vocab as u32];
    let errors: Vec<String> = [&model as &dyn ForwardPass, &gpu]
        .into_iter()
        .map(|m| {
            let (mut good, mut other) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
            let err = m
                .forward_batch(&mut [
                    SequenceStep { tokens: &prompt[..4], cache: &mut good, logits: LogitsFor::All },
                    SequenceStep { tokens: &bad, cache: &mut other, logits: LogitsFor::All },
                ])
                .expect_err("token outside the vocabulary");
            assert_eq!((good.len(), good.blocks_held(), other.len()), (0, 0, 0));
            let empty = m.forward(&[], &mut good, LogitsFor::All).expect_err("no tokens");
            format!("{err} / {empty}")
        })
        .collect();
    assert_eq!(errors[0], errors[1], "the GPU refuses bad input with the CPU's words");

    let mut foreign = KvCache::new(model.config()).expect("host cache");
    let err = gpu.forward(&prompt, &mut foreign, LogitsFor::All).expect_err("host cache");
    assert!(err.to_string().contains("not from this GPU model's pool"), "{err}");
    assert_eq!(foreign.len(), 0);

    // 24 positions need 6 blocks per global layer: more than the 8 blocks of the arena.
    let mut cache = gpu.new_cache().expect("cache");
    let err = gpu.forward(&prompt, &mut cache, LogitsFor::All).expect_err("pool too small");
    assert!(matches!(err, ModelError::KvCacheFull { .. }), "{err}");
    assert_eq!((cache.len(), gpu.kv_pool().in_use()), (0, 0));

    let cpu = model.forward(&prompt[..4], &mut model.new_cache().expect("cache"), LogitsFor::All).expect("cpu");
    let on_gpu = gpu.forward(&prompt[..4], &mut cache, LogitsFor::All).expect("gpu after errors");
    assert_f32_close("after errors", &on_gpu, &cpu);
}

/// Runs everywhere: `cpu` is refused outright, and without the `cuda` feature or a GPU the kernels' error names what
/// is missing.
#[test]
fn upload_refuses_the_cpu_and_reports_a_missing_gpu() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let err = GpuModel::upload(&model, Device::Cpu, &f32_options()).expect_err("cpu");
    assert!(err.to_string().contains("CUDA device"), "{err}");
    let err = GpuModel::upload(&model, Device::Cuda(0), &GpuModelOptions { kv_blocks: 0, ..f32_options() })
        .expect_err("no KV blocks");
    assert!(err.to_string().contains("device KV pool"), "{err}");
    match GpuModel::upload(&model, Device::Cuda(0), &f32_options()) {
        Ok(gpu) => println!("GPU present: {} ({} weight bytes)", gpu.device_name(), gpu.weight_bytes()),
        Err(ModelError::Kernel(kernel)) => println!("no GPU path here: {kernel}"),
        Err(other) => panic!("unexpected error: {other}"),
    }
}
