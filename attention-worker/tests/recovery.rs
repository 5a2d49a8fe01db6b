//! `RemoteExperts` with a recovery timeout, without a store: a step its placement cannot complete waits for a newer
//! routing table (`set_routing`) and completes with it, or fails after the timeout naming the lost worker and the
//! wait. Zero (the default) keeps failing at once, as the other tests check.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{expert_workers, fixture, in_process, max_diff, prompt, serve_expert_worker, solo};
use switchyard_attention_worker::{
    micro_batch_pool, wait_until_unused, AttentionWorkerError, RemoteExperts, RoutingTable,
};
use switchyard_expert_worker::ExpertsByLayer;
use switchyard_model::{generate, ExpertSelection, GenerationRequest, Llama4Model, SamplingParams};
use switchyard_proto::v1::Placement;
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::WireFormat;

fn model_with(remote: Arc<RemoteExperts>) -> Arc<Llama4Model> {
    let fixture = fixture();
    let mut model = common::load(fixture.dir.path(), &fixture.config, ExpertSelection::None);
    model.set_routed_experts(remote);
    Arc::new(model)
}

fn with_epoch(placement: &Placement, epoch: u64) -> Placement {
    Placement { epoch, ..placement.clone() }
}

/// Expert workers that moved past the step's epoch answer StaleEpoch; the step waits for the newer table and
/// completes with it, with the same output as the single-process model.
#[test]
fn a_stale_epoch_waits_for_the_newer_table() {
    let fixture = fixture();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let workers = expert_workers(&["0-3", "4-7"]);
    let placement = common::placement_of(&workers);
    let table = |epoch| Arc::new(RoutingTable::new(&with_epoch(&placement, epoch), &fixture.config.text).unwrap());
    let remote = Arc::new(
        RemoteExperts::new(table(7), in_process(&workers, WireFormat::default()), runtime.handle().clone(), "aw-test")
            .with_recovery_timeout(Duration::from_secs(10)),
    );
    // Both workers now serve epoch 8 only, as after a coordinator's load (raising the window's top) and unload
    // (raising its bottom) of nothing.
    for worker in &workers {
        worker.load_experts(&ExpertsByLayer::new(), 8).unwrap();
        worker.unload_experts(&ExpertsByLayer::new(), 8).unwrap();
    }
    let model = model_with(remote.clone());
    let prompt = prompt(12, 40);
    let generation = std::thread::spawn(move || {
        micro_batch_pool(0, 2).unwrap().install(|| solo(&model, &prompt, 6, SamplingParams::default()))
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while remote.recovery_waits() == 0 {
        assert!(std::time::Instant::now() < deadline, "no step waited for a new placement");
        std::thread::sleep(Duration::from_millis(2));
    }
    let old = remote.routing();
    remote.set_routing(table(8));
    let generation = generation.join().unwrap();
    // Once the step that waited moved on, nothing holds the old table.
    runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), wait_until_unused(old)).await }).unwrap();
    let reference = solo(&fixture.reference, &common::prompt(12, 40), 6, SamplingParams::default());
    assert_eq!(generation.tokens, reference.tokens);
    for (r, g) in reference.decode_logits.iter().zip(&generation.decode_logits) {
        assert_eq!(max_diff(r, g), 0.0);
    }
}

/// The only holder of some experts is gone and no new placement comes: the step fails after the recovery timeout,
/// naming the worker and the wait, with the transport's retryable error.
#[test]
fn no_new_placement_fails_after_the_recovery_timeout() {
    let fixture = fixture();
    let workers = expert_workers(&["0-3", "4-7"]);
    let mut served: Vec<_> = workers.iter().map(|w| serve_expert_worker(w.clone())).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut placement = common::placement_of(&workers);
    for (info, (_, endpoint)) in placement.workers.iter_mut().zip(&served) {
        info.endpoint = endpoint.clone();
    }
    let routing = Arc::new(RoutingTable::new(&placement, &fixture.config.text).unwrap());
    let transport = GrpcTransport::new(WireFormat::default(), "aw-test".into());
    for worker in routing.workers() {
        transport.add_worker(worker.id.clone(), worker.endpoint.clone());
    }
    let remote = Arc::new(
        RemoteExperts::new(routing, Arc::new(transport), runtime.handle().clone(), "aw-test")
            .with_recovery_timeout(Duration::from_millis(300)),
    );
    let model = model_with(remote.clone());
    let (ew1, _) = served.pop().unwrap();
    ew1.shutdown_background();

    let request = GenerationRequest {
        prompt: prompt(12, 40),
        max_new_tokens: 4,
        sampling: SamplingParams::default(),
        stop_tokens: Vec::new(),
        keep_logits: false,
        logprobs: None,
    };
    let error = micro_batch_pool(0, 2).unwrap().install(|| generate(&model, &request, &mut |_| {})).unwrap_err();
    assert!(error.retryable());
    let error = AttentionWorkerError::from_step(error);
    let AttentionWorkerError::Dispatch(dispatch) = &error else { panic!("not a dispatch error: {error:?}") };
    assert_eq!(dispatch.worker, "ew-1");
    assert_eq!(dispatch.recovery_waited, Some(Duration::from_millis(300)));
    let message = error.to_string();
    assert!(message.contains("no new placement within 0.3s"), "{message}");
    assert_eq!(error.to_status().code(), tonic::Code::Unavailable);
    assert!(remote.recovery_waits() > 0);
    drop(served);
}
