//! `/metrics` of the HTTP API over a real loopback socket, with the routed experts on expert workers served over real
//! gRPC: the engine's KV and preemption gauges, routed tokens per expert, dispatch bytes at the wire's precision and
//! dispatch latency per expert worker, each with its help text; and stop strings cutting whole and streamed text.
//!
//! One test, one attention worker in the process: the metrics recorder is global, so the counters it shows are
//! exactly this worker's and can be checked against its own counters.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{expert_workers, fixture, serve_expert_worker};
use serde_json::{json, Value};
use switchyard_attention_worker::{
    http_router, placement_from_expert_workers, serve_http, Engine, EngineOptions, HttpOptions, RemoteExperts,
    RoutingTable, TextCodec,
};
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::{WireDtype, WireFormat};

/// The samples of `name` in Prometheus text: each series' labels (`{...}`, or empty) and value.
fn samples(metrics: &str, name: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let (labels, value) = rest.split_once('}')?;
                    (labels.to_string(), value)
                }
                None if rest.starts_with(' ') => (String::new(), rest),
                None => return None,
            };
            Some((labels, value.trim().parse().unwrap()))
        })
        .collect()
}

/// The value of the one series of `name` (without labels).
fn value(metrics: &str, name: &str) -> f64 {
    match samples(metrics, name).as_slice() {
        [(labels, value)] if labels.is_empty() => *value,
        other => panic!("{name}: expected one series without labels, got {other:?} in:\n{metrics}"),
    }
}

/// The text of a streamed completion's chunks, and the finish reason of its last chunk.
fn streamed(body: &str) -> (String, String) {
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut text = String::new();
    let mut reason = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        text.push_str(chunk["choices"][0]["text"].as_str().unwrap_or_default());
        if let Some(r) = chunk["choices"][0]["finish_reason"].as_str() {
            reason = r.to_string();
        }
    }
    (text, reason)
}

/// Two ASCII characters of `text`'s second half (or one, or its first character): a stop string it holds.
fn stop_string_in(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let printable = |c: &char| c.is_ascii_graphic();
    (chars.len() / 2..chars.len().saturating_sub(1))
        .find(|&i| printable(&chars[i]) && printable(&chars[i + 1]))
        .map(|i| chars[i..i + 2].iter().collect())
        .or_else(|| chars.iter().find(|c| printable(c)).map(char::to_string))
        .unwrap_or_else(|| chars[0].to_string())
}

