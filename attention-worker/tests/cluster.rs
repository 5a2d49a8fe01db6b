//! `ClusterLink` against a real `MemoryStore`, with expert workers over real gRPC: the attention worker registers,
//! routes with the placement the coordinator publishes, adopts a new placement only once no step of the old one is in
//! flight (and generation through the switch equals the single-process model), survives a lost expert worker by
//! waiting for its re-placement, and reports the routed load. The test plays the coordinator's part: it loads experts
//! on expert workers, then publishes the placement in the store.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{expert_workers, fixture, max_diff, prompt, serve_expert_worker, solo, solo_with};
use switchyard_attention_worker::{
    micro_batch_pool, AttentionWorkerError, ClusterLink, ClusterOptions, ConnectWorker, ExpertWorkerRoute,
    RemoteExperts, RoutingTable,
};
use switchyard_coordinator::membership::{Member, MemberRole, Membership};
use switchyard_coordinator::store::{ClusterStore, LoadStats, MemoryStore, Store, StoreService, WatchEvent};
use switchyard_coordinator::{CoordinatorError, Placement, WorkerPlacement};
use switchyard_expert_worker::{ExpertSpec, ExpertWorker, ExpertsByLayer};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::{ExpertSelection, Generation, KvDtype, Llama4Model, SamplingParams};
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::{Transport, WireFormat};
use tokio::runtime::Runtime;
use tokio_stream::StreamExt;

const CLUSTER: &str = "test";
const AW: &str = "aw-0";

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The experts of an `--experts` spec of the tiny model.
fn experts(spec: &str) -> ExpertsByLayer {
    spec.parse::<ExpertSpec>().unwrap().resolve(&fixture().config.text).unwrap()
}

/// Expert workers ew-0 (experts 0-3) and ew-1 (4-7), over gRPC or in-process, and a cluster store whose placement
/// epoch 7 is exactly that.
struct Setup {
    runtime: Runtime,
    store: Arc<dyn Store>,
    cluster: ClusterStore,
    workers: Vec<Arc<ExpertWorker>>,
    endpoints: Vec<String>,
    /// The runtimes serving each worker over gRPC (`None` once killed; empty in-process).
    servers: Vec<Option<Runtime>>,
}

impl Setup {
    fn new(grpc: bool) -> Self {
        let workers = expert_workers(&["0-3", "4-7"]);
        let (servers, endpoints) = if grpc {
            workers.iter().map(|w| serve_expert_worker(w.clone())).map(|(r, e)| (Some(r), e)).unzip()
        } else {
            (Vec::new(), workers.iter().map(|w| format!("in-process://{}", w.worker_id())).collect())
        };
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let cluster = ClusterStore::new(store.clone(), CLUSTER).unwrap();
        let setup = Self { runtime: runtime(), store, cluster, workers, endpoints, servers };
        setup.publish(&setup.placement(7, &[(0, "0-3"), (1, "4-7")]));
        setup
    }

    /// A placement of `epoch`: `(worker index, spec)` each.
    fn placement(&self, epoch: u64, holders: &[(usize, &str)]) -> Placement {
        let workers = holders
            .iter()
            .map(|&(i, spec)| WorkerPlacement {
                worker_id: self.workers[i].worker_id().to_string(),
                endpoint: self.endpoints[i].clone(),
                experts: experts(spec)
                    .into_iter()
                    .map(|(layer, ids)| (layer as u32, ids.into_iter().collect()))
                    .collect(),
            })
            .collect();
        Placement { epoch, workers }
    }

    /// Publishes `next` as the cluster's placement, replacing whatever is current.
    fn publish(&self, next: &Placement) {
        self.runtime.block_on(async {
            let current = self.cluster.placement().await.unwrap();
            self.cluster.publish_placement(next, current.as_ref()).await.unwrap();
        });
    }

    /// The epoch the attention worker recorded as adopted.
    fn adopted(&self) -> Option<u64> {
        self.runtime.block_on(self.cluster.adopted()).unwrap().get(AW).copied()
    }

    /// An attention worker linked to the cluster through `store` (by default the setup's).
    fn attention_via(&self, store: Arc<dyn Store>, recovery: Duration, load_report: Duration) -> Attention {
        let (transport, connect): (Arc<dyn Transport>, ConnectWorker) = if self.servers.is_empty() {
            (common::in_process(&self.workers, WireFormat::default()), Arc::new(|_: &ExpertWorkerRoute| {}))
        } else {
            grpc_transport()
        };
        self.runtime.block_on(attention(store, transport, connect, recovery, load_report))
    }

    fn attention(&self, recovery: Duration, load_report: Duration) -> Attention {
        self.attention_via(self.store.clone(), recovery, load_report)
    }
}

