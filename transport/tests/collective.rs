//! The MoE step over a collective: 2 attention ranks and 2 expert ranks (threads of this process, joined by
//! `LoopbackCollective`) give exactly the outputs of the in-process and gRPC transports for the same batches, in every
//! wire format; per-request errors stay per request; an expert rank that dies or hangs mid-step fails every rank with
//! an error naming it; the attention ranks learn in the same step that all of them drained, and ranks whose ticks
//! differ are refused naming both. And one NCCL rank on a GPU exchanges with itself (skipped, saying why, without one).
//!
//! The loopback stands in for NCCL only in moving the bytes: the two-phase exchange, the frames, the codec and the
//! expert loop are the code the NCCL ranks run.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_transport::collective::{
    serve_expert_rank, Collective, CollectiveTransport, ExpertRankSummary, LoopbackCollective, RankLayout,
};
use switchyard_transport::grpc::{server_builder, DispatchServer, GrpcTransport};
use switchyard_transport::in_process::InProcessTransport;
use switchyard_transport::{BoxFuture, ExpertBatch, ExpertService, Transport, TransportError, WireDtype, WireFormat};
use tokio::task::JoinHandle;

const EPOCH: u64 = 9;
const EXPERTS: u32 = 8;
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// What an expert service does besides computing.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Compute,
    /// Panics inside the computation, as a crashing process would stop mid-step.
    Die,
    /// Never finishes the computation until `release` is notified.
    Hang,
}

/// Expert `e` maps `v` to `v * (1 + e / 2) - e / 4`. Serves layers 0..3 at placement epoch [`EPOCH`].
struct AffineExperts {
    behaviour: Behaviour,
    release: Arc<tokio::sync::Notify>,
}

impl AffineExperts {
    fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(AffineExperts { behaviour, release: Arc::new(tokio::sync::Notify::new()) })
    }
}

fn affine(batch: &ExpertBatch) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch.inputs.len());
    for (row, &expert) in batch.inputs.chunks_exact(batch.hidden).zip(&batch.experts) {
        let (scale, shift) = (1.0 + expert as f32 * 0.5, expert as f32 * 0.25);
        out.extend(row.iter().map(|v| v * scale - shift));
    }
    out
}

impl ExpertService for AffineExperts {
    fn validate(&self, batch: &ExpertBatch) -> Result<(), TransportError> {
        if batch.layer >= 3 {
            return Err(TransportError::UnknownLayer { layer: batch.layer });
        }
        if batch.placement_epoch != EPOCH {
            return Err(TransportError::StaleEpoch { sent: batch.placement_epoch, current: EPOCH });
        }
        match batch.experts.iter().find(|&&e| e >= EXPERTS) {
            Some(&expert) => Err(TransportError::ExpertNotHeld { layer: batch.layer, expert }),
            None => Ok(()),
        }
    }

    fn compute(&self, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        let (behaviour, release) = (self.behaviour, self.release.clone());
        Box::pin(async move {
            match behaviour {
                Behaviour::Compute => {}
                Behaviour::Die => panic!("expert rank dies mid-step (test)"),
                Behaviour::Hang => release.notified().await,
            }
            Ok(affine(&batch))
        })
    }
}

/// Deterministic activations over a few orders of magnitude.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 10f32.powi((i % 4) as i32 - 1)
        })
        .collect()
}

fn batch(attention: usize, step: u64, worker: usize, tokens: usize, hidden: usize) -> ExpertBatch {
    let seed = step * 100 + attention as u64 * 10 + worker as u64;
    ExpertBatch {
        step_id: step,
        micro_batch: 0,
        layer: (step % 3) as u32,
        placement_epoch: EPOCH,
        attention_worker: format!("a{attention}"),
        experts: (0..tokens as u32).map(|t| (t * 3 + seed as u32) % EXPERTS).collect(),
        inputs: values(seed, tokens * hidden),
        hidden,
    }
}

