//! Context parallelism at the model level: a sequence whose global layers' KV is spread over an owner and two shards
//! (each computing partial attention over its range, merged by log-sum-exp) gives the logits and greedy tokens of the
//! unsharded run, prefilled in chunks and decoded.

use std::path::Path;
use std::sync::Arc;

use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::context::{attend_shard, LocalShards, ShardStep};
use switchyard_model::{ForwardPass, KvBlockPool, KvCache, Llama4Model, LoadOptions, LogitsFor};

fn model() -> Llama4Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/maverick-f32");
    let config = ModelConfig::from_file(dir.join("config.json")).expect("config");
    let checkpoint = Checkpoint::open(&dir).expect("checkpoint");
    Llama4Model::load(&checkpoint, &config, &LoadOptions::default(), &mut |_, _| {}).expect("model")
}

fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn sharded_global_layers_give_the_unsharded_logits_and_tokens() {
    let model = Arc::new(model());
    let config = model.config().clone();
    let vocab = config.vocab_size;
    let tokens = prompt(2000, vocab);

    let mut reference_cache = model.new_cache().expect("cache");
    let reference = model.forward(&tokens, &mut reference_cache, LogitsFor::All).expect("unsharded prefill");
    let mut reference_tokens = vec![argmax(&reference[reference.len() - vocab..])];
    for _ in 0..7 {
        let last = *reference_tokens.last().expect("a token");
        let logits = model.forward(&[last], &mut reference_cache, LogitsFor::Last).expect("unsharded decode");
        reference_tokens.push(argmax(&logits));
    }

    let block_size = 16;
    let pool = KvBlockPool::new(&config, block_size, usize::MAX).expect("pool");
    let member: Arc<dyn ForwardPass> = model.clone();
    let shard = |start, end| (member.clone(), KvCache::shard(&config, pool.clone(), start, end).expect("shard"));
    let shards = Arc::new(LocalShards::new(640, vec![shard(640, 1280), shard(1280, usize::MAX)]));
    let mut cache = KvCache::in_pool(&config, pool.clone());
    cache.set_context(shards.clone()).expect("context");
    let mut logits = Vec::new();
    for chunk in tokens.chunks(300) {
        logits.extend(model.forward(chunk, &mut cache, LogitsFor::All).expect("sharded prefill chunk"));
    }
    let diff = max_diff(&logits, &reference);
    assert!(diff <= 1e-4, "prompt logits differ by {diff}");
    let mut sharded_tokens = vec![argmax(&logits[logits.len() - vocab..])];
    for _ in 0..7 {
        let last = *sharded_tokens.last().expect("a token");
        let step = model.forward(&[last], &mut cache, LogitsFor::Last).expect("sharded decode");
        sharded_tokens.push(argmax(&step));
    }
    assert_eq!(sharded_tokens, reference_tokens);

    // Each member holds only its range of the global layer; the owner the first range and the current chunk.
    let global_layers = (0..config.num_hidden_layers).filter(|&l| !config.is_chunked_attention(l)).count();
    assert_eq!(global_layers, 1);
    let first = shards.member(0).expect("member 0").blocks_held();
    let last = shards.member(1).expect("member 1").blocks_held();
    assert_eq!(first, (1280 - 640) / block_size);
    assert_eq!(last, (2007 - 1280usize).div_ceil(block_size));
    assert!(cache.blocks_held() < reference_cache.blocks_held(), "the owner holds less than the whole sequence");
}

#[test]
fn a_shard_refuses_a_range_off_the_block_grid_and_a_chunked_layer() {
    let model = model();
    let config = model.config().clone();
    let pool = KvBlockPool::new(&config, 16, 64).expect("pool");
    let error = KvCache::shard(&config, pool.clone(), 10, 100).expect_err("off the grid");
    assert!(error.to_string().contains("KV block boundary"), "{error}");
    let mut shard = KvCache::shard(&config, pool, 16, 100).expect("shard");
    let chunked = (0..config.num_hidden_layers).find(|&l| config.is_chunked_attention(l)).expect("a chunked layer");
    let queries = vec![0.0; config.q_dim()];
    let step = ShardStep {
        layer: chunked,
        query_positions: &[16],
        queries: &queries,
        kv_positions: &[],
        keys: &[],
        values: &[],
    };
    let error = attend_shard(&config, &mut shard, &step).expect_err("chunked layer");
    assert!(error.to_string().contains("not a global attention layer"), "{error}");
}

/// Keys and values of (layer, position) that do not depend on who writes them.
fn synthetic(layer: usize, position: usize, key: &mut [f32], value: &mut [f32]) {
    for (i, (k, v)) in key.iter_mut().zip(value.iter_mut()).enumerate() {
        let x = (layer * 7919 + position * 104_729 + i * 31) as f32;
        *k = (x * 0.001).sin();
        *v = (x * 0.0007).cos();
    }
}

#[test]
fn a_synthetic_fill_split_over_owner_and_shards_equals_the_unsharded_fill() {
    let model = Arc::new(model());
    let config = model.config().clone();
    let tokens = prompt(40, config.vocab_size);
    let filled = 1004;

    let mut reference_cache = model.new_cache().expect("cache");
    reference_cache.append_synthetic(filled, synthetic).expect("unsharded fill");
    assert_eq!(reference_cache.len(), filled);
    let scales = reference_cache.layer_rms();
    assert!(scales.iter().all(|s| s.is_some_and(|(k, v)| k > 0.1 && v > 0.1)), "{scales:?}");
    let mut reference = model.forward(&tokens[..32], &mut reference_cache, LogitsFor::All).expect("tail");
    for &token in &tokens[32..] {
        reference.extend(model.forward(&[token], &mut reference_cache, LogitsFor::Last).expect("decode"));
    }

    let block_size = 16;
    let pool = KvBlockPool::new(&config, block_size, usize::MAX).expect("pool");
    let mut members = Vec::new();
    for (start, end) in [(320, 640), (640, usize::MAX)] {
        let mut shard = KvCache::shard(&config, pool.clone(), start, end).expect("shard");
        shard.append_synthetic(filled.min(end) - start, synthetic).expect("shard fill");
        members.push((model.clone() as Arc<dyn ForwardPass>, shard));
    }
    let shards = Arc::new(LocalShards::new(320, members));
    let mut cache = KvCache::in_pool(&config, pool.clone());
    cache.set_context(shards.clone()).expect("context");
    cache.append_synthetic(filled, synthetic).expect("owner fill");
    // The owner: its range of the global layer and the chunked layers' current chunk only.
    let chunk = config.attention_chunk_size.expect("a chunked model");
    let chunked_layers = (0..config.num_hidden_layers).filter(|&l| config.is_chunked_attention(l)).count();
    let current = filled.div_ceil(block_size) - filled / chunk * chunk / block_size;
    assert_eq!(cache.blocks_held(), 320 / block_size + chunked_layers * current);
    assert_eq!(shards.member(0).expect("member 0").blocks_held(), 320 / block_size);
    let mut logits = model.forward(&tokens[..32], &mut cache, LogitsFor::All).expect("sharded tail");
    for &token in &tokens[32..] {
        logits.extend(model.forward(&[token], &mut cache, LogitsFor::Last).expect("sharded decode"));
    }
    let diff = max_diff(&logits, &reference);
    assert!(diff <= 1e-4, "logits differ by {diff}");
}
