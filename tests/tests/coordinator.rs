//! The coordinator in a running cluster (`switchyard up`): live rebalancing, recovery from a killed expert worker,
//! coordinator failover and etcd restarts, and the errors an operator sees when a cluster cannot form.
//!
//! Every generation is checked against the single-process run of the same model: a rebalance or a recovery may
//! change which worker computes an expert, never what it computes.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_coordinator::membership::Membership;
use switchyard_coordinator::store::{self, ClusterStore, EtcdServer};
use switchyard_tests::{
    assert_equivalent, binary, epoch_in, generate_through, make_tiny, placement_show, read_json, single_process,
    switchyard, Cluster, Traffic,
};

/// Tokens per generation of the background traffic: long enough that steps are in flight when things change.
const TRAFFIC_TOKENS: u32 = 48;

/// Checks that every run of the traffic succeeded and equals the reference; returns how many there were.
fn assert_all_equal(runs: Vec<(std::path::PathBuf, std::process::Output)>, reference: &serde_json::Value) -> usize {
    assert!(!runs.is_empty(), "the traffic ran no generation");
    for (out, output) in &runs {
        assert!(output.status.success(), "a request failed: {}", String::from_utf8_lossy(&output.stderr));
        assert_equivalent(&out.display().to_string(), reference, &read_json(out));
    }
    runs.len()
}

/// Writes a loads file (`placement rebalance --loads`) for the tiny model (MoE layers 1 and 3, 8 experts) where
/// expert `hot` takes most tokens in both layers.
fn skewed_loads(path: &Path, hot: usize) {
    let layer: Vec<u32> = (0..8).map(|e| if e == hot { 1000 } else { 10 }).collect();
    let text = serde_json::json!({ "loads": [layer.clone(), layer] }).to_string();
    std::fs::write(path, text).expect("write loads");
}

/// Asks the cluster's leading coordinator to re-place for `loads` and waits for the new epoch; returns it.
fn rebalance(store: &str, loads: &Path) -> u64 {
    let output = switchyard(&[
        "placement",
        "rebalance",
        "--store",
        store,
        "--loads",
        loads.to_str().expect("utf-8"),
        "--wait-ms",
        "30000",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "placement rebalance: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    epoch_in(&stdout).unwrap_or_else(|| panic!("no epoch in {stdout:?}"))
}

/// Polls `placement show` until `done` holds for its output, for at most `limit`.
fn wait_for_placement(store: &str, limit: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let shown = placement_show(store);
        if done(&shown) {
            return shown;
        }
        assert!(Instant::now() < deadline, "{what} within {limit:?}; last placement:\n{shown}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three rebalances while two attention workers generate: the first one the coordinator starts by itself from the
/// routed-token counts the attention workers report, the next two asked for by an operator with other load profiles.
#[test]
fn three_rebalances_while_serving_fail_no_request_and_change_no_output() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 7);
    let reference = single_process(&model, &work.path().join("single.json"), false, TRAFFIC_TOKENS);
    let cluster = Cluster::start(&[
        "--model",
        model.to_str().expect("utf-8"),
        "--expert-workers",
        "3",
        "--attention-workers",
        "2",
        "--redundant-slots",
        "4",
        "--lease-ttl-ms",
        "1000",
        "--rebalance-threshold",
        "1.05",
        "--rebalance-interval-ms",
        "1500",
    ]);
    let first = epoch_in(&placement_show(&cluster.store)).expect("a first epoch");
    let traffic = Traffic::start(&cluster.attention_endpoints(), work.path(), TRAFFIC_TOKENS);
    // The initial placement assumed equal loads; real routing is skewed, so the measured imbalance triggers one.
    let shown = wait_for_placement(&cluster.store, Duration::from_secs(30), "a load-driven rebalance", |shown| {
        epoch_in(shown).is_some_and(|e| e > first)
    });
    let mut epochs = vec![first, epoch_in(&shown).expect("an epoch")];
    assert!(cluster.stderr().contains("trigger=measured imbalance"), "{}", cluster.stderr());
    for (i, hot) in [5, 2].into_iter().enumerate() {
        // Let requests be mid-generation when the placement changes.
        std::thread::sleep(Duration::from_millis(700));
        let loads = work.path().join(format!("loads-{i}.json"));
        skewed_loads(&loads, hot);
        let epoch = rebalance(&cluster.store, &loads);
        assert!(epoch > *epochs.last().expect("an epoch"), "epochs {epochs:?} then {epoch}");
        epochs.push(epoch);
    }
    std::thread::sleep(Duration::from_millis(500));
    let runs = assert_all_equal(traffic.finish(), &reference);
    println!("{runs} generations through epochs {epochs:?}");
    let log = cluster.stderr();
    // Old replicas were freed once no step used them.
    assert!(log.contains("experts unloaded"), "no expert worker freed a replica:\n{log}");
}

#[test]
fn a_killed_expert_worker_is_re_placed_and_every_request_completes() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 8);
    let reference = single_process(&model, &work.path().join("single.json"), false, TRAFFIC_TOKENS);
    // No redundant slots: the killed worker's experts exist nowhere else until the coordinator re-places them.
    let cluster = Cluster::start(&[
        "--model",
        model.to_str().expect("utf-8"),
        "--expert-workers",
        "3",
        "--attention-workers",
        "2",
        "--lease-ttl-ms",
        "1000",
    ]);
    let first = epoch_in(&placement_show(&cluster.store)).expect("a first epoch");
    let traffic = Traffic::start(&cluster.attention_endpoints(), work.path(), TRAFFIC_TOKENS);
    std::thread::sleep(Duration::from_millis(1500));
    cluster.signal("ew-1", libc::SIGKILL);
    let killed = Instant::now();
    let shown = wait_for_placement(&cluster.store, Duration::from_secs(20), "ew-1's experts re-placed", |shown| {
        epoch_in(shown).is_some_and(|e| e > first) && !shown.contains("ew-1")
    });
    println!("re-placed {:?} after the kill:\n{shown}", killed.elapsed());
    std::thread::sleep(Duration::from_millis(1000));
    let runs = assert_all_equal(traffic.finish(), &reference);
    println!("{runs} generations, none lost");
    assert!(cluster.is_alive("aw-0") && cluster.is_alive("aw-1") && cluster.is_alive("ew-0"));
}

