//! Dispatch and combine as collectives: every rank of a communicator exchanges one byte buffer with every other rank
//! per exchange, in lockstep, the way NCCL moves data between GPUs.
//!
//! [`Collective`] is the seam: this process's rank, the world size, and one grouped exchange (a buffer to each peer,
//! one from each). Every implementation runs the same two phases, written once here (`Lockstep`): first a 16-byte
//! header to and from every rank (the exchange's sequence number and the payload's length), then the payloads that
//! are not empty, each phase one group of point-to-point sends and receives. Announcing sizes first is what lets a
//! receiver post a receive of the right length (NCCL needs it) and skip peers with nothing to say; the sequence number
//! catches ranks that fell out of step before their bytes are misread.
//!
//! Implementations: `NcclCollective` (feature `cuda`; NCCL grouped `ncclSend`/`ncclRecv` through cudarc, device
//! buffers) and [`LoopbackCollective`] (ranks as threads of one process joined by channels: it stands in for NCCL
//! where several GPUs are not at hand, so that everything above the seam is tested as it runs).
//!
//! Above the seam, [`step`] is the MoE layer step: [`CollectiveTransport`] on attention ranks (dispatch as one
//! exchange, combine as the next) and [`serve_expert_rank`] on expert ranks; payloads are the dispatch messages of the
//! gRPC transport, encoded by the same code ([`crate::codec`]).
//!
//! Failure: an exchange that cannot complete (a peer gone, a deadline passed, an abort) fails on this rank with a
//! [`CollectiveError`] naming the rank it concerns, and poisons the communicator: every later exchange fails at once
//! with the same error, because the ranks are no longer in step. A failing rank tells its peers where it can (the
//! loopback sends them the reason; NCCL's `ncclCommAbort` does not reach the peers, which fail at their deadline).

mod loopback;
#[cfg(feature = "cuda")]
mod nccl;
pub mod step;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use loopback::LoopbackCollective;
#[cfg(feature = "cuda")]
pub use nccl::{NcclCollective, NCCL_UNIQUE_ID_BYTES};
pub use step::{
    join_nccl, nccl_built, nccl_unique_id, serve_expert_rank, CollectiveTransport, ExpertRankSummary, RankLayout,
    RankRole,
};

/// The largest payload one rank accepts from one peer in one exchange: a corrupt header must not allocate more. Four
/// gRPC messages of the largest size ([`crate::grpc::MAX_MESSAGE_BYTES`]).
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 30;

/// Bytes of the header each rank sends every rank first: the exchange's sequence number, then the payload's length,
/// both little-endian `u64`.
pub(crate) const HEADER_BYTES: usize = 16;

