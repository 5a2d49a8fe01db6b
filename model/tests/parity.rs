//! Parity with HuggingFace transformers' Llama 4 on the fixtures written by `tests/golden/generate.sh`.
//!
//! Each fixture is a small random checkpoint plus `reference.safetensors` holding transformers' prompt logits, the
//! greedy continuation and the logits that chose each generated token (computed by full recomputation there). Here
//! the prompt runs as one prefill and the continuation through the KV cache, so these tests also hold the cached
//! decode to the reference.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::{
    generate, ActivationPrecision, GenerationRequest, Llama4Model, LoadOptions, LogitsFor, SamplingParams,
};

const TOLERANCE: f32 = 1e-4;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(name)
}

struct Reference {
    prompt_ids: Vec<u32>,
    prompt_logits: Vec<f32>,
    greedy_tokens: Vec<u32>,
    decode_logits: Vec<f32>,
}

fn read_reference(dir: &Path) -> Reference {
    let path = dir.join("reference.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = SafeTensors::deserialize(&bytes).expect("reference.safetensors parses");
    let ints = |name: &str| -> Vec<u32> {
        let t = tensors.tensor(name).unwrap_or_else(|_| panic!("{name} in reference"));
        assert_eq!(t.dtype(), Dtype::I64, "{name} dtype");
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32).collect()
    };
    let floats = |name: &str| -> Vec<f32> {
        let t = tensors.tensor(name).unwrap_or_else(|_| panic!("{name} in reference"));
        assert_eq!(t.dtype(), Dtype::F32, "{name} dtype");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    };
    Reference {
        prompt_ids: ints("prompt_ids"),
        prompt_logits: floats("prompt_logits"),
        greedy_tokens: ints("greedy_tokens"),
        decode_logits: floats("decode_logits"),
    }
}

