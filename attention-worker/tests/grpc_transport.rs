//! The whole data plane over real sockets in one test process: expert workers served over gRPC, the placement built
//! from their `ExpertControl/Status`, dispatch through `GrpcTransport`, and the `Generation` service. A killed expert
//! worker gives the client `Unavailable` naming it within seconds, never a hang.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expert_workers, fixture, max_diff, prompt, serve_expert_worker, solo};
use switchyard_attention_worker::{
    placement_from_expert_workers, serve, Engine, EngineOptions, GenerationService, RemoteExperts, RoutingTable,
};
use switchyard_model::{ExpertSelection, SamplingParams};
use switchyard_proto::v1::generate_request::Prompt;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::generation_client::GenerationClient;
use switchyard_proto::v1::{GenerateRequest, TokenIds};
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::WireFormat;
use tokio_stream::StreamExt;
use tonic::Code;

fn ids_request(ids: Vec<u32>, max_new_tokens: u32, return_logits: bool) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        max_new_tokens,
        ignore_eos: true,
        return_logits,
        ..Default::default()
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn generation_over_grpc_and_a_killed_expert_worker() {
    let fixture = fixture();
    let workers = expert_workers(&["0-3", "4-7"]);
    let mut expert_runtimes = Vec::new();
    let mut endpoints = Vec::new();
    for worker in &workers {
        let (runtime, endpoint) = serve_expert_worker(worker.clone());
        expert_runtimes.push(Some(runtime));
        endpoints.push(endpoint);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        // The second worker is given without an id: it takes the one the worker reports.
        let given = vec![("first".to_string(), endpoints[0].clone()), (String::new(), endpoints[1].clone())];
        let placement = placement_from_expert_workers(&given, Duration::from_secs(5)).await.unwrap();
        assert_eq!(placement.epoch, 7);
        let routing = Arc::new(RoutingTable::new(&placement, &fixture.config.text).unwrap());
        let ids: Vec<&str> = routing.workers().iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["first", "ew-1"]);

        let transport = GrpcTransport::new(WireFormat::default(), "aw-grpc".into());
        for worker in routing.workers() {
            transport.add_worker(worker.id.clone(), worker.endpoint.clone());
        }
        let remote = RemoteExperts::new(routing, Arc::new(transport), tokio::runtime::Handle::current(), "aw-grpc");
        let mut model = common::load(fixture.dir.path(), &fixture.config, ExpertSelection::None);
        model.set_routed_experts(Arc::new(remote));
        let engine =
            Arc::new(Engine::start(Arc::new(model), EngineOptions { threads: 2, ..EngineOptions::default() }).unwrap());
        let service = GenerationService::new(engine.clone(), None, "aw-grpc");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, service, None, async move {
            let _ = stopped.await;
        }));
        let mut client = GenerationClient::connect(endpoint).await.unwrap();

        // f32 on the wire: the same numbers as the single-process model, to the bit.
        let ids = prompt(21, 30);
        let alone = solo(&fixture.reference, &ids, 6, SamplingParams::default());
        let mut stream = client.generate(ids_request(ids.clone(), 6, true)).await.unwrap().into_inner();
        let mut tokens = Vec::new();
        while let Some(response) = stream.next().await {
            match response.unwrap().event.unwrap() {
                Event::Prompt(info) => {
                    assert_eq!(max_diff(&f32s(&info.prompt_logits), &alone.prompt_logits.concat()), 0.0)
                }
                Event::Token(token) => {
                    assert_eq!(max_diff(&f32s(&token.logits), &alone.decode_logits[tokens.len()]), 0.0);
                    tokens.push(token.id);
                }
                Event::Finished(finished) => assert_eq!(finished.generated_tokens, 6),
            }
        }
        assert_eq!(tokens, alone.tokens);
        assert!(workers.iter().all(|w| w.counters().tokens_computed > 0));

        // Kill the second expert worker mid-generation.
        let mut stream = client.generate(ids_request(prompt(22, 8), 3000, false)).await.unwrap().into_inner();
        for _ in 0..3 {
            stream.next().await.unwrap().unwrap();
        }
        let killed = Instant::now();
        if let Some(runtime) = expert_runtimes[1].take() {
            runtime.shutdown_background();
        }
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("an answer within 10 s") {
                Some(Ok(_)) => {}
                Some(Err(status)) => break status,
                None => panic!("the stream ended without an error"),
            }
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("ew-1"), "{}", status.message());
        assert!(killed.elapsed() < Duration::from_secs(5), "noticed after {:?}", killed.elapsed());

        // The attention worker keeps serving: a new request fails fast with the same clear error, never hangs.
        let started = Instant::now();
        let mut stream = client.generate(ids_request(prompt(23, 4), 4, false)).await.unwrap().into_inner();
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("an answer within 10 s") {
                Some(Ok(_)) => {}
                Some(Err(status)) => break status,
                None => panic!("the stream ended without an error"),
            }
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("ew-1"), "{}", status.message());
        assert!(started.elapsed() < Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while engine.active() != 0 {
            assert!(Instant::now() < deadline, "failed sequences stay active");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
    });
    for runtime in expert_runtimes.into_iter().flatten() {
        runtime.shutdown_background();
    }
}