/// Why an exchange failed. Every variant but [`CollectiveError::InvalidArgument`] leaves the communicator unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    /// A peer went away (its process or thread ended, its channel closed, NCCL reported a remote error).
    #[error("rank {rank} is gone: {reason}")]
    PeerLost {
        /// The peer.
        rank: usize,
        /// What was seen.
        reason: String,
    },
    /// A peer failed and said why before leaving the exchange (the loopback relays it; NCCL cannot).
    #[error("rank {rank} aborted the communicator: {reason}")]
    PeerAborted {
        /// The peer that aborted.
        rank: usize,
        /// The rank its error was about, if one (the rank that really failed).
        blamed: Option<usize>,
        /// Its reason.
        reason: String,
    },
    /// The exchange did not complete in time.
    #[error("exchange {exchange} did not complete within {:.1} s: no data from rank(s) {waiting_for:?}", after.as_secs_f64())]
    Timeout {
        /// The exchange's sequence number on this rank.
        exchange: u64,
        /// Ranks that had not delivered (for NCCL, every rank the group was receiving from).
        waiting_for: Vec<usize>,
        /// The deadline that passed.
        after: Duration,
    },
    /// A peer is at another exchange than this rank: the ranks did not make the same calls.
    #[error("rank {rank} is at exchange {theirs} while this rank is at exchange {ours}: the ranks fell out of step")]
    OutOfStep {
        /// The peer.
        rank: usize,
        /// Its sequence number.
        theirs: u64,
        /// This rank's.
        ours: u64,
    },
    /// A peer sent bytes that do not fit the protocol (a header announcing too much, a payload of the wrong length).
    #[error("rank {rank} sent a malformed exchange: {reason}")]
    Malformed {
        /// The peer.
        rank: usize,
        /// What was wrong.
        reason: String,
    },
    /// This rank's own call was wrong (one buffer per rank is needed, ...); the communicator stays usable.
    #[error("invalid collective call: {what}: {reason}")]
    InvalidArgument {
        /// The argument.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// This rank was told to abort (by [`Collective::abort`]).
    #[error("aborted on this rank: {reason}")]
    Aborted {
        /// Who asked and why.
        reason: String,
    },
    /// The communicator failed earlier; the ranks are no longer in step.
    #[error("the communicator failed earlier: {cause}")]
    Failed {
        /// The first error.
        cause: Box<CollectiveError>,
    },
    /// CUDA or NCCL cannot be used here (library missing, no such GPU): nothing was started.
    #[error("NCCL unavailable: {reason}")]
    Unavailable {
        /// What is missing, by name.
        reason: String,
    },
    /// A CUDA or NCCL call failed.
    #[error("{op} failed: {reason}")]
    Nccl {
        /// The call (`ncclCommInitRankConfig`, `ncclGroupEnd`, `cuMemAlloc`, ...).
        op: &'static str,
        /// What NCCL or CUDA said.
        reason: String,
    },
}

impl CollectiveError {
    /// The rank this error is about, if it is about one peer: for an abort relayed by a peer, the rank that peer
    /// blamed.
    pub fn rank(&self) -> Option<usize> {
        match self {
            CollectiveError::PeerAborted { rank, blamed, .. } => Some(blamed.unwrap_or(*rank)),
            CollectiveError::PeerLost { rank, .. }
            | CollectiveError::OutOfStep { rank, .. }
            | CollectiveError::Malformed { rank, .. } => Some(*rank),
            // Several silent peers: which of them holds the others up is unknown, so none is blamed.
            CollectiveError::Timeout { waiting_for, .. } => match waiting_for[..] {
                [only] => Some(only),
                _ => None,
            },
            CollectiveError::Failed { cause } => cause.rank(),
            CollectiveError::InvalidArgument { .. }
            | CollectiveError::Aborted { .. }
            | CollectiveError::Unavailable { .. }
            | CollectiveError::Nccl { .. } => None,
        }
    }
}

/// One rank of a communicator: see the module docs.
///
/// Every rank must make the same sequence of [`Collective::exchange`] calls; an exchange returns once this rank has
/// sent its buffers and received every peer's (or failed). Calls on one rank are serialised.
pub trait Collective: Send + Sync + 'static {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Ranks in the communicator.
    fn world_size(&self) -> usize;

    /// Sends `sends[peer]` to every rank (an empty buffer sends nothing but the header; `sends[self.rank()]` comes
    /// back to this rank) and returns what each rank sent this one, indexed by rank. Blocks until done, until
    /// `timeout` passes (`None`: wait as long as the peers are there), or until [`Collective::abort`].
    fn exchange(&self, sends: Vec<Bytes>, timeout: Option<Duration>) -> Result<Vec<Bytes>, CollectiveError>;

    /// Fails the exchange in progress (from any thread) and every later one with `reason`, and tells the peers where
    /// the implementation can.
    fn abort(&self, reason: &str);
}

