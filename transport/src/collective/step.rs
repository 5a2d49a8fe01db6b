//! The MoE layer step over a [`Collective`]: dispatch as one exchange, combine as the next.
//!
//! Every rank of the communicator is an attention rank or an expert rank ([`RankLayout`]). Each step:
//! 1. dispatch exchange: each attention rank sends each expert rank its requests of the step (the gRPC transport's
//!    `DispatchRequest` messages, gRPC-framed, encoded by the same code as `wire.dispatch` says); everything else
//!    sends nothing;
//! 2. the expert ranks compute what they received through their [`ExpertService`], all attention ranks' requests at
//!    once;
//! 3. combine exchange: each expert rank sends each attention rank one answer per request, in request order: a
//!    `DispatchResponse` (outputs as the request's `output_dtype`) or the request's error.
//!
//! A payload is a sequence of frames in the gRPC framing (a flag byte and a big-endian `u32` length): flag 0 is a
//! protobuf message, as on the gRPC transport; two flags gRPC never uses mark an error answer (its body the status as
//! header lines, as `grpc-status`/`grpc-message` and the `switchyard-*` metadata travel in gRPC trailers, so the
//! receiver rebuilds the same [`TransportError`]) and an attention rank leaving. The steps end when every attention
//! rank leaves in the same dispatch exchange ([`CollectiveTransport::leave`]).
//!
//! The attention ranks also tell each other, in the dispatch exchange, how many steps a tick of their lockstep engine
//! makes (once, [`CollectiveTransport::set_steps_per_tick`]) and, once drained, that they are ready to leave (every
//! step, [`CollectiveTransport::set_draining`]). Each sends its frame to every attention rank, itself included, so all
//! of them read the same frames in the same exchange: they learn in the same step that every one drained
//! ([`CollectiveTransport::drained_at`], from which they agree on the last tick), and they refuse ranks whose ticks
//! differ in the same step, naming both.
//!
//! A per-request error (stale epoch, expert not held) fails that request alone; a failed exchange fails every request
//! of the step on every rank, as [`TransportError::Unavailable`] naming the worker of the rank to blame.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};
use tonic::{Code, Status};

use super::{Collective, CollectiveError};
use crate::codec::{self, Stores};
use crate::grpc::MAX_MESSAGE_BYTES;
use crate::wire::{self, Chunks, RequestMessage, PREFIX};
use crate::{BoxFuture, ExpertBatch, ExpertService, Transport, TransportError, WireFormat};

/// Frame flag of a protobuf message (gRPC's "not compressed").
const FRAME_MESSAGE: u8 = 0;
/// Frame flag of an error answer; gRPC uses only 0 and 1.
const FRAME_ERROR: u8 = 0x80;
/// Frame flag of an attention rank leaving the steps (empty body).
const FRAME_LEAVE: u8 = 0x81;
/// Frame flag, from an attention rank to every attention rank in a dispatch exchange, of how many MoE layer steps
/// one tick of its engine makes (body: little-endian `u64`): sent once, so that ranks whose ticks differ are named
/// at their first step.
const FRAME_STEPS_PER_TICK: u8 = 0x82;
/// Frame flag, from an attention rank to every attention rank in every dispatch exchange once it drained: it is
/// ready to leave (body: its steps per tick, little-endian `u64`).
const FRAME_DRAINING: u8 = 0x83;

/// Why attention ranks with different steps per tick are refused.
const TICKS_DIFFER: &str = "their ticks name different exchanges, so they could never leave the communicator together \
                            (is --micro-batches the same on every attention rank, and the model?)";

/// Default time a step may take from entering the dispatch exchange to the end of the combine exchange (the expert
/// ranks' computation included), as the gRPC transport's request deadline.
pub const DEFAULT_STEP_TIMEOUT: Duration = crate::grpc::DEFAULT_REQUEST_TIMEOUT;

/// What a rank does in the MoE step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RankRole {
    /// Sends routed tokens and gets the experts' outputs back ([`CollectiveTransport`]).
    Attention,
    /// Computes the experts it holds ([`serve_expert_rank`]).
    Expert,
}

/// Who is which rank of a communicator: a worker id and a role per rank, rank `i` at index `i`. Every rank must be
/// given the same layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLayout {
    members: Vec<(String, RankRole)>,
}

impl RankLayout {
    /// A layout of `members` (worker id and role, by rank). Ids must be unique and not empty, and there must be at
    /// least one rank of each role.
    pub fn new(members: Vec<(String, RankRole)>) -> Result<Self, TransportError> {
        let invalid = |reason: String| TransportError::InvalidPayload { what: "rank layout".into(), reason };
        let mut seen = HashSet::new();
        for (rank, (id, _)) in members.iter().enumerate() {
            if id.is_empty() {
                return Err(invalid(format!("rank {rank} has an empty worker id")));
            }
            if !seen.insert(id.as_str()) {
                return Err(invalid(format!("worker id {id:?} is given to more than one rank")));
            }
        }
        for role in [RankRole::Attention, RankRole::Expert] {
            if !members.iter().any(|(_, r)| *r == role) {
                return Err(invalid(format!("no {role:?} rank among {} ranks", members.len())));
            }
        }
        Ok(RankLayout { members })
    }

