//! The emulated NCCL as `NcclCollective` uses it, and where NCCL refuses: unique ids, joining (blocking and not, one
//! device per rank), grouped sends and receives (eager sends, per-peer FIFO receives, zero-byte messages, data type
//! sizes, byte counts that must match), the non-blocking polling, errors at the call and sticky asynchronous errors,
//! and aborts that fail the peers awaiting the aborted rank. Ranks are threads, each with its own device.

mod driver_support;

use std::ffi::{c_int, c_void, CStr};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use driver_support::{download, free, ok, upload};
use switchyard_cuda_emulator::driver::{
    cuCtxGetDevice, cuCtxSetCurrent, cuDeviceGetCount, cuDevicePrimaryCtxRetain, cuInit, set_device_count, CUcontext,
};
use switchyard_cuda_emulator::nccl::*;

/// Devices every test here may use (the count only ever grows, so tests running at once agree).
const DEVICES: usize = 4;
/// ncclUint8, ncclFloat32, ncclBfloat16
const UINT8: ncclDataType_t = 1;
const FLOAT32: ncclDataType_t = 7;
const BFLOAT16: ncclDataType_t = 9;

#[track_caller]
fn is(got: ncclResult_t, want: ncclResult_t) {
    assert_eq!(got, want, "expected {}, got {}: {}", result_name(want), result_name(got), last_error());
}

fn last_error() -> String {
    // SAFETY: a NUL-terminated string that lives until this thread's next error.
    unsafe { CStr::from_ptr(ncclGetLastError(null_mut())) }.to_string_lossy().into_owned()
}

/// Makes device `device`'s primary context current on this thread, as cudarc's `bind_to_thread` does.
fn on_device(device: c_int) {
    ok(cuInit(0));
    set_device_count(DEVICES).expect("the emulator has up to 16 devices");
    let mut context: CUcontext = null_mut();
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuDevicePrimaryCtxRetain(&mut context, device) });
    ok(cuCtxSetCurrent(context));
}

fn unique_id() -> ncclUniqueId {
    let mut id = ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: a valid out-pointer.
    is(unsafe { ncclGetUniqueId(&mut id) }, result::SUCCESS);
    id
}

/// `NcclCollective`'s config: `NCCL_CONFIG_INITIALIZER` with `blocking` as given.
fn config(blocking: c_int) -> ncclConfigHead {
    ncclConfigHead { size: 96, magic: CONFIG_MAGIC, version: 22800, blocking }
}

/// Starts joining as `rank` of `nranks` on `device` (non-blocking): the handle.
fn start_join(id: ncclUniqueId, nranks: c_int, rank: c_int, device: c_int) -> ncclComm_t {
    on_device(device);
    let mut comm: ncclComm_t = null_mut();
    let mut config = config(0);
    // SAFETY: valid out-pointer and config.
    is(unsafe { ncclCommInitRankConfig(&mut comm, nranks, id, rank, &mut config) }, result::IN_PROGRESS);
    assert!(!comm.is_null());
    comm
}

fn state(comm: ncclComm_t) -> ncclResult_t {
    let mut state = result::INTERNAL_ERROR;
    // SAFETY: a valid out-pointer.
    is(unsafe { ncclCommGetAsyncError(comm, &mut state) }, result::SUCCESS);
    state
}

