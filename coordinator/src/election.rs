//! Leader election among coordinators: one leads, the others wait and take over when it goes away.
//!
//! A candidate campaigns with a lease that a background task keeps alive. Candidates lead in the order they entered
//! (etcd's election rule), so when the leader resigns, or is killed and its lease lapses, the next candidate leads
//! within about one lease period. The candidate's id is the value of its key, so anyone can ask who leads.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::store::{Backoff, BoxStream, ClusterStore, KeyValue, LeaderKey, LeaseKeeper, Store};
use crate::CoordinatorError;

/// One election of a cluster (`/switchyard/<cluster>/election/<name>`).
#[derive(Clone)]
pub struct Election {
    store: Arc<dyn Store>,
    name: String,
    ttl: Duration,
}

/// This process leads the election. Keep it: dropping it stops refreshing the lease, and another candidate leads
/// once the lease lapses.
#[must_use = "dropping a Leadership gives up the lead once its lease lapses"]
pub struct Leadership {
    store: Arc<dyn Store>,
    candidate_id: String,
    key: LeaderKey,
    keeper: LeaseKeeper,
}

impl Election {
    /// The election `name` of `cluster`; candidates hold leases of `ttl` (etcd rounds up to whole seconds).
    pub fn new(cluster: &ClusterStore, name: &str, ttl: Duration) -> Result<Self, CoordinatorError> {
        Ok(Self { store: Arc::clone(cluster.store()), name: cluster.election_name(name)?, ttl })
    }

    /// The election's key prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Campaigns as `candidate_id` and resolves once it leads. While the store is unavailable it keeps trying; if
    /// its lease lapses while it waits, it campaigns again with a new one (at the back of the queue). Dropping the
    /// future withdraws the candidacy: at once on etcd, when its lease lapses in a [`crate::store::MemoryStore`].
    pub async fn campaign(&self, candidate_id: &str) -> Result<Leadership, CoordinatorError> {
        let mut keeper = LeaseKeeper::grant(Arc::clone(&self.store), self.ttl).await?;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let campaign = self.store.campaign(&self.name, keeper.lease(), candidate_id.as_bytes().to_vec());
            let outcome = tokio::select! {
                outcome = campaign => Some(outcome),
                _ = keeper.lost() => None,
            };
            match outcome {
                Some(Ok(key)) => {
                    tracing::info!(candidate = candidate_id, election = %self.name, lease = %key.lease, "leading");
                    return Ok(Leadership {
                        store: Arc::clone(&self.store),
                        candidate_id: candidate_id.to_string(),
                        key,
                        keeper,
                    });
                }
                Some(Err(e)) if e.retryable() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(candidate = candidate_id, election = %self.name, "campaign interrupted ({e}); retrying in {} ms", delay.as_millis());
                    tokio::time::sleep(delay).await;
                }
                Some(Err(CoordinatorError::LeaseNotFound { .. })) | None => {
                    tracing::warn!(candidate = candidate_id, election = %self.name, "candidate's lease lapsed while waiting; campaigning with a new one");
                    keeper = LeaseKeeper::grant(Arc::clone(&self.store), self.ttl).await?;
                }
                Some(Err(e)) => {
                    let _ = keeper.revoke().await;
                    return Err(e);
                }
            }
        }
    }

    /// The id of the candidate that leads now, if any.
    pub async fn leader(&self) -> Result<Option<String>, CoordinatorError> {
        self.store.leader(&self.name).await?.map(|kv| candidate_id(&kv)).transpose()
    }

    /// The leader now, then each change of leader (`None`: nobody leads).
    pub async fn observe(&self) -> Result<BoxStream<Result<Option<String>, CoordinatorError>>, CoordinatorError> {
        let prefix = format!("{}/", self.name);
        let listing = self.store.list(&prefix).await?;
        let mut events = self.store.watch(&prefix, Some(listing.revision + 1)).await?;
        let mut leader = listing.kvs.iter().min_by_key(|kv| kv.create_revision).map(candidate_id).transpose()?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            if tx.send(Ok(leader.clone())).await.is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    event = events.next() => event,
                };
                let now = match event {
                    Some(Ok(_)) => this.leader().await,
                    Some(Err(e)) => Err(e),
                    None => return,
                };
                match now {
                    Ok(now) if now == leader => {}
                    Ok(now) => {
                        leader = now;
                        if tx.send(Ok(leader.clone())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

impl Leadership {
    /// The id this process campaigned with.
    pub fn candidate_id(&self) -> &str {
        &self.candidate_id
    }

    /// The leader's key in the store.
    pub fn leader_key(&self) -> &LeaderKey {
        &self.key
    }

    /// Whether the lease lapsed (another candidate may lead now).
    pub fn is_lost(&self) -> bool {
        self.keeper.is_lost()
    }

    /// Resolves when the lease lapses: from then on this process must stop acting as leader.
    pub async fn lost(&self) {
        self.keeper.lost().await
    }

    /// Steps down: the next candidate leads now.
    pub async fn resign(self) -> Result<(), CoordinatorError> {
        let Leadership { store, candidate_id, key, keeper } = self;
        store.resign(&key).await?;
        keeper.revoke().await?;
        tracing::info!(candidate = %candidate_id, election = %key.election, "resigned");
        Ok(())
    }

    /// Stops refreshing the lease without resigning, as if the process had been killed: another candidate leads
    /// once the lease lapses.
    pub fn abandon(self) {
        self.keeper.abandon();
    }
}

fn candidate_id(kv: &KeyValue) -> Result<String, CoordinatorError> {
    String::from_utf8(kv.value.clone()).map_err(|_| CoordinatorError::CorruptRecord {
        key: kv.key.clone(),
        reason: "the candidate id is not UTF-8".into(),
    })
}
