//! The engine: continuous batching equals solo runs, chunked prefill and preemption by recompute change no output,
//! cancellation frees sequences, a lost expert worker fails the requests of its step and not the engine, admission is
//! bounded by slots, queue length and KV blocks; a drain finishes the sequences and stops admission.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, cluster_with, expert_workers, fixture, in_process, max_diff, prompt, solo};
use switchyard_attention_worker::engine::LockstepOptions;
use switchyard_attention_worker::{AttentionWorkerError, Engine, EngineOptions, GenerationEvent, ValidGenerateRequest};
use switchyard_model::{FinishReason, KvCache, SamplingParams};
use switchyard_transport::{BoxFuture, ExpertBatch, Transport, TransportError, WireFormat};
use tokio::sync::mpsc::UnboundedReceiver;

fn request(id: &str, prompt: Vec<u32>, max_new_tokens: usize, sampling: SamplingParams) -> ValidGenerateRequest {
    ValidGenerateRequest {
        request_id: id.into(),
        prompt,
        max_new_tokens,
        sampling,
        ignore_eos: true,
        return_logits: true,
        ..Default::default()
    }
}

/// What a request received.
#[derive(Debug, Default)]
struct Outcome {
    prompt_logits: Vec<f32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    finished: Option<FinishReason>,
    failed: Option<Arc<AttentionWorkerError>>,
}

async fn drain(mut events: UnboundedReceiver<GenerationEvent>) -> Outcome {
    let mut outcome = Outcome::default();
    while let Some(event) = events.recv().await {
        match event {
            GenerationEvent::Prefilled { prompt_logits } => outcome.prompt_logits = prompt_logits.unwrap_or_default(),
            GenerationEvent::Token { id, index, logits, .. } => {
                assert_eq!(index as usize, outcome.tokens.len());
                outcome.tokens.push(id);
                outcome.logits.push(logits.unwrap_or_default());
            }
            GenerationEvent::Finished { reason, generated_tokens } => {
                assert_eq!(generated_tokens as usize, outcome.tokens.len());
                outcome.finished = Some(reason);
            }
            GenerationEvent::Failed(error) => outcome.failed = Some(error),
        }
    }
    outcome
}

fn sampling(i: u64) -> SamplingParams {
    if i % 2 == 0 {
        SamplingParams::default()
    } else {
        SamplingParams { temperature: 0.8, top_p: 0.9, top_k: Some(40), seed: 100 + i, ..Default::default() }
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records the micro-batch id of every dispatch.
struct Recording {
    inner: Arc<dyn Transport>,
    micro_batches: std::sync::Mutex<std::collections::BTreeSet<u32>>,
}

impl Transport for Recording {
    fn dispatch(&self, worker: &str, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        self.micro_batches.lock().unwrap().insert(batch.micro_batch);
        self.inner.dispatch(worker, batch)
    }
}

/// 8 concurrent requests with different prompts, lengths and seeds each equal their solo run, with one and with two
/// micro-batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_equal_their_solo_runs() {
    let fixture = fixture();
    for micro_batches in [1, 2] {
        let workers = expert_workers(&["0-3", "4-7"]);
        let inner = in_process(&workers, WireFormat::default());
        let recording = Arc::new(Recording { inner, micro_batches: Default::default() });
        let cluster = cluster_with(workers, recording.clone(), tokio::runtime::Handle::current());
        let options = EngineOptions { micro_batches, threads: 2, ..EngineOptions::default() };
        let engine = Engine::start(cluster.model.clone(), options).unwrap();
        let requests: Vec<ValidGenerateRequest> = (0..8u64)
            .map(|i| request(&format!("r{i}"), prompt(i, 3 + 5 * i as usize), 4 + i as usize, sampling(i)))
            .collect();
        let receivers: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
        let outcomes = futures::future::join_all(receivers.into_iter().map(drain)).await;
        for (r, outcome) in requests.iter().zip(&outcomes) {
            assert!(outcome.failed.is_none(), "{}: {:?}", r.request_id, outcome.failed);
            assert_eq!(outcome.finished, Some(FinishReason::Length));
            let alone = solo(&fixture.reference, &r.prompt, r.max_new_tokens, r.sampling.clone());
            assert_eq!(outcome.tokens, alone.tokens, "{} with {micro_batches} micro-batches", r.request_id);
            let prompt_alone: Vec<f32> = alone.prompt_logits.concat();
            assert!(max_diff(&outcome.prompt_logits, &prompt_alone) <= 1e-5, "{} prompt logits", r.request_id);
            for (got, want) in outcome.logits.iter().zip(&alone.decode_logits) {
                assert!(max_diff(got, want) <= 1e-5, "{} decode logits: {}", r.request_id, max_diff(got, want));
            }
        }
        wait_until("no sequence is active", || engine.active() == 0).await;
        assert!(engine.steps() < 8 * 12, "requests were batched: {} steps", engine.steps());
        let seen: Vec<u32> = recording.micro_batches.lock().unwrap().iter().copied().collect();
        assert_eq!(seen, (0..micro_batches as u32).collect::<Vec<_>>(), "micro-batch ids dispatched");
    }
}

/// A request whose receiver is dropped mid-generation is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_receiver_frees_the_sequence() {
    let cluster = cluster(&["all"], tokio::runtime::Handle::current());
    let engine =
        Engine::start(cluster.model.clone(), EngineOptions { threads: 2, ..EngineOptions::default() }).unwrap();
    let mut events = engine.submit(request("long", prompt(1, 8), 3000, SamplingParams::default())).unwrap();
    let mut tokens = 0;
    while tokens < 3 {
        if let Some(GenerationEvent::Token { .. }) = events.recv().await {
            tokens += 1;
        }
    }
    assert_eq!(engine.active(), 1);
    drop(events);
    wait_until("the cancelled sequence is gone", || engine.active() == 0).await;
    let steps = engine.steps();
    assert!(steps < 3000, "generation stopped early: {steps} steps");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(engine.steps(), steps, "no step runs without sequences");
}

