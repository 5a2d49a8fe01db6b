//! The coordinator's leader loop against a real `MemoryStore`, with expert workers played by an in-memory
//! `ExpertControl` that records every call (real expert workers are exercised by the end-to-end cluster tests).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_coordinator::controller::{
    ControlError, Controller, ControllerMetrics, ControllerOptions, ExpertControl, ExpertsByLayer, ModelShape,
    WorkerHolding,
};
use switchyard_coordinator::membership::{Member, MemberRole, Membership, Registration};
use switchyard_coordinator::service::{serve, CoordinatorService};
use switchyard_coordinator::store::{
    self, BoxFuture, ClusterStore, CoordinatorStatus, LoadStats, MemoryStore, RebalanceRequest, Store, StoredPlacement,
};
use switchyard_coordinator::Placement;
use switchyard_proto::v1::coordinator_client::CoordinatorClient;
use switchyard_proto::v1::GetPlacementRequest;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const GIB: u64 = 1 << 30;
const LAYERS: [u32; 2] = [1, 3];
const EXPERTS: u32 = 8;

/// One call an expert worker received, with what the cluster looked like at that moment.
#[derive(Debug, Clone)]
enum Call {
    Load { endpoint: String, experts: ExpertsByLayer, epoch: u64, stored_epoch: u64, seq: u64 },
    Unload { endpoint: String, experts: ExpertsByLayer, min_epoch: u64, adopted: BTreeMap<String, u64>, seq: u64 },
    Status { endpoint: String, seq: u64 },
}

impl Call {
    fn seq(&self) -> u64 {
        match self {
            Call::Load { seq, .. } | Call::Unload { seq, .. } | Call::Status { seq, .. } => *seq,
        }
    }
}

/// The expert worker processes: what each holds and its epoch window, by endpoint.
#[derive(Default)]
struct Workers {
    held: Mutex<BTreeMap<String, WorkerHolding>>,
    /// Endpoints that answer every call with a retryable error.
    down: Mutex<BTreeSet<String>>,
    seq: AtomicU64,
}

impl Workers {
    fn add(&self, endpoint: &str) {
        self.held.lock().expect("lock").insert(endpoint.to_string(), WorkerHolding::default());
    }

    fn holding(&self, endpoint: &str) -> WorkerHolding {
        self.held.lock().expect("lock").get(endpoint).cloned().expect("known worker")
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn unknown(endpoint: &str, op: &'static str) -> ControlError {
        ControlError { endpoint: endpoint.into(), op, reason: "no such worker".into(), retryable: true }
    }

    fn set_down(&self, endpoint: &str, down: bool) {
        let mut set = self.down.lock().expect("lock");
        if down {
            set.insert(endpoint.into());
        } else {
            set.remove(endpoint);
        }
    }

    fn check_up(&self, endpoint: &str, op: &'static str) -> Result<(), ControlError> {
        if self.down.lock().expect("lock").contains(endpoint) {
            return Err(ControlError {
                endpoint: endpoint.into(),
                op,
                reason: "Unavailable: down".into(),
                retryable: true,
            });
        }
        Ok(())
    }
}

/// One coordinator's view of the workers: it records the calls this coordinator made.
struct FakeControl {
    workers: Arc<Workers>,
    cluster: ClusterStore,
    calls: Mutex<Vec<Call>>,
}

impl FakeControl {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    fn loads(&self) -> Vec<(String, ExpertsByLayer, u64, u64)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Load { endpoint, experts, epoch, stored_epoch, .. } => {
                    Some((endpoint, experts, epoch, stored_epoch))
                }
                _ => None,
            })
            .collect()
    }

    fn unloads(&self) -> Vec<(String, ExpertsByLayer, u64, BTreeMap<String, u64>)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Unload { endpoint, experts, min_epoch, adopted, .. } => {
                    Some((endpoint, experts, min_epoch, adopted))
                }
                _ => None,
            })
            .collect()
    }
}

