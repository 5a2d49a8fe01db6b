//! The Prometheus metrics of the HTTP front.
//!
//! One recorder per process (the `metrics` facade has one global recorder), installed by the first server; every
//! server in the process renders it. The engine's gauges (queue, sequences, KV blocks, preemptions) are read when
//! `/metrics` is scraped. The dispatch metrics (routed tokens per expert, dispatch bytes and latency) are recorded by
//! [`RemoteExperts`](crate::RemoteExperts) as it dispatches, through `DispatchMetrics`, into the same recorder: no
//! handle to it needs to reach the server.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::Engine;

/// Requests answered, by `endpoint` (the route) and `status` (the HTTP status code).
pub const REQUESTS_TOTAL: &str = "switchyard_http_requests_total";
/// Seconds from a request's arrival to its first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "switchyard_time_to_first_token_seconds";
/// Seconds between consecutive generated tokens of a request.
pub const INTER_TOKEN_LATENCY: &str = "switchyard_inter_token_latency_seconds";
/// Seconds from a request's arrival to its last event.
pub const REQUEST_DURATION: &str = "switchyard_request_duration_seconds";
/// Tokens generated for HTTP requests.
pub const GENERATED_TOKENS_TOTAL: &str = "switchyard_generated_tokens_total";
/// Prompt tokens of HTTP requests admitted to the engine.
pub const PROMPT_TOKENS_TOTAL: &str = "switchyard_prompt_tokens_total";
/// Requests waiting for a slot in the engine.
pub const QUEUE_LENGTH: &str = "switchyard_queue_length";
/// Sequences the engine is generating.
pub const ACTIVE_SEQUENCES: &str = "switchyard_active_sequences";
/// Model steps the engine ran.
pub const ENGINE_STEPS_TOTAL: &str = "switchyard_engine_steps_total";
/// Model steps that failed.
pub const ENGINE_FAILED_STEPS_TOTAL: &str = "switchyard_engine_failed_steps_total";
/// KV-cache blocks held by sequences.
pub const KV_BLOCKS_IN_USE: &str = "switchyard_kv_blocks_in_use";
/// KV-cache blocks the engine may use in all.
pub const KV_BLOCKS_TOTAL: &str = "switchyard_kv_blocks_total";
/// Sequences preempted (KV freed, to be recomputed) because KV blocks ran out.
pub const PREEMPTIONS_TOTAL: &str = "switchyard_preemptions_total";
/// Tokens routed to each expert, by `expert` (its index within a layer), summed over the MoE layers.
pub const ROUTED_TOKENS_TOTAL: &str = "switchyard_routed_tokens_total";
/// Activation bytes of completed dispatches, by `direction`: `sent` (expert inputs) or `received` (expert outputs).
/// Counted as rows x hidden x bytes per value of that direction's wire precision: the payload the transport encodes,
/// without FP8's per-row scales (4 bytes a row) or message headers; a re-sent dispatch counts again.
pub const DISPATCH_BYTES_TOTAL: &str = "switchyard_dispatch_bytes_total";
/// Seconds from sending one layer step's rows to one expert worker until their outputs are back, by `worker`.
pub const DISPATCH_DURATION: &str = "switchyard_dispatch_duration_seconds";

/// Latency buckets, in seconds: from sub-millisecond decode steps to minute-long prefills.
const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 60.0];

/// The process's Prometheus recorder once [`prometheus`] ran: `Some(None)` when another recorder was installed first.
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder; `None` when another recorder was installed first (its owner renders it).
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .map_err(|e| tracing::warn!(error = %e, "Prometheus buckets refused; histograms become summaries"))
                .unwrap_or_else(|()| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "another metrics recorder is installed: /metrics serves only the engine");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS_TOTAL, "HTTP requests answered, by endpoint and status.");
    describe_histogram!(TIME_TO_FIRST_TOKEN, Unit::Seconds, "Request arrival to first generated token.");
    describe_histogram!(INTER_TOKEN_LATENCY, Unit::Seconds, "Time between consecutive generated tokens.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Request arrival to its last event.");
    describe_counter!(GENERATED_TOKENS_TOTAL, "Tokens generated for HTTP requests.");
    describe_counter!(PROMPT_TOKENS_TOTAL, "Prompt tokens of admitted HTTP requests.");
    describe_gauge!(QUEUE_LENGTH, "Requests waiting for a slot in the engine.");
    describe_gauge!(ACTIVE_SEQUENCES, "Sequences the engine is generating.");
    describe_counter!(ENGINE_STEPS_TOTAL, "Model steps the engine ran.");
    describe_counter!(ENGINE_FAILED_STEPS_TOTAL, "Model steps that failed.");
    describe_gauge!(KV_BLOCKS_IN_USE, "KV-cache blocks held by sequences.");
    describe_gauge!(KV_BLOCKS_TOTAL, "KV-cache blocks the engine may use in all.");
    describe_counter!(PREEMPTIONS_TOTAL, "Sequences preempted (KV freed, to be recomputed) because KV blocks ran out.");
    describe_counter!(ROUTED_TOKENS_TOTAL, "Tokens routed to each expert (index within a layer), over all MoE layers.");
    describe_counter!(
        DISPATCH_BYTES_TOTAL,
        Unit::Bytes,
        "Activation bytes of completed dispatches: rows x hidden x bytes per value of the wire precision (FP8 \
         scales and message headers not counted), sent (expert inputs) or received (expert outputs)."
    );
    describe_histogram!(
        DISPATCH_DURATION,
        Unit::Seconds,
        "One layer step's rows sent to one expert worker until their outputs are back, by worker."
    );
}