/// The batches attention rank `attention` sends in `step`: to both expert workers, to one, or to none.
fn step_batches(attention: usize, step: u64) -> Vec<(String, ExpertBatch)> {
    let hidden = [64, 160, 5][step as usize % 3];
    match (step + attention as u64) % 4 {
        0 => vec![],
        1 => vec![("e1".to_string(), batch(attention, step, 1, 7, hidden))],
        _ => vec![
            ("e0".to_string(), batch(attention, step, 0, 1 + step as usize * 5, hidden)),
            ("e1".to_string(), batch(attention, step, 1, 3, hidden)),
        ],
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn layout() -> RankLayout {
    RankLayout::attention_first(&["a0", "a1"], &["e0", "e1"]).unwrap()
}

/// The four ranks: two attention transports and the two expert loops (tasks) serving `services`.
fn ranks(
    wire: WireFormat,
    services: [Arc<dyn ExpertService>; 2],
    step_timeout: Duration,
) -> (Vec<CollectiveTransport>, Vec<JoinHandle<Result<ExpertRankSummary, TransportError>>>) {
    let collectives = LoopbackCollective::group(4).into_iter().map(|c| Arc::new(c) as Arc<dyn Collective>).collect();
    ranks_over(collectives, wire, services, step_timeout)
}

/// [`ranks`] over the four ranks of a given communicator, by rank.
fn ranks_over(
    mut collectives: Vec<Arc<dyn Collective>>,
    wire: WireFormat,
    services: [Arc<dyn ExpertService>; 2],
    step_timeout: Duration,
) -> (Vec<CollectiveTransport>, Vec<JoinHandle<Result<ExpertRankSummary, TransportError>>>) {
    let expert_ranks: Vec<_> = collectives.split_off(2);
    let experts = expert_ranks
        .into_iter()
        .zip(services)
        .map(|(collective, service)| tokio::spawn(serve_expert_rank(collective, layout(), service, step_timeout)))
        .collect();
    let attention = collectives
        .into_iter()
        .map(|c| CollectiveTransport::new(c, layout(), wire).unwrap().with_step_timeout(step_timeout))
        .collect();
    (attention, experts)
}

/// An expert worker served over gRPC on a loopback port, for the comparison.
async fn grpc_server(service: Arc<dyn ExpertService>, id: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = server_builder().add_service(DispatchServer::new(service, id.to_string()).into_service());
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_attention_and_two_expert_ranks_match_the_in_process_and_grpc_transports() {
    let service = AffineExperts::new(Behaviour::Compute);
    let endpoints = [grpc_server(service.clone(), "e0").await, grpc_server(service.clone(), "e1").await];
    let formats = [
        (WireDtype::F32, WireDtype::F32),
        (WireDtype::Bf16, WireDtype::Bf16),
        (WireDtype::Fp8E4m3, WireDtype::Bf16),
        (WireDtype::Fp8E4m3, WireDtype::F32),
    ];
    for (dispatch, combine) in formats {
        let wire = WireFormat { dispatch, combine };
        let in_process = InProcessTransport::new(wire);
        let grpc = GrpcTransport::new(wire, "a0".into());
        for (worker, endpoint) in ["e0", "e1"].iter().zip(&endpoints) {
            in_process.add_worker(*worker, service.clone());
            grpc.add_worker(*worker, endpoint.clone());
        }
        let (attention, experts) = ranks(wire, [service.clone(), service.clone()], STEP_TIMEOUT);
        let attention = Arc::new(attention);
        const STEPS: u64 = 6;
        for step in 0..STEPS {
            // Both attention ranks step at once, as their lockstep requires.
            let pending: Vec<_> = (0..2).map(|a| attention[a].dispatch_step(step_batches(a, step))).collect::<Vec<_>>();
            let answers = futures::future::join_all(pending).await;
            for (a, answer) in answers.iter().enumerate() {
                let batches = step_batches(a, step);
                assert_eq!(answer.len(), batches.len());
                for ((worker, b), got) in batches.into_iter().zip(answer) {
                    let got = got.as_ref().unwrap_or_else(|e| panic!("{wire:?} step {step} rank a{a} {worker}: {e}"));
                    let expected = in_process.dispatch(&worker, b.clone()).await.unwrap();
                    let over_grpc = grpc.dispatch(&worker, b.clone()).await.unwrap();
                    assert_eq!(bits(got), bits(&expected), "{wire:?} step {step} a{a} -> {worker}");
                    assert_eq!(bits(got), bits(&over_grpc), "{wire:?} step {step} a{a} -> {worker}");
                    if wire == WireFormat::default() {
                        assert_eq!(bits(got), bits(&affine(&b)));
                    }
                }
            }
        }
        let left = futures::future::join_all(attention.iter().map(|t| t.leave())).await;
        assert!(left.iter().all(Result::is_ok), "{left:?}");
        for expert in experts {
            let summary = expert.await.unwrap().unwrap();
            assert_eq!(summary.steps, STEPS);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_fails_alone_and_the_rest_of_the_step_completes() {
    let service = AffineExperts::new(Behaviour::Compute);
    let (attention, experts) = ranks(WireFormat::default(), [service.clone(), service.clone()], STEP_TIMEOUT);
    let stale = ExpertBatch { placement_epoch: EPOCH - 1, ..batch(0, 1, 0, 4, 16) };
    let unheld = ExpertBatch { experts: vec![1, EXPERTS + 3], ..batch(0, 1, 1, 2, 16) };
    let good = batch(0, 1, 1, 5, 16);
    let misshapen = ExpertBatch { hidden: 15, ..batch(0, 1, 0, 2, 16) };
    let first = attention[0].dispatch_step(vec![
        ("e0".into(), stale),
        ("e1".into(), unheld),
        ("e1".into(), good.clone()),
        ("e9".into(), good.clone()),
        ("e0".into(), misshapen),
    ]);
    let second = attention[1].dispatch_step(vec![]);
    let (first, second) = tokio::join!(first, second);
    assert!(second.is_empty());
    assert_eq!(first[0], Err(TransportError::StaleEpoch { sent: EPOCH - 1, current: EPOCH }));
    assert_eq!(first[1], Err(TransportError::ExpertNotHeld { layer: 1, expert: EXPERTS + 3 }));
    assert_eq!(bits(first[2].as_ref().unwrap()), bits(&affine(&good)));
    assert!(matches!(&first[3], Err(TransportError::Unavailable { peer, .. }) if peer == "e9"), "{:?}", first[3]);
    assert!(matches!(&first[4], Err(TransportError::InvalidPayload { .. })), "{:?}", first[4]);
    // The communicator is still in step: a lone dispatch is a step of one batch, for both attention ranks.
    let (lone, empty) = tokio::join!(attention[0].dispatch("e0", good.clone()), attention[1].dispatch_step(vec![]));
    assert_eq!(bits(&lone.unwrap()), bits(&affine(&good)));
    assert!(empty.is_empty());
    let left = futures::future::join_all(attention.iter().map(|t| t.leave())).await;
    assert!(left.iter().all(Result::is_ok), "{left:?}");
    for expert in experts {
        assert_eq!(expert.await.unwrap().unwrap(), ExpertRankSummary { steps: 2, requests: 2 });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_of_one_rank_take_turns() {
    let service = AffineExperts::new(Behaviour::Compute);
    let (attention, experts) = ranks(WireFormat::default(), [service.clone(), service.clone()], STEP_TIMEOUT);
    // Two micro-batches per attention rank at once, for four steps.
    let mut pending = Vec::new();
    for step in 0..4u64 {
        for (a, rank) in attention.iter().enumerate() {
            let batches = step_batches(a, step);
            let expected: Vec<Vec<u32>> = batches.iter().map(|(_, b)| bits(&affine(b))).collect();
            let answer = rank.dispatch_step(batches);
            pending.push(async move { (answer.await, expected) });
        }
    }
    for (answer, expected) in futures::future::join_all(pending).await {
        let got: Vec<Vec<u32>> = answer.into_iter().map(|r| bits(&r.unwrap())).collect();
        assert_eq!(got, expected);
    }
    let left = futures::future::join_all(attention.iter().map(|t| t.leave())).await;
    assert!(left.iter().all(Result::is_ok), "{left:?}");
    for expert in experts {
        assert_eq!(expert.await.unwrap().unwrap().steps, 4);
    }
}

/// The error of every batch of every attention rank, and of both expert loops, must name expert worker e1 (rank 3).
async fn assert_every_rank_blames_e1(
    attention: &[CollectiveTransport],
    experts: Vec<JoinHandle<Result<ExpertRankSummary, TransportError>>>,
    dying: bool,
) {
    let started = Instant::now();
    let steps: Vec<_> = (0..2).map(|a| attention[a].dispatch_step(step_batches(a, 2))).collect();
    let answers = futures::future::join_all(steps).await;
    assert!(started.elapsed() < STEP_TIMEOUT + Duration::from_secs(3), "took {:?}", started.elapsed());
    for (a, answer) in answers.iter().enumerate() {
        assert!(!answer.is_empty());
        for result in answer {
            let error = result.as_ref().expect_err("the step cannot complete");
            assert!(
                matches!(error, TransportError::Unavailable { peer, .. } if peer.contains("e1")),
                "attention rank a{a}: {error}"
            );
        }
    }
    for (e, expert) in experts.into_iter().enumerate() {
        match expert.await {
            Ok(Err(error)) => assert!(error.to_string().contains("e1"), "expert rank e{e}: {error}"),
            // The dying rank's task ends in its panic.
            Err(join) if dying && e == 1 => assert!(join.is_panic()),
            other => panic!("expert rank e{e} should fail, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_rank_that_dies_mid_step_fails_every_rank_naming_it() {
    let (attention, experts) = ranks(
        WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 },
        [AffineExperts::new(Behaviour::Compute), AffineExperts::new(Behaviour::Die)],
        STEP_TIMEOUT,
    );
    assert_every_rank_blames_e1(&attention, experts, true).await;
    // The communicator is done for: the next step fails at once, with the same cause.
    let again = attention[0].dispatch_step(step_batches(0, 3)).await;
    assert!(again.iter().all(|r| matches!(r, Err(TransportError::Unavailable { peer, .. }) if peer.contains("e1"))));
}

/// An attention rank that only makes empty steps (an idle engine's ticks) hears of a failed communicator through
/// `failed()` as soon as its next step fails, naming the rank to blame; a rank whose communicator is fine does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_attention_rank_learns_that_the_communicator_failed() {
    let (attention, _experts) = ranks(
        WireFormat::default(),
        [AffineExperts::new(Behaviour::Compute), AffineExperts::new(Behaviour::Die)],
        STEP_TIMEOUT,
    );
    let idle_failed = attention[1].failed();
    assert!(attention[1].failure().is_none());
    // Rank 0 routes a batch to the dying expert rank while rank 1 has nothing to send.
    let (busy, idle) = tokio::join!(attention[0].dispatch_step(step_batches(0, 1)), attention[1].dispatch_step(vec![]));
    assert!(busy.iter().all(Result::is_err) && idle.is_empty());
    let failure = tokio::time::timeout(STEP_TIMEOUT, idle_failed).await.expect("the idle rank learns the failure");
    assert!(matches!(&failure, TransportError::Unavailable { peer, .. } if peer.contains("e1")), "{failure}");
    // Asked after the fact, it answers at once.
    let again = tokio::time::timeout(Duration::from_millis(100), attention[0].failed()).await.expect("at once");
    assert!(again.to_string().contains("e1"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_rank_that_hangs_mid_step_times_out_every_rank_naming_it() {
    let hanging = AffineExperts::new(Behaviour::Hang);
    let release = hanging.release.clone();
    let (attention, experts) =
        ranks(WireFormat::default(), [AffineExperts::new(Behaviour::Compute), hanging], Duration::from_millis(800));
    let check = assert_every_rank_blames_e1(&attention, experts, false);
    // The hung computation finishes only once the others have given up; then its rank learns it was left behind.
    let (_, ()) = tokio::join!(
        async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            release.notify_waiters();
        },
        check
    );
}

/// Steps `step` on both attention ranks at once (the batches of [`step_batches`]) and checks every answer against the
/// experts' function: the ticks and draining frames the attention ranks send each other change no answer.
async fn step_both(attention: &[CollectiveTransport], step: u64) {
    let pending: Vec<_> = (0..2).map(|a| attention[a].dispatch_step(step_batches(a, step))).collect();
    for (a, answer) in futures::future::join_all(pending).await.into_iter().enumerate() {
        let expected: Vec<Vec<u32>> = step_batches(a, step).iter().map(|(_, b)| bits(&affine(b))).collect();
        let got: Vec<Vec<u32>> =
            answer.into_iter().map(|r| bits(&r.unwrap_or_else(|e| panic!("step {step} a{a}: {e}")))).collect();
        assert_eq!(got, expected, "step {step} a{a}");
    }
}

/// The attention ranks learn that all of them are draining in the same step, each at the end of that step's
/// dispatch exchange: the first step both mark, however far apart they began to drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attention_rank_learns_the_drain_in_the_same_step() {
    let service = AffineExperts::new(Behaviour::Compute);
    let (attention, experts) = ranks(WireFormat::default(), [service.clone(), service.clone()], STEP_TIMEOUT);
    for rank in &attention {
        rank.set_steps_per_tick(2);
    }
    for step in 0..2 {
        step_both(&attention, step).await;
    }
    // Rank a0 drains from step 2 on; a1 still serves for three steps.
    assert_eq!(attention[0].set_draining(2), 2);
    for step in 2..5 {
        step_both(&attention, step).await;
        assert_eq!((attention[0].drained_at(), attention[1].drained_at()), (None, None), "after step {step}");
    }
    assert_eq!(attention[1].set_draining(2), 5);
    // Asked again, the first marked step stays.
    assert_eq!(attention[0].set_draining(2), 2);
    step_both(&attention, 5).await;
    for (a, rank) in attention.iter().enumerate() {
        assert_eq!(rank.drained_at(), Some(5), "a{a}");
        assert_eq!(rank.steps(), 6, "a{a}");
        assert!(rank.failure().is_none(), "a{a}: {:?}", rank.failure());
    }
    // Marked steps go on as steps until the ranks leave; the agreement stays the first one.
    step_both(&attention, 6).await;
    assert_eq!((attention[0].drained_at(), attention[1].drained_at()), (Some(5), Some(5)));
    let left = futures::future::join_all(attention.iter().map(|t| t.leave())).await;
    assert!(left.iter().all(Result::is_ok), "{left:?}");
    for expert in experts {
        assert_eq!(expert.await.unwrap().unwrap().steps, 7);
    }
}

/// Every batch of both attention ranks in a step fails naming both ranks' ticks, every later step fails at once
/// with the same cause, and both expert ranks end with an error (the attention ranks aborted the communicator).
async fn assert_ticks_refused(
    attention: &[CollectiveTransport],
    experts: Vec<JoinHandle<Result<ExpertRankSummary, TransportError>>>,
    step: u64,
) {
    let started = Instant::now();
    let pending: Vec<_> = (0..2).map(|a| attention[a].dispatch_step(step_batches(a, step))).collect();
    let answers = futures::future::join_all(pending).await;
    assert!(started.elapsed() < STEP_TIMEOUT, "refusing took {:?}", started.elapsed());
    let names_both = |text: &str| text.contains("a0 (rank 0)") && text.contains("a1 (rank 1)");
    for (a, answer) in answers.iter().enumerate() {
        for result in answer {
            let error = result.as_ref().expect_err("ranks with different ticks must not step on").to_string();
            assert!(names_both(&error) && error.contains("--micro-batches"), "a{a}: {error}");
        }
        let failure = attention[a].failure().map(|f| f.to_string()).unwrap_or_default();
        assert!(names_both(&failure), "a{a}: {failure}");
    }
    let again = attention[1].dispatch_step(step_batches(1, step + 1)).await;
    assert!(again.iter().all(|r| r.as_ref().is_err_and(|e| names_both(&e.to_string()))), "{again:?}");
    for (e, expert) in experts.into_iter().enumerate() {
        let error = expert.await.unwrap().expect_err("the expert ranks cannot go on").to_string();
        assert!(error.contains("--micro-batches"), "e{e}: {error}");
    }
}

/// Attention ranks that say different steps per tick are refused at their first step, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attention_ranks_with_different_ticks_are_refused_at_their_first_step() {
    let service = AffineExperts::new(Behaviour::Compute);
    let (attention, experts) = ranks(WireFormat::default(), [service.clone(), service.clone()], STEP_TIMEOUT);
    attention[0].set_steps_per_tick(4);
    attention[1].set_steps_per_tick(2);
    // Step 1 of step_batches sends from both ranks: every request of both fails.
    assert_ticks_refused(&attention, experts, 1).await;
}

/// Ranks that did not say their ticks beforehand are refused at the first step where their draining frames
/// differ, before they could agree on a drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_ranks_with_different_ticks_are_refused() {
    let service = AffineExperts::new(Behaviour::Compute);
    let (attention, experts) = ranks(WireFormat::default(), [service.clone(), service.clone()], STEP_TIMEOUT);
    step_both(&attention, 0).await;
    attention[0].set_draining(4);
    attention[1].set_draining(2);
    assert_ticks_refused(&attention, experts, 1).await;
    assert_eq!((attention[0].drained_at(), attention[1].drained_at()), (None, None));
}

/// One NCCL rank on GPU 0 exchanges with itself through NCCL: payloads of several sizes, the sizes phase, an
/// encoded FP8 block. Needs a GPU, libcuda and libnccl; without them it prints why and passes.
#[cfg(feature = "cuda")]
#[test]
fn one_nccl_rank_exchanges_with_itself() {
    use bytes::Bytes;
    use prost::Message;
    use switchyard_transport::codec;
    use switchyard_transport::collective::{CollectiveError, NcclCollective};

    let id = match NcclCollective::unique_id() {
        Ok(id) => id,
        Err(skip @ CollectiveError::Unavailable { .. }) => {
            println!("SKIPPED: no NCCL rank can run here: {skip}");
            return;
        }
        Err(other) => panic!("ncclGetUniqueId: {other}"),
    };
    let rank = match NcclCollective::new(&id, 0, 1, 0, Duration::from_secs(60)) {
        Ok(rank) => rank,
        Err(skip @ CollectiveError::Unavailable { .. }) => {
            println!("SKIPPED: no NCCL rank can run here: {skip}");
            return;
        }
        Err(other) => panic!("joining a one-rank NCCL communicator: {other}"),
    };
    assert_eq!((rank.rank(), rank.world_size()), (0, 1));
    let inputs = values(7, 33 * 160);
    let block = codec::encode(&inputs, 33, 160, WireDtype::Fp8E4m3).encode_to_vec();
    for payload in
        [Bytes::from(block.clone()), Bytes::new(), Bytes::from(vec![0xA5u8; 3 << 20]), Bytes::from_static(b"x")]
    {
        let received = rank.exchange(vec![payload.clone()], Some(Duration::from_secs(30))).unwrap();
        assert_eq!(received, vec![payload]);
    }
    let received = rank.exchange(vec![Bytes::from(block)], Some(Duration::from_secs(30))).unwrap();
    let decoded = codec::decode(&switchyard_proto::v1::Activations::decode(received[0].clone()).unwrap()).unwrap();
    assert_eq!(bits(&decoded), bits(&codec::round_trip(&inputs, 160, WireDtype::Fp8E4m3)));
}

/// `world_size` NCCL ranks of one communicator, rank `r` on GPU `r`, joined from threads as separate processes would
/// join; or why they cannot run here (no libcuda or libnccl, fewer GPUs than ranks). Under the CPU emulation of CUDA
/// (cuda-emulator/, one device unless told otherwise) it first asks the emulator for a device per rank, as real NCCL
/// refuses two ranks of one communicator on one GPU; a real driver has no such symbol, and its GPUs count.
#[cfg(feature = "cuda")]
fn nccl_ranks(world_size: usize) -> Result<Vec<switchyard_transport::collective::NcclCollective>, String> {
    use switchyard_transport::collective::{CollectiveError, NcclCollective};

    let skip = |error: CollectiveError| format!("no {world_size} NCCL ranks can run here: {error}");
    let id = match NcclCollective::unique_id() {
        Ok(id) => id,
        Err(error @ CollectiveError::Unavailable { .. }) => return Err(skip(error)),
        Err(other) => panic!("ncclGetUniqueId: {other}"),
    };
    // SAFETY: libcuda was found (unique_id looked for it); the symbol, where it exists, is the emulator's
    // `switchyard_cuda_emulator_set_device_count(c_int) -> CUresult`.
    unsafe {
        let driver = cudarc::driver::sys::culib();
        type SetDeviceCount = unsafe extern "C" fn(std::ffi::c_int) -> u32;
        if let Ok(set) = driver.get::<SetDeviceCount>(b"switchyard_cuda_emulator_set_device_count\0") {
            assert_eq!(set(world_size as std::ffi::c_int), 0, "the emulator refused {world_size} devices");
        }
    }
    let gpus = cudarc::driver::CudaContext::device_count().map_err(|e| format!("no GPU can be counted here: {e}"))?;
    if (gpus as usize) < world_size {
        return Err(format!("{world_size} NCCL ranks need {world_size} GPUs, {gpus} found"));
    }
    let joined: Vec<Result<NcclCollective, CollectiveError>> = std::thread::scope(|scope| {
        let joining: Vec<_> = (0..world_size)
            .map(|rank| {
                let id = &id;
                scope.spawn(move || NcclCollective::new(id, rank, world_size, rank, Duration::from_secs(30)))
            })
            .collect();
        joining.into_iter().map(|j| j.join().expect("a joining thread panicked")).collect()
    });
    let mut ranks = Vec::with_capacity(world_size);
    for (rank, result) in joined.into_iter().enumerate() {
        match result {
            Ok(joined) => ranks.push(joined),
            Err(error @ CollectiveError::Unavailable { .. }) => return Err(skip(error)),
            Err(other) => panic!("rank {rank} joining the NCCL communicator: {other}"),
        }
    }
    Ok(ranks)
}

/// [`nccl_ranks`], or `None` after printing why the test is skipped.
#[cfg(feature = "cuda")]
fn nccl_ranks_or_skip(world_size: usize) -> Option<Vec<switchyard_transport::collective::NcclCollective>> {
    nccl_ranks(world_size).map_err(|reason| println!("SKIPPED: {reason}")).ok()
}

/// What rank `from` sends rank `to` in round `round` of the NCCL tests: lengths from empty to 1 MiB, different for
/// every pair and round, bytes that name the pair and round.
#[cfg(feature = "cuda")]
fn nccl_payload(round: usize, from: usize, to: usize) -> bytes::Bytes {
    const LENGTHS: [usize; 7] = [0, 1, 17, 0, 4096 + 3, 1 << 20, 250];
    let length = LENGTHS[(round * 3 + from * 5 + to * 2) % LENGTHS.len()];
    (0..length).map(|i| (i as u8).wrapping_mul(31) ^ (round * 16 + from * 4 + to) as u8).collect()
}

/// Every rank of `ranks` makes exchange `round` of a communicator of `world_size` ranks at once (a thread each),
/// while this thread runs `meanwhile`; each rank's result, by rank.
#[cfg(feature = "cuda")]
fn nccl_round(
    ranks: &[switchyard_transport::collective::NcclCollective],
    world_size: usize,
    round: usize,
    timeout: Duration,
    meanwhile: impl FnOnce(),
) -> Vec<Result<Vec<bytes::Bytes>, switchyard_transport::collective::CollectiveError>> {
    std::thread::scope(|scope| {
        let pending: Vec<_> = ranks
            .iter()
            .enumerate()
            .map(|(from, rank)| {
                let sends = (0..world_size).map(|to| nccl_payload(round, from, to)).collect();
                scope.spawn(move || rank.exchange(sends, Some(timeout)))
            })
            .collect();
        meanwhile();
        pending.into_iter().map(|p| p.join().expect("an exchanging thread panicked")).collect()
    })
}

/// Three NCCL ranks (threads, a GPU each) exchange uneven payloads, empty ones included, through the real
/// `NcclCollective` path: round after round, every rank gets exactly what every rank (itself included) sent it.
/// Needs three GPUs (or the CPU emulation of CUDA), libcuda and libnccl; without them it prints why and passes.
#[cfg(feature = "cuda")]
#[test]
fn nccl_ranks_exchange_uneven_payloads_through_nccl() {
    const RANKS: usize = 3;
    let Some(ranks) = nccl_ranks_or_skip(RANKS) else { return };
    for (rank, collective) in ranks.iter().enumerate() {
        assert_eq!((collective.rank(), collective.world_size()), (rank, RANKS));
    }
    for round in 0..6 {
        for (to, received) in nccl_round(&ranks, RANKS, round, Duration::from_secs(30), || {}).into_iter().enumerate() {
            let received = received.unwrap_or_else(|e| panic!("round {round}: rank {to}: {e}"));
            let expected: Vec<bytes::Bytes> = (0..RANKS).map(|from| nccl_payload(round, from, to)).collect();
            assert_eq!(received, expected, "round {round}: what rank {to} received");
        }
    }
}

/// A rank that dies mid-step (its thread ends, dropping its communicator, which aborts it) fails the exchange of
/// the others with an error naming it, well within their timeout, and every later exchange fails at once with the
/// same cause. Needs three GPUs (or the CPU emulation), libcuda and libnccl; without them it prints why and passes.
///
/// Real NCCL reports a peer that went away as `ncclRemoteError` where its transport notices (sockets, InfiniBand);
/// over NVLink the others fail at their timeout instead, naming the ranks they awaited.
#[cfg(feature = "cuda")]
#[test]
fn an_nccl_rank_that_dies_mid_step_fails_the_others_naming_it() {
    const RANKS: usize = 3;
    let Some(mut ranks) = nccl_ranks_or_skip(RANKS) else { return };
    assert!(nccl_round(&ranks, RANKS, 0, Duration::from_secs(30), || {}).iter().all(Result::is_ok));
    let timeout = Duration::from_secs(8);
    let dying = ranks.pop().expect("three ranks");
    let started = Instant::now();
    // Rank 2 dies while the others are in the exchange or entering it (either way they must learn it).
    let survivors = nccl_round(&ranks, RANKS, 1, timeout, || {
        std::thread::sleep(Duration::from_millis(50));
        drop(dying);
    });
    assert!(started.elapsed() < timeout, "the survivors took {:?} to notice", started.elapsed());
    for (rank, result) in survivors.iter().enumerate() {
        let error = result.as_ref().expect_err("rank 2 is gone").to_string();
        assert!(error.contains("rank 2"), "rank {rank}: {error}");
        println!("rank {rank} failed as it should: {error}");
    }
    for (rank, collective) in ranks.iter().enumerate() {
        let again = collective.exchange(vec![bytes::Bytes::new(); RANKS], Some(timeout)).expect_err("failed before");
        assert!(again.to_string().contains("failed earlier") && again.to_string().contains("rank 2"), "{again}");
        assert!(started.elapsed() < timeout, "rank {rank}'s next exchange did not fail at once");
    }
}

/// A rank that goes silent (alive, but makes no exchange) fails the others' exchange at their timeout, naming the
/// ranks they awaited. Needs three GPUs (or the CPU emulation), libcuda and libnccl; else it prints why and passes.
#[cfg(feature = "cuda")]
#[test]
fn a_silent_nccl_rank_fails_the_others_at_their_timeout() {
    use switchyard_transport::collective::CollectiveError;

    const RANKS: usize = 3;
    let Some(mut ranks) = nccl_ranks_or_skip(RANKS) else { return };
    let _silent = ranks.pop().expect("three ranks");
    let timeout = Duration::from_millis(700);
    let started = Instant::now();
    let results = nccl_round(&ranks, RANKS, 0, timeout, || {});
    let elapsed = started.elapsed();
    assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(5), "took {elapsed:?}");
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Err(CollectiveError::Timeout { exchange: 0, waiting_for, after }) => {
                assert!(waiting_for.contains(&2), "rank {rank} awaited {waiting_for:?}");
                assert_eq!(after, timeout);
                println!("rank {rank} timed out as it should, awaiting ranks {waiting_for:?}");
            }
            other => panic!("rank {rank}: expected a timeout, got {other:?}"),
        }
    }
}

/// The MoE step over NCCL: two attention and two expert ranks (threads, a GPU each) step through NCCL exactly as
/// through the loopback, every answer the experts' function of its batch, and leave together. Needs four GPUs (or
/// the CPU emulation), libcuda and libnccl; without them it prints why and passes.
#[cfg(feature = "cuda")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_attention_and_two_expert_ranks_step_over_nccl() {
    let Some(collectives) = tokio::task::spawn_blocking(|| nccl_ranks_or_skip(4)).await.unwrap() else { return };
    let collectives = collectives.into_iter().map(|c| Arc::new(c) as Arc<dyn Collective>).collect();
    let service = AffineExperts::new(Behaviour::Compute);
    let (attention, experts) = ranks_over(collectives, WireFormat::default(), [service.clone(), service], STEP_TIMEOUT);
    const STEPS: u64 = 5;
    for step in 0..STEPS {
        step_both(&attention, step).await;
    }
    let left = futures::future::join_all(attention.iter().map(|t| t.leave())).await;
    assert!(left.iter().all(Result::is_ok), "{left:?}");
    for expert in experts {
        assert_eq!(expert.await.unwrap().unwrap().steps, STEPS);
    }
}
