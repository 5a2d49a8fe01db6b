//! NCCL's point-to-point API, emulated for ranks that are threads of this process: what `NcclCollective`
//! (transport/src/collective/nccl.rs) calls through cudarc's NCCL bindings, exported under NCCL's symbol names so that
//! cudarc finds them in this library through the `libnccl.so` symlink (scripts/cuda-emulator.sh). It proves the host
//! side of our NCCL code (ids, joining, groups, byte counts, the non-blocking polling, errors and aborts); it does not
//! prove NCCL's own behaviour on GPUs (its kernels, transports, timing, or ranks in other processes and hosts).
//!
//! Semantics, as NCCL documents them where it does, and the emulator's choice where it does not:
//! - `ncclGetUniqueId`: 128 bytes, unique per call, marked as the emulator's (a magic, this process's id, a serial).
//!   An id the emulator did not make in this process is refused (`ncclInvalidArgument`): it joins only ranks of one
//!   process.
//! - `ncclCommInitRankConfig` (and `ncclCommInitRank`, blocking): the communicator is complete once all `nranks`
//!   ranks joined with the same id. Blocking (`config.blocking` 1 or `NCCL_CONFIG_UNDEF_INT`, or no config) waits for
//!   that; non-blocking (`blocking = 0`) returns `ncclInProgress` with the handle at once, and
//!   `ncclCommGetAsyncError` answers `ncclInProgress` until every rank joined. A rank joins with the device current on
//!   its thread (device 0 without one, as `cudaGetDevice`); two ranks on one device, a rank joining twice, or ranks
//!   disagreeing on `nranks` fail the communicator on every rank with `ncclInvalidUsage`, as NCCL refuses them. The
//!   config must carry `NCCL_CONFIG_INITIALIZER`'s magic; of its fields only `blocking` matters here.
//! - `ncclGroupStart` / `ncclGroupEnd` (per thread, nestable): the `ncclSend`s and `ncclRecv`s between them run at the
//!   outermost `ncclGroupEnd`; outside a group each runs at once as a group of one. Sends are eager: their bytes are
//!   copied at `ncclGroupEnd` into a mailbox per (communicator, source rank, destination rank), in order. Receives then
//!   take the messages of their peer in FIFO order (zero-byte messages included: since NCCL 2.12.10 they are real,
//!   matching operations); a message whose byte count differs from the receive's is an error (`ncclInvalidUsage`
//!   naming both counts), where NCCL's behaviour is undefined. Arguments are checked at the call, as NCCL does
//!   (communicator, peer in range, data type, buffers inside one live device allocation, stream); an error there also
//!   fails the group's `ncclGroupEnd`, and its operations are dropped. A communicator still joining, or with a group
//!   still in progress, refuses new operations (`ncclInvalidUsage`): NCCL requires `ncclCommGetAsyncError` to say
//!   `ncclSuccess` first.
//! - Completion. A non-blocking group whose receives cannot all complete at once returns `ncclInProgress`; each
//!   `ncclCommGetAsyncError` moves the messages that arrived since and answers `ncclInProgress` until the last one is
//!   in, then `ncclSuccess`. This is where the emulator differs from NCCL, on purpose: NCCL says `ncclSuccess` once the
//!   group is *enqueued* and the stream then completes when the peers deliver, whereas every stream of this emulator
//!   is complete at once (driver.rs). Keeping the wait in `ncclCommGetAsyncError` keeps the caller's polling (its
//!   deadline, its abort flag) in charge of it, so a peer that never sends cannot hang the caller. A blocking group
//!   waits in `ncclGroupEnd` instead, woken by every send and abort, and gives up after [`blocking_wait_limit`]
//!   (`ncclSystemError`; NCCL would hang).
//! - A receive awaiting a rank that left the communicator (`ncclCommAbort`, `ncclCommDestroy`) with no message of its
//!   queued fails with `ncclRemoteError`, as NCCL's network transports report a peer that went away; its
//!   `ncclGetLastError` names the rank. Messages the rank sent before leaving are still delivered; messages sent to
//!   it after are dropped. Errors are sticky:
//!   `ncclCommGetAsyncError` keeps answering the first one, and every later group on the communicator fails with it.
//! - `ncclCommAbort`: ends this rank's operations in flight, frees the communicator (its handle is then refused), and
//!   wakes peers blocked on it, which fail as above. `ncclCommAbort(NULL)` is `ncclSuccess`, as in NCCL.
//!   `ncclCommDestroy` leaves the same way; `ncclCommFinalize` waits (blocking) or reports through
//!   `ncclCommGetAsyncError` (non-blocking) until the communicator's receives are done.
//! - `ncclGetErrorString`: NCCL's texts. `ncclGetLastError`: the detail of the last error on the calling thread (the
//!   communicator argument is ignored, as NCCL does); every error is also printed on stderr.
//! - Device pointers are host addresses (memory.rs); data types have NCCL's sizes (`ncclUint8` 1 byte, ...,
//!   `ncclFloat8e4m3` 1 byte).

