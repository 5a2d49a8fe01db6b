//! Where a cluster's state lives in the store, and typed access to the placement and the load statistics.
//!
//! Every key of cluster `C` starts with `/switchyard/C/`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `members/<worker_id>` | JSON `crate::membership::Member` | the worker's |
//! | `checkpoint` | hash of the checkpoint the cluster serves | none |
//! | `placement/current` | JSON [`Placement`]; written by compare-and-swap, epochs only increase | none |
//! | `load/<attention_worker_id>` | JSON [`LoadStats`]: per-layer moving average of routed tokens per expert | optional |
//! | `adopted/<attention_worker_id>` | the placement epoch the attention worker routes with, no older step in flight | the worker's |
//! | `rebalance/request` | JSON [`RebalanceRequest`]: an operator asks the leading coordinator to re-place now | none |
//! | `coordinator/status` | JSON [`CoordinatorStatus`]: what the leading coordinator is doing or waiting for | none |
//! | `election/<name>/<lease>` | candidate id (etcd's election layout) | the candidate's |

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;

use super::{check_name, BoxStream, CasOutcome, KeyValue, LeaseId, Store, WatchEvent};
use crate::{CoordinatorError, Placement};

/// One cluster's view of a [`Store`]: its key layout and typed reads and writes.
#[derive(Clone)]
pub struct ClusterStore {
    store: Arc<dyn Store>,
    cluster: String,
    root: String,
}

/// The placement as stored, with the revision to compare against when replacing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPlacement {
    /// The placement.
    pub placement: Placement,
    /// The store revision that wrote it.
    pub revision: u64,
}

/// What [`ClusterStore::publish_placement`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The new placement is current.
    Published {
        /// The store revision that wrote it.
        revision: u64,
    },
    /// Someone else replaced the placement since it was read; nothing was written.
    Superseded {
        /// The placement now current.
        current: Option<StoredPlacement>,
    },
}

/// Routed-token counts per MoE layer and expert, as an exponential moving average over reporting windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadStats {
    /// Weight of the newest window (in (0, 1]; 1 keeps only the last window).
    pub alpha: f64,
    /// Windows folded in so far.
    pub windows: u64,
    /// Per MoE layer (decoder layer index): the average tokens routed to each expert per window.
    pub layers: BTreeMap<u32, Vec<f64>>,
}

impl LoadStats {
    /// Empty statistics giving the newest window weight `alpha` (clamped into (0, 1]).
    pub fn new(alpha: f64) -> Self {
        let alpha = if alpha.is_finite() { alpha.clamp(f64::MIN_POSITIVE, 1.0) } else { 1.0 };
        Self { alpha, windows: 0, layers: BTreeMap::new() }
    }

    /// Folds in one window's routed-token counts (layer -> tokens per expert). A layer seen for the first time, or
    /// with a different expert count than before, starts from this window's counts.
    pub fn record(&mut self, window: &BTreeMap<u32, Vec<u64>>) {
        for (&layer, counts) in window {
            let average = self.layers.entry(layer).or_default();
            if average.len() == counts.len() {
                for (a, &c) in average.iter_mut().zip(counts) {
                    *a = self.alpha * c as f64 + (1.0 - self.alpha) * *a;
                }
            } else {
                *average = counts.iter().map(|&c| c as f64).collect();
            }
        }
        self.windows += 1;
    }
}

/// An operator's request to re-place the experts now (`switchyard placement rebalance`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceRequest {
    /// Loads to place for (per MoE layer: tokens per expert) instead of the measured ones, e.g. a recorded profile.
    #[serde(default)]
    pub loads: Option<BTreeMap<u32, Vec<f64>>>,
    /// Who asked and why, for the log.
    #[serde(default)]
    pub reason: String,
}

/// What the leading coordinator reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// The candidate id of the coordinator that leads.
    pub leader: String,
    /// The placement epoch it last published (0: none yet).
    pub epoch: u64,
    /// `waiting` (for workers), `placing`, `serving`, or `unplaceable`.
    pub state: String,
    /// Why it is not serving, when it is not (e.g. how much expert memory is missing).
    #[serde(default)]
    pub problem: Option<String>,
}

