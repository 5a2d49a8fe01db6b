//! The client API: the `switchyard.v1.Generation` gRPC service, and [`serve`], the attention worker's server.
//!
//! The handler is thin: validate into a [`ValidGenerateRequest`], submit to the [`Engine`], turn its events into
//! `GenerateResponse`s. Dropping the response stream (the client went away) drops the engine's receiver, which
//! cancels the sequence.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use switchyard_model::FinishReason;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::generation_server::{Generation, GenerationServer};
use switchyard_proto::v1::{
    FinishReason as WireFinishReason, Finished, GenerateRequest, GenerateResponse, GeneratedToken, PromptInfo,
    TopLogprob, FILE_DESCRIPTOR_SET,
};
use tokenizers::Tokenizer;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use switchyard_transport::context::ContextServer;

use crate::context::ShardHost;
use crate::engine::{Engine, GenerationEvent};
use crate::request::{GeneratedText, ValidGenerateRequest};
use crate::AttentionWorkerError;

/// Largest gRPC message accepted or sent (a `[4096, 5120]` f32 block is 80 MiB; prompt logits can be larger still).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The `Generation` service over an [`Engine`].
pub struct GenerationService {
    engine: Arc<Engine>,
    tokenizer: Option<Arc<Tokenizer>>,
    worker_id: String,
    next_request: AtomicU64,
}

impl GenerationService {
    /// Serves `engine`; text prompts are tokenized and outputs decoded with `tokenizer` when there is one. Request ids
    /// the server makes up start with `worker_id`.
    pub fn new(engine: Arc<Engine>, tokenizer: Option<Tokenizer>, worker_id: impl Into<String>) -> Self {
        Self {
            engine,
            tokenizer: tokenizer.map(Arc::new),
            worker_id: worker_id.into(),
            next_request: AtomicU64::new(0),
        }
    }

    /// The engine served.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

/// The response stream of `Generate`.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let request = request.into_inner();
        let fallback_id = format!("{}-{}", self.worker_id, self.next_request.fetch_add(1, Ordering::Relaxed));
        let tokenizer = self.tokenizer.clone();
        let limits = self.engine.limits().clone();
        // Tokenizing a long prompt is CPU work: keep it off the runtime's threads.
        let valid = tokio::task::spawn_blocking(move || {
            ValidGenerateRequest::from_proto(request, tokenizer.as_deref(), &limits, || fallback_id)
        })
        .await
        .map_err(|e| Status::internal(format!("validating the request: {e}")))?
        .inspect_err(|error| tracing::debug!(%error, "request refused"))?;
        let span = tracing::info_span!("generate", request_id = %valid.request_id);
        let prompt_ids = valid.prompt.clone();
        let text = GeneratedText::new(valid.stop.clone());
        let events = span.in_scope(|| {
            tracing::debug!(prompt_tokens = prompt_ids.len(), max_new_tokens = valid.max_new_tokens, "submitting");
            self.engine.submit(valid).inspect_err(|error| tracing::info!(%error, "request refused"))
        })?;
        let state = StreamState {
            events,
            prompt_ids,
            vocab_size: self.engine.limits().vocab_size as u32,
            generated: Vec::new(),
            tokenizer: self.tokenizer.clone(),
            text,
            text_so_far: String::new(),
            stopped: None,
            done: false,
            span,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(state, next_response))))
    }
}

/// What the response stream keeps between events.
struct StreamState {
    events: UnboundedReceiver<GenerationEvent>,
    prompt_ids: Vec<u32>,
    vocab_size: u32,
    generated: Vec<u32>,
    tokenizer: Option<Arc<Tokenizer>>,
    /// The generated text, decoded and searched for stop strings as tokens arrive (only when there are any).
    text: GeneratedText,
    /// The text `text` handed out so far: the `Finished` text when a stop string cuts it.
    text_so_far: String,
    /// The `Finished` to send next: a stop string matched (the engine's sequence is already cancelled).
    stopped: Option<Finished>,
    done: bool,
    span: tracing::Span,
}

impl StreamState {
    /// Decodes the generated tokens (special tokens skipped, as in the final text).
    fn decode(&self) -> Result<String, Status> {
        match &self.tokenizer {
            Some(tokenizer) => tokenizer
                .decode(&self.generated, true)
                .map_err(|e| Status::internal(format!("decoding the output: {e}"))),
            None => Ok(String::new()),
        }
    }

