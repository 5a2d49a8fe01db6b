//! The expert worker against the tiny FP8 checkpoint: selective loading, computation, batching, validation and
//! loading/unloading while serving.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use switchyard_expert_worker::{ExpertWorker, WorkerCounters};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::{ActivationPrecision, RoutedExperts};
use switchyard_transport::{ExpertBatch, ExpertService, TransportError};

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}

fn compute(worker: &ExpertWorker, batch: ExpertBatch) -> Result<Vec<f32>, TransportError> {
    worker.validate(&batch)?;
    block_on(worker.compute(batch))
}

#[test]
fn loads_only_its_experts() {
    let dir = common::tiny_model();
    let text = common::text_config(dir.path());
    let worker = common::worker(dir.path(), "1:0-2;3:5", 0);

    let wanted = [(1usize, 0usize), (1, 1), (1, 2), (3, 5)];
    let reference = Checkpoint::open(dir.path()).unwrap();
    let mut expected: Vec<_> =
        wanted.iter().flat_map(|&(layer, e)| reference.expert_ranges(layer, e, &text).unwrap()).collect();
    expected.sort();
    let mut read = worker.checkpoint().ledger().ranges();
    read.sort();
    assert_eq!(read, expected, "the worker read exactly its experts' bytes, nothing else");
    let expected_bytes: u64 = expected.iter().map(|r| r.len() as u64).sum();
    assert_eq!(worker.checkpoint().ledger().bytes_read(), expected_bytes);

    assert_eq!(worker.held(), BTreeMap::from([(1, BTreeSet::from([0, 1, 2])), (3, BTreeSet::from([5]))]));
    // FP8 experts: per projection the codes plus one f32 scale per output row.
    let (h, i) = (text.hidden_size as u64, text.intermediate_size as u64);
    let per_expert = 3 * h * i + 4 * (i + i + h);
    assert_eq!(worker.expert_bytes(), 4 * per_expert);
}

#[test]
fn computes_like_local_experts_holding_everything() {
    let dir = common::tiny_model();
    let text = common::text_config(dir.path());
    let hidden = text.hidden_size;
    for precision in [ActivationPrecision::F32, ActivationPrecision::Fp8PerToken] {
        let reference = common::all_experts(dir.path(), precision);
        let worker = common::worker_with(dir.path(), "1:0-3;3:2,5,7", 4, precision);
        for (seed, layer, experts, tokens) in
            [(1, 1u32, &[0u32, 1, 2, 3][..], 37), (2, 3, &[2, 5, 7], 9), (3, 3, &[7], 1)]
        {
            let batch = common::batch(seed, layer, experts, tokens, hidden, 4);
            let expected = reference.compute(layer as usize, &batch.inputs, &batch.experts, hidden).unwrap();
            // One request, so the same rows meet each expert in the same order as in the reference: bit-exact.
            assert_eq!(compute(&worker, batch).unwrap(), expected, "{precision:?} layer {layer}");
        }
    }
}

#[test]
fn batches_concurrent_senders_into_one_grouped_computation() {
    let dir = common::tiny_model();
    let text = common::text_config(dir.path());
    let hidden = text.hidden_size;
    let worker = Arc::new(common::worker(dir.path(), "all", 0));
    let reference = common::all_experts(dir.path(), ActivationPrecision::F32);
    let all: Vec<u32> = (0..8).collect();

    // 3 attention workers x 2 requests for layer 1, and one for layer 3, all queued before the executor looks.
    // Layer 1's rows go to two experts only, so that grouped each sees ~60 rows (the FP8 panel kernel, from 48 rows
    // on) while each request alone gives it at most 30 (the streaming kernel).
    worker.pause();
    let mut batches = Vec::new();
    for sender in 0..3u64 {
        for request in 0..2u64 {
            let tokens = if request == 0 { 12 } else { 30 };
            let mut batch = common::batch(10 * sender + request, 1, &[2, 5], tokens, hidden, 0);
            batch.attention_worker = format!("aw-{sender}");
            batches.push(batch);
        }
    }
    batches.push(common::batch(99, 3, &all, 11, hidden, 0));
    let pending: Vec<_> = batches
        .iter()
        .map(|batch| {
            worker.validate(batch).unwrap();
            worker.compute(batch.clone())
        })
        .collect();
    assert_eq!(worker.queued_batches(), 7);
    worker.resume();
    let outputs = block_on(futures::future::join_all(pending));

    let counters = worker.counters();
    let tokens: u64 = batches.iter().map(|b| b.tokens() as u64).sum();
    assert_eq!(counters, WorkerCounters { requests_served: 7, tokens_computed: tokens, batches_computed: 2 });
    assert!(counters.batches_computed < counters.requests_served);
    let mut worst = 0.0f32;
    for (batch, output) in batches.iter().zip(outputs) {
        let output = output.unwrap();
        let alone = reference.compute(batch.layer as usize, &batch.inputs, &batch.experts, hidden).unwrap();
        // Within 1e-5, not bit-exact: grouped with the other senders, an expert sees more rows, and the matmul
        // kernels pick their path by row count (FP8 streaming below `panel_min_tokens` rows, panels above; gemm's
        // f32 tiling), so a row's sums may be ordered differently than when its batch is computed alone.
        let error = common::max_relative_error(&output, &alone);
        worst = worst.max(error);
        assert!(error <= 1e-5, "{} of layer {}: relative error {error}", batch.attention_worker, batch.layer);
    }
    eprintln!("largest relative error, grouped vs alone: {worst:e}");
}