/// The Prometheus text of `/metrics`, with the engine's gauges as of now.
pub(crate) fn render(engine: &Engine) -> String {
    let gauges = [
        (QUEUE_LENGTH, engine.waiting()),
        (ACTIVE_SEQUENCES, engine.active()),
        (KV_BLOCKS_IN_USE, engine.kv_blocks_used()),
        (KV_BLOCKS_TOTAL, engine.kv_blocks_total()),
    ];
    let counters = [
        (ENGINE_STEPS_TOTAL, engine.steps()),
        (ENGINE_FAILED_STEPS_TOTAL, engine.failed_steps()),
        (PREEMPTIONS_TOTAL, engine.preemptions()),
    ];
    let Some(handle) = prometheus() else {
        let gauges = gauges.iter().map(|(name, value)| format!("# TYPE {name} gauge\n{name} {value}\n"));
        let counters = counters.iter().map(|(name, value)| format!("# TYPE {name} counter\n{name} {value}\n"));
        return gauges.chain(counters).collect();
    };
    for (name, value) in gauges {
        metrics::gauge!(name).set(value as f64);
    }
    for (name, value) in counters {
        metrics::counter!(name).absolute(value);
    }
    handle.render()
}

/// Records one request's answer.
pub(crate) fn request(endpoint: String, status: u16) {
    metrics::counter!(REQUESTS_TOTAL, "endpoint" => endpoint, "status" => status.to_string()).increment(1);
}

/// Records a generated token that came `since` after the previous one (or the request's arrival, for the first).
pub(crate) fn token(first: bool, since: Duration) {
    let name = if first { TIME_TO_FIRST_TOKEN } else { INTER_TOKEN_LATENCY };
    metrics::histogram!(name).record(since.as_secs_f64());
    metrics::counter!(GENERATED_TOKENS_TOTAL).increment(1);
}

/// Records a request admitted with `prompt_tokens`.
pub(crate) fn admitted(prompt_tokens: usize) {
    metrics::counter!(PROMPT_TOKENS_TOTAL).increment(prompt_tokens as u64);
}

/// Records a request's end, `elapsed` after its arrival.
pub(crate) fn finished(elapsed: Duration) {
    metrics::histogram!(REQUEST_DURATION).record(elapsed.as_secs_f64());
}

/// The dispatch metrics of one [`RemoteExperts`](crate::RemoteExperts): handles registered once, so that a layer step
/// adds to atomics instead of looking its series up by name and labels (one per routed expert per layer step).
pub(crate) struct DispatchMetrics {
    /// [`ROUTED_TOKENS_TOTAL`] of each expert index.
    routed: Vec<Counter>,
    sent: Counter,
    received: Counter,
}

impl DispatchMetrics {
    /// Handles for `experts_per_layer` experts; `None` while no recorder is installed in the process (the HTTP server
    /// installs it): handles taken before then would record nowhere for good, so the caller asks again later.
    pub(crate) fn registered(experts_per_layer: usize) -> Option<Self> {
        HANDLE.get()?;
        let bytes = |direction: &'static str| metrics::counter!(DISPATCH_BYTES_TOTAL, "direction" => direction);
        Some(Self {
            routed: (0..experts_per_layer)
                .map(|expert| metrics::counter!(ROUTED_TOKENS_TOTAL, "expert" => expert.to_string()))
                .collect(),
            sent: bytes("sent"),
            received: bytes("received"),
        })
    }

    /// Records a layer step's routed tokens: one per row, to the row's expert.
    pub(crate) fn routed(&self, experts: &[u32]) {
        for &expert in experts {
            if let Some(counter) = self.routed.get(expert as usize) {
                counter.increment(1);
            }
        }
    }

    /// Records a completed dispatch to `worker`: bytes each way and how long it took.
    pub(crate) fn dispatched(&self, worker: &str, sent: u64, received: u64, took: Duration) {
        self.sent.increment(sent);
        self.received.increment(received);
        // By name and label each time: a dispatch is one per worker per layer step, and workers come and go with
        // placements, so a cache would need a map anyway.
        let histogram: Histogram = metrics::histogram!(DISPATCH_DURATION, "worker" => worker.to_string());
        histogram.record(took.as_secs_f64());
    }
}
