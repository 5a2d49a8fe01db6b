//! One conformance suite for every `Store`: the same checks run against `MemoryStore`, against a real etcd started on
//! loopback (the `etcd` binary from Debian's `etcd-server` must be installed: these tests fail, not skip, without it)
//! and against `RemoteStore`: a `MemoryStore` served by `StoreService` on a loopback port, as a coordinator serves it,
//! reached through `store::connect("http://...")`.
//!
//! Besides the trait itself, the suite covers what is built on it: membership (lease expiry within two lease
//! periods, checkpoint checks, watches), elections (failover when the leader's lease lapses or it resigns), the
//! placement compare-and-swap and load statistics. The store URLs and the remote store's restarts are checked at the
//! end.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_coordinator::election::Election;
use switchyard_coordinator::membership::{Member, MemberRole, Membership, MembershipEvent};
use switchyard_coordinator::store::{
    connect, connect_within, BoxStream, CasOutcome, ClusterStore, Condition, EtcdConfig, EtcdServer, EtcdStore,
    LeaseId, LeaseKeeper, LoadStats, MemoryStore, PublishOutcome, Store, StoreService, TxnOp, WatchEvent, WatchStream,
};
use switchyard_coordinator::{CoordinatorError, Placement};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::server::Router;

/// A store under test, with the shortest lease it supports (etcd counts whole seconds).
struct Backend {
    store: Arc<dyn Store>,
    ttl: Duration,
    // The server behind the store, kept alive for the test; stopped on drop.
    _server: Option<Box<dyn Any>>,
}

fn memory() -> Backend {
    Backend { store: Arc::new(MemoryStore::new()), ttl: Duration::from_millis(300), _server: None }
}

async fn etcd() -> Backend {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd for the store tests: {e}"));
    let store = EtcdStore::connect(EtcdConfig::new([server.endpoint()])).await.expect("connect to the test etcd");
    Backend { store: Arc::new(store), ttl: Duration::from_secs(1), _server: Some(Box::new(server)) }
}

async fn remote() -> Backend {
    let server = ServedStore::start(store_router(Arc::new(MemoryStore::new())), loopback_any_port()).await;
    let store = connect(&server.url()).await.expect("connect to the served store");
    assert_eq!(store.describe(), format!("switchyard store at {}", server.url()));
    Backend { store, ttl: Duration::from_millis(300), _server: Some(Box::new(server)) }
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn store_router(store: Arc<dyn Store>) -> Router {
    tonic::transport::Server::builder().add_service(StoreService::new(store).into_server())
}

/// A gRPC server on a loopback port, run by its own runtime as if it were another process: [`ServedStore::kill`]
/// (or dropping it) ends every task and connection of it at once, as the death of a coordinator would.
struct ServedStore {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ServedStore {
    /// Serves `router` on `addr` (port 0: any free port); returns once it listens.
    async fn start(router: Router, addr: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the store server");
        let (bound_tx, bound) = oneshot::channel();
        runtime.spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            // A restarted server takes its predecessor's port while old connections linger in TIME_WAIT.
            socket.set_reuseaddr(true).expect("SO_REUSEADDR");
            socket.bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            let listener = socket.listen(64).expect("listen");
            let _ = bound_tx.send(listener.local_addr().expect("local address"));
            router.serve_with_incoming(TcpListenerStream::new(listener)).await
        });
        let addr = bound.await.expect("the store server listens");
        Self { addr, runtime: Some(runtime) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for ServedStore {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `check` against every backend, each in its own test.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::memory()).await;
                }
            )*
        }
        mod etcd_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::etcd().await).await;
                }
            )*
        }
        mod remote_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::remote().await).await;
                }
            )*
        }
    };
}

conformance!(
    keys_values_and_revisions,
    compare_and_swap,
    transactions,
    leases,
    lease_expiry_and_keep_alive,
    watches,
    election_primitives,
    abandoned_campaign_ends_with_its_lease,
    membership_register_list_watch,
    member_vanishes_within_two_lease_periods,
    checkpoint_mismatch_is_refused,
    election_failover,
    placement_and_load,
);