fn checkpoint_hash() -> String {
    Checkpoint::open(fixture().dir.path()).unwrap().fingerprint().unwrap()
}

fn options(load_report: Duration) -> ClusterOptions {
    ClusterOptions {
        kv_memory_bytes: 0,
        kv_dtype: KvDtype::F32,
        cluster: CLUSTER.into(),
        worker_id: AW.into(),
        endpoint: "http://127.0.0.1:1".into(),
        node: "node-a".into(),
        device: "cpu".into(),
        checkpoint_hash: checkpoint_hash(),
        lease_ttl: Duration::from_millis(500),
        load_report,
    }
}

/// An attention worker linked to the cluster: what the CLI does in store mode.
struct Attention {
    link: ClusterLink,
    remote: Arc<RemoteExperts>,
    model: Arc<Llama4Model>,
}

/// Joins, waits for the first placement, routes with it through `transport` and follows the cluster.
async fn attention(
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    connect: ConnectWorker,
    recovery: Duration,
    load_report: Duration,
) -> Attention {
    let fixture = fixture();
    let mut link = ClusterLink::join(store, options(load_report)).await.unwrap();
    let first = link.wait_for_placement(Duration::from_secs(5)).await.unwrap();
    let routing = Arc::new(RoutingTable::from_placement(&first, &fixture.config.text).unwrap());
    for worker in routing.workers() {
        connect(worker);
    }
    let remote = Arc::new(
        RemoteExperts::new(routing, transport, tokio::runtime::Handle::current(), AW).with_recovery_timeout(recovery),
    );
    let mut model = common::load(fixture.dir.path(), &fixture.config, ExpertSelection::None);
    model.set_routed_experts(remote.clone());
    link.follow(remote.clone(), &fixture.config.text, connect);
    Attention { link, remote, model: Arc::new(model) }
}

fn grpc_transport() -> (Arc<dyn Transport>, ConnectWorker) {
    let transport = Arc::new(GrpcTransport::new(WireFormat::default(), AW.into()));
    let added = transport.clone();
    let connect: ConnectWorker = Arc::new(move |worker: &ExpertWorkerRoute| {
        added.add_worker(worker.id.clone(), worker.endpoint.clone());
    });
    (transport, connect)
}

/// Polls `condition` every few milliseconds until it holds, failing after 10 s with `what`.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs a generation on a forward pool of its own (remote experts block the thread that dispatches).
fn generate_in_background(
    model: Arc<Llama4Model>,
    prompt: Vec<u32>,
    tokens: usize,
    mut on_token: impl FnMut(u32) + Send + 'static,
) -> std::thread::JoinHandle<Generation> {
    std::thread::spawn(move || {
        let pool = micro_batch_pool(0, 2).unwrap();
        pool.install(|| solo_with(&model, &prompt, tokens, SamplingParams::default(), &mut on_token))
    })
}

fn assert_same(reference: &Generation, got: &Generation, what: &str) {
    assert_eq!(got.tokens, reference.tokens, "{what}: tokens");
    for (r, g) in reference.prompt_logits.iter().zip(&got.prompt_logits) {
        assert_eq!(max_diff(r, g), 0.0, "{what}: prompt logits");
    }
    for (r, g) in reference.decode_logits.iter().zip(&got.decode_logits) {
        assert_eq!(max_diff(r, g), 0.0, "{what}: decode logits");
    }
}

/// A new placement is routed with at once, recorded as adopted only once the step still using the old one finished,
/// and generation through the switch equals the single-process model to the bit.
#[test]
fn placement_switch_is_adopted_after_in_flight_steps() {
    let prompt = prompt(12, 40);
    let reference = solo(&fixture().reference, &prompt, 12, SamplingParams::default());
    let setup = Setup::new(true);
    let (ew0, ew1) = (&setup.workers[0], &setup.workers[1]);
    let aw = setup.attention(Duration::from_secs(10), Duration::from_secs(60));
    wait_until("the first placement is adopted", || setup.adopted() == Some(7));

    // Hold a step of epoch 7 in flight: ew-1 queues what it gets instead of computing it.
    ew1.pause();
    let generation = generate_in_background(aw.model.clone(), prompt.clone(), 12, |_| {});
    wait_until("a step waits on ew-1", || ew1.queued_batches() > 0);

    // The coordinator's part: load the new replicas for epoch 8, then publish epoch 8 (the halves swapped).
    ew0.load_experts(&experts("4-7"), 8).unwrap();
    ew1.load_experts(&experts("0-3"), 8).unwrap();
    setup.publish(&setup.placement(8, &[(0, "4-7"), (1, "0-3")]));
    wait_until("epoch 8 is routed with", || aw.remote.routing().epoch() == 8);
    assert_eq!(setup.adopted(), Some(7), "adopted while a step of epoch 7 is in flight");
    assert_eq!(setup.runtime.block_on(aw.link.adopted_epoch()), Some(7));

    ew1.resume();
    wait_until("epoch 8 is adopted", || setup.adopted() == Some(8));
    let switched = generation.join().unwrap();
    assert_same(&reference, &switched, "generation through the switch");
    assert_eq!(aw.remote.recovery_waits(), 0, "nothing failed");

    // The coordinator may now drop the old replicas: nothing routes with epoch 7 any more.
    ew0.unload_experts(&experts("0-3"), 8).unwrap();
    ew1.unload_experts(&experts("4-7"), 8).unwrap();
    let after = generate_in_background(aw.model.clone(), prompt, 12, |_| {}).join().unwrap();
    assert_same(&reference, &after, "generation after the old replicas are gone");
    assert_eq!(aw.remote.recovery_waits(), 0);
    setup.runtime.block_on(aw.link.leave()).unwrap();
    assert_eq!(setup.adopted(), None, "leaving deletes the adopted record");
}

