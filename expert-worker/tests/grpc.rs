//! The expert worker over a real socket: health, control, dispatch through the gRPC transport, malformed requests,
//! and shutdown while an attention worker's dispatch stream is open.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_expert_worker::{serve, ExpertWorker, SHUTDOWN_GRACE};
use switchyard_model::{ActivationPrecision, RoutedExperts};
use switchyard_proto::v1::expert_control_client::ExpertControlClient;
use switchyard_proto::v1::expert_dispatch_client::ExpertDispatchClient;
use switchyard_proto::v1::{LayerExperts, LoadExpertsRequest, UnloadExpertsRequest, WorkerStatusRequest};
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::{codec, Transport, TransportError, WireFormat};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

struct Server {
    endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), switchyard_expert_worker::WorkerError>>,
}

async fn start(worker: ExpertWorker) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(Arc::new(worker), listener, async move {
        let _ = stopped.await;
    }));
    Server { endpoint, stop: Some(stop), task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_dispatch_control_and_health() {
    let dir = common::tiny_model();
    let hidden = common::text_config(dir.path()).hidden_size;
    let reference = common::all_experts(dir.path(), ActivationPrecision::F32);
    let mut server = start(common::worker(dir.path(), "1:0-3", 2)).await;

    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "switchyard.v1.ExpertDispatch", "switchyard.v1.ExpertControl"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::once(list)).await.unwrap().into_inner();
    match answers.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            for service in ["switchyard.v1.ExpertDispatch", "switchyard.v1.ExpertControl", "grpc.health.v1.Health"] {
                assert!(names.iter().any(|n| n == service), "{service} not in {names:?}");
            }
        }
        other => panic!("{other:?}"),
    }

    let mut control = ExpertControlClient::connect(server.endpoint.clone()).await.unwrap();
    let status = control.status(WorkerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.worker_id, "ew-test");
    assert_eq!(status.held, vec![LayerExperts { layer: 1, experts: vec![0, 1, 2, 3] }]);
    assert_eq!((status.min_placement_epoch, status.placement_epoch), (2, 2));
    assert!(status.expert_bytes > 0);

    // f32 on the wire: the worker computes on exactly the sender's numbers, so the result is bit-exact.
    let transport = GrpcTransport::new(WireFormat::default(), "aw-0".into());
    transport.add_worker("ew-test", server.endpoint.clone());
    let batch = common::batch(1, 1, &[0, 2, 3], 12, hidden, 2);
    let expected = reference.compute(1, &batch.inputs, &batch.experts, hidden).unwrap();
    assert_eq!(transport.dispatch("ew-test", batch.clone()).await.unwrap(), expected);

    // A malformed dispatch gets INVALID_ARGUMENT naming the field; the server keeps serving.
    let mut dispatch = ExpertDispatchClient::connect(server.endpoint.clone()).await.unwrap();
    let mut request = codec::request_from_batch(7, &batch, WireFormat::default());
    if let Some(activations) = request.activations.as_mut() {
        activations.data = activations.data.slice(..activations.data.len() - 4);
    }
    let error = dispatch.dispatch(request).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("activations"), "{}", error.message());
    let not_held = codec::request_from_batch(8, &common::batch(2, 1, &[5], 2, hidden, 2), WireFormat::default());
    let error = dispatch.dispatch(not_held).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    let good = codec::request_from_batch(9, &batch, WireFormat::default());
    let response = dispatch.dispatch(good).await.unwrap().into_inner();
    assert_eq!(codec::outputs_from_response(&response, batch.tokens(), hidden).unwrap(), expected);

    // Typed errors come back through the transport.
    let stale = switchyard_transport::ExpertBatch { placement_epoch: 1, ..batch.clone() };
    assert_eq!(transport.dispatch("ew-test", stale).await, Err(TransportError::StaleEpoch { sent: 1, current: 2 }));
    let to_new = common::batch(3, 3, &[6], 4, hidden, 2);
    assert_eq!(
        transport.dispatch("ew-test", to_new.clone()).await,
        Err(TransportError::ExpertNotHeld { layer: 3, expert: 6 })
    );

    // LoadExperts, then the new expert serves; UnloadExperts, then it is refused again.
    let layer3 = vec![LayerExperts { layer: 3, experts: vec![6] }];
    let loaded = control
        .load_experts(LoadExpertsRequest { experts: layer3.clone(), placement_epoch: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(loaded.bytes_read > 0);
    let expected = reference.compute(3, &to_new.inputs, &to_new.experts, hidden).unwrap();
    assert_eq!(transport.dispatch("ew-test", to_new.clone()).await.unwrap(), expected);
    let status = control.status(WorkerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.held.len(), 2);
    assert_eq!(status.requests_served, 3);
    assert_eq!(status.tokens_computed, 12 + 12 + 4);
    assert!(status.batches_computed >= 1 && status.batches_computed <= 3);
    let unloaded =
        control.unload_experts(UnloadExpertsRequest { experts: layer3, min_epoch: 0 }).await.unwrap().into_inner();
    assert!(unloaded.bytes_freed > 0);
    assert_eq!(transport.dispatch("ew-test", to_new).await, Err(TransportError::ExpertNotHeld { layer: 3, expert: 6 }));
    let bad = LoadExpertsRequest { experts: vec![LayerExperts { layer: 2, experts: vec![0] }], placement_epoch: 0 };
    let error = control.load_experts(bad).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("layer 2"), "{}", error.message());

    // Shutdown ends the open dispatch stream instead of waiting for the attention worker to hang up.
    let started = Instant::now();
    let _ = server.stop.take().map(|stop| stop.send(()));
    let result = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), server.task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
    assert!(started.elapsed() < SHUTDOWN_GRACE, "took {:?}", started.elapsed());
    assert!(transport.dispatch("ew-test", batch).await.is_err());
}

