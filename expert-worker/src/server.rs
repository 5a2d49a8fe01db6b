//! The expert worker's gRPC server: dispatch (through the transport's [`DispatchServer`]), control, health and
//! reflection on one listener.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1::expert_control_server::ExpertControlServer;
use switchyard_transport::grpc::{server_builder, DispatchServer};
use switchyard_transport::ExpertService;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::control::ControlService;
use crate::error::WorkerError;
use crate::worker::ExpertWorker;

/// Largest gRPC message accepted or sent (the transport's limit): a 4096-token x 5120 f32 dispatch is 80 MiB.
pub const MAX_MESSAGE_BYTES: usize = switchyard_transport::grpc::MAX_MESSAGE_BYTES;

/// How long the server may take to close after shutdown starts. Dispatch streams are ended by the transport's
/// shutdown handle, but a client that never closes its connection must not keep the process alive.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// gRPC service names reported SERVING by the health service (besides the whole server, `""`).
pub const SERVICE_NAMES: [&str; 2] = ["switchyard.v1.ExpertDispatch", "switchyard.v1.ExpertControl"];

/// Serves `worker` on `listener` until `shutdown` resolves: `switchyard.v1.ExpertDispatch`,
/// `switchyard.v1.ExpertControl`, `grpc.health.v1.Health` (SERVING: the worker is loaded when it gets here;
/// NOT_SERVING once shutdown starts) and reflection, with the transport's server settings ([`server_builder`]:
/// windows, keepalive, no Nagle). After `shutdown`, open dispatch streams answer what they have in flight and end
/// with `UNAVAILABLE`; whatever is still open after [`SHUTDOWN_GRACE`] is dropped.
pub async fn serve<F>(worker: Arc<ExpertWorker>, listener: TcpListener, shutdown: F) -> Result<(), WorkerError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in SERVICE_NAMES {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchyard_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(WorkerError::Reflection)?;
    let service: Arc<dyn ExpertService> = worker.clone();
    let dispatch = DispatchServer::new(service, worker.worker_id().to_string());
    let streams = dispatch.shutdown_handle();
    let dispatch = dispatch.into_service();
    let control = ExpertControlServer::new(ControlService::new(worker.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        for name in SERVICE_NAMES.into_iter().chain([""]) {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
        streams.shutdown();
        let _ = started_tx.send(());
    };
    tracing::info!(worker_id = %worker.worker_id(), addr = ?listener.local_addr().ok(), "serving");
    let server = server_builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(dispatch)
        .add_service(control)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        );
    let grace = async move {
        match started_rx.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            // The server finished on its own: nothing to bound.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        result = server => result.map_err(WorkerError::Serve),
        () = grace => {
            tracing::warn!(worker_id = %worker.worker_id(), grace = ?SHUTDOWN_GRACE, "connections still open after the shutdown grace: closing them");
            Ok(())
        }
    }
}
