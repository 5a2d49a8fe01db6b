//! [`ClusterLink`]: the attention worker as a member of a cluster whose coordinator places the experts through the
//! cluster store.
//!
//! The link registers the worker (role `attention`, under a lease), waits for the coordinator's first placement,
//! then follows the placement key: each newer epoch becomes a [`RoutingTable`], its new expert workers are connected
//! in the transport, [`RemoteExperts`] switches to it, and once no layer step still routes with the old table the
//! worker records the epoch under `adopted/<worker_id>`. The coordinator unloads replicas the new placement dropped
//! only after every attention worker adopted it, so no step ever reaches a worker that lost its expert. Every
//! reporting interval it also publishes the routed-token load it measured (`load/<worker_id>`), which the
//! coordinator rebalances by.
//!
//! The store may restart (etcd, or a coordinator hosting it): every store call is retried with backoff and the
//! placement watch is re-opened; none of it stops serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_coordinator::membership::{Member, MemberRole, Membership, Registration};
use switchyard_coordinator::store::{ClusterStore, LeaseId, LoadStats, Store, StoredPlacement};
use switchyard_coordinator::{CoordinatorError, Placement};
use switchyard_model::config::TextConfig;
use switchyard_model::KvDtype;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::placement::{ExpertWorkerRoute, RoutingTable};
use crate::remote::{wait_until_unused, RemoteExperts};
use crate::AttentionWorkerError;

/// Weight of the newest window in the load statistics the worker publishes: the coordinator sees a shift of the
/// routing within a few windows, and one odd window moves the average only halfway.
pub const LOAD_ALPHA: f64 = 0.5;

/// First delay before a failed store call is retried; it doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Longest delay between retries of a store call: a restarted store is noticed within it.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long [`ClusterLink::join`] retries while the store answers with retryable errors (a store or coordinator still
/// starting): long enough to ride out a restart, short enough that a launcher hears about a store that stays away.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// Who the worker is in the cluster, and how often it talks to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The cluster's name (the store key prefix `/switchyard/<cluster>/`).
    pub cluster: String,
    /// This worker's id (also the id it dispatches with).
    pub worker_id: String,
    /// Where clients reach its `Generation` service (`http://IP:PORT`).
    pub endpoint: String,
    /// The machine it runs on.
    pub node: String,
    /// The accelerator it computes on (`cpu`, `cuda:0`).
    pub device: String,
    /// `Checkpoint::fingerprint()` of the checkpoint it loaded; must be the cluster's.
    pub checkpoint_hash: String,
    /// TTL of its membership lease: it leaves the cluster this long after it stops refreshing.
    pub lease_ttl: Duration,
    /// How often it publishes its routed-token load.
    pub load_report: Duration,
    /// Bytes of its KV cache, registered as its memory budget: other attention workers size the context shards they
    /// ask it to hold by it.
    pub kv_memory_bytes: u64,
    /// The KV cache's element type, registered with the budget (a bf16 cache holds twice the positions of an f32
    /// one in the same bytes).
    pub kv_dtype: KvDtype,
}

/// Connects an expert worker that a new placement names in the transport the worker dispatches through (for gRPC:
/// `GrpcTransport::add_worker(id, endpoint)`). Called before the placement is routed with.
pub type ConnectWorker = Arc<dyn Fn(&ExpertWorkerRoute) + Send + Sync>;

/// The attention worker's membership of a cluster, and the tasks following its placement and reporting its load.
///
/// Dropping it stops the tasks and the lease refreshes (the member record lapses after the lease TTL, as for a
/// crashed worker); [`ClusterLink::leave`] deregisters at once.
pub struct ClusterLink {
    shared: Arc<Shared>,
    options: ClusterOptions,
    tasks: Vec<JoinHandle<()>>,
}

/// What the background tasks share.
struct Shared {
    cluster: ClusterStore,
    worker_id: String,
    registration: Registration,
    /// The epoch last recorded under `adopted/` and the lease it was attached to. Locked across the write, so that
    /// the follower and the re-report after a new lease never write out of order.
    adopted: Mutex<Option<(u64, LeaseId)>>,
}

