//! A whole cluster through `switchyard up`: equivalence with the single-process forward pass, and faults.
//!
//! Equality: greedy tokens are identical, logits agree within 1e-5. Expert workers batch the rows of every attention
//! worker's request for a layer into one matmul per expert, and the FP8 matmul picks its kernel (and so its summation
//! order) by the number of rows, so bit-exactness is not guaranteed; measured differences are printed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::{
    assert_equivalent, binary, http_request, make_tiny, prompt_ids, read_json, single_process, through, Cluster,
};

#[test]
fn cluster_equals_single_process_for_every_shape_and_wire_format() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    make_tiny(&model, 5);
    let model_arg = model.to_str().expect("utf-8");
    for (wire, fp8) in [("f32", false), ("fp8", true)] {
        let reference = single_process(&model, &work.path().join(format!("single-{wire}.json")), fp8, 8);
        for expert_workers in [1, 2, 4] {
            for attention_workers in [1, 2] {
                let ew = expert_workers.to_string();
                let aw = attention_workers.to_string();
                let mut args =
                    vec!["--model", model_arg, "--expert-workers", &ew, "--attention-workers", &aw, "--wire", wire];
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
    let reference = single_process(&model, &work.path().join("single.json"), false, 8);
    let cluster =
        Cluster::start(&["--model", model.to_str().expect("utf-8"), "--expert-workers", "2", "--micro-batches", "2"]);
    let ids = prompt_ids();
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let out = work.path().join(format!("pp-{i}.json"));
            let child = Command::new(binary())
                .args([
                    "generate",
                    "--endpoint",
                    &cluster.endpoint,
                    "--prompt-ids",
                    &ids,
                    "--max-new-tokens",
                    "8",
                    "--ignore-eos",
                    "--output-json",
                    out.to_str().expect("utf-8"),
                ])
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
        .args([
            "up",
            "--model",
            model.to_str().expect("utf-8"),
            "--expert-workers",
            "2",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
        ])
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
    let cluster =
        Cluster::start(&["--model", model.to_str().expect("utf-8"), "--expert-workers", "2", "--redundant-slots", "8"]);
    let ids = prompt_ids();
    let run = |out: &Path| {
        Command::new(binary())
            .args([
                "generate",
                "--endpoint",
                &cluster.endpoint,
                "--prompt-ids",
                &ids,
                "--max-new-tokens",
                "600",
                "--ignore-eos",
                "--output-json",
                out.to_str().expect("utf-8"),
            ])
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

/// `up --http` serves the OpenAI-compatible API through the cluster: a completion and a chat completion of the built-in
/// tiny model, and a clear 400 for a prompt over the context limit, after which it keeps serving.
#[test]
fn up_serves_the_openai_api_over_http() {
    let cluster = Cluster::start(&["--expert-workers", "2", "--http", "127.0.0.1:0"]);
    let http = cluster.http.clone().expect("the ready line names the HTTP endpoint");
    let (status, models) = http_request(&http, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    let model: serde_json::Value = serde_json::from_str(&models).expect("models JSON");
    let name = model["data"][0]["id"].as_str().expect("a model id").to_string();
    let completion = serde_json::json!({"model": name, "prompt": "The switchyard", "max_tokens": 8, "temperature": 0});
    let (status, body) = http_request(&http, "POST", "/v1/completions", Some(&completion.to_string()));
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("completion JSON");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    let chat = serde_json::json!({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let (status, body) = http_request(&http, "POST", "/v1/chat/completions", Some(&chat.to_string()));
    assert_eq!(status, 200, "{body}");
    let too_long = serde_json::json!({"model": name, "prompt": vec![1u32; 100_000], "max_tokens": 1});
    let (status, body) = http_request(&http, "POST", "/v1/completions", Some(&too_long.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("context") || body.contains("max_position"), "{body}");
    let (status, body) = http_request(&http, "POST", "/v1/completions", Some(&completion.to_string()));
    assert_eq!(status, 200, "the server keeps serving: {body}");
}

/// SIGTERM (what Kubernetes sends) stops an attention worker only after its in-flight generations finish: a long
/// generation started before the signal completes in full, and the worker then exits cleanly.
#[test]
fn sigterm_drains_in_flight_generations() {
    let cluster = Cluster::start(&["--expert-workers", "1", "--http", "127.0.0.1:0"]);
    let http = cluster.http.clone().expect("the ready line names the HTTP endpoint");
    let endpoint = cluster.endpoint.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("long.json");
    let tokens = 3000;
    let generation = {
        let out = out.clone();
        std::thread::spawn(move || switchyard_tests::generate_through(&endpoint, &out, tokens))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = http_request(&http, "GET", "/metrics", None);
        if metrics.lines().any(|l| l.starts_with("switchyard_active_sequences ") && !l.ends_with(" 0")) {
            break;
        }
        assert!(Instant::now() < deadline, "the generation never became active:\n{metrics}");
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.signal("aw-0", libc::SIGTERM);
    let output = generation.join().expect("the generation thread");
    assert!(output.status.success(), "the in-flight generation failed: {}", String::from_utf8_lossy(&output.stderr));
    let generated = read_json(&out)["greedy_tokens"].as_array().map(Vec::len).unwrap_or_default();
    assert_eq!(generated, tokens as usize, "every token of the in-flight generation arrived");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.is_alive("aw-0") {
        assert!(Instant::now() < deadline, "the attention worker did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    }
}
