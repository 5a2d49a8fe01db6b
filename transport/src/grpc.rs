//! The gRPC transport: one long-lived `ExpertDispatch.DispatchStream` per (attention worker, expert worker) pair.
//!
//! Client ([`GrpcTransport`]): requests are multiplexed on the stream by `request_id`; one background task per stream
//! reads responses and completes the waiting dispatch. When the stream ends or breaks, every pending dispatch fails at
//! once ([`TransportError::Unavailable`], or the error the peer answered with), and the next dispatch to that worker
//! opens a new connection. HTTP/2 keepalive pings detect a peer that died silently within a few seconds, and each
//! dispatch has a deadline, so no dispatch waits forever. A large dispatch travels as several requests of about
//! [`SPLIT_VALUES`] values each, sent back to back so that encoding, transfer, the expert worker's work and decoding
//! overlap; the answers are decoded straight into the batch's own block, which becomes the outputs.
//!
//! Server ([`DispatchServer`]): decodes and validates each request as it is read, computes valid ones concurrently (so
//! the [`ExpertService`] can batch requests of several streams) and answers as they complete. A malformed request ends
//! the stream with the status of its error; the status carries the request id (metadata `switchyard-request-id`) so
//! the client fails that request with the error and the others on the stream as retryable.
//!
//! Both sides speak gRPC over tonic's HTTP/2 (channel, server, settings) but write and read the messages themselves
//! (module `wire`): a payload is encoded once, into the buffer HTTP/2 sends from, and decoded from the frames it
//! arrived in, where prost and tonic's codec would copy it once more on each side. The bytes are the `.proto`
//! messages, so generated clients and servers, grpcurl and reflection work with either side. Both sides reuse their
//! large buffers (payloads, decoded blocks; [`codec`]'s recycler): on the machines this runs on, touching fresh memory
//! costs more than encoding into it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use http_body::{Body as _, Frame};
use switchyard_proto::v1::context_shard_client::ContextShardClient;
use switchyard_proto::v1::expert_dispatch_server::SERVICE_NAME;
use switchyard_proto::v1::ReleaseShardRequest;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tonic::body::Body;
use tonic::codegen::http::{self, header, HeaderMap, HeaderValue};
use tonic::codegen::Service;
use tonic::metadata::{MetadataValue, GRPC_CONTENT_TYPE};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::codec::{self, Recycler, Stores};
use crate::context::{PartialAttentionRequest, PartialAttentionResponse};
use crate::error::error_chain;
use crate::wire::{self, Chunks, MessageReader, RequestMessage, ResponseMessage};
use crate::{BoxFuture, ExpertBatch, ExpertService, Transport, TransportError, WireFormat};

/// Largest gRPC message either side sends or accepts: a 4096 x 5120 f32 block is 80 MiB.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// How long connecting (TCP + HTTP/2 + opening the stream) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default deadline of one dispatch, connecting included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 ping interval, both sides: with [`KEEPALIVE_TIMEOUT`], a silently dead peer is noticed within ~3 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 flow-control windows: the 64 KiB default would stall a multi-megabyte payload on every round trip.
const STREAM_WINDOW: u32 = 32 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame a side accepts, the most HTTP/2 allows: a piece of a dispatch (1-4 MiB) travels as one DATA
/// frame, which HTTP/2 writes with one system call and hands over whole. With 1 MiB frames a 4096 x 5120 round trip
/// took ~1 ms more CPU and was slower.
const MAX_FRAME: u32 = (1 << 24) - 1;
/// Output blocks at least this large are decoded with non-temporal stores ([`Stores::Streaming`]): they are written
/// once and do not fit the last-level cache (32 MiB where measured) anyway; this saves ~2 ms of CPU per 4096 x 5120
/// round trip. Smaller blocks stay in cache for the attention worker, which reads them next.
const STREAMING_BLOCK_BYTES: usize = 32 << 20;
/// Requests queued for the stream before a dispatch waits (backpressure), and responses queued by the server.
const QUEUE: usize = 64;
/// How long a failed dispatch waits for the errors of its other requests, to report the one that caused the others.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Metadata key of the request whose error ended a stream.
const REQUEST_ID: &str = "switchyard-request-id";
/// The HTTP/2 paths of the two methods.
const DISPATCH_STREAM_PATH: &str = "/switchyard.v1.ExpertDispatch/DispatchStream";
const DISPATCH_PATH: &str = "/switchyard.v1.ExpertDispatch/Dispatch";

/// A tonic server builder with the settings the dispatch stream wants (windows, frame size, keepalive). Serve it on
/// `TcpIncoming::from(listener).with_nodelay(Some(true))`: tonic applies `Server::tcp_nodelay` only to listeners it
/// binds itself, and Nagle's algorithm would hold small answers back by up to 40 ms.
/// Expert workers add [`DispatchServer::into_service`] (and health, reflection) to it.
pub fn server_builder() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain maps behind, still consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------------------------

/// Dispatches to expert workers over gRPC (see the module docs). Its dispatch futures must be polled inside a tokio
/// runtime (they spawn the stream reader and use tokio timers).
pub struct GrpcTransport {
    wire: WireFormat,
    attention_worker_id: String,
    request_timeout: Duration,
    next_request_id: AtomicU64,
    peers: RwLock<HashMap<String, Arc<Peer>>>,
    /// Buffers of sent requests, reused once HTTP/2 has written them to the socket.
    recycler: Arc<Recycler<u8>>,
    /// Size of the pieces a large dispatch is split into, in values.
    split_values: usize,
    /// Attention workers reachable as members of context-parallel groups, by worker id.
    context_members: RwLock<HashMap<String, Result<ContextShardClient<Channel>, String>>>,
}

