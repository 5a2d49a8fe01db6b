//! The `switchyard.v1.Coordinator` gRPC service: attention workers ask it where experts live.

use std::future::Future;
use std::sync::Arc;

use switchyard_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use switchyard_proto::v1::{self, GetPlacementRequest};
use tokio::sync::RwLock;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::Placement;

/// Serves the current placement.
pub struct CoordinatorService {
    placement: Arc<RwLock<Placement>>,
}

impl CoordinatorService {
    /// A service answering with `placement` until it is replaced.
    pub fn new(placement: Placement) -> Self {
        Self { placement: Arc::new(RwLock::new(placement)) }
    }

    /// The shared placement, for whoever updates it.
    pub fn placement(&self) -> Arc<RwLock<Placement>> {
        Arc::clone(&self.placement)
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn get_placement(&self, _request: Request<GetPlacementRequest>) -> Result<Response<v1::Placement>, Status> {
        Ok(Response::new(self.placement.read().await.to_proto()))
    }
}

/// Serves `service` on `listener` with gRPC health (SERVING) and reflection until `shutdown` resolves.
pub async fn serve(
    service: CoordinatorService,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .build_v1();
    let mut builder = tonic::transport::Server::builder();
    let router = builder.add_service(health_service).add_service(CoordinatorServer::new(service));
    let router = match reflection {
        Ok(reflection) => router.add_service(reflection),
        Err(e) => {
            tracing::warn!(error = %e, "gRPC reflection unavailable");
            router
        }
    };
    router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown).await
}