// NCCL's own type names, so that each export reads like its C declaration.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::driver::{current_device, is_live_stream, lock, new_handle, CUstream};
use crate::memory::check_range;

/// NCCL's status type (cudarc's `ncclResult_t`, a `#[repr(u32)]` enum).
pub type ncclResult_t = u32;
/// NCCL's data type enum (cudarc's `ncclDataType_t`, `#[repr(u32)]`).
pub type ncclDataType_t = u32;
/// A communicator handle (opaque; never dereferenced by anyone).
pub type ncclComm_t = *mut c_void;

/// The ncclResult_t values the emulator returns: each is a variant of cudarc's `ncclResult_t`.
pub mod result {
    use super::ncclResult_t;
    /// ncclSuccess
    pub const SUCCESS: ncclResult_t = 0;
    /// ncclUnhandledCudaError
    pub const UNHANDLED_CUDA_ERROR: ncclResult_t = 1;
    /// ncclSystemError
    pub const SYSTEM_ERROR: ncclResult_t = 2;
    /// ncclInternalError
    pub const INTERNAL_ERROR: ncclResult_t = 3;
    /// ncclInvalidArgument
    pub const INVALID_ARGUMENT: ncclResult_t = 4;
    /// ncclInvalidUsage
    pub const INVALID_USAGE: ncclResult_t = 5;
    /// ncclRemoteError
    pub const REMOTE_ERROR: ncclResult_t = 6;
    /// ncclInProgress
    pub const IN_PROGRESS: ncclResult_t = 7;
}

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ncclUniqueId {
    /// The bytes.
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

/// The leading fields of every `ncclConfig_t` version: all the emulator reads.
#[repr(C)]
pub struct ncclConfigHead {
    /// `sizeof(ncclConfig_t)` as the caller compiled it.
    pub size: usize,
    /// `NCCL_CONFIG_INITIALIZER`'s magic, [`CONFIG_MAGIC`].
    pub magic: c_uint,
    /// `NCCL_VERSION(...)` of the caller's header.
    pub version: c_uint,
    /// 1 (or `NCCL_CONFIG_UNDEF_INT`): blocking calls; 0: non-blocking.
    pub blocking: c_int,
}

/// `NCCL_CONFIG_INITIALIZER`'s magic.
pub const CONFIG_MAGIC: c_uint = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "NCCL's default".
pub const CONFIG_UNDEF_INT: c_int = i32::MIN;
/// The version `ncclGetVersion` reports: 2.28.0, the oldest NCCL our transport supports.
pub const VERSION: c_int = 22800;

/// What the emulator's ids start with.
const ID_MAGIC: &[u8; 8] = b"SYEMNCCL";
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// How long a blocking call waits before giving up, in milliseconds.
static BLOCKING_WAIT_MS: AtomicU64 = AtomicU64::new(60_000);

/// How long a blocking `ncclCommInitRank*`, `ncclGroupEnd` or `ncclCommFinalize` waits for its peers before failing
/// with `ncclSystemError` (real NCCL would wait forever): 60 s unless [`set_blocking_wait_limit`] changed it.
pub fn blocking_wait_limit() -> Duration {
    Duration::from_millis(BLOCKING_WAIT_MS.load(Ordering::Relaxed))
}

/// Sets [`blocking_wait_limit`] for the rest of the process (tests that make a blocking call wait for a rank that
/// never comes).
pub fn set_blocking_wait_limit(limit: Duration) {
    BLOCKING_WAIT_MS.store(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
}

/// A failed call: the result and what was wrong.
#[derive(Debug, Clone)]
struct Failure {
    result: ncclResult_t,
    message: String,
}

fn failure(result: ncclResult_t, message: impl Into<String>) -> Failure {
    Failure { result, message: message.into() }
}

fn invalid_argument(message: impl Into<String>) -> Failure {
    failure(result::INVALID_ARGUMENT, message)
}

fn invalid_usage(message: impl Into<String>) -> Failure {
    failure(result::INVALID_USAGE, message)
}

// ---- state ----------------------------------------------------------------------------------------------------------

/// A receive posted and not yet matched.
#[derive(Debug, Clone, Copy)]
struct PendingReceive {
    peer: usize,
    buffer: u64,
    bytes: usize,
}

/// One rank's communicator.
struct Comm {
    clique: u64,
    rank: usize,
    nranks: usize,
    device: c_int,
    blocking: bool,
    /// Receives of the current group, in the order posted.
    pending: Vec<PendingReceive>,
    /// The first asynchronous error: sticky.
    error: Option<Failure>,
}

/// Every rank of one unique id.
struct Clique {
    nranks: usize,
    /// The comm handle and device of each rank that joined.
    members: Vec<Option<(usize, c_int)>>,
    /// Why a rank left (aborted, destroyed), once it did.
    gone: Vec<Option<&'static str>>,
    /// An error of the whole communicator (a rank on a device already taken ...): every rank fails with it.
    failure: Option<Failure>,
    /// Messages sent and not yet received, by (source rank, destination rank).
    mailboxes: HashMap<(usize, usize), VecDeque<Vec<u8>>>,
}

impl Clique {
    fn complete(&self) -> bool {
        self.members.iter().all(Option::is_some)
    }
}

#[derive(Default)]
struct World {
    cliques: HashMap<u64, Clique>,
    comms: HashMap<usize, Comm>,
}

static WORLD: Mutex<Option<World>> = Mutex::new(None);
/// Signalled on every change a blocked call may wait for: a rank joining, a message sent, a rank leaving.
static CHANGED: Condvar = Condvar::new();

/// The emulated NCCL's state, locked.
type WorldGuard = MutexGuard<'static, Option<World>>;

fn world() -> WorldGuard {
    lock(&WORLD)
}

fn state(guard: &mut WorldGuard) -> &mut World {
    guard.get_or_insert_with(World::default)
}

fn comm_mut(world: &mut World, handle: ncclComm_t) -> Result<&mut Comm, Failure> {
    world.comms.get_mut(&(handle as usize)).ok_or_else(|| {
        invalid_argument(format!(
            "comm {handle:?} is not a live communicator (never created, or aborted or destroyed already)"
        ))
    })
}

// ---- errors ---------------------------------------------------------------------------------------------------------

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn remember(function: &str, failure: &Failure) {
    eprintln!("switchyard-cuda-emulator: {function}: {} ({})", failure.message, result_name(failure.result));
    let text = CString::new(failure.message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

/// Runs the body of exported function `function`: its failure becomes the result (printed on stderr and kept for
/// `ncclGetLastError`), a panic becomes `ncclInternalError` instead of unwinding into C.
fn guard(function: &str, body: impl FnOnce() -> Result<ncclResult_t, Failure>) -> ncclResult_t {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(done)) => return done,
        Ok(Err(failure)) => failure,
        Err(panic) => failure(
            result::INTERNAL_ERROR,
            format!("internal error of the emulator (panic): {}", crate::error::panic_message(&*panic)),
        ),
    };
    remember(function, &failure);
    failure.result
}

/// The name of an ncclResult_t, as cudarc's Debug prints it.
pub fn result_name(result: ncclResult_t) -> &'static str {
    match result {
        result::SUCCESS => "ncclSuccess",
        result::UNHANDLED_CUDA_ERROR => "ncclUnhandledCudaError",
        result::SYSTEM_ERROR => "ncclSystemError",
        result::INTERNAL_ERROR => "ncclInternalError",
        result::INVALID_ARGUMENT => "ncclInvalidArgument",
        result::INVALID_USAGE => "ncclInvalidUsage",
        result::REMOTE_ERROR => "ncclRemoteError",
        result::IN_PROGRESS => "ncclInProgress",
        _ => "unknown result code",
    }
}

unsafe fn write_out<T>(out: *mut T, what: &str, value: T) -> Result<(), Failure> {
    if out.is_null() {
        return Err(invalid_argument(format!("{what} is a null pointer")));
    }
    // SAFETY: non-null, and valid for a write per the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

// ---- exported: ids, versions, errors --------------------------------------------------------------------------------

/// ncclGetVersion: [`VERSION`].
///
/// # Safety
/// `version` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    // SAFETY: the caller's contract.
    guard("ncclGetVersion", || unsafe { write_out(version, "version", VERSION) }.map(|()| result::SUCCESS))
}

/// ncclGetUniqueId: a fresh id (see the module docs).
///
/// # Safety
/// `id` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(id: *mut ncclUniqueId) -> ncclResult_t {
    guard("ncclGetUniqueId", || {
        let serial = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut bytes = [0u8; UNIQUE_ID_BYTES];
        bytes[..8].copy_from_slice(ID_MAGIC);
        bytes[8..16].copy_from_slice(&serial.to_le_bytes());
        bytes[16..20].copy_from_slice(&std::process::id().to_le_bytes());
        let internal = bytes.map(|b| b as c_char);
        // SAFETY: the caller's contract.
        unsafe { write_out(id, "uniqueId", ncclUniqueId { internal }) }.map(|()| result::SUCCESS)
    })
}

