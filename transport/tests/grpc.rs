//! The gRPC transport over real loopback sockets: numbers identical to the in-process transport, many requests on one
//! stream, malformed requests refused with the right code, and a lost peer reported fast instead of hanging.
//!
//! Each server runs on its own tokio runtime so that a test can kill it the way a process dies: every socket closes
//! at once, nothing is shut down gracefully.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_proto::v1::expert_dispatch_client::ExpertDispatchClient;
use switchyard_proto::v1::DispatchRequest;
use switchyard_transport::codec;
use switchyard_transport::grpc::{server_builder, DispatchServer, GrpcTransport};
use switchyard_transport::in_process::InProcessTransport;
use switchyard_transport::{BoxFuture, ExpertBatch, ExpertService, Transport, TransportError, WireDtype, WireFormat};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;

/// How long a lost peer may take to be reported.
const FAST: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answer at once.
    Now,
    /// Answer after a few milliseconds that depend on the step, so answers come back out of order.
    Shuffle,
    /// Never answer.
    Never,
}

/// Expert `e` multiplies its inputs by `e + 1`. Serves layers `0..4`, experts `0..8`, placement epoch 5.
struct ScaleService {
    mode: Mode,
    /// Computations currently running (dropped ones leave).
    live: Arc<AtomicUsize>,
}

const EPOCH: u64 = 5;

impl ScaleService {
    fn new(mode: Mode) -> Arc<Self> {
        Arc::new(ScaleService { mode, live: Arc::new(AtomicUsize::new(0)) })
    }
}

struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn scale(batch: &ExpertBatch) -> Vec<f32> {
    batch
        .inputs
        .chunks_exact(batch.hidden)
        .zip(&batch.experts)
        .flat_map(|(row, &expert)| row.iter().map(move |v| v * (expert + 1) as f32))
        .collect()
}

impl ExpertService for ScaleService {
    fn validate(&self, batch: &ExpertBatch) -> Result<(), TransportError> {
        if batch.layer >= 4 {
            return Err(TransportError::UnknownLayer { layer: batch.layer });
        }
        if batch.placement_epoch != EPOCH {
            return Err(TransportError::StaleEpoch { sent: batch.placement_epoch, current: EPOCH });
        }
        match batch.experts.iter().find(|&&e| e >= 8) {
            Some(&expert) => Err(TransportError::ExpertNotHeld { layer: batch.layer, expert }),
            None => Ok(()),
        }
    }

    fn compute(&self, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        self.live.fetch_add(1, Ordering::SeqCst);
        let live = Live(self.live.clone());
        let mode = self.mode;
        Box::pin(async move {
            let _live = live;
            match mode {
                Mode::Now => {}
                Mode::Shuffle => tokio::time::sleep(Duration::from_millis(batch.step_id % 7)).await,
                Mode::Never => std::future::pending::<()>().await,
            }
            Ok(scale(&batch))
        })
    }
}

/// An expert worker on its own runtime.
struct TestServer {
    address: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    stopped: Option<oneshot::Receiver<()>>,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
}

impl TestServer {
    fn start(service: Arc<dyn ExpertService>) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (stop, stop_signal) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = oneshot::channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        runtime.spawn(async move {
            let server = DispatchServer::new(service, "e0".into());
            let streams = server.shutdown_handle();
            let incoming =
                TcpListenerStream::new(tokio::net::TcpListener::from_std(listener).unwrap()).inspect(move |_| {
                    counter.fetch_add(1, Ordering::SeqCst);
                });
            server_builder()
                .add_service(server.into_service())
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_signal.await;
                    streams.shutdown();
                })
                .await
                .unwrap();
            let _ = stopped_tx.send(());
        });
        TestServer { address, runtime: Some(runtime), stop: Some(stop), stopped: Some(stopped), accepted }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Graceful shutdown; returns once the server has stopped.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let stopped = self.stopped.take().unwrap();
        tokio::time::timeout(FAST, stopped).await.expect("graceful shutdown hung").unwrap();
    }

    /// Dies like a process: every task and socket dropped at once.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn values(seed: u32, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 10f32.powi((i % 5) as i32 - 2)
        })
        .collect()
}

