//! A whole cluster through `switchyard up`: equivalence with the single-process forward pass, and faults.
//!
//! Equality: greedy tokens are identical, logits agree within 1e-5. Expert workers batch the rows of every attention
//! worker's request for a layer into one matmul per expert, and the FP8 matmul picks its kernel (and so its summation
//! order) by the number of rows, so bit-exactness is not guaranteed; measured differences are printed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::{binary, make_tiny, max_abs_diff, read_json, switchyard, Cluster};

/// A prompt long enough that routing reaches every expert of the tiny model in both MoE layers.
fn prompt_ids() -> String {
    (0..96u32).map(|i| ((i * 37 + 11) % 480).to_string()).collect::<Vec<_>>().join(",")
}

fn single_process(model: &Path, out: &Path, fp8_activations: bool) -> serde_json::Value {
    let mut args = vec![
        "generate", "--model", model.to_str().expect("utf-8"), "--prompt-ids", "", "--max-new-tokens", "8",
        "--ignore-eos", "--output-json", out.to_str().expect("utf-8"),
    ];
    let ids = prompt_ids();
    args[4] = &ids;
    if fp8_activations {
        args.push("--fp8-activations");
    }
    let output = switchyard(&args);
    assert!(output.status.success(), "single-process generate: {}", String::from_utf8_lossy(&output.stderr));
    read_json(out)
}

fn through(endpoint: &str, out: &Path) -> serde_json::Value {
    let ids = prompt_ids();
    let output = switchyard(&[
        "generate", "--endpoint", endpoint, "--prompt-ids", &ids, "--max-new-tokens", "8", "--ignore-eos",
        "--output-json", out.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success(), "generate --endpoint {endpoint}: {}", String::from_utf8_lossy(&output.stderr));
    read_json(out)
}

fn assert_equivalent(name: &str, reference: &serde_json::Value, got: &serde_json::Value) {
    assert_eq!(got["prompt_ids"], reference["prompt_ids"], "{name}: prompt ids");
    assert_eq!(got["greedy_tokens"], reference["greedy_tokens"], "{name}: greedy tokens");
    let prompt = max_abs_diff(&got["prompt_logits"], &reference["prompt_logits"]);
    let decode = max_abs_diff(&got["decode_logits"], &reference["decode_logits"]);
    println!("{name}: max |diff| prompt logits {prompt:e}, decode logits {decode:e}");
    assert!(prompt <= 1e-5 && decode <= 1e-5, "{name}: logits differ by {prompt} / {decode}");
}

#[test]
fn cluster_equals_single_process_for_every_shape_and_wire_format() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 5);
    let model_arg = model.to_str().expect("utf-8");
    for (wire, fp8) in [("f32", false), ("fp8", true)] {
        let reference = single_process(&model, &work.path().join(format!("single-{wire}.json")), fp8);
        for expert_workers in [1, 2, 4] {
            for attention_workers in [1, 2] {
                let ew = expert_workers.to_string();
                let aw = attention_workers.to_string();
                let mut args = vec![
                    "--model", model_arg, "--expert-workers", &ew, "--attention-workers", &aw, "--wire", wire,
                ];
                if fp8 {
                    args.push("--fp8-activations");
                }
                let cluster = Cluster::start(&args);
                let endpoints = cluster.attention_endpoints();
                assert_eq!(endpoints.len(), attention_workers);
                for (i, endpoint) in endpoints.iter().enumerate() {
                    let name = format!("{wire} wire, {expert_workers} EW, {attention_workers} AW, via aw-{i}");
                    let out = work.path().join(format!("{wire}-{expert_workers}-{attention_workers}-{i}.json"));
                    assert_equivalent(&name, &reference, &through(endpoint, &out));
                }
            }
        }
    }
}

/// Ping-pong: two micro-batches in flight, two concurrent requests, each equal to the single-process run.
#[test]
fn ping_pong_micro_batches_keep_the_output() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 6);
    let reference = single_process(&model, &work.path().join("single.json"), false);
    let cluster = Cluster::start(&[
        "--model", model.to_str().expect("utf-8"), "--expert-workers", "2", "--micro-batches", "2",
    ]);
    let ids = prompt_ids();
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let out = work.path().join(format!("pp-{i}.json"));
            let child = Command::new(binary())
                .args(["generate", "--endpoint", &cluster.endpoint, "--prompt-ids", &ids, "--max-new-tokens", "8",
                    "--ignore-eos", "--output-json", out.to_str().expect("utf-8")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("client starts");
            (child, out)
        })
        .collect();
    for (i, (child, out)) in clients.into_iter().enumerate() {
        let output = child.wait_with_output().expect("client output");
        assert!(output.status.success(), "client {i}: {}", String::from_utf8_lossy(&output.stderr));
        assert_equivalent(&format!("ping-pong client {i}"), &reference, &read_json(&out));
    }
}

