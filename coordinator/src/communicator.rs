//! Communicator bootstrap (`switchyard.v1.Communicator`): the ranks of a collective (NCCL) communicator meet through
//! the coordinator.
//!
//! Rank 0 makes the communicator's unique id and publishes it under the communicator's name with its world size
//! ([`CommunicatorService`]'s `Publish`); every other rank asks for it (`Wait`), waiting up to a deadline for rank 0.
//! The id is recorded in the cluster store under `communicators/<name>`, attached to rank 0's lease: a restarted
//! coordinator (or another coordinator on the same store) still hands it out, and it disappears when rank 0's lease
//! ends, after which the name may be published again. A second publisher of a live name, or a rank expecting
//! another world size, is refused with a message naming both sides.
//!
//! [`CommunicatorClient`] is what the ranks call.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_proto::v1::communicator_client::CommunicatorClient as GeneratedClient;
use switchyard_proto::v1::communicator_server::{Communicator, CommunicatorServer};
use switchyard_proto::v1::{
    PublishCommunicatorRequest, PublishCommunicatorResponse, WaitCommunicatorRequest, WaitCommunicatorResponse,
};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::error::CoordinatorError;
use crate::store::{check_name, CasOutcome, ClusterStore, LeaseId, WatchEvent};

/// Bytes of a unique id: NCCL's `NCCL_UNIQUE_ID_BYTES`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// The longest a `Wait` is held open, whatever the caller asks: a rank waiting longer asks again.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// A published communicator, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    world_size: u32,
    unique_id: Vec<u8>,
    publisher: String,
    lease: i64,
}

/// A communicator's id as a waiting rank receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedCommunicator {
    /// The unique id rank 0 made.
    pub unique_id: Vec<u8>,
    /// Ranks in the communicator.
    pub world_size: u32,
    /// Who published it.
    pub publisher: String,
}

/// Serves `switchyard.v1.Communicator` from the cluster store.
#[derive(Clone)]
pub struct CommunicatorService {
    cluster: ClusterStore,
}

impl CommunicatorService {
    /// A service keeping its records in `cluster`'s store.
    pub fn new(cluster: ClusterStore) -> Self {
        Self { cluster }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> CommunicatorServer<Self> {
        CommunicatorServer::new(self)
    }

    fn key(&self, name: &str) -> String {
        format!("{}communicators/{name}", self.cluster.root())
    }
}

fn store_status(op: &str, name: &str, error: CoordinatorError) -> Status {
    let message = format!("communicator {name:?}: {op}: {error}");
    match error {
        CoordinatorError::LeaseNotFound { .. } => Status::not_found(message),
        e if e.retryable() => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

fn parse(key: &str, value: &[u8]) -> Result<Record, Status> {
    serde_json::from_slice(value)
        .map_err(|e| Status::internal(format!("communicator record at {key:?} is not what the coordinator wrote: {e}")))
}

fn checked_name(name: &str) -> Result<(), Status> {
    check_name("communicator name", name).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl Communicator for CommunicatorService {
    async fn publish(
        &self,
        request: Request<PublishCommunicatorRequest>,
    ) -> Result<Response<PublishCommunicatorResponse>, Status> {
        let request = request.into_inner();
        let name = request.name.as_str();
        checked_name(name)?;
        if request.world_size == 0 {
            return Err(Status::invalid_argument(format!("communicator {name:?}: world_size must be at least 1")));
        }
        if request.unique_id.len() != UNIQUE_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "communicator {name:?}: unique_id has {} bytes, NCCL's ids have {UNIQUE_ID_BYTES}",
                request.unique_id.len()
            )));
        }
        if request.lease == 0 {
            return Err(Status::invalid_argument(format!(
                "communicator {name:?}: lease is required (rank 0's lease in the cluster store, which the id lives as \
                 long as)"
            )));
        }
        let record = Record {
            world_size: request.world_size,
            unique_id: request.unique_id.to_vec(),
            publisher: request.publisher.clone(),
            lease: request.lease,
        };
        let key = self.key(name);
        let value = serde_json::to_vec(&record).map_err(|e| Status::internal(format!("encoding the record: {e}")))?;
        let store = self.cluster.store();
        loop {
            let outcome = store
                .compare_and_swap(&key, None, value.clone(), Some(LeaseId(request.lease)))
                .await
                .map_err(|e| store_status("publish", name, e))?;
            let current = match outcome {
                CasOutcome::Swapped { .. } => {
                    tracing::info!(communicator = name, publisher = %record.publisher, world_size = record.world_size,
                        "communicator id published");
                    return Ok(Response::new(PublishCommunicatorResponse { already_published: false }));
                }
                CasOutcome::Conflict { current: Some(current) } => current,
                // Released between the write and the read: try again.
                CasOutcome::Conflict { current: None } => continue,
            };
            let existing = parse(&key, &current.value)?;
            if existing == record {
                return Ok(Response::new(PublishCommunicatorResponse { already_published: true }));
            }
            return Err(Status::already_exists(format!(
                "communicator {name:?} is already published by {:?} (lease {:x}, world size {}); {:?} (lease {:x}) \
                 cannot publish it too: only rank 0 publishes, and the name is free again once its publisher's \
                 lease ends",
                existing.publisher, existing.lease, existing.world_size, record.publisher, record.lease
            )));
        }
    }