#[test]
fn metrics_show_kv_routed_tokens_and_dispatches_and_stop_strings_cut_the_text() {
    let fixture = fixture();
    let hidden = fixture.config.text.hidden_size;
    let experts = fixture.config.text.num_local_experts;
    let workers = expert_workers(&["0-3", "4-7"]);
    // Each expert worker on a runtime of its own, dropped after the attention worker's (outside any runtime).
    let (expert_runtimes, endpoints): (Vec<_>, Vec<_>) = workers.iter().map(|w| serve_expert_worker(w.clone())).unzip();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let given: Vec<(String, String)> =
            workers.iter().zip(&endpoints).map(|(w, e)| (w.worker_id().to_string(), e.clone())).collect();
        let placement = placement_from_expert_workers(&given, Duration::from_secs(5)).await.unwrap();
        let routing = Arc::new(RoutingTable::new(&placement, &fixture.config.text).unwrap());
        // bf16 out, f32 back: the byte counters must count each direction at its own precision.
        let wire = WireFormat { dispatch: WireDtype::Bf16, combine: WireDtype::F32 };
        let transport = GrpcTransport::new(wire, "aw-metrics".into());
        for worker in routing.workers() {
            transport.add_worker(worker.id.clone(), worker.endpoint.clone());
        }
        let remote = Arc::new(
            RemoteExperts::new(routing, Arc::new(transport), tokio::runtime::Handle::current(), "aw-metrics")
                .with_wire(wire),
        );
        let mut model = common::load(fixture.dir.path(), &fixture.config, switchyard_model::ExpertSelection::None);
        model.set_routed_experts(remote.clone());
        let engine =
            Arc::new(Engine::start(Arc::new(model), EngineOptions { threads: 2, ..EngineOptions::default() }).unwrap());
        let text = TextCodec::load(fixture.dir.path()).unwrap();
        let options = HttpOptions { model_name: "tiny".into(), api_key: None, worker_id: "aw-metrics".into() };
        let router = http_router(engine.clone(), text, options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(listener, router, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let complete = |body: Value| {
            let request = client.post(format!("{base}/v1/completions")).json(&body);
            async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status().as_u16(), 200);
                response.text().await.unwrap()
            }
        };

        // A few tokens, then the same request cut by a stop string from its text: whole and streamed.
        let body = json!({ "prompt": "Metrics, please: ", "max_tokens": 12, "temperature": 0, "ignore_eos": true });
        let whole: Value = serde_json::from_str(&complete(body.clone()).await).unwrap();
        let full = whole["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(!full.is_empty(), "{whole}");
        let stop_string = stop_string_in(&full);
        let expected = full[..full.find(&stop_string).unwrap()].to_string();
        let mut with_stop = body.clone();
        with_stop["stop"] = json!(["never \u{1} here", stop_string]);
        let cut: Value = serde_json::from_str(&complete(with_stop.clone()).await).unwrap();
        assert_eq!(cut["choices"][0]["text"], expected.as_str(), "stop {stop_string:?} in {full:?}");
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
        with_stop["stream"] = json!(true);
        assert_eq!(streamed(&complete(with_stop).await), (expected, "stop".to_string()), "stop {stop_string:?}");

        // A request cut by a stop string is dropped by the engine at its next step boundary, after the answer went
        // out: scrape only once no step runs, so the counters read here and in /metrics are final.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while engine.active() > 0 || engine.waiting() > 0 {
            assert!(std::time::Instant::now() < deadline, "the engine never went idle");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let response = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let metrics = response.text().await.unwrap();

        // The engine's KV blocks and preemptions, read at the scrape.
        let (in_use, total) =
            (value(&metrics, "switchyard_kv_blocks_in_use"), value(&metrics, "switchyard_kv_blocks_total"));
        assert_eq!(total, engine.kv_blocks_total() as f64, "{metrics}");
        assert!(in_use <= total, "{in_use} of {total} blocks in use");
        assert_eq!(value(&metrics, "switchyard_preemptions_total"), engine.preemptions() as f64);

        // Routed tokens per expert: one series per expert index, summed over MoE layers, as the worker counted them.
        let routed = samples(&metrics, "switchyard_routed_tokens_total");
        let counted: u64 = remote.routed_tokens().iter().sum();
        assert!(counted > 0, "nothing was routed");
        assert!(routed.len() <= experts && !routed.is_empty(), "{routed:?}");
        for (labels, _) in &routed {
            let expert: usize = labels.strip_prefix("expert=\"").unwrap().trim_end_matches('"').parse().unwrap();
            assert!(expert < experts, "{labels}");
        }
        assert_eq!(routed.iter().map(|(_, v)| v).sum::<f64>(), counted as f64, "{routed:?}");

        // Dispatch bytes: every routed row went out once in bf16 and came back in f32 (nothing failed, so no re-sends).
        let bytes = samples(&metrics, "switchyard_dispatch_bytes_total");
        let direction = |d: &str| bytes.iter().find(|(l, _)| l == &format!("direction=\"{d}\"")).map(|(_, v)| *v);
        assert_eq!(direction("sent"), Some((counted as usize * hidden * 2) as f64), "{bytes:?}");
        assert_eq!(direction("received"), Some((counted as usize * hidden * 4) as f64), "{bytes:?}");

        // Dispatch latency: a histogram per expert worker; every layer step sent one or two groups.
        let counts = samples(&metrics, "switchyard_dispatch_duration_seconds_count");
        let mut dispatched = 0.0;
        for worker in ["ew-0", "ew-1"] {
            let label = format!("worker=\"{worker}\"");
            let count = counts.iter().find(|(l, _)| l == &label).map(|(_, v)| *v);
            assert!(count.is_some_and(|c| c > 0.0), "{worker}: {counts:?}");
            dispatched += count.unwrap_or_default();
        }
        let steps = remote.steps_dispatched() as f64;
        assert!(steps <= dispatched && dispatched <= 2.0 * steps, "{dispatched} dispatches for {steps} layer steps");
        assert!(metrics.contains("switchyard_dispatch_duration_seconds_bucket{worker=\"ew-0\",le=\"0.001\"}"));

        for name in [
            "switchyard_kv_blocks_in_use",
            "switchyard_kv_blocks_total",
            "switchyard_preemptions_total",
            "switchyard_routed_tokens_total",
            "switchyard_dispatch_bytes_total",
            "switchyard_dispatch_duration_seconds",
        ] {
            assert!(metrics.contains(&format!("# HELP {name} ")), "no help for {name} in:\n{metrics}");
        }

        let _ = stop.send(());
        server.await.unwrap().unwrap();
        drop(engine);
    });
    drop(runtime);
    drop(expert_runtimes);
}