impl ExpertControl for FakeControl {
    fn load<'a>(
        &'a self,
        endpoint: &'a str,
        experts: &'a ExpertsByLayer,
        epoch: u64,
    ) -> BoxFuture<'a, Result<u64, ControlError>> {
        Box::pin(async move {
            self.workers.check_up(endpoint, "load")?;
            let stored_epoch = self.cluster.placement().await.expect("store").map_or(0, |p| p.placement.epoch);
            let seq = self.workers.next_seq();
            let mut held = self.workers.held.lock().expect("lock");
            let worker = held.get_mut(endpoint).ok_or_else(|| Workers::unknown(endpoint, "load"))?;
            let mut added = 0;
            for (layer, ids) in experts {
                let have = worker.held.entry(*layer).or_default();
                for id in ids {
                    if !have.contains(id) {
                        have.push(*id);
                        added += 1;
                    }
                }
                have.sort_unstable();
            }
            worker.max_epoch = worker.max_epoch.max(epoch);
            self.calls.lock().expect("lock").push(Call::Load {
                endpoint: endpoint.into(),
                experts: experts.clone(),
                epoch,
                stored_epoch,
                seq,
            });
            Ok(added * 1000)
        })
    }

    fn unload<'a>(
        &'a self,
        endpoint: &'a str,
        experts: &'a ExpertsByLayer,
        min_epoch: u64,
    ) -> BoxFuture<'a, Result<u64, ControlError>> {
        Box::pin(async move {
            self.workers.check_up(endpoint, "unload")?;
            let adopted = self.cluster.adopted().await.expect("store");
            let seq = self.workers.next_seq();
            let mut held = self.workers.held.lock().expect("lock");
            let worker = held.get_mut(endpoint).ok_or_else(|| Workers::unknown(endpoint, "unload"))?;
            worker.min_epoch = worker.min_epoch.max(min_epoch);
            let mut freed = 0;
            for (layer, ids) in experts {
                if let Some(have) = worker.held.get_mut(layer) {
                    let before = have.len();
                    have.retain(|e| !ids.contains(e));
                    freed += (before - have.len()) as u64;
                }
            }
            self.calls.lock().expect("lock").push(Call::Unload {
                endpoint: endpoint.into(),
                experts: experts.clone(),
                min_epoch,
                adopted,
                seq,
            });
            Ok(freed * 1000)
        })
    }

    fn status<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<WorkerHolding, ControlError>> {
        Box::pin(async move {
            self.workers.check_up(endpoint, "status")?;
            let seq = self.workers.next_seq();
            let holding = self
                .workers
                .held
                .lock()
                .expect("lock")
                .get(endpoint)
                .cloned()
                .ok_or_else(|| Workers::unknown(endpoint, "status"))?;
            self.calls.lock().expect("lock").push(Call::Status { endpoint: endpoint.into(), seq });
            Ok(holding)
        })
    }
}

/// A store, a cluster in it, and the expert worker processes.
struct Harness {
    cluster: ClusterStore,
    workers: Arc<Workers>,
}

/// A running controller.
struct Running {
    control: Arc<FakeControl>,
    metrics: Arc<ControllerMetrics>,
    task: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl Running {
    /// Stops it gracefully (it resigns) and waits until it returned.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("controller stops")
            .expect("no panic");
    }
}

fn model(bytes_per_expert: u64) -> ModelShape {
    ModelShape { moe_layers: LAYERS.to_vec(), experts: EXPERTS, bytes_per_expert }
}

fn options(id: &str, expert_workers: usize, redundant_slots: usize) -> ControllerOptions {
    let mut options = ControllerOptions::new(id, model(1 << 20));
    options.expert_workers = expert_workers;
    options.redundant_slots = redundant_slots;
    options.check_period = Duration::from_millis(50);
    options.lease_ttl = Duration::from_millis(300);
    options.adoption_deadline = Duration::from_secs(20);
    options.rebalance_interval = Duration::from_millis(200);
    options
}