/// Waits for `f` to be true, polling; fails after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {limit:?}");
}

async fn next_event(events: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("a watch event within 5 s")
        .expect("the watch is still open")
        .expect("a watch event, not an error")
}

async fn keys_values_and_revisions(b: Backend) {
    let s = &b.store;
    assert_eq!(s.get("/t/kv/a").await.expect("get"), None);
    let r1 = s.put("/t/kv/a", b"1".to_vec(), None).await.expect("put");
    let r2 = s.put("/t/kv/a", b"2".to_vec(), None).await.expect("put again");
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    let kv = s.get("/t/kv/a").await.expect("get").expect("present");
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version), (&b"2"[..], r1, r2, 2));
    assert_eq!(kv.lease, None);
    s.put("/t/kv/b", b"3".to_vec(), None).await.expect("put");
    s.put("/t/kv/ab", b"4".to_vec(), None).await.expect("put");
    s.put("/t/kvx", b"5".to_vec(), None).await.expect("put outside the prefix");
    let listing = s.list("/t/kv/").await.expect("list");
    let keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/kv/a", "/t/kv/ab", "/t/kv/b"], "sorted, bounded by the prefix");
    assert!(listing.revision >= listing.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0));
    assert!(s.delete("/t/kv/a").await.expect("delete"));
    assert!(!s.delete("/t/kv/a").await.expect("delete again"), "a second delete finds nothing");
    assert_eq!(s.delete_prefix("/t/kv/").await.expect("delete prefix"), 2);
    assert!(s.list("/t/kv/").await.expect("list").kvs.is_empty());
    assert!(s.get("/t/kvx").await.expect("get").is_some(), "delete_prefix stays within its prefix");
}

async fn compare_and_swap(b: Backend) {
    let s = &b.store;
    let first = s.compare_and_swap("/t/cas", None, b"e1".to_vec(), None).await.expect("create");
    let CasOutcome::Swapped { revision: r1 } = first else { panic!("creating an absent key swaps: {first:?}") };
    match s.compare_and_swap("/t/cas", None, b"other".to_vec(), None).await.expect("create again") {
        CasOutcome::Conflict { current: Some(kv) } => {
            assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"e1"[..], r1))
        }
        other => panic!("creating an existing key conflicts and shows it: {other:?}"),
    }
    let CasOutcome::Swapped { revision: r2 } =
        s.compare_and_swap("/t/cas", Some(r1), b"e2".to_vec(), None).await.expect("swap")
    else {
        panic!("swap at the current revision")
    };
    assert!(r2 > r1);
    match s.compare_and_swap("/t/cas", Some(r1), b"stale".to_vec(), None).await.expect("stale swap") {
        CasOutcome::Conflict { current: Some(kv) } => assert_eq!(kv.value, b"e2"),
        other => panic!("a stale revision conflicts: {other:?}"),
    }
    s.delete("/t/cas").await.expect("delete");
    match s.compare_and_swap("/t/cas", Some(r2), b"gone".to_vec(), None).await.expect("swap deleted") {
        CasOutcome::Conflict { current: None } => {}
        other => panic!("swapping a deleted key conflicts with nothing: {other:?}"),
    }
}

