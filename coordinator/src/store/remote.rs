//! [`RemoteStore`]: the store a coordinator serves over gRPC ([`super::StoreService`]), used through the same
//! [`Store`] trait as etcd.
//!
//! The channel connects lazily and reconnects by itself, so a coordinator that restarts is reached again without
//! anyone rebuilding the client; meanwhile calls fail with the retryable [`CoordinatorError::StoreUnavailable`]. Every
//! call but a campaign (which waits until it leads) has a request timeout; HTTP/2 keep-alives notice a coordinator
//! that vanished without closing the connection, which ends a waiting campaign or a watch.
//!
//! A watch whose stream breaks ends with [`CoordinatorError::WatchLost`], not a retryable error: the coordinator may
//! have restarted with an empty store whose revisions start over, so re-opening from the next revision could miss
//! writes. The watcher re-reads the state and watches again.

use std::future::Future;
use std::time::Duration;

use switchyard_proto::v1;
use switchyard_proto::v1::store_client::StoreClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status, Streaming};

use super::wire::{from_status, put_request, MAX_MESSAGE_BYTES};
use super::{
    BoxFuture, CasOutcome, Condition, KeyValue, LeaderKey, LeaseId, Listing, Store, TxnOp, WatchEvent, WatchStream,
};
use crate::CoordinatorError;

/// How long one request may take before it fails as unavailable (campaigns are not limited).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] served by a coordinator at an `http://` URL.
#[derive(Clone)]
pub struct RemoteStore {
    client: StoreClient<Channel>,
    /// `switchyard store at <url>`, for logs and errors.
    name: String,
}

impl RemoteStore {
    /// A client of the store served at `url` (`http://host:port`). Nothing is sent yet: the first call connects.
    /// Fails only if `url` is not such a URL.
    pub fn new(url: &str) -> Result<Self, CoordinatorError> {
        let invalid = |reason| CoordinatorError::InvalidName { field: "store URL", value: url.to_string(), reason };
        if url.starts_with("https://") {
            return Err(invalid(
                "https needs TLS, which this build of Switchyard does not include; use http://host:port",
            ));
        }
        if !url.starts_with("http://") {
            return Err(invalid("a coordinator's store URL is http://host:port"));
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|_| invalid("it is not a valid URL; a coordinator's store URL is http://host:port"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // Notices a coordinator that vanished without closing the connection (host down, partition), also
            // while only a watch or a campaign is waiting.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let client = StoreClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { client, name: format!("switchyard store at {url}") })
    }

    /// The answer of a call `op` about `key`, or its error.
    fn answer<T>(
        &self,
        op: &'static str,
        key: &str,
        result: Result<Response<T>, Status>,
    ) -> Result<T, CoordinatorError> {
        result.map(Response::into_inner).map_err(|status| from_status(op, key, &status, &self.name))
    }

    /// Runs a call with the request timeout.
    async fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        request: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, CoordinatorError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(result) => self.answer(op, key, result),
            Err(_) => Err(CoordinatorError::StoreUnavailable {
                op,
                key: key.to_string(),
                reason: format!("{} did not answer within {REQUEST_TIMEOUT:?}", self.name),
            }),
        }
    }
}