impl GrpcTransport {
    /// A transport for the attention worker `attention_worker_id` (named in requests whose batch names no sender),
    /// with no expert workers yet.
    pub fn new(wire: WireFormat, attention_worker_id: String) -> Self {
        codec::keep_payload_sized_allocations();
        GrpcTransport {
            wire,
            attention_worker_id,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            next_request_id: AtomicU64::new(1),
            peers: RwLock::new(HashMap::new()),
            recycler: Recycler::new(),
            split_values: SPLIT_VALUES,
            context_members: RwLock::new(HashMap::new()),
        }
    }

    /// Registers (or replaces) the attention worker `id` at `endpoint` as a possible member of context-parallel
    /// groups. Connects on first use.
    pub fn add_context_member(&self, id: impl Into<String>, endpoint: String) -> &Self {
        let client = peer_endpoint(endpoint).map(|e| {
            ContextShardClient::new(e.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        });
        self.context_members.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id.into(), client);
        self
    }

    fn context_member(&self, id: &str) -> Result<ContextShardClient<Channel>, TransportError> {
        let unavailable = |reason: String| TransportError::Unavailable { peer: id.to_string(), reason };
        match self.context_members.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(id) {
            Some(Ok(client)) => Ok(client.clone()),
            Some(Err(reason)) => Err(unavailable(reason.clone())),
            None => Err(unavailable("not a known attention worker of this cluster".into())),
        }
    }

    /// Sets the deadline of each dispatch (default [`DEFAULT_REQUEST_TIMEOUT`]); past it the dispatch fails with
    /// [`TransportError::Unavailable`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the size of the requests a large dispatch is split into, in values (default [`SPLIT_VALUES`]; at least
    /// 1). Results do not depend on it.
    pub fn with_split_values(mut self, values: usize) -> Self {
        self.split_values = values.max(1);
        self
    }

    /// Registers (or replaces) the expert worker `id` at `endpoint` (`http://IP:PORT`; `IP:PORT` means the same).
    /// Connects on the first dispatch; an endpoint that does not parse makes every dispatch to `id` fail with
    /// [`TransportError::Unavailable`].
    pub fn add_worker(&self, id: impl Into<String>, endpoint: String) -> &Self {
        let id = id.into();
        let peer = Arc::new(Peer::new(id.clone(), endpoint));
        self.peers.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id, peer);
        self
    }

    /// Forgets the expert worker `id`, closing its stream once the dispatches in flight end; whether it was known.
    pub fn remove_worker(&self, id: &str) -> bool {
        self.peers.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(id).is_some()
    }

    /// The wire format requests are sent in.
    pub fn wire(&self) -> WireFormat {
        self.wire
    }
}

/// Values (`tokens * hidden`) per request when a dispatch is split: 2^19 is 102 tokens of Maverick's 5120, 2 MiB of
/// f32. Large enough that per-request costs vanish, small enough that the pieces overlap well and stay in cache
/// between the steps that touch them (on the 2-core machine 2^19 beat 2^20 by ~2 ms a 4096 x 5120 round trip, 2^18
/// was no better).
pub const SPLIT_VALUES: usize = 1 << 19;

/// Row ranges of the requests a dispatch of `tokens` rows of `hidden` is split into: one request up to
/// `2 * split_values` values, then pieces of about `split_values` values with equal row counts (give or take one).
fn split_rows(tokens: usize, hidden: usize, split_values: usize) -> Vec<std::ops::Range<usize>> {
    let split_values = split_values.max(1);
    let values = tokens.saturating_mul(hidden);
    let pieces = if values <= 2 * split_values { 1 } else { values.div_ceil(split_values).min(tokens) };
    let pieces = pieces.max(1);
    (0..pieces).map(|k| (k * tokens / pieces)..((k + 1) * tokens / pieces)).collect()
}

