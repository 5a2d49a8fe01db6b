//! `switchyard placement solve` and `placement show` through the binary: the documented JSON, chaining with
//! `--current`, errors, and the table of a live coordinator.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use switchyard_coordinator::store::{self, ClusterStore};
use switchyard_coordinator::Placement;

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("SWITCHYARD_COORDINATOR")
        .output()
        .expect("runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("output written")).expect("valid json")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Three layers of 8 experts, a hot expert in each.
fn write_loads(dir: &Path) -> std::path::PathBuf {
    let loads = dir.join("loads.json");
    let json = serde_json::json!({"loads": [
        [800.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0],
        [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 400.0],
        [100, 100, 100, 100, 100, 100, 100, 100],
    ]});
    std::fs::write(&loads, json.to_string()).expect("write loads");
    loads
}

#[test]
fn solve_writes_the_documented_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loads = write_loads(dir.path());
    let out = dir.path().join("placement.json");
    let run = switchyard(&[
        "placement",
        "solve",
        "--loads",
        path(&loads),
        "--workers",
        "4",
        "--redundant-slots",
        "4",
        "--nodes",
        "2",
        "--output-json",
        path(&out),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = stdout(&run);
    assert!(text.contains("3 layers: 8 experts + 4 redundant replicas on 4 workers x 3 slots, 2 node(s)"), "{text}");
    assert!(text.contains("max/mean"), "{text}");

    let json = read_json(&out);
    let layers = json["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 3);
    let input: Vec<Vec<f64>> =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&loads).expect("read")).expect("json")
            ["loads"]
            .as_array()
            .expect("loads")
            .iter()
            .map(|row| row.as_array().expect("row").iter().map(|v| v.as_f64().expect("number")).collect())
            .collect();
    for (l, layer) in layers.iter().enumerate() {
        let workers: Vec<Vec<u32>> = serde_json::from_value(layer["workers"].clone()).expect("[[expert ids]]");
        assert_eq!(workers.len(), 4);
        let mut replicas = [0u32; 8];
        for held in &workers {
            assert!(held.len() <= 3, "layer {l}: {held:?} over 3 slots");
            for &e in held {
                replicas[e as usize] += 1;
            }
        }
        assert!(replicas.iter().all(|&r| r >= 1), "layer {l}: every expert placed: {replicas:?}");
        assert_eq!(replicas.iter().sum::<u32>(), 12, "layer {l}: 8 experts + 4 redundant");
        // Tokens of a replicated expert split evenly across its replicas.
        let tokens: Vec<f64> = serde_json::from_value(layer["worker_tokens"].clone()).expect("worker_tokens");
        for (w, held) in workers.iter().enumerate() {
            let expected: f64 = held.iter().map(|&e| input[l][e as usize] / f64::from(replicas[e as usize])).sum();
            assert!((tokens[w] - expected).abs() < 1e-6, "layer {l} worker {w}: {} vs {expected}", tokens[w]);
        }
        let total: f64 = input[l].iter().sum();
        assert!((tokens.iter().sum::<f64>() - total).abs() < 1e-6);
    }
    // The hot expert of layer 0 (800 of 1500 tokens) is replicated on distinct workers.
    let layer0: Vec<Vec<u32>> = serde_json::from_value(layers[0]["workers"].clone()).expect("workers");
    assert!(layer0.iter().filter(|held| held.contains(&0)).count() >= 3, "{layer0:?}");
}

#[test]
fn solving_again_from_the_output_moves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loads = write_loads(dir.path());
    let first = dir.path().join("first.json");
    let second = dir.path().join("second.json");
    let run = switchyard(&[
        "placement",
        "solve",
        "--loads",
        path(&loads),
        "--workers",
        "4",
        "--redundant-slots",
        "4",
        "--output-json",
        path(&first),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let run = switchyard(&[
        "placement",
        "solve",
        "--loads",
        path(&loads),
        "--workers",
        "4",
        "--redundant-slots",
        "4",
        "--current",
        path(&first),
        "--output-json",
        path(&second),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stdout(&run).contains("replicas moved: 0"), "{}", stdout(&run));
    let (a, b) = (read_json(&first), read_json(&second));
    for (x, y) in a["layers"].as_array().expect("layers").iter().zip(b["layers"].as_array().expect("layers")) {
        assert_eq!(x["workers"], y["workers"]);
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loads = write_loads(dir.path());
    let out = dir.path().join("out.json");

    let run = switchyard(&[
        "placement",
        "solve",
        "--loads",
        path(&loads),
        "--workers",
        "4",
        "--slots-per-worker",
        "1",
        "--output-json",
        path(&out),
    ]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("needs 8 slots per layer, workers have 4: 4 missing"), "{}", stderr(&run));
    assert!(!stderr(&run).contains("panicked"), "{}", stderr(&run));

    let run = switchyard(&[
        "placement",
        "solve",
        "--loads",
        path(&loads),
        "--workers",
        "2",
        "--redundant-slots",
        "9",
        "--output-json",
        path(&out),
    ]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("at most 8 redundant"), "{}", stderr(&run));

    let ragged = dir.path().join("ragged.json");
    std::fs::write(&ragged, r#"{"loads": [[1, 2, 3], [1, 2]]}"#).expect("write");
    let run =
        switchyard(&["placement", "solve", "--loads", path(&ragged), "--workers", "2", "--output-json", path(&out)]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("layer 1 has 2 experts, layer 0 has 3"), "{}", stderr(&run));

    let negative = dir.path().join("negative.json");
    std::fs::write(&negative, r#"{"loads": [[1, -2, 3]]}"#).expect("write");
    let run =
        switchyard(&["placement", "solve", "--loads", path(&negative), "--workers", "2", "--output-json", path(&out)]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("layer 0 expert 1 has load -2"), "{}", stderr(&run));

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{not json").expect("write");
    let run =
        switchyard(&["placement", "solve", "--loads", path(&garbage), "--workers", "2", "--output-json", path(&out)]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("garbage.json"), "{}", stderr(&run));

    let run = switchyard(&["placement", "show", "--coordinator", "http://127.0.0.1:9", "--timeout", "5"]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("coordinator at http://127.0.0.1:9"), "{}", stderr(&run));
}

/// A coordinator process, stopped on drop.
struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn show_prints_the_live_placement() {
    // A coordinator hosting its store; it waits for 2 expert workers that never come, so the placement written below
    // stays the current one.
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["coordinator", "--expert-workers", "2", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("coordinator starts");
    let stdout_pipe = child.stdout.take().expect("stdout");
    let coordinator = Coordinator(child);
    let mut line = String::new();
    BufReader::new(stdout_pipe).read_line(&mut line).expect("listening line");
    let url = line.trim().strip_prefix("listening on ").expect("listening on URL").to_string();

    let run = switchyard(&["placement", "show", "--store", &url]);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = stdout(&run);
    assert!(text.contains("no placement yet") && text.contains("waiting"), "{text}");
    let run = switchyard(&["placement", "show", "--coordinator", &url, "--timeout", "5"]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("no placement yet"), "{}", stderr(&run));

    let json = serde_json::json!({"epoch": 3, "workers": [
        {"worker_id": "ew-0", "endpoint": "http://127.0.0.1:7001", "experts": {"1": [0, 1, 2, 3], "3": [0, 1, 2, 3]}},
        {"worker_id": "ew-1", "endpoint": "http://127.0.0.1:7002", "experts": {"1": [4, 5, 6, 7, 0], "3": [4, 5, 6, 7]}},
    ]});
    let placement: Placement = serde_json::from_value(json).expect("placement");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let cluster = ClusterStore::new(store::connect(&url).await.expect("store"), "default").expect("cluster");
        cluster.publish_placement(&placement, None).await.expect("publish");
    });

    for args in [["--coordinator", url.as_str()], ["--store", url.as_str()]] {
        let run = switchyard(&["placement", "show", args[0], args[1]]);
        assert!(run.status.success(), "{}", stderr(&run));
        let text = stdout(&run);
        assert!(text.starts_with("epoch 3: 2 expert workers, 2 MoE layers"), "{text}");
        assert!(text.contains("ew-0") && text.contains("http://127.0.0.1:7001"), "{text}");
        // ew-0 holds the same experts in both layers: one row; ew-1 holds a replica of expert 0 in layer 1 only.
        assert!(text.contains("1,3") && text.contains("0-3 (4)"), "{text}");
        assert!(text.contains("0,4-7 (5)") && text.contains("4-7 (4)"), "{text}");
    }
    let text = stdout(&switchyard(&["placement", "show", "--store", &url]));
    assert!(text.contains("coordinator: leader c-"), "{text}");
    drop(coordinator);
}
