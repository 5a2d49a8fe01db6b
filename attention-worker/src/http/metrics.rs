//! The Prometheus metrics of the HTTP front.
//!
//! One recorder per process (the `metrics` facade has one global recorder), installed by the first server; every
//! server in the process renders it. The engine's gauges are read when `/metrics` is scraped.

use std::sync::OnceLock;
use std::time::Duration;

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

/// Latency buckets, in seconds: from sub-millisecond decode steps to minute-long prefills.
const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 60.0];

/// The process's Prometheus recorder; `None` when another recorder was installed first (its owner renders it).
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
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
}

/// The Prometheus text of `/metrics`, with the engine's gauges as of now.
pub(crate) fn render(engine: &Engine) -> String {
    let Some(handle) = prometheus() else {
        return format!(
            "# TYPE {QUEUE_LENGTH} gauge\n{QUEUE_LENGTH} {}\n# TYPE {ACTIVE_SEQUENCES} gauge\n{ACTIVE_SEQUENCES} {}\n",
            engine.waiting(),
            engine.active()
        );
    };
    metrics::gauge!(QUEUE_LENGTH).set(engine.waiting() as f64);
    metrics::gauge!(ACTIVE_SEQUENCES).set(engine.active() as f64);
    metrics::counter!(ENGINE_STEPS_TOTAL).absolute(engine.steps());
    metrics::counter!(ENGINE_FAILED_STEPS_TOTAL).absolute(engine.failed_steps());
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
