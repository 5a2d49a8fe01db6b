//! [`MemoryStore`]: the store inside one process, for `switchyard up` and tests.
//!
//! It behaves like a single etcd member: one revision counter, leases that expire on a tokio timer (deleting their
//! keys at one revision, as etcd does), watches fed from a broadcast channel with a bounded history so a watcher can
//! start from a past revision, and etcd's election rule (candidates lead in the order their keys were created).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    candidate_key, BoxFuture, CasOutcome, Condition, KeyValue, LeaderKey, LeaseId, Listing, Store, TxnOp, WatchEvent,
    WatchStream,
};
use crate::CoordinatorError;

/// Events kept for watchers that start from a past revision.
const DEFAULT_HISTORY: usize = 10_000;
/// Events a slow watcher may fall behind before its watch fails with `WatchLost`.
const BROADCAST_CAPACITY: usize = 4096;

/// A [`Store`] in this process's memory.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
}

struct Entry {
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct State {
    revision: u64,
    kvs: BTreeMap<String, Entry>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// Every event of revision `history_floor` or later is in `history`.
    history_floor: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store at revision 1 (as a fresh etcd).
    pub fn new() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }

    /// An empty store that keeps the last `events` events for watchers starting in the past.
    pub fn with_history(events: usize) -> Self {
        let (events_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    revision: 1,
                    kvs: BTreeMap::new(),
                    leases: HashMap::new(),
                    next_lease: 1,
                    history: VecDeque::new(),
                    history_limit: events.max(1),
                    history_floor: 1,
                }),
                events: events_tx,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }
}

/// A poisoned lock only means a panic elsewhere mid-update; every update below leaves the state consistent before
/// anything can panic, so carrying on is sound.
fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    fn kv(&self, key: &str) -> Option<KeyValue> {
        self.kvs.get(key).map(|e| KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            lease: e.lease,
        })
    }

    fn prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Entry)> + 'a {
        self.kvs.range(prefix.to_string()..).take_while(move |(k, _)| k.starts_with(prefix))
    }

    fn holds(&self, condition: &Condition) -> bool {
        match condition {
            Condition::ModRevision { key, expected } => self.kvs.get(key).map(|e| e.mod_revision) == *expected,
            Condition::PrefixEmpty { prefix } => self.prefix(prefix).next().is_none(),
        }
    }

    /// Applies `ops` at one new revision (none if nothing changes) and publishes their events.
    fn apply(&mut self, ops: Vec<TxnOp>, events: &broadcast::Sender<WatchEvent>) -> Result<u64, CoordinatorError> {
        let mut seen = BTreeSet::new();
        for op in &ops {
            let key = match op {
                TxnOp::Put { key, lease, .. } => {
                    if let Some(lease) = lease {
                        if !self.leases.contains_key(&lease.0) {
                            return Err(CoordinatorError::LeaseNotFound { lease: lease.0 });
                        }
                    }
                    key
                }
                TxnOp::Delete { key } => key,
            };
            if !seen.insert(key.clone()) {
                return Err(CoordinatorError::StoreRequest {
                    op: "txn",
                    key: key.clone(),
                    reason: "the same key is written twice in one transaction".into(),
                });
            }
        }
        let changes = ops.iter().any(|op| match op {
            TxnOp::Put { .. } => true,
            TxnOp::Delete { key } => self.kvs.contains_key(key),
        });
        if !changes {
            return Ok(self.revision);
        }
        self.revision += 1;
        let revision = self.revision;
        let mut published = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let old = self.kvs.remove(&key);
                    if let Some(old_lease) = old.as_ref().and_then(|e| e.lease) {
                        if let Some(l) = self.leases.get_mut(&old_lease.0) {
                            l.keys.remove(&key);
                        }
                    }
                    if let Some(lease) = lease {
                        if let Some(l) = self.leases.get_mut(&lease.0) {
                            l.keys.insert(key.clone());
                        }
                    }
                    let entry = Entry {
                        value,
                        create_revision: old.as_ref().map_or(revision, |e| e.create_revision),
                        mod_revision: revision,
                        version: old.as_ref().map_or(1, |e| e.version + 1),
                        lease,
                    };
                    self.kvs.insert(key.clone(), entry);
                    if let Some(kv) = self.kv(&key) {
                        published.push(WatchEvent::Put(kv));
                    }
                }
                TxnOp::Delete { key } => {
                    if let Some(old) = self.kvs.remove(&key) {
                        if let Some(l) = old.lease.and_then(|lease| self.leases.get_mut(&lease.0)) {
                            l.keys.remove(&key);
                        }
                        published.push(WatchEvent::Delete { key, revision });
                    }
                }
            }
        }
        for event in published {
            self.history.push_back(event.clone());
            while self.history.len() > self.history_limit {
                if let Some(dropped) = self.history.pop_front() {
                    self.history_floor = dropped.revision() + 1;
                }
            }
            // No receiver is not an error: nobody is watching.
            let _ = events.send(event);
        }
        Ok(revision)
    }

    fn revoke(&mut self, lease: LeaseId, events: &broadcast::Sender<WatchEvent>) -> Result<(), CoordinatorError> {
        let Some(l) = self.leases.remove(&lease.0) else {
            return Err(CoordinatorError::LeaseNotFound { lease: lease.0 });
        };
        let ops = l.keys.into_iter().map(|key| TxnOp::Delete { key }).collect();
        self.apply(ops, events).map(|_| ())
    }

    fn leader(&self, election: &str) -> Option<KeyValue> {
        let prefix = format!("{election}/");
        let (key, _) = self.prefix(&prefix).min_by_key(|(_, e)| e.create_revision)?;
        self.kv(key)
    }
}

