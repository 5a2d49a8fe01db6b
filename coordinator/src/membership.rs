//! Cluster membership: workers register under a lease and vanish when they stop refreshing it.
//!
//! A worker registers its role, endpoint, node, device, memory budget and the hash of the checkpoint it loaded.
//! The member record is attached to a lease that a background task keeps alive; a worker that dies stops
//! refreshing, and the store deletes its record when the lease lapses (etcd checks leases every 500 ms, so that
//! is within two lease periods). A worker whose lease lapsed while it was alive (a long partition) registers again
//! by itself.
//!
//! The cluster records the hash of the checkpoint it serves when the first worker joins; a worker with another hash
//! is refused while any member is alive. Once every member is gone, the next worker to join records its own hash
//! (that is how a cluster moves to a new checkpoint). The hash check and the member write are one transaction, so two
//! workers with different checkpoints can never both join.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::store::{Backoff, BoxStream, ClusterStore, Condition, KeyValue, LeaseId, LeaseKeeper, TxnOp, WatchEvent};
use crate::CoordinatorError;

/// What a member does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Runs attention and routing, and dispatches tokens to expert workers.
    Attention,
    /// Holds experts and computes them.
    Expert,
}

/// A worker's record in the store (`members/<worker_id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id, unique in the cluster (also the last segment of its key).
    pub worker_id: String,
    /// What it does.
    pub role: MemberRole,
    /// Where to reach it (`http://IP:PORT`).
    pub endpoint: String,
    /// The machine it runs on (replicas of one expert go to different nodes).
    pub node: String,
    /// The accelerator it uses (`cuda:0`, `cpu`).
    pub device: String,
    /// Bytes it may fill with expert weights.
    pub memory_budget_bytes: u64,
    /// Hash of the checkpoint it loaded.
    pub checkpoint_hash: String,
    /// An attention worker's KV element type (`"f32"`, `"bf16"`): with `memory_budget_bytes` (its KV cache), how many
    /// positions it can hold for the others. None for expert workers and in records written before it existed, which
    /// readers take as f32 (a bf16 cache then counts for half its room: never more than it holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_dtype: Option<String>,
}

/// A change of membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A worker joined.
    Joined(Member),
    /// A member wrote its record again (restarted before its old lease lapsed, or re-registered).
    Updated(Member),
    /// A worker left: it deregistered, or its lease lapsed.
    Left {
        /// Its id.
        worker_id: String,
    },
}

/// Registers workers and lists and watches the members of one cluster.
#[derive(Clone)]
pub struct Membership {
    cluster: ClusterStore,
}

/// A worker's membership, kept alive by a background task until dropped.
///
/// Dropping it (or [`Registration::abandon`]) stops the refreshes without deleting the record: the record vanishes
/// when the lease lapses, as for a crashed worker. [`Registration::deregister`] removes it at once.
#[must_use = "dropping a Registration stops keeping the worker's lease alive"]
pub struct Registration {
    cluster: ClusterStore,
    worker_id: String,
    lease: watch::Receiver<LeaseId>,
    task: JoinHandle<()>,
}

/// How often a join retries when the checkpoint record changes under it.
const JOIN_ATTEMPTS: usize = 16;

impl Membership {
    /// Membership of `cluster`.
    pub fn new(cluster: ClusterStore) -> Self {
        Self { cluster }
    }

    /// The cluster's store.
    pub fn cluster(&self) -> &ClusterStore {
        &self.cluster
    }

    /// Registers `member` under a lease of `ttl` and keeps the lease alive in the background.
    ///
    /// Fails with [`CoordinatorError::CheckpointMismatch`] (naming both hashes) if the cluster serves another
    /// checkpoint.
    pub async fn register(&self, member: Member, ttl: Duration) -> Result<Registration, CoordinatorError> {
        self.cluster.member_key(&member.worker_id)?;
        let keeper = join(&self.cluster, &member, ttl).await?;
        let (lease_tx, lease) = watch::channel(keeper.lease());
        tracing::info!(
            worker_id = %member.worker_id, lease = %keeper.lease(), store = %self.cluster.store().describe(),
            "registered in cluster {}", self.cluster.cluster()
        );
        let worker_id = member.worker_id.clone();
        let task = tokio::spawn(stay_registered(self.cluster.clone(), member, ttl, keeper, lease_tx));
        Ok(Registration { cluster: self.cluster.clone(), worker_id, lease, task })
    }