fn load(dir: &Path, precision: ActivationPrecision) -> Llama4Model {
    let config = ModelConfig::from_file(dir.join("config.json")).expect("config parses");
    let checkpoint = Checkpoint::open(dir).expect("checkpoint opens");
    let options = LoadOptions { activation_precision: precision, ..LoadOptions::default() };
    Llama4Model::load(&checkpoint, &config, &options, &mut |_, _| {}).expect("model loads")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check_fixture(name: &str) {
    let dir = golden(name);
    let reference = read_reference(&dir);
    let model = load(&dir, ActivationPrecision::F32);
    let vocab = model.config().vocab_size;

    let mut cache = model.new_cache().expect("KV cache");
    let prompt_logits = model.forward(&reference.prompt_ids, &mut cache, LogitsFor::All).expect("prefill");
    let prompt_diff = max_abs_diff(&prompt_logits, &reference.prompt_logits);
    println!("{name}: prompt logits max |diff| = {prompt_diff:e}");
    assert!(prompt_diff <= TOLERANCE, "{name}: prompt logits differ by {prompt_diff}");

    let request = GenerationRequest {
        prompt: reference.prompt_ids.clone(),
        max_new_tokens: reference.greedy_tokens.len(),
        sampling: SamplingParams::default(),
        stop_tokens: Vec::new(),
        keep_logits: true,
        logprobs: None,
    };
    let generation = generate(&model, &request, &mut |_| {}).expect("generate");
    assert!(generation.tokens.len() >= 16);
    assert_eq!(generation.tokens, reference.greedy_tokens, "{name}: greedy tokens");
    let decode: Vec<f32> = generation.decode_logits.concat();
    assert_eq!(decode.len(), reference.greedy_tokens.len() * vocab);
    let decode_diff = max_abs_diff(&decode, &reference.decode_logits);
    println!("{name}: cached decode logits max |diff| = {decode_diff:e}");
    assert!(decode_diff <= TOLERANCE, "{name}: decode logits differ by {decode_diff}");
}

#[test]
fn maverick_f32_matches_transformers() {
    check_fixture("maverick-f32");
}

#[test]
fn scout_f32_matches_transformers() {
    check_fixture("scout-f32");
}

#[test]
fn maverick_fp8_matches_transformers_on_dequantised_weights() {
    check_fixture("maverick-fp8");
}

/// Incremental decode through the cache equals recomputing the whole sequence, token by token, across chunk
/// boundaries and on NoPE layers.
#[test]
fn cached_decode_equals_full_recompute() {
    let dir = golden("maverick-f32");
    let reference = read_reference(&dir);
    let model = load(&dir, ActivationPrecision::F32);
    let vocab = model.config().vocab_size;
    let mut sequence = reference.prompt_ids.clone();
    sequence.extend_from_slice(&reference.greedy_tokens);

    let mut full_cache = model.new_cache().expect("KV cache");
    let full = model.forward(&sequence, &mut full_cache, LogitsFor::All).expect("full forward");

    let mut cache = model.new_cache().expect("KV cache");
    let prompt_len = reference.prompt_ids.len();
    model.forward(&sequence[..prompt_len], &mut cache, LogitsFor::Last).expect("prefill");
    for (i, &token) in sequence[prompt_len..].iter().enumerate() {
        let position = prompt_len + i;
        let step = model.forward(&[token], &mut cache, LogitsFor::Last).expect("decode step");
        let diff = max_abs_diff(&step, &full[position * vocab..(position + 1) * vocab]);
        assert!(diff <= 1e-5, "position {position}: cached vs full differ by {diff}");
    }
    assert_eq!(cache.len(), sequence.len());
    // Chunked layers keep only the current chunk, so the cache holds less than every key of every layer.
    let config = model.config();
    let every_key = 2 * config.num_hidden_layers * sequence.len() * config.kv_dim();
    assert!(cache.floats_held() < every_key, "{} floats held, {every_key} untrimmed", cache.floats_held());
    assert_eq!(cache.floats_held(), full_cache.floats_held());
}

/// Sequences batched into one step give the same logits as each run alone.
#[test]
fn batched_sequences_equal_solo_runs() {
    let dir = golden("scout-f32");
    let reference = read_reference(&dir);
    let model = load(&dir, ActivationPrecision::F32);
    let a = &reference.prompt_ids[..];
    let b = &reference.greedy_tokens[..];
    let solo_a = model.forward(a, &mut model.new_cache().expect("KV cache"), LogitsFor::All).expect("solo a");
    let solo_b = model.forward(b, &mut model.new_cache().expect("KV cache"), LogitsFor::All).expect("solo b");
    let (mut cache_a, mut cache_b) = (model.new_cache().expect("KV cache"), model.new_cache().expect("KV cache"));
    let batched = model
        .forward_batch(&mut [
            switchyard_model::SequenceStep { tokens: a, cache: &mut cache_a, logits: LogitsFor::All },
            switchyard_model::SequenceStep { tokens: b, cache: &mut cache_b, logits: LogitsFor::All },
        ])
        .expect("batched");
    assert!(max_abs_diff(&batched[0], &solo_a) <= 1e-5);
    assert!(max_abs_diff(&batched[1], &solo_b) <= 1e-5);
}

/// Per-token FP8 activations are an option: they change the result a little, not a lot.
#[test]
fn fp8_activation_quantisation_stays_close() {
    let dir = golden("maverick-fp8");
    let reference = read_reference(&dir);
    let model = load(&dir, ActivationPrecision::Fp8PerToken);
    let logits = model
        .forward(&reference.prompt_ids, &mut model.new_cache().expect("KV cache"), LogitsFor::All)
        .expect("prefill");
    let diff = max_abs_diff(&logits, &reference.prompt_logits);
    let scale = reference.prompt_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    println!("fp8 activations: max |diff| = {diff:e} (logit scale {scale})");
    assert!(diff > 0.0, "quantising activations should change something");
    assert!(diff < 0.1 * scale, "fp8 activations moved logits by {diff} (scale {scale})");
}