impl Store for RemoteStore {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let response = self.call("get", key, client.get(v1::GetRequest { key: key.to_string() })).await?;
            Ok(response.kv.map(Into::into))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::ListRequest { prefix: prefix.to_string() };
            let response = self.call("list", prefix, client.list(request)).await?;
            Ok(Listing { kvs: response.kvs.into_iter().map(Into::into).collect(), revision: response.revision })
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<u64, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = put_request(key.to_string(), value, lease);
            Ok(self.call("put", key, client.put(request)).await?.revision)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::DeleteRequest { key: key.to_string() };
            Ok(self.call("delete", key, client.delete(request)).await?.existed)
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::DeletePrefixRequest { prefix: prefix.to_string() };
            Ok(self.call("delete_prefix", prefix, client.delete_prefix(request)).await?.deleted)
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<CasOutcome, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::CompareAndSwapRequest {
                key: key.to_string(),
                expected,
                value: value.into(),
                lease: lease.map(|l| l.0),
            };
            self.call("compare_and_swap", key, client.compare_and_swap(request)).await?.try_into()
        })
    }

    fn txn<'a>(
        &'a self,
        conditions: Vec<Condition>,
        ops: Vec<TxnOp>,
    ) -> BoxFuture<'a, Result<Option<u64>, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::TxnRequest {
                conditions: conditions.into_iter().map(Into::into).collect(),
                ops: ops.into_iter().map(Into::into).collect(),
            };
            // The server's errors name the key they are about; a transport failure is about no key in particular.
            Ok(self.call("txn", "", client.txn(request)).await?.revision)
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let ttl_ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
            let response = self.call("grant_lease", "", client.grant_lease(v1::GrantLeaseRequest { ttl_ms })).await?;
            Ok(LeaseId(response.lease))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::KeepAliveRequest { lease: lease.0 };
            self.call("keep_alive", &lease.to_string(), client.keep_alive(request)).await.map(|_| ())
        })
    }

    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::RevokeLeaseRequest { lease: lease.0 };
            self.call("revoke_lease", &lease.to_string(), client.revoke_lease(request)).await.map(|_| ())
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Option<u64>) -> BoxFuture<'a, Result<WatchStream, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::WatchRequest { prefix: prefix.to_string(), from };
            // The watch is in place once the server says `created`: wait for that before resolving.
            let opened = async {
                let mut stream = client.watch(request).await?.into_inner();
                let first = stream.message().await?;
                Ok(Response::new((stream, first)))
            };
            let (stream, first) = self.call("watch", prefix, opened).await?;
            match first.and_then(|m| m.kind) {
                Some(v1::watch_response::Kind::Created(_)) => {}
                other => {
                    return Err(CoordinatorError::StoreUnavailable {
                        op: "watch",
                        key: prefix.to_string(),
                        reason: format!("{} did not confirm the watch (first message: {other:?})", self.name),
                    })
                }
            }
            Ok(watch_events(stream, prefix.to_string(), self.name.clone()))
        })
    }

    fn campaign<'a>(
        &'a self,
        election: &'a str,
        lease: LeaseId,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<LeaderKey, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::CampaignRequest { election: election.to_string(), lease: lease.0, value: value.into() };
            // No timeout: the server answers once this candidate leads.
            let response = self.answer("campaign", election, client.campaign(request).await)?;
            let leader = response.leader.ok_or_else(|| CoordinatorError::StoreRequest {
                op: "campaign",
                key: election.to_string(),
                reason: format!("{} answered the campaign without a leader key", self.name),
            })?;
            Ok(leader.into())
        })
    }

    fn leader<'a>(&'a self, election: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::LeaderRequest { election: election.to_string() };
            Ok(self.call("leader", election, client.leader(request)).await?.leader.map(Into::into))
        })
    }

    fn resign<'a>(&'a self, leader: &'a LeaderKey) -> BoxFuture<'a, Result<(), CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let request = v1::ResignRequest { leader: Some(leader.clone().into()) };
            self.call("resign", &leader.key, client.resign(request)).await.map(|_| ())
        })
    }
}

/// The events of a watch stream; a broken stream ends with `WatchLost`. Dropping it cancels the call, which ends
/// the watch on the server.
fn watch_events(stream: Streaming<v1::WatchResponse>, prefix: String, store: String) -> WatchStream {
    Box::pin(futures::stream::unfold(Some(stream), move |stream| {
        let (prefix, store) = (prefix.clone(), store.clone());
        async move {
            let mut stream = stream?;
            let item = watch_item(stream.message().await, prefix, &store);
            let more = item.is_ok().then_some(stream);
            Some((item, more))
        }
    }))
}

/// One message of a watch stream as the watcher sees it.
fn watch_item(
    message: Result<Option<v1::WatchResponse>, Status>,
    prefix: String,
    store: &str,
) -> Result<WatchEvent, CoordinatorError> {
    match message {
        Ok(Some(v1::WatchResponse { kind: Some(v1::watch_response::Kind::Event(event)) })) => event.try_into(),
        Ok(Some(other)) => Err(CoordinatorError::StoreRequest {
            op: "watch",
            key: prefix,
            reason: format!("{store} sent a watch message without an event: {other:?}"),
        }),
        Ok(None) => Err(CoordinatorError::WatchLost {
            prefix,
            reason: format!("{store} ended the watch; re-read the state and watch again"),
        }),
        Err(status) => Err(match from_status("watch", &prefix, &status, store) {
            CoordinatorError::StoreUnavailable { reason, .. } => CoordinatorError::WatchLost {
                prefix,
                reason: format!("the watch stream broke ({reason}); re-read the state and watch again"),
            },
            other => other,
        }),
    }
}
