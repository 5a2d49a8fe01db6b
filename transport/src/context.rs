//! Context-parallel attention between attention workers: the owner of a long sequence sends each member of its group
//! one global layer's queries (and the new keys and values of the member's range) and gets back the member's partial
//! attention. The same [`Transport`](crate::Transport) that carries dispatch carries it ([`Transport::attend`]); the
//! member side implements [`ContextService`], which [`ContextServer`] serves over gRPC (`switchyard.v1.ContextShard`).
//!
//! Like dispatch, this module moves rows of floats and knows nothing of the model: what a member computes is the
//! attention worker's business.
//!
//! [`Transport::attend`]: crate::Transport::attend

use std::sync::Arc;

use switchyard_proto::v1::context_shard_server::{ContextShard, ContextShardServer};
use switchyard_proto::v1::{AttendRequest, AttendResponse, ReleaseShardRequest, ReleaseShardResponse};
use tonic::{Request, Response, Status};

use crate::{BoxFuture, TransportError};

/// One global layer of one step for one member: the wire message itself (`switchyard.v1.AttendRequest`).
pub type PartialAttentionRequest = AttendRequest;
/// A member's partial attention (`switchyard.v1.AttendResponse`).
pub type PartialAttentionResponse = AttendResponse;

/// What a member of a context-parallel group serves.
pub trait ContextService: Send + Sync + 'static {
    /// Stores the request's keys and values in the member's shard of the sequence (created on first use) and
    /// returns its partial attention of the request's queries.
    fn attend(
        &self,
        request: PartialAttentionRequest,
    ) -> BoxFuture<'static, Result<PartialAttentionResponse, TransportError>>;

    /// Drops the member's shard of `sequence_id`, returning the KV blocks it gave back.
    fn release(&self, sequence_id: &str) -> BoxFuture<'static, Result<u64, TransportError>>;
}

/// Checks that a request's arrays have the sizes its positions imply, for rows of `q_row` and `kv_row` values.
pub fn check_request(request: &PartialAttentionRequest, q_row: usize, kv_row: usize) -> Result<(), TransportError> {
    let invalid = |what: &str, reason: String| TransportError::InvalidPayload { what: what.into(), reason };
    if request.sequence_id.is_empty() {
        return Err(invalid("sequence_id", "is empty".into()));
    }
    if request.range_end <= request.range_start {
        return Err(invalid("range", format!("{}..{} holds no position", request.range_start, request.range_end)));
    }
    let queries = request.query_positions.len();
    if request.queries.len() != queries * q_row {
        return Err(invalid("queries", format!("{} values for {queries} positions of {q_row}", request.queries.len())));
    }
    let rows = request.kv_positions.len();
    for (what, values) in [("keys", &request.keys), ("values", &request.values)] {
        if values.len() != rows * kv_row {
            return Err(invalid(what, format!("{} values for {rows} positions of {kv_row}", values.len())));
        }
    }
    if let Some(p) = request.kv_positions.iter().find(|&&p| p < request.range_start || p >= request.range_end) {
        return Err(invalid(
            "kv_positions",
            format!("position {p} is outside this member's range {}..{}", request.range_start, request.range_end),
        ));
    }
    Ok(())
}

/// Serves a [`ContextService`] as `switchyard.v1.ContextShard`.
pub struct ContextServer {
    service: Arc<dyn ContextService>,
}

impl ContextServer {
    /// Serves `service`.
    pub fn new(service: Arc<dyn ContextService>) -> Self {
        Self { service }
    }

    /// The tonic service to add to a server.
    pub fn into_service(self) -> ContextShardServer<Self> {
        ContextShardServer::new(self)
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::grpc::MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl ContextShard for ContextServer {
    async fn attend(&self, request: Request<AttendRequest>) -> Result<Response<AttendResponse>, Status> {
        self.service.attend(request.into_inner()).await.map(Response::new).map_err(|e| e.to_status())
    }

    async fn release_shard(
        &self,
        request: Request<ReleaseShardRequest>,
    ) -> Result<Response<ReleaseShardResponse>, Status> {
        let blocks_released =
            self.service.release(&request.into_inner().sequence_id).await.map_err(|e| e.to_status())?;
        Ok(Response::new(ReleaseShardResponse { blocks_released }))
    }
}