/// The serial of an id this process's emulator made.
fn id_serial(id: &ncclUniqueId) -> Result<u64, Failure> {
    let bytes = id.internal.map(|c| c as u8);
    let serial = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let pid = u32::from_le_bytes(bytes[16..20].try_into().unwrap_or_default());
    if &bytes[..8] != ID_MAGIC || pid != std::process::id() || serial == 0 || serial >= NEXT_ID.load(Ordering::Relaxed)
    {
        return Err(invalid_argument(
            "the unique id was not made by ncclGetUniqueId of this process: the emulated NCCL joins only ranks that \
             are threads of one process",
        ));
    }
    Ok(serial)
}

/// ncclGetErrorString: NCCL's text for `result`.
#[no_mangle]
pub extern "C" fn ncclGetErrorString(result: ncclResult_t) -> *const c_char {
    let text: &'static CStr = match result {
        result::SUCCESS => c"no error",
        result::UNHANDLED_CUDA_ERROR => c"unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        result::SYSTEM_ERROR => c"unhandled system error (run with NCCL_DEBUG=INFO for details)",
        result::INTERNAL_ERROR => c"internal error - please report this issue to the NCCL developers",
        result::INVALID_ARGUMENT => c"invalid argument (run with NCCL_DEBUG=WARN for details)",
        result::INVALID_USAGE => c"invalid usage (run with NCCL_DEBUG=WARN for details)",
        result::REMOTE_ERROR => c"remote process exited or there was a network error",
        result::IN_PROGRESS => c"NCCL operation in progress",
        _ => c"unknown result code",
    };
    text.as_ptr()
}