impl Harness {
    fn new() -> Self {
        // `RUST_LOG=switchyard_coordinator=info cargo test --test controller -- --nocapture` shows the decisions.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        Self { cluster: ClusterStore::new(store, "test").expect("cluster"), workers: Arc::default() }
    }

    fn start(&self, options: ControllerOptions) -> Running {
        let control = Arc::new(FakeControl {
            workers: Arc::clone(&self.workers),
            cluster: self.cluster.clone(),
            calls: Mutex::default(),
        });
        let controller = Controller::new(self.cluster.clone(), options, control.clone()).expect("controller");
        let metrics = controller.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller.run(async move {
            let _ = stopped.await;
        }));
        Running { control, metrics, task, stop: Some(stop) }
    }

    async fn register(&self, worker_id: &str, role: MemberRole, budget: u64) -> Registration {
        let endpoint = format!("fake://{worker_id}");
        if role == MemberRole::Expert {
            self.workers.add(&endpoint);
        }
        let member = Member {
            worker_id: worker_id.into(),
            role,
            endpoint,
            node: String::new(),
            device: "cpu".into(),
            memory_budget_bytes: budget,
            checkpoint_hash: "sha256:test".into(),
            kv_dtype: None,
        };
        Membership::new(self.cluster.clone()).register(member, Duration::from_millis(300)).await.expect("register")
    }

    async fn expert(&self, worker_id: &str) -> Registration {
        self.register(worker_id, MemberRole::Expert, GIB).await
    }

    async fn placement_at(&self, epoch: u64) -> StoredPlacement {
        wait_for(&format!("placement epoch {epoch}"), async || {
            self.cluster.placement().await.expect("store").filter(|p| p.placement.epoch >= epoch)
        })
        .await
    }

    async fn status_where(&self, what: &str, check: impl Fn(&CoordinatorStatus) -> bool) -> CoordinatorStatus {
        wait_for(what, async || self.cluster.coordinator_status().await.expect("store").filter(&check)).await
    }
}

/// Polls `probe` until it returns something, failing the test after a few seconds.
async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Workers holding `expert` of `layer`.
fn holders(placement: &Placement, layer: u32, expert: u32) -> Vec<&str> {
    placement
        .workers
        .iter()
        .filter(|w| w.experts.get(&layer).is_some_and(|e| e.contains(&expert)))
        .map(|w| w.worker_id.as_str())
        .collect()
}

fn experts_of<'a>(placement: &'a Placement, worker_id: &str) -> &'a ExpertsByLayer {
    &placement.workers.iter().find(|w| w.worker_id == worker_id).expect("worker in placement").experts
}

/// Per layer, `hot` gets `tokens`, the others 1.
fn skewed(hot: &[(u32, u32)], tokens: f64) -> BTreeMap<u32, Vec<f64>> {
    LAYERS
        .iter()
        .map(|&layer| {
            let mut loads = vec![1.0; EXPERTS as usize];
            for &(l, e) in hot {
                if l == layer {
                    loads[e as usize] = tokens;
                }
            }
            (layer, loads)
        })
        .collect()
}

fn within<F: Future>(future: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(20), future)
}

