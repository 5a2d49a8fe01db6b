//! The OpenAI endpoints: request bodies, their mapping to the engine, and the response and chunk formats.

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_proto::v1::{generate_request, GenerateRequest, TokenIds};

use super::error::ApiError;
use super::output::{Output, Piece, TokenLogprob};
use super::HttpApi;
use crate::request::ValidGenerateRequest;

/// Tokens a completion generates when the request does not say (OpenAI's default).
const DEFAULT_COMPLETION_TOKENS: i64 = 16;

/// A prompt: text, token ids, or a one-element batch of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    TokenIds(Vec<u32>),
    Texts(Vec<String>),
    TokenIdBatch(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopInput {
    One(String),
    Many(Vec<String>),
}

/// `logprobs`: a count (completions) or a switch (chat, with `top_logprobs`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LogprobsInput {
    Switch(bool),
    Count(i64),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of both endpoints' bodies (OpenAI's names; unknown fields are ignored, as OpenAI-compatible servers do).
#[derive(Debug, Deserialize)]
struct GenerationBody {
    model: Option<String>,
    prompt: Option<PromptInput>,
    messages: Option<Vec<Value>>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopInput>,
    stop_token_ids: Option<Vec<u32>>,
    logprobs: Option<LogprobsInput>,
    top_logprobs: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    #[serde(default)]
    ignore_eos: bool,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Completions => "prompt",
            Endpoint::Chat => "messages",
        }
    }
}

pub(super) async fn completions(State(api): State<Arc<HttpApi>>, body: Bytes) -> Response {
    generate(api, body, Endpoint::Completions).await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn chat_completions(State(api): State<Arc<HttpApi>>, body: Bytes) -> Response {
    generate(api, body, Endpoint::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn models(State(api): State<Arc<HttpApi>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": api.options.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "switchyard",
            "max_model_len": api.engine.limits().max_position_embeddings,
        }],
    }))
}

/// What a response needs besides the engine's output.
struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    logprobs: bool,
    include_usage: bool,
}

async fn generate(api: Arc<HttpApi>, body: Bytes, endpoint: Endpoint) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body: GenerationBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(None, format!("invalid JSON body: {e}")))?;
    if let Some(model) = body.model.as_deref() {
        if !model.is_empty() && model != api.options.model_name {
            return Err(ApiError::model_not_found(model, &api.options.model_name));
        }
    }
    if let Some(n) = body.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(Some("n"), format!("n = {n} is not supported: only n = 1")));
    }
    let max_tokens = body.max_completion_tokens.or(body.max_tokens);
    if let Some(max) = max_tokens.filter(|&m| m < 0) {
        return Err(ApiError::invalid(Some("max_tokens"), format!("max_tokens must be at least 0, got {max}")));
    }
    let prompt_param = endpoint.prompt_param();
    let engine_error = |e: &crate::AttentionWorkerError| ApiError::from_engine(e, prompt_param);
    let prompt = match endpoint {
        Endpoint::Completions => completion_prompt(body.prompt)?,
        Endpoint::Chat => {
            let messages = body.messages.as_deref().filter(|m| !m.is_empty()).ok_or_else(|| {
                ApiError::invalid(Some("messages"), "messages must be a non-empty list of chat messages")
            })?;
            let text = api.text.as_deref().ok_or_else(|| {
                ApiError::invalid(
                    Some("messages"),
                    "this model has no tokenizer.json: use /v1/completions with token ids",
                )
            })?;
            let ids = text.encode_chat(messages).map_err(|e| engine_error(&e))?;
            generate_request::Prompt::TokenIds(TokenIds { ids })
        }
    };
    let limits = api.engine.limits().clone();
    let max_new_tokens = match (max_tokens, endpoint, &prompt) {
        (Some(max), _, _) => max,
        (None, Endpoint::Completions, _) => DEFAULT_COMPLETION_TOKENS,
        // A chat reply may run to the end of the context, as OpenAI's does.
        (None, Endpoint::Chat, generate_request::Prompt::TokenIds(ids)) => {
            limits.max_position_embeddings.saturating_sub(ids.ids.len()) as i64
        }
        (None, Endpoint::Chat, generate_request::Prompt::Text(_)) => DEFAULT_COMPLETION_TOKENS,
    };
    let top_k = match body.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => {
            return Err(ApiError::invalid(Some("top_k"), format!("top_k must be -1 (off) or at least 0, got {k}")))
        }
    };
    let logprobs = match (endpoint, body.logprobs, body.top_logprobs) {
        (_, None | Some(LogprobsInput::Switch(false)), _) => None,
        (_, Some(LogprobsInput::Switch(true)), top) => Some(top.unwrap_or(0)),
        (Endpoint::Completions, Some(LogprobsInput::Count(n)), _) => Some(n),
        (Endpoint::Chat, Some(LogprobsInput::Count(_)), _) => {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs is a boolean here: give the count as top_logprobs",
            ))
        }
    };
    let logprobs = match logprobs {
        Some(n) if n < 0 => {
            return Err(ApiError::invalid(Some("logprobs"), format!("the logprobs count must be at least 0, got {n}")))
        }
        other => other.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let stop = match body.stop {
        None => Vec::new(),
        Some(StopInput::One(stop)) => vec![stop],
        Some(StopInput::Many(stops)) => stops,
    };
    let request = GenerateRequest {
        request_id: String::new(),
        prompt: Some(prompt),
        max_new_tokens: u32::try_from(max_new_tokens).unwrap_or(u32::MAX),
        temperature: body.temperature.unwrap_or(1.0),
        top_p: body.top_p.unwrap_or(1.0),
        top_k,
        seed: body.seed.unwrap_or_else(|| RandomState::new().hash_one(arrived)),
        ignore_eos: body.ignore_eos,
        return_logits: false,
        min_p: body.min_p.unwrap_or(0.0),
        stop_token_ids: body.stop_token_ids.unwrap_or_default(),
        stop: stop.clone(),
        logprobs: 0,
    };
    let kind = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let request_id = api.request_id(kind);
    let tokenizer = api.text.clone();
    let valid = tokio::task::spawn_blocking({
        let request_id = request_id.clone();
        move || {
            let mut valid =
                ValidGenerateRequest::from_proto(request, tokenizer.as_ref().map(|t| &t.tokenizer), &limits, || {
                    request_id
                })?;
            // The wire's logprobs count cannot say "the chosen token's only" (0 is off); this API can.
            valid.logprobs = logprobs;
            valid.check(&limits)?;
            Ok::<_, crate::AttentionWorkerError>(valid)
        }
    })
    .await
    .map_err(|e| {
        ApiError::from_engine(&crate::AttentionWorkerError::Panicked { message: e.to_string() }, prompt_param)
    })?
    .map_err(|e| engine_error(&e))?;
    let prompt_tokens = valid.prompt.len();
    tracing::debug!(%request_id, prompt_tokens, max_new_tokens = valid.max_new_tokens, "HTTP request submitted");
    let events = api.engine.submit(valid).map_err(|e| {
        tracing::info!(%request_id, error = %e, "HTTP request refused");
        engine_error(&e)
    })?;
    let output = Output::new(events, api.text.clone(), stop, prompt_tokens, arrived);
    let reply = Reply {
        id: request_id,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        model: api.options.model_name.clone(),
        endpoint,
        logprobs: logprobs.is_some(),
        include_usage: body.stream_options.unwrap_or_default().include_usage,
    };
    if body.stream {
        Ok(stream(output, reply).into_response())
    } else {
        whole(output, reply).await
    }
}

