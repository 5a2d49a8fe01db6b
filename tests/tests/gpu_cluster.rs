//! A whole cluster on a GPU through the real binary: `switchyard up --attention-device cuda:0 --expert-device cuda:0`
//! (every attention worker runs `GpuModel`, every expert worker holds its FP8 experts on the GPU) against the
//! single-process CPU run. Needs a `cuda` build of `switchyard` and a GPU, or the CPU emulation of CUDA
//! (`cuda-emulator/`, which `scripts/test.sh` puts on the loader path); elsewhere it prints why it skipped.
//!
//! Tolerance: dense weights and KV in f32 on the GPU, so the dense path is the CPU's arithmetic in another summation
//! order (~1e-6 relative); GPU expert workers quantise activations to FP8 per token as the reference does, and a
//! value on an FP8 rounding boundary may land one step away, moving its expert's output by at most 1/8 of one term:
//! every logit within 2% of the logit scale (the FP8 fixture's allowance in docs/cuda.md), and the same greedy tokens.
//! The context-parallel case keeps the experts on the CPU, so its bound is the f32 one: 1e-4.

use std::path::Path;

use switchyard_tests::{
    generate, long_prompt, make_tiny, max_abs_diff, read_json, single_process, switchyard, through, Cluster,
};

/// Why this machine cannot run the model on `cuda:0`, if it cannot: the binary refuses at start, naming what is
/// missing. Any other failure is a failure of the test.
fn gpu_unavailable(model: &Path) -> Option<String> {
    let model = model.to_str().expect("utf-8 path");
    let args = ["generate", "--model", model, "--prompt-ids", "1", "--max-new-tokens", "1", "--device", "cuda:0"];
    let out = switchyard(&args);
    if out.status.success() {
        return None;
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let unavailable = ["no CUDA support", "CUDA is unavailable", "no CUDA GPU", "CUDA headers"];
    assert!(unavailable.iter().any(|reason| stderr.contains(reason)), "generate --device cuda:0 failed: {stderr}");
    Some(stderr.trim().to_owned())
}

/// The largest |logit| of both runs: the scale the allowance is relative to.
fn logit_scale(values: &[&serde_json::Value]) -> f64 {
    let mut scale: f64 = 0.0;
    for value in values {
        for key in ["prompt_logits", "decode_logits"] {
            let flat =
                value[key].as_array().expect(key).iter().flat_map(|row| row.as_array().cloned().unwrap_or_default());
            scale = flat.filter_map(|v| v.as_f64()).fold(scale, |s, v| s.max(v.abs()));
        }
    }
    scale
}

#[test]
fn a_cluster_on_the_gpu_generates_what_the_cpu_does() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 7);
    if let Some(reason) = gpu_unavailable(&model) {
        println!("SKIPPED a cluster on the GPU: {reason}");
        return;
    }
    let reference = single_process(&model, &work.path().join("cpu.json"), true, 8);
    let model_arg = model.to_str().expect("utf-8");
    let cluster = Cluster::start(&[
        "--model",
        model_arg,
        "--expert-workers",
        "2",
        "--attention-device",
        "cuda:0",
        "--expert-device",
        "cuda:0",
        "--dense-dtype",
        "f32",
        "--kv-dtype",
        "f32",
        "--fp8-activations",
    ]);
    let endpoint = &cluster.attention_endpoints()[0];
    let got = through(endpoint, &work.path().join("gpu.json"));
    assert_eq!(got["prompt_ids"], reference["prompt_ids"]);
    assert_eq!(got["greedy_tokens"], reference["greedy_tokens"], "greedy tokens on the GPU cluster");
    let scale = logit_scale(&[&got, &reference]);
    for key in ["prompt_logits", "decode_logits"] {
        let diff = switchyard_tests::max_abs_diff(&got[key], &reference[key]);
        println!("{key}: max |diff| {diff:e} of a logit scale {scale:e}");
        assert!(diff <= 0.02 * scale, "{key} differ by {diff} (scale {scale})");
    }
}

/// Context parallelism between GPU attention workers: two of them, each with a KV arena too small for a 1000-token
/// sequence (1 MiB of f32 KV: the owner keeps ~368 global positions next to its chunked layers), hold it together
/// (the owner's GPU merges its partials with the member's, whose shard lives in its GPU arena), and the output
/// equals the single-process CPU run.
#[test]
fn a_sequence_spread_over_two_gpu_attention_workers_equals_the_cpu() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 11);
    if let Some(reason) = gpu_unavailable(&model) {
        println!("SKIPPED context parallelism on the GPU: {reason}");
        return;
    }
    let model_arg = model.to_str().expect("utf-8");
    let cluster = Cluster::start(&[
        "--model",
        model_arg,
        "--attention-workers",
        "2",
        "--expert-workers",
        "1",
        "--kv-memory",
        "1MiB",
        "--attention-device",
        "cuda:0",
        "--dense-dtype",
        "f32",
        "--kv-dtype",
        "f32",
    ]);
    let long = long_prompt(1000);
    let (reference, spread) = (work.path().join("reference.json"), work.path().join("spread.json"));
    let output = generate(&["--model", model_arg], &long, 4, &reference);
    assert!(output.status.success(), "single process: {}", String::from_utf8_lossy(&output.stderr));
    let output = generate(&["--endpoint", &cluster.endpoint], &long, 4, &spread);
    assert!(output.status.success(), "through the GPU cluster: {}", String::from_utf8_lossy(&output.stderr));
    let (reference, spread) = (read_json(&reference), read_json(&spread));
    assert_eq!(spread["greedy_tokens"], reference["greedy_tokens"], "greedy tokens");
    for key in ["prompt_logits", "decode_logits"] {
        let diff = max_abs_diff(&spread[key], &reference[key]);
        println!("{key}: max |diff| {diff:e}");
        assert!(diff <= 1e-4, "{key} differ by {diff}");
    }
}