#[tokio::test]
async fn the_first_placement_waits_for_the_expected_workers_and_loads_before_publishing() {
    within(async {
        let h = Harness::new();
        let running = h.start(options("c-0", 2, 0));
        let _a = h.expert("ew-a").await;
        let waiting = h.status_where("waiting status", |s| s.state == "waiting").await;
        assert_eq!(waiting.leader, "c-0");
        assert!(waiting.problem.as_deref().unwrap_or("").contains("1 of 2"), "{waiting:?}");
        assert!(h.cluster.placement().await.expect("store").is_none());

        let _b = h.expert("ew-b").await;
        let stored = h.placement_at(1).await;
        let placement = &stored.placement;
        assert_eq!(placement.epoch, 1);
        placement.check_covers(&LAYERS, EXPERTS).expect("covers every expert");
        assert_eq!(placement.workers.len(), 2);
        for worker in &placement.workers {
            assert_eq!(worker.endpoint, format!("fake://{}", worker.worker_id));
            assert_eq!(worker.experts.values().map(Vec::len).sum::<usize>(), 8, "uniform loads split evenly");
        }

        // Every worker loaded its experts with epoch 1 while no placement was stored yet.
        let loads = running.control.loads();
        assert_eq!(loads.len(), 2, "{loads:?}");
        for (endpoint, experts, epoch, stored_epoch) in &loads {
            let id = endpoint.trim_start_matches("fake://");
            assert_eq!((*epoch, *stored_epoch), (1, 0), "{endpoint}");
            assert_eq!(experts, experts_of(placement, id));
            assert_eq!(h.workers.holding(endpoint).max_epoch, 1);
        }
        let serving = h.status_where("serving at epoch 1", |s| s.state == "serving" && s.epoch == 1).await;
        assert_eq!(serving.problem, None);
        assert_eq!(running.metrics.placements_applied(), 1);
        running.shutdown().await;
    })
    .await
    .expect("test finishes");
}

#[tokio::test]
async fn dropped_replicas_are_unloaded_only_after_every_attention_worker_adopted() {
    within(async {
        let h = Harness::new();
        let running = h.start(options("c-0", 2, 2));
        let _a = h.expert("ew-a").await;
        let _b = h.expert("ew-b").await;
        let _aw = h.register("aw-0", MemberRole::Attention, 0).await;
        let first = h.placement_at(1).await.placement;
        h.cluster.report_adopted("aw-0", 1, None).await.expect("adopt 1");

        // Uniform loads gave the redundant replicas to experts 0 and 1; hot experts 5 and 6 take them now.
        let request = RebalanceRequest { loads: Some(skewed(&[(1, 5), (3, 6)], 100.0)), reason: "test".into() };
        h.cluster.request_rebalance(&request).await.expect("request");
        let second = h.placement_at(2).await.placement;
        for (endpoint, _, epoch, stored_epoch) in running.control.loads().iter().filter(|l| l.2 == 2) {
            assert_eq!(*stored_epoch, 1, "{endpoint} loaded epoch {epoch}'s experts after it was published");
        }
        let mut dropped = BTreeMap::new();
        for worker in &first.workers {
            let gone = difference(&worker.experts, experts_of(&second, &worker.worker_id));
            if !gone.is_empty() {
                dropped.insert(format!("fake://{}", worker.worker_id), gone);
            }
        }
        assert!(!dropped.is_empty(), "the rebalance drops replicas: {first:?} -> {second:?}");
        assert!(running.control.unloads().is_empty(), "nothing unloaded before aw-0 adopted epoch 2");

        h.cluster.report_adopted("aw-0", 2, None).await.expect("adopt 2");
        let unloads = wait_for("unloads", async || {
            let unloads = running.control.unloads();
            (unloads.len() == dropped.len()).then_some(unloads)
        })
        .await;
        for (endpoint, experts, min_epoch, adopted) in unloads {
            assert_eq!(min_epoch, 2);
            assert_eq!(adopted.get("aw-0"), Some(&2), "unloaded {endpoint} before aw-0 adopted epoch 2");
            assert_eq!(Some(&experts), dropped.get(&endpoint));
            let held = h.workers.holding(&endpoint);
            assert_eq!(held.held, *experts_of(&second, endpoint.trim_start_matches("fake://")));
            assert_eq!(held.min_epoch, 2);
        }
        running.shutdown().await;
    })
    .await
    .expect("test finishes");
}