/// ncclGetLastError: the detail of the last error on this thread ("" if none). The pointer stays valid until the
/// next error on this thread.
#[no_mangle]
pub extern "C" fn ncclGetLastError(_comm: ncclComm_t) -> *const c_char {
    LAST_ERROR.try_with(|last| last.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

// ---- exported: communicators ----------------------------------------------------------------------------------------

/// Whether a config asks for blocking calls.
///
/// # Safety
/// `config` must be null or point to an `ncclConfig_t` of at least the head's size.
unsafe fn blocking(config: *const ncclConfigHead) -> Result<bool, Failure> {
    if config.is_null() {
        return Ok(true);
    }
    // SAFETY: the caller's contract.
    let head = unsafe { &*config };
    if head.magic != CONFIG_MAGIC {
        return Err(invalid_argument(format!(
            "config magic 0x{:x}, not NCCL_CONFIG_INITIALIZER's 0x{CONFIG_MAGIC:x}: the config was not initialised",
            head.magic
        )));
    }
    if head.size < std::mem::size_of::<ncclConfigHead>() {
        return Err(invalid_argument(format!("config size {} is smaller than any ncclConfig_t", head.size)));
    }
    match head.blocking {
        0 => Ok(false),
        1 | CONFIG_UNDEF_INT => Ok(true),
        other => Err(invalid_argument(format!("config blocking = {other}: must be 0 or 1"))),
    }
}

/// Adds rank `rank` to the clique of `serial`, returning its new handle; fails the whole clique where NCCL would
/// fail every rank.
fn join(world: &mut World, serial: u64, nranks: usize, rank: usize, blocking: bool) -> Result<usize, Failure> {
    let device = current_device().unwrap_or(0);
    let clique = world.cliques.entry(serial).or_insert_with(|| Clique {
        nranks,
        members: vec![None; nranks],
        gone: vec![None; nranks],
        failure: None,
        mailboxes: HashMap::new(),
    });
    let refuse = |clique: &mut Clique, message: String| {
        let failed = invalid_usage(message);
        clique.failure.get_or_insert_with(|| failed.clone());
        Err(failed)
    };
    if clique.nranks != nranks {
        let message = format!("rank {rank} joins with nranks {nranks}, another rank with {}", clique.nranks);
        return refuse(clique, message);
    }
    if clique.members[rank].is_some() || clique.gone[rank].is_some() {
        return refuse(clique, format!("rank {rank} joined this communicator twice (one unique id per communicator)"));
    }
    if let Some(other) = clique.members.iter().position(|m| m.is_some_and(|(_, d)| d == device)) {
        let message = format!(
            "Duplicate GPU detected: rank {rank} and rank {other} both on CUDA device {device} (one device per rank; \
             the emulator has as many as SWITCHYARD_CUDA_EMULATOR_DEVICES says)"
        );
        return refuse(clique, message);
    }
    let handle = new_handle();
    clique.members[rank] = Some((handle, device));
    world
        .comms
        .insert(handle, Comm { clique: serial, rank, nranks, device, blocking, pending: Vec::new(), error: None });
    CHANGED.notify_all();
    Ok(handle)
}

/// Where a communicator stands: done, in progress (joining or receiving), or failed (sticky).
fn poll(world: &mut World, handle: usize) -> Result<bool, Failure> {
    let comm = world.comms.get_mut(&handle).ok_or_else(|| invalid_argument("the communicator is gone"))?;
    if let Some(error) = &comm.error {
        return Err(error.clone());
    }
    let clique = world.cliques.get_mut(&comm.clique).ok_or_else(|| failure(result::INTERNAL_ERROR, "no clique"))?;
    let outcome = progress(comm, clique);
    if let Err(error) = &outcome {
        eprintln!(
            "switchyard-cuda-emulator: NCCL rank {} of {} failed: {} ({})",
            comm.rank,
            comm.nranks,
            error.message,
            result_name(error.result)
        );
        comm.error = Some(error.clone());
    }
    outcome
}

/// Moves the messages that arrived into `comm`'s receives; true once nothing is pending.
fn progress(comm: &mut Comm, clique: &mut Clique) -> Result<bool, Failure> {
    if let Some(error) = &clique.failure {
        return Err(error.clone());
    }
    if !clique.complete() {
        if let Some(left) = clique.gone.iter().position(Option::is_some) {
            return Err(failure(
                result::REMOTE_ERROR,
                format!("rank {left} left ({}) before every rank joined", clique.gone[left].unwrap_or("gone")),
            ));
        }
        return Ok(false);
    }
    let me = comm.rank;
    let mut blocked: Vec<usize> = Vec::new();
    let mut index = 0;
    while index < comm.pending.len() {
        let receive = comm.pending[index];
        if blocked.contains(&receive.peer) {
            index += 1;
            continue;
        }
        match clique.mailboxes.get_mut(&(receive.peer, me)).and_then(VecDeque::pop_front) {
            Some(message) => {
                if message.len() != receive.bytes {
                    return Err(invalid_usage(format!(
                        "rank {me} posted a receive of {} bytes from rank {}, which sent {} bytes: the counts of \
                         matching ncclSend and ncclRecv must be equal",
                        receive.bytes,
                        receive.peer,
                        message.len()
                    )));
                }
                if !message.is_empty() {
                    check_range(receive.buffer, message.len(), "recvbuff")
                        .map_err(|e| failure(result::UNHANDLED_CUDA_ERROR, e.message))?;
                    // SAFETY: the receive buffer lies inside one live device allocation (host memory) of at least
                    // this many bytes, checked just now; the message is a separate host vector.
                    unsafe {
                        std::ptr::copy_nonoverlapping(message.as_ptr(), receive.buffer as *mut u8, message.len());
                    }
                }
                comm.pending.remove(index);
            }
            None => {
                if let Some(why) = clique.gone[receive.peer] {
                    return Err(failure(
                        result::REMOTE_ERROR,
                        format!(
                            "rank {} left the communicator ({why}) while rank {me} awaited {} bytes from it",
                            receive.peer, receive.bytes
                        ),
                    ));
                }
                blocked.push(receive.peer);
                index += 1;
            }
        }
    }
    Ok(comm.pending.is_empty())
}

/// Waits (blocking calls) until `handles` are all done or one failed, at most [`blocking_wait_limit`]; gives the
/// lock back.
fn wait_done(mut guard: WorldGuard, handles: &[usize], what: &str) -> (WorldGuard, Result<(), Failure>) {
    let deadline = Instant::now() + blocking_wait_limit();
    loop {
        let mut done = true;
        for &handle in handles {
            match poll(state(&mut guard), handle) {
                Ok(finished) => done &= finished,
                Err(error) => return (guard, Err(error)),
            }
        }
        if done {
            return (guard, Ok(()));
        }
        let now = Instant::now();
        if now < deadline {
            guard = CHANGED.wait_timeout(guard, deadline - now).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        } else {
            let timeout = failure(
                result::SYSTEM_ERROR,
                format!(
                    "a blocking {what} waited {:.1} s for its peers, who never came (NCCL would wait forever)",
                    blocking_wait_limit().as_secs_f64()
                ),
            );
            for &handle in handles {
                if let Some(comm) = state(&mut guard).comms.get_mut(&handle) {
                    comm.error.get_or_insert_with(|| timeout.clone());
                }
            }
            return (guard, Err(timeout));
        }
    }
}

/// ncclCommInitRankConfig: joins rank `rank` of `nranks` of the communicator of `id` (see the module docs).
///
/// # Safety
/// `comm` must be valid for a write; `config` null or a valid `ncclConfig_t`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut ncclComm_t,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
    config: *mut ncclConfigHead,
) -> ncclResult_t {
    guard("ncclCommInitRankConfig", || {
        if comm.is_null() {
            return Err(invalid_argument("comm is a null pointer"));
        }
        // SAFETY: the caller's contract.
        unsafe { comm.write(std::ptr::null_mut()) };
        let nranks = usize::try_from(nranks)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid_argument(format!("nranks {nranks}: a communicator has at least one rank")))?;
        let rank = usize::try_from(rank)
            .ok()
            .filter(|&r| r < nranks)
            .ok_or_else(|| invalid_argument(format!("rank {rank} is not in 0..{nranks}")))?;
        // SAFETY: the caller's contract.
        let blocking = unsafe { blocking(config) }?;
        let serial = id_serial(&id)?;
        let mut guard = world();
        let handle = join(state(&mut guard), serial, nranks, rank, blocking)?;
        // SAFETY: the caller's contract.
        unsafe { comm.write(handle as ncclComm_t) };
        if !blocking {
            return Ok(result::IN_PROGRESS);
        }
        let (mut guard, joined) = wait_done(guard, &[handle], "ncclCommInitRank");
        match joined {
            Ok(()) => Ok(result::SUCCESS),
            Err(error) => {
                leave(state(&mut guard), handle, "its blocking ncclCommInitRank failed");
                // SAFETY: the caller's contract.
                unsafe { comm.write(std::ptr::null_mut()) };
                Err(error)
            }
        }
    })
}