impl Transport for GrpcTransport {
    /// One unary call per member and layer: the queries of a decode step are a few KiB, a prefill chunk's a few MiB,
    /// so the dispatch stream's buffer reuse would buy little here.
    fn attend(
        &self,
        member: &str,
        request: PartialAttentionRequest,
    ) -> BoxFuture<'static, Result<PartialAttentionResponse, TransportError>> {
        let client = self.context_member(member);
        let (member, timeout) = (member.to_string(), self.request_timeout);
        Box::pin(async move {
            let mut client = client?;
            unary(member, timeout, client.attend(request)).await
        })
    }

    fn release_shard(&self, member: &str, sequence_id: &str) -> BoxFuture<'static, Result<u64, TransportError>> {
        let client = self.context_member(member);
        let request = ReleaseShardRequest { sequence_id: sequence_id.to_string() };
        let (member, timeout) = (member.to_string(), self.request_timeout);
        Box::pin(async move {
            let mut client = client?;
            unary(member, timeout, client.release_shard(request)).await.map(|r| r.blocks_released)
        })
    }

    /// Sends `batch` and resolves to its outputs. A large batch is split by rows into several requests (see
    /// [`SPLIT_VALUES`]) sent back to back on the stream: encoding the next piece, the transfer, the expert worker's
    /// work and decoding the answers overlap, and the pieces' buffers are reused. The outputs are decoded in place
    /// into the batch's own input block, already in memory. The expert worker sees the pieces as separate requests
    /// of the same layer step, which its executor computes together as it would requests of several attention
    /// workers. Any piece failing fails the dispatch with that piece's error.
    fn dispatch(&self, worker: &str, mut batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        let peer = self.peers.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(worker).cloned();
        let rows = split_rows(batch.tokens(), batch.hidden, self.split_values);
        let first_request_id = self.next_request_id.fetch_add(rows.len() as u64, Ordering::Relaxed);
        let (wire, timeout, recycler) = (self.wire, self.request_timeout, self.recycler.clone());
        if batch.attention_worker.is_empty() {
            batch.attention_worker.clone_from(&self.attention_worker_id);
        }
        let span = tracing::debug_span!(
            "dispatch",
            request_id = first_request_id,
            requests = rows.len(),
            step_id = batch.step_id,
            layer = batch.layer,
            attention_worker = %batch.attention_worker,
            expert_worker = %worker,
        );
        let worker = worker.to_owned();
        Box::pin(
            async move {
                let peer = peer.ok_or_else(|| TransportError::Unavailable {
                    peer: worker,
                    reason: "not an expert worker known to this transport".into(),
                })?;
                batch.check_shape()?;
                // A piece is at least one row: a row too large for a message cannot be sent at all.
                let largest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
                let bound = wire::message_size_bound(
                    largest * batch.hidden,
                    largest,
                    wire.dispatch,
                    batch.attention_worker.len(),
                );
                if bound > MAX_MESSAGE_BYTES {
                    return Err(TransportError::InvalidPayload {
                        what: "inputs".into(),
                        reason: format!(
                            "a request of {largest} rows of {} takes up to {bound} bytes, more than the message limit \
                             {MAX_MESSAGE_BYTES}",
                            batch.hidden
                        ),
                    });
                }
                let call = peer.call(Call { first_request_id, batch, rows, wire, recycler });
                match tokio::time::timeout(timeout, call).await {
                    Ok(outputs) => outputs,
                    Err(_) => Err(TransportError::Unavailable {
                        peer: peer.id.clone(),
                        reason: format!("no answer within {timeout:?}"),
                    }),
                }
            }
            .instrument(span),
        )
    }
}

/// One dispatch as the stream sees it: the batch, the row ranges of its requests and their ids
/// (`first_request_id + piece`).
struct Call {
    first_request_id: u64,
    batch: ExpertBatch,
    rows: Vec<std::ops::Range<usize>>,
    wire: WireFormat,
    recycler: Arc<Recycler<u8>>,
}

type Waiter = oneshot::Sender<Result<ResponseMessage, TransportError>>;

/// The dispatches waiting on one stream, and why it ended once it has.
#[derive(Default)]
struct StreamState {
    pending: HashMap<u64, Waiter>,
    closed: Option<TransportError>,
}

/// One open dispatch stream.
struct Connection {
    /// Encoded requests, written to the stream in order.
    requests: mpsc::Sender<Result<Bytes, Status>>,
    state: Arc<Mutex<StreamState>>,
    reader: AbortHandle,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.requests.is_closed() || lock(&self.state).closed.is_some()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Dropping the response stream resets the HTTP/2 stream, so the server drops its computations for us too.
        self.reader.abort();
    }
}

/// Removes a dispatch's requests from the pending map when it ends for any reason (answer, error, deadline, caller
/// gone).
struct PendingGuard {
    state: Arc<Mutex<StreamState>>,
    request_ids: std::ops::Range<u64>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        for request_id in self.request_ids.clone() {
            state.pending.remove(&request_id);
        }
    }
}

/// One expert worker as seen by the client.
/// The tonic endpoint of a peer at `endpoint` (`http://IP:PORT`; `IP:PORT` as printed without a scheme is accepted
/// too), with the transport's connection settings.
fn peer_endpoint(endpoint: String) -> Result<Endpoint, String> {
    let endpoint = if endpoint.contains("://") { endpoint } else { format!("http://{endpoint}") };
    Endpoint::from_shared(endpoint.clone())
        .map(|e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
        })
        .map_err(|e| format!("invalid endpoint {endpoint:?}: {}", error_chain(&e)))
}

/// Awaits a unary call to `peer` for at most `timeout`, mapping its status to the transport's error.
async fn unary<T>(
    peer: String,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(TransportError::from_status(peer, status)),
        Err(_) => Err(TransportError::Unavailable { peer, reason: format!("no answer within {timeout:?}") }),
    }
}