fn batch(seed: u32, tokens: usize, hidden: usize) -> ExpertBatch {
    ExpertBatch {
        step_id: seed as u64,
        micro_batch: seed % 2,
        layer: 1,
        placement_epoch: EPOCH,
        attention_worker: "attn-0".into(),
        experts: (0..tokens as u32).map(|t| (t + seed) % 8).collect(),
        inputs: values(seed, tokens * hidden),
        hidden,
    }
}

fn grpc(server: &TestServer, wire: WireFormat) -> GrpcTransport {
    let transport = GrpcTransport::new(wire, "attn-0".into());
    transport.add_worker("e0", server.endpoint());
    transport
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < FAST, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wire_format_matches_the_in_process_transport_bit_for_bit() {
    let service = ScaleService::new(Mode::Now);
    let server = TestServer::start(service.clone());
    let formats = [
        (WireDtype::F32, WireDtype::F32),
        (WireDtype::Bf16, WireDtype::Bf16),
        (WireDtype::Fp8E4m3, WireDtype::F32),
        (WireDtype::Fp8E4m3, WireDtype::Bf16),
    ];
    for (dispatch, combine) in formats {
        let wire = WireFormat { dispatch, combine };
        let in_process = InProcessTransport::new(wire);
        in_process.add_worker("e0", service.clone());
        let remote = grpc(&server, wire);
        for (seed, tokens, hidden) in [(1, 13, 160), (2, 1, 5120), (3, 0, 64)] {
            let b = batch(seed, tokens, hidden);
            let expected = in_process.dispatch("e0", b.clone()).await.unwrap();
            let got = remote.dispatch("e0", b.clone()).await.unwrap();
            assert_eq!(bits(&got), bits(&expected), "{wire:?}, [{tokens}, {hidden}]");
            if wire == WireFormat::default() {
                assert_eq!(bits(&got), bits(&scale(&b)));
            }
        }
    }
}

/// A dispatch too large for one request (split into pieces, outputs streamed into a block larger than the cache)
/// still matches the in-process transport bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_dispatch_matches_the_in_process_transport() {
    let service = ScaleService::new(Mode::Shuffle);
    let server = TestServer::start(service.clone());
    for (dispatch, combine) in [(WireDtype::Fp8E4m3, WireDtype::Bf16), (WireDtype::Bf16, WireDtype::F32)] {
        let wire = WireFormat { dispatch, combine };
        let in_process = InProcessTransport::new(wire);
        in_process.add_worker("e0", service.clone());
        // 4099 x 2052: 33 MiB of f32, in ~9 pieces of uneven row counts.
        let b = batch(11, 4099, 2052);
        let expected = in_process.dispatch("e0", b.clone()).await.unwrap();
        let got = grpc(&server, wire).dispatch("e0", b).await.unwrap();
        assert!(bits(&got) == bits(&expected), "{wire:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_dispatches_share_one_stream() {
    let server = TestServer::start(ScaleService::new(Mode::Shuffle));
    let transport = Arc::new(grpc(&server, WireFormat { dispatch: WireDtype::Bf16, combine: WireDtype::F32 }));
    let dispatches = (0..200u32).map(|seed| {
        let transport = transport.clone();
        tokio::spawn(async move {
            let b = batch(seed, 1 + seed as usize % 5, 48);
            let inputs = codec::round_trip(&b.inputs, 48, WireDtype::Bf16);
            let expected = scale(&ExpertBatch { inputs, ..b.clone() });
            let got = transport.dispatch("e0", b).await.unwrap();
            assert_eq!(bits(&got), bits(&expected), "dispatch {seed}");
        })
    });
    for done in futures::future::join_all(dispatches).await {
        done.unwrap();
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1, "one connection for all dispatches");
}

/// A valid request for the raw client to spoil.
fn raw_request(seed: u32) -> DispatchRequest {
    let wire = WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::F32 };
    codec::request_from_batch(seed as u64, &batch(seed, 4, 32), wire)
}

/// Sends one request on a fresh stream and returns the status that ends it.
async fn stream_status(endpoint: &str, request: DispatchRequest) -> tonic::Status {
    let mut client = ExpertDispatchClient::connect(endpoint.to_owned()).await.unwrap();
    let mut responses = client.dispatch_stream(tokio_stream::iter([request])).await.unwrap().into_inner();
    match tokio::time::timeout(FAST, responses.message()).await.expect("no answer") {
        Err(status) => status,
        Ok(answer) => panic!("expected an error, got {answer:?}"),
    }
}

async fn unary_status(endpoint: &str, request: DispatchRequest) -> tonic::Status {
    let mut client = ExpertDispatchClient::connect(endpoint.to_owned()).await.unwrap();
    client.dispatch(request).await.unwrap_err()
}

/// The generated (prost) client reads the answers the server writes by hand, on both methods, and they are the
/// in-process transport's numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_clients_get_the_same_answers() {
    let service = ScaleService::new(Mode::Shuffle);
    let server = TestServer::start(service.clone());
    let wire = WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 };
    let in_process = InProcessTransport::new(wire);
    in_process.add_worker("e0", service.clone());
    let requests: Vec<_> = (0..5u32)
        .map(|seed| codec::request_from_batch(seed as u64, &batch(seed, 3 + seed as usize, 40), wire))
        .collect();
    let mut client = ExpertDispatchClient::connect(server.endpoint()).await.unwrap();
    let mut expected = Vec::new();
    for (seed, request) in (0..5u32).zip(&requests) {
        let b = batch(seed, 3 + seed as usize, 40);
        expected.push(in_process.dispatch("e0", b).await.unwrap());
        let response = client.dispatch(request.clone()).await.unwrap().into_inner();
        assert_eq!(response.request_id, request.request_id);
        let got = codec::outputs_from_response(&response, 3 + seed as usize, 40).unwrap();
        assert_eq!(bits(&got), bits(&expected[seed as usize]), "unary {seed}");
    }
    let mut responses = client.dispatch_stream(tokio_stream::iter(requests.clone())).await.unwrap().into_inner();
    let mut answered = 0;
    while let Some(response) = responses.message().await.unwrap() {
        let seed = response.request_id as usize;
        assert_eq!((response.step_id, response.layer), (seed as u64, 1));
        let got = codec::outputs_from_response(&response, 3 + seed, 40).unwrap();
        assert_eq!(bits(&got), bits(&expected[seed]), "stream {seed}");
        answered += 1;
    }
    assert_eq!(answered, requests.len(), "every request answered, then the stream ended with OK");
}

