//! `RemoteExperts` over the collective transport: 2 attention ranks (each a tiny model whose routed experts are
//! remote) and 2 expert ranks (real `ExpertWorker`s holding disjoint experts, served by `serve_expert_rank`) in one
//! communicator (`LoopbackCollective`, the CPU stand-in for NCCL) generate the single-process model's greedy tokens and
//! logits (to a few ULP);
//! an expert rank that dies mid-generation fails both attention ranks' requests with an error naming it, at once.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expert_workers, fixture, load, max_diff, placement_of, prompt, solo};
use switchyard_attention_worker::{micro_batch_pool, RemoteExperts, RoutingTable};
use switchyard_expert_worker::ExpertWorker;
use switchyard_model::{
    generate, ExpertSelection, Generation, GenerationRequest, Llama4Model, ModelError, SamplingParams,
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
            runtime.spawn(serve_expert_rank(collective, layout.clone(), service, STEP_TIMEOUT))
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
                    .with_step_timeout(STEP_TIMEOUT),
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