#[test]
fn up_with_a_prompt_generates_and_stops_every_child() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 2);
    let output = Command::new(binary())
        .args(["up", "--model", model.to_str().expect("utf-8"), "--expert-workers", "2", "--prompt", "Hello",
            "--max-new-tokens", "4"])
        .output()
        .expect("up runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "up --prompt failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("ready: client endpoint http://127.0.0.1:")), "{stdout}");
    let pids: Vec<i32> = stdout
        .lines()
        .filter_map(|l| l.split_once("(pid ").and_then(|(_, r)| r.split_once(')')).and_then(|(p, _)| p.parse().ok()))
        .collect();
    assert_eq!(pids.len(), 4, "2 expert workers, a coordinator, an attention worker: {stdout}");
    std::thread::sleep(Duration::from_millis(200));
    for pid in pids {
        // SAFETY: signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "child {pid} outlived `up`");
    }
}

/// With every expert on both expert workers, killing one mid-generation loses nothing: the attention worker re-sends
/// the affected steps to the surviving replicas and the output equals the fault-free run.
#[test]
fn a_killed_expert_worker_with_replicas_loses_nothing() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 4);
    let cluster = Cluster::start(&[
        "--model", model.to_str().expect("utf-8"), "--expert-workers", "2", "--redundant-slots", "8",
    ]);
    let ids = prompt_ids();
    let run = |out: &Path| {
        Command::new(binary())
            .args(["generate", "--endpoint", &cluster.endpoint, "--prompt-ids", &ids, "--max-new-tokens", "600",
                "--ignore-eos", "--output-json", out.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client starts")
    };
    let started = Instant::now();
    let reference = run(&work.path().join("fault-free.json")).wait_with_output().expect("fault-free run");
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let fault_free = started.elapsed();

    let client = run(&work.path().join("faulty.json"));
    std::thread::sleep(fault_free / 3);
    cluster.signal("ew-1", libc::SIGKILL);
    let output = client.wait_with_output().expect("faulty run");
    assert!(output.status.success(), "the request failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(!cluster.is_alive("ew-1"));
    // The kill landed mid-generation: the attention worker re-sent steps to the surviving replicas.
    assert!(cluster.stderr().contains("re-sending to other replicas"), "{}", cluster.stderr());
    let reference = read_json(&work.path().join("fault-free.json"));
    assert_equivalent("expert worker killed mid-generation", &reference, &read_json(&work.path().join("faulty.json")));
}

#[test]
fn a_killed_expert_worker_fails_the_request_quickly_and_the_rest_keeps_serving() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 3);
    let mut cluster = Cluster::start(&["--model", model.to_str().expect("utf-8"), "--expert-workers", "2"]);
    // A long generation that is still running when the worker dies.
    let mut client = Command::new(binary())
        .args(["generate", "--endpoint", &cluster.endpoint, "--prompt-ids", &prompt_ids(), "--max-new-tokens", "3000",
            "--ignore-eos"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client starts");
    std::thread::sleep(Duration::from_millis(1500));
    cluster.signal("ew-1", libc::SIGKILL);
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = client.try_wait().expect("client status") {
            break status;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(20), "the client hung after the expert worker died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = client.wait_with_output().expect("client output");
    let message = String::from_utf8_lossy(&output.stderr);
    println!("client failed {:?} after the kill: {message}", killed_at.elapsed());
    assert!(!status.success(), "the generation should fail without ew-1");
    assert!(message.contains("ew-1") || message.to_lowercase().contains("unavailable"), "{message}");
    // The other processes keep serving: up is running and says which child died.
    std::thread::sleep(Duration::from_millis(300));
    assert!(cluster.up_is_running());
    assert!(cluster.is_alive("ew-0") && cluster.is_alive("aw-0") && cluster.is_alive("coordinator"));
    assert!(cluster.stderr().contains("expert worker ew-1"), "{}", cluster.stderr());
    // The attention worker still answers: with tokens, or (routing is data dependent) with a clear error when the
    // request needs one of ew-1's experts.
    let output = switchyard(&["generate", "--endpoint", &cluster.endpoint, "--prompt-ids", "1,2,3",
        "--max-new-tokens", "2", "--ignore-eos"]);
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains("ew-1") || message.to_lowercase().contains("unavailable"), "{message}");
    }
}
