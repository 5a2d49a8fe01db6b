//! `RemoteExperts` over the collective transport: 2 attention ranks (each a tiny model whose routed experts are
//! remote) and 2 expert ranks (real `ExpertWorker`s holding disjoint experts, served by `serve_expert_rank`) in one
//! communicator (`LoopbackCollective`, the CPU stand-in for NCCL) generate the single-process model's greedy tokens and
//! logits (to a few ULP);
//! an expert rank that dies mid-generation fails both attention ranks' requests with an error naming it, at once.
//!
//! Then the same ranks serving through lockstep engines (`EngineOptions::lockstep`) with uneven traffic: one rank
//! idle (or draining) while the other generates, different prompts and lengths, two micro-batches; idling past the
//! step deadline; a staggered drain (the ranks agree on their last tick through the exchanges themselves, with
//! `CollectiveLeave`) and both ranks leaving together; a dead expert rank; ranks configured with different
//! micro-batches, refused at their first step.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expert_workers, fixture, load, max_diff, placement_of, prompt, solo};
use switchyard_attention_worker::{
    micro_batch_pool, AttentionWorkerError, CollectiveLeave, Engine, EngineOptions, GenerationEvent, LockstepOptions,
    RemoteExperts, RoutingTable, ValidGenerateRequest,
};
use switchyard_expert_worker::ExpertWorker;
use switchyard_model::{
    generate, ExpertSelection, Generation, GenerationRequest, Llama4Model, ModelError, RoutedExperts, SamplingParams,
};
use switchyard_transport::collective::{
    serve_expert_rank, Collective, CollectiveTransport, ExpertRankSummary, LoopbackCollective, RankLayout,
};
use switchyard_transport::{BoxFuture, ExpertBatch, ExpertService, TransportError, WireFormat};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

const ATTENTION: [&str; 2] = ["aw-0", "aw-1"];
/// The ids `common::expert_workers` gives.
const EXPERTS: [&str; 2] = ["ew-0", "ew-1"];
/// Short, so that a test that goes wrong fails fast; the tiny model's steps take milliseconds.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const NEW_TOKENS: usize = 8;
/// Not 0: an expert rank computes both attention ranks' rows of a step as one grouped matmul per expert (as an
/// expert worker does with concurrent gRPC dispatches), and the kernel's blocking over the larger group sums in
/// another order: the logits move by a few ULP (7e-7 seen). The transport itself is checked bit for bit in
/// `switchyard-transport`'s `tests/collective.rs`.
const LOGIT_TOLERANCE: f32 = 1e-4;

/// An expert worker that panics in its `after`-th computation, as a process that crashes mid-step.
struct DiesAfter {
    worker: Arc<ExpertWorker>,
    after: u64,
    computed: AtomicU64,
}

impl ExpertService for DiesAfter {
    fn validate(&self, batch: &ExpertBatch) -> Result<(), TransportError> {
        self.worker.validate(batch)
    }

    fn compute(&self, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        if self.computed.fetch_add(1, Ordering::Relaxed) + 1 >= self.after {
            panic!("expert rank dies mid-step (test)");
        }
        self.worker.compute(batch)
    }
}

/// The communicator's ranks: attention ranks as models whose routed experts go through a `CollectiveTransport`, and
/// the expert ranks' serving tasks.
struct Ranks {
    attention: Vec<(Arc<Llama4Model>, Arc<CollectiveTransport>)>,
    experts: Vec<JoinHandle<Result<ExpertRankSummary, TransportError>>>,
}

/// Ranks 0-1 attention, 2-3 expert; `services` are the expert ranks' services, `workers` what they hold (the
/// placement the attention ranks route with).
fn ranks(runtime: &Runtime, workers: &[Arc<ExpertWorker>], services: Vec<Arc<dyn ExpertService>>) -> Ranks {
    ranks_with(runtime, workers, services, STEP_TIMEOUT)
}