fn completion_prompt(prompt: Option<PromptInput>) -> Result<generate_request::Prompt, ApiError> {
    let one = "prompt must be a string or a list of token ids (batches of more than one prompt are not supported)";
    Ok(match prompt {
        Some(PromptInput::Text(text)) => generate_request::Prompt::Text(text),
        Some(PromptInput::TokenIds(ids)) => generate_request::Prompt::TokenIds(TokenIds { ids }),
        Some(PromptInput::Texts(mut texts)) if texts.len() == 1 => {
            generate_request::Prompt::Text(texts.pop().unwrap_or_default())
        }
        Some(PromptInput::TokenIdBatch(mut batch)) if batch.len() == 1 => {
            generate_request::Prompt::TokenIds(TokenIds { ids: batch.pop().unwrap_or_default() })
        }
        Some(_) => return Err(ApiError::invalid(Some("prompt"), one)),
        None => return Err(ApiError::invalid(Some("prompt"), "prompt is required")),
    })
}

fn usage(output: &Output) -> Value {
    let completion = output.completion_tokens();
    json!({
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": output.prompt_tokens + completion,
    })
}

/// Logprobs in the completions format (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
fn completion_logprobs(logprobs: &[TokenLogprob], mut offset: usize) -> Value {
    let mut offsets = Vec::with_capacity(logprobs.len());
    for l in logprobs {
        offsets.push(offset);
        offset += l.token.len();
    }
    json!({
        "tokens": logprobs.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": logprobs.iter().map(|l| {
            l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Logprobs in the chat format (`content`: token, logprob, bytes, top_logprobs).
fn chat_logprobs(logprobs: &[TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() });
    json!({
        "content": logprobs.iter().map(|l| {
            let mut e = entry(&l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|(t, p)| entry(t, *p)).collect::<Vec<_>>().into();
            e
        }).collect::<Vec<_>>(),
    })
}

/// The whole response of a request that is not streamed.
async fn whole(mut output: Output, reply: Reply) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let reason = loop {
        match output.next().await {
            Some(Piece::Text { text: piece, logprobs: l }) => {
                text.push_str(&piece);
                logprobs.extend(l);
            }
            Some(Piece::Finished { reason }) => break reason,
            Some(Piece::Failed(error)) => return Err(error),
            None => return Err(ApiError::from_engine(&crate::AttentionWorkerError::EngineStopped, "prompt")),
        }
    };
    let choice = match reply.endpoint {
        Endpoint::Completions => json!({
            "index": 0,
            "text": text,
            "logprobs": if reply.logprobs { completion_logprobs(&logprobs, 0) } else { Value::Null },
            "finish_reason": reason,
        }),
        Endpoint::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": if reply.logprobs { chat_logprobs(&logprobs) } else { Value::Null },
            "finish_reason": reason,
        }),
    };
    let object = if reply.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({
        "id": reply.id,
        "object": object,
        "created": reply.created,
        "model": reply.model,
        "choices": [choice],
        "usage": usage(&output),
    }))
    .into_response())
}

