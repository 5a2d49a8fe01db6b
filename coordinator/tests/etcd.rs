//! What only a real etcd can show: restarts, an unreachable etcd at start, and leases revoked on the server.
//!
//! Each test starts its own etcd on free loopback ports (Debian package `etcd-server`); without the `etcd` binary
//! they fail with a message saying how to install it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_coordinator::election::Election;
use switchyard_coordinator::membership::{Member, MemberRole, Membership, MembershipEvent};
use switchyard_coordinator::store::{
    ClusterStore, EtcdConfig, EtcdServer, EtcdStore, LeaseKeeper, Store, WatchEvent, WatchStream,
};
use switchyard_coordinator::CoordinatorError;
use tokio_stream::StreamExt;

fn start_etcd() -> EtcdServer {
    EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
}

fn config(endpoint: String) -> EtcdConfig {
    let mut config = EtcdConfig::new([endpoint]);
    config.request_timeout = Duration::from_secs(1);
    config.initial_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(400);
    config.connect_deadline = Duration::from_secs(10);
    config
}

fn member(id: &str) -> Member {
    Member {
        worker_id: id.into(),
        role: MemberRole::Expert,
        endpoint: format!("http://127.0.0.1:1/{id}"),
        node: "node-a".into(),
        device: "cuda:0".into(),
        memory_budget_bytes: 1 << 30,
        checkpoint_hash: "sha-1".into(),
        kv_dtype: None,
    }
}

async fn next_event(events: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch is still open")
        .expect("an event, not an error")
}

/// Log lines written through `tracing`, captured for assertions.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