async fn transactions(b: Backend) {
    let s = &b.store;
    let empty = Condition::PrefixEmpty { prefix: "/t/txn/m/".into() };
    let put = |k: &str, v: &str| TxnOp::Put { key: k.into(), value: v.into(), lease: None };
    let r = s
        .txn(
            vec![empty.clone(), Condition::ModRevision { key: "/t/txn/h".into(), expected: None }],
            vec![put("/t/txn/h", "H1"), put("/t/txn/m/a", "A")],
        )
        .await
        .expect("txn")
        .expect("conditions hold on an empty store");
    let h = s.get("/t/txn/h").await.expect("get").expect("written");
    let a = s.get("/t/txn/m/a").await.expect("get").expect("written");
    assert_eq!((h.mod_revision, a.mod_revision), (r, r), "one revision for the whole transaction");
    // The prefix is no longer empty: nothing is written.
    let failed = s.txn(vec![empty.clone()], vec![put("/t/txn/h", "H2")]).await.expect("txn");
    assert_eq!(failed, None);
    assert_eq!(s.get("/t/txn/h").await.expect("get").expect("present").value, b"H1");
    // A stale revision fails as well; the current one succeeds, deletes included.
    assert_eq!(
        s.txn(
            vec![Condition::ModRevision { key: "/t/txn/h".into(), expected: Some(r - 1) }],
            vec![put("/t/txn/x", "")]
        )
        .await
        .expect("txn"),
        None
    );
    s.txn(
        vec![Condition::ModRevision { key: "/t/txn/h".into(), expected: Some(r) }],
        vec![TxnOp::Delete { key: "/t/txn/m/a".into() }],
    )
    .await
    .expect("txn")
    .expect("current revision");
    assert!(s.get("/t/txn/m/a").await.expect("get").is_none());
    assert!(s.txn(vec![empty], vec![]).await.expect("txn").is_some(), "the prefix is empty again");
}

async fn leases(b: Backend) {
    let s = &b.store;
    let lease = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    s.put("/t/lease/a", b"a".to_vec(), Some(lease)).await.expect("put with lease");
    s.put("/t/lease/b", b"b".to_vec(), Some(lease)).await.expect("put with lease");
    s.put("/t/lease/c", b"c".to_vec(), None).await.expect("put without lease");
    assert_eq!(s.get("/t/lease/a").await.expect("get").expect("present").lease, Some(lease));
    s.keep_alive(lease).await.expect("keep alive");
    s.revoke_lease(lease).await.expect("revoke");
    let left: Vec<String> = s.list("/t/lease/").await.expect("list").kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(left, ["/t/lease/c"], "revoking deletes exactly the lease's keys");
    let lost = |r: Result<(), CoordinatorError>| matches!(r, Err(CoordinatorError::LeaseNotFound { lease: l }) if l == lease.0);
    assert!(lost(s.keep_alive(lease).await), "keep-alive of a revoked lease");
    assert!(lost(s.revoke_lease(lease).await), "revoking twice");
    assert!(lost(s.put("/t/lease/d", vec![], Some(lease)).await.map(|_| ())), "put with a revoked lease");
    assert!(s.get("/t/lease/d").await.expect("get").is_none());
}

async fn lease_expiry_and_keep_alive(b: Backend) {
    let s = &b.store;
    let kept = LeaseKeeper::grant(Arc::clone(s), b.ttl).await.expect("grant kept lease");
    let lapsing = s.grant_lease(b.ttl).await.expect("grant lapsing lease");
    s.put("/t/expiry/kept", vec![], Some(kept.lease())).await.expect("put");
    s.put("/t/expiry/lapsing", vec![], Some(lapsing)).await.expect("put");
    let gone = eventually(b.ttl * 2 + Duration::from_millis(200), "the unrefreshed key expires", || async {
        s.get("/t/expiry/lapsing").await.expect("get").is_none()
    })
    .await;
    assert!(gone >= b.ttl / 2, "a key expired after {gone:?}, long before its TTL of {:?}", b.ttl);
    // By now the kept lease has outlived its TTL several refreshes over.
    tokio::time::sleep(b.ttl / 2).await;
    assert!(s.get("/t/expiry/kept").await.expect("get").is_some(), "the keeper keeps its lease alive");
    assert!(!kept.is_lost());
    kept.abandon();
    eventually(b.ttl * 2, "an abandoned lease expires within two lease periods", || async {
        s.get("/t/expiry/kept").await.expect("get").is_none()
    })
    .await;
}