/// Fails every dispatch while `failing` is set, as a lost expert worker would.
struct FlakyTransport {
    inner: Arc<dyn Transport>,
    failing: AtomicBool,
}

impl Transport for FlakyTransport {
    fn dispatch(&self, worker: &str, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        if self.failing.load(Ordering::SeqCst) {
            let error = TransportError::Unavailable { peer: worker.to_string(), reason: "connection reset".into() };
            return Box::pin(std::future::ready(Err(error)));
        }
        self.inner.dispatch(worker, batch)
    }
}

/// A lost expert worker fails the requests of the step with `Unavailable` naming it; the engine serves the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_expert_worker_fails_the_request_not_the_engine() {
    let fixture = fixture();
    let workers = expert_workers(&["0-3", "4-7"]);
    let inner = in_process(&workers, WireFormat::default());
    let flaky = Arc::new(FlakyTransport { inner, failing: AtomicBool::new(false) });
    let cluster = cluster_with(workers, flaky.clone(), tokio::runtime::Handle::current());
    let engine =
        Engine::start(cluster.model.clone(), EngineOptions { threads: 2, ..EngineOptions::default() }).unwrap();

    let mut events = engine.submit(request("doomed", prompt(2, 6), 1000, SamplingParams::default())).unwrap();
    let mut tokens = 0;
    let failure = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("an event within 10 s") {
            Some(GenerationEvent::Token { .. }) => {
                tokens += 1;
                if tokens == 2 {
                    flaky.failing.store(true, Ordering::SeqCst);
                }
            }
            Some(GenerationEvent::Failed(error)) => break error,
            Some(GenerationEvent::Prefilled { .. }) => {}
            other => panic!("expected a failure, got {other:?}"),
        }
    };
    assert!(events.recv().await.is_none(), "nothing follows a failure");
    let status = failure.to_status();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("expert worker ew-"), "{}", status.message());
    assert!(status.message().contains("connection reset"), "{}", status.message());
    assert!(failure.retryable());
    wait_until("the failed sequence is gone", || engine.active() == 0).await;
    assert!(engine.failed_steps() >= 1);

    flaky.failing.store(false, Ordering::SeqCst);
    let next = request("next", prompt(3, 9), 6, SamplingParams::default());
    let outcome = drain(engine.submit(next.clone()).unwrap()).await;
    assert!(outcome.failed.is_none(), "{:?}", outcome.failed);
    let alone = solo(&fixture.reference, &next.prompt, 6, SamplingParams::default());
    assert_eq!(outcome.tokens, alone.tokens);
}