impl ClusterLink {
    /// Registers the worker in `options.cluster` of `store`, retrying for up to [`JOIN_PATIENCE`] while the store is
    /// unavailable. Fails with [`AttentionWorkerError::Store`] if the cluster
    /// serves another checkpoint ([`CoordinatorError::CheckpointMismatch`]) or the store cannot be reached.
    pub async fn join(store: Arc<dyn Store>, options: ClusterOptions) -> Result<Self, AttentionWorkerError> {
        let bad = |option: &str, reason: &str| AttentionWorkerError::InvalidOption {
            option: option.into(),
            reason: reason.into(),
        };
        if options.lease_ttl.is_zero() {
            return Err(bad("lease_ttl", "must be above zero"));
        }
        if options.load_report.is_zero() {
            return Err(bad("load_report", "must be above zero"));
        }
        let cluster = ClusterStore::new(store, &options.cluster)?;
        let member = Member {
            worker_id: options.worker_id.clone(),
            role: MemberRole::Attention,
            endpoint: options.endpoint.clone(),
            node: options.node.clone(),
            device: options.device.clone(),
            memory_budget_bytes: options.kv_memory_bytes,
            checkpoint_hash: options.checkpoint_hash.clone(),
            kv_dtype: Some(options.kv_dtype.to_string()),
        };
        let membership = Membership::new(cluster.clone());
        let deadline = Instant::now() + JOIN_PATIENCE;
        let mut delay = FIRST_RETRY_DELAY;
        let registration = loop {
            match membership.register(member.clone(), options.lease_ttl).await {
                Ok(registration) => break registration,
                Err(e) if e.retryable() && Instant::now() + delay < deadline => {
                    tracing::warn!(worker_id = %member.worker_id, error = %e, "cannot join the cluster yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let shared =
            Arc::new(Shared { cluster, worker_id: options.worker_id.clone(), registration, adopted: Mutex::new(None) });
        Ok(Self { shared, options, tasks: Vec::new() })
    }

    /// The cluster's store.
    pub fn cluster(&self) -> &ClusterStore {
        &self.shared.cluster
    }

    /// The options it joined with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The lease the member record (and the adopted epoch and load) is attached to now.
    pub fn lease(&self) -> LeaseId {
        self.shared.registration.lease()
    }

    /// The placement epoch last recorded as adopted, once one is.
    pub async fn adopted_epoch(&self) -> Option<u64> {
        self.shared.adopted.lock().await.map(|(epoch, _)| epoch)
    }

    /// Waits up to `patience` for the coordinator's placement, re-trying the store while it is unreachable.
    pub async fn wait_for_placement(&self, patience: Duration) -> Result<Placement, AttentionWorkerError> {
        let deadline = tokio::time::Instant::now() + patience;
        let cluster = &self.shared.cluster;
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let attempt = tokio::time::timeout_at(deadline, async {
                let (current, mut later) = cluster.watch_placement().await?;
                if let Some(stored) = current {
                    return Ok(stored.placement);
                }
                tracing::info!(cluster = %cluster.cluster(), "waiting for the coordinator's first placement");
                match later.next().await {
                    Some(stored) => Ok(stored?.placement),
                    None => Err(CoordinatorError::StoreUnavailable {
                        op: "watch",
                        key: cluster.placement_key(),
                        reason: "the watch ended".into(),
                    }),
                }
            })
            .await;
            match attempt {
                Ok(Ok(placement)) => return Ok(placement),
                Ok(Err(e)) if e.retryable() || matches!(e, CoordinatorError::WatchLost { .. }) => {
                    tracing::warn!(cluster = %cluster.cluster(), error = %e, "cannot read the placement yet; retrying");
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
            if tokio::time::Instant::now() + delay >= deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
        Err(AttentionWorkerError::NoPlacement { cluster: cluster.cluster().to_string(), waited: patience })
    }

    /// Starts following the cluster's placement for `remote` (which routes with the first placement's table
    /// already) and reporting its load every `options.load_report`. `config` is the model's, to check each placement
    /// against; `connect` adds a new placement's expert workers to the transport. Records the epoch `remote` routes
    /// with as adopted first.
    pub fn follow(&mut self, remote: Arc<RemoteExperts>, config: &TextConfig, connect: ConnectWorker) {
        let moe_layers = config.moe_layers.clone();
        self.tasks.push(tokio::spawn(follow_placement(
            Arc::clone(&self.shared),
            Arc::clone(&remote),
            config.clone(),
            connect,
        )));
        self.tasks.push(tokio::spawn(report_load(
            Arc::clone(&self.shared),
            remote,
            moe_layers,
            self.options.load_report,
        )));
    }

    /// Stops following and leaves the cluster now (the member record, adopted epoch and load vanish with the lease),
    /// so the coordinator stops waiting for this worker.
    pub async fn leave(mut self) -> Result<(), AttentionWorkerError> {
        let tasks = std::mem::take(&mut self.tasks);
        let shared = Arc::clone(&self.shared);
        drop(self);
        for task in tasks {
            task.abort();
            // Cancelled, or ended by a panic that was already reported: either way it holds no clone any more.
            let _ = task.await;
        }
        let worker_id = shared.worker_id.clone();
        match Arc::try_unwrap(shared) {
            Ok(shared) => shared.registration.deregister().await.map_err(AttentionWorkerError::from),
            Err(_) => {
                // Unreachable once the tasks are gone; the lease then lapses by itself.
                tracing::warn!(%worker_id, "cluster link still shared; its membership lapses with the lease");
                Ok(())
            }
        }
    }
}

impl Drop for ClusterLink {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Shared {
    /// Records `epoch` under `adopted/`, retrying until the store takes it.
    async fn report_adopted(&self, epoch: u64) {
        let mut adopted = self.adopted.lock().await;
        let lease = self.write_adopted(epoch).await;
        *adopted = Some((epoch, lease));
    }

    /// Records the adopted epoch again if the worker had to register again under a new lease (its old record went
    /// with the old lease, and the coordinator would wait for this worker in vain).
    async fn refresh_adopted(&self) {
        let mut adopted = self.adopted.lock().await;
        if let Some((epoch, lease)) = *adopted {
            if lease != self.registration.lease() {
                let lease = self.write_adopted(epoch).await;
                *adopted = Some((epoch, lease));
            }
        }
    }

    async fn write_adopted(&self, epoch: u64) -> LeaseId {
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let lease = self.registration.lease();
            match self.cluster.report_adopted(&self.worker_id, epoch, Some(lease)).await {
                Ok(()) => {
                    tracing::info!(worker_id = %self.worker_id, epoch, "placement epoch adopted");
                    return lease;
                }
                Err(e) => {
                    tracing::warn!(worker_id = %self.worker_id, epoch, error = %e, "cannot record the adopted epoch; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }
}

/// Follows the placement key for the life of the link, re-opening the watch after store errors.
async fn follow_placement(shared: Arc<Shared>, remote: Arc<RemoteExperts>, config: TextConfig, connect: ConnectWorker) {
    shared.report_adopted(remote.routing().epoch()).await;
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        match shared.cluster.watch_placement().await {
            Ok((current, mut later)) => {
                delay = FIRST_RETRY_DELAY;
                if let Some(stored) = current {
                    adopt(&shared, &remote, &config, &connect, stored).await;
                }
                while let Some(next) = later.next().await {
                    match next {
                        Ok(stored) => adopt(&shared, &remote, &config, &connect, stored).await,
                        Err(e) => {
                            tracing::warn!(worker_id = %shared.worker_id, error = %e, "placement watch failed; re-opening it");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(worker_id = %shared.worker_id, error = %e, "cannot watch the placement; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Switches `remote` to `stored` if it is newer than what it routes with, then records the adoption once no step of
/// the old epoch is in flight.
async fn adopt(
    shared: &Shared,
    remote: &RemoteExperts,
    config: &TextConfig,
    connect: &ConnectWorker,
    stored: StoredPlacement,
) {
    let worker_id = &shared.worker_id;
    let epoch = stored.placement.epoch;
    let old = remote.routing();
    if epoch <= old.epoch() {
        if epoch < old.epoch() {
            tracing::warn!(
                %worker_id, epoch, current = old.epoch(),
                "ignoring a placement older than the one in use (was the store reset?)"
            );
        }
        return;
    }
    let table = match RoutingTable::from_placement(&stored.placement, config) {
        Ok(table) => table,
        Err(e) => {
            tracing::error!(%worker_id, epoch, error = %e, "ignoring a placement this model cannot route with");
            return;
        }
    };
    for worker in table.workers() {
        if !old.workers().contains(worker) {
            connect(worker);
        }
    }
    remote.set_routing(Arc::new(table));
    let drained = wait_until_unused(old).await;
    tracing::info!(%worker_id, epoch, drain_ms = drained.as_millis() as u64, "routing with the new placement");
    shared.report_adopted(epoch).await;
}

/// Publishes the routed-token load every `interval`: each window's counts per MoE layer, folded into a moving
/// average.
async fn report_load(shared: Arc<Shared>, remote: Arc<RemoteExperts>, moe_layers: Vec<usize>, interval: Duration) {
    let counts = || -> BTreeMap<u32, Vec<u64>> {
        moe_layers.iter().map(|&layer| (layer as u32, remote.expert_tokens(layer))).collect()
    };
    // Tokens routed before the reporter started (while the worker waited to be linked) belong to the first window.
    let mut previous: BTreeMap<u32, Vec<u64>> =
        counts().into_iter().map(|(layer, experts)| (layer, vec![0; experts.len()])).collect();
    let mut stats = LoadStats::new(LOAD_ALPHA);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let now = counts();
        let window = now
            .iter()
            .map(|(layer, experts)| {
                let before = previous.get(layer);
                let delta = experts
                    .iter()
                    .enumerate()
                    .map(|(e, &n)| n.saturating_sub(before.and_then(|b| b.get(e)).copied().unwrap_or(0)))
                    .collect();
                (*layer, delta)
            })
            .collect();
        previous = now;
        stats.record(&window);
        let lease = shared.registration.lease();
        match shared.cluster.report_load(&shared.worker_id, &stats, Some(lease)).await {
            Ok(()) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        worker_id = %shared.worker_id,
                        "load reported again after {:.1} s of failures", since.elapsed().as_secs_f64()
                    );
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(worker_id = %shared.worker_id, error = %e, "cannot report load; will retry each window");
                }
            }
        }
        shared.refresh_adopted().await;
    }
}
