//! `RoutingTable` and `RemoteExperts`: the forward pass with its routed experts on expert workers equals the
//! single-process model.

#![allow(clippy::unwrap_used)]

mod common;

use common::{cluster, fixture, max_diff, prompt, solo};
use switchyard_attention_worker::{micro_batch_pool, AttentionWorkerError, RoutingTable};
use switchyard_model::{LogitsFor, SamplingParams, SequenceStep};
use switchyard_proto::v1::{ExpertWorkerInfo, LayerExperts, Placement};

fn worker(id: &str, experts: &[(u32, &[u32])]) -> ExpertWorkerInfo {
    ExpertWorkerInfo {
        worker_id: id.into(),
        endpoint: format!("http://{id}"),
        experts: experts.iter().map(|&(layer, e)| LayerExperts { layer, experts: e.to_vec() }).collect(),
    }
}

/// A forward pass whose experts are remote blocks the thread that dispatches; run it on a pool of its own, as the
/// engine does, so that the blocked threads are never the global pool's, which in-process expert workers compute on.
fn forward_pool() -> rayon::ThreadPool {
    micro_batch_pool(0, 2).unwrap()
}

const ALL: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 7];

#[test]
fn routing_table_covers_every_expert_and_rotates_replicas() {
    let text = &fixture().config.text;
    // The tiny preset's MoE layers are 1 and 3, with 8 experts each.
    let placement = Placement {
        epoch: 3,
        workers: vec![worker("a", &[(1, ALL), (3, &[0, 1, 2, 3])]), worker("b", &[(1, &[5]), (3, &[4, 5, 6, 7])])],
    };
    let table = RoutingTable::new(&placement, text).unwrap();
    assert_eq!(table.epoch(), 3);
    assert_eq!(table.holders(1, 5).unwrap(), vec!["a", "b"]);
    assert_eq!(table.holders(3, 6).unwrap(), vec!["b"]);
    assert!(table.holders(0, 0).is_none(), "layer 0 is dense");
    assert!(table.holders(1, 8).is_none(), "expert 8 is out of range");
    let turns: Vec<&str> = (0..4).map(|_| table.choose(1, 5).unwrap().id.as_str()).collect();
    assert_eq!(turns, ["a", "b", "a", "b"], "replicas take turns");
    assert_eq!(table.choose(3, 2).unwrap().id, "a");
}

#[test]
fn routing_table_names_uncovered_experts() {
    let text = &fixture().config.text;
    let placement =
        Placement { epoch: 4, workers: vec![worker("a", &[(1, &[0, 1, 2, 3, 4, 5, 7]), (3, &[0, 1, 2, 3, 4, 5, 6])])] };
    let error = RoutingTable::new(&placement, text).unwrap_err();
    assert!(
        matches!(&error, AttentionWorkerError::UncoveredExperts { missing, total: 16, .. } if missing == &[(1, 6), (3, 7)])
    );
    let message = error.to_string();
    assert!(message.contains("2 of 16"), "{message}");
    assert!(message.contains("layer 1 expert 6") && message.contains("layer 3 expert 7"), "{message}");
    assert!(message.contains("epoch 4"), "{message}");

    let dense = Placement { epoch: 1, workers: vec![worker("a", &[(1, ALL), (3, ALL), (2, &[0])])] };
    let message = RoutingTable::new(&dense, text).unwrap_err().to_string();
    assert!(message.contains("layer 2") && message.contains("not a MoE layer"), "{message}");
    let out_of_range =
        Placement { epoch: 1, workers: vec![worker("a", &[(1, ALL), (3, &[0, 1, 2, 3, 4, 5, 6, 7, 8])])] };
    let message = RoutingTable::new(&out_of_range, text).unwrap_err().to_string();
    assert!(message.contains("expert 8 of layer 3") && message.contains("8 experts"), "{message}");
    let twice = Placement { epoch: 1, workers: vec![worker("a", &[(1, ALL), (3, ALL)]), worker("a", &[])] };
    assert!(RoutingTable::new(&twice, text).unwrap_err().to_string().contains("more than once"));
}

/// Greedy tokens and every logit through 1, 2 and 4 expert workers equal the single-process model's.
#[test]
fn remote_experts_equal_the_single_process_model() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = fixture();
    // Chosen so that the prompt and the tokens generated from it reach every expert of both MoE layers.
    let prompt = prompt(12, 40);
    let reference = solo(&fixture.reference, &prompt, 12, SamplingParams::default());
    let pool = forward_pool();
    for specs in
        [&["all"][..], &["0-3", "4-7"], &["0-1", "2-3", "4-5", "6-7"], &["1:0-7;3:0-3", "1:0-3;3:4-7", "1:4-7"]]
    {
        let cluster = cluster(specs, runtime.handle().clone());
        let remote = pool.install(|| solo(&cluster.model, &prompt, 12, SamplingParams::default()));
        assert_eq!(remote.tokens, reference.tokens, "greedy tokens with workers {specs:?}");
        // Each expert worker computes an expert's rows as one group in row order, like the single-process model, so
        // the numbers are the same to the bit.
        for (r, s) in reference.prompt_logits.iter().zip(&remote.prompt_logits) {
            assert_eq!(max_diff(r, s), 0.0, "prompt logits with workers {specs:?}");
        }
        for (r, s) in reference.decode_logits.iter().zip(&remote.decode_logits) {
            assert_eq!(max_diff(r, s), 0.0, "decode logits with workers {specs:?}");
        }
        for worker in &cluster.workers {
            assert!(worker.counters().tokens_computed > 0, "{} got no token with {specs:?}", worker.worker_id());
        }
        let routed = cluster.remote.routed_tokens();
        assert_eq!(routed[0], 0, "layer 0 is dense");
        // Prefill (40) + 11 decode steps, through each MoE layer.
        assert_eq!(routed[1], 51);
        assert_eq!(routed[3], 51);
        for layer in [1, 3] {
            let per_expert = cluster.remote.expert_tokens(layer);
            assert_eq!(per_expert.len(), 8);
            assert_eq!(per_expert.iter().sum::<u64>(), 51);
            assert!(per_expert.iter().all(|&n| n > 0), "layer {layer}: every expert is reached: {per_expert:?}");
        }
    }
}

/// A batched step of several sequences through remote experts equals each sequence alone.
#[test]
fn batched_steps_equal_single_sequences() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = fixture();
    let cluster = cluster(&["0-3", "4-7"], runtime.handle().clone());
    let pool = forward_pool();
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(20 + i, 5 + 7 * i as usize)).collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| cluster.model.new_cache().expect("KV cache")).collect();
    let mut steps: Vec<SequenceStep<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| SequenceStep { tokens: p, cache, logits: LogitsFor::All })
        .collect();
    let batched = pool.install(|| cluster.model.forward_batch(&mut steps)).unwrap();
    for (p, logits) in prompts.iter().zip(&batched) {
        let mut cache = fixture.reference.new_cache().expect("KV cache");
        let alone = fixture.reference.forward(p, &mut cache, LogitsFor::All).unwrap();
        // Other sequences' rows join the experts' groups, which may change the matmul's blocking, not a row's sums.
        assert!(max_diff(&alone, logits) <= 1e-5, "max diff {}", max_diff(&alone, logits));
    }
}