async fn watches(b: Backend) {
    let s = &b.store;
    let start = s.put("/t/w/before", b"0".to_vec(), None).await.expect("put");
    let mut live = s.watch("/t/w/", None).await.expect("watch");
    let lease = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let r1 = s.put("/t/w/a", b"1".to_vec(), Some(lease)).await.expect("put");
    s.put("/t/other", b"x".to_vec(), None).await.expect("put outside");
    s.put("/t/w/a", b"2".to_vec(), Some(lease)).await.expect("put again");
    s.delete("/t/w/before").await.expect("delete");
    s.revoke_lease(lease).await.expect("revoke");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut live).await);
    }
    match &seen[0] {
        WatchEvent::Put(kv) => assert_eq!(
            (kv.key.as_str(), kv.value.as_slice(), kv.version, kv.mod_revision),
            ("/t/w/a", &b"1"[..], 1, r1)
        ),
        other => panic!("first event: {other:?}"),
    }
    assert!(matches!(&seen[1], WatchEvent::Put(kv) if kv.version == 2 && kv.value == b"2"), "{:?}", seen[1]);
    assert!(matches!(&seen[2], WatchEvent::Delete { key, .. } if key == "/t/w/before"), "{:?}", seen[2]);
    assert!(matches!(&seen[3], WatchEvent::Delete { key, .. } if key == "/t/w/a"), "lease revoke: {:?}", seen[3]);
    assert!(seen.windows(2).all(|w| w[0].revision() < w[1].revision()), "in revision order: {seen:?}");
    // A watch from a past revision replays history.
    let mut replay = s.watch("/t/w/", Some(start)).await.expect("watch from the past");
    match next_event(&mut replay).await {
        WatchEvent::Put(kv) => assert_eq!((kv.key.as_str(), kv.mod_revision), ("/t/w/before", start)),
        other => panic!("replay starts at the revision asked for: {other:?}"),
    }
    for expected in &seen {
        assert_eq!(&next_event(&mut replay).await, expected);
    }
}

