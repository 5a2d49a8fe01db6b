//! The OpenAI-compatible HTTP API over a real loopback socket: completions and chat completions (whole and streamed
//! as server-sent events), models, health, metrics, bearer auth, OpenAI error bodies with 4xx for bad requests (the
//! server serving on after each), cancellation of a disconnected stream, and concurrent streams matching solo runs.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, fixture, solo};
use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_attention_worker::{http_router, serve_http, Engine, EngineOptions, HttpOptions, TextCodec};
use switchyard_model::SamplingParams;

const MODEL: &str = "tiny-test";

struct Server {
    base: String,
    engine: Arc<Engine>,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _cluster: common::Cluster,
}

impl Server {
    async fn start(api_key: Option<&str>, options: EngineOptions) -> Server {
        let fixture = fixture();
        let cluster = cluster(&["0-3", "4-7"], tokio::runtime::Handle::current());
        let engine = Arc::new(Engine::start(cluster.model.clone(), options).unwrap());
        let text = TextCodec::load(fixture.dir.path()).unwrap();
        assert!(text.as_ref().is_some_and(|t| t.chat_template.is_some()), "the tiny model has a chat template");
        let options =
            HttpOptions { model_name: MODEL.into(), api_key: api_key.map(str::to_string), worker_id: "aw-test".into() };
        let router = http_router(engine.clone(), text, options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            serve_http(listener, router, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Server { base, engine, client: reqwest::Client::new(), stop: Some(stop), _cluster: cluster }
    }

    async fn default() -> Server {
        Server::start(None, EngineOptions { threads: 2, ..EngineOptions::default() }).await
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.client.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The `data:` payloads of a streamed request, `[DONE]` included.
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self.client.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = response.text().await.unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn codec() -> TextCodec {
    TextCodec::load(fixture().dir.path()).unwrap().unwrap()
}

/// The greedy reference output of `prompt` as text.
fn reference_text(prompt: &[u32], max_new_tokens: usize) -> String {
    let generation = solo(&fixture().reference, prompt, max_new_tokens, SamplingParams::default());
    codec().decode(&generation.tokens).unwrap()
}

/// The text of a streamed response's chunks, and the finish reason of its last chunk.
fn streamed_text(events: &[String], chat: bool) -> (String, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let mut text = String::new();
    let mut reason = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], if chat { "chat.completion.chunk" } else { "text_completion" });
        let choice = &chunk["choices"][0];
        let piece = if chat { &choice["delta"]["content"] } else { &choice["text"] };
        text.push_str(piece.as_str().unwrap_or_default());
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = r.to_string();
        }
    }
    (text, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_whole_and_streamed_match_the_reference() {
    let server = Server::default().await;
    let body = json!({ "model": MODEL, "prompt": "Hello! What is the capital of France?", "max_tokens": 6,
        "temperature": 0, "ignore_eos": true });
    let (status, whole) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["model"], MODEL);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 6);
    let prompt = codec().tokenizer.encode("Hello! What is the capital of France?", true).unwrap().get_ids().to_vec();
    assert_eq!(whole["usage"]["prompt_tokens"], prompt.len());
    let expected = reference_text(&prompt, 6);
    assert_eq!(whole["choices"][0]["text"], expected.as_str());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/completions", &streamed).await;
    assert_eq!(streamed_text(&events, false), (expected, "length".to_string()));