/// Makes a valid request malformed.
type Spoil = Box<dyn Fn(&mut DispatchRequest)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_invalid_argument_naming_the_field() {
    let server = TestServer::start(ScaleService::new(Mode::Now));
    let endpoint = server.endpoint();
    let spoiled: [(&str, Spoil); 6] = [
        (
            "activations.data",
            Box::new(|r| {
                let a = r.activations.as_mut().unwrap();
                a.data = a.data.slice(..a.data.len() - 3);
            }),
        ),
        ("expert_ids", Box::new(|r| r.expert_ids = r.expert_ids.slice(..8))),
        ("activations.dtype", Box::new(|r| r.activations.as_mut().unwrap().dtype = 0)),
        (
            "activations.token_scales",
            Box::new(|r| {
                let a = r.activations.as_mut().unwrap();
                let mut scales = a.token_scales.to_vec();
                scales[..4].copy_from_slice(&f32::NAN.to_le_bytes());
                a.token_scales = scales.into();
            }),
        ),
        ("layer 9", Box::new(|r| r.layer = 9)),
        (
            "expert 8",
            Box::new(|r| {
                let mut ids = r.expert_ids.to_vec();
                ids[..4].copy_from_slice(&8u32.to_le_bytes());
                r.expert_ids = ids.into();
            }),
        ),
    ];
    for (field, spoil) in &spoiled {
        let mut request = raw_request(3);
        spoil(&mut request);
        for status in [stream_status(&endpoint, request.clone()).await, unary_status(&endpoint, request).await] {
            assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
            assert!(status.message().contains(field), "{field} not named in {:?}", status.message());
        }
    }
    // The worker is still serving.
    let transport = grpc(&server, WireFormat::default());
    let b = batch(4, 3, 32);
    assert_eq!(transport.dispatch("e0", b.clone()).await.unwrap(), scale(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_is_failed_precondition_with_both_epochs() {
    let server = TestServer::start(ScaleService::new(Mode::Now));
    let mut request = raw_request(1);
    request.placement_epoch = 3;
    let status = stream_status(&server.endpoint(), request).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains('3') && status.message().contains('5'), "{:?}", status.message());

    let transport = grpc(&server, WireFormat::default());
    let stale = ExpertBatch { placement_epoch: 3, ..batch(1, 2, 16) };
    assert_eq!(transport.dispatch("e0", stale).await.unwrap_err(), TransportError::StaleEpoch { sent: 3, current: 5 });
    let not_held = ExpertBatch { experts: vec![1, 11], ..batch(1, 2, 16) };
    assert_eq!(
        transport.dispatch("e0", not_held).await.unwrap_err(),
        TransportError::ExpertNotHeld { layer: 1, expert: 11 }
    );
    // The stream ended with that error; the next dispatch opens a new one.
    let b = batch(2, 2, 16);
    assert_eq!(transport.dispatch("e0", b.clone()).await.unwrap(), scale(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_fails_alone_and_its_stream_mates_are_retryable() {
    let service = ScaleService::new(Mode::Never);
    let server = TestServer::start(service.clone());
    let transport = Arc::new(grpc(&server, WireFormat::default()));
    let waiting: Vec<_> = (0..3)
        .map(|seed| {
            let transport = transport.clone();
            tokio::spawn(async move { transport.dispatch("e0", batch(seed, 2, 16)).await })
        })
        .collect();
    wait_until("3 computations run", || service.live.load(Ordering::SeqCst) == 3).await;
    let bad = ExpertBatch { layer: 7, ..batch(9, 2, 16) };
    assert_eq!(transport.dispatch("e0", bad).await.unwrap_err(), TransportError::UnknownLayer { layer: 7 });
    for waiting in waiting {
        let error = tokio::time::timeout(FAST, waiting).await.expect("hung").unwrap().unwrap_err();
        assert!(error.retryable(), "{error:?}");
    }
    // The server dropped the computations of the stream it ended.
    wait_until("computations dropped", || service.live.load(Ordering::SeqCst) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_pending_dispatches_within_seconds() {
    let service = ScaleService::new(Mode::Never);
    let mut server = TestServer::start(service.clone());
    let transport = Arc::new(grpc(&server, WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 }));
    let waiting: Vec<_> = (0..5)
        .map(|seed| {
            let transport = transport.clone();
            tokio::spawn(async move { transport.dispatch("e0", batch(seed, 3, 64)).await })
        })
        .collect();
    wait_until("5 computations run", || service.live.load(Ordering::SeqCst) == 5).await;
    let killed = Instant::now();
    server.kill();
    for waiting in waiting {
        let error = tokio::time::timeout(FAST, waiting).await.expect("dispatch hung after kill").unwrap().unwrap_err();
        assert!(matches!(&error, TransportError::Unavailable { peer, .. } if peer == "e0"), "{error:?}");
    }
    assert!(killed.elapsed() < FAST);
    // Nothing listens any more: the reconnect fails, fast.
    let again = tokio::time::timeout(FAST, transport.dispatch("e0", batch(7, 1, 64))).await.expect("hung");
    assert!(matches!(again, Err(TransportError::Unavailable { .. })), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_fails_fast_with_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let transport = GrpcTransport::new(WireFormat::default(), "attn-0".into());
    transport.add_worker("e0", format!("http://127.0.0.1:{port}"));
    transport.add_worker("bad", "not a uri".into());
    let start = Instant::now();
    let error = tokio::time::timeout(FAST, transport.dispatch("e0", batch(1, 1, 8))).await.expect("hung").unwrap_err();
    assert!(matches!(&error, TransportError::Unavailable { peer, .. } if peer == "e0"), "{error:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    let unknown = transport.dispatch("e9", batch(1, 1, 8)).await.unwrap_err();
    assert!(matches!(&unknown, TransportError::Unavailable { peer, .. } if peer == "e9"), "{unknown:?}");
    let bad = transport.dispatch("bad", batch(1, 1, 8)).await.unwrap_err();
    assert!(matches!(bad, TransportError::Unavailable { .. }), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_past_its_deadline_fails() {
    let server = TestServer::start(ScaleService::new(Mode::Never));
    let transport =
        GrpcTransport::new(WireFormat::default(), "attn-0".into()).with_request_timeout(Duration::from_millis(300));
    transport.add_worker("e0", server.endpoint());
    let start = Instant::now();
    let error = transport.dispatch("e0", batch(1, 2, 8)).await.unwrap_err();
    assert!(matches!(error, TransportError::Unavailable { .. }), "{error:?}");
    assert!(start.elapsed() < FAST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attention_worker_that_goes_away_frees_its_computations() {
    let service = ScaleService::new(Mode::Never);
    let server = TestServer::start(service.clone());
    let transport = Arc::new(grpc(&server, WireFormat::default()));
    let waiting: Vec<_> = (0..3)
        .map(|seed| {
            let transport = transport.clone();
            tokio::spawn(async move { transport.dispatch("e0", batch(seed, 2, 16)).await })
        })
        .collect();
    wait_until("3 computations run", || service.live.load(Ordering::SeqCst) == 3).await;
    for waiting in &waiting {
        waiting.abort();
    }
    for waiting in waiting {
        let _ = waiting.await;
    }
    drop(transport);
    wait_until("the server dropped the computations", || service.live.load(Ordering::SeqCst) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_open_streams() {
    let mut server = TestServer::start(ScaleService::new(Mode::Now));
    let transport = grpc(&server, WireFormat::default());
    let b = batch(1, 2, 16);
    assert_eq!(transport.dispatch("e0", b.clone()).await.unwrap(), scale(&b));
    // The stream stays open; shutting down must not wait for the attention worker to hang up.
    server.stop().await;
    let after = tokio::time::timeout(FAST, transport.dispatch("e0", b)).await.expect("hung");
    assert!(matches!(after, Err(TransportError::Unavailable { .. })), "{after:?}");
}

/// Moves bytes until `frozen` is set, then holds both sockets open without moving anything more.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP proxy to `target` for one connection that goes silent when `frozen` is set: a peer whose machine hangs,
/// with no FIN or RST to tell.
async fn freezing_proxy(target: SocketAddr, frozen: Arc<AtomicBool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(target).await.unwrap();
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        tokio::spawn(pump(client_read, server_write, frozen.clone()));
        pump(server_read, client_write, frozen).await;
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_hung_worker_is_detected_by_keepalive() {
    let service = ScaleService::new(Mode::Never);
    let server = TestServer::start(service.clone());
    let frozen = Arc::new(AtomicBool::new(false));
    let proxy = freezing_proxy(server.address, frozen.clone()).await;
    let transport = Arc::new(GrpcTransport::new(WireFormat::default(), "attn-0".into()));
    transport.add_worker("e0", format!("http://{proxy}"));
    let waiting = {
        let transport = transport.clone();
        tokio::spawn(async move { transport.dispatch("e0", batch(1, 2, 16)).await })
    };
    wait_until("the computation runs", || service.live.load(Ordering::SeqCst) == 1).await;
    frozen.store(true, Ordering::SeqCst);
    let frozen_at = Instant::now();
    // Keepalive: a ping every second, two seconds to answer.
    let error = tokio::time::timeout(Duration::from_secs(6), waiting).await.expect("hung").unwrap().unwrap_err();
    assert!(matches!(error, TransportError::Unavailable { .. }), "{error:?}");
    assert!(frozen_at.elapsed() < Duration::from_secs(5), "took {:?}", frozen_at.elapsed());
}
