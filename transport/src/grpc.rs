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
//! Both sides reuse their large buffers (payloads, decoded blocks; [`codec`]'s recycler): on the machines this runs on,
//! touching fresh memory costs more than encoding into it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use switchyard_proto::v1::expert_dispatch_client::ExpertDispatchClient;
use switchyard_proto::v1::expert_dispatch_server::{ExpertDispatch, ExpertDispatchServer};
use switchyard_proto::v1::{DispatchRequest, DispatchResponse};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::codec::{self, Recycler, RequestIds};
use crate::{BoxFuture, ExpertBatch, ExpertService, Transport, TransportError, WireFormat};
use crate::error::error_chain;

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
/// Largest HTTP/2 frame a side asks for: fewer frames for large payloads.
const MAX_FRAME: u32 = 1 << 20;
/// Requests queued for the stream before a dispatch waits (backpressure), and responses queued by the server.
const QUEUE: usize = 64;
/// How long a failed dispatch waits for the errors of its other requests, to report the one that caused the others.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Metadata key of the request whose error ended a stream.
const REQUEST_ID: &str = "switchyard-request-id";

/// A tonic server builder with the settings the dispatch stream wants (windows, frame size, keepalive, no Nagle).
/// Expert workers add [`DispatchServer::into_service`] (and health, reflection) to it.
pub fn server_builder() -> Server {
    Server::builder()
        .tcp_nodelay(true)
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
    /// Payload buffers of sent requests, reused once tonic has copied them out.
    recycler: Arc<Recycler<u8>>,
    /// Size of the pieces a large dispatch is split into, in values.
    split_values: usize,
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

/// Values (`tokens * hidden`) per request when a dispatch is split: 2^20 is 205 tokens of Maverick's 5120, 4 MiB of
/// f32. Large enough that per-request costs vanish, small enough that the pieces overlap well and stay in cache
/// between the steps that touch them.
pub const SPLIT_VALUES: usize = 1 << 20;

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

type Waiter = oneshot::Sender<Result<DispatchResponse, TransportError>>;

/// The dispatches waiting on one stream, and why it ended once it has.
#[derive(Default)]
struct StreamState {
    pending: HashMap<u64, Waiter>,
    closed: Option<TransportError>,
}

/// One open dispatch stream.
struct Connection {
    requests: mpsc::Sender<DispatchRequest>,
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
struct Peer {
    id: String,
    endpoint: Result<Endpoint, String>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Peer {
    fn new(id: String, endpoint: String) -> Self {
        // `IP:PORT` as printed without a scheme is accepted too.
        let endpoint = if endpoint.contains("://") { endpoint } else { format!("http://{endpoint}") };
        let endpoint = Endpoint::from_shared(endpoint.clone())
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
            .map_err(|e| format!("invalid endpoint {endpoint:?}: {}", error_chain(&e)));
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
            let request = codec::request_for_rows(
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
            permit.send(request);
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
        answer: Result<Result<DispatchResponse, TransportError>, oneshot::error::RecvError>,
    ) -> Result<(), TransportError>
    where
        F: std::future::Future<
            Output = (usize, Result<Result<DispatchResponse, TransportError>, oneshot::error::RecvError>),
        >,
    {
        let error = match self.answered(answer) {
            Ok(response) => {
                let range = &rows[piece];
                let out = &mut block[range.start * hidden..range.end * hidden];
                return codec::outputs_from_response_into(&response, range.len(), hidden, out);
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
        result: Result<Result<DispatchResponse, TransportError>, oneshot::error::RecvError>,
    ) -> Result<DispatchResponse, TransportError> {
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
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| self.unavailable(format!("cannot connect to {uri}: {}", error_chain(&e))))?;
        let mut client = ExpertDispatchClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (requests, outgoing) = mpsc::channel(QUEUE);
        let responses =
            match tokio::time::timeout(CONNECT_TIMEOUT, client.dispatch_stream(ReceiverStream::new(outgoing))).await {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => return Err(TransportError::from_status(self.id.clone(), &status)),
                Err(_) => {
                    return Err(
                        self.unavailable(format!("{uri} did not open the dispatch stream within {CONNECT_TIMEOUT:?}"))
                    )
                }
            };
        tracing::debug!(expert_worker = %self.id, %uri, "dispatch stream open");
        let state = Arc::new(Mutex::new(StreamState::default()));
        let reader = tokio::spawn(read_responses(self.id.clone(), responses, state.clone())).abort_handle();
        Ok(Connection { requests, state, reader })
    }
}

/// Completes waiting dispatches as responses arrive; when the stream ends, fails all that are left.
async fn read_responses(peer: String, mut responses: Streaming<DispatchResponse>, state: Arc<Mutex<StreamState>>) {
    let (error, failed_request) = loop {
        match responses.message().await {
            Ok(Some(response)) => {
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
            }
            Ok(None) => {
                break (
                    TransportError::Unavailable {
                        peer: peer.clone(),
                        reason: "the expert worker ended the dispatch stream".into(),
                    },
                    None,
                )
            }
            Err(status) => {
                let failed_request =
                    status.metadata().get(REQUEST_ID).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                break (TransportError::from_status(peer.clone(), &status), failed_request);
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
    /// Payload buffers of sent responses, back once tonic has copied them out.
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

    /// The tonic service, with message size limits set to [`MAX_MESSAGE_BYTES`].
    pub fn into_service(self) -> ExpertDispatchServer<DispatchServer> {
        ExpertDispatchServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Decodes, validates and computes one request. The error comes with the request id.
async fn serve_request(
    serving: Arc<Serving>,
    request: DispatchRequest,
) -> Result<DispatchResponse, (u64, TransportError)> {
    let ids = RequestIds::of(&request);
    let span = tracing::info_span!(
        "expert_dispatch",
        request_id = ids.request_id,
        step_id = ids.step_id,
        micro_batch = ids.micro_batch,
        layer = ids.layer,
        attention_worker = %request.attention_worker,
        expert_worker = %serving.worker_id,
    );
    async move {
        let output_dtype = codec::output_dtype(&request)?;
        let batch = codec::batch_from_request_with(&request, Some(&serving.blocks))?;
        // The received bytes are no longer needed while the experts compute.
        drop(request);
        serving.service.validate(&batch)?;
        let (tokens, hidden) = (batch.tokens(), batch.hidden);
        let outputs = serving.service.compute(batch).await?;
        if outputs.len() != tokens * hidden {
            return Err(TransportError::Compute {
                reason: format!("the expert service returned {} values for [{tokens}, {hidden}]", outputs.len()),
            });
        }
        let response =
            codec::response_from_outputs_with(ids, &outputs, tokens, hidden, output_dtype, Some(&serving.payloads));
        serving.blocks.put(outputs);
        Ok(response)
    }
    .instrument(span.clone())
    .await
    .map_err(|error| {
        span.in_scope(|| tracing::warn!("dispatch refused: {error}"));
        (ids.request_id, error)
    })
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
    mut inbound: Streaming<DispatchRequest>,
    responses: mpsc::Sender<Result<DispatchResponse, Status>>,
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
            message = inbound.message(), if reading => match message {
                Ok(Some(request)) => {
                    // Decoding and validating run here, so the request's bytes (tonic's receive buffer) are released
                    // before the next message is read and the buffer is reused. A computation that is not done at
                    // once continues as a task; one that is (an error, an immediate answer) is answered without
                    // waking another thread. A panic ends the stream as it would from the task.
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
                Err(status) => {
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

#[tonic::async_trait]
impl ExpertDispatch for DispatchServer {
    type DispatchStreamStream = ReceiverStream<Result<DispatchResponse, Status>>;

    async fn dispatch_stream(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStreamStream>, Status> {
        let span = tracing::info_span!(
            "dispatch_stream",
            expert_worker = %self.serving.worker_id,
            remote = ?request.remote_addr(),
        );
        let (responses, outgoing) = mpsc::channel(QUEUE);
        tokio::spawn(
            serve_stream(self.serving.clone(), request.into_inner(), responses, self.shutdown.subscribe())
                .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(outgoing)))
    }

    async fn dispatch(&self, request: Request<DispatchRequest>) -> Result<Response<DispatchResponse>, Status> {
        serve_request(self.serving.clone(), request.into_inner())
            .await
            .map(Response::new)
            .map_err(|(_, error)| error.to_status())
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
        assert_eq!(split_rows(409, 5120, SPLIT_VALUES), vec![0..409], "up to twice the piece size stays whole");
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
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
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