fn difference(a: &ExpertsByLayer, b: &ExpertsByLayer) -> ExpertsByLayer {
    a.iter()
        .filter_map(|(layer, ids)| {
            let only: Vec<u32> = ids.iter().copied().filter(|e| !b.get(layer).is_some_and(|o| o.contains(e))).collect();
            (!only.is_empty()).then_some((*layer, only))
        })
        .collect()
}

#[tokio::test]
async fn the_experts_of_a_lost_worker_are_placed_again_on_the_survivors() {
    within(async {
        let h = Harness::new();
        let running = h.start(options("c-0", 3, 0));
        let a = h.expert("ew-a").await;
        let b = h.expert("ew-b").await;
        let _c = h.expert("ew-c").await;
        let first = h.placement_at(1).await.placement;
        let lost = experts_of(&first, "ew-b").clone();

        // ew-b dies: its lease lapses.
        b.abandon();
        let second = h.placement_at(2).await.placement;
        assert_eq!(second.workers.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["ew-a", "ew-c"]);
        second.check_covers(&LAYERS, EXPERTS).expect("the survivors hold every expert");
        let mut reloaded = ExpertsByLayer::new();
        for (endpoint, experts, epoch, stored_epoch) in running.control.loads().into_iter().filter(|l| l.2 == 2) {
            assert_ne!(endpoint, "fake://ew-b");
            assert_eq!((epoch, stored_epoch), (2, 1));
            for (layer, ids) in experts {
                reloaded.entry(layer).or_default().extend(ids);
            }
        }
        reloaded.values_mut().for_each(|ids| ids.sort_unstable());
        assert_eq!(reloaded, lost, "exactly the lost worker's experts were loaded on survivors");

        // ew-a leaves explicitly: ew-c alone holds everything at epoch 3.
        a.deregister().await.expect("deregister");
        let third = h.placement_at(3).await.placement;
        assert_eq!(third.workers.len(), 1);
        third.check_covers(&LAYERS, EXPERTS).expect("one survivor holds every expert");
        h.status_where("serving at epoch 3", |s| s.state == "serving" && s.epoch == 3).await;
        running.shutdown().await;
    })
    .await
    .expect("test finishes");
}

#[tokio::test]
async fn an_epoch_is_not_published_until_every_worker_loaded_its_experts() {
    within(async {
        let h = Harness::new();
        let running = h.start(options("c-0", 2, 0));
        h.workers.set_down("fake://ew-b", true);
        let _a = h.expert("ew-a").await;
        let _b = h.expert("ew-b").await;
        let status =
            h.status_where("the failure reported", |s| s.problem.as_deref().is_some_and(|p| p.contains("ew-b"))).await;
        assert!(status.problem.as_deref().unwrap_or("").contains("epoch 1 not published"), "{status:?}");
        assert!(h.cluster.placement().await.expect("store").is_none());

        h.workers.set_down("fake://ew-b", false);
        let placement = h.placement_at(1).await.placement;
        placement.check_covers(&LAYERS, EXPERTS).expect("covers");
        assert!(h.workers.holding("fake://ew-b").max_epoch >= 1);
        h.status_where("serving", |s| s.state == "serving" && s.problem.is_none()).await;
        running.shutdown().await;
    })
    .await
    .expect("test finishes");
}