/// ncclCommInitRank: [`ncclCommInitRankConfig`] with the default (blocking) config.
///
/// # Safety
/// `comm` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    // SAFETY: the same contract; a null config is the default one.
    unsafe { ncclCommInitRankConfig(comm, nranks, id, rank, std::ptr::null_mut()) }
}

/// ncclCommGetAsyncError: the communicator's state (see the module docs); moves arrived messages first.
///
/// # Safety
/// `async_error` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(comm: ncclComm_t, async_error: *mut ncclResult_t) -> ncclResult_t {
    let mut detail = None;
    let returned = guard("ncclCommGetAsyncError", || {
        if async_error.is_null() {
            return Err(invalid_argument("asyncError is a null pointer"));
        }
        let mut guard = world();
        let world = state(&mut guard);
        comm_mut(world, comm)?;
        let state = match poll(world, comm as usize) {
            Ok(true) => result::SUCCESS,
            Ok(false) => result::IN_PROGRESS,
            Err(error) => {
                let code = error.result;
                detail = Some(error);
                code
            }
        };
        // SAFETY: non-null, the caller's contract.
        unsafe { async_error.write(state) };
        Ok(result::SUCCESS)
    });
    // The asynchronous error's detail is what the caller's next ncclGetLastError should say.
    if let Some(error) = detail {
        LAST_ERROR.with(|last| *last.borrow_mut() = CString::new(error.message.replace('\0', " ")).unwrap_or_default());
    }
    returned
}