struct Peer {
    id: String,
    endpoint: Result<Endpoint, String>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Peer {
    fn new(id: String, endpoint: String) -> Self {
        let endpoint = peer_endpoint(endpoint);
        if let Err(reason) = &endpoint {
            tracing::warn!(expert_worker = %id, "{reason}");
        }
        Peer { id, endpoint, connection: tokio::sync::Mutex::new(None) }
    }

    fn unavailable(&self, reason: impl Into<String>) -> TransportError {
        TransportError::Unavailable { peer: self.id.clone(), reason: reason.into() }
    }

    /// Sends the requests of `call` on the stream (opening it if needed), encoding each just before it goes, and
    /// decodes the answers into the batch's input block as they come back, in any order.
    async fn call(&self, call: Call) -> Result<Vec<f32>, TransportError> {
        let Call { first_request_id, mut batch, rows, wire, recycler } = call;
        let connection = self.connection().await?;
        let request_ids = first_request_id..first_request_id + rows.len() as u64;
        let mut answers = FuturesUnordered::new();
        {
            let mut state = lock(&connection.state);
            if let Some(error) = &state.closed {
                return Err(error.clone());
            }
            for (piece, request_id) in request_ids.clone().enumerate() {
                let (waiter, answer) = oneshot::channel();
                state.pending.insert(request_id, waiter);
                answers.push(answer.map(move |answer| (piece, answer)));
            }
        }
        let _guard = PendingGuard { state: connection.state.clone(), request_ids: request_ids.clone() };
        let hidden = batch.hidden;
        // The inputs are encoded piece by piece before any answer can arrive for that piece, so each answer is
        // decoded over the rows it replaces.
        let mut block = std::mem::take(&mut batch.inputs);
        let mut answered = 0;
        for (request_id, range) in request_ids.zip(&rows) {
            let values = range.start * hidden..range.end * hidden;
            let request = wire::encode_request(
                request_id,
                &batch,
                &batch.experts[range.clone()],
                &block[values],
                wire,
                Some(&recycler),
            );
            // The stream may die while this waits for queue space: the reader then fails the answers.
            let permit = loop {
                tokio::select! {
                    biased;
                    Some((piece, answer)) = answers.next() => {
                        self.take_answer(&connection, &mut answers, &rows, hidden, &mut block, piece, answer).await?;
                        answered += 1;
                    }
                    permit = connection.requests.reserve() => match permit {
                        Ok(permit) => break permit,
                        Err(_) => {
                            let error = self.unavailable("the dispatch stream is closed");
                            lock(&connection.state).closed.get_or_insert_with(|| error.clone());
                            return Err(error);
                        }
                    },
                }
            };
            permit.send(Ok(request));
            // Answers already here are decoded now, while the next piece's request travels.
            while let Some(Some((piece, answer))) = answers.next().now_or_never() {
                self.take_answer(&connection, &mut answers, &rows, hidden, &mut block, piece, answer).await?;
                answered += 1;
            }
        }
        while let Some((piece, answer)) = answers.next().await {
            self.take_answer(&connection, &mut answers, &rows, hidden, &mut block, piece, answer).await?;
            answered += 1;
        }
        debug_assert_eq!(answered, rows.len());
        Ok(block)
    }

    /// Decodes the answer to piece `piece` into its rows of `block`. On an error, returns the most telling error of
    /// the dispatch: when the stream ended because one request failed, the reader fails that request with its error
    /// and the others as `Unavailable`, in no particular order, so a retryable error waits for the rest.
    #[allow(clippy::too_many_arguments)]
    async fn take_answer<F>(
        &self,
        connection: &Connection,
        answers: &mut FuturesUnordered<F>,
        rows: &[std::ops::Range<usize>],
        hidden: usize,
        block: &mut [f32],
        piece: usize,
        answer: Result<Result<ResponseMessage, TransportError>, oneshot::error::RecvError>,
    ) -> Result<(), TransportError>
    where
        F: std::future::Future<
            Output = (usize, Result<Result<ResponseMessage, TransportError>, oneshot::error::RecvError>),
        >,
    {
        let error = match self.answered(answer) {
            Ok(response) => {
                let range = &rows[piece];
                let stores = if std::mem::size_of_val(block) >= STREAMING_BLOCK_BYTES {
                    Stores::Streaming
                } else {
                    Stores::Cached
                };
                let out = &mut block[range.start * hidden..range.end * hidden];
                return codec::outputs_from_message_into(&response, range.len(), hidden, out, stores);
            }
            Err(error) => error,
        };
        // Once the stream is marked closed, the reader has taken (or is about to take) every pending waiter of this
        // dispatch and fails them without awaiting, so the remaining answers arrive at once; the bound only guards
        // against waiting on a reader that is itself gone.
        if error.retryable() && lock(&connection.state).closed.is_some() {
            let rest = tokio::time::timeout(DRAIN_TIMEOUT, answers.collect::<Vec<_>>()).await.unwrap_or_default();
            let telling =
                rest.into_iter().filter_map(|(_, answer)| self.answered(answer).err()).find(|e| !e.retryable());
            return Err(telling.unwrap_or(error));
        }
        Err(error)
    }

    fn answered(
        &self,
        result: Result<Result<ResponseMessage, TransportError>, oneshot::error::RecvError>,
    ) -> Result<ResponseMessage, TransportError> {
        result.unwrap_or_else(|_| Err(self.unavailable("the dispatch stream closed before answering")))
    }

    /// The open stream, or a new one if there is none or it has ended.
    async fn connection(&self) -> Result<Arc<Connection>, TransportError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(connection.clone());
        }
        *slot = None;
        let connection = Arc::new(self.connect().await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn connect(&self) -> Result<Connection, TransportError> {
        let endpoint = self.endpoint.as_ref().map_err(|reason| self.unavailable(reason.clone()))?;
        let uri = endpoint.uri().to_string();
        let mut channel = endpoint
            .connect()
            .await
            .map_err(|e| self.unavailable(format!("cannot connect to {uri}: {}", error_chain(&e))))?;
        let (requests, outgoing) = mpsc::channel(QUEUE);
        let mut request = http::Request::new(Body::new(OutgoingBody::new(outgoing, false)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(DISPATCH_STREAM_PATH);
        *request.version_mut() = http::Version::HTTP_2;
        request.headers_mut().insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
        request.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
        let open = async {
            std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
            channel.call(request).await
        };
        let response = match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                return Err(self.unavailable(format!("cannot open the dispatch stream on {uri}: {}", error_chain(&e))))
            }
            Err(_) => {
                return Err(
                    self.unavailable(format!("{uri} did not open the dispatch stream within {CONNECT_TIMEOUT:?}"))
                )
            }
        };
        let (head, body) = response.into_parts();
        // A server that refuses the call at once answers with the status in the headers and no body.
        if let Some(status) = status_from_headers(&head.headers) {
            return Err(match status.code() {
                Code::Ok => self.unavailable(format!("{uri} ended the dispatch stream at once")),
                _ => TransportError::from_status(self.id.clone(), &status),
            });
        }
        if head.status != http::StatusCode::OK {
            return Err(self.unavailable(format!("{uri} answered the dispatch stream with HTTP {}", head.status)));
        }
        tracing::debug!(expert_worker = %self.id, %uri, "dispatch stream open");
        let state = Arc::new(Mutex::new(StreamState::default()));
        let responses = MessageStream::new(body);
        let reader = tokio::spawn(read_responses(self.id.clone(), responses, state.clone())).abort_handle();
        Ok(Connection { requests, state, reader })
    }
}

/// Completes waiting dispatches as responses arrive; when the stream ends, fails all that are left.
async fn read_responses(peer: String, mut responses: MessageStream, state: Arc<Mutex<StreamState>>) {
    let (error, failed_request) = loop {
        let message = match responses.next().await {
            Ok(Some(message)) => message,
            Ok(None) => break ended(&peer, responses.trailers.as_ref()),
            Err(ReadError::Broken(status)) => break (TransportError::from_status(peer.clone(), &status), None),
            Err(ReadError::Invalid(error)) => break (error, None),
        };
        let response = match wire::read_response(&message) {
            Ok(response) => response,
            Err(error) => break (error, None),
        };
        let waiter = lock(&state).pending.remove(&response.request_id);
        match waiter {
            Some(waiter) => {
                // The dispatch may have given up (deadline) in the meantime: nothing to do then.
                let _ = waiter.send(Ok(response));
            }
            None => {
                tracing::debug!(expert_worker = %peer, request_id = response.request_id, "answer to no pending dispatch")
            }
        }
    };
    let pending = {
        let mut state = lock(&state);
        state.closed = Some(TransportError::Unavailable {
            peer: peer.clone(),
            reason: format!("the dispatch stream ended: {error}"),
        });
        std::mem::take(&mut state.pending)
    };
    tracing::warn!(expert_worker = %peer, pending = pending.len(), "dispatch stream ended: {error}");
    for (request_id, waiter) in pending {
        let error = match failed_request {
            // The others on the stream did nothing wrong: they may be sent again.
            Some(failed) if failed != request_id => TransportError::Unavailable {
                peer: peer.clone(),
                reason: format!("the dispatch stream ended because request {failed} failed: {error}"),
            },
            _ => error.clone(),
        };
        let _ = waiter.send(Err(error));
    }
}

/// Why a response stream that ended normally ended: the status in its trailers, and the request that caused it.
fn ended(peer: &str, trailers: Option<&HeaderMap>) -> (TransportError, Option<u64>) {
    match trailers.and_then(status_from_headers) {
        Some(status) if status.code() != Code::Ok => {
            let failed_request =
                status.metadata().get(REQUEST_ID).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            (TransportError::from_status(peer, &status), failed_request)
        }
        status => {
            let how = if status.is_some() {
                "ended the dispatch stream"
            } else {
                "ended the dispatch stream without a status"
            };
            (TransportError::Unavailable { peer: peer.to_owned(), reason: format!("the expert worker {how}") }, None)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// gRPC over HTTP/2 bodies, both sides
// ---------------------------------------------------------------------------------------------------------------

/// The gRPC status in `headers` (trailers, or the headers of a response refused at once), if there is one.
fn status_from_headers(headers: &HeaderMap) -> Option<Status> {
    if !headers.contains_key(Status::GRPC_STATUS) {
        return None;
    }
    let mut headers = headers.clone();
    // tonic panics on status details that are not base64; this protocol sends none, so a peer's are dropped unread.
    headers.remove(Status::GRPC_STATUS_DETAILS);
    Status::from_header_map(&headers)
}

/// The trailers carrying `status`.
fn status_trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message that is not a valid header value fails; the code still goes.
        trailers = HeaderMap::new();
        trailers.insert(Status::GRPC_STATUS, HeaderValue::from(status.code() as i32));
    }
    trailers
}

/// The body of one direction of a dispatch stream: the encoded messages queued for it, in order. The server's ends
/// with the trailers of the status it was given (`OK` when the queue closes without one).
struct OutgoingBody {
    messages: mpsc::Receiver<Result<Bytes, Status>>,
    with_trailers: bool,
    done: bool,
}

impl OutgoingBody {
    fn new(messages: mpsc::Receiver<Result<Bytes, Status>>, with_trailers: bool) -> Self {
        OutgoingBody { messages, with_trailers, done: false }
    }
}

impl http_body::Body for OutgoingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.messages.poll_recv(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        if self.with_trailers {
            Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))))
        } else {
            Poll::Ready(None)
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Why no message could be read.
enum ReadError {
    /// The HTTP/2 stream broke (reset, connection lost).
    Broken(Status),
    /// The bytes are not gRPC messages.
    Invalid(TransportError),
}

/// Reads the gRPC messages of a received body, keeping each as the frames it arrived in.
struct MessageStream {
    body: Body,
    reader: MessageReader,
    ended: bool,
    /// The trailers, once the body has ended with some.
    trailers: Option<HeaderMap>,
}

impl MessageStream {
    fn new(body: Body) -> Self {
        MessageStream { body, reader: MessageReader::new(MAX_MESSAGE_BYTES), ended: false, trailers: None }
    }

    /// The next message, or `None` once the body has ended. Cancel-safe: a frame is kept as soon as it is read.
    async fn next(&mut self) -> Result<Option<Chunks>, ReadError> {
        loop {
            if let Some(message) = self.reader.next_message().map_err(ReadError::Invalid)? {
                return Ok(Some(message));
            }
            if self.ended {
                if self.reader.buffered() > 0 {
                    return Err(ReadError::Invalid(TransportError::InvalidPayload {
                        what: "grpc message".into(),
                        reason: format!("the stream ended {} bytes into a message", self.reader.buffered()),
                    }));
                }
                return Ok(None);
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.reader.push(data),
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        self.ended = true;
                    }
                },
                Some(Err(status)) => return Err(ReadError::Broken(status)),
                None => self.ended = true,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------------------------

/// Serves `ExpertDispatch` for an [`ExpertService`] (see the module docs).
pub struct DispatchServer {
    serving: Arc<Serving>,
    shutdown: Arc<watch::Sender<bool>>,
}

/// What every request of a [`DispatchServer`] needs.
struct Serving {
    service: Arc<dyn ExpertService>,
    worker_id: Arc<str>,
    /// Blocks that requests are decoded into: the outputs of earlier requests, once encoded.
    blocks: Arc<Recycler<f32>>,
    /// Buffers of sent responses, back once HTTP/2 has written them to the socket.
    payloads: Arc<Recycler<u8>>,
}

/// Ends the open dispatch streams of a [`DispatchServer`]: each stops reading, answers what it has in flight, then
/// ends with `UNAVAILABLE`. Call it when the server shuts down: tonic's graceful shutdown waits for open streams, and
/// an attention worker's stream never ends on its own.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Ends every open stream (and those opened later) as described above.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl DispatchServer {
    /// A server computing with `service`, known to peers as `worker_id`.
    pub fn new(service: Arc<dyn ExpertService>, worker_id: String) -> Self {
        codec::keep_payload_sized_allocations();
        let serving =
            Serving { service, worker_id: worker_id.into(), blocks: Recycler::new(), payloads: Recycler::new() };
        DispatchServer { serving: Arc::new(serving), shutdown: Arc::new(watch::channel(false).0) }
    }

    /// The handle that ends this server's streams.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// The tonic service to add to a server ([`server_builder`]), accepting messages up to [`MAX_MESSAGE_BYTES`].
    pub fn into_service(self) -> DispatchService {
        DispatchService { serving: self.serving, shutdown: self.shutdown }
    }
}

/// The `switchyard.v1.ExpertDispatch` service of a [`DispatchServer`], as tonic's router takes it: both methods,
/// any other path answered `UNIMPLEMENTED` as generated services do.
#[derive(Clone)]
pub struct DispatchService {
    serving: Arc<Serving>,
    shutdown: Arc<watch::Sender<bool>>,
}

impl NamedService for DispatchService {
    const NAME: &'static str = SERVICE_NAME;
}

impl Service<http::Request<Body>> for DispatchService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let serving = self.serving.clone();
        let shutdown = self.shutdown.subscribe();
        Box::pin(async move {
            // Compression is never asked for by this side, and not supported.
            if let Some(encoding) = request.headers().get("grpc-encoding").filter(|e| *e != "identity") {
                let status = Status::unimplemented(format!("message compression {encoding:?} is not supported"));
                return Ok(status.into_http());
            }
            Ok(match request.uri().path() {
                DISPATCH_STREAM_PATH => open_stream(serving, request, shutdown),
                DISPATCH_PATH => serve_unary(serving, request.into_body()).await,
                path => Status::unimplemented(format!("no method {path}")).into_http(),
            })
        })
    }
}