/// The coordinator's apply protocol against one worker over gRPC: LoadExperts for the next epoch widens the window
/// (routers on either epoch are served), UnloadExperts with that epoch as the minimum closes the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_window_follows_load_and_unload() {
    let dir = common::tiny_model();
    let hidden = common::text_config(dir.path()).hidden_size;
    let reference = common::all_experts(dir.path(), ActivationPrecision::F32);
    let server = start(common::worker(dir.path(), "1:0-3", 1)).await;
    let mut control = ExpertControlClient::connect(server.endpoint.clone()).await.unwrap();
    let transport = GrpcTransport::new(WireFormat::default(), "aw-0".into());
    transport.add_worker("ew-test", server.endpoint.clone());
    let window = |status: switchyard_proto::v1::WorkerStatus| (status.min_placement_epoch, status.placement_epoch);
    let to_layer1 = |epoch| common::batch(1, 1, &[0, 3], 6, hidden, epoch);
    let to_layer3 = |epoch| common::batch(2, 3, &[6], 4, hidden, epoch);

    // Epoch 2 moves expert 6 of layer 3 here: loaded before the placement is published, so both epochs are served.
    let layer3 = vec![LayerExperts { layer: 3, experts: vec![6] }];
    control.load_experts(LoadExpertsRequest { experts: layer3, placement_epoch: 2 }).await.unwrap();
    assert_eq!(window(control.status(WorkerStatusRequest {}).await.unwrap().into_inner()), (1, 2));
    let layer1_out = reference.compute(1, &to_layer1(1).inputs, &to_layer1(1).experts, hidden).unwrap();
    for epoch in [1, 2] {
        assert_eq!(transport.dispatch("ew-test", to_layer1(epoch)).await.unwrap(), layer1_out, "epoch {epoch}");
    }
    let layer3_out = reference.compute(3, &to_layer3(2).inputs, &to_layer3(2).experts, hidden).unwrap();
    assert_eq!(transport.dispatch("ew-test", to_layer3(2)).await.unwrap(), layer3_out);
    assert_eq!(
        transport.dispatch("ew-test", to_layer1(3)).await,
        Err(TransportError::StaleEpoch { sent: 3, current: 2 }),
        "an epoch not loaded yet is refused"
    );

    // Every router adopted epoch 2: expert 3 of layer 1 leaves, and epoch 1 is refused as stale, not as missing.
    let layer1 = vec![LayerExperts { layer: 1, experts: vec![3] }];
    let unloaded = control.unload_experts(UnloadExpertsRequest { experts: layer1, min_epoch: 2 }).await.unwrap();
    assert!(unloaded.into_inner().bytes_freed > 0);
    assert_eq!(window(control.status(WorkerStatusRequest {}).await.unwrap().into_inner()), (2, 2));
    assert_eq!(
        transport.dispatch("ew-test", to_layer1(1)).await,
        Err(TransportError::StaleEpoch { sent: 1, current: 2 })
    );
    assert_eq!(
        transport.dispatch("ew-test", to_layer1(2)).await,
        Err(TransportError::ExpertNotHeld { layer: 1, expert: 3 })
    );
    assert_eq!(transport.dispatch("ew-test", to_layer3(2)).await.unwrap(), layer3_out);
    drop(server);
}