/// The only holder of experts 4-7 dies mid-generation; the blocked step waits until the coordinator re-places them
/// on the surviving worker, then completes with the same output as the single-process model.
#[test]
fn lost_expert_worker_is_survived_through_a_new_placement() {
    let prompt = prompt(12, 40);
    let reference = solo(&fixture().reference, &prompt, 12, SamplingParams::default());
    let mut setup = Setup::new(true);
    let aw = setup.attention(Duration::from_secs(10), Duration::from_secs(60));

    // Kill ew-1 (drop its runtime and sockets) once the third token is out.
    let ew1_server = Arc::new(Mutex::new(setup.servers[1].take()));
    let kill = ew1_server.clone();
    let mut generated = 0;
    let generation = generate_in_background(aw.model.clone(), prompt, 12, move |_| {
        generated += 1;
        if generated == 3 {
            if let Some(runtime) = kill.lock().unwrap().take() {
                runtime.shutdown_background();
            }
        }
    });
    wait_until("a step waits for a new placement", || aw.remote.recovery_waits() > 0);
    assert!(ew1_server.lock().unwrap().is_none());

    // The coordinator's part: ew-0 loads ew-1's experts for epoch 8, then a placement without ew-1 is published.
    setup.workers[0].load_experts(&experts("4-7"), 8).unwrap();
    setup.publish(&setup.placement(8, &[(0, "all")]));
    let recovered = generation.join().unwrap();
    assert_same(&reference, &recovered, "generation through the loss of ew-1");
    wait_until("epoch 8 is adopted", || setup.adopted() == Some(8));
    assert_eq!(aw.remote.routing().epoch(), 8);
}

/// Load reports carry the routed-token counts of each window, folded into a moving average with weight 0.5; the
/// first placement is recorded as adopted; a placement the model cannot route with is ignored.
#[test]
fn load_is_reported_and_invalid_placements_are_ignored() {
    let setup = Setup::new(false);
    // The load watch starts before the link reports, and the link before any token is routed.
    let mut loads = setup.runtime.block_on(setup.store.watch(&setup.cluster.load_prefix(), None)).unwrap();
    let aw = setup.attention(Duration::ZERO, Duration::from_millis(100));
    wait_until("the first placement is adopted", || setup.adopted() == Some(7));
    let generation = generate_in_background(aw.model.clone(), prompt(12, 40), 12, |_| {}).join().unwrap();
    assert_eq!(generation.tokens.len(), 12);
    let routed: BTreeMap<u32, Vec<f64>> = [1u32, 3]
        .iter()
        .map(|&l| (l, aw.remote.expert_tokens(l as usize).iter().map(|&n| n as f64).collect()))
        .collect();
    assert!(routed.values().all(|counts| counts.iter().sum::<f64>() == 51.0), "{routed:?}");

    // Reports come every window; the generation falls into one or more of them. With weight 0.5 each report is the
    // mean of the previous one and the window, so the windows can be recovered exactly: read reports until they add
    // up to the routed counts.
    let mut next_report = || -> LoadStats {
        let event = setup
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), loads.next()).await })
            .expect("a load report within 10 s")
            .unwrap()
            .unwrap();
        let WatchEvent::Put(kv) = event else { panic!("the load record was deleted") };
        assert_eq!(kv.key, format!("{}{AW}", setup.cluster.load_prefix()));
        serde_json::from_slice(&kv.value).unwrap()
    };
    let mut windows_total: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    let mut previous: Option<LoadStats> = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no report covers the generation: {windows_total:?} vs {routed:?}");
        let stats = next_report();
        assert_eq!(stats.alpha, 0.5);
        assert_eq!(stats.layers.keys().copied().collect::<Vec<_>>(), vec![1, 3], "MoE layers only");
        for (layer, average) in &stats.layers {
            assert_eq!(average.len(), 8);
            let total = windows_total.entry(*layer).or_insert_with(|| vec![0.0; 8]);
            for (e, &a) in average.iter().enumerate() {
                let window = match &previous {
                    None => a,
                    Some(p) => (a - 0.5 * p.layers[layer][e]) / 0.5,
                };
                total[e] += window;
            }
        }
        previous = Some(stats);
        let covered = windows_total
            .iter()
            .all(|(layer, total)| total.iter().zip(&routed[layer]).all(|(t, r)| (t - r).abs() < 1e-6));
        if covered {
            break;
        }
        let so_far: f64 = windows_total.values().flatten().sum();
        assert!(so_far <= 102.0 + 1e-9, "windows add up to more than was routed: {windows_total:?} vs {routed:?}");
    }
    assert!(setup.runtime.block_on(setup.cluster.loads()).unwrap().contains_key(AW));

    // An uncovered placement is logged and ignored; the next valid one is adopted.
    let mut holes = setup.placement(8, &[(0, "0-3"), (1, "4-7")]);
    holes.workers[1].experts.clear();
    setup.publish(&holes);
    setup.publish(&setup.placement(9, &[(0, "0-3"), (1, "4-7")]));
    wait_until("epoch 9 is adopted", || setup.adopted() == Some(9));
    assert_eq!(aw.remote.routing().epoch(), 9);
}

