//! Where routed experts live, as the attention worker uses it: for each MoE layer and expert, the expert workers that
//! hold it, and which replica the next dispatch goes to.
//!
//! A [`RoutingTable`] is built from the coordinator's `Placement` (or, without a coordinator, from what each expert
//! worker's `ExpertControl/Status` says it holds) and checked against the model: every expert of every MoE layer must
//! be held by at least one worker, otherwise no step could complete and the worker refuses to start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard_model::config::TextConfig;
use switchyard_proto::v1::expert_control_client::ExpertControlClient;
use switchyard_proto::v1::{ExpertWorkerInfo, Placement, WorkerStatusRequest};

use crate::AttentionWorkerError;

/// An expert worker as the routing table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertWorkerRoute {
    /// Its id in the placement (what the transport is keyed by).
    pub id: String,
    /// Its gRPC endpoint, e.g. `http://127.0.0.1:7001`.
    pub endpoint: String,
}

/// The workers holding one expert, and the round-robin cursor over them.
#[derive(Debug)]
struct Replicas {
    /// Indices into [`RoutingTable::workers`], ascending.
    holders: Vec<usize>,
    next: AtomicUsize,
}

/// For each MoE layer and expert, the expert workers holding it, at one placement epoch.
#[derive(Debug)]
pub struct RoutingTable {
    epoch: u64,
    workers: Vec<ExpertWorkerRoute>,
    experts_per_layer: usize,
    /// Indexed by decoder layer; `None` for dense layers.
    layers: Vec<Option<Vec<Replicas>>>,
}

impl RoutingTable {
    /// Builds the table from `placement`, checking it against the model's `config`: worker ids non-empty and unique,
    /// every layer listed a MoE layer, every expert id below `num_local_experts`, and every expert of every MoE layer
    /// held by at least one worker ([`AttentionWorkerError::UncoveredExperts`] lists the ones that are not).
    pub fn new(placement: &Placement, config: &TextConfig) -> Result<Self, AttentionWorkerError> {
        let epoch = placement.epoch;
        let bad = |reason: String| AttentionWorkerError::Placement { epoch, reason };
        let experts_per_layer = config.num_local_experts;
        let moe_layers: Vec<usize> = (0..config.num_hidden_layers).filter(|&l| config.is_moe_layer(l)).collect();
        let mut holders: Vec<Option<Vec<BTreeSet<usize>>>> = (0..config.num_hidden_layers)
            .map(|l| config.is_moe_layer(l).then(|| vec![BTreeSet::new(); experts_per_layer]))
            .collect();
        let mut workers = Vec::with_capacity(placement.workers.len());
        let mut seen = BTreeSet::new();
        for (index, worker) in placement.workers.iter().enumerate() {
            if worker.worker_id.is_empty() {
                return Err(bad(format!(
                    "expert worker {index} (endpoint {:?}) has an empty worker_id",
                    worker.endpoint
                )));
            }
            if !seen.insert(worker.worker_id.as_str()) {
                return Err(bad(format!("worker_id {:?} appears more than once", worker.worker_id)));
            }
            for layer_experts in &worker.experts {
                let layer = layer_experts.layer as usize;
                let Some(Some(layer_holders)) = holders.get_mut(layer) else {
                    return Err(bad(format!(
                        "expert worker {} lists layer {layer}, which is not a MoE layer of this model (MoE layers: {:?})",
                        worker.worker_id, moe_layers
                    )));
                };
                for &expert in &layer_experts.experts {
                    let slot = layer_holders.get_mut(expert as usize).ok_or_else(|| {
                        bad(format!(
                            "expert worker {} lists expert {expert} of layer {layer}, but the model has \
                             {experts_per_layer} experts per MoE layer",
                            worker.worker_id
                        ))
                    })?;
                    slot.insert(index);
                }
            }
            workers.push(ExpertWorkerRoute { id: worker.worker_id.clone(), endpoint: worker.endpoint.clone() });
        }
        let mut missing = Vec::new();
        for (layer, layer_holders) in holders.iter().enumerate() {
            for (expert, set) in layer_holders.iter().flatten().enumerate() {
                if set.is_empty() {
                    missing.push((layer, expert as u32));
                }
            }
        }
        if !missing.is_empty() {
            return Err(AttentionWorkerError::UncoveredExperts {
                epoch,
                missing,
                total: moe_layers.len() * experts_per_layer,
            });
        }
        let layers = holders
            .into_iter()
            .map(|layer| {
                layer.map(|experts| {
                    experts
                        .into_iter()
                        .map(|set| Replicas { holders: set.into_iter().collect(), next: AtomicUsize::new(0) })
                        .collect()
                })
            })
            .collect();
        Ok(Self { epoch, workers, experts_per_layer, layers })
    }