async fn election_primitives(b: Backend) {
    let s = &b.store;
    let election = "/t/elect/coordinator";
    assert_eq!(s.leader(election).await.expect("leader"), None);
    let la = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let lb = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let a = s.campaign(election, la, b"a".to_vec()).await.expect("a leads");
    assert_eq!(a.lease, la);
    assert_eq!(s.leader(election).await.expect("leader").expect("a leader").value, b"a");
    let store = Arc::clone(s);
    let b_campaign = tokio::spawn(async move { store.campaign(election, lb, b"b".to_vec()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_campaign.is_finished(), "b waits while a leads");
    // Campaigning again with a's lease keeps a's place.
    assert_eq!(s.campaign(election, la, b"a".to_vec()).await.expect("again"), a);
    s.resign(&a).await.expect("resign");
    let bk = tokio::time::timeout(Duration::from_secs(5), b_campaign)
        .await
        .expect("b leads once a resigns")
        .expect("join")
        .expect("campaign");
    assert_eq!(s.leader(election).await.expect("leader").expect("b leads").value, b"b");
    assert!(bk.create_revision > a.create_revision);
    s.revoke_lease(lb).await.expect("revoke");
    assert_eq!(s.leader(election).await.expect("leader"), None, "no candidate, no leader");
}

async fn abandoned_campaign_ends_with_its_lease(b: Backend) {
    let s = &b.store;
    let election = "/t/abandon/coordinator";
    let candidates = || async { s.list(&format!("{election}/")).await.expect("list").kvs.len() };
    let la = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let a = s.campaign(election, la, b"a".to_vec()).await.expect("a leads");
    let lb = LeaseKeeper::grant(Arc::clone(s), b.ttl).await.expect("grant");
    let b_campaign = {
        let (store, lease) = (Arc::clone(s), lb.lease());
        tokio::spawn(async move { store.campaign(election, lease, b"b".to_vec()).await })
    };
    eventually(Duration::from_secs(5), "b becomes a candidate", || async { candidates().await == 2 }).await;
    // b's process dies while it waits: its campaign call goes away and nobody refreshes its lease.
    b_campaign.abort();
    lb.abandon();
    eventually(b.ttl * 2 + Duration::from_millis(500), "b's candidacy ends with its lease", || async {
        candidates().await == 1
    })
    .await;
    s.resign(&a).await.expect("resign");
    assert_eq!(s.leader(election).await.expect("leader"), None, "a candidate that went away never leads");
    s.revoke_lease(la).await.expect("revoke");
}

fn member(id: &str, hash: &str) -> Member {
    Member {
        worker_id: id.into(),
        role: MemberRole::Expert,
        endpoint: format!("http://127.0.0.1:1/{id}"),
        node: "node-a".into(),
        device: "cuda:0".into(),
        memory_budget_bytes: 80 << 30,
        checkpoint_hash: hash.into(),
        kv_dtype: None,
    }
}

async fn next_change(events: &mut BoxStream<Result<MembershipEvent, CoordinatorError>>) -> MembershipEvent {
    let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("a change within 5 s");
    next.expect("the watch is still open").expect("a change, not an error")
}

async fn membership_register_list_watch(b: Backend) {
    let membership = Membership::new(ClusterStore::new(Arc::clone(&b.store), "c1").expect("cluster"));
    let ew0 = membership.register(member("ew-0", "sha-1"), b.ttl).await.expect("register ew-0");
    let (now, mut events) = membership.watch().await.expect("watch");
    assert_eq!(now, vec![member("ew-0", "sha-1")]);
    let mut aw = member("aw-0", "sha-1");
    aw.role = MemberRole::Attention;
    let aw0 = membership.register(aw.clone(), b.ttl).await.expect("register aw-0");
    assert_eq!(next_change(&mut events).await, MembershipEvent::Joined(aw.clone()));
    assert_eq!(membership.members().await.expect("members"), vec![aw, member("ew-0", "sha-1")]);
    assert_eq!(membership.checkpoint_hash().await.expect("hash").as_deref(), Some("sha-1"));
    // A restarted worker re-registers before its old lease lapsed: an update, and the old lease no longer owns it.
    let mut moved = member("ew-0", "sha-1");
    moved.endpoint = "http://127.0.0.1:2/ew-0".into();
    let ew0_again = membership.register(moved.clone(), b.ttl).await.expect("re-register ew-0");
    assert_eq!(next_change(&mut events).await, MembershipEvent::Updated(moved));
    ew0.abandon();
    aw0.deregister().await.expect("deregister");
    assert_eq!(next_change(&mut events).await, MembershipEvent::Left { worker_id: "aw-0".into() });
    // Longer than the abandoned lease lived: the re-registered worker is still a member.
    tokio::time::sleep(b.ttl * 2).await;
    let ids: Vec<String> = membership.members().await.expect("members").into_iter().map(|m| m.worker_id).collect();
    assert_eq!(ids, ["ew-0"]);
    ew0_again.deregister().await.expect("deregister");
    assert_eq!(next_change(&mut events).await, MembershipEvent::Left { worker_id: "ew-0".into() });
    assert!(matches!(
        membership.register(member("bad/id", "sha-1"), b.ttl).await,
        Err(CoordinatorError::InvalidName { field: "worker_id", .. })
    ));
}

async fn member_vanishes_within_two_lease_periods(b: Backend) {
    let membership = Membership::new(ClusterStore::new(Arc::clone(&b.store), "c2").expect("cluster"));
    let (_, mut events) = membership.watch().await.expect("watch");
    let worker = membership.register(member("ew-7", "sha-1"), b.ttl).await.expect("register");
    assert!(matches!(events.next().await, Some(Ok(MembershipEvent::Joined(_)))));
    // Alive well past its TTL while the keep-alive runs.
    tokio::time::sleep(b.ttl + b.ttl / 2).await;
    assert_eq!(membership.members().await.expect("members").len(), 1, "kept alive past its TTL");
    // Now the worker dies: the keep-alive stops.
    let died = Instant::now();
    worker.abandon();
    let left = tokio::time::timeout(b.ttl * 2, events.next())
        .await
        .unwrap_or_else(|_| panic!("a dead worker must vanish within two lease periods ({:?})", b.ttl * 2));
    assert!(matches!(left, Some(Ok(MembershipEvent::Left { ref worker_id })) if worker_id == "ew-7"), "{left:?}");
    let after = died.elapsed();
    assert!(membership.members().await.expect("members").is_empty());
    eprintln!("member vanished {:.0} ms after its keep-alive stopped (TTL {:?})", after.as_secs_f64() * 1e3, b.ttl);
}

async fn checkpoint_mismatch_is_refused(b: Backend) {
    let membership = Membership::new(ClusterStore::new(Arc::clone(&b.store), "c3").expect("cluster"));
    let first = membership.register(member("ew-0", "aaaa1111"), b.ttl).await.expect("register");
    let err = match membership.register(member("ew-1", "bbbb2222"), b.ttl).await {
        Err(e) => e,
        Ok(_) => panic!("a worker with another checkpoint must be refused"),
    };
    let text = err.to_string();
    assert!(matches!(err, CoordinatorError::CheckpointMismatch { .. }), "{err:?}");
    assert!(text.contains("ew-1") && text.contains("aaaa1111") && text.contains("bbbb2222"), "{text}");
    assert!(!err.retryable());
    let ids: Vec<String> = membership.members().await.expect("members").into_iter().map(|m| m.worker_id).collect();
    assert_eq!(ids, ["ew-0"], "the refused worker left no record");
    // Once the cluster is empty, a new checkpoint may take over.
    first.deregister().await.expect("deregister");
    let second = membership.register(member("ew-1", "bbbb2222"), b.ttl).await.expect("new checkpoint, empty cluster");
    assert_eq!(membership.checkpoint_hash().await.expect("hash").as_deref(), Some("bbbb2222"));
    assert!(membership.register(member("ew-2", "aaaa1111"), b.ttl).await.is_err(), "the old one is refused now");
    second.deregister().await.expect("deregister");
}

/// Leaders reported by `observed` up to and including `leader`.
async fn observe_until(
    observed: &mut BoxStream<Result<Option<String>, CoordinatorError>>,
    leader: &str,
) -> Vec<Option<String>> {
    let mut leaders = Vec::new();
    while leaders.last() != Some(&Some(leader.to_string())) {
        let next = tokio::time::timeout(Duration::from_secs(5), observed.next()).await.expect("observed change");
        leaders.push(next.expect("open").expect("leader"));
    }
    leaders
}

async fn election_failover(b: Backend) {
    let cluster = ClusterStore::new(Arc::clone(&b.store), "c4").expect("cluster");
    let election = Election::new(&cluster, "coordinator", b.ttl).expect("election");
    let mut observed = election.observe().await.expect("observe");
    assert_eq!(observed.next().await.expect("open").expect("leader"), None);
    let a = election.campaign("coord-a").await.expect("a leads");
    assert_eq!(election.leader().await.expect("leader").as_deref(), Some("coord-a"));
    let waiting = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("coord-b").await })
    };
    let waiting_c = {
        let election = election.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            election.campaign("coord-c").await
        })
    };
    tokio::time::sleep(b.ttl * 2).await;
    assert!(!waiting.is_finished(), "b waits while a keeps its lease alive, past its TTL");
    // a is killed: its keep-alive stops and b takes over once the lease lapses.
    let killed = Instant::now();
    a.abandon();
    let bl = tokio::time::timeout(b.ttl * 2 + Duration::from_millis(500), waiting)
        .await
        .expect("b leads within two lease periods of a's death")
        .expect("join")
        .expect("campaign");
    eprintln!("failover after {:.0} ms (TTL {:?})", killed.elapsed().as_secs_f64() * 1e3, b.ttl);
    assert_eq!(election.leader().await.expect("leader").as_deref(), Some("coord-b"));
    assert!(!waiting_c.is_finished(), "c entered after b: it still waits");
    assert_eq!(observe_until(&mut observed, "coord-b").await, [Some("coord-a".into()), Some("coord-b".into())]);
    // b resigns: c leads at once.
    bl.resign().await.expect("resign");
    let cl = tokio::time::timeout(Duration::from_secs(5), waiting_c)
        .await
        .expect("c leads once b resigns")
        .expect("join")
        .expect("campaign");
    assert_eq!(election.leader().await.expect("leader").as_deref(), Some("coord-c"));
    assert_eq!(observe_until(&mut observed, "coord-c").await, [Some("coord-c".into())]);
    cl.resign().await.expect("resign");
    assert_eq!(election.leader().await.expect("leader"), None);
}

