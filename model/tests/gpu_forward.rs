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
use switchyard_model::context::{LocalShards, ShardStep};
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

/// A GPU owner of a context-parallel sequence (`LocalShards::new(12, ..)`: positions 0..12 of the global layers here,
/// 12..20 and 20.. on two members of `member_model`'s), prefilled in two chunks (the second crossing into the first
/// member's range) and decoded across the second member's boundary at 20, against the CPU without context
/// parallelism: the f32 allowance. Returns the shards, to look at what the members hold.
fn owner_matches_the_cpu(
    model: &Llama4Model,
    gpu: &GpuModel,
    member_model: Arc<dyn ForwardPass>,
    member_pool: &Arc<KvBlockPool>,
    what: &str,
) -> Arc<LocalShards> {
    let config = model.config();
    let vocab = config.vocab_size;
    let prompt = prompt(vocab);
    let shard = |start, end| KvCache::shard(config, member_pool.clone(), start, end).expect("shard");
    let shards = Arc::new(LocalShards::new(
        12,
        vec![(member_model.clone(), shard(12, 20)), (member_model, shard(20, usize::MAX))],
    ));
    let mut owner = gpu.new_cache().expect("cache");
    owner.set_context(shards.clone()).expect("context");
    let mut cpu_cache = model.new_cache().expect("cache");
    let mut token = 0;
    for (i, chunk) in [&prompt[..10], &prompt[10..18]].into_iter().enumerate() {
        let cpu = model.forward(chunk, &mut cpu_cache, LogitsFor::All).expect("cpu prefill");
        let on_gpu = gpu.forward(chunk, &mut owner, LogitsFor::All).expect("gpu owner prefill");
        assert_f32_close(&format!("{what}: prefill chunk {i}"), &on_gpu, &cpu);
        token = argmax(&cpu[cpu.len() - vocab..]);
    }
    for step in 0..6 {
        let cpu = model.forward(&[token], &mut cpu_cache, LogitsFor::Last).expect("cpu decode");
        let on_gpu = gpu.forward(&[token], &mut owner, LogitsFor::Last).expect("gpu owner decode");
        assert_f32_close(&format!("{what}: decode step {step} (position {})", 18 + step), &on_gpu, &cpu);
        token = argmax(&cpu);
    }
    assert_eq!(owner.len(), 24);
    let global = (0..config.num_hidden_layers).filter(|&l| !config.is_chunked_attention(l)).count();
    let block_size = member_pool.block_size();
    let first = shards.member(0).expect("member 0").blocks_held();
    let last = shards.member(1).expect("member 1").blocks_held();
    assert_eq!((first, last), (global * 8 / block_size, global * 4 / block_size), "{what}: the members' ranges");
    shards
}

/// Step 1 of context parallelism on the GPU: the owner on the GPU, its members CPU models' shards.
#[test]
fn a_gpu_owner_with_cpu_members_matches_the_cpu() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let Some(gpu) = upload(&model, &f32_options(), "gpu owner, cpu members") else { return };
    let model = Arc::new(model);
    let pool = KvBlockPool::new(model.config(), f32_options().block_size, usize::MAX).expect("host pool");
    owner_matches_the_cpu(&model, &gpu, model.clone(), &pool, "gpu owner, cpu members");
    assert_eq!(gpu.kv_pool().in_use(), 0, "the owner's cache is dropped");
}

/// A context-parallel sequence and a plain one in the same GPU steps (each sequence's rows merged or not on their
/// own), against the CPU running both without context parallelism.
#[test]
fn a_batch_mixing_a_context_parallel_and_a_plain_sequence_matches_the_cpu() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let Some(gpu) = upload(&model, &f32_options(), "mixed batch") else { return };
    let model = Arc::new(model);
    let config = model.config().clone();
    let vocab = config.vocab_size;
    let a = prompt(vocab);
    let b: Vec<u32> = (0..13u32).map(|i| (i * 53 + 7) % vocab as u32).collect();
    let pool = KvBlockPool::new(&config, f32_options().block_size, usize::MAX).expect("host pool");
    let shard = KvCache::shard(&config, pool, 8, usize::MAX).expect("shard");
    let shards = Arc::new(LocalShards::new(8, vec![(model.clone() as Arc<dyn ForwardPass>, shard)]));
    let mut results = Vec::new();
    for (m, context_parallel) in [(&*model as &dyn ForwardPass, false), (&gpu, true)] {
        let (mut cache_a, mut cache_b) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
        if context_parallel {
            cache_a.set_context(shards.clone()).expect("context");
        }
        let first = m
            .forward_batch(&mut [
                SequenceStep { tokens: &a[..14], cache: &mut cache_a, logits: LogitsFor::All },
                SequenceStep { tokens: &b, cache: &mut cache_b, logits: LogitsFor::All },
            ])
            .expect("first step");
        let second = m
            .forward_batch(&mut [
                SequenceStep { tokens: &[b[0]], cache: &mut cache_b, logits: LogitsFor::All },
                SequenceStep { tokens: &a[14..], cache: &mut cache_a, logits: LogitsFor::All },
            ])
            .expect("second step");
        results.push((first, second));
    }
    let (cpu, on_gpu) = (&results[0], &results[1]);
    assert_f32_close("mixed batch step 1, context-parallel a", &on_gpu.0[0], &cpu.0[0]);
    assert_f32_close("mixed batch step 1, plain b", &on_gpu.0[1], &cpu.0[1]);
    assert_f32_close("mixed batch step 2, plain b", &on_gpu.1[0], &cpu.1[0]);
    assert_f32_close("mixed batch step 2, context-parallel a", &on_gpu.1[1], &cpu.1[1]);
    assert_eq!(shards.member(0).expect("member").len(), a.len(), "the member holds the global layers from 8 on");
}

