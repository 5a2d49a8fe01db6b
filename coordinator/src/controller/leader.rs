//! One leadership term: the event loop that decides, applies placements and unloads dropped replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use futures::future::join_all;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::StreamExt;

use super::control::ExpertsByLayer;
use super::{plan, Controller, ControllerMetrics};
use crate::membership::{Member, MemberRole, Membership, MembershipEvent};
use crate::store::{Backoff, Condition, CoordinatorStatus, PublishOutcome, StoredPlacement, TxnOp};
use crate::{CoordinatorError, Placement, WorkerPlacement};

/// Status states (see [`CoordinatorStatus::state`]).
const WAITING: &str = "waiting";
const PLACING: &str = "placing";
const SERVING: &str = "serving";
const UNPLACEABLE: &str = "unplaceable";

/// A placement applied by load-driven rebalancing must lower the measured imbalance by at least this fraction.
const LEAST_IMPROVEMENT: f64 = 0.05;

/// After a placement could not be applied (a worker refused or did not answer its loads), the same trigger waits
/// this long before the next attempt, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Leads until another coordinator publishes a placement; returns why it stopped.
pub(super) async fn lead(controller: &Controller) -> String {
    let mut term = Term::new(controller);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match term.session().await {
            Err(Stop::Superseded(why)) => return why,
            Err(Stop::Store(e)) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    candidate = %controller.options.candidate_id,
                    "lost track of the cluster state ({e}); reading it again in {} ms", delay.as_millis()
                );
                tokio::time::sleep(delay).await;
            }
            Ok(never) => match never {},
        }
    }
}

/// Why a session of the term ended.
enum Stop {
    /// Another coordinator published a placement: this one must stop acting.
    Superseded(String),
    /// The store failed; read the state again and go on.
    Store(CoordinatorError),
}

impl From<CoordinatorError> for Stop {
    fn from(e: CoordinatorError) -> Self {
        Stop::Store(e)
    }
}

/// Why a new placement is computed.
#[derive(Debug, Clone)]
enum Trigger {
    Initial,
    Lost(Vec<String>),
    Joined(Vec<String>),
    Moved(Vec<String>),
    Operator { reason: String, revision: u64 },
    Imbalance { before: f64, measured: BTreeMap<u32, Vec<f64>> },
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Initial => write!(f, "initial placement"),
            Trigger::Lost(ids) => write!(f, "expert workers lost: {}", ids.join(", ")),
            Trigger::Joined(ids) => write!(f, "expert workers joined: {}", ids.join(", ")),
            Trigger::Moved(ids) => write!(f, "expert workers at new endpoints: {}", ids.join(", ")),
            Trigger::Operator { reason, .. } if reason.is_empty() => write!(f, "operator request"),
            Trigger::Operator { reason, .. } => write!(f, "operator request ({reason})"),
            Trigger::Imbalance { before, .. } => write!(f, "measured imbalance {before:.3}"),
        }
    }
}

/// What the leader should do now.
enum Decision {
    /// Nothing to place yet.
    Wait(String),
    /// The placement stands.
    Idle,
    /// Compute and apply a new placement for these loads.
    Place(Trigger, BTreeMap<u32, Vec<f64>>),
}

/// How an attempt to apply a placement ended.
enum Outcome {
    Applied,
    Skipped,
    Unplaceable(String),
    Failed(String),
}

/// The leader's state over one term (kept across sessions, which re-read the store after errors).
struct Term<'a> {
    ctl: &'a Controller,
    members: BTreeMap<String, Member>,
    current: Option<StoredPlacement>,
    /// Expert workers of the placement to check against it before relying on them.
    reconcile: BTreeSet<String>,
    /// Replicas workers hold that the placement no longer gives them: unloaded once every attention worker adopted
    /// the current epoch.
    dropped: BTreeMap<String, ExpertsByLayer>,
    /// When dropped replicas are unloaded even if some attention worker did not adopt the current epoch.
    unload_due: Option<Instant>,
    last_rebalance: Option<Instant>,
    /// Why the last operator request was refused, reported until the next placement.
    note: Option<String>,
    /// The trigger whose placement failed to apply, when to try it again, and the delay before that.
    retry: Option<(String, Instant, Duration)>,
    reported: Option<CoordinatorStatus>,
}