#[test]
fn the_only_expert_worker_killed_fails_requests_clearly_and_the_rest_keeps_serving() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 3);
    let mut cluster = Cluster::start(&[
        "--model",
        model.to_str().expect("utf-8"),
        "--expert-workers",
        "1",
        "--lease-ttl-ms",
        "1000",
        "--recovery-timeout-ms",
        "3000",
    ]);
    let mut client = Command::new(binary())
        .args([
            "generate",
            "--endpoint",
            &cluster.endpoint,
            "--prompt-ids",
            &switchyard_tests::prompt_ids(),
            "--max-new-tokens",
            "3000",
            "--ignore-eos",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client starts");
    std::thread::sleep(Duration::from_millis(1500));
    cluster.signal("ew-0", libc::SIGKILL);
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = client.try_wait().expect("client status") {
            break status;
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "the client hung after the expert worker died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = client.wait_with_output().expect("client output");
    let message = String::from_utf8_lossy(&output.stderr);
    println!("client failed {:?} after the kill: {message}", killed.elapsed());
    assert!(!status.success(), "nothing can compute the experts: the request must fail");
    assert!(message.contains("ew-0"), "the error names the lost worker: {message}");
    assert!(cluster.up_is_running());
    assert!(cluster.is_alive("aw-0") && cluster.is_alive("coordinator"));
    assert!(cluster.stderr().contains("expert worker ew-0"), "{}", cluster.stderr());
}

/// The leader's candidate id, from `placement show`'s status line (`leader c-0`).
fn leader(store: &str) -> String {
    let shown = placement_show(store);
    let rest = &shown[shown.find("leader ").unwrap_or_else(|| panic!("no leader in {shown}")) + "leader ".len()..];
    rest.split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == ')').next().unwrap_or_default().to_string()
}

#[test]
fn killing_the_leading_coordinator_hands_over_and_serving_continues() {
    let etcd = EtcdServer::start().expect("etcd for the test (scripts/ensure-deps.sh test installs etcd-server)");
    let store = format!("etcd://{}", etcd.endpoint().trim_start_matches("http://"));
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 9);
    let reference = single_process(&model, &work.path().join("single.json"), false, TRAFFIC_TOKENS);
    let cluster = Cluster::start(&[
        "--model",
        model.to_str().expect("utf-8"),
        "--expert-workers",
        "2",
        "--store",
        &store,
        "--coordinators",
        "2",
        "--redundant-slots",
        "2",
        "--lease-ttl-ms",
        "1000",
    ]);
    let before = leader(&cluster.store);
    let traffic = Traffic::start(&cluster.attention_endpoints(), work.path(), TRAFFIC_TOKENS);
    std::thread::sleep(Duration::from_millis(500));
    cluster.signal(&before, libc::SIGKILL);
    // The other coordinator leads once the killed one's lease lapses, and acts as leader: it handles a rebalance.
    let loads = work.path().join("loads.json");
    skewed_loads(&loads, 6);
    let epoch = rebalance(&cluster.store, &loads);
    let after = leader(&cluster.store);
    assert_ne!(after, before, "the killed coordinator still leads");
    println!("{before} killed; {after} leads and published epoch {epoch}");
    let runs = assert_all_equal(traffic.finish(), &reference);
    println!("{runs} generations across the hand-over");
}