    /// After a token: when the text now holds a stop string, cancels the sequence and keeps the cut text's
    /// `Finished` for the next response. Only the text the token added is decoded and searched ([`GeneratedText`]).
    fn check_stop(&mut self) -> Result<(), Status> {
        let Some(tokenizer) = self.tokenizer.as_ref().filter(|_| self.text.has_stop_strings()) else {
            return Ok(());
        };
        let delta = self
            .text
            .push(&self.generated, |ids| tokenizer.decode(ids, true))
            .map_err(|e| Status::internal(format!("decoding the output: {e}")))?;
        self.text_so_far.push_str(&delta.text);
        if delta.stopped {
            let text = std::mem::take(&mut self.text_so_far);
            // Closing the receiver is how the engine learns the request is over: it drops the sequence's KV cache
            // before its next step.
            self.events.close();
            let generated_tokens = self.generated.len() as u32;
            tracing::info!(generated_tokens, "stop string matched");
            self.stopped = Some(Finished { reason: WireFinishReason::Stop as i32, text, generated_tokens });
        }
        Ok(())
    }
}

async fn next_response(mut state: StreamState) -> Option<(Result<GenerateResponse, Status>, StreamState)> {
    if state.done {
        return None;
    }
    let span = state.span.clone();
    if let Some(finished) = state.stopped.take() {
        state.done = true;
        return Some((Ok(GenerateResponse { event: Some(Event::Finished(finished)) }), state));
    }
    async move {
        let event = match state.events.recv().await {
            Some(event) => event,
            None => {
                state.done = true;
                return Some((Err(Status::internal("the engine dropped the request without finishing it")), state));
            }
        };
        let response = match event {
            GenerationEvent::Prefilled { prompt_logits } => Event::Prompt(PromptInfo {
                prompt_ids: std::mem::take(&mut state.prompt_ids),
                vocab_size: state.vocab_size,
                prompt_logits: prompt_logits.map(|l| f32_le_bytes(&l)).unwrap_or_default(),
            }),
            GenerationEvent::Token { id, index, logits, logprob } => {
                state.generated.push(id);
                if let Err(status) = state.check_stop() {
                    state.done = true;
                    return Some((Err(status), state));
                }
                let (logprob, top_logprobs) = match logprob {
                    Some(l) => (l.logprob, l.top.into_iter().map(|(id, logprob)| TopLogprob { id, logprob }).collect()),
                    None => (0.0, Vec::new()),
                };
                Event::Token(GeneratedToken {
                    id,
                    index,
                    logits: logits.map(|l| f32_le_bytes(&l)).unwrap_or_default(),
                    logprob,
                    top_logprobs,
                })
            }
            GenerationEvent::Finished { reason, generated_tokens } => {
                state.done = true;
                let text = match state.decode() {
                    Ok(text) => text,
                    Err(status) => return Some((Err(status), state)),
                };
                tracing::info!(generated_tokens, ?reason, "finished");
                let reason = match reason {
                    FinishReason::Length => WireFinishReason::Length,
                    FinishReason::Stop => WireFinishReason::Stop,
                };
                Event::Finished(Finished { reason: reason as i32, text, generated_tokens })
            }
            GenerationEvent::Failed(error) => {
                state.done = true;
                tracing::warn!(%error, "request failed");
                return Some((Err(error.to_status()), state));
            }
        };
        Some((Ok(GenerateResponse { event: Some(response) }), state))
    }
    .instrument(span)
    .await
}

/// `values` as little-endian f32 bytes (the wire layout of logits).
pub fn f32_le_bytes(values: &[f32]) -> Bytes {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(bytes)
}

/// How often the server pings idle HTTP/2 connections, and how long a ping may go unanswered: a client that vanished
/// without closing its connection is noticed within seconds, which cancels its sequences.
pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(5));

/// Serves `generation` on `listener` until `shutdown` resolves, with `grpc.health.v1` (SERVING from the start: the
/// engine is ready when this is called; NOT_SERVING once shutdown starts), reflection, and [`MAX_MESSAGE_BYTES`]
/// message limits; with `shards`, also `switchyard.v1.ContextShard` (this worker holds ranges of other workers'
/// long sequences). In-flight streams finish before it returns.
pub async fn serve(
    listener: TcpListener,
    generation: GenerationService,
    shards: Option<Arc<ShardHost>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AttentionWorkerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GenerationServer<GenerationService>>().await;
    let shutdown = async move {
        shutdown.await;
        health.set_not_serving::<GenerationServer<GenerationService>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AttentionWorkerError::Startup { what: "the reflection service".into(), reason: e.to_string() })?;
    let generation = GenerationServer::new(generation)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE.0))
        .http2_keepalive_timeout(Some(KEEPALIVE.1))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(generation)
        .add_optional_service(shards.map(|host| ContextServer::new(host).into_service()))
        // Nagle's algorithm would hold a token's small frame back until the previous one is acknowledged; tonic sets
        // no-delay only on listeners it binds itself.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
