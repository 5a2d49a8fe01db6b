//! The `Generation` gRPC service over a real socket: streamed tokens between `PromptInfo` and `Finished`, logits as
//! f32 bytes, InvalidArgument with the numbers for bad requests, health, and cancellation when the client goes away.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, fixture, max_diff, prompt, solo};
use switchyard_attention_worker::{load_tokenizer, serve, Engine, EngineOptions, GenerationService};
use switchyard_model::SamplingParams;
use switchyard_proto::v1::generate_request::Prompt;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::generation_client::GenerationClient;
use switchyard_proto::v1::{FinishReason, GenerateRequest, GenerateResponse, TokenIds};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Server {
    endpoint: String,
    engine: Arc<Engine>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _cluster: common::Cluster,
}

impl Server {
    async fn start() -> Server {
        let fixture = fixture();
        let cluster = cluster(&["0-3", "4-7"], tokio::runtime::Handle::current());
        let engine = Arc::new(
            Engine::start(cluster.model.clone(), EngineOptions { threads: 2, ..EngineOptions::default() }).unwrap(),
        );
        let tokenizer = load_tokenizer(fixture.dir.path()).unwrap();
        assert!(tokenizer.is_some());
        let service = GenerationService::new(engine.clone(), tokenizer, "aw-test");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, service, None, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Server { endpoint, engine, stop: Some(stop), task, _cluster: cluster }
    }

    async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::connect(self.endpoint.clone()).await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.expect("server stops").unwrap();
    }
}

