//! The store that holds all cluster state: a small key-value interface with etcd's semantics.
//!
//! [`Store`] is what the coordinator, workers and `switchyard up` share: keys and values with revisions,
//! compare-and-swap and small transactions (for placement epochs and checkpoint checks), leases (a key attached to a
//! lease disappears when its holder stops refreshing it), watches on a prefix, and leader election. Three
//! implementations: [`MemoryStore`] (one process, for `switchyard up` and tests), [`EtcdStore`] (a real etcd
//! cluster, reconnecting by itself) and [`RemoteStore`] (a store that a coordinator serves over gRPC with
//! [`StoreService`], usually its `MemoryStore`: how the processes of `switchyard up` share one). [`connect`] opens
//! whichever a URL names. [`cluster`] lays the cluster's state out in keys; `crate::membership` and
//! `crate::election` build on it.
//!
//! Revisions follow etcd: one counter for the whole store, bumped by every write; a key's `create_revision`,
//! `mod_revision` and `version` (writes since creation) come from it. A revision of 0 means "absent".
//!
//! The trait is object-safe (futures are boxed) so callers hold an `Arc<dyn Store>` and never care which one it is.

pub mod cluster;
pub mod connect;
pub mod etcd;
pub mod etcd_server;
pub mod memory;
pub mod remote;
pub mod service;
mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::Stream;

use crate::CoordinatorError;

pub use cluster::{ClusterStore, CoordinatorStatus, LoadStats, PublishOutcome, RebalanceRequest, StoredPlacement};
pub use connect::{connect, connect_within, CONNECT_PATIENCE};
pub use etcd::{EtcdConfig, EtcdStore};
pub use etcd_server::EtcdServer;
pub use memory::MemoryStore;
pub use remote::RemoteStore;
pub use service::StoreService;

/// A boxed, sendable future: what [`Store`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A boxed, sendable stream that owns everything it needs.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = T> + Send + 'static>>;

/// Events under a watched prefix, in revision order. An error item ends the stream.
pub type WatchStream = BoxStream<Result<WatchEvent, CoordinatorError>>;

/// A lease: keys attached to it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key, its value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The store revision that created the key.
    pub create_revision: u64,
    /// The store revision of its last write.
    pub mod_revision: u64,
    /// Writes since it was created (1 for a new key).
    pub version: u64,
    /// The lease it is attached to.
    pub lease: Option<LeaseId>,
}

/// The keys under a prefix, read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The keys, sorted.
    pub kvs: Vec<KeyValue>,
    /// The store revision the listing reflects: watch from `revision + 1` to see every later change.
    pub revision: u64,
}

/// One change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or written.
    Put(KeyValue),
    /// A key was deleted (explicitly, or because its lease lapsed).
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: u64,
    },
}

impl WatchEvent {
    /// The key it is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// What a compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key was written at this revision.
    Swapped {
        /// The store revision of the write.
        revision: u64,
    },
    /// The key was not as expected; nothing was written.
    Conflict {
        /// The key as it is now (`None`: absent).
        current: Option<KeyValue>,
    },
}

/// A condition of a [`Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key's `mod_revision` is this one (`None`: the key is absent).
    ModRevision {
        /// The key.
        key: String,
        /// The expected revision.
        expected: Option<u64>,
    },
    /// No key starts with this prefix.
    PrefixEmpty {
        /// The prefix.
        prefix: String,
    },
}

/// A write of a [`Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Writes a key, attached to a lease or not.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach it to.
        lease: Option<LeaseId>,
    },
    /// Deletes a key.
    Delete {
        /// The key.
        key: String,
    },
}

/// The leader's key in an election: what [`Store::campaign`] returns and [`Store::resign`] takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The election's name (a key prefix).
    pub election: String,
    /// The candidate's key: `<election>/<lease in hex>`.
    pub key: String,
    /// The revision that created the candidate's key; candidates lead in this order.
    pub create_revision: u64,
    /// The lease the candidacy is attached to.
    pub lease: LeaseId,
}