/// Step 2: a member's partials computed on the GPU (`GpuModel::attend_shard`, the shard in the device arena) against
/// the CPU's (`Llama4Model::attend_shard`) over the same keys: a prefill step reaching into the shard's range (queries
/// before it see none of its keys), a step inside it, and decodes; the kernels' paged attention bounds
/// (kernels/tests/cuda_kernels.rs): `1e-4` of the largest |value| for outputs, `1e-4 * (1 + |lse|)` for log-sum-exps
/// (a query that sees no key: zeros and -inf on both).
#[test]
fn gpu_member_partials_match_the_cpu_members() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let Some(gpu) = upload(&model, &f32_options(), "gpu member partials") else { return };
    let config = model.config().clone();
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    let layer = (0..config.num_hidden_layers).find(|&l| !config.is_chunked_attention(l)).expect("a global layer");
    let host_pool = KvBlockPool::new(&config, f32_options().block_size, usize::MAX).expect("host pool");
    let mut cpu_shard = KvCache::shard(&config, host_pool, 8, 20).expect("cpu shard");
    let mut gpu_shard = KvCache::shard(&config, gpu.kv_pool().clone(), 8, 20).expect("gpu shard");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    for (step, positions) in [(0..12), (12..18), (18..19), (19..20), (20..21)].into_iter().enumerate() {
        let query_positions: Vec<usize> = positions.collect();
        let kv_positions: Vec<usize> = query_positions.iter().copied().filter(|p| (8..20).contains(p)).collect();
        let queries = random(query_positions.len() * q_dim);
        let (keys, values) = (random(kv_positions.len() * kv_dim), random(kv_positions.len() * kv_dim));
        let shard_step = ShardStep {
            layer,
            query_positions: &query_positions,
            queries: &queries,
            kv_positions: &kv_positions,
            keys: &keys,
            values: &values,
        };
        let [cpu, on_gpu] = [(&model as &dyn ForwardPass, &mut cpu_shard), (&gpu, &mut gpu_shard)]
            .map(|(m, shard)| m.attend_shard(shard, &shard_step).expect("member step"));
        let scale = max_abs(&cpu.out);
        let diff = max_abs_diff(&on_gpu.out, &cpu.out);
        assert!(diff <= 1e-4 * scale.max(f32::MIN_POSITIVE), "step {step}: outputs differ by {diff} (scale {scale})");
        for (i, (g, c)) in on_gpu.lse.iter().zip(&cpu.lse).enumerate() {
            let close = if c.is_finite() { (g - c).abs() <= 1e-4 * (1.0 + c.abs()) } else { g == c };
            assert!(close, "step {step} lse {i}: gpu {g}, cpu {c}");
        }
        assert_eq!(on_gpu.lse.len(), cpu.lse.len());
        assert_eq!(gpu_shard.len(), cpu_shard.len(), "step {step}: both shards advance alike");
    }
    assert_eq!(gpu_shard.blocks_held(), cpu_shard.blocks_held());
    assert!(cpu_shard.len() == 20 && gpu.kv_pool().in_use() == gpu_shard.blocks_held());

    let queries = random(q_dim);
    let host_step =
        ShardStep { layer, query_positions: &[20], queries: &queries, kv_positions: &[], keys: &[], values: &[] };
    let err = gpu.attend_shard(&mut cpu_shard, &host_step).expect_err("a host shard on the GPU");
    assert!(err.to_string().contains("not from this GPU model's pool"), "{err}");
    let (key, value) = (random(kv_dim), random(kv_dim));
    let outside =
        ShardStep { layer, query_positions: &[21], queries: &queries, kv_positions: &[21], keys: &key, values: &value };
    let err = gpu.attend_shard(&mut gpu_shard, &outside).expect_err("a key outside the range");
    assert!(err.to_string().contains("outside this shard's range"), "{err}");
}

/// An owner and its members all on the GPU (one GpuModel both owning the sequence and holding the members' shards in
/// its arena, as an attention worker does), against the CPU without context parallelism.
#[test]
fn a_gpu_owner_with_gpu_members_matches_the_cpu() {
    let (_, _, model) = load_cpu("maverick-f32", ActivationPrecision::F32);
    let Some(gpu) = upload(&model, &f32_options(), "gpu owner, gpu members") else { return };
    let gpu = Arc::new(gpu);
    let pool = GpuModel::kv_pool(&gpu).clone();
    let shards = owner_matches_the_cpu(&model, &gpu, gpu.clone(), &pool, "gpu owner, gpu members");
    let held = shards.member(0).expect("member").blocks_held() + shards.member(1).expect("member").blocks_held();
    assert_eq!(pool.in_use(), held, "only the members' shards are left in the arena");
}