impl<'a> Term<'a> {
    fn new(ctl: &'a Controller) -> Self {
        Self {
            ctl,
            members: BTreeMap::new(),
            current: None,
            reconcile: BTreeSet::new(),
            dropped: BTreeMap::new(),
            unload_due: None,
            last_rebalance: None,
            note: None,
            retry: None,
            reported: None,
        }
    }

    fn id(&self) -> &str {
        &self.ctl.options.candidate_id
    }

    fn epoch(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.placement.epoch)
    }

    fn expert_member(&self, worker_id: &str) -> Option<&Member> {
        self.members.get(worker_id).filter(|m| m.role == MemberRole::Expert)
    }

    fn expert_members(&self) -> Vec<&Member> {
        self.members.values().filter(|m| m.role == MemberRole::Expert).collect()
    }

    /// Reads the cluster state, reconciles the placement's workers, then follows changes until the store fails or
    /// another coordinator publishes.
    async fn session(&mut self) -> Result<Infallible, Stop> {
        let cluster = &self.ctl.cluster;
        let (members, mut events) = Membership::new(cluster.clone()).watch().await?;
        self.members = members.into_iter().map(|m| (m.worker_id.clone(), m)).collect();
        let wake_prefixes = [cluster.adopted_prefix(), cluster.rebalance_request_key()];
        let mut wakeups = cluster.store().watch(cluster.root(), None).await?;
        self.current = cluster.placement().await?;
        if let Some(current) = &self.current {
            tracing::info!(
                candidate = self.id(),
                epoch = current.placement.epoch,
                "continuing from the stored placement; checking its expert workers"
            );
            self.reconcile = current.placement.workers.iter().map(|w| w.worker_id.clone()).collect();
        }
        let mut tick = tokio::time::interval(self.ctl.options.check_period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.step().await?;
            loop {
                tokio::select! {
                    event = events.next() => {
                        match event {
                            Some(Ok(event)) => self.on_member(event),
                            Some(Err(e)) => return Err(e.into()),
                            None => return Err(watch_ended(cluster.members_prefix())),
                        }
                        break;
                    }
                    event = wakeups.next() => match event {
                        Some(Ok(event)) if wake_prefixes.iter().any(|p| event.key().starts_with(p.as_str())) => break,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err(watch_ended(cluster.root().to_string())),
                    },
                    _ = tick.tick() => break,
                }
            }
        }
    }

    fn on_member(&mut self, event: MembershipEvent) {
        match event {
            MembershipEvent::Joined(member) | MembershipEvent::Updated(member) => {
                let in_placement = self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.placement.workers.iter().any(|w| w.worker_id == member.worker_id));
                tracing::info!(
                    worker_id = %member.worker_id, role = ?member.role, endpoint = %member.endpoint,
                    "member joined or re-registered"
                );
                if member.role == MemberRole::Expert && in_placement {
                    // A worker of the placement that registers again may have restarted empty.
                    self.reconcile.insert(member.worker_id.clone());
                }
                self.members.insert(member.worker_id.clone(), member);
            }
            MembershipEvent::Left { worker_id } => {
                tracing::info!(worker_id = %worker_id, "member left");
                self.members.remove(&worker_id);
                self.reconcile.remove(&worker_id);
            }
        }
    }

    async fn step(&mut self) -> Result<(), Stop> {
        self.reconcile_workers().await?;
        match self.decide().await? {
            Decision::Wait(why) => self.report(WAITING, Some(why)).await?,
            Decision::Idle => self.report(SERVING, self.note.clone()).await?,
            Decision::Place(trigger, loads) => {
                let key = trigger.to_string();
                let backing_off = self.retry.as_ref().filter(|(last, _, _)| *last == key);
                if backing_off.is_none_or(|(_, not_before, _)| Instant::now() >= *not_before) {
                    let delay = backing_off.map_or(RETRY_FIRST, |(_, _, delay)| (*delay * 2).min(RETRY_MAX));
                    self.retry = None;
                    match self.apply(trigger, loads).await? {
                        Outcome::Applied | Outcome::Skipped => self.report(SERVING, self.note.clone()).await?,
                        Outcome::Unplaceable(why) => {
                            if self.reported.as_ref().is_none_or(|r| r.problem.as_ref() != Some(&why)) {
                                tracing::warn!(candidate = self.id(), epoch = self.epoch(), trigger = %key, "cannot place the experts: {why}");
                            }
                            self.report(UNPLACEABLE, Some(why)).await?
                        }
                        Outcome::Failed(why) => {
                            self.retry = Some((key, Instant::now() + delay, delay));
                            let state = if self.current.is_some() { SERVING } else { WAITING };
                            self.report(state, Some(why)).await?
                        }
                    }
                }
            }
        }
        self.unload_dropped().await
    }

    /// Brings each worker to be checked in line with the current placement: loads what it lacks (with the current
    /// epoch), schedules what it holds beyond it for unloading. Workers that do not answer are tried again next step.
    async fn reconcile_workers(&mut self) -> Result<(), Stop> {
        let pending = std::mem::take(&mut self.reconcile);
        let this = &*self;
        let Some(current) = &this.current else {
            return Ok(());
        };
        let epoch = current.placement.epoch;
        let checks = pending.into_iter().filter_map(|id| {
            let worker = current.placement.workers.iter().find(|w| w.worker_id == id)?;
            // A worker that is no longer a member is re-placed instead.
            let member = this.expert_member(&id)?;
            Some(async move { (id.clone(), this.reconcile_worker(&member.endpoint, worker, epoch).await) })
        });
        let results = join_all(checks).await;
        for (id, result) in results {
            match result {
                Ok(extra) if extra.is_empty() => {}
                Ok(extra) => {
                    tracing::info!(
                        worker_id = %id, epoch, replicas = plan::count(&extra),
                        "worker holds replicas the placement does not give it; unloading them once epoch {epoch} is adopted"
                    );
                    plan::union_into(self.dropped.entry(id).or_default(), &extra);
                    self.unload_due.get_or_insert_with(|| Instant::now() + self.ctl.options.adoption_deadline);
                }
                Err(e) => {
                    tracing::warn!(worker_id = %id, epoch, "cannot check the expert worker yet: {e}");
                    self.reconcile.insert(id);
                }
            }
        }
        Ok(())
    }

    /// Returns the replicas the worker holds beyond `worker`'s share.
    async fn reconcile_worker(
        &self,
        endpoint: &str,
        worker: &WorkerPlacement,
        epoch: u64,
    ) -> Result<ExpertsByLayer, super::ControlError> {
        let control = &self.ctl.control;
        let holding = control.status(endpoint).await?;
        let lacks = plan::difference(&worker.experts, &holding.held);
        if !lacks.is_empty() || holding.max_epoch < epoch {
            let bytes_read = control.load(endpoint, &lacks, epoch).await?;
            ControllerMetrics::add(&self.ctl.metrics.expert_bytes_loaded, bytes_read);
            tracing::info!(
                worker_id = %worker.worker_id, epoch, replicas = plan::count(&lacks), bytes_read,
                "reconciled the expert worker with the placement"
            );
        }
        if holding.min_epoch > epoch {
            tracing::warn!(
                worker_id = %worker.worker_id, epoch, min_epoch = holding.min_epoch,
                "the worker refuses epoch {epoch}: a coordinator unloaded for an epoch that was never published"
            );
        }
        Ok(plan::difference(&holding.held, &worker.experts))
    }

    async fn decide(&mut self) -> Result<Decision, Stop> {
        let options = &self.ctl.options;
        let model = &options.model;
        let experts = self.expert_members();
        let Some(current) = &self.current else {
            if experts.len() < options.expert_workers {
                return Ok(Decision::Wait(format!(
                    "waiting for expert workers: {} of {} registered",
                    experts.len(),
                    options.expert_workers
                )));
            }
            let measured = plan::usable_loads(model, self.ctl.cluster.total_load().await?);
            return Ok(Decision::Place(Trigger::Initial, plan::fill_loads(model, &measured)));
        };
        let placed = &current.placement.workers;
        let lost: Vec<String> =
            placed.iter().filter(|w| self.expert_member(&w.worker_id).is_none()).map(|w| w.worker_id.clone()).collect();
        let joined: Vec<String> = experts
            .iter()
            .filter(|m| !placed.iter().any(|w| w.worker_id == m.worker_id))
            .map(|m| m.worker_id.clone())
            .collect();
        let moved: Vec<String> = placed
            .iter()
            .filter(|w| self.expert_member(&w.worker_id).is_some_and(|m| m.endpoint != w.endpoint))
            .map(|w| w.worker_id.clone())
            .collect();
        if experts.is_empty() {
            // Nothing to place on: a cluster shutting down, or every worker lost. Not a placement problem to warn
            // about; the first worker to register again gets the experts.
            return Ok(Decision::Wait(format!(
                "no expert worker is registered (the placement of epoch {} names {}); waiting for expert workers",
                current.placement.epoch,
                placed.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let trigger = if !lost.is_empty() {
            Some(Trigger::Lost(lost))
        } else if !joined.is_empty() {
            Some(Trigger::Joined(joined))
        } else if !moved.is_empty() {
            Some(Trigger::Moved(moved))
        } else {
            None
        };
        if let Some(trigger) = trigger {
            let measured = plan::usable_loads(model, self.ctl.cluster.total_load().await?);
            return Ok(Decision::Place(trigger, plan::fill_loads(model, &measured)));
        }

        if let Some((request, revision)) = self.ctl.cluster.rebalance_request().await? {
            let given = request.loads.clone().unwrap_or_default();
            match given.iter().try_for_each(|(&layer, loads)| plan::check_layer_loads(model, layer, loads)) {
                Ok(()) => {
                    let mut loads = plan::usable_loads(model, self.ctl.cluster.total_load().await?);
                    loads.extend(given);
                    let trigger = Trigger::Operator { reason: request.reason, revision };
                    return Ok(Decision::Place(trigger, plan::fill_loads(model, &loads)));
                }
                Err(why) => {
                    let why = format!("rebalance request refused: {why}");
                    tracing::warn!(candidate = self.id(), epoch = current.placement.epoch, "{why}");
                    self.delete_request(revision).await?;
                    self.note = Some(why);
                }
            }
        }

        if self.last_rebalance.is_none_or(|t| t.elapsed() >= options.rebalance_interval) {
            let measured = plan::usable_loads(model, self.ctl.cluster.total_load().await?);
            let before = plan::imbalance(&current.placement, &measured);
            if before > options.rebalance_threshold {
                self.last_rebalance = Some(Instant::now());
                let loads = plan::fill_loads(model, &measured);
                return Ok(Decision::Place(Trigger::Imbalance { before, measured }, loads));
            }
        }
        Ok(Decision::Idle)
    }

    /// Solves for `loads` and applies the result: loads, publish, then (later) unloads.
    async fn apply(&mut self, trigger: Trigger, loads: BTreeMap<u32, Vec<f64>>) -> Result<Outcome, Stop> {
        let ctl = self.ctl;
        let options = &ctl.options;
        let problem = match plan::problem(&options.model, &self.expert_members(), loads, options.redundant_slots) {
            Ok(problem) => problem,
            Err(why) => return Ok(Outcome::Unplaceable(why)),
        };
        let solver = ctl.solver.clone();
        let previous = self.current.as_ref().map(|c| c.placement.clone());
        let current = previous.clone();
        let solved = tokio::task::spawn_blocking(move || match &current {
            Some(current) => solver.solve(&problem, current),
            None => solver.solve_from_scratch(&problem, 1),
        })
        .await;
        let solution = match solved {
            Ok(Ok(solution)) => solution,
            Ok(Err(e)) => return Ok(Outcome::Unplaceable(e.to_string())),
            Err(e) => return Ok(Outcome::Failed(format!("the solver failed: {e}"))),
        };
        let imbalance = solution.mean_imbalance();
        let next = solution.placement;
        let epoch = next.epoch;
        let previous = previous.as_ref();
        if let Trigger::Imbalance { before, measured } = &trigger {
            let after = plan::imbalance(&next, measured);
            if after > before * (1.0 - LEAST_IMPROVEMENT) {
                tracing::info!(
                    candidate = self.id(), epoch = epoch - 1, trigger = %trigger, imbalance_after = after,
                    "not rebalancing: the solver's placement would lower the imbalance by less than {:.0}%",
                    LEAST_IMPROVEMENT * 100.0
                );
                return Ok(Outcome::Skipped);
            }
        }
        if previous.is_some_and(|p| plan::same_layout(p, &next)) && !matches!(trigger, Trigger::Operator { .. }) {
            return Ok(Outcome::Skipped);
        }
        self.report(PLACING, None).await?;

        // (a) Every replica epoch E routes to is held before E is published.
        let held_before = |worker_id: &str| {
            previous.and_then(|p| p.workers.iter().find(|w| w.worker_id == worker_id)).map(|w| w.experts.clone())
        };
        let loads = next.workers.iter().map(|worker| {
            let added = plan::difference(&worker.experts, &held_before(&worker.worker_id).unwrap_or_default());
            async move {
                let result = ctl.control.load(&worker.endpoint, &added, epoch).await;
                (worker.worker_id.as_str(), plan::count(&added), result)
            }
        });
        let mut bytes_read = 0;
        let mut replicas_added = 0;
        let mut failures = Vec::new();
        for (worker_id, added, result) in join_all(loads).await {
            match result {
                Ok(bytes) => {
                    bytes_read += bytes;
                    replicas_added += added;
                }
                Err(e) => failures.push(format!("{worker_id}: {e}")),
            }
        }
        ControllerMetrics::add(&ctl.metrics.expert_bytes_loaded, bytes_read);
        if !failures.is_empty() {
            let why = format!("epoch {epoch} not published: loading its experts failed on {}", failures.join("; "));
            tracing::warn!(candidate = self.id(), epoch, trigger = %trigger, bytes_read, "{why}; trying again");
            return Ok(Outcome::Failed(why));
        }

        // (b)
        let revision = match ctl.cluster.publish_placement(&next, self.current.as_ref()).await? {
            PublishOutcome::Published { revision } => revision,
            PublishOutcome::Superseded { current } => {
                let theirs = current.map_or("none".to_string(), |c| c.placement.epoch.to_string());
                return Err(Stop::Superseded(format!(
                    "publishing epoch {epoch} found another coordinator's placement (epoch {theirs})"
                )));
            }
        };
        ControllerMetrics::add(&ctl.metrics.placements_applied, 1);
        let dropped = self.note_dropped(previous, &next);
        tracing::info!(
            candidate = self.id(), epoch, trigger = %trigger, bytes_read, replicas_added, replicas_dropped = dropped,
            workers = next.workers.len(),
            imbalance,
            "published placement epoch {epoch}"
        );
        if let Trigger::Operator { revision, .. } = trigger {
            self.delete_request(revision).await?;
        }
        self.note = None;
        self.last_rebalance = Some(Instant::now());
        self.current = Some(StoredPlacement { placement: next, revision });
        Ok(Outcome::Applied)
    }

    /// Records the replicas `next` takes away from workers that are still members, and forgets scheduled unloads of
    /// replicas `next` places again. Returns how many replicas it took away.
    fn note_dropped(&mut self, previous: Option<&Placement>, next: &Placement) -> usize {
        let mut dropped = 0;
        for worker in previous.map(|p| p.workers.as_slice()).unwrap_or_default() {
            if self.expert_member(&worker.worker_id).is_none() {
                continue;
            }
            let kept = next.workers.iter().find(|w| w.worker_id == worker.worker_id).map(|w| &w.experts);
            let gone = plan::difference(&worker.experts, kept.unwrap_or(&ExpertsByLayer::new()));
            dropped += plan::count(&gone);
            plan::union_into(self.dropped.entry(worker.worker_id.clone()).or_default(), &gone);
        }
        for worker in &next.workers {
            if let Some(pending) = self.dropped.get_mut(&worker.worker_id) {
                *pending = plan::difference(pending, &worker.experts);
            }
        }
        self.dropped.retain(|_, experts| !experts.is_empty());
        if !self.dropped.is_empty() {
            self.unload_due = Some(Instant::now() + self.ctl.options.adoption_deadline);
        }
        dropped
    }

    /// Unloads the dropped replicas once every attention worker adopted the current epoch (or the deadline passed).
    async fn unload_dropped(&mut self) -> Result<(), Stop> {
        let epoch = self.epoch();
        let experts: BTreeSet<String> = self.expert_members().iter().map(|m| m.worker_id.clone()).collect();
        self.dropped.retain(|id, _| experts.contains(id));
        if self.dropped.is_empty() || self.current.is_none() {
            return Ok(());
        }
        let attention: Vec<&str> =
            self.members.values().filter(|m| m.role == MemberRole::Attention).map(|m| m.worker_id.as_str()).collect();
        let adopted = if attention.is_empty() { BTreeMap::new() } else { self.ctl.cluster.adopted().await? };
        let behind: Vec<&str> =
            attention.into_iter().filter(|id| adopted.get(*id).is_none_or(|&e| e < epoch)).collect();
        if !behind.is_empty() {
            if self.unload_due.is_some_and(|due| Instant::now() < due) {
                return Ok(());
            }
            tracing::warn!(
                candidate = self.id(), epoch,
                "attention workers {} did not adopt epoch {epoch} within {:.1} s; unloading the dropped replicas anyway",
                behind.join(", "),
                self.ctl.options.adoption_deadline.as_secs_f64()
            );
        }
        let this = &*self;
        let unloads = this.dropped.iter().filter_map(|(id, dropped)| {
            let member = this.expert_member(id)?;
            let unload = this.ctl.control.unload(&member.endpoint, dropped, epoch);
            Some(async move { (id.clone(), plan::count(dropped), unload.await) })
        });
        let mut bytes_freed = 0;
        let mut replicas = 0;
        let mut done = Vec::new();
        for (id, count, result) in join_all(unloads).await {
            match result {
                Ok(bytes) => {
                    bytes_freed += bytes;
                    replicas += count;
                    done.push(id);
                }
                Err(e) => tracing::warn!(worker_id = %id, epoch, "cannot unload dropped replicas yet: {e}"),
            }
        }
        for id in done {
            self.dropped.remove(&id);
        }
        ControllerMetrics::add(&self.ctl.metrics.expert_bytes_freed, bytes_freed);
        if replicas > 0 {
            tracing::info!(
                candidate = self.id(),
                epoch,
                replicas,
                bytes_freed,
                "unloaded the replicas epoch {epoch} dropped"
            );
        }
        Ok(())
    }

    /// Deletes the rebalance request handled, unless the operator wrote a newer one meanwhile.
    async fn delete_request(&self, revision: u64) -> Result<(), Stop> {
        let key = self.ctl.cluster.rebalance_request_key();
        let condition = Condition::ModRevision { key: key.clone(), expected: Some(revision) };
        self.ctl.cluster.store().txn(vec![condition], vec![TxnOp::Delete { key }]).await?;
        Ok(())
    }

    /// Publishes the status when it changed.
    async fn report(&mut self, state: &str, problem: Option<String>) -> Result<(), Stop> {
        let status =
            CoordinatorStatus { leader: self.id().to_string(), epoch: self.epoch(), state: state.to_string(), problem };
        if self.reported.as_ref() == Some(&status) {
            return Ok(());
        }
        let problem = status.problem.as_deref().unwrap_or("-");
        tracing::info!(candidate = self.id(), epoch = status.epoch, state, problem, "coordinator status");
        self.ctl.cluster.report_coordinator_status(&status).await?;
        self.reported = Some(status);
        Ok(())
    }
}

fn watch_ended(prefix: String) -> Stop {
    Stop::Store(CoordinatorError::WatchLost { prefix, reason: "the store ended the watch".into() })
}