/// Takes rank's communicator `handle` out: its receives end, its peers learn `why` when they await it.
fn leave(world: &mut World, handle: usize, why: &'static str) {
    if let Some(comm) = world.comms.remove(&handle) {
        if let Some(clique) = world.cliques.get_mut(&comm.clique) {
            clique.gone[comm.rank] = Some(why);
            clique.mailboxes.retain(|&(_, destination), _| destination != comm.rank);
            if clique.gone.iter().zip(&clique.members).all(|(gone, member)| gone.is_some() || member.is_none()) {
                // Nobody is left to read the rest; the clique stays, so that its id cannot be joined again.
                clique.mailboxes.clear();
            }
        }
    }
    CHANGED.notify_all();
}

/// A rank leaving through `function` (`ncclCommAbort`, `ncclCommDestroy`); a null communicator is no error, as in
/// NCCL.
fn leave_through(function: &'static str, comm: ncclComm_t) -> ncclResult_t {
    guard(function, || {
        if comm.is_null() {
            return Ok(result::SUCCESS);
        }
        let mut guard = world();
        comm_mut(state(&mut guard), comm)?;
        leave(state(&mut guard), comm as usize, function);
        Ok(result::SUCCESS)
    })
}

/// ncclCommAbort: frees the communicator at once, ending its operations; peers awaiting it fail (module docs).
#[no_mangle]
pub extern "C" fn ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    leave_through("ncclCommAbort", comm)
}

/// ncclCommDestroy: frees the communicator (as [`ncclCommAbort`], peers awaiting it fail).
#[no_mangle]
pub extern "C" fn ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    leave_through("ncclCommDestroy", comm)
}

/// ncclCommFinalize: completes the communicator's receives (blocking: waits; non-blocking: `ncclInProgress`, then
/// `ncclCommGetAsyncError`).
#[no_mangle]
pub extern "C" fn ncclCommFinalize(comm: ncclComm_t) -> ncclResult_t {
    guard("ncclCommFinalize", || {
        let mut guard = world();
        let blocking = comm_mut(state(&mut guard), comm)?.blocking;
        if blocking {
            wait_done(guard, &[comm as usize], "ncclCommFinalize").1.map(|()| result::SUCCESS)
        } else {
            poll(state(&mut guard), comm as usize).map(|done| if done { result::SUCCESS } else { result::IN_PROGRESS })
        }
    })
}

