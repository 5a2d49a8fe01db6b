//! The coordinator's leader loop: places the experts, rebalances them while serving, and re-places the experts of
//! expert workers that are gone.
//!
//! A [`Controller`] campaigns in the cluster's `coordinator` election; only the leader acts, and it acts until it
//! loses the lead (its lease lapsed), someone else publishes a placement (a compare-and-swap answers `Superseded`), or
//! it is shut down (it then resigns, so a standby leads at once). Then it campaigns again.
//!
//! As leader it follows the members (watch), the current placement, the attention workers' load statistics, their
//! adopted epochs and the operator's rebalance request. A new placement at epoch `E` is applied in this order:
//! 1. `LoadExperts(added replicas, placement_epoch = E)` on every expert worker of the new placement, in parallel (an
//!    empty list for workers adding nothing: it still widens their epoch window), so every replica `E` routes to is
//!    held before anyone routes with `E`;
//! 2. publish `E` by compare-and-swap;
//! 3. wait until every attention worker member has adopted `>= E` (members that leave stop counting; after the
//!    adoption deadline it goes on regardless);
//! 4. `UnloadExperts(dropped replicas, min_epoch = E)` on each expert worker still a member, so a router still on an
//!    older epoch gets `StaleEpoch` rather than a missing expert.
//!
//! Step 3 does not block the loop: a lost worker is re-placed even while an earlier epoch's unloads wait. Dropped
//! replicas wait in a per-worker set that every later placement trims of what it places again.
//!
//! Triggers: the first placement once `expected expert workers` are members (uniform loads); an expert worker of the
//! placement that is no longer a member (re-placed on the survivors at once); an expert member not in the placement,
//! or one whose endpoint changed; an operator's [`crate::store::RebalanceRequest`]; and measured imbalance above the
//! threshold, at most once per rebalance interval, applied only when the solver lowers it by at least 5%.
//!
//! On gaining the lead, and for an expert worker of the placement that joins again, it first reconciles: asks the
//! worker what it holds, loads what the placement gives it and it lacks, and schedules what it holds beyond the
//! placement for unloading once every attention worker adopted the current epoch.

mod control;
mod leader;
mod plan;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use control::{ControlError, ExpertControl, ExpertsByLayer, GrpcControlOptions, GrpcExpertControl, WorkerHolding};

use crate::election::Election;
use crate::store::{Backoff, ClusterStore};
use crate::{CoordinatorError, Solver};

/// The name of the election coordinators campaign in.
pub const ELECTION: &str = "coordinator";

/// What the controller knows of the model: where the MoE layers are, how many experts each has, and what one
/// expert's weights take in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    /// Decoder layer indices of the MoE layers, ascending.
    pub moe_layers: Vec<u32>,
    /// Routed experts per MoE layer.
    pub experts: u32,
    /// Bytes one expert of one layer occupies on a worker (for FP8: codes and scales).
    pub bytes_per_expert: u64,
}

/// How a [`Controller`] behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerOptions {
    /// This coordinator's id in the election and the status record.
    pub candidate_id: String,
    /// The model being served.
    pub model: ModelShape,
    /// The first placement waits until this many expert workers are members.
    pub expert_workers: usize,
    /// Replicas beyond one per expert in each MoE layer, given to the hottest experts.
    pub redundant_slots: usize,
    /// Rebalance when the measured max/mean worker load (averaged over layers) exceeds this.
    pub rebalance_threshold: f64,
    /// Least time between two load-driven rebalance attempts.
    pub rebalance_interval: Duration,
    /// How often the leader re-reads loads and adoption when nothing wakes it earlier.
    pub check_period: Duration,
    /// How long dropped replicas wait for every attention worker to adopt a new epoch before they are unloaded
    /// anyway.
    pub adoption_deadline: Duration,
    /// The candidate's lease: a dead leader is replaced within about this long.
    pub lease_ttl: Duration,
}

impl ControllerOptions {
    /// Options with the defaults of `switchyard coordinator` (one expert worker, no redundant slots, threshold 1.25
    /// at most every 30 s, checks every 500 ms, 30 s adoption deadline, 2 s lease).
    pub fn new(candidate_id: impl Into<String>, model: ModelShape) -> Self {
        Self {
            candidate_id: candidate_id.into(),
            model,
            expert_workers: 1,
            redundant_slots: 0,
            rebalance_threshold: 1.25,
            rebalance_interval: Duration::from_secs(30),
            check_period: Duration::from_millis(500),
            adoption_deadline: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(2),
        }
    }

    fn check(&self) -> Result<(), CoordinatorError> {
        let bad = |reason: String| Err(CoordinatorError::Placement { reason });
        let model = &self.model;
        if self.candidate_id.is_empty() {
            return bad("the coordinator id is empty".into());
        }
        if model.experts == 0 || model.moe_layers.is_empty() {
            return bad(format!(
                "the model has {} MoE layers of {} experts: there is nothing to place",
                model.moe_layers.len(),
                model.experts
            ));
        }
        if model.moe_layers.windows(2).any(|w| w[0] >= w[1]) {
            return bad(format!("MoE layers must be ascending and unique, got {:?}", model.moe_layers));
        }
        if model.bytes_per_expert == 0 {
            return bad("an expert of 0 bytes: the checkpoint's expert sizes were not read".into());
        }
        if self.expert_workers == 0 {
            return bad("the first placement needs at least 1 expert worker".into());
        }
        if !(self.rebalance_threshold.is_finite() && self.rebalance_threshold >= 1.0) {
            return bad(format!(
                "rebalance threshold {} is not a max/mean load ratio (a number >= 1)",
                self.rebalance_threshold
            ));
        }
        if self.check_period.is_zero() || self.lease_ttl.is_zero() {
            return bad("the check period and the lease TTL must be above 0".into());
        }
        Ok(())
    }
}

