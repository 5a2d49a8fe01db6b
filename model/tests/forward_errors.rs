//! Bad input to the forward pass gets a typed error naming what was wrong, and leaves the cache untouched.

use std::path::Path;

use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::{generate, GenerationRequest, Llama4Model, LoadOptions, LogitsFor, ModelError, SamplingParams};

fn model() -> Llama4Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/maverick-f32");
    let config = ModelConfig::from_file(dir.join("config.json")).expect("config");
    let checkpoint = Checkpoint::open(&dir).expect("checkpoint");
    Llama4Model::load(&checkpoint, &config, &LoadOptions::default(), &mut |_, _| {}).expect("model")
}

#[test]
fn token_outside_vocabulary_is_refused() {
    let model = model();
    let vocab = model.config().vocab_size as u32;
    let mut cache = model.new_cache().expect("KV cache");
    let err = model.forward(&[1, vocab + 5], &mut cache, LogitsFor::Last).expect_err("out of range");
    assert!(matches!(err, ModelError::InvalidInput { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&(vocab + 5).to_string()) && message.contains("vocab"), "{message}");
    assert!(cache.is_empty(), "a refused step must not advance the cache");
}

#[test]
fn context_over_the_limit_is_refused_with_both_numbers() {
    let model = model();
    let limit = model.config().max_position_embeddings;
    let tokens = vec![1u32; limit + 1];
    let err = model.forward(&tokens, &mut model.new_cache().expect("KV cache"), LogitsFor::Last).expect_err("too long");
    let message = err.to_string();
    assert!(message.contains(&(limit + 1).to_string()) && message.contains(&limit.to_string()), "{message}");
}

#[test]
fn empty_prompt_and_bad_sampling_are_refused() {
    let model = model();
    let mut request = GenerationRequest {
        prompt: Vec::new(),
        max_new_tokens: 4,
        sampling: SamplingParams::default(),
        stop_tokens: Vec::new(),
        keep_logits: false,
        logprobs: None,
    };
    let err = generate(&model, &request, &mut |_| {}).expect_err("empty prompt");
    assert!(err.to_string().contains("prompt"), "{err}");
    request.prompt = vec![1, 2, 3];
    request.sampling.top_p = 1.5;
    let err = generate(&model, &request, &mut |_| {}).expect_err("bad top_p");
    assert!(err.to_string().contains("top_p"), "{err}");
    request.sampling.top_p = 1.0;
    request.sampling.temperature = -1.0;
    let err = generate(&model, &request, &mut |_| {}).expect_err("bad temperature");
    assert!(err.to_string().contains("temperature"), "{err}");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = model();
    let request = GenerationRequest {
        prompt: vec![5, 6, 7, 8],
        max_new_tokens: 12,
        sampling: SamplingParams { temperature: 1.0, top_p: 0.9, top_k: Some(50), seed: 7, ..Default::default() },
        stop_tokens: Vec::new(),
        keep_logits: false,
        logprobs: None,
    };
    let a = generate(&model, &request, &mut |_| {}).expect("a");
    let b = generate(&model, &request, &mut |_| {}).expect("b");
    assert_eq!(a.tokens, b.tokens);
    let mut other = request.clone();
    other.sampling.seed = 8;
    let c = generate(&model, &other, &mut |_| {}).expect("c");
    assert_ne!(a.tokens, c.tokens, "a different seed should change a 12-token sample");
}