/// A worker whose checkpoint is not the cluster's is refused with both hashes named.
#[test]
fn a_checkpoint_mismatch_is_refused_at_join() {
    let runtime = runtime();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cluster = ClusterStore::new(store.clone(), CLUSTER).unwrap();
    let other = Member {
        worker_id: "ew-0".into(),
        role: MemberRole::Expert,
        endpoint: "http://127.0.0.1:2".into(),
        node: "node-a".into(),
        device: "cpu".into(),
        memory_budget_bytes: 1,
        checkpoint_hash: "sha256:another".into(),
        kv_dtype: None,
    };
    runtime.block_on(async {
        let _registration = Membership::new(cluster).register(other, Duration::from_secs(5)).await.unwrap();
        let error = match ClusterLink::join(store, options(Duration::from_secs(1))).await {
            Ok(_) => panic!("joined a cluster serving another checkpoint"),
            Err(e) => e,
        };
        assert!(
            matches!(&error, AttentionWorkerError::Store(CoordinatorError::CheckpointMismatch { .. })),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("sha256:another") && message.contains(&checkpoint_hash()), "{message}");
    });
}

/// Without a placement in the store, waiting for one ends with a clear error after the patience.
#[test]
fn no_placement_is_a_clear_error() {
    let runtime = runtime();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    runtime.block_on(async {
        let link = ClusterLink::join(store, options(Duration::from_secs(1))).await.unwrap();
        let error = link.wait_for_placement(Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(error, AttentionWorkerError::NoPlacement { .. }), "{error:?}");
        assert!(error.to_string().contains("cluster test has no expert placement"), "{error}");
    });
}

/// Serves `store` over gRPC on `addr` (as a coordinator hosting the store does), on a runtime of its own so that
/// shutting it down drops the server like a killed coordinator. Retries the bind while the old socket goes away.
fn serve_store(store: Arc<dyn Store>, addr: std::net::SocketAddr) -> (Runtime, std::net::SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match runtime.block_on(tokio::net::TcpListener::bind(addr)) {
            Ok(listener) => break listener,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot bind {addr} again: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let bound = listener.local_addr().unwrap();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(StoreService::new(store).into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (runtime, bound)
}

/// The store a coordinator serves goes away and comes back (a coordinator restart): the worker re-opens its watch
/// and adopts the placement published meanwhile.
#[test]
fn the_placement_is_followed_across_a_store_restart() {
    let setup = Setup::new(false);
    let (server, addr) = serve_store(setup.store.clone(), "127.0.0.1:0".parse().unwrap());
    let remote = setup.runtime.block_on(switchyard_coordinator::store::connect(&format!("http://{addr}"))).unwrap();
    let aw = setup.attention_via(remote, Duration::ZERO, Duration::from_secs(60));
    wait_until("epoch 7 is adopted", || setup.adopted() == Some(7));

    server.shutdown_background();
    setup.publish(&setup.placement(8, &[(0, "0-3"), (1, "4-7")]));
    let (_server, _) = serve_store(setup.store.clone(), addr);
    wait_until("epoch 8 is adopted", || setup.adopted() == Some(8));
    assert_eq!(aw.remote.routing().epoch(), 8);
}