/// Polls `comm` until it is no longer in progress (at most 10 s): its final state.
fn settle(comm: ncclComm_t) -> ncclResult_t {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = state(comm);
        if now != result::IN_PROGRESS {
            return now;
        }
        assert!(Instant::now() < deadline, "still in progress after 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `nranks` ranks joined non-blocking, rank r on device r, each joined from its own thread; the handles by rank.
fn joined(nranks: usize) -> Vec<usize> {
    let id = unique_id();
    std::thread::scope(|scope| {
        let joining: Vec<_> = (0..nranks)
            .map(|rank| {
                scope.spawn(move || {
                    let comm = start_join(id, nranks as c_int, rank as c_int, rank as c_int);
                    is(settle(comm), result::SUCCESS);
                    comm as usize
                })
            })
            .collect();
        joining.into_iter().map(|j| j.join().expect("a joining rank panicked")).collect()
    })
}

/// One group on this thread: each (send?, peer, buffer, count, datatype).
fn group(comm: ncclComm_t, operations: &[(bool, c_int, u64, usize, ncclDataType_t)]) -> ncclResult_t {
    is(ncclGroupStart(), result::SUCCESS);
    for &(send, peer, buffer, count, datatype) in operations {
        let issued = if send {
            ncclSend(buffer as *const c_void, count, datatype, peer, comm, null_mut())
        } else {
            ncclRecv(buffer as *mut c_void, count, datatype, peer, comm, null_mut())
        };
        is(issued, result::SUCCESS);
    }
    ncclGroupEnd()
}

#[test]
fn the_result_codes_and_texts_are_nccls() {
    use cudarc::nccl::sys::ncclResult_t as R;
    for (ours, theirs) in [
        (result::SUCCESS, R::ncclSuccess),
        (result::UNHANDLED_CUDA_ERROR, R::ncclUnhandledCudaError),
        (result::SYSTEM_ERROR, R::ncclSystemError),
        (result::INTERNAL_ERROR, R::ncclInternalError),
        (result::INVALID_ARGUMENT, R::ncclInvalidArgument),
        (result::INVALID_USAGE, R::ncclInvalidUsage),
        (result::REMOTE_ERROR, R::ncclRemoteError),
        (result::IN_PROGRESS, R::ncclInProgress),
    ] {
        assert_eq!(ours, theirs as u32);
        assert_eq!(result_name(ours), format!("{theirs:?}"));
    }
    assert_eq!(std::mem::size_of::<ncclUniqueId>(), std::mem::size_of::<cudarc::nccl::sys::ncclUniqueId>());
    // SAFETY: static NUL-terminated strings.
    let text = |r| unsafe { CStr::from_ptr(ncclGetErrorString(r)) }.to_string_lossy().into_owned();
    assert_eq!(text(result::REMOTE_ERROR), "remote process exited or there was a network error");
    assert_eq!(text(result::IN_PROGRESS), "NCCL operation in progress");
    let mut version = 0;
    // SAFETY: a valid out-pointer.
    is(unsafe { ncclGetVersion(&mut version) }, result::SUCCESS);
    assert!(version >= 22800, "{version}");
}

#[test]
fn unique_ids_differ_and_foreign_ones_are_refused() {
    let (a, b) = (unique_id(), unique_id());
    assert_ne!(a.internal, b.internal);
    on_device(0);
    let mut comm: ncclComm_t = null_mut();
    let mut foreign = a;
    foreign.internal[8] = foreign.internal[8].wrapping_add(100);
    // SAFETY: a valid out-pointer; no config.
    is(unsafe { ncclCommInitRank(&mut comm, 1, foreign, 0) }, result::INVALID_ARGUMENT);
    assert!(comm.is_null());
    assert!(last_error().contains("not made by ncclGetUniqueId"), "{}", last_error());
    // SAFETY: as above.
    is(unsafe { ncclCommInitRank(&mut comm, 2, a, 2) }, result::INVALID_ARGUMENT);
    let mut bad = config(0);
    bad.magic = 0;
    // SAFETY: as above, with a config.
    is(unsafe { ncclCommInitRankConfig(&mut comm, 1, a, 0, &mut bad) }, result::INVALID_ARGUMENT);
    assert!(last_error().contains("NCCL_CONFIG_INITIALIZER"), "{}", last_error());
}

#[test]
fn devices_are_several_with_a_context_each() {
    on_device(2);
    let (mut count, mut device) = (0, -1);
    // SAFETY: valid out-pointers.
    unsafe {
        ok(cuDeviceGetCount(&mut count));
        ok(cuCtxGetDevice(&mut device));
    }
    assert!(count >= DEVICES as c_int, "{count}");
    assert_eq!(device, 2);
    assert!(set_device_count(17).is_err());
}

#[test]
fn a_non_blocking_join_is_in_progress_until_every_rank_joined() {
    let id = unique_id();
    let first = start_join(id, 2, 1, 1);
    for _ in 0..3 {
        assert_eq!(state(first), result::IN_PROGRESS);
    }
    // Operations wait for the join to finish, as NCCL requires.
    let buffer = upload(&[1u8; 4]);
    is(ncclSend(buffer as *const c_void, 4, UINT8, 0, first, null_mut()), result::INVALID_USAGE);
    assert!(last_error().contains("not finished joining"), "{}", last_error());
    let second = std::thread::spawn(move || {
        let comm = start_join(id, 2, 0, 0);
        (settle(comm), comm as usize)
    })
    .join()
    .expect("rank 0 joins");
    assert_eq!(second.0, result::SUCCESS);
    assert_eq!(settle(first), result::SUCCESS);
    let (mut count, mut rank, mut device) = (0, -1, -1);
    // SAFETY: valid out-pointers.
    unsafe {
        is(ncclCommCount(first, &mut count), result::SUCCESS);
        is(ncclCommUserRank(first, &mut rank), result::SUCCESS);
        is(ncclCommCuDevice(first, &mut device), result::SUCCESS);
    }
    assert_eq!((count, rank, device), (2, 1, 1));
    is(ncclCommAbort(first), result::SUCCESS);
    is(ncclCommAbort(second.1 as ncclComm_t), result::SUCCESS);
    // An aborted handle is gone; aborting nothing is fine.
    let mut state = 0;
    // SAFETY: a valid out-pointer.
    is(unsafe { ncclCommGetAsyncError(first, &mut state) }, result::INVALID_ARGUMENT);
    is(ncclCommAbort(null_mut()), result::SUCCESS);
    free(buffer);
}

#[test]
fn two_ranks_on_one_device_fail_the_communicator_on_both() {
    let id = unique_id();
    let first = start_join(id, 3, 0, 3);
    on_device(3);
    let mut second: ncclComm_t = null_mut();
    let mut config = config(0);
    // SAFETY: valid out-pointer and config.
    is(unsafe { ncclCommInitRankConfig(&mut second, 3, id, 1, &mut config) }, result::INVALID_USAGE);
    assert!(last_error().contains("Duplicate GPU"), "{}", last_error());
    assert_eq!(settle(first), result::INVALID_USAGE);
    assert!(last_error().contains("Duplicate GPU"), "{}", last_error());
    is(ncclCommAbort(first), result::SUCCESS);
}

#[test]
fn one_rank_sends_to_itself_in_a_group() {
    let comm = joined(1)[0] as ncclComm_t;
    on_device(0);
    let source: Vec<f32> = (0..33).map(|i| i as f32 * 0.5).collect();
    let (send, receive) = (upload(&source), upload(&[0f32; 33]));
    is(group(comm, &[(true, 0, send, 33, FLOAT32), (false, 0, receive, 33, FLOAT32)]), result::SUCCESS);
    assert_eq!(state(comm), result::SUCCESS);
    assert_eq!(download::<f32>(receive, 33), source);
    is(ncclCommDestroy(comm), result::SUCCESS);
    free(send);
    free(receive);
}

#[test]
fn receives_take_each_peers_messages_in_order_and_sizes_must_match() {
    let comms = joined(3);
    let results: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(rank, &comm)| {
                scope.spawn(move || {
                    on_device(rank as c_int);
                    let comm = comm as ncclComm_t;
                    // Two messages to every peer (the first empty for odd destinations), then the receives.
                    let message = |from: usize, to: usize, k: usize| -> Vec<u8> {
                        vec![(from * 16 + to * 4 + k) as u8; if k == 0 && to % 2 == 1 { 0 } else { 3 + from + k }]
                    };
                    let mut operations = Vec::new();
                    let mut buffers = Vec::new();
                    for k in 0..2 {
                        for to in 0..3 {
                            let bytes = message(rank, to, k);
                            let buffer = upload(&bytes);
                            buffers.push(buffer);
                            operations.push((true, to as c_int, buffer, bytes.len(), UINT8));
                        }
                    }
                    let mut receives = Vec::new();
                    for k in 0..2 {
                        for from in 0..3 {
                            let len = message(from, rank, k).len();
                            let buffer = upload(&vec![0xEEu8; len]);
                            receives.push((buffer, len));
                            operations.push((false, from as c_int, buffer, len, UINT8));
                        }
                    }
                    let ended = group(comm, &operations);
                    assert!(ended == result::SUCCESS || ended == result::IN_PROGRESS, "{}", result_name(ended));
                    is(settle(comm), result::SUCCESS);
                    let got: Vec<Vec<u8>> = receives.iter().map(|&(b, len)| download::<u8>(b, len)).collect();
                    let expected: Vec<Vec<u8>> = (0..2)
                        .flat_map(|k| (0..3).map(move |from| (from, k)))
                        .map(|(f, k)| message(f, rank, k))
                        .collect();
                    assert_eq!(got, expected, "rank {rank}");
                    buffers.iter().chain(receives.iter().map(|(b, _)| b)).for_each(|&b| free(b));
                    got
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().expect("a rank panicked")).collect()
    });
    assert_eq!(results.len(), 3);
    // A receive of another size than the message fails the receiver, naming both counts; bf16 counts elements.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            on_device(1);
            let send = upload(&[7u16; 5]);
            is(group(comms[1] as ncclComm_t, &[(true, 0, send, 5, BFLOAT16)]), result::SUCCESS);
            free(send);
        });
    });
    on_device(0);
    let receive = upload(&[0u8; 12]);
    let ended = group(comms[0] as ncclComm_t, &[(false, 1, receive, 12, UINT8)]);
    let failed = if ended == result::IN_PROGRESS { settle(comms[0] as ncclComm_t) } else { ended };
    is(failed, result::INVALID_USAGE);
    assert!(last_error().contains("receive of 12 bytes from rank 1, which sent 10 bytes"), "{}", last_error());
    // Sticky: the next group fails with the same error.
    is(group(comms[0] as ncclComm_t, &[]), result::SUCCESS);
    let buffer = upload(&[0u8; 1]);
    is(ncclGroupStart(), result::SUCCESS);
    is(ncclSend(buffer as *const c_void, 1, UINT8, 0, comms[0] as ncclComm_t, null_mut()), result::SUCCESS);
    is(ncclGroupEnd(), result::INVALID_USAGE);
    free(receive);
    free(buffer);
    comms.iter().for_each(|&c| is(ncclCommAbort(c as ncclComm_t), result::SUCCESS));
}