/// ncclCommCount: the communicator's number of ranks.
///
/// # Safety
/// `count` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCount(comm: ncclComm_t, count: *mut c_int) -> ncclResult_t {
    guard("ncclCommCount", || {
        let nranks = comm_mut(state(&mut world()), comm)?.nranks as c_int;
        // SAFETY: the caller's contract.
        unsafe { write_out(count, "count", nranks) }.map(|()| result::SUCCESS)
    })
}

/// ncclCommUserRank: this communicator's rank.
///
/// # Safety
/// `rank` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ncclCommUserRank(comm: ncclComm_t, rank: *mut c_int) -> ncclResult_t {
    guard("ncclCommUserRank", || {
        let own = comm_mut(state(&mut world()), comm)?.rank as c_int;
        // SAFETY: the caller's contract.
        unsafe { write_out(rank, "rank", own) }.map(|()| result::SUCCESS)
    })
}

/// ncclCommCuDevice: the device the rank joined with.
///
/// # Safety
/// `device` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCuDevice(comm: ncclComm_t, device: *mut c_int) -> ncclResult_t {
    guard("ncclCommCuDevice", || {
        let own = comm_mut(state(&mut world()), comm)?.device;
        // SAFETY: the caller's contract.
        unsafe { write_out(device, "device", own) }.map(|()| result::SUCCESS)
    })
}

// ---- exported: groups, send, receive ----------------------------------------------------------------------------

/// A send or receive waiting for its group's end.
#[derive(Debug, Clone, Copy)]
struct Operation {
    comm: usize,
    send: bool,
    peer: usize,
    buffer: u64,
    bytes: usize,
}

/// This thread's open group (NCCL's group state is per thread).
#[derive(Default)]
struct Group {
    depth: usize,
    operations: Vec<Operation>,
    /// The first error of a call inside the group: the group's `ncclGroupEnd` fails with it.
    error: Option<Failure>,
}

thread_local! {
    static GROUP: RefCell<Group> = RefCell::new(Group::default());
}

/// Bytes of one element of `datatype`.
fn element_bytes(datatype: ncclDataType_t) -> Result<usize, Failure> {
    Ok(match datatype {
        0 | 1 | 10 | 11 => 1, // ncclInt8, ncclUint8, ncclFloat8e4m3, ncclFloat8e5m2
        6 | 9 => 2,           // ncclFloat16, ncclBfloat16
        2 | 3 | 7 => 4,       // ncclInt32, ncclUint32, ncclFloat32
        4 | 5 | 8 => 8,       // ncclInt64, ncclUint64, ncclFloat64
        other => return Err(invalid_argument(format!("datatype {other} is not an NCCL data type"))),
    })
}

/// Checks one send or receive as NCCL does at the call.
fn check_operation(
    op: &str,
    buffer: u64,
    count: usize,
    datatype: ncclDataType_t,
    peer: c_int,
    comm: ncclComm_t,
    stream: CUstream,
) -> Result<Operation, Failure> {
    let bytes = count
        .checked_mul(element_bytes(datatype)?)
        .ok_or_else(|| invalid_argument(format!("count {count} overflows a byte count")))?;
    let mut guard = world();
    let found = comm_mut(state(&mut guard), comm)?;
    let peer = usize::try_from(peer).ok().filter(|&p| p < found.nranks).ok_or_else(|| {
        invalid_argument(format!("peer {peer} is not a rank of this communicator (0..{})", found.nranks))
    })?;
    let what = if op == "ncclSend" { "sendbuff" } else { "recvbuff" };
    if bytes > 0 {
        check_range(buffer, bytes, what).map_err(|e| invalid_argument(e.message))?;
    }
    if !is_live_stream(stream) {
        return Err(failure(
            result::UNHANDLED_CUDA_ERROR,
            format!("stream {stream:?} was never created or is destroyed"),
        ));
    }
    Ok(Operation { comm: comm as usize, send: op == "ncclSend", peer, buffer, bytes })
}

/// Queues `operation` in this thread's group, or runs it at once outside a group.
fn submit(operation: Result<Operation, Failure>) -> Result<ncclResult_t, Failure> {
    let in_group = GROUP.with(|group| group.borrow().depth > 0);
    if !in_group {
        return run_group(vec![operation?]);
    }
    GROUP.with(|group| {
        let mut group = group.borrow_mut();
        match operation {
            Ok(operation) => {
                group.operations.push(operation);
                Ok(result::SUCCESS)
            }
            Err(error) => {
                group.error.get_or_insert_with(|| error.clone());
                Err(error)
            }
        }
    })
}

