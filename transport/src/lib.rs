//! Dispatch and combine between attention workers and expert workers.
//!
//! Owns how routed token activations travel: the [`ExpertBatch`] that one dispatch carries, the wire encodings
//! (f32, bf16, FP8 E4M3 with per-token scales; [`codec`]), the [`Transport`] trait that attention workers send through,
//! and its implementations: [`in_process`] (direct calls, no serialisation: the embedded default and unit tests) and
//! [`grpc`] (tonic bidirectional streams over any network), and [`collective`] (every rank of a communicator in
//! lockstep, dispatch and combine as two all-to-all exchanges: NCCL between GPUs, or an in-process loopback). The
//! server half of the gRPC
//! transport ([`grpc::DispatchServer`]) adapts any [`ExpertService`] so the wire format lives in this crate only. Both
//! halves write and read the dispatch messages by hand (module `wire`: the `.proto` bytes, without prost's and tonic's
//! copies of the payload).
//! Errors are one [`TransportError`] with a single mapping to and from gRPC statuses; [`bench`](mod@bench) holds the
//! raw TCP baseline and an echo service for `switchyard bench transport`.
//!
//! The same trait carries context-parallel attention between attention workers ([`context`]): one global layer's
//! queries out, the member's partial attention back.
//!
//! It must not know about models, checkpoints or requests: expert workers implement [`ExpertService`], attention
//! workers call [`Transport`] and serve [`context::ContextService`].

pub mod bench;
pub mod codec;
pub mod collective;
pub mod context;
pub mod error;
pub mod grpc;
pub mod in_process;
mod wire;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub use error::TransportError;

/// A boxed, sendable future, the return type of the transport traits (object-safe without `async-trait`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Encoding of activations on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WireDtype {
    /// 4 bytes a value; exact.
    #[default]
    F32,
    /// 2 bytes a value (round to nearest even).
    Bf16,
    /// 1 byte a value plus one f32 scale per token (`scale = amax / 448`): half of bf16's bytes.
    Fp8E4m3,
}

impl fmt::Display for WireDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
            WireDtype::Fp8E4m3 => "fp8",
        })
    }
}

impl std::str::FromStr for WireDtype {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WireDtype::F32),
            "bf16" | "bfloat16" => Ok(WireDtype::Bf16),
            "fp8" | "e4m3" | "fp8-e4m3" => Ok(WireDtype::Fp8E4m3),
            _ => Err(TransportError::InvalidPayload {
                what: "wire dtype".into(),
                reason: format!("{s:?} is not one of f32, bf16, fp8"),
            }),
        }
    }
}

/// How a deployment encodes the two directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireFormat {
    /// Attention worker -> expert worker (expert inputs).
    pub dispatch: WireDtype,
    /// Expert worker -> attention worker (expert outputs): F32 or Bf16.
    pub combine: WireDtype,
}

/// The routed tokens of one MoE layer step bound for one expert worker, decoded (f32).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBatch {
    /// The sender's step counter (tracing, batching).
    pub step_id: u64,
    /// Micro-batch index within the step (ping-pong).
    pub micro_batch: u32,
    /// Decoder layer index of the MoE layer.
    pub layer: u32,
    /// Placement epoch the sender routed with.
    pub placement_epoch: u64,
    /// Who sent it.
    pub attention_worker: String,
    /// The expert of each row.
    pub experts: Vec<u32>,
    /// `experts.len()` rows of `hidden` router-score-scaled inputs.
    pub inputs: Vec<f32>,
    /// Row width.
    pub hidden: usize,
}

impl ExpertBatch {
    /// Rows (tokens) in the batch.
    pub fn tokens(&self) -> usize {
        self.experts.len()
    }

