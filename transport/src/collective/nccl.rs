//! [`NcclCollective`] (feature `cuda`): the exchanges as NCCL grouped `ncclSend`/`ncclRecv` between GPU ranks.
//!
//! Through cudarc's raw NCCL bindings rather than its safe `Comm`: the safe type can neither be made non-blocking nor
//! polled for asynchronous errors, and it panics when aborting fails. The communicator is created non-blocking
//! (`ncclConfig_t.blocking = 0`), so that joining it and every exchange can be given up at a deadline:
//! this rank polls `ncclCommGetAsyncError` and a CUDA event, and on a deadline, an abort or an NCCL error calls
//! `ncclCommAbort`, which ends the operations in flight on this rank. NCCL does not tell the peers; they fail at their
//! own deadline (see `docs/nccl.md`).
//!
//! Buffers are device memory: each send is copied to the GPU, each receive allocated there and copied back once the
//! group completed. NCCL has no FP8 type: everything is sent as `ncclUint8` bytes. A rank sends to itself through
//! NCCL too (a grouped send/recv pair), which is what lets one rank run the whole path on a single GPU.
//!
//! cudarc panics when a library it needs is missing, so `libcuda` and `libnccl` are looked for before anything else
//! ([`CollectiveError::Unavailable`]).

use std::ffi::{c_char, c_int, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::sys;

use super::{AbortFlag, CollectiveError, Lockstep, PointToPoint, POLL};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`): what rank 0 publishes through the coordinator.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// `NCCL_VERSION(2, 28, 0)`: the `ncclConfig_t` version this code fills in. NCCL reads the fields a version has and
/// ignores the rest, so 2.28 (the target machines' NCCL) and later accept it.
const CONFIG_VERSION: u32 = 22800;
/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default".
const UNDEF: c_int = i32::MIN;
/// `NCCL_CONFIG_INITIALIZER`'s magic.
const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// Looks for the libraries before cudarc touches them (it panics on a missing one).
fn check_libraries() -> Result<(), CollectiveError> {
    // SAFETY: `is_culib_present` only tries to dlopen the library's candidate file names.
    let (driver, nccl) = unsafe { (cudarc::driver::sys::is_culib_present(), sys::is_culib_present()) };
    if !driver {
        return Err(CollectiveError::Unavailable { reason: "libcuda (the NVIDIA driver) was not found".into() });
    }
    if !nccl {
        return Err(CollectiveError::Unavailable {
            reason: "libnccl was not found (NCCL 2.28 or later must be installed where the loader finds it)".into(),
        });
    }
    Ok(())
}

fn driver_error(op: &'static str) -> impl Fn(DriverError) -> CollectiveError {
    move |error| CollectiveError::Nccl { op, reason: error.to_string() }
}

/// An NCCL result as an error: its name, NCCL's text for it, and the communicator's last error if there is one.
fn nccl_error(op: &'static str, result: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> CollectiveError {
    let text = |pointer: *const c_char| {
        if pointer.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated static or per-thread strings that outlive this call.
            unsafe { CStr::from_ptr(pointer) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: plain queries; `comm` is a live communicator where given.
    let general = text(unsafe { sys::ncclGetErrorString(result) });
    let last = comm.map(|comm| text(unsafe { sys::ncclGetLastError(comm) })).unwrap_or_default();
    let reason =
        if last.is_empty() { format!("{result:?}: {general}") } else { format!("{result:?}: {general}: {last}") };
    CollectiveError::Nccl { op, reason }
}

/// The non-blocking configuration (`NCCL_CONFIG_INITIALIZER` with `blocking = 0`).
fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// One rank's NCCL communicator and the stream its operations run on.
struct NcclComm {
    comm: sys::ncclComm_t,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// This rank: the peers a timeout names are the others.
    rank: usize,
    world_size: usize,
    aborted: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it run at once; `Lockstep`
// serialises every use behind its mutex, and the CUDA context is bound to the calling thread before each use.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Waits until the communicator's pending non-blocking work (joining, enqueueing a group) is done.
    fn wait_ready(
        &self,
        deadline: Option<Instant>,
        abort: &AbortFlag,
        waiting_for: &[usize],
    ) -> Result<(), CollectiveError> {
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `self.comm` is live until `abort_comm`; `state` is a valid out-pointer.
            let queried = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if queried != sys::ncclResult_t::ncclSuccess {
                return Err(nccl_error("ncclCommGetAsyncError", queried, Some(self.comm)));
            }
            match state {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => self.check_waiting(deadline, abort, waiting_for)?,
                error => return Err(nccl_error("NCCL (asynchronous)", error, Some(self.comm))),
            }
            std::thread::sleep(POLL / 10);
        }
    }

    fn check_waiting(
        &self,
        deadline: Option<Instant>,
        abort: &AbortFlag,
        waiting_for: &[usize],
    ) -> Result<(), CollectiveError> {
        abort.check()?;
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(CollectiveError::Timeout {
                exchange: 0,
                waiting_for: waiting_for.to_vec(),
                after: Duration::ZERO,
            });
        }
        Ok(())
    }

    /// Aborts the communicator once: NCCL ends this rank's operations in flight and frees the communicator.
    fn abort_comm(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the communicator is live and not used after this.
            let result = unsafe { sys::ncclCommAbort(self.comm) };
            if result != sys::ncclResult_t::ncclSuccess {
                tracing::warn!(error = %nccl_error("ncclCommAbort", result, None), "aborting the NCCL communicator");
            }
        }
    }

    /// Enqueues the group: every send and receive between `ncclGroupStart` and `ncclGroupEnd`.
    fn enqueue(
        &self,
        sends: &[(usize, CudaSlice<u8>)],
        receives: &mut [(usize, CudaSlice<u8>)],
    ) -> Result<(), CollectiveError> {
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let send_pointers: Vec<_> =
            sends.iter().map(|(peer, buffer)| (*peer, buffer.len(), buffer.device_ptr(&self.stream))).collect();
        let receive_pointers: Vec<_> = receives
            .iter_mut()
            .map(|(peer, buffer)| (*peer, buffer.len(), buffer.device_ptr_mut(&self.stream)))
            .collect();
        // SAFETY: plain NCCL calls on a live communicator; the buffers are device allocations of the stated lengths
        // on this communicator's device, and outlive the group (they are dropped only after it completed or the
        // communicator was aborted).
        unsafe {
            let started = sys::ncclGroupStart();
            if started != sys::ncclResult_t::ncclSuccess {
                return Err(nccl_error("ncclGroupStart", started, Some(self.comm)));
            }
            let mut first_error = None;
            let operations =
                send_pointers.iter().map(|(peer, length, (pointer, _))| ("ncclSend", *peer, *length, *pointer)).chain(
                    receive_pointers.iter().map(|(peer, length, (pointer, _))| ("ncclRecv", *peer, *length, *pointer)),
                );
            for (op, peer, length, pointer) in operations {
                let (peer, bytes) = (peer as c_int, sys::ncclDataType_t::ncclUint8);
                let result = if op == "ncclSend" {
                    sys::ncclSend(pointer as *const _, length, bytes, peer, self.comm, stream)
                } else {
                    sys::ncclRecv(pointer as *mut _, length, bytes, peer, self.comm, stream)
                };
                if !matches!(result, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                    first_error.get_or_insert(nccl_error(op, result, Some(self.comm)));
                }
            }
            // The group is closed even after a failed call, so that NCCL's group state is not left open.
            let ended = sys::ncclGroupEnd();
            if let Some(error) = first_error {
                return Err(error);
            }
            if !matches!(ended, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                return Err(nccl_error("ncclGroupEnd", ended, Some(self.comm)));
            }
        }
        Ok(())
    }

    fn run_group(
        &mut self,
        sends: &[(usize, &[u8])],
        receives: &[(usize, usize)],
        deadline: Option<Instant>,
        abort: &AbortFlag,
    ) -> Result<Vec<Vec<u8>>, CollectiveError> {
        if self.aborted {
            return Err(CollectiveError::Aborted { reason: "the NCCL communicator was aborted".into() });
        }
        self.context.bind_to_thread().map_err(driver_error("cuCtxSetCurrent"))?;
        let device_sends: Vec<(usize, CudaSlice<u8>)> = sends
            .iter()
            .map(|&(peer, bytes)| self.stream.clone_htod(bytes).map(|buffer| (peer, buffer)))
            .collect::<Result<_, _>>()
            .map_err(driver_error("copying a send to the GPU"))?;
        let mut device_receives: Vec<(usize, CudaSlice<u8>)> = receives
            .iter()
            .map(|&(peer, length)| self.stream.alloc_zeros::<u8>(length).map(|buffer| (peer, buffer)))
            .collect::<Result<_, _>>()
            .map_err(driver_error("allocating a receive buffer on the GPU"))?;
        // NCCL does not say which receive of a group is still pending, so a timeout names every peer but this rank.
        let waiting_for: Vec<usize> =
            receives.iter().map(|&(peer, _)| peer).filter(|&peer| peer != self.rank).collect();
        self.enqueue(&device_sends, &mut device_receives)?;
        self.wait_ready(deadline, abort, &waiting_for)?;
        let done = self.stream.record_event(None).map_err(driver_error("cuEventRecord"))?;
        loop {
            if done.try_is_complete().map_err(driver_error("cuEventQuery"))? {
                break;
            }
            self.wait_ready(deadline, abort, &waiting_for)?;
            self.check_waiting(deadline, abort, &waiting_for)?;
            std::thread::sleep(POLL / 10);
        }
        device_receives
            .iter()
            .map(|(_, buffer)| self.stream.clone_dtoh(buffer))
            .collect::<Result<_, _>>()
            .map_err(driver_error("copying a receive back from the GPU"))
    }
}

impl PointToPoint for NcclComm {
    fn grouped(
        &mut self,
        sends: &[(usize, &[u8])],
        receives: &[(usize, usize)],
        deadline: Option<Instant>,
        abort: &AbortFlag,
    ) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let result = self.run_group(sends, receives, deadline, abort);
        if result.is_err() {
            // Before the group's device buffers are freed: the abort ends the kernels that use them.
            self.abort_comm();
        }
        result
    }

    fn fail(&mut self, error: &CollectiveError) {
        tracing::warn!(error = %error, world_size = self.world_size, "aborting the NCCL communicator");
        self.abort_comm();
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.abort_comm();
    }
}

/// One rank of an NCCL communicator (see the module docs).
pub struct NcclCollective {
    lockstep: Lockstep<NcclComm>,
}

impl NcclCollective {
    /// A new NCCL unique id (`ncclGetUniqueId`), made by rank 0 and handed to the others (through the coordinator).
    pub fn unique_id() -> Result<[u8; NCCL_UNIQUE_ID_BYTES], CollectiveError> {
        check_libraries()?;
        let id = cudarc::nccl::result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e.0, None))?;
        let mut bytes = [0u8; NCCL_UNIQUE_ID_BYTES];
        for (byte, &c) in bytes.iter_mut().zip(id.internal.iter()) {
            *byte = c as u8;
        }
        Ok(bytes)
    }

    /// Joins the communicator of `unique_id` as `rank` of `world_size`, on GPU `ordinal`. Returns once every rank
    /// joined; gives up (aborting) after `join_timeout`. One rank alone (`world_size` 1) needs one GPU.
    pub fn new(
        unique_id: &[u8],
        rank: usize,
        world_size: usize,
        ordinal: usize,
        join_timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let invalid = |what: &str, reason: String| CollectiveError::InvalidArgument { what: what.into(), reason };
        if unique_id.len() != NCCL_UNIQUE_ID_BYTES {
            return Err(invalid(
                "unique_id",
                format!("{} bytes, NCCL's ids are {NCCL_UNIQUE_ID_BYTES}", unique_id.len()),
            ));
        }
        if world_size == 0 || c_int::try_from(world_size).is_err() || rank >= world_size {
            return Err(invalid("rank", format!("rank {rank} of a world of {world_size}")));
        }
        check_libraries()?;
        let count = CudaContext::device_count().map_err(|e| CollectiveError::Unavailable {
            reason: format!("the CUDA driver cannot count GPUs ({e}): is there an NVIDIA GPU?"),
        })?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(CollectiveError::Unavailable {
                reason: format!("no GPU cuda:{ordinal}: {count} GPU(s) found"),
            });
        }
        let context = CudaContext::new(ordinal).map_err(driver_error("cuCtxCreate"))?;
        context.bind_to_thread().map_err(driver_error("cuCtxSetCurrent"))?;
        let stream = context.new_stream().map_err(driver_error("cuStreamCreate"))?;
        let mut internal = [0 as c_char; NCCL_UNIQUE_ID_BYTES];
        for (c, &byte) in internal.iter_mut().zip(unique_id) {
            *c = byte as c_char;
        }
        let id = sys::ncclUniqueId { internal };
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call; sizes were checked to fit `c_int`.
        let started =
            unsafe { sys::ncclCommInitRankConfig(&mut comm, world_size as c_int, id, rank as c_int, &mut config) };
        if !matches!(started, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) || comm.is_null() {
            let error = nccl_error("ncclCommInitRankConfig", started, None);
            if !comm.is_null() {
                // SAFETY: a communicator NCCL handed out, not used after this.
                unsafe { sys::ncclCommAbort(comm) };
            }
            return Err(error);
        }
        let mut nccl = NcclComm { comm, context, stream, rank, world_size, aborted: false };
        let others: Vec<usize> = (0..world_size).filter(|&r| r != rank).collect();
        let joined = nccl.wait_ready(Some(Instant::now() + join_timeout), &AbortFlag::default(), &others);
        if let Err(error) = joined {
            nccl.abort_comm();
            return Err(match error {
                CollectiveError::Timeout { waiting_for, .. } => {
                    CollectiveError::Timeout { exchange: 0, waiting_for, after: join_timeout }
                }
                other => other,
            });
        }
        tracing::info!(rank, world_size, ordinal, "joined the NCCL communicator");
        Ok(NcclCollective { lockstep: Lockstep::new(nccl, rank, world_size) })
    }
}

super::forward_collective!(NcclCollective);