/// A gRPC response whose body is the messages sent on `messages`, then the status trailers.
fn grpc_response(messages: mpsc::Receiver<Result<Bytes, Status>>) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(OutgoingBody::new(messages, true)));
    response.headers_mut().insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    response
}

/// Answers a `DispatchStream` call: the stream runs as its own task.
fn open_stream(
    serving: Arc<Serving>,
    request: http::Request<Body>,
    shutdown: watch::Receiver<bool>,
) -> http::Response<Body> {
    let remote = request.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|i| i.remote_addr());
    let span = tracing::info_span!("dispatch_stream", expert_worker = %serving.worker_id, remote = ?remote);
    let (responses, outgoing) = mpsc::channel(QUEUE);
    let inbound = MessageStream::new(request.into_body());
    tokio::spawn(serve_stream(serving, inbound, responses, shutdown).instrument(span));
    grpc_response(outgoing)
}

/// Answers a unary `Dispatch` call: one request, one response; an error is the status of a response without body.
async fn serve_unary(serving: Arc<Serving>, body: Body) -> http::Response<Body> {
    let mut inbound = MessageStream::new(body);
    let request = match inbound.next().await {
        Ok(Some(message)) => wire::read_request(&message),
        Ok(None) => return Status::internal("missing request message").into_http(),
        Err(ReadError::Broken(status)) => return status.into_http(),
        Err(ReadError::Invalid(error)) => Err(error),
    };
    let answer = match request {
        Ok(request) => serve_request(serving, request).await.map_err(|(_, error)| error),
        Err(error) => Err(error),
    };
    match answer {
        Ok(response) => {
            let (messages, outgoing) = mpsc::channel(1);
            // The queue is new and has room for the one message.
            let _ = messages.try_send(Ok(response));
            grpc_response(outgoing)
        }
        Err(error) => error.to_status().into_http(),
    }
}