/// Key-value store with revisions, leases, watches and leader election (etcd's model).
///
/// Every method may fail with [`CoordinatorError::StoreUnavailable`] (retryable) when the store cannot be reached.
pub trait Store: Send + Sync + 'static {
    /// What this store is, for logs and errors (`memory`, `etcd at http://...`).
    fn describe(&self) -> String;

    /// Reads one key.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>>;

    /// Reads every key that starts with `prefix`, sorted by key.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, CoordinatorError>>;

    /// Writes a key (attached to `lease` if given, detached from any earlier lease); returns the write's revision.
    /// Fails with [`CoordinatorError::LeaseNotFound`] if the lease is gone.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<u64, CoordinatorError>>;

    /// Deletes a key; says whether it existed.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, CoordinatorError>>;

    /// Deletes every key that starts with `prefix`; returns how many there were.
    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, CoordinatorError>>;

    /// Writes `key` only if its `mod_revision` is `expected` (`None`: only if it is absent).
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<CasOutcome, CoordinatorError>>;

    /// Applies every op at one revision if every condition holds; returns that revision, or `None` (nothing
    /// written) if a condition failed.
    fn txn<'a>(
        &'a self,
        conditions: Vec<Condition>,
        ops: Vec<TxnOp>,
    ) -> BoxFuture<'a, Result<Option<u64>, CoordinatorError>>;

    /// Grants a lease that expires `ttl` after its last refresh. etcd counts whole seconds: it rounds `ttl` up,
    /// to at least 1 s.
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, CoordinatorError>>;

    /// Refreshes a lease once: it now expires a TTL from now. [`CoordinatorError::LeaseNotFound`] if it already
    /// lapsed.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>>;

    /// Revokes a lease, deleting every key attached to it.
    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>>;

    /// Watches every key starting with `prefix`, from revision `from` (`None`: changes after the watch starts).
    /// The returned future resolves once the watch is in place, so nothing written after it resolves is missed.
    /// [`CoordinatorError::WatchLost`] if `from` is older than the history the store keeps.
    fn watch<'a>(&'a self, prefix: &'a str, from: Option<u64>) -> BoxFuture<'a, Result<WatchStream, CoordinatorError>>;

    /// Enters the election `election` as a candidate with `value`, its key attached to `lease`, and resolves once
    /// it leads (every candidate that entered earlier resigned or lost its lease). Campaigning again with the same
    /// lease keeps the candidate's place.
    fn campaign<'a>(
        &'a self,
        election: &'a str,
        lease: LeaseId,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<LeaderKey, CoordinatorError>>;

    /// The leader's key and value, if the election has one.
    fn leader<'a>(&'a self, election: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>>;

    /// Withdraws a candidacy (leading or not); the next candidate leads.
    fn resign<'a>(&'a self, leader: &'a LeaderKey) -> BoxFuture<'a, Result<(), CoordinatorError>>;
}

/// The key of a candidate in an election, as etcd's election service names it.
pub(crate) fn candidate_key(election: &str, lease: LeaseId) -> String {
    format!("{election}/{lease}")
}

/// Keeps a lease alive from a background task until stopped, and says when the lease is lost.
///
/// It refreshes every third of the TTL; while the store is unreachable it keeps trying (and logs), so a lease
/// survives an etcd restart shorter than its TTL. Dropping the keeper stops the refreshes without revoking: the
/// lease then lapses after its TTL, which is what happens when the process dies.
pub struct LeaseKeeper {
    store: Arc<dyn Store>,
    lease: LeaseId,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` and starts keeping it alive.
    pub async fn grant(store: Arc<dyn Store>, ttl: Duration) -> Result<Self, CoordinatorError> {
        let lease = store.grant_lease(ttl).await?;
        Ok(Self::spawn(store, lease, ttl))
    }

    /// Starts keeping an existing lease of `ttl` alive.
    pub fn spawn(store: Arc<dyn Store>, lease: LeaseId, ttl: Duration) -> Self {
        let (lost_tx, lost) = watch::channel(false);
        let task = tokio::spawn(keep_lease_alive(Arc::clone(&store), lease, ttl, lost_tx));
        Self { store, lease, ttl, lost, task }
    }

    /// The lease.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The TTL it was granted with.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the store said the lease is gone (expired or revoked).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the store says the lease is gone.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means the task ended without the lease being lost (it was stopped): then never resolve.
        if lost.wait_for(|&l| l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Stops refreshing without revoking: the lease lapses after its TTL, as if this process had died.
    pub fn abandon(self) {
        self.task.abort();
    }

    /// Stops refreshing and revokes the lease, deleting its keys now.
    pub async fn revoke(self) -> Result<(), CoordinatorError> {
        self.task.abort();
        match self.store.revoke_lease(self.lease).await {
            Ok(()) | Err(CoordinatorError::LeaseNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_lease_alive(store: Arc<dyn Store>, lease: LeaseId, ttl: Duration, lost: watch::Sender<bool>) {
    let period = (ttl / 3).max(Duration::from_millis(10));
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        match store.keep_alive(lease).await {
            Ok(()) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(lease = %lease, store = %store.describe(), "lease refreshed again after {:.1} s of failures", since.elapsed().as_secs_f64());
                }
                tokio::time::sleep(period).await;
            }
            Err(CoordinatorError::LeaseNotFound { .. }) => {
                tracing::warn!(lease = %lease, store = %store.describe(), "lease lapsed: its keys are gone");
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                if failing_since.is_none() {
                    failing_since = Some(tokio::time::Instant::now());
                    tracing::warn!(lease = %lease, store = %store.describe(), error = %e, "cannot refresh lease; retrying");
                }
                // Retry faster than the refresh period: the lease has at most a TTL left, and the store may come
                // back any moment.
                tokio::time::sleep((period / 4).max(Duration::from_millis(10))).await;
            }
        }
    }
}

/// Retry delays that double from `initial` up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self { next: initial, max }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// Checks a name that becomes one segment of a store key.
pub(crate) fn check_name(field: &'static str, value: &str) -> Result<(), CoordinatorError> {
    let reason = if value.is_empty() {
        "it is empty"
    } else if value.contains('/') {
        "it contains '/', which separates store keys"
    } else if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        "it contains whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(CoordinatorError::InvalidName { field, value: value.to_string(), reason })
}