/// Counters of what the controller did, for logs and a future metrics endpoint.
#[derive(Debug, Default)]
pub struct ControllerMetrics {
    placements_applied: AtomicU64,
    expert_bytes_loaded: AtomicU64,
    expert_bytes_freed: AtomicU64,
    leadership_terms: AtomicU64,
}

impl ControllerMetrics {
    /// Prometheus name of [`ControllerMetrics::placements_applied`].
    pub const PLACEMENTS_APPLIED: &'static str = "switchyard_coordinator_placements_applied_total";
    /// Prometheus name of [`ControllerMetrics::expert_bytes_loaded`].
    pub const EXPERT_BYTES_LOADED: &'static str = "switchyard_coordinator_expert_bytes_loaded_total";
    /// Prometheus name of [`ControllerMetrics::expert_bytes_freed`].
    pub const EXPERT_BYTES_FREED: &'static str = "switchyard_coordinator_expert_bytes_freed_total";
    /// Prometheus name of [`ControllerMetrics::leadership_terms`].
    pub const LEADERSHIP_TERMS: &'static str = "switchyard_coordinator_leadership_terms_total";

    /// Placements this process published.
    pub fn placements_applied(&self) -> u64 {
        self.placements_applied.load(Ordering::Relaxed)
    }

    /// Checkpoint bytes expert workers read on this process's load requests.
    pub fn expert_bytes_loaded(&self) -> u64 {
        self.expert_bytes_loaded.load(Ordering::Relaxed)
    }

    /// Expert bytes workers freed on this process's unload requests.
    pub fn expert_bytes_freed(&self) -> u64 {
        self.expert_bytes_freed.load(Ordering::Relaxed)
    }

    /// Times this process gained the lead.
    pub fn leadership_terms(&self) -> u64 {
        self.leadership_terms.load(Ordering::Relaxed)
    }

    /// The counters in Prometheus' text exposition format.
    pub fn render_prometheus(&self) -> String {
        [
            (Self::PLACEMENTS_APPLIED, "Placements published by this coordinator.", self.placements_applied()),
            (Self::EXPERT_BYTES_LOADED, "Checkpoint bytes read by expert workers on its requests.", {
                self.expert_bytes_loaded()
            }),
            (
                Self::EXPERT_BYTES_FREED,
                "Expert bytes freed by expert workers on its requests.",
                self.expert_bytes_freed(),
            ),
            (Self::LEADERSHIP_TERMS, "Times this coordinator gained the lead.", self.leadership_terms()),
        ]
        .iter()
        .map(|(name, help, value)| format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"))
        .collect()
    }

    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

/// The coordinator's leader loop for one cluster (see the module docs).
pub struct Controller {
    cluster: ClusterStore,
    options: ControllerOptions,
    control: Arc<dyn ExpertControl>,
    election: Election,
    solver: Solver,
    metrics: Arc<ControllerMetrics>,
}

impl Controller {
    /// A controller for `cluster` that talks to expert workers through `control`.
    pub fn new(
        cluster: ClusterStore,
        options: ControllerOptions,
        control: Arc<dyn ExpertControl>,
    ) -> Result<Self, CoordinatorError> {
        options.check()?;
        let election = Election::new(&cluster, ELECTION, options.lease_ttl)?;
        Ok(Self { cluster, options, control, election, solver: Solver::default(), metrics: Arc::default() })
    }

    /// The options in use.
    pub fn options(&self) -> &ControllerOptions {
        &self.options
    }

    /// Its counters (shared: they keep counting while [`Controller::run`] runs).
    pub fn metrics(&self) -> Arc<ControllerMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Campaigns, leads until the lead is lost, campaigns again, ... until `shutdown` resolves; then resigns if it
    /// leads. Store outages are waited out (with logs), never returned.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let id = self.options.candidate_id.as_str();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let campaign = tokio::select! {
                _ = &mut shutdown => return,
                campaign = self.election.campaign(id) => campaign,
            };
            let leadership = match campaign {
                Ok(leadership) => leadership,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        candidate = id,
                        "cannot campaign for the coordinator lead ({e}); retrying in {} ms",
                        delay.as_millis()
                    );
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            ControllerMetrics::add(&self.metrics.leadership_terms, 1);
            tracing::info!(candidate = id, cluster = self.cluster.cluster(), "leading the cluster's coordinators");
            let end = tokio::select! {
                _ = &mut shutdown => None,
                _ = leadership.lost() => Some("its lease lapsed (a store outage or a long pause)".to_string()),
                superseded = leader::lead(&self) => Some(superseded),
            };
            let Some(why) = end else {
                match tokio::time::timeout(self.options.lease_ttl, leadership.resign()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(candidate = id, "cannot resign the lead ({e}); it lapses with its lease")
                    }
                    Err(_) => tracing::warn!(candidate = id, "resigning timed out; the lead lapses with its lease"),
                }
                return;
            };
            tracing::warn!(candidate = id, "stopped acting as the leading coordinator: {why}; campaigning again");
            if let Err(e) = leadership.resign().await {
                tracing::debug!(candidate = id, "resigning after losing the lead: {e}");
            }
        }
    }
}