/// At most `max_batch` active and `max_waiting` waiting; beyond that requests are refused with ResourceExhausted, and
/// invalid requests are refused before they queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_bounded_and_checked() {
    let cluster = cluster(&["all"], tokio::runtime::Handle::current());
    let options = EngineOptions { max_batch: 1, max_waiting: 1, threads: 2, ..EngineOptions::default() };
    let engine = Engine::start(cluster.model.clone(), options).unwrap();
    let mut kept = Vec::new();
    let mut refused = None;
    for i in 0..3 {
        match engine.submit(request(&format!("r{i}"), prompt(i, 4), 2000, SamplingParams::default())) {
            Ok(events) => kept.push(events),
            Err(error) => refused = Some(error),
        }
    }
    let refused = refused.expect("one of three requests is refused with max_batch 1 and max_waiting 1");
    assert_eq!(refused.to_status().code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(refused.to_string().contains("max_waiting 1"), "{refused}");
    assert!(engine.active() <= 1);

    let vocab = fixture().config.text.vocab_size;
    let bad = engine.submit(request("bad", vec![1, vocab as u32 + 3], 1, SamplingParams::default())).unwrap_err();
    assert_eq!(bad.to_status().code(), tonic::Code::InvalidArgument);
    assert!(bad.to_string().contains(&format!("token id {}", vocab + 3)), "{bad}");
    drop(kept);
    wait_until("the cancelled sequences are gone", || engine.active() == 0 && engine.waiting() == 0).await;
}

/// Checks every outcome against the request's solo run: same tokens, prompt and decode logits within 1e-5.
fn assert_solo(requests: &[ValidGenerateRequest], outcomes: &[Outcome], what: &str) {
    for (r, outcome) in requests.iter().zip(outcomes) {
        assert!(outcome.failed.is_none(), "{what} {}: {:?}", r.request_id, outcome.failed);
        assert_eq!(outcome.finished, Some(FinishReason::Length), "{what} {}", r.request_id);
        let alone = solo(&fixture().reference, &r.prompt, r.max_new_tokens, r.sampling.clone());
        assert_eq!(outcome.tokens, alone.tokens, "{what} {}", r.request_id);
        let prompt_alone: Vec<f32> = alone.prompt_logits.concat();
        let diff = max_diff(&outcome.prompt_logits, &prompt_alone);
        assert!(diff <= 1e-5, "{what} {} prompt logits differ by {diff}", r.request_id);
        for (got, want) in outcome.logits.iter().zip(&alone.decode_logits) {
            assert!(max_diff(got, want) <= 1e-5, "{what} {} decode logits: {}", r.request_id, max_diff(got, want));
        }
    }
}

/// Prompts are prefilled in chunks of at most `max_batch_tokens` mixed with other sequences' decoding, across the
/// tiny model's 32-token attention chunks; the six prompts fit the KV pool at admission but their generations grow
/// past it (it holds about two and a half whole sequences), so the newest are preempted and recomputed. Every output still equals its solo run, and every block is back in the pool at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_and_preemption_equal_solo_runs() {
    let config = &fixture().config.text;
    let cluster = cluster(&["0-3", "4-7"], tokio::runtime::Handle::current());
    let (block_size, step_tokens) = (4, 8);
    let longest = 50 + 40;
    let kv_blocks = KvCache::blocks_for_sequence(config, block_size, longest, step_tokens) * 5 / 2;
    let options = EngineOptions {
        max_batch: 6,
        max_batch_tokens: step_tokens,
        kv_block_size: block_size,
        kv_blocks: Some(kv_blocks),
        threads: 2,
        ..EngineOptions::default()
    };
    let engine = Engine::start(cluster.model.clone(), options).unwrap();
    let requests: Vec<ValidGenerateRequest> =
        (0..6u64).map(|i| request(&format!("r{i}"), prompt(20 + i, 10 + 8 * i as usize), 40, sampling(i))).collect();
    let receivers: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    let outcomes = futures::future::join_all(receivers.into_iter().map(drain)).await;
    assert_solo(&requests, &outcomes, "chunked prefill with preemption");
    assert!(engine.preemptions() > 0, "a pool of {kv_blocks} blocks preempted nothing");
    wait_until("every block is back", || engine.active() == 0 && engine.kv_blocks_used() == 0).await;
    assert_eq!(engine.kv_blocks_total(), kv_blocks);
}