    /// Checks that the batch is one `[tokens, hidden]` block that fits on the wire (`inputs.len() == tokens *
    /// hidden`, `hidden > 0`, at most [`codec::MAX_VALUES`] values). Transports call it before sending.
    pub fn check_shape(&self) -> Result<(), TransportError> {
        let invalid = |what: &str, reason: String| TransportError::InvalidPayload { what: what.into(), reason };
        if self.hidden == 0 {
            return Err(invalid("hidden", "must be positive".into()));
        }
        if u32::try_from(self.hidden).is_err() {
            return Err(invalid("hidden", format!("{} does not fit the wire's u32", self.hidden)));
        }
        match self.tokens().checked_mul(self.hidden) {
            Some(values) if values > codec::MAX_VALUES => Err(invalid(
                "inputs",
                format!("{} x {} values exceed the limit {}", self.tokens(), self.hidden, codec::MAX_VALUES),
            )),
            Some(values) if values == self.inputs.len() => Ok(()),
            _ => Err(invalid(
                "inputs",
                format!(
                    "{} values, but {} tokens x hidden {} need {}",
                    self.inputs.len(),
                    self.tokens(),
                    self.hidden,
                    self.tokens().saturating_mul(self.hidden)
                ),
            )),
        }
    }
}

/// What an expert worker does with a dispatch: compute `experts[i](inputs[i])` for every row, returning
/// `[tokens, hidden]` outputs in row order. Implemented by the expert worker; called by the in-process transport
/// directly and by [`grpc::DispatchServer`] after decoding.
pub trait ExpertService: Send + Sync + 'static {
    /// Checks a batch before it is queued (layer exists, experts held, epoch current) so that a malformed dispatch is
    /// refused with a clear error instead of failing later.
    fn validate(&self, batch: &ExpertBatch) -> Result<(), TransportError>;
    /// Computes the batch.
    fn compute(&self, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>>;
}

/// Sends expert batches to expert workers and returns their outputs: what attention workers dispatch through.
pub trait Transport: Send + Sync + 'static {
    /// Dispatches `batch` to the expert worker `worker` (its id in the placement) and resolves to the outputs,
    /// `[tokens, hidden]` in row order. Fails with [`TransportError::Unavailable`] when the worker cannot be reached
    /// or dies before answering (retryable: a step is pure, so it can be re-sent to a replica).
    fn dispatch(&self, worker: &str, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>>;

    /// Dispatches one MoE layer step: each `(worker, batch)` of `batches` (every expert worker this step sends to)
    /// and resolves to each batch's outputs, in the order of `batches`. The default sends each with
    /// [`Transport::dispatch`], concurrently. A collective transport makes the whole step one dispatch exchange and
    /// one combine exchange, which every rank of its communicator must make together: callers on such a transport
    /// call this once per MoE layer step, with an empty `batches` when they have nothing to send.
    fn dispatch_step(
        &self,
        batches: Vec<(String, ExpertBatch)>,
    ) -> BoxFuture<'static, Vec<Result<Vec<f32>, TransportError>>> {
        let pending: Vec<_> = batches.into_iter().map(|(worker, batch)| self.dispatch(&worker, batch)).collect();
        Box::pin(futures::future::join_all(pending))
    }

    /// Whether steps are exchanges every rank of a communicator makes together (a collective transport): callers
    /// then make exactly one [`Transport::dispatch_step`] per MoE layer step and never re-send a failed one.
    fn lockstep(&self) -> bool {
        false
    }

    /// Sends one global layer of a context-parallel step to `member` (an attention worker of the sequence's group)
    /// and resolves to its partial attention. Transports that do not reach attention workers refuse it.
    fn attend(
        &self,
        member: &str,
        request: context::PartialAttentionRequest,
    ) -> BoxFuture<'static, Result<context::PartialAttentionResponse, TransportError>> {
        let _ = request;
        Box::pin(std::future::ready(Err(no_context_members(member))))
    }

    /// Asks `member` to drop its shard of `sequence_id`; resolves to the KV blocks it gave back.
    fn release_shard(&self, member: &str, sequence_id: &str) -> BoxFuture<'static, Result<u64, TransportError>> {
        let _ = sequence_id;
        Box::pin(std::future::ready(Err(no_context_members(member))))
    }
}

fn no_context_members(member: &str) -> TransportError {
    TransportError::Unavailable {
        peer: member.to_string(),
        reason: "this transport does not reach attention workers (context parallelism needs the gRPC transport)".into(),
    }
}