/// ncclSend: `count` elements of `datatype` at device address `sendbuff` to `peer` (see the module docs).
#[no_mangle]
pub extern "C" fn ncclSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: ncclDataType_t,
    peer: c_int,
    comm: ncclComm_t,
    stream: CUstream,
) -> ncclResult_t {
    guard("ncclSend", || submit(check_operation("ncclSend", sendbuff as u64, count, datatype, peer, comm, stream)))
}

/// ncclRecv: `count` elements of `datatype` from `peer` into device address `recvbuff` (see the module docs).
#[no_mangle]
pub extern "C" fn ncclRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: ncclDataType_t,
    peer: c_int,
    comm: ncclComm_t,
    stream: CUstream,
) -> ncclResult_t {
    guard("ncclRecv", || submit(check_operation("ncclRecv", recvbuff as u64, count, datatype, peer, comm, stream)))
}

/// ncclGroupStart: opens (or nests) this thread's group.
#[no_mangle]
pub extern "C" fn ncclGroupStart() -> ncclResult_t {
    GROUP.with(|group| group.borrow_mut().depth += 1);
    result::SUCCESS
}

/// ncclGroupEnd: closes this thread's group; the outermost end runs its operations (see the module docs).
#[no_mangle]
pub extern "C" fn ncclGroupEnd() -> ncclResult_t {
    guard("ncclGroupEnd", || {
        let taken = GROUP.with(|group| {
            let mut group = group.borrow_mut();
            if group.depth == 0 {
                return Err(invalid_usage("ncclGroupEnd without ncclGroupStart"));
            }
            group.depth -= 1;
            if group.depth > 0 {
                return Ok(None);
            }
            Ok(Some((std::mem::take(&mut group.operations), group.error.take())))
        })?;
        match taken {
            None => Ok(result::SUCCESS),
            Some((_, Some(error))) => Err(error),
            Some((operations, None)) => run_group(operations),
        }
    })
}

/// Runs one group: every send into its mailbox, then the receives as far as the messages allow.
fn run_group(operations: Vec<Operation>) -> Result<ncclResult_t, Failure> {
    if operations.is_empty() {
        return Ok(result::SUCCESS);
    }
    let mut guard = world();
    let world = state(&mut guard);
    let mut handles: Vec<usize> = Vec::new();
    for operation in &operations {
        if !handles.contains(&operation.comm) {
            handles.push(operation.comm);
        }
    }
    let mut blocking = None;
    for &handle in &handles {
        let comm = comm_mut(world, handle as ncclComm_t)?;
        if let Some(error) = &comm.error {
            return Err(error.clone());
        }
        if *blocking.get_or_insert(comm.blocking) != comm.blocking {
            return Err(invalid_argument("a group mixes blocking and non-blocking communicators"));
        }
        let (rank, clique, pending) = (comm.rank, comm.clique, !comm.pending.is_empty());
        let complete = world.cliques.get(&clique).is_some_and(Clique::complete);
        if !complete {
            return Err(invalid_usage(format!(
                "rank {rank}'s communicator has not finished joining (poll ncclCommGetAsyncError until ncclSuccess)"
            )));
        }
        if pending {
            return Err(invalid_usage(format!(
                "rank {rank}'s previous group is still in progress (poll ncclCommGetAsyncError until ncclSuccess)"
            )));
        }
    }
    for operation in &operations {
        let comm = comm_mut(world, operation.comm as ncclComm_t)?;
        if !operation.send {
            comm.pending.push(PendingReceive {
                peer: operation.peer,
                buffer: operation.buffer,
                bytes: operation.bytes,
            });
            continue;
        }
        let (rank, clique) = (comm.rank, comm.clique);
        let mut message = Vec::new();
        if operation.bytes > 0 {
            check_range(operation.buffer, operation.bytes, "sendbuff").map_err(|e| invalid_argument(e.message))?;
            // SAFETY: the range lies inside one live device allocation (host memory), checked just now.
            message = unsafe { std::slice::from_raw_parts(operation.buffer as *const u8, operation.bytes) }.to_vec();
        }
        if let Some(clique) = world.cliques.get_mut(&clique) {
            if clique.gone[operation.peer].is_none() {
                clique.mailboxes.entry((rank, operation.peer)).or_default().push_back(message);
            }
        }
    }
    CHANGED.notify_all();
    if blocking == Some(true) {
        return wait_done(guard, &handles, "ncclGroupEnd").1.map(|()| result::SUCCESS);
    }
    let mut done = true;
    for &handle in &handles {
        done &= poll(state(&mut guard), handle)?;
    }
    Ok(if done { result::SUCCESS } else { result::IN_PROGRESS })
}