/// When the KV blocks for a prompt are not free, the request waits in the queue instead of failing; beyond the queue
/// requests are refused with ResourceExhausted naming the KV use; once blocks come back the waiting requests run, and
/// a long prompt prefilled in 512-token chunks equals its solo run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_kv_blocks_and_are_refused_beyond_the_queue() {
    let config = &fixture().config.text;
    let cluster = cluster(&["all"], tokio::runtime::Handle::current());
    let (block_size, step_tokens) = (4, 512);
    let kv_blocks = KvCache::blocks_for_sequence(config, block_size, 16 + 3000, step_tokens);
    let options = EngineOptions {
        max_waiting: 2,
        max_batch_tokens: step_tokens,
        kv_block_size: block_size,
        kv_blocks: Some(kv_blocks),
        threads: 2,
        ..EngineOptions::default()
    };
    let engine = Engine::start(cluster.model.clone(), options).unwrap();
    let mut hog = engine.submit(request("hog", prompt(30, 16), 3000, SamplingParams::default())).unwrap();
    while !matches!(hog.recv().await, Some(GenerationEvent::Token { .. })) {}
    // Its prompt needs more blocks than the hog leaves free, so it waits; so does a small one behind it (FIFO).
    let long = request("long", prompt(31, 3001), 2, SamplingParams::default());
    let small = request("small", prompt(32, 5), 3, SamplingParams::default());
    let waiting: Vec<_> = [&long, &small].iter().map(|r| engine.submit((*r).clone()).unwrap()).collect();
    wait_until("both wait", || engine.waiting() == 2).await;
    assert_eq!(engine.active(), 1);
    let refused = engine.submit(request("refused", prompt(33, 5), 3, SamplingParams::default())).unwrap_err();
    assert_eq!(refused.to_status().code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(refused.to_string().contains("KV blocks in use"), "{refused}");

    drop(hog);
    let outcomes = futures::future::join_all(waiting.into_iter().map(drain)).await;
    assert_solo(&[long, small], &outcomes, "after waiting for KV blocks");
    wait_until("every block is back", || engine.active() == 0 && engine.kv_blocks_used() == 0).await;
}

/// A request that could not fit the KV cache even alone is refused at once, naming the blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_kv_cache_is_refused() {
    let config = &fixture().config.text;
    let cluster = cluster(&["all"], tokio::runtime::Handle::current());
    let kv_blocks = KvCache::blocks_for_sequence(config, 16, 100, 512);
    let options = EngineOptions { kv_blocks: Some(kv_blocks), threads: 2, ..EngineOptions::default() };
    let engine = Engine::start(cluster.model.clone(), options).unwrap();
    let error = engine.submit(request("big", prompt(40, 90), 200, SamplingParams::default())).unwrap_err();
    assert_eq!(error.to_status().code(), tonic::Code::InvalidArgument, "{error}");
    let message = error.to_string();
    assert!(
        message.contains("290 tokens") && message.contains(&format!("{kv_blocks} this worker's KV cache")),
        "{message}"
    );
    let fits = drain(engine.submit(request("fits", prompt(41, 90), 10, SamplingParams::default())).unwrap()).await;
    assert!(fits.failed.is_none(), "{:?}", fits.failed);
}

/// `drain` lets admitted sequences finish, then refuses new requests; a lockstep engine on a point-to-point cluster
/// (nothing to step with) ticks while idle and drains without a leave; a zero idle interval is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_the_sequences_and_stops_admission() {
    let cluster = cluster(&["all"], tokio::runtime::Handle::current());
    let lockstep = |idle_interval| Some(LockstepOptions { idle_interval });
    let zero = EngineOptions { lockstep: lockstep(Duration::ZERO), ..EngineOptions::default() };
    let refused = Engine::start(cluster.model.clone(), zero).err().unwrap();
    assert!(refused.to_string().contains("idle_interval"), "{refused}");
    for lockstep in [None, lockstep(Duration::from_millis(5))] {
        let options = EngineOptions { threads: 2, lockstep: lockstep.clone(), ..EngineOptions::default() };
        let engine = Arc::new(Engine::start(cluster.model.clone(), options).unwrap());
        let running = engine.submit(request("running", prompt(50, 12), 6, SamplingParams::default())).unwrap();
        let draining = {
            let engine = engine.clone();
            tokio::task::spawn_blocking(move || engine.drain(None))
        };
        let outcome = drain(running).await;
        assert!(outcome.failed.is_none() && outcome.tokens.len() == 6, "{lockstep:?}: {outcome:?}");
        draining.await.unwrap().unwrap();
        let late = engine.submit(request("late", prompt(51, 4), 2, SamplingParams::default())).unwrap_err();
        assert!(matches!(late, AttentionWorkerError::EngineStopped), "{late}");
        if lockstep.is_some() {
            assert!(engine.ticks() > 0);
        }
    }
}