    /// Builds the table from the placement a coordinator published in the cluster store (see [`RoutingTable::new`]).
    pub fn from_placement(
        placement: &switchyard_coordinator::Placement,
        config: &TextConfig,
    ) -> Result<Self, AttentionWorkerError> {
        Self::new(&placement.to_proto(), config)
    }

    /// The placement epoch the table was built from (sent with every dispatch).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The expert workers, in placement order.
    pub fn workers(&self) -> &[ExpertWorkerRoute] {
        &self.workers
    }

    /// Routed experts per MoE layer.
    pub fn experts_per_layer(&self) -> usize {
        self.experts_per_layer
    }

    /// Decoder layers of the model the table was built for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The ids of the workers holding `expert` of `layer`; `None` when `layer` is not a MoE layer or `expert` is out
    /// of range.
    pub fn holders(&self, layer: usize, expert: u32) -> Option<Vec<&str>> {
        let replicas = self.replicas(layer, expert)?;
        Some(replicas.holders.iter().map(|&w| self.workers[w].id.as_str()).collect())
    }

    /// The worker the next dispatch for `expert` of `layer` goes to: replicas take turns (round-robin per expert), so
    /// they share its load. `None` when `layer` is not a MoE layer or `expert` is out of range.
    pub fn choose(&self, layer: usize, expert: u32) -> Option<&ExpertWorkerRoute> {
        self.choose_index(layer, expert).map(|w| &self.workers[w])
    }

    /// [`RoutingTable::choose`] as an index into [`RoutingTable::workers`].
    pub fn choose_index(&self, layer: usize, expert: u32) -> Option<usize> {
        let replicas = self.replicas(layer, expert)?;
        let turn = replicas.next.fetch_add(1, Ordering::Relaxed);
        replicas.holders.get(turn % replicas.holders.len().max(1)).copied()
    }

    /// Like [`RoutingTable::choose_index`], skipping the workers in `excluded` (ones that just failed): the next
    /// replica in turn that is not excluded, or `None` when every holder is excluded.
    pub fn choose_index_excluding(&self, layer: usize, expert: u32, excluded: &[usize]) -> Option<usize> {
        let replicas = self.replicas(layer, expert)?;
        let count = replicas.holders.len();
        let turn = replicas.next.fetch_add(1, Ordering::Relaxed);
        (0..count).map(|i| replicas.holders[(turn + i) % count]).find(|w| !excluded.contains(w))
    }

    fn replicas(&self, layer: usize, expert: u32) -> Option<&Replicas> {
        self.layers.get(layer)?.as_ref()?.get(expert as usize)
    }
}

/// Builds a placement without a coordinator, from what each expert worker (`(id, endpoint)`) reports it holds through
/// `ExpertControl/Status`, retrying each for up to `patience` while it starts. An empty id takes the id the worker
/// reports. The workers must agree on the placement epoch (the one they will accept dispatches for).
pub async fn placement_from_expert_workers(
    workers: &[(String, String)],
    patience: Duration,
) -> Result<Placement, AttentionWorkerError> {
    let mut infos = Vec::with_capacity(workers.len());
    let mut epochs = BTreeMap::new();
    for (id, endpoint) in workers {
        let what = if id.is_empty() { "an expert worker".to_string() } else { format!("expert worker {id}") };
        let status = retry(&what, endpoint, patience, || async {
            let mut client = ExpertControlClient::connect(endpoint.clone()).await.map_err(|e| e.to_string())?;
            client.status(WorkerStatusRequest {}).await.map(|r| r.into_inner()).map_err(|s| s.to_string())
        })
        .await?;
        let id = if id.is_empty() { status.worker_id.clone() } else { id.clone() };
        if !status.worker_id.is_empty() && status.worker_id != id {
            tracing::warn!(worker = %id, reported = %status.worker_id, "expert worker reports another id; using the given one");
        }
        epochs.entry(status.placement_epoch).or_insert_with(Vec::new).push(id.clone());
        infos.push(ExpertWorkerInfo { worker_id: id, endpoint: endpoint.clone(), experts: status.held });
    }
    let epoch = epochs.keys().next().copied().unwrap_or(0);
    if epochs.len() > 1 {
        return Err(AttentionWorkerError::Placement {
            epoch,
            reason: format!("expert workers are at different placement epochs: {epochs:?}"),
        });
    }
    Ok(Placement { epoch, workers: infos })
}

/// Calls `attempt` until it succeeds or `patience` has passed, backing off from 50 ms to 1 s between tries.
async fn retry<T, F, Fut>(
    what: &str,
    endpoint: &str,
    patience: Duration,
    mut attempt: F,
) -> Result<T, AttentionWorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + patience;
    let mut backoff = Duration::from_millis(50);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(reason) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(AttentionWorkerError::Unreachable {
                        what: what.to_string(),
                        endpoint: endpoint.to_string(),
                        reason: format!("{reason} (gave up after {patience:?})"),
                    });
                }
                tracing::debug!(%endpoint, %reason, "{what} not ready; retrying");
                tokio::time::sleep(backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
