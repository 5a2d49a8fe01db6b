//! [`StoreService`]: serves any [`Store`] as the `switchyard.v1.Store` gRPC service, so that a coordinator hosting a
//! [`super::MemoryStore`] is the cluster's store for every worker process ([`super::RemoteStore`] is the client).
//!
//! Each RPC calls the trait method of the same name. A watch answers with `created` once the store's watch is in
//! place, then its events; a client that goes away drops the stream, and with it the watch. A campaign answers once
//! the candidate leads; a client that goes away drops the waiting, and its candidate key lives on only as long as its
//! lease (which the client no longer refreshes).

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1;
use switchyard_proto::v1::store_server::{Store as StoreRpc, StoreServer};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::wire::{to_status, MAX_MESSAGE_BYTES};
use super::{BoxStream, CasOutcome, Condition, LeaseId, Store, TxnOp};
use crate::CoordinatorError;

/// The `switchyard.v1.Store` service over a store.
pub struct StoreService {
    store: Arc<dyn Store>,
}

impl StoreService {
    /// Serves `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The tonic service, accepting and sending messages up to 256 MiB (a listing of many keys is one message).
    pub fn into_server(self) -> StoreServer<StoreService> {
        StoreServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl StoreRpc for StoreService {
    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        let kv = self.store.get(&request.get_ref().key).await.map_err(to_status)?;
        Ok(Response::new(v1::GetResponse { kv: kv.map(Into::into) }))
    }

    async fn list(&self, request: Request<v1::ListRequest>) -> Result<Response<v1::ListResponse>, Status> {
        let listing = self.store.list(&request.get_ref().prefix).await.map_err(to_status)?;
        let kvs = listing.kvs.into_iter().map(Into::into).collect();
        Ok(Response::new(v1::ListResponse { kvs, revision: listing.revision }))
    }

    async fn put(&self, request: Request<v1::PutRequest>) -> Result<Response<v1::PutResponse>, Status> {
        let put = request.into_inner();
        let revision = self.store.put(&put.key, put.value.into(), put.lease.map(LeaseId)).await.map_err(to_status)?;
        Ok(Response::new(v1::PutResponse { revision }))
    }

    async fn delete(&self, request: Request<v1::DeleteRequest>) -> Result<Response<v1::DeleteResponse>, Status> {
        let existed = self.store.delete(&request.get_ref().key).await.map_err(to_status)?;
        Ok(Response::new(v1::DeleteResponse { existed }))
    }

    async fn delete_prefix(
        &self,
        request: Request<v1::DeletePrefixRequest>,
    ) -> Result<Response<v1::DeletePrefixResponse>, Status> {
        let deleted = self.store.delete_prefix(&request.get_ref().prefix).await.map_err(to_status)?;
        Ok(Response::new(v1::DeletePrefixResponse { deleted }))
    }

    async fn compare_and_swap(
        &self,
        request: Request<v1::CompareAndSwapRequest>,
    ) -> Result<Response<v1::CompareAndSwapResponse>, Status> {
        let cas = request.into_inner();
        let outcome: CasOutcome = self
            .store
            .compare_and_swap(&cas.key, cas.expected, cas.value.into(), cas.lease.map(LeaseId))
            .await
            .map_err(to_status)?;
        Ok(Response::new(outcome.into()))
    }

    async fn txn(&self, request: Request<v1::TxnRequest>) -> Result<Response<v1::TxnResponse>, Status> {
        let txn = request.into_inner();
        let conditions =
            txn.conditions.into_iter().map(Condition::try_from).collect::<Result<_, _>>().map_err(to_status)?;
        let ops = txn.ops.into_iter().map(TxnOp::try_from).collect::<Result<_, _>>().map_err(to_status)?;
        let revision = self.store.txn(conditions, ops).await.map_err(to_status)?;
        Ok(Response::new(v1::TxnResponse { revision }))
    }

    async fn grant_lease(
        &self,
        request: Request<v1::GrantLeaseRequest>,
    ) -> Result<Response<v1::GrantLeaseResponse>, Status> {
        let ttl = Duration::from_millis(request.get_ref().ttl_ms);
        let lease = self.store.grant_lease(ttl).await.map_err(to_status)?;
        Ok(Response::new(v1::GrantLeaseResponse { lease: lease.0 }))
    }

    async fn keep_alive(
        &self,
        request: Request<v1::KeepAliveRequest>,
    ) -> Result<Response<v1::KeepAliveResponse>, Status> {
        self.store.keep_alive(LeaseId(request.get_ref().lease)).await.map_err(to_status)?;
        Ok(Response::new(v1::KeepAliveResponse {}))
    }

    async fn revoke_lease(
        &self,
        request: Request<v1::RevokeLeaseRequest>,
    ) -> Result<Response<v1::RevokeLeaseResponse>, Status> {
        self.store.revoke_lease(LeaseId(request.get_ref().lease)).await.map_err(to_status)?;
        Ok(Response::new(v1::RevokeLeaseResponse {}))
    }

    type WatchStream = BoxStream<Result<v1::WatchResponse, Status>>;

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        use v1::watch_response::Kind;
        let request = request.get_ref();
        let events = self.store.watch(&request.prefix, request.from).await.map_err(to_status)?;
        let created = v1::WatchResponse { kind: Some(Kind::Created(v1::WatchCreated {})) };
        let events = events.map(|event| match event {
            Ok(event) => Ok(v1::WatchResponse { kind: Some(Kind::Event(event.into())) }),
            Err(e) => Err(to_status(e)),
        });
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(created)).chain(events))))
    }

    async fn campaign(&self, request: Request<v1::CampaignRequest>) -> Result<Response<v1::CampaignResponse>, Status> {
        let campaign = request.into_inner();
        let leader = self
            .store
            .campaign(&campaign.election, LeaseId(campaign.lease), campaign.value.into())
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::CampaignResponse { leader: Some(leader.into()) }))
    }

    async fn leader(&self, request: Request<v1::LeaderRequest>) -> Result<Response<v1::LeaderResponse>, Status> {
        let leader = self.store.leader(&request.get_ref().election).await.map_err(to_status)?;
        Ok(Response::new(v1::LeaderResponse { leader: leader.map(Into::into) }))
    }

    async fn resign(&self, request: Request<v1::ResignRequest>) -> Result<Response<v1::ResignResponse>, Status> {
        let leader = request.into_inner().leader.ok_or_else(|| {
            to_status(CoordinatorError::StoreRequest {
                op: "resign",
                key: String::new(),
                reason: "the request names no leader key".into(),
            })
        })?;
        self.store.resign(&leader.into()).await.map_err(to_status)?;
        Ok(Response::new(v1::ResignResponse {}))
    }
}