/// One group of point-to-point operations: what an implementation provides to [`Lockstep`].
pub(crate) trait PointToPoint: Send {
    /// Sends each `(peer, bytes)` of `sends` and receives `length` bytes from each `(peer, length)` of `receives`, as
    /// one group, returning the received buffers in the order of `receives`. Gives up at `deadline` or when `abort`
    /// is raised ([`CollectiveError::Timeout`] naming the peers still awaited; the caller fills in the exchange).
    fn grouped(
        &mut self,
        sends: &[(usize, &[u8])],
        receives: &[(usize, usize)],
        deadline: Option<Instant>,
        abort: &AbortFlag,
    ) -> Result<Vec<Vec<u8>>, CollectiveError>;

    /// Ends the communicator after `error` on this rank, telling peers where possible. Later calls are not made.
    fn fail(&mut self, error: &CollectiveError);
}

/// Raised by [`Collective::abort`] from any thread; polled by waiting exchanges.
#[derive(Debug, Default)]
pub(crate) struct AbortFlag {
    raised: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl AbortFlag {
    pub(crate) fn raise(&self, reason: &str) {
        let mut slot = self.reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slot.get_or_insert_with(|| reason.to_owned());
        self.raised.store(true, Ordering::Release);
    }

    /// The error to fail with, once raised.
    pub(crate) fn check(&self) -> Result<(), CollectiveError> {
        if !self.raised.load(Ordering::Acquire) {
            return Ok(());
        }
        let reason = self.reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        Err(CollectiveError::Aborted { reason: reason.unwrap_or_default() })
    }
}

/// Implements [`Collective`] for a type whose field `lockstep` is a [`Lockstep`]: every implementation is its
/// point-to-point moves plus the shared exchange.
macro_rules! forward_collective {
    ($type:ty) => {
        impl $crate::collective::Collective for $type {
            fn rank(&self) -> usize {
                self.lockstep.rank()
            }

            fn world_size(&self) -> usize {
                self.lockstep.world_size()
            }

            fn exchange(
                &self,
                sends: Vec<bytes::Bytes>,
                timeout: Option<std::time::Duration>,
            ) -> Result<Vec<bytes::Bytes>, $crate::collective::CollectiveError> {
                self.lockstep.exchange(sends, timeout)
            }

            fn abort(&self, reason: &str) {
                self.lockstep.abort(reason);
            }
        }
    };
}
pub(crate) use forward_collective;

/// How long a waiting rank sleeps between checks of its abort flag and deadline.
pub(crate) const POLL: Duration = Duration::from_millis(5);

struct LockstepState<P> {
    p2p: P,
    /// Exchanges completed (the next one's sequence number).
    exchanges: u64,
    /// The error that ended the communicator.
    failed: Option<CollectiveError>,
}

/// The two-phase exchange over a [`PointToPoint`], shared by every implementation.
pub(crate) struct Lockstep<P> {
    rank: usize,
    world_size: usize,
    state: Mutex<LockstepState<P>>,
    abort: Arc<AbortFlag>,
}

impl<P: PointToPoint> Lockstep<P> {
    pub(crate) fn new(p2p: P, rank: usize, world_size: usize) -> Self {
        Lockstep {
            rank,
            world_size,
            state: Mutex::new(LockstepState { p2p, exchanges: 0, failed: None }),
            abort: Arc::new(AbortFlag::default()),
        }
    }

    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    pub(crate) fn world_size(&self) -> usize {
        self.world_size
    }

    fn lock(&self) -> MutexGuard<'_, LockstepState<P>> {
        // A panic mid-exchange leaves `failed` unset but the peers out of step; the next exchange then fails on them.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn abort(&self, reason: &str) {
        self.abort.raise(reason);
    }

