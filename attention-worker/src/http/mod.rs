//! The OpenAI-compatible HTTP API (axum), served next to the gRPC `Generation` service over the same [`Engine`].
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streamed as server-sent events in OpenAI's chunk
//! format, ending with `data: [DONE]`, when `stream` is true), `GET /v1/models`, `GET /health`, `GET /metrics`
//! (Prometheus text). With an API key the `/v1` routes want `Authorization: Bearer <key>`; health and metrics stay
//! open. Requests become a `GenerateRequest` and go through the same validation as gRPC requests
//! ([`crate::request::ValidGenerateRequest::from_proto`]); errors are OpenAI's JSON error body with the status that
//! [`ApiError::from_engine`] gives. A client that disconnects drops its response stream, which drops the engine's
//! receiver and so cancels its sequence.

mod error;
pub mod metrics;
mod openai;
mod output;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

pub use self::error::ApiError;
use crate::engine::Engine;
use crate::text::TextCodec;
use crate::AttentionWorkerError;

/// How the HTTP API presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// The model name `/v1/models` lists and requests must name (or leave out).
    pub model_name: String,
    /// The bearer token the `/v1` routes want; `None` leaves them open.
    pub api_key: Option<String>,
    /// Prefix of the request ids the server makes up (the worker id).
    pub worker_id: String,
}

/// The state the handlers share.
pub(crate) struct HttpApi {
    engine: Arc<Engine>,
    text: Option<Arc<TextCodec>>,
    options: HttpOptions,
    next_request: AtomicU64,
}

impl HttpApi {
    fn request_id(&self, kind: &str) -> String {
        format!("{kind}-{}-{}", self.options.worker_id, self.next_request.fetch_add(1, Ordering::Relaxed))
    }
}

/// The API's routes over `engine`; text is tokenized, chat templates rendered and outputs decoded with `text` when
/// the model has a tokenizer (without one only token-id completions are served, with empty text).
pub fn router(engine: Arc<Engine>, text: Option<TextCodec>, options: HttpOptions) -> Router {
    // Installed now so that the first scrape already lists the metrics.
    metrics::prometheus();
    let api = Arc::new(HttpApi { engine, text: text.map(Arc::new), options, next_request: AtomicU64::new(0) });
    let v1 = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(prometheus_metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(api)
}

/// Serves `router` on `listener` until `shutdown` resolves; in-flight requests finish first.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AttentionWorkerError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| AttentionWorkerError::Startup { what: "the HTTP server".into(), reason: e.to_string() })
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn prometheus_metrics(State(api): State<Arc<HttpApi>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render(&api.engine))
}

async fn not_found(request: Request) -> ApiError {
    ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        message: format!("no route {} {}", request.method(), request.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}

/// Counts every answer by route and status.
async fn count_requests(request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    metrics::request(endpoint, response.status().as_u16());
    response
}

/// 401 unless the request carries the API key (when there is one).
async fn require_api_key(State(api): State<Arc<HttpApi>>, request: Request, next: Next) -> Response {
    if let Some(key) = &api.options.api_key {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Compares without returning early, so the time taken does not tell how much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