fn ids_request(ids: Vec<u32>, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: "test".into(),
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

async fn collect(
    client: &mut GenerationClient<Channel>,
    request: GenerateRequest,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut responses = Vec::new();
    while let Some(response) = stream.next().await {
        responses.push(response?);
    }
    Ok(responses)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_prompt_info_tokens_and_finished() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let fixture = fixture();
    let vocab = fixture.config.text.vocab_size;

    let channel = Channel::from_shared(server.endpoint.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let check =
        health.check(HealthCheckRequest { service: "switchyard.v1.Generation".into() }).await.unwrap().into_inner();
    assert_eq!(check.status, ServingStatus::Serving as i32);

    // Token ids with logits: the stream equals the single-process model's generation.
    let ids = prompt(5, 12);
    let mut request = ids_request(ids.clone(), 7);
    request.return_logits = true;
    let responses = collect(&mut client, request).await.unwrap();
    assert_eq!(responses.len(), 1 + 7 + 1);
    let alone = solo(&fixture.reference, &ids, 7, SamplingParams::default());
    let Some(Event::Prompt(info)) = &responses[0].event else { panic!("first a PromptInfo: {:?}", responses[0]) };
    assert_eq!(info.prompt_ids, ids);
    assert_eq!(info.vocab_size as usize, vocab);
    assert_eq!(max_diff(&f32s(&info.prompt_logits), &alone.prompt_logits.concat()), 0.0);
    for (i, response) in responses[1..8].iter().enumerate() {
        let Some(Event::Token(token)) = &response.event else { panic!("a token: {response:?}") };
        assert_eq!(token.index as usize, i);
        assert_eq!(token.id, alone.tokens[i]);
        assert_eq!(max_diff(&f32s(&token.logits), &alone.decode_logits[i]), 0.0);
    }
    let Some(Event::Finished(finished)) = &responses[8].event else { panic!("last Finished: {:?}", responses[8]) };
    assert_eq!(finished.reason, FinishReason::Length as i32);
    assert_eq!(finished.generated_tokens, 7);
    let tokenizer = load_tokenizer(fixture.dir.path()).unwrap().unwrap();
    assert_eq!(finished.text, tokenizer.decode(&alone.tokens, true).unwrap());

    // A text prompt is tokenized with the model's tokenizer; without return_logits no logits travel.
    let request = GenerateRequest {
        prompt: Some(Prompt::Text("Hello, switchyard!".into())),
        max_new_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let responses = collect(&mut client, request).await.unwrap();
    let Some(Event::Prompt(info)) = &responses[0].event else { panic!("first a PromptInfo") };
    assert_eq!(info.prompt_ids, tokenizer.encode("Hello, switchyard!", true).unwrap().get_ids());
    assert!(info.prompt_logits.is_empty());
    assert_eq!(responses.len(), 1 + 4 + 1);
    assert!(responses[1..5].iter().all(|r| matches!(&r.event, Some(Event::Token(t)) if t.logits.is_empty())));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_arguments_with_the_numbers() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let text = &fixture().config.text;
    let (vocab, max) = (text.vocab_size, text.max_position_embeddings);

    let status = collect(&mut client, ids_request(vec![1, 2, vocab as u32 + 88], 3)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains(&format!("token id {}", vocab + 88)), "{}", status.message());
    assert!(status.message().contains(&format!("vocab_size {vocab}")), "{}", status.message());

    let status = collect(&mut client, ids_request(vec![1; 10], max as u32)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for number in [10, max, max + 10] {
        assert!(status.message().contains(&number.to_string()), "{number} missing in {}", status.message());
    }
    let status = collect(&mut client, ids_request(vec![1; max + 1], 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains(&format!("{} tokens", max + 1)), "{}", status.message());

    let status = collect(&mut client, ids_request(Vec::new(), 3)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("prompt"), "{}", status.message());
    let mut request = ids_request(vec![1, 2], 3);
    request.top_p = 1.5;
    let status = collect(&mut client, request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("top_p"), "{}", status.message());
    let status = collect(&mut client, GenerateRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_cancels_the_sequence() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut stream = client.generate(ids_request(prompt(9, 6), 3000)).await.unwrap().into_inner();
    for _ in 0..4 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(server.engine.active(), 1);
    drop(stream);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.engine.active() != 0 {
        assert!(Instant::now() < deadline, "the sequence outlived its client ({} steps)", server.engine.steps());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(server.engine.steps() < 3000);
    server.stop().await;
}

fn tokens_of(responses: &[GenerateResponse]) -> Vec<u32> {
    responses.iter().filter_map(|r| if let Some(Event::Token(t)) = &r.event { Some(t.id) } else { None }).collect()
}

fn finished_of(responses: &[GenerateResponse]) -> &switchyard_proto::v1::Finished {
    match responses.last().and_then(|r| r.event.as_ref()) {
        Some(Event::Finished(finished)) => finished,
        other => panic!("the stream ends with Finished, not {other:?}"),
    }
}

async fn wait_until_idle(engine: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.active() != 0 {
        assert!(Instant::now() < deadline, "the engine still holds {} sequences", engine.active());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_the_same_alone_and_batched_with_others() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let seeded = |i: u64| GenerateRequest {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        min_p: 0.05,
        seed: 40 + i,
        ..ids_request(prompt(30 + i, 6 + i as usize), 12)
    };
    let alone = tokens_of(&collect(&mut client, seeded(0)).await.unwrap());
    let sampling = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: Some(50), min_p: 0.05, seed: 40 };
    assert_eq!(alone, solo(&fixture().reference, &prompt(30, 6), 12, sampling).tokens);
    let batched = futures::future::join_all((0..6).map(|i| {
        let mut client = client.clone();
        async move { tokens_of(&collect(&mut client, seeded(i)).await.unwrap()) }
    }))
    .await;
    assert_eq!(batched[0], alone, "batched with five others");
    assert_ne!(batched[1], alone);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_with_each_token_most_likely_first() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let ids = prompt(8, 9);
    let mut request = ids_request(ids.clone(), 5);
    request.logprobs = 4;
    let responses = collect(&mut client, request).await.unwrap();
    let alone = solo(&fixture().reference, &ids, 5, SamplingParams::default());
    let tokens: Vec<_> =
        responses.iter().filter_map(|r| if let Some(Event::Token(t)) = &r.event { Some(t) } else { None }).collect();
    assert_eq!(tokens.len(), 5);
    for (i, token) in tokens.iter().enumerate() {
        let expected = switchyard_model::generate::token_logprobs(&alone.decode_logits[i], alone.tokens[i], 4);
        // Without return_logits the engine computes only the last position's logits: equal to a few ulps.
        assert!((token.logprob - expected.logprob).abs() < 1e-5);
        let top: Vec<(u32, f32)> = token.top_logprobs.iter().map(|t| (t.id, t.logprob)).collect();
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), expected.top.iter().map(|t| t.0).collect::<Vec<_>>());
        assert!(top.iter().zip(&expected.top).all(|(a, b)| (a.1 - b.1).abs() < 1e-5), "{top:?} vs {:?}", expected.top);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0], (token.id, token.logprob));
        assert!(token.logprob < 0.0 && top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    // Not asked for: none travel.
    let responses = collect(&mut client, ids_request(ids, 2)).await.unwrap();
    assert!(responses.iter().all(|r| match &r.event {
        Some(Event::Token(t)) => t.top_logprobs.is_empty() && t.logprob == 0.0,
        _ => true,
    }));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_token_ids_and_stop_strings_end_the_sequence_with_reason_stop() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let tokenizer = load_tokenizer(fixture().dir.path()).unwrap().unwrap();
    let ids = prompt(12, 8);
    let full = collect(&mut client, ids_request(ids.clone(), 12)).await.unwrap();
    let all = tokens_of(&full);
    assert_eq!(finished_of(&full).reason, FinishReason::Length as i32);

    // A stop token ends generation at its first occurrence (the token is sent), even with ignore_eos.
    let stop_token = all[3];
    let first = all.iter().position(|&t| t == stop_token).unwrap();
    let mut request = ids_request(ids.clone(), 12);
    request.stop_token_ids = vec![stop_token];
    let responses = collect(&mut client, request).await.unwrap();
    assert_eq!(tokens_of(&responses), all[..=first]);
    assert_eq!(finished_of(&responses).reason, FinishReason::Stop as i32);
    assert_eq!(finished_of(&responses).generated_tokens as usize, first + 1);

    // A stop string: the text written by some early token. The text is cut where it first appears.
    let text = &finished_of(&full).text;
    let (stop, cut) = (1..all.len() - 1)
        .find_map(|k| {
            let before = tokenizer.decode(&all[..k], true).unwrap();
            let after = tokenizer.decode(&all[..=k], true).unwrap();
            let piece = after.strip_prefix(before.as_str())?.trim();
            let at = text.find(piece)?;
            // It must be complete before the last token, so that stopping shows.
            (!piece.is_empty() && at + piece.len() <= after.len()).then(|| (piece.to_string(), at))
        })
        .expect("some token writes text");
    let mut request = ids_request(ids.clone(), 12);
    request.stop = vec!["never in this text \u{1}".into(), stop.clone()];
    let responses = collect(&mut client, request).await.unwrap();
    let finished = finished_of(&responses);
    assert_eq!(finished.reason, FinishReason::Stop as i32);
    assert_eq!(finished.text, text[..cut], "cut at {stop:?}");
    assert!((finished.generated_tokens as usize) < all.len());
    assert_eq!(tokens_of(&responses), all[..finished.generated_tokens as usize]);
    // The engine dropped the sequence instead of generating the rest.
    wait_until_idle(&server.engine).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sampling_controls_are_invalid_arguments_naming_the_field() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let vocab = fixture().config.text.vocab_size as u32;
    let base = || ids_request(vec![1, 2], 3);
    let bad_id = (vocab + 3).to_string();
    let cases: Vec<(GenerateRequest, Vec<&str>)> = vec![
        (GenerateRequest { min_p: 1.5, ..base() }, vec!["min_p", "1.5"]),
        (GenerateRequest { logprobs: 21, ..base() }, vec!["logprobs", "21", "20"]),
        (GenerateRequest { stop: vec!["x".into(); 9], ..base() }, vec!["stop", "9", "8"]),
        (GenerateRequest { stop: vec!["x".into(), String::new()], ..base() }, vec!["stop", "empty"]),
        (GenerateRequest { stop_token_ids: vec![vocab + 3], ..base() }, vec!["stop_token_ids", &bad_id]),
    ];
    for (request, words) in cases {
        let status = collect(&mut client, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        for word in words {
            assert!(status.message().contains(word), "{word} missing in {}", status.message());
        }
    }
    server.stop().await;
}