#[tokio::test]
async fn an_operator_request_replicates_the_hot_expert() {
    within(async {
        let h = Harness::new();
        let running = h.start(options("c-0", 2, 2));
        let _a = h.expert("ew-a").await;
        let _b = h.expert("ew-b").await;
        let first = h.placement_at(1).await.placement;
        assert_eq!(holders(&first, 1, 5).len(), 1);

        let request = RebalanceRequest { loads: Some(skewed(&[(1, 5), (3, 2)], 500.0)), reason: "profile".into() };
        h.cluster.request_rebalance(&request).await.expect("request");
        let second = h.placement_at(2).await.placement;
        assert_eq!(holders(&second, 1, 5), ["ew-a", "ew-b"], "{second:?}");
        assert_eq!(holders(&second, 3, 2), ["ew-a", "ew-b"], "{second:?}");
        wait_for("the request deleted", async || {
            h.cluster.rebalance_request().await.expect("store").is_none().then_some(())
        })
        .await;

        // A request naming a layer that is not an MoE layer is refused (and deleted), with the reason in the status.
        let bad = RebalanceRequest { loads: Some([(2, vec![1.0; EXPERTS as usize])].into()), reason: String::new() };
        h.cluster.request_rebalance(&bad).await.expect("request");
        let status = h.status_where("the refusal", |s| s.problem.is_some()).await;
        assert!(status.problem.as_deref().unwrap_or("").contains("layer 2 is not an MoE layer"), "{status:?}");
        assert!(h.cluster.rebalance_request().await.expect("store").is_none());
        assert_eq!(h.cluster.placement().await.expect("store").expect("placement").placement.epoch, 2);
        running.shutdown().await;
    })
    .await
    .expect("test finishes");
}

#[tokio::test]
async fn measured_imbalance_above_the_threshold_rebalances() {
    within(async {
        let h = Harness::new();
        let running = h.start(options("c-0", 2, 2));
        let _a = h.expert("ew-a").await;
        let _b = h.expert("ew-b").await;
        h.placement_at(1).await;

        let mut stats = LoadStats::new(1.0);
        let window: BTreeMap<u32, Vec<u64>> = skewed(&[(1, 5), (3, 6)], 1000.0)
            .into_iter()
            .map(|(l, v)| (l, v.iter().map(|&t| t as u64).collect()))
            .collect();
        stats.record(&window);
        h.cluster.report_load("aw-0", &stats, None).await.expect("report load");

        let second = h.placement_at(2).await.placement;
        assert_eq!(holders(&second, 1, 5).len(), 2, "{second:?}");
        assert_eq!(holders(&second, 3, 6).len(), 2, "{second:?}");
        let loads = h.cluster.total_load().await.expect("loads");
        for (layer, loads) in &loads {
            let per_worker = second.worker_loads(*layer, loads);
            let mean = per_worker.iter().sum::<f64>() / per_worker.len() as f64;
            let max = per_worker.iter().copied().fold(0.0, f64::max);
            assert!(max / mean < 1.25, "layer {layer}: {per_worker:?}");
        }
        // Balanced now: no further epoch however long it runs (checked over several intervals).
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(h.cluster.placement().await.expect("store").expect("placement").placement.epoch, 2);
        assert_eq!(running.metrics.placements_applied(), 2);
        running.shutdown().await;
    })
    .await
    .expect("test finishes");
}

#[tokio::test]
async fn too_little_memory_is_reported_with_the_missing_gib_until_workers_bring_enough() {
    within(async {
        let h = Harness::new();
        let mut options = options("c-0", 2, 0);
        options.model = model(GIB);
        let running = h.start(options);
        // 3 GiB hold one expert of each of the 2 layers (1 slot each): 2 slots for 8 experts.
        let _a = h.register("ew-a", MemberRole::Expert, 3 * GIB).await;
        let _b = h.register("ew-b", MemberRole::Expert, 3 * GIB).await;
        let status = h.status_where("unplaceable", |s| s.state == "unplaceable").await;
        assert_eq!(
            status.problem.as_deref(),
            Some(
                "the experts need 16.00 GiB (8 experts x 2 layers x 1073741824 bytes); the 2 expert workers offer \
                 4.00 GiB: 12.00 GiB missing"
            )
        );
        assert!(h.cluster.placement().await.expect("store").is_none());
        assert!(running.control.loads().is_empty());

        let _c = h.register("ew-c", MemberRole::Expert, 16 * GIB).await;
        let placement = h.placement_at(1).await.placement;
        placement.check_covers(&LAYERS, EXPERTS).expect("covers");
        assert_eq!(experts_of(&placement, "ew-a").values().map(Vec::len).sum::<usize>(), 2);
        h.status_where("serving", |s| s.state == "serving" && s.problem.is_none()).await;
        running.shutdown().await;
    })
    .await
    .expect("test finishes");
}