/// [`ranks`] with a step deadline of `step_timeout`.
fn ranks_with(
    runtime: &Runtime,
    workers: &[Arc<ExpertWorker>],
    services: Vec<Arc<dyn ExpertService>>,
    step_timeout: Duration,
) -> Ranks {
    let fixture = fixture();
    let layout = RankLayout::attention_first(&ATTENTION, &EXPERTS).unwrap();
    let mut collectives: Vec<Arc<dyn Collective>> = LoopbackCollective::group(layout.world_size())
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Collective>)
        .collect();
    let expert_collectives = collectives.split_off(ATTENTION.len());
    let experts = expert_collectives
        .into_iter()
        .zip(services)
        .map(|(collective, service)| {
            runtime.spawn(serve_expert_rank(collective, layout.clone(), service, step_timeout))
        })
        .collect();
    let routing = Arc::new(RoutingTable::new(&placement_of(workers), &fixture.config.text).unwrap());
    let attention = collectives
        .into_iter()
        .zip(ATTENTION)
        .map(|(collective, id)| {
            let transport = Arc::new(
                CollectiveTransport::new(collective, layout.clone(), WireFormat::default())
                    .unwrap()
                    .with_step_timeout(step_timeout),
            );
            let remote = RemoteExperts::new(routing.clone(), transport.clone(), runtime.handle().clone(), id);
            let mut model = load(fixture.dir.path(), &fixture.config, ExpertSelection::None);
            model.set_routed_experts(Arc::new(remote));
            (Arc::new(model), transport)
        })
        .collect();
    Ranks { attention, experts }
}