#[test]
fn refuses_malformed_batches() {
    let dir = common::tiny_model();
    let hidden = common::text_config(dir.path()).hidden_size;
    let worker = common::worker(dir.path(), "1:0-3", 7);
    let good = common::batch(1, 1, &[0, 3], 4, hidden, 7);
    assert!(worker.validate(&good).is_ok());

    let unknown_layer = ExpertBatch { layer: 2, ..good.clone() };
    assert_eq!(worker.validate(&unknown_layer), Err(TransportError::UnknownLayer { layer: 2 }));
    let past_the_end = ExpertBatch { layer: 40, ..good.clone() };
    assert_eq!(worker.validate(&past_the_end), Err(TransportError::UnknownLayer { layer: 40 }));

    let mut not_held = good.clone();
    not_held.experts[2] = 5;
    assert_eq!(worker.validate(&not_held), Err(TransportError::ExpertNotHeld { layer: 1, expert: 5 }));
    let other_layer = ExpertBatch { layer: 3, ..good.clone() };
    assert_eq!(worker.validate(&other_layer), Err(TransportError::ExpertNotHeld { layer: 3, expert: 0 }));

    let stale = ExpertBatch { placement_epoch: 6, ..good.clone() };
    assert_eq!(worker.validate(&stale), Err(TransportError::StaleEpoch { sent: 6, current: 7 }));

    let narrow = common::batch(1, 1, &[0], 4, hidden / 2, 7);
    match worker.validate(&narrow) {
        Err(TransportError::InvalidPayload { what, reason }) => {
            assert_eq!(what, "hidden");
            assert!(reason.contains(&hidden.to_string()), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let mut short = good.clone();
    short.inputs.pop();
    assert!(matches!(worker.validate(&short), Err(TransportError::InvalidPayload { what, .. }) if what == "inputs"));

    // `compute` checks too, and a refused batch never reaches the executor.
    assert_eq!(block_on(worker.compute(stale)), Err(TransportError::StaleEpoch { sent: 6, current: 7 }));
    worker.set_placement_epoch(8);
    assert_eq!(worker.validate(&good), Err(TransportError::StaleEpoch { sent: 7, current: 8 }));
    assert_eq!(worker.counters(), WorkerCounters::default());
    // An empty batch is valid and answered at once.
    let empty = ExpertBatch { experts: vec![], inputs: vec![], placement_epoch: 8, ..good };
    assert_eq!(compute(&worker, empty), Ok(vec![]));
}

#[test]
fn accepts_every_epoch_of_its_window() {
    let dir = common::tiny_model();
    let hidden = common::text_config(dir.path()).hidden_size;
    let worker = common::worker(dir.path(), "1:0-3", 3);
    let at = |epoch: u64| common::batch(1, 1, &[0, 3], 4, hidden, epoch);
    let stale = |sent: u64, current: u64| Err(TransportError::StaleEpoch { sent, current });
    let none = BTreeMap::new();
    assert_eq!(worker.epoch_window(), (3, 3));
    assert_eq!(worker.validate(&at(4)), stale(4, 3), "too new: the newest accepted epoch comes back");

    // A load for epoch 5 widens the window upwards; an older or zero epoch leaves it.
    worker.load_experts(&none, 5).unwrap();
    worker.load_experts(&none, 4).unwrap();
    worker.load_experts(&none, 0).unwrap();
    assert_eq!(worker.epoch_window(), (3, 5));
    for epoch in 3..=5 {
        assert_eq!(worker.validate(&at(epoch)), Ok(()), "epoch {epoch}");
    }
    assert_eq!(compute(&worker, at(3)), compute(&worker, at(5)), "every epoch of the window computes alike");
    assert_eq!(worker.validate(&at(6)), stale(6, 5));
    assert_eq!(worker.validate(&at(2)), stale(2, 3), "too old: the oldest accepted epoch comes back");

    // An unload for epoch 4 raises the lower end first; zero leaves it.
    worker.unload_experts(&BTreeMap::from([(1, BTreeSet::from([3]))]), 4).unwrap();
    worker.unload_experts(&none, 0).unwrap();
    assert_eq!(worker.epoch_window(), (4, 5));
    assert_eq!(worker.validate(&at(3)), stale(3, 4));
    assert_eq!(worker.validate(&common::batch(1, 1, &[0], 4, hidden, 4)), Ok(()));
    assert_eq!(worker.validate(&at(4)), Err(TransportError::ExpertNotHeld { layer: 1, expert: 3 }));

    // Raised past the upper end, the window is empty until a load catches up: the worker serves no epoch.
    worker.unload_experts(&none, 7).unwrap();
    assert_eq!(worker.epoch_window(), (7, 5));
    assert_eq!(worker.validate(&at(5)), stale(5, 7));
    assert_eq!(worker.validate(&at(8)), stale(8, 5));
    worker.load_experts(&BTreeMap::from([(1, BTreeSet::from([3]))]), 7).unwrap();
    assert_eq!(worker.epoch_window(), (7, 7));
    assert_eq!(worker.validate(&at(7)), Ok(()));

    // A failed load leaves the window as it was.
    assert!(worker.load_experts(&BTreeMap::from([(2, BTreeSet::from([0]))]), 9).is_err());
    assert!(worker.unload_experts(&BTreeMap::from([(2, BTreeSet::from([0]))]), 9).is_err());
    assert_eq!(worker.epoch_window(), (7, 7));
}

#[test]
fn loads_and_unloads_experts_while_serving() {
    let dir = common::tiny_model();
    let text = common::text_config(dir.path());
    let hidden = text.hidden_size;
    let reference = common::all_experts(dir.path(), ActivationPrecision::F32);
    let worker = common::worker(dir.path(), "1:0", 0);
    let to_new = common::batch(5, 3, &[4, 6], 6, hidden, 0);
    assert_eq!(compute(&worker, to_new.clone()), Err(TransportError::ExpertNotHeld { layer: 3, expert: 4 }));

    let bytes_before = worker.expert_bytes();
    let read =
        worker.load_experts(&BTreeMap::from([(3, BTreeSet::from([4, 6])), (1, BTreeSet::from([0]))]), 0).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let expected: usize =
        [4, 6].iter().flat_map(|&e| checkpoint.expert_ranges(3, e, &text).unwrap()).map(|r| r.len()).sum();
    assert_eq!(read, expected as u64, "only the new experts are read; expert 0 of layer 1 was already held");
    assert_eq!(worker.held(), BTreeMap::from([(1, BTreeSet::from([0])), (3, BTreeSet::from([4, 6]))]));
    assert_eq!(worker.expert_bytes(), 3 * bytes_before);
    let expected = reference.compute(3, &to_new.inputs, &to_new.experts, hidden).unwrap();
    assert_eq!(compute(&worker, to_new.clone()).unwrap(), expected);

    let freed = worker.unload_experts(&BTreeMap::from([(3, BTreeSet::from([4]))]), 0).unwrap();
    assert_eq!(freed, bytes_before);
    assert_eq!(worker.held(), BTreeMap::from([(1, BTreeSet::from([0])), (3, BTreeSet::from([6]))]));
    assert_eq!(compute(&worker, to_new.clone()), Err(TransportError::ExpertNotHeld { layer: 3, expert: 4 }));
    let to_kept = common::batch(6, 3, &[6], 3, hidden, 0);
    let expected = reference.compute(3, &to_kept.inputs, &to_kept.experts, hidden).unwrap();
    assert_eq!(compute(&worker, to_kept).unwrap(), expected, "the rebuilt layer computes as before");

    // Unloading the last expert of a layer, and experts not held, are fine; bad ids are refused.
    assert_eq!(worker.unload_experts(&BTreeMap::from([(1, BTreeSet::from([0, 3]))]), 0).unwrap(), bytes_before);
    assert_eq!(worker.held(), BTreeMap::from([(3, BTreeSet::from([6]))]));
    assert!(worker.load_experts(&BTreeMap::from([(2, BTreeSet::from([0]))]), 0).is_err());
    assert!(worker.load_experts(&BTreeMap::from([(1, BTreeSet::from([8]))]), 0).is_err());
}

#[test]
fn an_unload_while_queued_fails_only_the_affected_batches() {
    let dir = common::tiny_model();
    let hidden = common::text_config(dir.path()).hidden_size;
    let worker = common::worker(dir.path(), "1:0-1", 0);
    worker.pause();
    let kept = common::batch(1, 1, &[0], 3, hidden, 0);
    let dropped = common::batch(2, 1, &[1], 3, hidden, 0);
    let kept_answer = worker.compute(kept);
    let dropped_answer = worker.compute(dropped);
    worker.unload_experts(&BTreeMap::from([(1, BTreeSet::from([1]))]), 0).unwrap();
    worker.resume();
    assert!(block_on(kept_answer).is_ok());
    assert_eq!(block_on(dropped_answer), Err(TransportError::ExpertNotHeld { layer: 1, expert: 1 }));
}

#[test]
fn dropping_the_worker_answers_queued_batches() {
    let dir = common::tiny_model();
    let hidden = common::text_config(dir.path()).hidden_size;
    let worker = common::worker(dir.path(), "all", 0);
    worker.pause();
    let answer = worker.compute(common::batch(1, 1, &[0], 2, hidden, 0));
    drop(worker);
    assert!(matches!(block_on(answer), Err(TransportError::Unavailable { .. })));
}