async fn placement_and_load(b: Backend) {
    let cluster = ClusterStore::new(Arc::clone(&b.store), "c5").expect("cluster");
    assert_eq!(cluster.placement().await.expect("placement"), None);
    let (none, mut updates) = cluster.watch_placement().await.expect("watch");
    assert_eq!(none, None);
    let e1 = Placement::contiguous(&[1, 3], 8, 2, 1).expect("placement");
    let PublishOutcome::Published { revision } = cluster.publish_placement(&e1, None).await.expect("publish") else {
        panic!("the first placement is published")
    };
    let current = cluster.placement().await.expect("placement").expect("current");
    assert_eq!((&current.placement, current.revision), (&e1, revision));
    assert_eq!(updates.next().await.expect("open").expect("update"), current);
    // Two coordinators race from the same read: one wins, the other learns what is current.
    let e2 = Placement::contiguous(&[1, 3], 8, 4, 2).expect("placement");
    let mut e2_other = e2.clone();
    e2_other.workers.truncate(3);
    assert!(matches!(cluster.publish_placement(&e2, Some(&current)).await, Ok(PublishOutcome::Published { .. })));
    match cluster.publish_placement(&e2_other, Some(&current)).await.expect("publish") {
        PublishOutcome::Superseded { current: Some(now) } => assert_eq!(now.placement, e2),
        other => panic!("the second writer is superseded: {other:?}"),
    }
    let now = cluster.placement().await.expect("placement").expect("current");
    assert!(matches!(cluster.publish_placement(&e1, Some(&now)).await, Err(CoordinatorError::Placement { .. })));
    assert_eq!(updates.next().await.expect("open").expect("update").placement, e2);

    let mut stats = LoadStats::new(0.5);
    stats.record(&BTreeMap::from([(1, vec![10, 0]), (3, vec![4, 4])]));
    stats.record(&BTreeMap::from([(1, vec![20, 10])]));
    assert_eq!(stats.layers[&1], vec![15.0, 5.0]);
    assert_eq!(stats.layers[&3], vec![4.0, 4.0]);
    cluster.report_load("aw-0", &stats, None).await.expect("report");
    let lease = b.store.grant_lease(Duration::from_secs(30)).await.expect("grant");
    cluster.report_load("aw-1", &stats, Some(lease)).await.expect("report");
    assert_eq!(cluster.loads().await.expect("loads").len(), 2);
    assert_eq!(cluster.total_load().await.expect("total")[&1], vec![30.0, 10.0]);
    b.store.revoke_lease(lease).await.expect("revoke");
    assert_eq!(cluster.total_load().await.expect("total")[&1], vec![15.0, 5.0], "load vanishes with its worker");
}