/// Generates `prompts[i]` on attention rank `i`, all ranks at once (each on a thread of its own, its forward pass on
/// a pool of its own as the engine runs it), returning each rank's result.
fn generate_on_every_rank(ranks: &Ranks, prompts: &[Vec<u32>]) -> Vec<Result<Generation, ModelError>> {
    std::thread::scope(|scope| {
        let running: Vec<_> = ranks
            .attention
            .iter()
            .zip(prompts)
            .map(|((model, _), prompt)| {
                scope.spawn(move || {
                    let request = GenerationRequest {
                        prompt: prompt.clone(),
                        max_new_tokens: NEW_TOKENS,
                        sampling: SamplingParams::default(),
                        stop_tokens: Vec::new(),
                        keep_logits: true,
                        logprobs: None,
                    };
                    micro_batch_pool(0, 2).unwrap().install(|| generate(model, &request, &mut |_| {}))
                })
            })
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// Greedy tokens and every logit of both attention ranks equal the single-process model's (logits to a few ULP); the expert
/// ranks served every step and end when the attention ranks leave.
#[test]
fn attention_ranks_over_a_collective_equal_the_single_process_model() {
    let runtime = Runtime::new().unwrap();
    let fixture = fixture();
    let workers = expert_workers(&["0-3", "4-7"]);
    let services = workers.iter().map(|w| w.clone() as Arc<dyn ExpertService>).collect();
    let ranks = ranks(&runtime, &workers, services);
    // Different prompts (and lengths): the ranks step together, not on the same rows.
    let prompts = vec![prompt(12, 40), prompt(5, 17)];
    let generated = generate_on_every_rank(&ranks, &prompts);
    for (rank, (prompt, generation)) in prompts.iter().zip(generated).enumerate() {
        let generation = generation.unwrap_or_else(|e| panic!("attention rank {rank}: {e}"));
        let reference = solo(&fixture.reference, prompt, NEW_TOKENS, SamplingParams::default());
        assert_eq!(generation.tokens, reference.tokens, "greedy tokens of attention rank {rank}");
        assert_eq!(generation.prompt_logits.len(), reference.prompt_logits.len());
        for (r, s) in reference.prompt_logits.iter().zip(&generation.prompt_logits) {
            assert!(max_diff(r, s) <= LOGIT_TOLERANCE, "prompt logits of attention rank {rank}: {}", max_diff(r, s));
        }
        assert_eq!(generation.decode_logits.len(), reference.decode_logits.len());
        for (r, s) in reference.decode_logits.iter().zip(&generation.decode_logits) {
            assert!(max_diff(r, s) <= LOGIT_TOLERANCE, "decode logits of attention rank {rank}: {}", max_diff(r, s));
        }
    }
    for worker in &workers {
        assert!(worker.counters().tokens_computed > 0, "{} computed nothing", worker.worker_id());
    }
    let summaries = runtime.block_on(async {
        let left = futures::future::join_all(ranks.attention.iter().map(|(_, t)| t.leave())).await;
        assert!(left.iter().all(Result::is_ok), "leaving: {left:?}");
        futures::future::join_all(ranks.experts).await
    });
    // One prefill and NEW_TOKENS - 1 decode passes, through the tiny model's 2 MoE layers: both ranks made every
    // step, so each expert rank served them all.
    let steps = (NEW_TOKENS as u64) * 2;
    for summary in summaries {
        let summary = summary.unwrap().unwrap();
        assert_eq!(summary.steps, steps, "{summary:?}");
    }
}

/// An expert rank that dies mid-generation fails both attention ranks' requests with an error naming it, within
/// the step deadline (no hang), and ends the other expert rank's serving with an error.
#[test]
fn a_dead_expert_rank_fails_every_attention_rank_naming_it() {
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    // Expert rank 3 (ew-1) dies in its third computation: some steps went through first.
    let dying = Arc::new(DiesAfter { worker: workers[1].clone(), after: 3, computed: AtomicU64::new(0) });
    let services: Vec<Arc<dyn ExpertService>> = vec![workers[0].clone(), dying];
    let ranks = ranks(&runtime, &workers, services);
    let started = Instant::now();
    let generated = generate_on_every_rank(&ranks, &[prompt(12, 40), prompt(5, 17)]);
    assert!(started.elapsed() < STEP_TIMEOUT, "the failure took {:?}", started.elapsed());
    for (rank, generation) in generated.into_iter().enumerate() {
        let error = generation.err().unwrap_or_else(|| panic!("attention rank {rank} generated without ew-1"));
        let message = error.to_string();
        assert!(message.contains("ew-1 (rank 3)"), "attention rank {rank}: {message}");
    }
    let served = runtime.block_on(futures::future::join_all(ranks.experts));
    let other = served[0].as_ref().unwrap();
    let error = other.as_ref().err().unwrap_or_else(|| panic!("the live expert rank ended well: {other:?}"));
    assert!(error.to_string().contains("rank 3"), "{error}");
    assert!(served[1].as_ref().unwrap_err().is_panic());
}

// ---------------------------------------------------------------------------------------------------------------
// Lockstep engines
// ---------------------------------------------------------------------------------------------------------------

/// Empty ticks of an idle engine: short, so that the tests' idle phases span many ticks.
const IDLE_INTERVAL: Duration = Duration::from_millis(10);

/// The tiny model's MoE layers: steps per forward pass.
const MOE_LAYERS: u64 = 2;

/// Lockstep engines on the attention ranks of `ranks`, with `micro_batches[i]` micro-batches on rank `i`.
fn engines(ranks: &Ranks, micro_batches: &[usize]) -> Vec<Arc<Engine>> {
    let options: Vec<EngineOptions> = micro_batches
        .iter()
        .map(|&micro_batches| EngineOptions { micro_batches, ..EngineOptions::default() })
        .collect();
    engines_with(ranks, &options)
}

/// Lockstep engines on the attention ranks of `ranks`, rank `i` with `options[i]` (2 threads a micro-batch, ticking
/// idle every [`IDLE_INTERVAL`]).
fn engines_with(ranks: &Ranks, options: &[EngineOptions]) -> Vec<Arc<Engine>> {
    ranks
        .attention
        .iter()
        .zip(options)
        .map(|((model, transport), options)| {
            let options = EngineOptions {
                threads: 2,
                lockstep: Some(LockstepOptions { idle_interval: IDLE_INTERVAL }),
                ..options.clone()
            };
            // As the attention worker does: said before the first tick, so that ranks whose ticks differ are refused
            // at their first step.
            transport.set_steps_per_tick(options.steps_per_tick(&fixture().config.text));
            Arc::new(Engine::start(model.clone(), options).unwrap())
        })
        .collect()
}

/// Attention rank `rank`'s agreement on the last tick, through its transport's exchanges (what a deployment uses).
fn leave(runtime: &Runtime, ranks: &Ranks, rank: usize) -> Arc<CollectiveLeave> {
    Arc::new(CollectiveLeave::new(ranks.attention[rank].1.clone(), runtime.handle().clone()))
}

/// Drains every engine at once (each on a thread: a drained rank ticks on until the others drain too), returning
/// each drain's result.
fn drain_all(runtime: &Runtime, ranks: &Ranks, engines: &[Arc<Engine>]) -> Vec<Result<(), AttentionWorkerError>> {
    std::thread::scope(|scope| {
        let draining: Vec<_> = engines
            .iter()
            .enumerate()
            .map(|(rank, engine)| {
                let leave = leave(runtime, ranks, rank);
                scope.spawn(move || engine.drain(Some(leave)))
            })
            .collect();
        draining.into_iter().map(|d| d.join().unwrap()).collect()
    })
}

/// Drains attention rank `early` (of two) first, on a thread, while `serve` runs on the other, which drains once
/// `serve` is done; the early rank must not have left before. Each drain's result, by rank.
fn drain_staggered(
    runtime: &Runtime,
    ranks: &Ranks,
    engines: &[Arc<Engine>],
    early: usize,
    serve: impl FnOnce(),
) -> Vec<Result<(), AttentionWorkerError>> {
    let late = 1 - early;
    std::thread::scope(|scope| {
        let early_leave = leave(runtime, ranks, early);
        let first = scope.spawn(|| engines[early].drain(Some(early_leave)));
        serve();
        assert!(!first.is_finished(), "rank {early} left before rank {late} drained");
        let mut drained = vec![engines[late].drain(Some(leave(runtime, ranks, late)))];
        drained.insert(early, first.join().unwrap());
        drained
    })
}

/// What one request received: its tokens, the logits of its prompt and of each token, or its failure.
#[derive(Debug, Default)]
struct Received {
    prompt_logits: Vec<f32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    failed: Option<Arc<AttentionWorkerError>>,
}

/// Submits a greedy request for `prompt` to `engine` and collects its events (blocking).
fn generate_on(engine: &Engine, id: &str, prompt: &[u32], max_new_tokens: usize) -> Received {
    let request = ValidGenerateRequest {
        request_id: id.into(),
        prompt: prompt.to_vec(),
        max_new_tokens,
        ignore_eos: true,
        return_logits: true,
        ..Default::default()
    };
    let mut events = engine.submit(request).unwrap();
    let mut received = Received::default();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenerationEvent::Prefilled { prompt_logits } => received.prompt_logits = prompt_logits.unwrap_or_default(),
            GenerationEvent::Token { id, logits, .. } => {
                received.tokens.push(id);
                received.logits.push(logits.unwrap_or_default());
            }
            GenerationEvent::Finished { .. } => {}
            GenerationEvent::Failed(error) => received.failed = Some(error),
        }
    }
    received
}

/// `received` is the single-process model's generation of `prompt`.
fn assert_single_process(what: &str, received: &Received, prompt: &[u32], max_new_tokens: usize) {
    if let Some(error) = &received.failed {
        panic!("{what} failed: {error}");
    }
    let reference = solo(&fixture().reference, prompt, max_new_tokens, SamplingParams::default());
    assert_eq!(received.tokens, reference.tokens, "greedy tokens of {what}");
    let reference_prompt: Vec<f32> = reference.prompt_logits.concat();
    assert!(max_diff(&reference_prompt, &received.prompt_logits) <= LOGIT_TOLERANCE, "prompt logits of {what}");
    assert_eq!(received.logits.len(), reference.decode_logits.len());
    for (r, s) in reference.decode_logits.iter().zip(&received.logits) {
        assert!(max_diff(r, s) <= LOGIT_TOLERANCE, "decode logits of {what}: {}", max_diff(r, s));
    }
}

/// Generates `jobs` (rank, prompt, max new tokens) all at once, each on a thread, and checks every one against the
/// single-process model.
fn generate_and_check(engines: &[Arc<Engine>], jobs: &[(usize, Vec<u32>, usize)]) {
    std::thread::scope(|scope| {
        let running: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(i, (rank, prompt, max_new))| {
                let engine = &engines[*rank];
                scope.spawn(move || (i, generate_on(engine, &format!("r{rank}-{i}"), prompt, *max_new)))
            })
            .collect();
        for handle in running {
            let (i, received) = handle.join().unwrap();
            let (rank, prompt, max_new) = &jobs[i];
            assert_single_process(&format!("request {i} on attention rank {rank}"), &received, prompt, *max_new);
        }
    });
}