/// The engine serving a `GpuModel` (the whole attention side on the GPU, f32 dense weights, the routed experts on
/// expert workers as in production): continuous batching, chunked prefill and two micro-batches over the GPU's KV
/// arena give the solo CPU runs' outputs. f32 weights differ from the CPU only by summation order, so logits agree
/// within `1e-4 * (1 + max |logit|)` (docs/cuda.md); a token may differ only where the CPU's two best logits are
/// closer than that (a near tie the summation order decides; greedy requests, so nothing else can flip a token), and
/// then the rest of that request is not compared.
/// Skips with a printed reason without a GPU (scripts/gpu-check.sh runs it on one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_on_the_gpu_equals_the_cpu_engine() {
    use switchyard_model::{DenseDtype, Device, GpuModel, GpuModelOptions, KvDtype, ModelError};
    let cluster = cluster(&["0-3", "4-7"], tokio::runtime::Handle::current());
    let config = &fixture().config.text;
    let block_size = switchyard_model::kv::DEFAULT_BLOCK_SIZE;
    let kv_blocks = 8 * KvCache::blocks_for_sequence(config, block_size, 64, 16);
    // f32 weights and KV: the CPU engine's arithmetic up to summation order, so tokens compare exactly.
    let gpu_options = GpuModelOptions { dense_dtype: DenseDtype::F32, kv_dtype: KvDtype::F32, kv_blocks, block_size };
    let gpu = match GpuModel::upload(&cluster.model, Device::Cuda(0), &gpu_options) {
        Ok(gpu) => gpu,
        Err(ModelError::Kernel(reason)) => {
            println!("SKIPPED engine on the GPU: {reason}");
            return;
        }
        Err(other) => panic!("{other}"),
    };
    let options = EngineOptions {
        micro_batches: 2,
        threads: 2,
        max_batch: 8,
        max_batch_tokens: 16,
        kv_block_size: block_size,
        kv_blocks: Some(kv_blocks),
        ..EngineOptions::default()
    };
    let mismatched = EngineOptions { kv_blocks: Some(kv_blocks + 1), ..options.clone() };
    let gpu = Arc::new(gpu);
    let refused = Engine::start(gpu.clone(), mismatched).err().unwrap();
    assert!(refused.to_string().contains("GPU arena"), "{refused}");
    let engine = Engine::start(gpu, options).unwrap();
    let requests: Vec<ValidGenerateRequest> = (0..6u64)
        .map(|i| {
            request(&format!("g{i}"), prompt(200 + i, 5 + 9 * i as usize), 3 + i as usize, SamplingParams::default())
        })
        .collect();
    let receivers: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    let outcomes = futures::future::join_all(receivers.into_iter().map(drain)).await;
    let close = |got: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        max_diff(got, want) <= 1e-4 * (1.0 + scale)
    };
    for (r, outcome) in requests.iter().zip(&outcomes) {
        assert!(outcome.failed.is_none(), "{}: {:?}", r.request_id, outcome.failed);
        let alone = solo(&fixture().reference, &r.prompt, r.max_new_tokens, r.sampling.clone());
        assert!(close(&outcome.prompt_logits, &alone.prompt_logits.concat()), "{} prompt logits", r.request_id);
        for (i, (token, want)) in outcome.tokens.iter().zip(&alone.tokens).enumerate() {
            let (got_logits, want_logits) = (&outcome.logits[i], &alone.decode_logits[i]);
            assert!(close(got_logits, want_logits), "{} decode logits {i}", r.request_id);
            if token != want {
                let mut sorted = want_logits.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let scale = sorted[0].abs().max(1.0);
                assert!(sorted[0] - sorted[1] <= 2e-4 * scale, "{} token {i}: {token} != {want}", r.request_id);
                break;
            }
        }
    }
}