    pub(crate) fn exchange(&self, sends: Vec<Bytes>, timeout: Option<Duration>) -> Result<Vec<Bytes>, CollectiveError> {
        if sends.len() != self.world_size {
            return Err(CollectiveError::InvalidArgument {
                what: "sends".into(),
                reason: format!(
                    "{} buffers for a world of {} ranks (one per rank is needed)",
                    sends.len(),
                    self.world_size
                ),
            });
        }
        if let Some(too_long) = sends.iter().position(|s| s.len() as u64 > MAX_PAYLOAD_BYTES) {
            return Err(CollectiveError::InvalidArgument {
                what: format!("sends[{too_long}]"),
                reason: format!("{} bytes, more than the limit {MAX_PAYLOAD_BYTES}", sends[too_long].len()),
            });
        }
        let mut state = self.lock();
        if let Some(cause) = &state.failed {
            return Err(CollectiveError::Failed { cause: Box::new(cause.clone()) });
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let exchange = state.exchanges;
        let result = self.two_phases(&mut state.p2p, exchange, &sends, deadline);
        match result {
            Ok(received) => {
                state.exchanges += 1;
                Ok(received)
            }
            Err(error) => {
                let error = match error {
                    CollectiveError::Timeout { waiting_for, .. } => {
                        CollectiveError::Timeout { exchange, waiting_for, after: timeout.unwrap_or_default() }
                    }
                    other => other,
                };
                tracing::warn!(rank = self.rank, exchange, error = %error, "collective exchange failed");
                state.p2p.fail(&error);
                state.failed = Some(error.clone());
                Err(error)
            }
        }
    }

    fn two_phases(
        &self,
        p2p: &mut P,
        exchange: u64,
        sends: &[Bytes],
        deadline: Option<Instant>,
    ) -> Result<Vec<Bytes>, CollectiveError> {
        self.abort.check()?;
        let headers: Vec<[u8; HEADER_BYTES]> = sends
            .iter()
            .map(|payload| {
                let mut header = [0u8; HEADER_BYTES];
                header[..8].copy_from_slice(&exchange.to_le_bytes());
                header[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
                header
            })
            .collect();
        let header_sends: Vec<(usize, &[u8])> = headers.iter().enumerate().map(|(peer, h)| (peer, &h[..])).collect();
        let header_receives: Vec<(usize, usize)> = (0..self.world_size).map(|peer| (peer, HEADER_BYTES)).collect();
        let received = p2p.grouped(&header_sends, &header_receives, deadline, &self.abort)?;
        let mut lengths = Vec::with_capacity(self.world_size);
        for (rank, header) in received.iter().enumerate() {
            let field = |range: std::ops::Range<usize>| {
                header.get(range).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes)
            };
            let (Some(theirs), Some(length)) = (field(0..8), field(8..16)) else {
                return Err(CollectiveError::Malformed {
                    rank,
                    reason: format!("a header of {} bytes, {HEADER_BYTES} expected", header.len()),
                });
            };
            if theirs != exchange {
                return Err(CollectiveError::OutOfStep { rank, theirs, ours: exchange });
            }
            if length > MAX_PAYLOAD_BYTES {
                return Err(CollectiveError::Malformed {
                    rank,
                    reason: format!("announces {length} bytes, more than the limit {MAX_PAYLOAD_BYTES}"),
                });
            }
            lengths.push(length as usize);
        }
        let payload_sends: Vec<(usize, &[u8])> =
            sends.iter().enumerate().filter(|(_, s)| !s.is_empty()).map(|(peer, s)| (peer, &s[..])).collect();
        let payload_receives: Vec<(usize, usize)> =
            lengths.iter().enumerate().filter(|(_, &n)| n > 0).map(|(peer, &n)| (peer, n)).collect();
        let mut out = vec![Bytes::new(); self.world_size];
        if payload_sends.is_empty() && payload_receives.is_empty() {
            return Ok(out);
        }
        let payloads = p2p.grouped(&payload_sends, &payload_receives, deadline, &self.abort)?;
        for ((peer, length), payload) in payload_receives.iter().zip(payloads) {
            if payload.len() != *length {
                return Err(CollectiveError::Malformed {
                    rank: *peer,
                    reason: format!("{} payload bytes after announcing {length}", payload.len()),
                });
            }
            out[*peer] = Bytes::from(payload);
        }
        Ok(out)
    }
}
