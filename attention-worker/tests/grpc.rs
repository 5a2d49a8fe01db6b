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
            serve(listener, service, async move {
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