/// Both ranks left in the same exchange after the same ticks; each expert rank served every tick's steps.
fn assert_left_together(
    runtime: &Runtime,
    ranks: Ranks,
    engines: &[Arc<Engine>],
    drained: Vec<Result<(), AttentionWorkerError>>,
    micro_batches: u64,
) {
    for (rank, result) in drained.iter().enumerate() {
        assert!(result.is_ok(), "attention rank {rank} leaving: {result:?}");
    }
    let ticks = engines[0].ticks();
    assert!(
        engines.iter().all(|e| e.ticks() == ticks),
        "ticks differ: {:?}",
        engines.iter().map(|e| e.ticks()).collect::<Vec<_>>()
    );
    for engine in engines {
        assert_eq!(engine.failed_steps(), 0);
    }
    for summary in runtime.block_on(futures::future::join_all(ranks.experts)) {
        let summary = summary.unwrap().unwrap();
        assert_eq!(summary.steps, ticks * micro_batches * MOE_LAYERS, "{summary:?}");
    }
}

/// A forward pass of no tokens makes exactly one routed-experts call per MoE layer (with no rows) and returns no
/// logits: what an empty micro-batch of a lockstep tick runs.
#[test]
fn a_forward_pass_of_no_tokens_makes_one_step_per_moe_layer() {
    struct Counting(AtomicU64);
    impl RoutedExperts for Counting {
        fn compute(&self, _: usize, inputs: &[f32], experts: &[u32], _: usize) -> Result<Vec<f32>, ModelError> {
            assert!(inputs.is_empty() && experts.is_empty());
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(Vec::new())
        }
    }
    let fixture = fixture();
    let counting = Arc::new(Counting(AtomicU64::new(0)));
    let mut model = load(fixture.dir.path(), &fixture.config, ExpertSelection::None);
    model.set_routed_experts(counting.clone());
    assert!(model.forward_batch(&mut []).unwrap().is_empty());
    assert_eq!(counting.0.load(Ordering::Relaxed), MOE_LAYERS);
}

