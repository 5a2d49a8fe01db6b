//! The coordinator's errors.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the coordinator crate.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The requested placement cannot be built.
    #[error("cannot place experts: {reason}")]
    Placement {
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// A placement file could not be read or parsed.
    #[error("placement file {}: {reason}", path.display())]
    PlacementFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No etcd endpoint answered before the connect deadline.
    #[error(
        "etcd is unreachable at {endpoints}: gave up after {attempts} attempts over {:.1} s (last error: {last_error}); \
         is etcd running there and are the endpoints right?",
        waited.as_secs_f64()
    )]
    StoreUnreachable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// Connection attempts made.
        attempts: u32,
        /// How long it kept trying.
        waited: Duration,
        /// The error of the last attempt.
        last_error: String,
    },
    /// The store did not answer (etcd down, restarting or without a leader, or a timeout); the call may be retried.
    #[error("store unavailable during {op} {key:?}: {reason}")]
    StoreUnavailable {
        /// The operation (`get`, `put`, `watch`, ...).
        op: &'static str,
        /// The key, prefix or lease it was about.
        key: String,
        /// What the store or the connection said.
        reason: String,
    },
    /// The store refused the request.
    #[error("store refused {op} {key:?}: {reason}")]
    StoreRequest {
        /// The operation.
        op: &'static str,
        /// The key, prefix or lease it was about.
        key: String,
        /// What the store said.
        reason: String,
    },
    /// The lease expired or was revoked: whatever was attached to it is gone.
    #[error("lease {lease:x} not found: it expired or was revoked")]
    LeaseNotFound {
        /// The lease id.
        lease: i64,
    },
    /// A watch cannot deliver every event since the revision asked for (history compacted, or the watcher fell
    /// behind); the watcher must re-read the state and watch again.
    #[error("watch on {prefix:?} lost events: {reason}")]
    WatchLost {
        /// The watched prefix.
        prefix: String,
        /// Why.
        reason: String,
    },
    /// A value in the store is not what Switchyard wrote there.
    #[error("corrupt record at {key:?}: {reason}")]
    CorruptRecord {
        /// The key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// A name used in store keys is empty or contains a character that would break the key layout.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidName {
        /// Which name (`cluster`, `worker_id`, ...).
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A local etcd (the test and `switchyard up` harness) could not be started.
    #[error("cannot run a local etcd: {reason}")]
    LocalEtcd {
        /// What went wrong, with etcd's log where there is one.
        reason: String,
    },
    /// A worker serves a different checkpoint than the cluster.
    #[error(
        "worker {worker_id} serves checkpoint {worker_hash} but cluster {cluster} serves checkpoint {cluster_hash}: \
         every worker of a cluster must load the same checkpoint"
    )]
    CheckpointMismatch {
        /// The cluster.
        cluster: String,
        /// The refused worker.
        worker_id: String,
        /// The hash of the checkpoint it loaded.
        worker_hash: String,
        /// The hash recorded for the cluster.
        cluster_hash: String,
    },
    /// A sequence's KV does not fit the attention workers' room even spread over all of them.
    #[error(
        "a context of {tokens} positions does not fit the cluster's KV: its {workers} attention workers have room \
         for {cluster_tokens} positions of global-layer KV"
    )]
    ContextTooLong {
        /// Positions the sequence needs.
        tokens: usize,
        /// Positions the attention workers can hold together.
        cluster_tokens: usize,
        /// Attention workers counted.
        workers: usize,
    },
}

impl CoordinatorError {
    /// Whether retrying the same call may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            CoordinatorError::StoreUnavailable { .. } => true,
            CoordinatorError::Placement { .. }
            | CoordinatorError::PlacementFile { .. }
            | CoordinatorError::StoreUnreachable { .. }
            | CoordinatorError::StoreRequest { .. }
            | CoordinatorError::LeaseNotFound { .. }
            | CoordinatorError::WatchLost { .. }
            | CoordinatorError::ContextTooLong { .. }
            | CoordinatorError::CorruptRecord { .. }
            | CoordinatorError::InvalidName { .. }
            | CoordinatorError::LocalEtcd { .. }
            | CoordinatorError::CheckpointMismatch { .. } => false,
        }
    }
}