/// Expires `lease` once its deadline passes without a refresh.
async fn expire_lease(inner: Weak<Inner>, lease: LeaseId) {
    loop {
        let deadline = {
            let Some(inner) = inner.upgrade() else { return };
            let state = lock(&inner);
            match state.leases.get(&lease.0) {
                Some(l) => l.deadline,
                None => return,
            }
        };
        tokio::time::sleep_until(deadline).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut state = lock(&inner);
        match state.leases.get(&lease.0) {
            None => return,
            Some(l) if l.deadline <= Instant::now() => {
                tracing::debug!(lease = %lease, keys = l.keys.len(), "lease expired");
                let _ = state.revoke(lease, &inner.events);
                return;
            }
            Some(_) => {}
        }
    }
}

impl Store for MemoryStore {
    fn describe(&self) -> String {
        "memory store".to_string()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>> {
        Box::pin(async move { Ok(self.state().kv(key)) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, CoordinatorError>> {
        Box::pin(async move {
            let state = self.state();
            let kvs = state.prefix(prefix).filter_map(|(k, _)| state.kv(k)).collect();
            Ok(Listing { kvs, revision: state.revision })
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<u64, CoordinatorError>> {
        Box::pin(async move {
            self.state().apply(vec![TxnOp::Put { key: key.to_string(), value, lease }], &self.inner.events)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, CoordinatorError>> {
        Box::pin(async move {
            let mut state = self.state();
            let existed = state.kvs.contains_key(key);
            state.apply(vec![TxnOp::Delete { key: key.to_string() }], &self.inner.events)?;
            Ok(existed)
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, CoordinatorError>> {
        Box::pin(async move {
            let mut state = self.state();
            let ops: Vec<TxnOp> = state.prefix(prefix).map(|(k, _)| TxnOp::Delete { key: k.clone() }).collect();
            let count = ops.len() as u64;
            state.apply(ops, &self.inner.events)?;
            Ok(count)
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
            let mut state = self.state();
            if !state.holds(&Condition::ModRevision { key: key.to_string(), expected }) {
                return Ok(CasOutcome::Conflict { current: state.kv(key) });
            }
            let revision = state.apply(vec![TxnOp::Put { key: key.to_string(), value, lease }], &self.inner.events)?;
            Ok(CasOutcome::Swapped { revision })
        })
    }

    fn txn<'a>(
        &'a self,
        conditions: Vec<Condition>,
        ops: Vec<TxnOp>,
    ) -> BoxFuture<'a, Result<Option<u64>, CoordinatorError>> {
        Box::pin(async move {
            let mut state = self.state();
            if !conditions.iter().all(|c| state.holds(c)) {
                return Ok(None);
            }
            state.apply(ops, &self.inner.events).map(Some)
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, CoordinatorError>> {
        Box::pin(async move {
            if ttl.is_zero() {
                return Err(CoordinatorError::StoreRequest {
                    op: "grant_lease",
                    key: String::new(),
                    reason: "a lease needs a TTL above zero".into(),
                });
            }
            let lease = {
                let mut state = self.state();
                let lease = LeaseId(state.next_lease);
                state.next_lease += 1;
                state.leases.insert(lease.0, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
                lease
            };
            tokio::spawn(expire_lease(Arc::downgrade(&self.inner), lease));
            Ok(lease)
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>> {
        Box::pin(async move {
            let mut state = self.state();
            let l = state.leases.get_mut(&lease.0).ok_or(CoordinatorError::LeaseNotFound { lease: lease.0 })?;
            l.deadline = Instant::now() + l.ttl;
            Ok(())
        })
    }

    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>> {
        Box::pin(async move { self.state().revoke(lease, &self.inner.events) })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Option<u64>) -> BoxFuture<'a, Result<WatchStream, CoordinatorError>> {
        Box::pin(async move {
            // Replay and subscription happen under the lock, so no event falls between them.
            let (replay, mut live, from) = {
                let state = self.state();
                let from = from.unwrap_or(state.revision + 1);
                if from < state.history_floor {
                    return Err(CoordinatorError::WatchLost {
                        prefix: prefix.to_string(),
                        reason: format!(
                            "revision {from} is older than the history kept (from revision {})",
                            state.history_floor
                        ),
                    });
                }
                let replay: Vec<WatchEvent> = state
                    .history
                    .iter()
                    .filter(|e| e.revision() >= from && e.key().starts_with(prefix))
                    .cloned()
                    .collect();
                (replay, self.inner.events.subscribe(), from)
            };
            let (tx, rx) = mpsc::channel(1024);
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                for event in replay {
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                loop {
                    let event = tokio::select! {
                        _ = tx.closed() => return,
                        event = live.recv() => event,
                    };
                    match event {
                        Ok(event) if event.revision() >= from && event.key().starts_with(&prefix) => {
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let reason = format!("the watcher fell {missed} events behind");
                            let _ = tx.send(Err(CoordinatorError::WatchLost { prefix, reason })).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            Ok(Box::pin(ReceiverStream::new(rx)) as WatchStream)
        })
    }

    fn campaign<'a>(
        &'a self,
        election: &'a str,
        lease: LeaseId,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<LeaderKey, CoordinatorError>> {
        Box::pin(async move {
            let key = candidate_key(election, lease);
            let prefix = format!("{election}/");
            let create_revision = {
                let mut state = self.state();
                let existing = state.kvs.get(&key).map(|e| (e.create_revision, e.value == value));
                match existing {
                    Some((create_revision, true)) => create_revision,
                    // Same lease, new value: keep the place in the queue, as etcd's election does (it proclaims).
                    Some((create_revision, false)) => {
                        state.apply(
                            vec![TxnOp::Put { key: key.clone(), value, lease: Some(lease) }],
                            &self.inner.events,
                        )?;
                        create_revision
                    }
                    None => state
                        .apply(vec![TxnOp::Put { key: key.clone(), value, lease: Some(lease) }], &self.inner.events)?,
                }
            };
            loop {
                let mut events = {
                    let state = self.state();
                    match state.kvs.get(&key) {
                        Some(e) if e.create_revision == create_revision => {}
                        _ if !state.leases.contains_key(&lease.0) => {
                            return Err(CoordinatorError::LeaseNotFound { lease: lease.0 });
                        }
                        _ => {
                            return Err(CoordinatorError::StoreRequest {
                                op: "campaign",
                                key,
                                reason: "the candidate resigned while waiting to lead".into(),
                            });
                        }
                    }
                    let earlier = state.prefix(&prefix).any(|(_, e)| e.create_revision < create_revision);
                    if !earlier {
                        return Ok(LeaderKey { election: election.to_string(), key, create_revision, lease });
                    }
                    self.inner.events.subscribe()
                };
                // Any deletion in the election may make this candidate the leader (or end its candidacy).
                loop {
                    match events.recv().await {
                        Ok(WatchEvent::Delete { key, .. }) if key.starts_with(&prefix) => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            return Err(CoordinatorError::StoreUnavailable {
                                op: "campaign",
                                key,
                                reason: "the memory store was dropped".into(),
                            });
                        }
                    }
                }
            }
        })
    }

    fn leader<'a>(&'a self, election: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>> {
        Box::pin(async move { Ok(self.state().leader(election)) })
    }

    fn resign<'a>(&'a self, leader: &'a LeaderKey) -> BoxFuture<'a, Result<(), CoordinatorError>> {
        Box::pin(async move {
            let mut state = self.state();
            let ours = state.kvs.get(&leader.key).is_some_and(|e| e.create_revision == leader.create_revision);
            if ours {
                state.apply(vec![TxnOp::Delete { key: leader.key.clone() }], &self.inner.events)?;
            }
            Ok(())
        })
    }
}