    /// The attention workers as ranks `0..attention.len()`, then the expert workers.
    pub fn attention_first(attention: &[&str], experts: &[&str]) -> Result<Self, TransportError> {
        let members = attention
            .iter()
            .map(|id| (id.to_string(), RankRole::Attention))
            .chain(experts.iter().map(|id| (id.to_string(), RankRole::Expert)))
            .collect();
        RankLayout::new(members)
    }

    /// Ranks in the communicator.
    pub fn world_size(&self) -> usize {
        self.members.len()
    }

    /// The rank of worker `id`.
    pub fn rank_of(&self, id: &str) -> Option<usize> {
        self.members.iter().position(|(member, _)| member == id)
    }

    /// The worker id of `rank`.
    pub fn id(&self, rank: usize) -> Option<&str> {
        self.members.get(rank).map(|(id, _)| id.as_str())
    }

    /// The role of `rank`.
    pub fn role(&self, rank: usize) -> Option<RankRole> {
        self.members.get(rank).map(|(_, role)| *role)
    }

    /// The ranks of `role`, in rank order.
    pub fn ranks(&self, role: RankRole) -> Vec<usize> {
        (0..self.members.len()).filter(|&rank| self.members[rank].1 == role).collect()
    }

    /// Checks that `collective` is rank `role` of a communicator of this layout's size.
    fn check(&self, collective: &dyn Collective, role: RankRole) -> Result<(), TransportError> {
        let invalid = |reason: String| TransportError::InvalidPayload { what: "rank layout".into(), reason };
        if collective.world_size() != self.world_size() {
            return Err(invalid(format!(
                "{} ranks, but the communicator has {}",
                self.world_size(),
                collective.world_size()
            )));
        }
        match self.role(collective.rank()) {
            Some(actual) if actual == role => Ok(()),
            actual => Err(invalid(format!("rank {} is {actual:?} in the layout, not {role:?}", collective.rank()))),
        }
    }

    /// `rank` as errors name it: `aw-1 (rank 1)`.
    fn name(&self, rank: usize) -> String {
        match self.id(rank) {
            Some(id) => format!("{id} (rank {rank})"),
            None => format!("rank {rank}"),
        }
    }