// Current-thread runtime: the log capture is per thread.
#[tokio::test]
async fn unreachable_etcd_retries_with_backoff_then_names_the_endpoint() {
    let (logs, _guard) = capture_logs();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut config = config(endpoint.clone());
    config.connect_deadline = Duration::from_millis(800);
    config.initial_backoff = Duration::from_millis(50);
    let start = Instant::now();
    let err = match EtcdStore::connect(config).await {
        Err(e) => e,
        Ok(_) => panic!("nothing listens on {endpoint}"),
    };
    let took = start.elapsed();
    let CoordinatorError::StoreUnreachable { ref endpoints, attempts, .. } = err else { panic!("{err:?}") };
    assert_eq!(endpoints, &endpoint);
    // 50 + 100 + 200 + 400 ms of backoff fit in 0.8 s: at least four attempts.
    assert!(attempts >= 4, "attempts: {attempts}");
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(3), "gave up after {took:?}");
    let text = err.to_string();
    assert!(text.contains(&endpoint) && text.contains("unreachable"), "{text}");
    let logs = logs.text();
    let retries = logs.lines().filter(|l| l.contains("not reachable") && l.contains(&endpoint)).count();
    assert!(retries >= 3, "each retry is logged, naming the endpoint:\n{logs}");
    assert!(logs.contains("retrying in 50 ms") && logs.contains("retrying in 100 ms"), "backoff doubles:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_waits_for_an_etcd_that_starts_late() {
    let mut server = start_etcd();
    server.kill();
    let endpoint = server.endpoint();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        server.restart().expect("restart etcd");
        server
    });
    let start = Instant::now();
    let store = EtcdStore::connect(config(endpoint)).await.expect("connects once etcd is up");
    assert!(start.elapsed() >= Duration::from_millis(400), "it connected before etcd started?");
    store.put("/late", b"ok".to_vec(), None).await.expect("put");
    let _server = starter.join().expect("starter thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_reconnects_by_itself_after_an_etcd_restart() {
    let mut server = start_etcd();
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(config(server.endpoint())).await.expect("connect"));
    let cluster = ClusterStore::new(Arc::clone(&store), "restart").expect("cluster");
    let membership = Membership::new(cluster.clone());
    let ttl = Duration::from_secs(2);
    let registration = membership.register(member("ew-0"), ttl).await.expect("register");
    let (_, mut changes) = membership.watch().await.expect("watch members");
    let mut events = store.watch("/data/", None).await.expect("watch");
    store.put("/data/before", b"1".to_vec(), None).await.expect("put");
    assert_eq!(next_event(&mut events).await.key(), "/data/before");
    let election = Election::new(&cluster, "coordinator", ttl).expect("election");
    let leader = election.campaign("coord-a").await.expect("a leads");
    let waiting = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("coord-b").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    server.kill();
    let err = store.get("/data/before").await.expect_err("etcd is down");
    assert!(err.retryable(), "an outage is retryable: {err:?}");
    assert!(matches!(err, CoordinatorError::StoreUnavailable { .. }), "{err:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = Instant::now();
    server.restart().expect("restart etcd on the same ports and data");

    // The same client works again without being rebuilt.
    let mut attempts = 0;
    let value = loop {
        attempts += 1;
        match store.get("/data/before").await {
            Ok(kv) => break kv,
            Err(e) if e.retryable() && restarted.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("no reconnect after the restart: {e}"),
        }
    };
    eprintln!(
        "reads work again {:.0} ms after etcd restarted ({attempts} tries)",
        restarted.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(value.expect("the data survived the restart").value, b"1");

    // The watch re-opened itself from where it stopped.
    store.put("/data/after", b"2".to_vec(), None).await.expect("put after restart");
    let event = next_event(&mut events).await;
    assert!(matches!(&event, WatchEvent::Put(kv) if kv.key == "/data/after" && kv.value == b"2"), "{event:?}");

    // The member's lease outlived the outage and is still kept alive, past its TTL.
    tokio::time::sleep(ttl + ttl / 4).await;
    let ids: Vec<String> = membership.members().await.expect("members").into_iter().map(|m| m.worker_id).collect();
    assert_eq!(ids, ["ew-0"]);
    assert!(!leader.is_lost(), "the leader's lease survived the restart");
    assert!(!waiting.is_finished(), "b still waits behind a");

    // The interrupted campaign resumed: b leads once a resigns.
    leader.resign().await.expect("resign");
    let b = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("b leads after a resigns")
        .expect("join")
        .expect("campaign");
    assert_eq!(election.leader().await.expect("leader").as_deref(), Some("coord-b"));
    b.resign().await.expect("resign");

    registration.deregister().await.expect("deregister");
    let left = tokio::time::timeout(Duration::from_secs(10), changes.next()).await.expect("a change");
    assert!(matches!(left, Some(Ok(MembershipEvent::Left { ref worker_id })) if worker_id == "ew-0"), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_leaders_lease_on_the_server_hands_over_at_once() {
    let server = start_etcd();
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(config(server.endpoint())).await.expect("connect"));
    let cluster = ClusterStore::new(Arc::clone(&store), "revoke").expect("cluster");
    let election = Election::new(&cluster, "coordinator", Duration::from_secs(10)).expect("election");
    let a = election.campaign("coord-a").await.expect("a leads");
    let waiting = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("coord-b").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    // What `etcdctl lease revoke` does (or an operator fencing a coordinator).
    let revoked = Instant::now();
    store.revoke_lease(a.leader_key().lease).await.expect("revoke a's lease");
    let b = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("b leads at once, not after a's 10 s TTL")
        .expect("join")
        .expect("campaign");
    assert!(revoked.elapsed() < Duration::from_secs(2), "handover took {:?}", revoked.elapsed());
    // a learns it lost the lead at its next refresh (a third of its TTL at most).
    tokio::time::timeout(Duration::from_secs(5), a.lost()).await.expect("a notices its lease is gone");
    assert_eq!(election.leader().await.expect("leader").as_deref(), Some("coord-b"));
    b.resign().await.expect("resign");
    // A lease keeper notices a revoked lease too.
    let keeper = LeaseKeeper::grant(Arc::clone(&store), Duration::from_secs(3)).await.expect("grant");
    store.revoke_lease(keeper.lease()).await.expect("revoke");
    tokio::time::timeout(Duration::from_secs(3), keeper.lost()).await.expect("keeper notices");
}