/// Where a stream is.
enum Phase {
    /// The chat stream's first chunk (the assistant role) is still to be sent.
    Start,
    Generating,
    /// The usage chunk (when asked for), then `[DONE]`.
    Usage,
    Done,
    Closed,
}

struct StreamState {
    output: Output,
    reply: Reply,
    phase: Phase,
    /// Bytes of text sent, for the completions logprobs' text offsets.
    offset: usize,
}

impl StreamState {
    fn chunk(&self, choices: Value) -> Event {
        let object = if self.reply.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut chunk = json!({
            "id": self.reply.id,
            "object": object,
            "created": self.reply.created,
            "model": self.reply.model,
            "choices": choices,
        });
        if self.reply.include_usage {
            chunk["usage"] = Value::Null;
        }
        Event::default().data(chunk.to_string())
    }

    fn choice(&self, text: Option<&str>, logprobs: &[TokenLogprob], reason: Option<&str>) -> Value {
        match self.reply.endpoint {
            Endpoint::Completions => json!([{
                "index": 0,
                "text": text.unwrap_or_default(),
                "logprobs": if self.reply.logprobs { completion_logprobs(logprobs, self.offset) } else { Value::Null },
                "finish_reason": reason,
            }]),
            Endpoint::Chat => json!([{
                "index": 0,
                "delta": match text { Some(text) => json!({ "content": text }), None => json!({}) },
                "logprobs": if self.reply.logprobs { chat_logprobs(logprobs) } else { Value::Null },
                "finish_reason": reason,
            }]),
        }
    }
}

/// The server-sent events of a streamed request: chunks, then `[DONE]`. A failure after the stream started is sent
/// as one `{"error": ...}` event before the stream ends (no `[DONE]`), as OpenAI does.
fn stream(output: Output, reply: Reply) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let phase = if reply.endpoint == Endpoint::Chat { Phase::Start } else { Phase::Generating };
    let state = StreamState { output, reply, phase, offset: 0 };
    Sse::new(futures::stream::unfold(state, |mut state| async move {
        let event = match state.phase {
            Phase::Start => {
                state.phase = Phase::Generating;
                state.chunk(json!([{
                    "index": 0,
                    "delta": { "role": "assistant", "content": "" },
                    "logprobs": Value::Null,
                    "finish_reason": Value::Null,
                }]))
            }
            Phase::Generating => loop {
                match state.output.next().await {
                    // Nothing new (held-back bytes) and no logprobs: nothing to send yet.
                    Some(Piece::Text { text, logprobs }) if text.is_empty() && logprobs.is_empty() => continue,
                    Some(Piece::Text { text, logprobs }) => {
                        let event = state.chunk(state.choice(Some(&text), &logprobs, None));
                        state.offset += text.len();
                        break event;
                    }
                    Some(Piece::Finished { reason }) => {
                        state.phase = Phase::Usage;
                        let text = (state.reply.endpoint == Endpoint::Completions).then_some("");
                        break state.chunk(state.choice(text, &[], Some(reason)));
                    }
                    Some(Piece::Failed(error)) => {
                        state.phase = Phase::Closed;
                        break Event::default().data(error.body().to_string());
                    }
                    None => return None,
                }
            },
            Phase::Usage => {
                state.phase = Phase::Done;
                if state.reply.include_usage {
                    let mut chunk = json!({
                        "id": state.reply.id,
                        "object": if state.reply.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": state.reply.created,
                        "model": state.reply.model,
                        "choices": [],
                    });
                    chunk["usage"] = usage(&state.output);
                    Event::default().data(chunk.to_string())
                } else {
                    state.phase = Phase::Closed;
                    Event::default().data("[DONE]")
                }
            }
            Phase::Done => {
                state.phase = Phase::Closed;
                Event::default().data("[DONE]")
            }
            Phase::Closed => return None,
        };
        Some((Ok(event), state))
    }))
}