    /// The members now, sorted by worker id.
    pub async fn members(&self) -> Result<Vec<Member>, CoordinatorError> {
        let listing = self.cluster.store().list(&self.cluster.members_prefix()).await?;
        listing.kvs.iter().map(|kv| self.decode(kv)).collect()
    }

    /// The hash of the checkpoint the cluster serves, once a worker has joined.
    pub async fn checkpoint_hash(&self) -> Result<Option<String>, CoordinatorError> {
        let key = self.cluster.checkpoint_key();
        self.cluster.store().get(&key).await?.map(|kv| decode_hash(&kv)).transpose()
    }

    /// The members now and a stream of every change after that moment (nothing missed, nothing twice).
    pub async fn watch(
        &self,
    ) -> Result<(Vec<Member>, BoxStream<Result<MembershipEvent, CoordinatorError>>), CoordinatorError> {
        let prefix = self.cluster.members_prefix();
        let listing = self.cluster.store().list(&prefix).await?;
        let members = listing.kvs.iter().map(|kv| self.decode(kv)).collect::<Result<Vec<_>, _>>()?;
        let events = self.cluster.store().watch(&prefix, Some(listing.revision + 1)).await?;
        let this = self.clone();
        let stream = events.map(move |event| match event? {
            WatchEvent::Put(kv) => {
                let member = this.decode(&kv)?;
                Ok(if kv.version == 1 { MembershipEvent::Joined(member) } else { MembershipEvent::Updated(member) })
            }
            WatchEvent::Delete { key, .. } => {
                Ok(MembershipEvent::Left { worker_id: key[prefix.len().min(key.len())..].to_string() })
            }
        });
        Ok((members, Box::pin(stream)))
    }

    fn decode(&self, kv: &KeyValue) -> Result<Member, CoordinatorError> {
        let mut member: Member = serde_json::from_slice(&kv.value)
            .map_err(|e| CoordinatorError::CorruptRecord { key: kv.key.clone(), reason: e.to_string() })?;
        // The key is authoritative: it is what lease expiry deletes and what `Left` names.
        let prefix = self.cluster.members_prefix();
        if let Some(id) = kv.key.strip_prefix(&prefix) {
            member.worker_id = id.to_string();
        }
        Ok(member)
    }
}

impl Registration {
    /// The worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The lease its record is attached to now (it changes if the worker had to register again).
    pub fn lease(&self) -> LeaseId {
        *self.lease.borrow()
    }

    /// Stops keeping the lease alive, as if the worker had been killed: its record vanishes when the lease lapses.
    pub fn abandon(self) {
        self.task.abort();
    }

