//! Blocking NCCL calls never hang: a blocking join whose peers never come, and a blocking group whose message never
//! comes, fail with `ncclSystemError` once the emulator's wait limit passes (real NCCL would wait forever). A file of
//! its own, since the limit it shortens is the process's.

mod driver_support;

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use driver_support::{context, free, upload};
use switchyard_cuda_emulator::nccl::*;

const LIMIT: Duration = Duration::from_millis(300);

fn last_error() -> String {
    // SAFETY: a NUL-terminated string that lives until this thread's next error.
    unsafe { CStr::from_ptr(ncclGetLastError(null_mut())) }.to_string_lossy().into_owned()
}

fn unique_id() -> ncclUniqueId {
    let mut id = ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, result::SUCCESS);
    id
}

#[test]
fn blocking_calls_give_up_at_the_wait_limit() {
    set_blocking_wait_limit(LIMIT);
    assert_eq!(blocking_wait_limit(), LIMIT);
    context();
    let mut comm: ncclComm_t = null_mut();
    let started = Instant::now();
    // SAFETY: a valid out-pointer; no config is blocking. Rank 1 never comes.
    let joined = unsafe { ncclCommInitRank(&mut comm, 2, unique_id(), 0) };
    assert_eq!(result_name(joined), "ncclSystemError", "{}", last_error());
    assert!(started.elapsed() >= LIMIT && started.elapsed() < LIMIT * 10, "{:?}", started.elapsed());
    assert!(comm.is_null());
    assert!(last_error().contains("never came"), "{}", last_error());

    // SAFETY: as above; one rank alone joins at once.
    assert_eq!(unsafe { ncclCommInitRank(&mut comm, 1, unique_id(), 0) }, result::SUCCESS);
    let buffer = upload(&[0u8; 8]);
    let started = Instant::now();
    // A lone receive from itself, with no send: the blocking group waits for a message that never comes.
    let received = ncclRecv(buffer as *mut c_void, 8, 1, 0, comm, null_mut());
    assert_eq!(result_name(received), "ncclSystemError", "{}", last_error());
    assert!(started.elapsed() >= LIMIT, "{:?}", started.elapsed());
    let mut state = result::SUCCESS;
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { ncclCommGetAsyncError(comm, &mut state) }, result::SUCCESS);
    assert_eq!(result_name(state), "ncclSystemError");
    assert_eq!(ncclCommAbort(comm), result::SUCCESS);
    free(buffer);
}