#[test]
fn every_component_reconnects_after_an_etcd_restart() {
    let mut etcd = EtcdServer::start().expect("etcd for the test (scripts/ensure-deps.sh test installs etcd-server)");
    let store = format!("etcd://{}", etcd.endpoint().trim_start_matches("http://"));
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 10);
    let reference = single_process(&model, &work.path().join("single.json"), false, TRAFFIC_TOKENS);
    let cluster = Cluster::start(&[
        "--model",
        model.to_str().expect("utf-8"),
        "--expert-workers",
        "2",
        "--store",
        &store,
        "--redundant-slots",
        "2",
        "--lease-ttl-ms",
        "2000",
    ]);
    let traffic = Traffic::start(&cluster.attention_endpoints(), work.path(), TRAFFIC_TOKENS);
    std::thread::sleep(Duration::from_millis(500));
    etcd.restart().expect("etcd restarts");
    // After the restart the coordinator reads the store again, the expert workers load what it asks, and the attention
    // workers follow the new epoch (the coordinator frees old replicas only once they did).
    let loads = work.path().join("loads.json");
    skewed_loads(&loads, 3);
    let epoch = rebalance(&cluster.store, &loads);
    let shown = wait_for_placement(&cluster.store, Duration::from_secs(20), "the rebalance after the restart", |s| {
        s.contains("serving") && epoch_in(s) == Some(epoch)
    });
    println!("after the etcd restart:\n{shown}");
    let after = work.path().join("after.json");
    let output = generate_through(&cluster.endpoint, &after, TRAFFIC_TOKENS);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_equivalent("after the etcd restart", &reference, &read_json(&after));
    assert_all_equal(traffic.finish(), &reference);
    assert!(cluster.stderr().contains("experts unloaded"), "old replicas were never freed:\n{}", cluster.stderr());
    // Every worker is (still, or again) a member.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let members = runtime.block_on(async {
        let store = store::connect(&cluster.store).await.expect("the store after its restart");
        Membership::new(ClusterStore::new(store, "default").expect("cluster")).members().await.expect("members")
    });
    let ids: Vec<&str> = members.iter().map(|m| m.worker_id.as_str()).collect();
    assert_eq!(ids, ["aw-0", "ew-0", "ew-1"], "members after the etcd restart");
}

#[test]
fn too_little_expert_memory_is_refused_with_the_shortfall() {
    let stderr = Cluster::try_start(&["--expert-workers", "2", "--expert-memory", "4KiB"])
        .err()
        .expect("up must fail when the experts do not fit");
    assert!(stderr.contains("missing"), "the error says how much memory is missing:\n{stderr}");
}

#[test]
fn a_worker_with_another_checkpoint_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let (model, other) = (work.path().join("model"), work.path().join("other"));
    make_tiny(&model, 11);
    make_tiny(&other, 12);
    let cluster = Cluster::start(&["--model", model.to_str().expect("utf-8"), "--expert-workers", "1"]);
    let mut intruder = Command::new(binary())
        .args([
            "expert-worker",
            "--model",
            other.to_str().expect("utf-8"),
            "--store",
            &cluster.store,
            "--worker-id",
            "ew-intruder",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("expert worker starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while intruder.try_wait().expect("intruder status").is_none() {
        if Instant::now() > deadline {
            let _ = intruder.kill();
            panic!("the worker with another checkpoint joined and kept serving");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = intruder.wait_with_output().expect("intruder output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a worker with another checkpoint must not join");
    assert!(stderr.contains("checkpoint") && stderr.matches("sha256:").count() >= 2, "{stderr}");
}

#[test]
fn an_unreachable_etcd_is_retried_with_backoff_and_said_so() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut coordinator = Command::new(binary())
        .args(["coordinator", "--store", &format!("etcd://127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("coordinator starts");
    let stderr = coordinator.stderr.take().expect("stderr");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut retries = Vec::new();
    while retries.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = received.recv_timeout(Duration::from_millis(200)) {
            if line.contains("not reachable") && line.contains("retrying in") {
                retries.push(line);
            }
        }
    }
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    assert!(retries.len() >= 2, "the coordinator should say it retries: {retries:?}");
    assert!(retries[0].contains(&port.to_string()), "the message names the endpoint: {}", retries[0]);
}