    /// Leaves the cluster now: revokes the lease, deleting the record.
    pub async fn deregister(self) -> Result<(), CoordinatorError> {
        self.task.abort();
        let lease = self.lease();
        match self.cluster.store().revoke_lease(lease).await {
            Ok(()) | Err(CoordinatorError::LeaseNotFound { .. }) => {
                tracing::info!(worker_id = %self.worker_id, "left cluster {}", self.cluster.cluster());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decode_hash(kv: &KeyValue) -> Result<String, CoordinatorError> {
    String::from_utf8(kv.value.clone()).map_err(|_| CoordinatorError::CorruptRecord {
        key: kv.key.clone(),
        reason: "the checkpoint hash is not UTF-8".into(),
    })
}

/// Grants a lease, checks the checkpoint and writes the member record in one transaction.
async fn join(cluster: &ClusterStore, member: &Member, ttl: Duration) -> Result<LeaseKeeper, CoordinatorError> {
    let store = Arc::clone(cluster.store());
    let keeper = LeaseKeeper::grant(Arc::clone(&store), ttl).await?;
    match write_member(cluster, member, keeper.lease()).await {
        Ok(()) => Ok(keeper),
        Err(e) => {
            // The record was not written; the lease is useless. If the revoke fails too, it lapses by itself.
            let _ = keeper.revoke().await;
            Err(e)
        }
    }
}

async fn write_member(cluster: &ClusterStore, member: &Member, lease: LeaseId) -> Result<(), CoordinatorError> {
    let store = cluster.store();
    let member_key = cluster.member_key(&member.worker_id)?;
    let checkpoint_key = cluster.checkpoint_key();
    let members_prefix = cluster.members_prefix();
    let value = serde_json::to_vec(member).map_err(|e| CoordinatorError::StoreRequest {
        op: "put",
        key: member_key.clone(),
        reason: e.to_string(),
    })?;
    let put_member = TxnOp::Put { key: member_key.clone(), value, lease: Some(lease) };
    let record_hash =
        TxnOp::Put { key: checkpoint_key.clone(), value: member.checkpoint_hash.clone().into(), lease: None };
    for _ in 0..JOIN_ATTEMPTS {
        let recorded = store.get(&checkpoint_key).await?;
        let (conditions, ops, switching_from) = match recorded {
            None => (
                vec![Condition::ModRevision { key: checkpoint_key.clone(), expected: None }],
                vec![record_hash.clone(), put_member.clone()],
                None,
            ),
            Some(kv) => {
                let cluster_hash = decode_hash(&kv)?;
                if cluster_hash == member.checkpoint_hash {
                    (
                        vec![Condition::ModRevision { key: checkpoint_key.clone(), expected: Some(kv.mod_revision) }],
                        vec![put_member.clone()],
                        None,
                    )
                } else {
                    let alive = store.list(&members_prefix).await?;
                    if !alive.kvs.is_empty() {
                        return Err(CoordinatorError::CheckpointMismatch {
                            cluster: cluster.cluster().to_string(),
                            worker_id: member.worker_id.clone(),
                            worker_hash: member.checkpoint_hash.clone(),
                            cluster_hash,
                        });
                    }
                    (
                        vec![
                            Condition::ModRevision { key: checkpoint_key.clone(), expected: Some(kv.mod_revision) },
                            Condition::PrefixEmpty { prefix: members_prefix.clone() },
                        ],
                        vec![record_hash.clone(), put_member.clone()],
                        Some(cluster_hash),
                    )
                }
            }
        };
        if store.txn(conditions, ops).await?.is_some() {
            if let Some(old) = switching_from {
                tracing::info!(
                    worker_id = %member.worker_id,
                    "cluster {} had no members: it now serves checkpoint {} (was {old})",
                    cluster.cluster(), member.checkpoint_hash
                );
            }
            return Ok(());
        }
        // The checkpoint record or the member set changed between the read and the write: read again.
    }
    Err(CoordinatorError::StoreUnavailable {
        op: "register",
        key: member_key,
        reason: format!("the checkpoint record kept changing over {JOIN_ATTEMPTS} attempts"),
    })
}

/// Waits for the lease to lapse while the worker is alive, then registers again (with retries).
async fn stay_registered(
    cluster: ClusterStore,
    member: Member,
    ttl: Duration,
    mut keeper: LeaseKeeper,
    lease: watch::Sender<LeaseId>,
) {
    loop {
        keeper.lost().await;
        tracing::warn!(
            worker_id = %member.worker_id,
            "the cluster dropped this worker (its lease lapsed, probably a partition or store outage); registering again"
        );
        let mut backoff = Backoff::new(Duration::from_millis(100), ttl.max(Duration::from_millis(100)));
        keeper = loop {
            match join(&cluster, &member, ttl).await {
                Ok(k) => {
                    tracing::info!(worker_id = %member.worker_id, lease = %k.lease(), "registered again");
                    let _ = lease.send(k.lease());
                    break k;
                }
                Err(e @ CoordinatorError::CheckpointMismatch { .. }) => {
                    tracing::error!(worker_id = %member.worker_id, "cannot register again: {e}");
                    return;
                }
                Err(e) => {
                    tracing::warn!(worker_id = %member.worker_id, "cannot register again yet: {e}");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_without_a_kv_dtype_still_read_and_none_is_not_written() {
        let old = r#"{"worker_id":"aw-1","role":"attention","endpoint":"http://10.0.0.1:9000","node":"n1",
            "device":"cpu","memory_budget_bytes":1024,"checkpoint_hash":"sha256:x"}"#;
        let member: Member = serde_json::from_str(old).expect("a record from before kv_dtype");
        assert_eq!(member.kv_dtype, None);
        assert!(!serde_json::to_string(&member).expect("json").contains("kv_dtype"));
        let bf16 = Member { kv_dtype: Some("bf16".into()), ..member };
        let back: Member = serde_json::from_str(&serde_json::to_string(&bf16).expect("json")).expect("read back");
        assert_eq!(back, bf16);
    }
}