impl ClusterStore {
    /// The state of cluster `cluster` in `store`.
    pub fn new(store: Arc<dyn Store>, cluster: &str) -> Result<Self, CoordinatorError> {
        check_name("cluster", cluster)?;
        Ok(Self { store, cluster: cluster.to_string(), root: format!("/switchyard/{cluster}/") })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The prefix of every key of this cluster (`/switchyard/<cluster>/`).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The prefix of member keys.
    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.root)
    }

    /// The key of one member.
    pub fn member_key(&self, worker_id: &str) -> Result<String, CoordinatorError> {
        check_name("worker_id", worker_id)?;
        Ok(format!("{}{worker_id}", self.members_prefix()))
    }

    /// The key recording the hash of the checkpoint the cluster serves.
    pub fn checkpoint_key(&self) -> String {
        format!("{}checkpoint", self.root)
    }

    /// The key of the current placement.
    pub fn placement_key(&self) -> String {
        format!("{}placement/current", self.root)
    }

    /// The prefix of load statistics.
    pub fn load_prefix(&self) -> String {
        format!("{}load/", self.root)
    }

    /// The prefix of the epochs attention workers adopted.
    pub fn adopted_prefix(&self) -> String {
        format!("{}adopted/", self.root)
    }

    /// The key of an operator's rebalance request.
    pub fn rebalance_request_key(&self) -> String {
        format!("{}rebalance/request", self.root)
    }

    /// The key of the leading coordinator's status.
    pub fn coordinator_status_key(&self) -> String {
        format!("{}coordinator/status", self.root)
    }

    /// The name (key prefix) of an election of this cluster.
    pub fn election_name(&self, name: &str) -> Result<String, CoordinatorError> {
        check_name("election", name)?;
        Ok(format!("{}election/{name}", self.root))
    }

    /// The current placement, if one was published.
    pub async fn placement(&self) -> Result<Option<StoredPlacement>, CoordinatorError> {
        self.store.get(&self.placement_key()).await?.map(|kv| decode_placement(&kv)).transpose()
    }

    /// Makes `next` the current placement if `current` (as read) still is; `next.epoch` must be above its epoch.
    pub async fn publish_placement(
        &self,
        next: &Placement,
        current: Option<&StoredPlacement>,
    ) -> Result<PublishOutcome, CoordinatorError> {
        if let Some(current) = current {
            if next.epoch <= current.placement.epoch {
                return Err(CoordinatorError::Placement {
                    reason: format!(
                        "epoch {} cannot follow the current epoch {}: epochs only increase",
                        next.epoch, current.placement.epoch
                    ),
                });
            }
        }
        let key = self.placement_key();
        let value = serde_json::to_vec(next).map_err(|e| CoordinatorError::Placement { reason: e.to_string() })?;
        match self.store.compare_and_swap(&key, current.map(|c| c.revision), value, None).await? {
            CasOutcome::Swapped { revision } => Ok(PublishOutcome::Published { revision }),
            CasOutcome::Conflict { current } => {
                Ok(PublishOutcome::Superseded { current: current.map(|kv| decode_placement(&kv)).transpose()? })
            }
        }
    }

    /// The current placement and every placement published after it.
    pub async fn watch_placement(
        &self,
    ) -> Result<(Option<StoredPlacement>, BoxStream<Result<StoredPlacement, CoordinatorError>>), CoordinatorError> {
        let key = self.placement_key();
        let listing = self.store.list(&key).await?;
        let current = listing.kvs.iter().find(|kv| kv.key == key).map(decode_placement).transpose()?;
        let events = self.store.watch(&key, Some(listing.revision + 1)).await?;
        let stream = events.filter_map(move |event| match event {
            Ok(WatchEvent::Put(kv)) if kv.key == key => Some(decode_placement(&kv)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        });
        Ok((current, Box::pin(stream)))
    }

    /// Publishes an attention worker's load statistics (attached to its lease, if given, so they vanish with it).
    pub async fn report_load(
        &self,
        attention_worker_id: &str,
        stats: &LoadStats,
        lease: Option<LeaseId>,
    ) -> Result<(), CoordinatorError> {
        check_name("attention_worker_id", attention_worker_id)?;
        let key = format!("{}{attention_worker_id}", self.load_prefix());
        let value = serde_json::to_vec(stats).map_err(|e| CoordinatorError::StoreRequest {
            op: "put",
            key: key.clone(),
            reason: e.to_string(),
        })?;
        self.store.put(&key, value, lease).await.map(|_| ())
    }

    /// Every attention worker's load statistics.
    pub async fn loads(&self) -> Result<BTreeMap<String, LoadStats>, CoordinatorError> {
        let prefix = self.load_prefix();
        let listing = self.store.list(&prefix).await?;
        listing
            .kvs
            .iter()
            .map(|kv| {
                let stats = serde_json::from_slice(&kv.value)
                    .map_err(|e| CoordinatorError::CorruptRecord { key: kv.key.clone(), reason: e.to_string() })?;
                Ok((kv.key[prefix.len()..].to_string(), stats))
            })
            .collect()
    }

    /// The cluster's load: per MoE layer, the sum over attention workers of the average tokens per expert.
    pub async fn total_load(&self) -> Result<BTreeMap<u32, Vec<f64>>, CoordinatorError> {
        let mut total: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for stats in self.loads().await?.into_values() {
            for (layer, experts) in stats.layers {
                let sum = total.entry(layer).or_default();
                if sum.len() < experts.len() {
                    sum.resize(experts.len(), 0.0);
                }
                for (s, e) in sum.iter_mut().zip(experts) {
                    *s += e;
                }
            }
        }
        Ok(total)
    }
}