#[tokio::test]
async fn connect_names_a_bad_url_and_the_accepted_forms() {
    for url in [
        "memory",
        "localhost:2379",
        "ftp://10.0.0.1:21",
        "etcd://",
        "etcd://10.0.0.1",
        "etcd://10.0.0.1:2379,,10.0.0.2:2379",
        "etcd://10.0.0.1:99999",
        "etcd://http://10.0.0.1:2379",
        "http://",
        "https://10.0.0.1:7000",
    ] {
        let error = match connect(url).await {
            Err(e) => e,
            Ok(store) => panic!("{url:?} is not a store URL, yet it connected to {}", store.describe()),
        };
        let text = error.to_string();
        assert!(matches!(error, CoordinatorError::InvalidName { field: "store URL", .. }), "{url}: {error:?}");
        assert!(text.contains(&format!("{url:?}")) && text.contains("host:port"), "names the URL and the form: {text}");
        assert!(!error.retryable());
    }
}

#[tokio::test]
async fn connect_gives_up_on_a_silent_url_naming_it() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address");
    let url = format!("http://{free}");
    let error = match connect_within(&url, Duration::from_millis(800)).await {
        Err(e) => e,
        Ok(_) => panic!("nothing listens at {url}"),
    };
    let text = error.to_string();
    assert!(text.contains(&url) && text.contains("gave up after"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_a_server_that_is_not_a_store() {
    let (_, health) = tonic_health::server::health_reporter();
    let server = ServedStore::start(tonic::transport::Server::builder().add_service(health), loopback_any_port()).await;
    let started = Instant::now();
    let error = match connect(&server.url()).await {
        Err(e) => e,
        Ok(_) => panic!("a health-only server is not a store"),
    };
    assert!(started.elapsed() < Duration::from_secs(5), "a wrong service is an answer: no retrying");
    assert!(error.to_string().contains("switchyard.v1.Store"), "{error}");
    assert!(!error.retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_errors_keep_their_variant() {
    let server = ServedStore::start(store_router(Arc::new(MemoryStore::with_history(2))), loopback_any_port()).await;
    let store = connect(&server.url()).await.expect("connect");
    for i in 0..5 {
        store.put(&format!("/t/h/{i}"), vec![], None).await.expect("put");
    }
    match store.watch("/t/h/", Some(1)).await {
        Err(CoordinatorError::WatchLost { prefix, .. }) => assert_eq!(prefix, "/t/h/"),
        Err(e) => panic!("a watch from before the kept history is lost, not {e:?}"),
        Ok(_) => panic!("a watch from before the kept history is lost"),
    }
    assert!(matches!(store.keep_alive(LeaseId(12345)).await, Err(CoordinatorError::LeaseNotFound { lease: 12345 })));
    let twice = vec![TxnOp::Delete { key: "/t/h/0".into() }, TxnOp::Delete { key: "/t/h/0".into() }];
    match store.txn(vec![], twice).await {
        Err(e @ CoordinatorError::StoreRequest { .. }) => assert!(e.to_string().contains("twice"), "{e}"),
        other => panic!("writing a key twice in one transaction is refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_is_reached_again_after_the_coordinator_restarts() {
    let mut first = ServedStore::start(store_router(Arc::new(MemoryStore::new())), loopback_any_port()).await;
    let store = connect(&first.url()).await.expect("connect");
    let lease = store.grant_lease(Duration::from_secs(30)).await.expect("grant");
    store.put("/t/restart/a", b"1".to_vec(), Some(lease)).await.expect("put");
    let mut events = store.watch("/t/restart/", None).await.expect("watch");

    first.kill();
    let ended = tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("the watch ends");
    assert!(matches!(ended, Some(Err(CoordinatorError::WatchLost { .. }))), "re-read and watch again: {ended:?}");
    match store.get("/t/restart/a").await {
        Err(e) => assert!(e.retryable() && e.to_string().contains(&first.url()), "{e}"),
        Ok(kv) => panic!("the coordinator is down, yet get answered {kv:?}"),
    }

    // The coordinator comes back on the same port with an empty store: the same client reaches it by itself.
    let second = ServedStore::start(store_router(Arc::new(MemoryStore::new())), first.addr).await;
    eventually(Duration::from_secs(5), "the restarted store answers", || async {
        store.get("/t/restart/a").await.is_ok()
    })
    .await;
    assert_eq!(store.get("/t/restart/a").await.expect("get"), None, "a restarted memory store starts empty");
    assert!(matches!(store.keep_alive(lease).await, Err(CoordinatorError::LeaseNotFound { .. })));
    let mut events = store.watch("/t/restart/", None).await.expect("watch again");
    store.put("/t/restart/b", b"2".to_vec(), None).await.expect("put");
    assert!(matches!(next_event(&mut events).await, WatchEvent::Put(kv) if kv.key == "/t/restart/b"));
    drop(second);
}