    async fn wait(
        &self,
        request: Request<WaitCommunicatorRequest>,
    ) -> Result<Response<WaitCommunicatorResponse>, Status> {
        let request = request.into_inner();
        let name = request.name.as_str();
        checked_name(name)?;
        if request.rank == 0 || request.rank >= request.world_size {
            return Err(Status::invalid_argument(format!(
                "communicator {name:?}: rank {} of world size {} cannot wait (ranks 1 to world_size - 1 wait; rank 0 \
                 publishes)",
                request.rank, request.world_size
            )));
        }
        let wait = Duration::from_millis(request.wait_ms).min(MAX_WAIT);
        let key = self.key(name);
        let store = self.cluster.store();
        let answer = |record: Record| -> Result<Response<WaitCommunicatorResponse>, Status> {
            if record.world_size != request.world_size {
                return Err(Status::failed_precondition(format!(
                    "communicator {name:?} was published by {:?} for world size {}, but rank {} expects world size {}",
                    record.publisher, record.world_size, request.rank, request.world_size
                )));
            }
            Ok(Response::new(WaitCommunicatorResponse {
                unique_id: record.unique_id.into(),
                world_size: record.world_size,
                publisher: record.publisher,
            }))
        };
        // Read, then watch from just after the read, so a publication between the two is not missed.
        let listing = store.list(&key).await.map_err(|e| store_status("wait", name, e))?;
        if let Some(kv) = listing.kvs.iter().find(|kv| kv.key == key) {
            return answer(parse(&key, &kv.value)?);
        }
        let mut events =
            store.watch(&key, Some(listing.revision + 1)).await.map_err(|e| store_status("wait", name, e))?;
        let published = tokio::time::timeout(wait, async {
            while let Some(event) = events.next().await {
                match event {
                    Ok(WatchEvent::Put(kv)) if kv.key == key => return Ok(Some(kv)),
                    Ok(_) => {}
                    Err(e) => return Err(store_status("wait", name, e)),
                }
            }
            Ok(None)
        })
        .await;
        match published {
            Ok(Ok(Some(kv))) => answer(parse(&key, &kv.value)?),
            Ok(Ok(None)) => Err(Status::unavailable(format!("communicator {name:?}: the store's watch ended"))),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "communicator {name:?}: rank 0 did not publish its id within {:.1} s (rank {} of world size {} is \
                 waiting): is rank 0 running, with the same communicator name and coordinator?",
                wait.as_secs_f64(),
                request.rank,
                request.world_size
            ))),
        }
    }
}