/// Decodes, validates and computes one request; returns the encoded response. The error comes with the request id.
async fn serve_request(serving: Arc<Serving>, request: RequestMessage) -> Result<Bytes, (u64, TransportError)> {
    let ids = request.ids();
    let span = tracing::info_span!(
        "expert_dispatch",
        request_id = ids.request_id,
        step_id = ids.step_id,
        micro_batch = ids.micro_batch,
        layer = ids.layer,
        attention_worker = %request.attention_worker,
        expert_worker = %serving.worker_id,
    );
    compute_request(&serving.service, request, Some(&serving.blocks), Some(&serving.payloads))
        .instrument(span.clone())
        .await
        .map_err(|error| {
            span.in_scope(|| tracing::warn!("dispatch refused: {error}"));
            (ids.request_id, error)
        })
}

/// Decodes `request`, validates and computes it with `service`, and encodes the response: what every server of the
/// dispatch messages does (this transport's server, and an expert rank of a collective). `blocks` recycles the decoded
/// inputs and the outputs, `payloads` the response buffers, where the caller keeps such pools.
pub(crate) async fn compute_request(
    service: &Arc<dyn ExpertService>,
    request: RequestMessage,
    blocks: Option<&Arc<Recycler<f32>>>,
    payloads: Option<&Arc<Recycler<u8>>>,
) -> Result<Bytes, TransportError> {
    let ids = request.ids();
    let output_dtype = codec::output_dtype_of(request.output_dtype)?;
    let batch = codec::batch_from_message(&request, blocks.map(|b| b.as_ref()))?;
    // The received bytes are no longer needed while the experts compute.
    drop(request);
    service.validate(&batch)?;
    let (tokens, hidden) = (batch.tokens(), batch.hidden);
    let bound = wire::message_size_bound(tokens * hidden, tokens, output_dtype, 0);
    if bound > MAX_MESSAGE_BYTES {
        return Err(TransportError::InvalidPayload {
            what: "output_dtype".into(),
            reason: format!(
                "[{tokens}, {hidden}] outputs as {output_dtype} take up to {bound} bytes, more than the message limit \
                 {MAX_MESSAGE_BYTES}"
            ),
        });
    }
    let outputs = service.compute(batch).await?;
    if outputs.len() != tokens * hidden {
        return Err(TransportError::Compute {
            reason: format!("the expert service returned {} values for [{tokens}, {hidden}]", outputs.len()),
        });
    }
    let response = wire::encode_response(ids, &outputs, tokens, hidden, output_dtype, payloads);
    if let Some(blocks) = blocks {
        blocks.put(outputs);
    }
    Ok(response)
}