#[test]
fn bad_calls_fail_at_the_call_and_fail_their_group() {
    let comm = joined(1)[0] as ncclComm_t;
    on_device(0);
    let buffer = upload(&[0u8; 8]);
    let host = [0u8; 8];
    is(ncclGroupStart(), result::SUCCESS);
    is(ncclSend(buffer as *const c_void, 8, UINT8, 1, comm, null_mut()), result::INVALID_ARGUMENT);
    assert!(last_error().contains("peer 1 is not a rank"), "{}", last_error());
    is(ncclSend(host.as_ptr() as *const c_void, 8, UINT8, 0, comm, null_mut()), result::INVALID_ARGUMENT);
    assert!(last_error().contains("not inside one live device allocation"), "{}", last_error());
    is(ncclRecv(buffer as *mut c_void, 8, UINT8, 0, comm, 0x1234 as *mut c_void), result::UNHANDLED_CUDA_ERROR);
    is(ncclRecv(buffer as *mut c_void, 3, FLOAT32, 0, comm, null_mut()), result::INVALID_ARGUMENT);
    is(ncclRecv(buffer as *mut c_void, 1, 42, 0, comm, null_mut()), result::INVALID_ARGUMENT);
    is(ncclGroupEnd(), result::INVALID_ARGUMENT);
    is(ncclGroupEnd(), result::INVALID_USAGE);
    // The group's operations were dropped with it: the communicator is fine, and a lone send and receive (each a
    // group of its own) still pair up.
    assert_eq!(state(comm), result::SUCCESS);
    is(ncclSend(buffer as *const c_void, 8, UINT8, 0, comm, null_mut()), result::SUCCESS);
    is(ncclRecv(buffer as *mut c_void, 8, UINT8, 0, comm, null_mut()), result::SUCCESS);
    // A receive awaiting a message that never comes keeps a non-blocking group in progress, and the next group waits.
    is(ncclRecv(buffer as *mut c_void, 8, UINT8, 0, comm, null_mut()), result::IN_PROGRESS);
    assert_eq!(state(comm), result::IN_PROGRESS);
    is(ncclSend(buffer as *const c_void, 8, UINT8, 0, comm, null_mut()), result::INVALID_USAGE);
    assert!(last_error().contains("still in progress"), "{}", last_error());
    is(ncclCommAbort(comm), result::SUCCESS);
    free(buffer);
}