#[tokio::test]
async fn only_the_leader_acts_and_a_standby_takes_over_from_the_stored_placement() {
    within(async {
        let h = Harness::new();
        let leader = h.start(options("c-a", 2, 0));
        let _a = h.expert("ew-a").await;
        let b = h.expert("ew-b").await;
        h.placement_at(1).await;
        h.status_where("c-a leads", |s| s.leader == "c-a" && s.state == "serving").await;

        let standby = h.start(options("c-b", 2, 0));
        // ew-b restarts empty under the same id: the leader (only) reloads its experts.
        h.workers.add("fake://ew-b");
        h.cluster
            .store()
            .put(&h.cluster.member_key("ew-b").expect("key"), member_json("ew-b"), Some(b.lease()))
            .await
            .expect("put");
        wait_for("ew-b reloaded", async || (!h.workers.holding("fake://ew-b").held.is_empty()).then_some(())).await;

        // The leader dies without resigning.
        leader.task.abort();
        let died = h.workers.next_seq();
        h.status_where("c-b leads", |s| s.leader == "c-b").await;
        assert!(standby.control.calls().iter().all(|c| c.seq() > died), "the standby acted before it led");

        // It first checks the workers of the stored placement, then acts on a loss from epoch 1.
        drop(b);
        let second = h.placement_at(2).await.placement;
        assert_eq!(second.workers.len(), 1);
        let calls = standby.control.calls();
        let first_load = calls.iter().position(|c| matches!(c, Call::Load { .. })).expect("a load");
        let checked: BTreeSet<&str> = calls[..first_load]
            .iter()
            .filter_map(|c| match c {
                Call::Status { endpoint, .. } => Some(endpoint.as_str()),
                _ => None,
            })
            .collect();
        assert!(checked.contains("fake://ew-a"), "{calls:?}");
        assert!(leader.control.calls().iter().all(|c| c.seq() < died), "the old leader acted after it died");
        assert_eq!(standby.metrics.placements_applied(), 1);
        standby.shutdown().await;
    })
    .await
    .expect("test finishes");
}

fn member_json(worker_id: &str) -> Vec<u8> {
    serde_json::to_vec(&Member {
        worker_id: worker_id.into(),
        role: MemberRole::Expert,
        endpoint: format!("fake://{worker_id}"),
        node: String::new(),
        device: "cpu".into(),
        memory_budget_bytes: GIB,
        checkpoint_hash: "sha256:test".into(),
        kv_dtype: None,
    })
    .expect("json")
}

#[tokio::test]
async fn get_placement_answers_from_the_store_and_the_hosted_store_is_served() {
    within(async {
        let h = Harness::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            CoordinatorService::new(h.cluster.clone()),
            Some(Arc::clone(h.cluster.store())),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        let url = format!("http://{addr}");
        let mut client = CoordinatorClient::connect(url.clone()).await.expect("connect");
        let err = client.get_placement(GetPlacementRequest {}).await.expect_err("no placement yet");
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(err.message().contains("cluster test has no placement yet"), "{}", err.message());

        // Published through the store the coordinator serves, read back through GetPlacement.
        let remote = ClusterStore::new(store::connect(&url).await.expect("remote store"), "test").expect("cluster");
        let placement = Placement::contiguous(&LAYERS, EXPERTS, 2, 1).expect("placement");
        remote.publish_placement(&placement, None).await.expect("publish");
        let served = client.get_placement(GetPlacementRequest {}).await.expect("placement").into_inner();
        assert_eq!(Placement::from_proto(&served), placement);

        let _ = stop.send(());
        server.await.expect("no panic").expect("served");
    })
    .await
    .expect("test finishes");
}