impl ClusterStore {
    /// Records that `attention_worker_id` routes every new step with placement `epoch` and no step of an older epoch
    /// is in flight (attached to its lease, if given, so that a dead worker stops holding old replicas in place).
    pub async fn report_adopted(
        &self,
        attention_worker_id: &str,
        epoch: u64,
        lease: Option<LeaseId>,
    ) -> Result<(), CoordinatorError> {
        check_name("attention_worker_id", attention_worker_id)?;
        let key = format!("{}{attention_worker_id}", self.adopted_prefix());
        self.store.put(&key, epoch.to_string().into_bytes(), lease).await.map(|_| ())
    }

    /// The epoch each attention worker adopted.
    pub async fn adopted(&self) -> Result<BTreeMap<String, u64>, CoordinatorError> {
        let prefix = self.adopted_prefix();
        let listing = self.store.list(&prefix).await?;
        listing
            .kvs
            .iter()
            .map(|kv| {
                let epoch =
                    std::str::from_utf8(&kv.value).ok().and_then(|t| t.trim().parse().ok()).ok_or_else(|| {
                        CoordinatorError::CorruptRecord { key: kv.key.clone(), reason: "not a placement epoch".into() }
                    })?;
                Ok((kv.key[prefix.len()..].to_string(), epoch))
            })
            .collect()
    }

    /// Asks the leading coordinator to re-place now.
    pub async fn request_rebalance(&self, request: &RebalanceRequest) -> Result<u64, CoordinatorError> {
        let key = self.rebalance_request_key();
        let value = serde_json::to_vec(request).map_err(|e| CoordinatorError::StoreRequest {
            op: "put",
            key: key.clone(),
            reason: e.to_string(),
        })?;
        self.store.put(&key, value, None).await
    }

    /// The pending rebalance request and its revision (delete it with a compare on that revision once handled).
    pub async fn rebalance_request(&self) -> Result<Option<(RebalanceRequest, u64)>, CoordinatorError> {
        let Some(kv) = self.store.get(&self.rebalance_request_key()).await? else { return Ok(None) };
        let request = serde_json::from_slice(&kv.value)
            .map_err(|e| CoordinatorError::CorruptRecord { key: kv.key.clone(), reason: e.to_string() })?;
        Ok(Some((request, kv.mod_revision)))
    }

    /// Publishes the leading coordinator's status.
    pub async fn report_coordinator_status(&self, status: &CoordinatorStatus) -> Result<(), CoordinatorError> {
        let key = self.coordinator_status_key();
        let value = serde_json::to_vec(status).map_err(|e| CoordinatorError::StoreRequest {
            op: "put",
            key: key.clone(),
            reason: e.to_string(),
        })?;
        self.store.put(&key, value, None).await.map(|_| ())
    }

    /// The leading coordinator's last status, if one was published.
    pub async fn coordinator_status(&self) -> Result<Option<CoordinatorStatus>, CoordinatorError> {
        let Some(kv) = self.store.get(&self.coordinator_status_key()).await? else { return Ok(None) };
        serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| CoordinatorError::CorruptRecord { key: kv.key.clone(), reason: e.to_string() })
    }
}

fn decode_placement(kv: &KeyValue) -> Result<StoredPlacement, CoordinatorError> {
    let placement = serde_json::from_slice(&kv.value)
        .map_err(|e| CoordinatorError::CorruptRecord { key: kv.key.clone(), reason: e.to_string() })?;
    Ok(StoredPlacement { placement, revision: kv.mod_revision })
}