/// Why a bootstrap call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommunicatorError {
    /// The coordinator's endpoint is not a valid URL.
    #[error("invalid coordinator endpoint {endpoint:?}: {reason}")]
    Connect {
        /// The coordinator's endpoint.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The coordinator refused or failed the call; its message names the communicator and what was wrong.
    #[error("{op} communicator {name:?} ({code:?}): {message}")]
    Refused {
        /// `publish` or `wait`.
        op: &'static str,
        /// The communicator.
        name: String,
        /// The gRPC code (`AlreadyExists`, `FailedPrecondition`, `DeadlineExceeded`, ...).
        code: Code,
        /// The coordinator's message.
        message: String,
    },
}

impl CommunicatorError {
    /// The gRPC code the coordinator answered with (`Unavailable` when it was not reached; `InvalidArgument` for a
    /// bad endpoint).
    pub fn code(&self) -> Code {
        match self {
            CommunicatorError::Connect { .. } => Code::InvalidArgument,
            CommunicatorError::Refused { code, .. } => *code,
        }
    }
}

/// How long a call may take beyond the wait it asks for (the network, the store).
const CALL_MARGIN: Duration = Duration::from_secs(5);

/// The ranks' side of the bootstrap: publish (rank 0) or wait for (the others) a communicator's unique id.
#[derive(Clone)]
pub struct CommunicatorClient {
    client: GeneratedClient<Channel>,
    endpoint: String,
}

impl CommunicatorClient {
    /// A client of the coordinator at `endpoint` (`http://host:port`). Nothing is sent yet: each call connects if it
    /// must, so a coordinator that restarts is reached again.
    pub fn new(endpoint: &str) -> Result<Self, CommunicatorError> {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| CommunicatorError::Connect { endpoint: endpoint.to_string(), reason: e.to_string() })?
            .connect_timeout(CALL_MARGIN)
            .connect_lazy();
        Ok(Self { client: GeneratedClient::new(channel), endpoint: endpoint.to_string() })
    }

    /// The coordinator's endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Publishes `unique_id` as communicator `name` of `world_size` ranks, as rank 0 (`publisher`, holding `lease`).
    /// Returns whether it was already published by this same publisher (a retried call).
    pub async fn publish(
        &self,
        name: &str,
        world_size: u32,
        unique_id: &[u8],
        lease: LeaseId,
        publisher: &str,
    ) -> Result<bool, CommunicatorError> {
        let mut request = Request::new(PublishCommunicatorRequest {
            name: name.to_string(),
            world_size,
            unique_id: unique_id.to_vec().into(),
            lease: lease.0,
            publisher: publisher.to_string(),
        });
        request.set_timeout(CALL_MARGIN);
        let refused = |status: Status| refusal("publish", name, status);
        let response = self.client.clone().publish(request).await.map_err(refused)?;
        Ok(response.into_inner().already_published)
    }

    /// Waits up to `wait` for communicator `name`'s id, as `rank` of `world_size`.
    pub async fn wait(
        &self,
        name: &str,
        world_size: u32,
        rank: u32,
        wait: Duration,
    ) -> Result<PublishedCommunicator, CommunicatorError> {
        let mut request = Request::new(WaitCommunicatorRequest {
            name: name.to_string(),
            world_size,
            rank,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        });
        request.set_timeout(wait.min(MAX_WAIT) + CALL_MARGIN);
        let response = self.client.clone().wait(request).await.map_err(|status| refusal("wait", name, status))?;
        let response = response.into_inner();
        Ok(PublishedCommunicator {
            unique_id: response.unique_id.to_vec(),
            world_size: response.world_size,
            publisher: response.publisher,
        })
    }
}

/// The error of a failed call: the coordinator's message, or for a connection failure (tonic says only "transport
/// error") its causes down to the root (`Connection refused`).
fn refusal(op: &'static str, name: &str, status: Status) -> CommunicatorError {
    let mut message = status.message().to_string();
    for cause in std::iter::successors(std::error::Error::source(&status), |e| e.source()) {
        message = format!("{message}: {cause}");
    }
    CommunicatorError::Refused { op, name: name.to_string(), code: status.code(), message }
}
