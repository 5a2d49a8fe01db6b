//! The `ExpertControl` gRPC service: load and unload experts while serving, and report status. Handlers are thin:
//! turn the request into domain types, call [`ExpertWorker`], map the result.

use std::sync::Arc;

use switchyard_proto::v1::expert_control_server::ExpertControl;
use switchyard_proto::v1::{
    LayerExperts, LoadExpertsRequest, LoadExpertsResponse, UnloadExpertsRequest, UnloadExpertsResponse, WorkerStatus,
    WorkerStatusRequest,
};
use tonic::{Request, Response, Status};

use crate::error::WorkerError;
use crate::spec::ExpertsByLayer;
use crate::worker::ExpertWorker;

/// Serves `switchyard.v1.ExpertControl` for one worker.
#[derive(Debug, Clone)]
pub struct ControlService {
    worker: Arc<ExpertWorker>,
}

impl ControlService {
    /// The control service of `worker`.
    pub fn new(worker: Arc<ExpertWorker>) -> Self {
        Self { worker }
    }
}

/// The wire's per-layer lists as a map (repeated layers merge).
fn to_map(experts: Vec<LayerExperts>) -> ExpertsByLayer {
    let mut map = ExpertsByLayer::new();
    for entry in experts {
        map.entry(entry.layer as usize).or_default().extend(entry.experts);
    }
    map
}

/// The map as the wire's per-layer lists, layers ascending.
pub fn to_layer_experts(experts: &ExpertsByLayer) -> Vec<LayerExperts> {
    experts
        .iter()
        .map(|(&layer, ids)| LayerExperts { layer: layer as u32, experts: ids.iter().copied().collect() })
        .collect()
}

/// The status report of `worker`, as `Status` answers it.
pub fn worker_status(worker: &ExpertWorker) -> WorkerStatus {
    let counters = worker.counters();
    WorkerStatus {
        worker_id: worker.worker_id().to_string(),
        held: to_layer_experts(&worker.held()),
        expert_bytes: worker.expert_bytes(),
        placement_epoch: worker.placement_epoch(),
        min_placement_epoch: worker.min_placement_epoch(),
        tokens_computed: counters.tokens_computed,
        requests_served: counters.requests_served,
        batches_computed: counters.batches_computed,
    }
}

/// Runs a load or unload on the blocking pool: reading weights must not stall the runtime serving dispatches.
async fn blocking<F>(work: F) -> Result<u64, Status>
where
    F: FnOnce() -> Result<u64, WorkerError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|error| error.to_status()),
        Err(join) => Err(WorkerError::Task { reason: join.to_string() }.to_status()),
    }
}

#[tonic::async_trait]
impl ExpertControl for ControlService {
    async fn load_experts(
        &self,
        request: Request<LoadExpertsRequest>,
    ) -> Result<Response<LoadExpertsResponse>, Status> {
        let request = request.into_inner();
        let (experts, epoch) = (to_map(request.experts), request.placement_epoch);
        let worker = self.worker.clone();
        let bytes_read = blocking(move || worker.load_experts(&experts, epoch)).await?;
        Ok(Response::new(LoadExpertsResponse { bytes_read }))
    }

    async fn unload_experts(
        &self,
        request: Request<UnloadExpertsRequest>,
    ) -> Result<Response<UnloadExpertsResponse>, Status> {
        let request = request.into_inner();
        let (experts, min_epoch) = (to_map(request.experts), request.min_epoch);
        let worker = self.worker.clone();
        let bytes_freed = blocking(move || worker.unload_experts(&experts, min_epoch)).await?;
        Ok(Response::new(UnloadExpertsResponse { bytes_freed }))
    }

    async fn status(&self, _request: Request<WorkerStatusRequest>) -> Result<Response<WorkerStatus>, Status> {
        Ok(Response::new(worker_status(&self.worker)))
    }
}