#[test]
fn an_abort_fails_the_peers_awaiting_the_aborted_rank_blocking_or_not() {
    let id = unique_id();
    // Rank 0 blocking, rank 1 non-blocking: NCCL lets each rank choose.
    let waiting = std::thread::spawn(move || {
        on_device(0);
        let mut comm: ncclComm_t = null_mut();
        // SAFETY: a valid out-pointer; no config is blocking.
        is(unsafe { ncclCommInitRank(&mut comm, 3, id, 0) }, result::SUCCESS);
        let buffer = upload(&[0u8; 16]);
        let started = Instant::now();
        // Blocks until rank 2 aborts.
        let ended = group(comm, &[(false, 2, buffer, 16, UINT8)]);
        (ended, last_error(), started.elapsed(), comm as usize)
    });
    let polling = start_join(id, 3, 1, 1);
    let aborting = std::thread::spawn(move || {
        let comm = start_join(id, 3, 2, 2);
        is(settle(comm), result::SUCCESS);
        comm as usize
    })
    .join()
    .expect("rank 2 joins");
    is(settle(polling), result::SUCCESS);
    let buffer = upload(&[0u8; 4]);
    let ended = group(polling, &[(false, 2, buffer, 4, UINT8)]);
    is(ended, result::IN_PROGRESS);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(state(polling), result::IN_PROGRESS);
    is(ncclCommAbort(aborting as ncclComm_t), result::SUCCESS);
    assert_eq!(settle(polling), result::REMOTE_ERROR);
    assert!(last_error().contains("rank 2 left the communicator (ncclCommAbort)"), "{}", last_error());
    let (ended, error, waited, blocked) = waiting.join().expect("rank 0 returns");
    is(ended, result::REMOTE_ERROR);
    assert!(error.contains("rank 2 left"), "{error}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    is(ncclCommAbort(polling), result::SUCCESS);
    is(ncclCommAbort(blocked as ncclComm_t), result::SUCCESS);
    free(buffer);
}

#[test]
fn messages_sent_before_an_abort_are_still_delivered() {
    let comms = joined(2);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            on_device(1);
            let send = upload(&[9u8; 6]);
            is(group(comms[1] as ncclComm_t, &[(true, 0, send, 6, UINT8)]), result::SUCCESS);
            is(ncclCommAbort(comms[1] as ncclComm_t), result::SUCCESS);
            free(send);
        });
    });
    on_device(0);
    let receive = upload(&[0u8; 6]);
    is(group(comms[0] as ncclComm_t, &[(false, 1, receive, 6, UINT8)]), result::SUCCESS);
    assert_eq!(download::<u8>(receive, 6), vec![9u8; 6]);
    is(group(comms[0] as ncclComm_t, &[(false, 1, receive, 6, UINT8)]), result::REMOTE_ERROR);
    is(ncclCommAbort(comms[0] as ncclComm_t), result::SUCCESS);
    free(receive);
}