/// One rank generates while the other idles, then drains while the first still generates (it ticks on, empty);
/// both ranks' outputs are the single-process model's, no step fails, and they leave together.
#[test]
fn lockstep_engines_with_uneven_traffic_equal_the_single_process_model() {
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let services = workers.iter().map(|w| w.clone() as Arc<dyn ExpertService>).collect();
    let ranks = ranks(&runtime, &workers, services);
    let engines = engines(&ranks, &[1, 1]);
    // Rank 1 idle.
    generate_and_check(&engines, &[(0, prompt(12, 40), NEW_TOKENS)]);
    // Both busy, different prompts, lengths and token counts; rank 0 with two sequences in one batch.
    generate_and_check(
        &engines,
        &[(0, prompt(5, 17), 3), (1, prompt(7, 33), NEW_TOKENS), (0, prompt(9, 4), NEW_TOKENS + 4)],
    );
    // Rank 1 drains first while rank 0 still generates: it keeps ticking, empty, until rank 0 drains too.
    let drained = drain_staggered(&runtime, &ranks, &engines, 1, || {
        generate_and_check(&engines, &[(0, prompt(3, 21), NEW_TOKENS)]);
    });
    assert_left_together(&runtime, ranks, &engines, drained, 1);
}

/// A staggered shutdown, as the attention worker's: rank 0 drains first (idle) while rank 1 goes on generating
/// request after request for many ticks; every request of rank 1 completes as the single-process model's, rank 0
/// leaves only once rank 1 drained too, and both leave in the same exchange (the expert ranks' serving returns).
#[test]
fn a_staggered_drain_agrees_through_the_exchanges() {
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let services = workers.iter().map(|w| w.clone() as Arc<dyn ExpertService>).collect();
    let ranks = ranks(&runtime, &workers, services);
    let engines = engines(&ranks, &[2, 2]);
    generate_and_check(&engines, &[(0, prompt(12, 40), NEW_TOKENS), (1, prompt(5, 17), NEW_TOKENS)]);
    let drained = drain_staggered(&runtime, &ranks, &engines, 0, || {
        let ticks = engines[1].ticks();
        for round in 0..3u64 {
            generate_and_check(
                &engines,
                &[(1, prompt(30 + round, 9 + round as usize), NEW_TOKENS), (1, prompt(40 + round, 20), 4)],
            );
        }
        assert!(engines[1].ticks() >= ticks + 3 * NEW_TOKENS as u64, "rank 1 generated in too few ticks");
    });
    assert_left_together(&runtime, ranks, &engines, drained, 2);
}