    // Token-id prompts work too, with logprobs of the chosen tokens.
    let body = json!({ "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": true, "logprobs": 2 });
    let (status, ids) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{ids}");
    let logprobs = &ids["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 3, "{logprobs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_streams_the_template_rendered_prompt() {
    let server = Server::default().await;
    let messages = json!([
        { "role": "system", "content": "  You are a helpful assistant.  " },
        { "role": "user", "content": "How many experts does the model have?" },
    ]);
    let body = json!({ "model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": true,
        "stream": true, "stream_options": { "include_usage": true } });
    let events = server.stream("/v1/chat/completions", &body).await;
    // Llama 4's template, written out by hand: the system text is trimmed, the assistant header ends the prompt.
    let rendered = "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant.<|eot|>\
        <|header_start|>user<|header_end|>\n\nHow many experts does the model have?<|eot|>\
        <|header_start|>assistant<|header_end|>\n\n";
    let codec = codec();
    let prompt = codec.tokenizer.encode(rendered, false).unwrap().get_ids().to_vec();
    assert_eq!(prompt.iter().filter(|&&t| t == prompt[0]).count(), 1, "one begin_of_text");
    assert_eq!(codec.encode_chat(messages.as_array().unwrap()).unwrap(), prompt);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], prompt.len(), "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let without_usage: Vec<String> = events.iter().filter(|e| !e.contains("\"choices\":[]")).cloned().collect();
    assert_eq!(streamed_text(&without_usage, true), (reference_text(&prompt, 5), "length".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let server = Server::default().await;
    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(server.get("/health").await.0, 200);
    let (status, _) = server.post("/v1/completions", &json!({ "prompt": [1, 2, 3], "max_tokens": 2 })).await;
    assert_eq!(status, 200);
    let (status, metrics) = server.get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "switchyard_http_requests_total",
        "switchyard_time_to_first_token_seconds",
        "switchyard_inter_token_latency_seconds",
        "switchyard_queue_length",
        "switchyard_active_sequences",
        "switchyard_generated_tokens_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert!(metrics.contains("endpoint=\"/v1/completions\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_the_v1_routes() {
    let server = Server::start(Some("sekrit"), EngineOptions { threads: 2, ..EngineOptions::default() }).await;
    let url = format!("{}/v1/models", server.base);
    for auth in [None, Some("Bearer wrong"), Some("sekrit")] {
        let mut request = server.client.get(&url);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("API key"));
    }
    let response = server.client.get(&url).bearer_auth("sekrit").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let response = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .bearer_auth("sekrit")
        .json(&json!({ "prompt": [1, 2], "max_tokens": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(server.get("/health").await.0, 200);
    assert_eq!(server.get("/metrics").await.0, 200);
}

/// Path, JSON body (or `None`: the raw text), raw text, status, what the message must name.
type Case = (&'static str, Option<Value>, &'static str, u16, Vec<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_serves_on() {
    let server = Server::default().await;
    let vocab = fixture().config.text.vocab_size;
    let context = fixture().config.text.max_position_embeddings;
    let too_long: Vec<u32> = (0..=context as u32).map(|i| i % 100).collect();
    let cases: Vec<Case> = vec![
        ("/v1/completions", None, "{\"prompt\": ", 400, vec!["JSON".into()]),
        (
            "/v1/completions",
            Some(json!({ "prompt": too_long, "max_tokens": 1 })),
            "",
            400,
            vec![(context + 1).to_string(), context.to_string()],
        ),
        (
            "/v1/completions",
            Some(json!({ "prompt": [1, 99999], "max_tokens": 1 })),
            "",
            400,
            vec!["99999".into(), vocab.to_string()],
        ),
        (
            "/v1/completions",
            Some(json!({ "prompt": "hi", "max_tokens": -5 })),
            "",
            400,
            vec!["max_tokens".into(), "-5".into()],
        ),
        ("/v1/completions", Some(json!({ "model": "gpt-17", "prompt": "hi" })), "", 404, vec!["gpt-17".into()]),
        (
            "/v1/chat/completions",
            Some(json!({ "messages": [{"role": "user", "content": "hi"}], "n": 3 })),
            "",
            400,
            vec!["n = 3".into()],
        ),
        ("/v1/chat/completions", Some(json!({ "messages": [] })), "", 400, vec!["messages".into()]),
        ("/v1/completions", Some(json!({ "prompt": "hi", "temperature": -1 })), "", 400, vec!["temperature".into()]),
    ];
    for (path, body, raw, status, needles) in cases {
        let request = server.client.post(format!("{}{path}", server.base));
        let request = match &body {
            Some(body) => request.json(body),
            None => request.header("content-type", "application/json").body(raw.to_string()),
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path} {body:?}");
        let error: Value = response.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {error}"));
        assert!(error["error"]["type"].is_string(), "{error}");
        for needle in needles {
            assert!(message.contains(&needle), "{message:?} does not name {needle:?}");
        }
        let (ok, answer) =
            server.post("/v1/completions", &json!({ "prompt": "hello", "max_tokens": 2, "ignore_eos": true })).await;
        assert_eq!(ok, 200, "after {path} {body:?}: {answer}");
    }
}

/// Polls `condition` until it holds or `limit` passes.
async fn until(limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_and_a_disconnected_stream_frees_its_sequence() {
    let options = EngineOptions { max_batch: 1, max_waiting: 1, threads: 2, ..EngineOptions::default() };
    let server = Server::start(None, options).await;
    let long = json!({ "prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true, "stream": true });
    let url = format!("{}/v1/completions", server.base);
    let first = server.client.post(&url).json(&long).send().await.unwrap();
    let mut first_body = first.bytes_stream();
    first_body.next().await.unwrap().unwrap();
    until(Duration::from_secs(5), || server.engine.active() == 1).await;
    let second = server.client.post(&url).json(&long).send().await.unwrap();
    until(Duration::from_secs(5), || server.engine.waiting() == 1).await;
    let (status, error) = server.post("/v1/completions", &json!({ "prompt": [1], "max_tokens": 1 })).await;
    assert_eq!(status, 429, "{error}");
    assert_eq!(error["error"]["code"], "resource_exhausted");
    assert!(error["error"]["message"].as_str().unwrap().contains("waiting"), "{error}");
    drop(second);
    drop(first_body);
    until(Duration::from_secs(5), || server.engine.active() == 0 && server.engine.waiting() == 0).await;
    let (status, answer) = server.post("/v1/completions", &json!({ "prompt": [1], "max_tokens": 1 })).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_match_their_solo_runs() {
    let server = Arc::new(Server::default().await);
    let body = |i: u64| {
        json!({ "prompt": format!("Request {i}: the quick brown fox"), "max_tokens": 6, "temperature": 1.0,
            "top_p": 0.9, "seed": 1000 + i, "ignore_eos": true, "stream": true })
    };
    let mut solo = Vec::new();
    for i in 0..16 {
        solo.push(streamed_text(&server.stream("/v1/completions", &body(i)).await, false));
    }
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let server = server.clone();
            let body = body(i);
            tokio::spawn(async move { streamed_text(&server.stream("/v1/completions", &body).await, false) })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), solo[i], "request {i}");
    }
}