/// The status that ends a stream because of `error` in request `request_id`.
fn stream_error(error: &TransportError, request_id: u64) -> Status {
    let mut status = error.to_status();
    if let Ok(value) = MetadataValue::try_from(request_id.to_string()) {
        status.metadata_mut().insert(REQUEST_ID, value);
    }
    status
}

/// Runs one dispatch stream: reads requests, computes them concurrently, sends responses as they complete.
async fn serve_stream(
    serving: Arc<Serving>,
    mut inbound: MessageStream,
    responses: mpsc::Sender<Result<Bytes, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Dropping the set (client gone, stream broken) aborts the computations still running.
    let mut in_flight = JoinSet::new();
    let mut reading = true;
    let mut watching_shutdown = true;
    let ending = loop {
        if !reading && in_flight.is_empty() {
            break None;
        }
        tokio::select! {
            message = inbound.next(), if reading => match message {
                Ok(Some(message)) => {
                    let request = match wire::read_request(&message) {
                        Ok(request) => request,
                        Err(error) => break Some(error.to_status()),
                    };
                    drop(message);
                    // Decoding and validating run here, so the request's bytes (HTTP/2's receive buffers) are released
                    // before the next message is read. A computation that is not done at once continues as a task;
                    // one that is (an error, an immediate answer) is answered without waking another thread. A panic
                    // ends the stream as it would from the task.
                    let mut answer = Box::pin(serve_request(serving.clone(), request));
                    match std::panic::AssertUnwindSafe(&mut answer).catch_unwind().now_or_never() {
                        None => {
                            in_flight.spawn(answer);
                        }
                        Some(Ok(Ok(response))) => {
                            if responses.send(Ok(response)).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(Err((request_id, error)))) => break Some(stream_error(&error, request_id)),
                        Some(Err(_)) => {
                            let error = TransportError::Compute { reason: "the expert computation panicked".into() };
                            break Some(error.to_status());
                        }
                    }
                }
                // The client closed its half: answer what is in flight, then end.
                Ok(None) => reading = false,
                Err(ReadError::Invalid(error)) => break Some(error.to_status()),
                Err(ReadError::Broken(status)) => {
                    tracing::debug!("attention worker stream broke: {status}");
                    return;
                }
            },
            Some(done) = in_flight.join_next() => match done {
                Ok(Ok(response)) => {
                    if responses.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                Ok(Err((request_id, error))) => break Some(stream_error(&error, request_id)),
                Err(join_error) => {
                    let error = TransportError::Compute { reason: format!("the expert computation panicked: {join_error}") };
                    break Some(error.to_status());
                }
            },
            () = responses.closed() => {
                tracing::debug!("attention worker went away");
                return;
            }
            // Mapped to a bool: the `Ref` it yields must not live across the awaits above.
            stopping = shutdown.wait_for(|&stop| stop).map(|result| result.is_ok()), if watching_shutdown => {
                watching_shutdown = false;
                if stopping {
                    reading = false;
                }
            }
        }
    };
    let ending = ending.or_else(|| {
        (*shutdown.borrow()).then(|| {
            TransportError::Unavailable {
                peer: serving.worker_id.to_string(),
                reason: "the expert worker is shutting down".into(),
            }
            .to_status()
        })
    });
    if let Some(status) = ending {
        let _ = responses.send(Err(status)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::in_process::InProcessTransport;
    use crate::WireDtype;

    #[test]
    fn split_rows_cover_the_batch_in_even_pieces() {
        assert_eq!(split_rows(16, 5120, SPLIT_VALUES), vec![0..16]);
        assert_eq!(split_rows(0, 5120, SPLIT_VALUES), vec![0..0]);
        assert_eq!(split_rows(204, 5120, SPLIT_VALUES), vec![0..204], "up to twice the piece size stays whole");
        for (tokens, hidden, split) in [(4096, 5120, SPLIT_VALUES), (37, 16, 64), (5, 100, 1), (1000, 3, 7)] {
            let rows = split_rows(tokens, hidden, split);
            assert!(rows.len() > 1);
            assert_eq!(rows.first().unwrap().start, 0);
            assert_eq!(rows.last().unwrap().end, tokens);
            assert!(rows.windows(2).all(|w| w[0].end == w[1].start && w[0].len().abs_diff(w[1].len()) <= 1));
            assert!(rows.iter().all(|r| !r.is_empty() && r.len() * hidden <= 2 * split.max(hidden)));
        }
    }

    /// Expert `e` adds `e` to its inputs; requests whose first expert is odd answer a little later, so the pieces
    /// of a split dispatch come back out of order. Expert 99 is not held.
    struct ShiftService {
        requests: AtomicUsize,
    }

    impl ExpertService for ShiftService {
        fn validate(&self, batch: &ExpertBatch) -> Result<(), TransportError> {
            match batch.experts.iter().find(|&&e| e == 99) {
                Some(&expert) => Err(TransportError::ExpertNotHeld { layer: batch.layer, expert }),
                None => Ok(()),
            }
        }

        fn compute(&self, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if batch.experts.first().is_some_and(|e| e % 2 == 1) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let rows = batch.inputs.chunks_exact(batch.hidden).zip(&batch.experts);
                Ok(rows.flat_map(|(row, &e)| row.iter().map(move |v| v + e as f32)).collect())
            })
        }
    }

    fn batch(tokens: usize, hidden: usize) -> ExpertBatch {
        ExpertBatch {
            step_id: 1,
            micro_batch: 0,
            layer: 2,
            placement_epoch: 0,
            attention_worker: String::new(),
            experts: (0..tokens as u32).map(|t| t % 7).collect(),
            inputs: (0..tokens * hidden).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect(),
            hidden,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_dispatches_reassemble_in_order_and_fail_with_the_telling_error() {
        let service = Arc::new(ShiftService { requests: AtomicUsize::new(0) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = DispatchServer::new(service.clone(), "e0".into());
        let serving = tokio::spawn(
            server_builder()
                .add_service(server.into_service())
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
        );
        for (dispatch, combine) in [(WireDtype::Fp8E4m3, WireDtype::Bf16), (WireDtype::F32, WireDtype::F32)] {
            let wire = WireFormat { dispatch, combine };
            let transport = GrpcTransport::new(wire, "attn-0".into()).with_split_values(64);
            transport.add_worker("e0", address.to_string());
            let in_process = InProcessTransport::new(wire);
            in_process.add_worker("e0", service.clone());
            let b = batch(37, 16);
            let before = service.requests.load(Ordering::SeqCst);
            let got = transport.dispatch("e0", b.clone()).await.unwrap();
            assert!(service.requests.load(Ordering::SeqCst) - before > 1, "{wire:?}: the dispatch was split");
            let expected = in_process.dispatch("e0", b).await.unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{wire:?}"
            );
        }
        // One bad row in a late piece: the dispatch fails with that piece's error, not its stream mates'.
        let transport = GrpcTransport::new(WireFormat::default(), "attn-0".into()).with_split_values(64);
        transport.add_worker("e0", address.to_string());
        let mut bad = batch(37, 16);
        bad.experts[30] = 99;
        let error = transport.dispatch("e0", bad).await.unwrap_err();
        assert_eq!(error, TransportError::ExpertNotHeld { layer: 2, expert: 99 });
        // The next dispatch opens a new stream and succeeds.
        let b = batch(20, 16);
        assert_eq!(transport.dispatch("e0", b.clone()).await.unwrap().len(), b.inputs.len());
        serving.abort();
    }
}