/// Two micro-batches a tick on both ranks: several sequences split over the lanes, a lane empty when a rank has one
/// sequence; the outputs are the single-process model's.
#[test]
fn lockstep_engines_with_two_micro_batches_equal_the_single_process_model() {
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let services = workers.iter().map(|w| w.clone() as Arc<dyn ExpertService>).collect();
    let ranks = ranks(&runtime, &workers, services);
    let engines = engines(&ranks, &[2, 2]);
    generate_and_check(
        &engines,
        &[
            (0, prompt(12, 40), NEW_TOKENS),
            (0, prompt(5, 17), 3),
            (0, prompt(6, 9), NEW_TOKENS + 2),
            (1, prompt(7, 33), NEW_TOKENS),
        ],
    );
    let drained = drain_all(&runtime, &ranks, &engines);
    assert_left_together(&runtime, ranks, &engines, drained, 2);
}

/// Under the tick, prompts are prefilled in chunks mixed with other sequences' decoding, and sequences that outgrow
/// a small KV pool are preempted and recomputed, on one rank with two micro-batches while the other serves one
/// sequence: each micro-batch still runs one forward pass a tick, and every output is the single-process model's.
#[test]
fn chunked_prefill_and_preemption_under_the_tick_equal_the_single_process_model() {
    let config = &fixture().config.text;
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let services = workers.iter().map(|w| w.clone() as Arc<dyn ExpertService>).collect();
    let ranks = ranks(&runtime, &workers, services);
    let (block_size, step_tokens, new_tokens) = (4, 8, 40);
    let longest = 10 + 8 * 5 + new_tokens;
    // About two and a half whole sequences: six that grow do not fit.
    let kv_blocks = switchyard_model::KvCache::blocks_for_sequence(config, block_size, longest, step_tokens) * 5 / 2;
    let small = EngineOptions {
        max_batch: 6,
        max_batch_tokens: step_tokens,
        kv_block_size: block_size,
        kv_blocks: Some(kv_blocks),
        micro_batches: 2,
        ..EngineOptions::default()
    };
    let engines = engines_with(&ranks, &[small, EngineOptions { micro_batches: 2, ..EngineOptions::default() }]);
    let mut jobs: Vec<(usize, Vec<u32>, usize)> =
        (0..6u64).map(|i| (0, prompt(20 + i, 10 + 8 * i as usize), new_tokens)).collect();
    jobs.push((1, prompt(7, 33), NEW_TOKENS));
    generate_and_check(&engines, &jobs);
    assert!(engines[0].preemptions() > 0, "a pool of {kv_blocks} blocks preempted nothing");
    let drained = drain_all(&runtime, &ranks, &engines);
    assert_left_together(&runtime, ranks, &engines, drained, 2);
}

/// Idle engines keep stepping together: idling for several step deadlines fails nothing, and a request afterwards
/// generates the single-process tokens.
#[test]
fn idle_lockstep_engines_outlive_the_step_deadline() {
    let step_timeout = Duration::from_millis(200);
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let services = workers.iter().map(|w| w.clone() as Arc<dyn ExpertService>).collect();
    let ranks = ranks_with(&runtime, &workers, services, step_timeout);
    let engines = engines(&ranks, &[1, 1]);
    // What is tested is idling itself: nothing to wait for but time.
    std::thread::sleep(step_timeout * 5);
    assert!(engines[0].ticks() > 5, "idle ticks: {}", engines[0].ticks());
    // Bounded: no hot loop while idle (a tick at most every IDLE_INTERVAL, plus the one a drain may add).
    let most = (step_timeout * 5).as_millis() as u64 / IDLE_INTERVAL.as_millis() as u64 + 2;
    assert!(engines[0].ticks() <= most * 2, "{} idle ticks in {:?}", engines[0].ticks(), step_timeout * 5);
    generate_and_check(&engines, &[(1, prompt(12, 40), NEW_TOKENS)]);
    let drained = drain_all(&runtime, &ranks, &engines);
    assert_left_together(&runtime, ranks, &engines, drained, 1);
}

