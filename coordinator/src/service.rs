//! The coordinator's gRPC endpoint: `switchyard.v1.Coordinator` (where experts live, read from the store),
//! `switchyard.v1.Communicator` (collective communicators' ids, [`crate::communicator`]) and, when
//! the coordinator hosts the cluster store in memory, `switchyard.v1.Store` for the workers.

use std::future::Future;
use std::sync::Arc;

use switchyard_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use switchyard_proto::v1::{self, GetPlacementRequest};
use tonic::{Request, Response, Status};

use crate::communicator::CommunicatorService;
use crate::store::{ClusterStore, Store, StoreService};

/// Answers `GetPlacement` with the cluster's current placement in the store.
#[derive(Clone)]
pub struct CoordinatorService {
    cluster: ClusterStore,
}

impl CoordinatorService {
    /// A service reading `cluster`'s placement.
    pub fn new(cluster: ClusterStore) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn get_placement(&self, _request: Request<GetPlacementRequest>) -> Result<Response<v1::Placement>, Status> {
        match self.cluster.placement().await {
            Ok(Some(stored)) => Ok(Response::new(stored.placement.to_proto())),
            Ok(None) => Err(Status::not_found(format!(
                "cluster {} has no placement yet: the coordinator publishes the first one once enough expert workers \
                 have registered (`switchyard placement show --store ...` shows what it waits for)",
                self.cluster.cluster()
            ))),
            Err(e) if e.retryable() => Err(Status::unavailable(format!("reading the placement: {e}"))),
            Err(e) => Err(Status::internal(format!("reading the placement: {e}"))),
        }
    }
}

/// Serves `service` on `listener` with gRPC health (SERVING) and reflection until `shutdown` resolves; with
/// `hosted_store`, also serves that store (`switchyard.v1.Store`) so workers can use `--store http://<this address>`.
pub async fn serve(
    service: CoordinatorService,
    hosted_store: Option<Arc<dyn Store>>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .build_v1();
    let communicators = CommunicatorService::new(service.cluster.clone());
    let mut builder = tonic::transport::Server::builder();
    let router = builder
        .add_service(health_service)
        .add_service(communicators.into_server())
        .add_service(CoordinatorServer::new(service))
        .add_optional_service(hosted_store.map(|store| StoreService::new(store).into_server()));
    let router = match reflection {
        Ok(reflection) => router.add_service(reflection),
        Err(e) => {
            tracing::warn!(error = %e, "gRPC reflection unavailable");
            router
        }
    };
    router
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