    /// The error every request of a step fails with when the exchange failed: `Unavailable`, naming the worker of
    /// the rank to blame.
    fn lost(&self, error: &CollectiveError) -> TransportError {
        let peer = match error.rank() {
            Some(rank) => self.name(rank),
            None => "communicator".to_string(),
        };
        TransportError::Unavailable { peer, reason: error.to_string() }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------------------------

/// One frame of a payload.
enum Frame {
    Message(Bytes),
    Error(TransportError),
    Leave,
    /// An attention rank's steps per tick ([`FRAME_STEPS_PER_TICK`], or [`FRAME_DRAINING`] with `draining`).
    Ticks {
        steps_per_tick: u64,
        draining: bool,
    },
}

fn frame(flag: u8, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(PREFIX + body.len());
    out.push(flag);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The frames of one peer as one payload (without a copy when there is one frame).
fn payload(mut frames: Vec<Bytes>) -> Bytes {
    match frames.len() {
        0 => Bytes::new(),
        1 => frames.pop().unwrap_or_default(),
        _ => Bytes::from(frames.concat()),
    }
}

/// An error answer: the status of `error` as header lines (`name: value`), which is how gRPC carries it.
fn error_frame(error: &TransportError) -> Bytes {
    let status = error.to_status();
    let mut headers = HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only a message that cannot be a header does this; the code still says what kind of error it was.
        headers.clear();
        let _ = Status::new(status.code(), "unencodable error message").add_header(&mut headers);
    }
    let mut body = Vec::new();
    for (name, value) in &headers {
        body.extend_from_slice(name.as_str().as_bytes());
        body.extend_from_slice(b": ");
        body.extend_from_slice(value.as_bytes());
        body.push(b'\n');
    }
    frame(FRAME_ERROR, &body)
}

/// Rebuilds the error of an error frame from `peer`.
fn error_from_frame(peer: &str, body: &[u8]) -> TransportError {
    let mut headers = HeaderMap::new();
    for line in body.split(|&b| b == b'\n').filter(|line| !line.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let value = line[colon + 1..].strip_prefix(b" ").unwrap_or(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    // tonic panics on details that are not base64; this side never sends any.
    headers.remove("grpc-status-details-bin");
    match Status::from_header_map(&headers) {
        Some(status) => TransportError::from_status(peer, status),
        None => TransportError::Rejected {
            peer: peer.to_string(),
            code: Code::Unknown,
            message: "an error answer without a status".into(),
        },
    }
}

/// Splits a payload into its frames; a payload cut short is refused.
fn frames(peer: &str, payload: &Bytes) -> Result<Vec<Frame>, TransportError> {
    let malformed = |reason: String| TransportError::InvalidPayload { what: format!("payload from {peer}"), reason };
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let Some(prefix) = payload.get(at..at + PREFIX) else {
            return Err(malformed(format!("a frame header cut short at byte {at} of {}", payload.len())));
        };
        let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        let start = at + PREFIX;
        let end = start + length;
        if end > payload.len() {
            return Err(malformed(format!("a frame of {length} bytes at byte {at} of {}", payload.len())));
        }
        let body = payload.slice(start..end);
        out.push(match prefix[0] {
            FRAME_MESSAGE => Frame::Message(body),
            FRAME_ERROR => Frame::Error(error_from_frame(peer, &body)),
            FRAME_LEAVE => Frame::Leave,
            FRAME_STEPS_PER_TICK | FRAME_DRAINING => match <[u8; 8]>::try_from(&body[..]) {
                Ok(steps) => {
                    Frame::Ticks { steps_per_tick: u64::from_le_bytes(steps), draining: prefix[0] == FRAME_DRAINING }
                }
                Err(_) => return Err(malformed(format!("a steps-per-tick frame of {length} bytes at byte {at}"))),
            },
            flag => return Err(malformed(format!("unknown frame flag {flag:#x} at byte {at}"))),
        });
        at = end;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// Attention ranks
// ---------------------------------------------------------------------------------------------------------------

/// A request sent in this step, awaiting its answer.
struct Pending {
    /// Index in the step's batches.
    index: usize,
    request_id: u64,
    tokens: usize,
    hidden: usize,
}

struct AttentionRank {
    collective: Arc<dyn Collective>,
    layout: RankLayout,
    wire: WireFormat,
    step_timeout: Duration,
    next_request: AtomicU64,
    /// Held for a whole step (both exchanges): two steps of this rank must not interleave their exchanges, or a
    /// dispatch would meet the expert ranks' combine.
    stepping: Mutex<()>,
    /// The ranks' ticks and drain, as the dispatch exchanges told them (held briefly, never across an exchange).
    ticks: Mutex<Ticks>,
    /// Woken when `ticks.failure` is first set ([`CollectiveTransport::failed`]).
    failed: tokio::sync::Notify,
}

/// What an attention rank knows of the attention ranks' ticks and drain, from the steps-per-tick and draining frames
/// of the dispatch exchanges (see [`CollectiveTransport::set_draining`]). Every attention rank sends its frame to
/// every attention rank, itself included, so all of them read the same frames in the same exchange and hold the same
/// `said`, `drained_at` and verdict on mismatched ticks after the same step.
#[derive(Debug, Default)]
struct Ticks {
    /// Steps begun: the next step's index (one index per dispatch exchange of a step, counted from 0).
    steps: u64,
    /// This rank's steps per tick, to say once, at its next step.
    announce: Option<u64>,
    /// This rank's steps per tick once it drained: every later step carries a draining frame.
    draining: Option<u64>,
    /// The index of this rank's first step with a draining frame.
    draining_since: Option<u64>,
    /// The steps per tick each attention rank said so far, by rank.
    said: Vec<Option<u64>>,
    /// The index of the first step in which every attention rank was draining.
    drained_at: Option<u64>,
    /// Why this rank's steps cannot go on: the first exchange that failed, or attention ranks whose ticks differ.
    failure: Option<TransportError>,
}

/// The [`Transport`] of an attention rank: each [`Transport::dispatch_step`] is one dispatch exchange and one combine
/// exchange with every rank of the communicator (see the module docs). Every attention rank must call it once per MoE
/// layer step (with no batches when it has nothing to send); a lone [`Transport::dispatch`] is a step of one batch.
/// Concurrent steps of one rank (micro-batches) run one after the other; the ranks may take them in different orders,
/// since each step's answers find their requests by position and request id.
/// Its futures must be polled inside a tokio runtime (the exchanges block, on tokio's blocking threads).
pub struct CollectiveTransport {
    rank: Arc<AttentionRank>,
}

impl CollectiveTransport {
    /// The attention rank `collective.rank()` of `layout`, encoding as `wire` says. Fails if the layout does not fit
    /// the communicator or does not make this rank an attention rank.
    pub fn new(collective: Arc<dyn Collective>, layout: RankLayout, wire: WireFormat) -> Result<Self, TransportError> {
        layout.check(collective.as_ref(), RankRole::Attention)?;
        codec::keep_payload_sized_allocations();
        let rank = AttentionRank {
            collective,
            layout,
            wire,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            next_request: AtomicU64::new(1),
            stepping: Mutex::new(()),
            ticks: Mutex::new(Ticks::default()),
            failed: tokio::sync::Notify::new(),
        };
        Ok(CollectiveTransport { rank: Arc::new(rank) })
    }

    /// Replaces the step deadline ([`DEFAULT_STEP_TIMEOUT`]): a step not done by then fails on this rank, which
    /// aborts its side of the communicator.
    pub fn with_step_timeout(mut self, timeout: Duration) -> Self {
        if let Some(rank) = Arc::get_mut(&mut self.rank) {
            rank.step_timeout = timeout;
        }
        self
    }

    /// The wire format.
    pub fn wire(&self) -> WireFormat {
        self.rank.wire
    }

    /// Says this rank's steps per tick (MoE layer steps one tick of its lockstep engine makes: micro-batches x MoE
    /// layers) to every attention rank in its next step: attention ranks whose ticks differ could never leave
    /// together, and are refused there, all of them in the same step (the communicator is aborted, naming both
    /// ranks).
    pub fn set_steps_per_tick(&self, steps_per_tick: u64) {
        self.rank.ticks().announce = Some(steps_per_tick);
    }

    /// Marks this rank as drained (ready to leave, ticking only so that the others are not left waiting) with
    /// `steps_per_tick`: from its next step on, every dispatch exchange tells every attention rank so. The first step
    /// in which every attention rank is marked is [`CollectiveTransport::drained_at`] on every attention rank alike.
    /// Returns the index of this rank's first marked step (the one it calls already marked, if called again).
    pub fn set_draining(&self, steps_per_tick: u64) -> u64 {
        let mut ticks = self.rank.ticks();
        if ticks.draining.is_none() {
            ticks.draining = Some(steps_per_tick);
            ticks.draining_since = Some(ticks.steps);
        }
        ticks.draining_since.unwrap_or(ticks.steps)
    }

    /// Steps this rank has begun ([`Transport::dispatch_step`] calls that made their dispatch exchange, or are
    /// making it): the index its next step will have.
    pub fn steps(&self) -> u64 {
        self.rank.ticks().steps
    }

    /// The index of the first step in which every attention rank was draining ([`CollectiveTransport::set_draining`]),
    /// once there was one: the same step on every attention rank, which each learns at the end of that step's
    /// dispatch exchange.
    pub fn drained_at(&self) -> Option<u64> {
        self.rank.ticks().drained_at
    }

    /// Why this rank's steps cannot go on, once they cannot: the first exchange that failed (every later one fails
    /// the same way), or attention ranks whose ticks differ.
    pub fn failure(&self) -> Option<TransportError> {
        self.rank.ticks().failure.clone()
    }

    /// Resolves with [`CollectiveTransport::failure`] once there is one: a failed communicator never recovers (the
    /// ranks cannot be put back in step), so whoever serves through it stops instead of failing every request from
    /// then on. An idle rank learns it too, at its next empty step.
    pub fn failed(&self) -> BoxFuture<'static, TransportError> {
        let rank = self.rank.clone();
        Box::pin(async move {
            loop {
                // Registered before the check, so a failure recorded in between still wakes it.
                let woken = rank.failed.notified();
                if let Some(failure) = rank.ticks().failure.clone() {
                    return failure;
                }
                woken.await;
            }
        })
    }

    /// Leaves the steps: one last dispatch exchange telling every expert rank so. Every attention rank must leave in
    /// the same exchange; the expert ranks then return from [`serve_expert_rank`].
    pub fn leave(&self) -> BoxFuture<'static, Result<(), TransportError>> {
        let rank = self.rank.clone();
        Box::pin(async move {
            let work = tokio::task::spawn_blocking(move || {
                let sends = (0..rank.layout.world_size())
                    .map(|peer| match rank.layout.role(peer) {
                        Some(RankRole::Expert) => frame(FRAME_LEAVE, &[]),
                        _ => Bytes::new(),
                    })
                    .collect();
                let _stepping = rank.lock_steps();
                let result = rank.collective.exchange(sends, Some(rank.step_timeout));
                result.map(|_| ()).map_err(|error| rank.fail(rank.layout.lost(&error)))
            });
            work.await.map_err(|e| TransportError::Compute { reason: format!("leaving the steps panicked: {e}") })?
        })
    }
}

impl AttentionRank {
    fn lock_steps(&self) -> MutexGuard<'_, ()> {
        // The guarded value is `()`: a panic in another step leaves nothing inconsistent behind.
        self.stepping.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ticks(&self) -> MutexGuard<'_, Ticks> {
        // Every update of `Ticks` is a few assignments that cannot panic halfway.
        self.ticks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `error` as the reason the steps cannot go on (the first one stays) and returns it.
    fn fail(&self, error: TransportError) -> TransportError {
        self.ticks().failure.get_or_insert_with(|| error.clone());
        self.failed.notify_waiters();
        error
    }

    /// Begins a step: its index, and the frame it sends every attention rank (its steps per tick, said once, or its
    /// drain, said every step once drained), if any.
    fn begin_step(&self) -> (u64, Option<Bytes>) {
        let mut ticks = self.ticks();
        let index = ticks.steps;
        ticks.steps += 1;
        let said = ticks.announce.take();
        let frame = match (ticks.draining, said) {
            (Some(steps_per_tick), _) => Some(frame(FRAME_DRAINING, &steps_per_tick.to_le_bytes())),
            (None, Some(steps_per_tick)) => Some(frame(FRAME_STEPS_PER_TICK, &steps_per_tick.to_le_bytes())),
            (None, None) => None,
        };
        (index, frame)
    }

    /// Reads what the attention ranks said in the dispatch exchange of step `index` (`received`, by rank): records
    /// their steps per tick and, when every one is draining for the first time, `index` as the step they all drained
    /// at. Ranks whose ticks differ (or a steps-per-tick frame that cannot be read) abort the communicator: the error
    /// names the two ranks, and every attention rank reaches the same verdict in the same step.
    fn hear_ticks(&self, index: u64, received: &[Bytes]) -> Result<(), TransportError> {
        let attention = self.layout.ranks(RankRole::Attention);
        let mut heard: Vec<(usize, u64, bool)> = Vec::new();
        let mut refused = None;
        for (peer, bytes) in received.iter().enumerate().filter(|(_, bytes)| !bytes.is_empty()) {
            if !attention.contains(&peer) {
                // Only attention ranks send in the dispatch exchange: requests to expert ranks, ticks to each other.
                tracing::warn!(rank = self.collective.rank(), peer, bytes = bytes.len(), "unexpected dispatch bytes");
                continue;
            }
            match frames(&self.layout.name(peer), bytes) {
                Ok(frames) => {
                    for frame in frames {
                        match frame {
                            Frame::Ticks { steps_per_tick, draining } => heard.push((peer, steps_per_tick, draining)),
                            _ => tracing::warn!(
                                rank = self.collective.rank(),
                                peer,
                                "unexpected frame from an attention rank in the dispatch exchange"
                            ),
                        }
                    }
                }
                Err(error) => {
                    refused.get_or_insert(TransportError::Unavailable {
                        peer: self.layout.name(peer),
                        reason: format!("its steps-per-tick frame cannot be read, so the ranks cannot agree: {error}"),
                    });
                }
            }
        }
        let mut ticks = self.ticks();
        if ticks.said.len() < self.layout.world_size() {
            ticks.said.resize(self.layout.world_size(), None);
        }
        for &(peer, steps_per_tick, _) in &heard {
            match ticks.said[peer] {
                Some(before) if before != steps_per_tick => {
                    refused.get_or_insert(TransportError::Unavailable {
                        peer: self.layout.name(peer),
                        reason: format!(
                            "attention rank {} said {before} MoE layer steps per tick, then {steps_per_tick}: {}",
                            self.layout.name(peer),
                            TICKS_DIFFER
                        ),
                    });
                }
                _ => ticks.said[peer] = Some(steps_per_tick),
            }
        }
        let mut said = ticks.said.iter().enumerate().filter_map(|(rank, steps)| steps.map(|s| (rank, s)));
        if let Some((first, steps)) = said.next() {
            if let Some((other, theirs)) = said.find(|&(_, theirs)| theirs != steps) {
                refused.get_or_insert(TransportError::Unavailable {
                    peer: self.layout.name(other),
                    reason: format!(
                        "attention rank {} makes {steps} MoE layer steps per tick and attention rank {} makes                          {theirs}: {TICKS_DIFFER}",
                        self.layout.name(first),
                        self.layout.name(other)
                    ),
                });
            }
        }
        let every_rank_draining =
            attention.iter().all(|rank| heard.iter().any(|&(peer, _, draining)| draining && peer == *rank));
        if every_rank_draining && ticks.drained_at.is_none() && refused.is_none() {
            tracing::info!(rank = self.collective.rank(), step = index, "every attention rank is draining");
            ticks.drained_at = Some(index);
        }
        let Some(error) = refused else { return Ok(()) };
        ticks.failure.get_or_insert_with(|| error.clone());
        drop(ticks);
        self.failed.notify_waiters();
        tracing::warn!(rank = self.collective.rank(), step = index, %error, "aborting the communicator");
        self.collective.abort(&error.to_string());
        Err(error)
    }

    /// Encodes `batch` for `worker`: the expert rank and the request frame, or why it cannot be sent.
    fn request(&self, worker: &str, batch: &ExpertBatch) -> Result<(usize, Bytes, u64), TransportError> {
        let rank = match self.layout.rank_of(worker) {
            Some(rank) if self.layout.role(rank) == Some(RankRole::Expert) => rank,
            _ => {
                return Err(TransportError::Unavailable {
                    peer: worker.to_string(),
                    reason: "not an expert rank of this communicator".into(),
                })
            }
        };
        batch.check_shape()?;
        let values = batch.tokens() * batch.hidden;
        let extra = batch.attention_worker.len() + batch.tokens() * 4;
        let bound = wire::message_size_bound(values, batch.tokens(), self.wire.dispatch, extra);
        if bound > MAX_MESSAGE_BYTES {
            return Err(TransportError::InvalidPayload {
                what: "inputs".into(),
                reason: format!("{bound} bytes on the wire, more than one message may hold ({MAX_MESSAGE_BYTES})"),
            });
        }
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let message = wire::encode_request(request_id, batch, &batch.experts, &batch.inputs, self.wire, None);
        Ok((rank, message, request_id))
    }

    /// One step (blocking): see the module docs.
    fn step(&self, batches: Vec<(String, ExpertBatch)>) -> Vec<Result<Vec<f32>, TransportError>> {
        let world = self.layout.world_size();
        let mut results: Vec<Option<Result<Vec<f32>, TransportError>>> = (0..batches.len()).map(|_| None).collect();
        let mut pending: Vec<Vec<Pending>> = (0..world).map(|_| Vec::new()).collect();
        let mut outgoing: Vec<Vec<Bytes>> = (0..world).map(|_| Vec::new()).collect();
        for (index, (worker, batch)) in batches.iter().enumerate() {
            match self.request(worker, batch) {
                Ok((rank, message, request_id)) => {
                    outgoing[rank].push(message);
                    pending[rank].push(Pending { index, request_id, tokens: batch.tokens(), hidden: batch.hidden });
                }
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        drop(batches);
        // The exchange refuses a payload over its limit without sending anything, which would leave this rank out of
        // step: such requests fail here instead, and the exchange happens without them.
        for (frames, waiting) in outgoing.iter_mut().zip(pending.iter_mut()) {
            let total: usize = frames.iter().map(Bytes::len).sum();
            if total as u64 > super::MAX_PAYLOAD_BYTES {
                let error = TransportError::InvalidPayload {
                    what: "inputs".into(),
                    reason: format!(
                        "{total} bytes to one expert rank in one step, more than {}",
                        super::MAX_PAYLOAD_BYTES
                    ),
                };
                for request in waiting.drain(..) {
                    results[request.index] = Some(Err(error.clone()));
                }
                frames.clear();
            }
        }
        let _stepping = self.lock_steps();
        let (index, ticks) = self.begin_step();
        if let Some(ticks) = ticks {
            for rank in self.layout.ranks(RankRole::Attention) {
                outgoing[rank].push(ticks.clone());
            }
        }
        let sends = outgoing.into_iter().map(payload).collect();
        let dispatched = self.collective.exchange(sends, Some(self.step_timeout));
        // Ranks whose ticks differ abort the communicator, so the combine exchange below fails at once (telling the
        // expert ranks, where the implementation can): the step's requests fail with the reason.
        let refused = dispatched.as_ref().ok().and_then(|received| self.hear_ticks(index, received).err());
        let exchanged =
            dispatched.and_then(|_| self.collective.exchange(vec![Bytes::new(); world], Some(self.step_timeout)));
        match (refused, exchanged) {
            (None, Ok(answers)) => {
                for (rank, (waiting, answer)) in pending.iter().zip(&answers).enumerate() {
                    if !waiting.is_empty() {
                        self.take_answers(rank, waiting, answer, &mut results);
                    }
                }
            }
            (refused, Err(error)) => {
                let lost = refused.unwrap_or_else(|| self.fail(self.layout.lost(&error)));
                for waiting in pending.iter().flatten() {
                    results[waiting.index] = Some(Err(lost.clone()));
                }
            }
            (Some(refused), Ok(_)) => {
                for waiting in pending.iter().flatten() {
                    results[waiting.index] = Some(Err(refused.clone()));
                }
            }
        }
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| Err(TransportError::Compute { reason: "no answer was recorded".into() }))
            })
            .collect()
    }

    /// Decodes expert rank `rank`'s answers to `waiting` into `results`.
    fn take_answers(
        &self,
        rank: usize,
        waiting: &[Pending],
        answer: &Bytes,
        results: &mut [Option<Result<Vec<f32>, TransportError>>],
    ) {
        let peer = self.layout.id(rank).unwrap_or("expert rank").to_string();
        let answers = match frames(&peer, answer) {
            // One error for several requests: the expert rank could not read the payload at all.
            Ok(mut frames) if frames.len() == 1 && waiting.len() > 1 && matches!(frames[0], Frame::Error(_)) => {
                let Some(Frame::Error(error)) = frames.pop() else { return };
                for request in waiting {
                    results[request.index] = Some(Err(error.clone()));
                }
                return;
            }
            Ok(frames) if frames.len() == waiting.len() => frames,
            Ok(frames) => {
                let error = TransportError::InvalidPayload {
                    what: format!("payload from {peer}"),
                    reason: format!("{} answers to {} requests", frames.len(), waiting.len()),
                };
                for request in waiting {
                    results[request.index] = Some(Err(error.clone()));
                }
                return;
            }
            Err(error) => {
                for request in waiting {
                    results[request.index] = Some(Err(error.clone()));
                }
                return;
            }
        };
        for (request, frame) in waiting.iter().zip(answers) {
            results[request.index] = Some(match frame {
                Frame::Message(body) => decode_answer(&body, request),
                Frame::Error(error) => Err(error),
                Frame::Leave | Frame::Ticks { .. } => Err(TransportError::InvalidPayload {
                    what: format!("payload from {peer}"),
                    reason: "a leave or steps-per-tick frame in the combine exchange".into(),
                }),
            });
        }
    }
}

/// The outputs of one `DispatchResponse`, checked against its request.
fn decode_answer(body: &Bytes, request: &Pending) -> Result<Vec<f32>, TransportError> {
    let response = wire::read_response(&Chunks::from(body.clone()))?;
    if response.request_id != request.request_id {
        return Err(TransportError::InvalidPayload {
            what: "request_id".into(),
            reason: format!("answer to request {} where {} was expected", response.request_id, request.request_id),
        });
    }
    let mut outputs = vec![0.0f32; request.tokens * request.hidden];
    codec::outputs_from_message_into(&response, request.tokens, request.hidden, &mut outputs, Stores::Cached)?;
    Ok(outputs)
}

impl Transport for CollectiveTransport {
    fn lockstep(&self) -> bool {
        true
    }

    fn dispatch(&self, worker: &str, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        let step = self.dispatch_step(vec![(worker.to_string(), batch)]);
        Box::pin(async move {
            step.await
                .pop()
                .unwrap_or_else(|| Err(TransportError::Compute { reason: "the step returned nothing".into() }))
        })
    }

    fn dispatch_step(
        &self,
        batches: Vec<(String, ExpertBatch)>,
    ) -> BoxFuture<'static, Vec<Result<Vec<f32>, TransportError>>> {
        let rank = self.rank.clone();
        let count = batches.len();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || rank.step(batches)).await {
                Ok(results) => results,
                Err(e) => {
                    let error = TransportError::Compute { reason: format!("the collective step panicked: {e}") };
                    vec![Err(error); count]
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Expert ranks
// ---------------------------------------------------------------------------------------------------------------

/// What an expert rank did before every attention rank left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpertRankSummary {
    /// Steps served.
    pub steps: u64,
    /// Requests answered (with outputs or an error).
    pub requests: u64,
}

/// Serves the expert rank `collective.rank()` of `layout` with `service` until every attention rank leaves: each
/// step, receives the requests of every attention rank, computes them (all at once), and sends the answers back in
/// the combine exchange. Between steps it waits as long as the peers are there (an attention rank that goes away, or
/// [`Collective::abort`], ends the wait); the combine exchange must end within `step_timeout`.
///
/// Fails, after aborting its side of the communicator, when an exchange fails or some attention ranks leave while
/// others still step.
pub async fn serve_expert_rank(
    collective: Arc<dyn Collective>,
    layout: RankLayout,
    service: Arc<dyn ExpertService>,
    step_timeout: Duration,
) -> Result<ExpertRankSummary, TransportError> {
    layout.check(collective.as_ref(), RankRole::Expert)?;
    let world = layout.world_size();
    let attention = layout.ranks(RankRole::Attention);
    let me = collective.rank();
    let mut summary = ExpertRankSummary::default();
    loop {
        let received = exchange(&collective, vec![Bytes::new(); world], None).await.map_err(|e| layout.lost(&e))?;
        let mut left = Vec::new();
        let mut answers: Vec<Vec<BoxFuture<'static, Bytes>>> = (0..world).map(|_| Vec::new()).collect();
        for &rank in &attention {
            let peer = layout.id(rank).unwrap_or("attention rank").to_string();
            match frames(&peer, &received[rank]) {
                Ok(frames) if frames.iter().any(|f| matches!(f, Frame::Leave)) => left.push(rank),
                Ok(frames) => {
                    for frame in frames {
                        answers[rank].push(match frame {
                            Frame::Message(body) => Box::pin(answer(service.clone(), body)),
                            Frame::Error(_) | Frame::Leave | Frame::Ticks { .. } => {
                                Box::pin(std::future::ready(error_frame(&TransportError::InvalidPayload {
                                    what: format!("payload from {peer}"),
                                    reason: "only requests belong in the dispatch exchange".into(),
                                })))
                            }
                        });
                    }
                }
                Err(error) => answers[rank].push(Box::pin(std::future::ready(error_frame(&error)))),
            }
        }
        if !left.is_empty() {
            if left.len() == attention.len() {
                tracing::info!(rank = me, steps = summary.steps, "every attention rank left; the expert rank ends");
                return Ok(summary);
            }
            let stepping: Vec<usize> = attention.iter().copied().filter(|r| !left.contains(r)).collect();
            let reason = format!("attention ranks {left:?} left while ranks {stepping:?} still step");
            collective.abort(&reason);
            return Err(TransportError::Unavailable { peer: format!("rank {}", left[0]), reason });
        }
        let requests: usize = answers.iter().map(Vec::len).sum();
        let sends: Vec<Bytes> = futures::future::join_all(answers.into_iter().map(futures::future::join_all))
            .await
            .into_iter()
            .map(|frames| {
                let total: usize = frames.iter().map(Bytes::len).sum();
                if total as u64 > super::MAX_PAYLOAD_BYTES {
                    error_frame(&TransportError::InvalidPayload {
                        what: "outputs".into(),
                        reason: format!(
                            "{total} bytes of answers to one attention rank in one step, more than {}",
                            super::MAX_PAYLOAD_BYTES
                        ),
                    })
                } else {
                    payload(frames)
                }
            })
            .collect();
        exchange(&collective, sends, Some(step_timeout)).await.map_err(|e| layout.lost(&e))?;
        summary.steps += 1;
        summary.requests += requests as u64;
    }
}

/// One exchange on a blocking thread.
async fn exchange(
    collective: &Arc<dyn Collective>,
    sends: Vec<Bytes>,
    timeout: Option<Duration>,
) -> Result<Vec<Bytes>, CollectiveError> {
    let collective = collective.clone();
    match tokio::task::spawn_blocking(move || collective.exchange(sends, timeout)).await {
        Ok(result) => result,
        Err(e) => Err(CollectiveError::Aborted { reason: format!("the exchange panicked: {e}") }),
    }
}

/// Computes one request: the response frame, or an error frame.
async fn answer(service: Arc<dyn ExpertService>, body: Bytes) -> Bytes {
    match respond(service, body).await {
        Ok(response) => response,
        Err(error) => error_frame(&error),
    }
}

/// Decodes, validates and computes one request, as the gRPC server does, and encodes the response.
async fn respond(service: Arc<dyn ExpertService>, body: Bytes) -> Result<Bytes, TransportError> {
    let request: RequestMessage = wire::read_request(&Chunks::from(body))?;
    crate::grpc::compute_request(&service, request, None, None).await
}

// ---------------------------------------------------------------------------------------------------------------
// NCCL ranks, whatever the build
// ---------------------------------------------------------------------------------------------------------------

/// Fails unless this build has the NCCL communicator (feature `cuda`): what a process asked for the NCCL transport
/// checks at start, before it loads anything. These three functions are the one place the feature decides;
/// `NcclCollective` itself exists only in `cuda` builds.
pub fn nccl_built() -> Result<(), CollectiveError> {
    if cfg!(feature = "cuda") {
        Ok(())
    } else {
        Err(CollectiveError::Unavailable {
            reason: "switchyard was built without the `cuda` feature (rebuild with `--features cuda`)".into(),
        })
    }
}

/// A new NCCL unique id for rank 0 to publish (`NcclCollective::unique_id`); fails as [`nccl_built`] says in a
/// build without `cuda`, and where the NCCL library is missing.
pub fn nccl_unique_id() -> Result<Vec<u8>, CollectiveError> {
    nccl_built()?;
    #[cfg(feature = "cuda")]
    let id = super::NcclCollective::unique_id().map(|id| id.to_vec());
    #[cfg(not(feature = "cuda"))]
    let id = Ok(Vec::new());
    id
}

/// Joins the NCCL communicator of `unique_id` as `rank` of `world_size` on GPU `gpu` (`NcclCollective::new`), giving
/// up after `join_timeout`; fails as [`nccl_built`] says in a build without `cuda`.
pub fn join_nccl(
    unique_id: &[u8],
    rank: usize,
    world_size: usize,
    gpu: usize,
    join_timeout: Duration,
) -> Result<Arc<dyn Collective>, CollectiveError> {
    nccl_built()?;
    #[cfg(feature = "cuda")]
    let joined = super::NcclCollective::new(unique_id, rank, world_size, gpu, join_timeout)
        .map(|collective| Arc::new(collective) as Arc<dyn Collective>);
    #[cfg(not(feature = "cuda"))]
    let joined = {
        let _ = (unique_id, rank, world_size, gpu, join_timeout);
        Err(CollectiveError::Unavailable { reason: "no NCCL in this build".into() })
    };
    joined
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_error_frame() {
        for error in [
            TransportError::StaleEpoch { sent: 3, current: 5 },
            TransportError::ExpertNotHeld { layer: 1, expert: 7 },
            TransportError::InvalidPayload {
                what: "expert_ids".into(),
                reason: "8 bytes for 3 tokens: ünïcode".into(),
            },
            TransportError::Compute { reason: "out of memory".into() },
        ] {
            let frame = error_frame(&error);
            let parsed = frames("e0", &frame).unwrap();
            assert!(matches!(&parsed[..], [Frame::Error(e)] if *e == error), "{error}");
        }
    }

    #[test]
    fn cut_payloads_and_unknown_flags_are_refused() {
        let good = payload(vec![frame(FRAME_LEAVE, &[]), frame(FRAME_MESSAGE, b"abc")]);
        assert_eq!(frames("e0", &good).unwrap().len(), 2);
        for bad in [good.slice(..good.len() - 1), good.slice(..3), Bytes::from_static(&[0x42, 0, 0, 0, 0])] {
            let error = frames("e0", &bad).err().unwrap();
            assert!(matches!(&error, TransportError::InvalidPayload { what, .. } if what.contains("e0")), "{error}");
        }
    }

    #[test]
    fn ticks_frames_carry_steps_per_tick_and_the_drain() {
        let steps = 48u64.to_le_bytes();
        let good = payload(vec![frame(FRAME_STEPS_PER_TICK, &steps), frame(FRAME_DRAINING, &steps)]);
        let parsed = frames("a1", &good).unwrap();
        assert!(matches!(
            &parsed[..],
            [Frame::Ticks { steps_per_tick: 48, draining: false }, Frame::Ticks { steps_per_tick: 48, draining: true }]
        ));
        let short = frame(FRAME_DRAINING, &steps[..7]);
        let error = frames("a1", &short).err().unwrap();
        assert!(error.to_string().contains("steps-per-tick frame of 7 bytes"), "{error}");
    }

    #[test]
    fn layouts_are_checked() {
        assert!(RankLayout::attention_first(&["a0"], &["a0"]).is_err());
        assert!(RankLayout::attention_first(&["a0", "a1"], &[]).is_err());
        assert!(RankLayout::attention_first(&[""], &["e0"]).is_err());
        let layout = RankLayout::attention_first(&["a0", "a1"], &["e0"]).unwrap();
        assert_eq!((layout.world_size(), layout.rank_of("e0"), layout.role(2)), (3, Some(2), Some(RankRole::Expert)));
        assert_eq!(layout.ranks(RankRole::Attention), vec![0, 1]);
        let collective = super::super::LoopbackCollective::group(2).pop().unwrap();
        assert!(CollectiveTransport::new(Arc::new(collective), layout, WireFormat::default()).is_err());
    }
}