/// An expert rank that dies mid-generation fails both engines' requests at once; the engines do not hang, later
/// requests fail at once, and the drain ends with the communicator's error.
#[test]
fn a_dead_expert_rank_fails_lockstep_engines_without_hanging() {
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let dying = Arc::new(DiesAfter { worker: workers[1].clone(), after: 3, computed: AtomicU64::new(0) });
    let services: Vec<Arc<dyn ExpertService>> = vec![workers[0].clone(), dying];
    let ranks = ranks(&runtime, &workers, services);
    let engines = engines(&ranks, &[1, 1]);
    let started = Instant::now();
    let failed = std::thread::scope(|scope| {
        let running: Vec<_> = [(0, prompt(12, 40)), (1, prompt(5, 17))]
            .into_iter()
            .map(|(rank, prompt)| {
                let engine = &engines[rank];
                scope.spawn(move || generate_on(engine, "doomed", &prompt, NEW_TOKENS))
            })
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect::<Vec<_>>()
    });
    for (rank, received) in failed.iter().enumerate() {
        let error = received.failed.as_ref().unwrap_or_else(|| panic!("attention rank {rank} generated without ew-1"));
        assert!(error.to_string().contains("ew-1 (rank 3)"), "attention rank {rank}: {error}");
    }
    let later = generate_on(&engines[0], "later", &prompt(3, 8), 2);
    assert!(later.failed.is_some(), "a request after the failure: {later:?}");
    let drained = drain_all(&runtime, &ranks, &engines);
    assert!(started.elapsed() < STEP_TIMEOUT, "the failure took {:?}", started.elapsed());
    for (rank, result) in drained.iter().enumerate() {
        let error = result.as_ref().err().unwrap_or_else(|| panic!("attention rank {rank} left a failed communicator"));
        assert!(error.to_string().contains("had failed before"), "attention rank {rank}: {error}");
    }
}

/// Ranks configured with different micro-batches make different steps per tick, so their ticks could never name the
/// same exchanges: they are refused at their first step (each rank said its steps per tick in it), every request
/// fails at once with an error naming both ranks and `--micro-batches`, the drains end with that error, and the
/// expert ranks' serving ends with it: nothing waits for a step deadline.
#[test]
fn ranks_with_different_micro_batches_are_refused_at_their_first_step() {
    let runtime = Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let services = workers.iter().map(|w| w.clone() as Arc<dyn ExpertService>).collect();
    let ranks = ranks(&runtime, &workers, services);
    let started = Instant::now();
    let engines = engines(&ranks, &[2, 1]);
    let names_both = |text: &str| {
        text.contains("aw-0 (rank 0)") && text.contains("aw-1 (rank 1)") && text.contains("--micro-batches")
    };
    for (rank, engine) in engines.iter().enumerate() {
        let received = generate_on(engine, "mismatched", &prompt(3, 8), 2);
        let error = received.failed.as_ref().unwrap_or_else(|| panic!("attention rank {rank} generated: {received:?}"));
        assert!(names_both(&error.to_string()), "attention rank {rank}: {error}");
    }
    let drained = drain_all(&runtime, &ranks, &engines);
    for (rank, result) in drained.iter().enumerate() {
        let error = result.as_ref().err().unwrap_or_else(|| panic!("attention rank {rank} left"));
        assert!(names_both(&error.to_string()), "attention rank {rank}: {error}");
    }
    for (rank, served) in runtime.block_on(futures::future::join_all(ranks.experts)).into_iter().enumerate() {
        let error = served.unwrap().expect_err("the expert ranks cannot go on").to_string();
        assert!(error.contains("--micro-batches"), "expert rank {rank}: {error}");
    }
    assert!(started.elapsed() < STEP_TIMEOUT, "refusing took {:?}", started.elapsed());
}
