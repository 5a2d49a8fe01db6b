//! Initialisation, the devices, their primary contexts, streams and events. Everything executes synchronously at the
//! call, so streams and events are bookkeeping: handles are checked (a destroyed or unknown one is
//! CUDA_ERROR_INVALID_HANDLE), an event's time is the wall clock when it was recorded.
//!
//! One device unless `SWITCHYARD_CUDA_EMULATOR_DEVICES` says how many (1 to [`MAX_DEVICES`]), or a test raises the
//! count at run time ([`switchyard_cuda_emulator_set_device_count`]): several ranks of one NCCL communicator need one
//! device each, as on real GPUs. The devices are identical and share one memory (every allocation is host memory, so
//! any device may read any pointer, as with peer access); each has its own primary context, which is what says on
//! which device a thread works (`cuCtxGetDevice`, the NCCL emulation). Streams are not tied to a device.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::error::{code, description, guard, name_c, write_out, CUresult, EmuError};
use crate::memory::TOTAL_MEMORY;

/// cudarc's `sys::CUdevice`.
pub type CUdevice = c_int;
/// cudarc's `sys::CUcontext` (opaque).
pub type CUcontext = *mut c_void;
/// cudarc's `sys::CUstream` (opaque; null is the legacy default stream).
pub type CUstream = *mut c_void;
/// cudarc's `sys::CUevent` (opaque).
pub type CUevent = *mut c_void;
/// cudarc's `sys::CUhostFn`.
pub type CUhostFn = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// The device name: says, wherever a name is shown, that this is no GPU.
pub const DEVICE_NAME: &str = "Switchyard CPU emulation of CUDA (not a GPU)";

/// Device 0's primary context handle; device `d`'s is `d * CONTEXT_STRIDE` further (never dereferenced by anyone).
const PRIMARY_CONTEXT: usize = 0x5157_C000;
const CONTEXT_STRIDE: usize = 0x100;
/// The most devices the emulator can be asked for (an 8-GPU node and then some).
pub const MAX_DEVICES: usize = 16;
/// The environment variable that sets how many devices there are (default 1).
pub const DEVICES_VARIABLE: &str = "SWITCHYARD_CUDA_EMULATOR_DEVICES";
/// CU_STREAM_LEGACY and CU_STREAM_PER_THREAD, the special stream handles.
const STREAM_LEGACY: usize = 0x1;
const STREAM_PER_THREAD: usize = 0x2;
/// CU_EVENT_DISABLE_TIMING
const EVENT_DISABLE_TIMING: c_uint = 0x2;

static INITIALIZED: AtomicBool = AtomicBool::new(false);
static PRIMARY_RETAINS: [AtomicUsize; MAX_DEVICES] = [const { AtomicUsize::new(0) }; MAX_DEVICES];
/// The device count asked for through the environment (read once), or what was wrong with it.
static CONFIGURED_DEVICES: OnceLock<Result<usize, String>> = OnceLock::new();
/// The device count a test raised it to at run time (0: not raised).
static RAISED_DEVICES: AtomicUsize = AtomicUsize::new(0);
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(0x5157_0000_0000);

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// A fresh opaque handle value, distinct from every other handle the emulator gave out (and from null and the
/// special stream handles).
pub(crate) fn new_handle() -> usize {
    NEXT_HANDLE.fetch_add(0x100, Ordering::Relaxed)
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone, Copy)]
struct Event {
    timing: bool,
    recorded: Option<Instant>,
}

static STREAMS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static EVENTS: Mutex<Option<HashMap<usize, Event>>> = Mutex::new(None);

fn check_initialized() -> Result<(), EmuError> {
    if INITIALIZED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(EmuError::new(code::NOT_INITIALIZED, "cuInit has not been called"))
    }
}

fn configured_devices() -> Result<usize, EmuError> {
    let configured = CONFIGURED_DEVICES.get_or_init(|| match std::env::var(DEVICES_VARIABLE) {
        Err(std::env::VarError::NotPresent) => Ok(1),
        Err(std::env::VarError::NotUnicode(value)) => Err(format!("{DEVICES_VARIABLE}={value:?} is not a number")),
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(count) if (1..=MAX_DEVICES).contains(&count) => Ok(count),
            _ => Err(format!("{DEVICES_VARIABLE}={value:?}: the emulator can have 1 to {MAX_DEVICES} devices")),
        },
    });
    configured.clone().map_err(EmuError::invalid)
}

/// How many devices the emulator has: `SWITCHYARD_CUDA_EMULATOR_DEVICES` (default 1), or more where a test raised the
/// count ([`set_device_count`]). An error when the variable is not a number from 1 to [`MAX_DEVICES`].
pub fn device_count() -> Result<usize, EmuError> {
    Ok(configured_devices()?.max(RAISED_DEVICES.load(Ordering::Acquire)))
}

/// Raises the device count to `count` (from 1 to [`MAX_DEVICES`]) for the rest of the process: a test that needs a
/// device per NCCL rank asks for them. Never lowers it, since devices may be in use; asking for fewer is a no-op.
pub fn set_device_count(count: usize) -> Result<(), EmuError> {
    configured_devices()?;
    if !(1..=MAX_DEVICES).contains(&count) {
        return Err(EmuError::invalid(format!("{count} devices: the emulator can have 1 to {MAX_DEVICES}")));
    }
    RAISED_DEVICES.fetch_max(count, Ordering::AcqRel);
    Ok(())
}

/// The device ordinal as an index, once checked to be one of the emulator's devices.
fn check_device(device: CUdevice) -> Result<usize, EmuError> {
    check_initialized()?;
    let count = device_count()?;
    usize::try_from(device).ok().filter(|&d| d < count).ok_or_else(|| {
        EmuError::new(
            code::INVALID_DEVICE,
            format!("device {device}: the emulator has {count} device(s), 0 to {} ({DEVICES_VARIABLE})", count - 1),
        )
    })
}

fn primary_context(device: usize) -> usize {
    PRIMARY_CONTEXT + device * CONTEXT_STRIDE
}

/// The device whose primary context `handle` is, if it is one.
fn context_device(handle: usize) -> Option<usize> {
    let offset = handle.checked_sub(PRIMARY_CONTEXT)?;
    let device = offset / CONTEXT_STRIDE;
    (offset % CONTEXT_STRIDE == 0 && device < MAX_DEVICES).then_some(device)
}

/// Fails unless the calling thread has a (primary) context current, as the driver requires of memory and launch
/// calls; the current context's device otherwise.
pub(crate) fn check_context() -> Result<usize, EmuError> {
    check_initialized()?;
    match context_device(CURRENT.with(Cell::get)) {
        Some(device) if PRIMARY_RETAINS[device].load(Ordering::Acquire) > 0 => Ok(device),
        _ => Err(EmuError::new(code::INVALID_CONTEXT, "no context is current on this thread (cuCtxSetCurrent)")),
    }
}

/// The device of the context current on the calling thread, if one is (what the CUDA runtime's `cudaGetDevice`
/// answers, and so the device an NCCL communicator joins with).
pub fn current_device() -> Option<CUdevice> {
    context_device(CURRENT.with(Cell::get)).and_then(|device| CUdevice::try_from(device).ok())
}

/// Whether `stream` is null, a special handle, or a stream created and not destroyed (no context needed).
pub(crate) fn is_live_stream(stream: CUstream) -> bool {
    let handle = stream as usize;
    handle == 0 || handle == STREAM_LEGACY || handle == STREAM_PER_THREAD || lock(&STREAMS).contains(&handle)
}

/// Checks a stream handle: null, the special handles, or one created and not destroyed.
pub(crate) fn check_stream(stream: CUstream) -> Result<(), EmuError> {
    check_context()?;
    if is_live_stream(stream) {
        Ok(())
    } else {
        let handle = stream as usize;
        Err(EmuError::new(code::INVALID_HANDLE, format!("stream 0x{handle:x} was never created or is destroyed")))
    }
}

// ---- exported: initialisation, errors, device --------------------------------------------------------------------

/// cuInit
#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard("cuInit", || {
        if flags != 0 {
            return Err(EmuError::invalid(format!("cuInit flags must be 0, got {flags}")));
        }
        INITIALIZED.store(true, Ordering::Release);
        Ok(())
    })
}

/// cuDriverGetVersion: 13.0, what cudarc's `cuda-13000` bindings expect.
///
/// # Safety
/// `version` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    // SAFETY: the caller's contract.
    guard("cuDriverGetVersion", || unsafe { write_out(version, "version", 13000) })
}

/// cuGetExportTable: the driver's private function tables are not emulated. NVRTC asks for one (it dlopens
/// libcuda.so.1 and calls cuInit and this) and copes with a refusal, where a missing symbol crashed it.
///
/// # Safety
/// `table` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuGetExportTable(table: *mut *const c_void, _table_id: *const c_void) -> CUresult {
    if !table.is_null() {
        // SAFETY: the caller's contract.
        unsafe { table.write(std::ptr::null()) };
    }
    // Quietly: this is an expected question, not an error of the code under test.
    code::INVALID_VALUE
}

/// cuGetErrorName
///
/// # Safety
/// `name` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, name: *mut *const c_char) -> CUresult {
    // SAFETY: the caller's contract.
    guard("cuGetErrorName", || unsafe { write_out(name, "pStr", name_c(error)) })
}

/// cuGetErrorString: the last detailed message the emulator gave this thread for `error`, else the generic text.
///
/// # Safety
/// `text` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, text: *mut *const c_char) -> CUresult {
    // SAFETY: the caller's contract.
    guard("cuGetErrorString", || unsafe { write_out(text, "pStr", description(error)) })
}

/// cuDeviceGetCount: [`device_count`].
///
/// # Safety
/// `count` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guard("cuDeviceGetCount", || {
        check_initialized()?;
        let devices = device_count()? as c_int;
        // SAFETY: the caller's contract.
        unsafe { write_out(count, "count", devices) }
    })
}

/// Not a CUDA function: raises the device count ([`set_device_count`]), for tests that load this library by name
/// and need a device per NCCL rank. A real driver has no such symbol, which is how such a test knows where it runs.
#[no_mangle]
pub extern "C" fn switchyard_cuda_emulator_set_device_count(count: c_int) -> CUresult {
    guard("switchyard_cuda_emulator_set_device_count", || {
        let count = usize::try_from(count).map_err(|_| EmuError::invalid(format!("{count} devices")))?;
        set_device_count(count)
    })
}

/// cuDeviceGet
///
/// # Safety
/// `device` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard("cuDeviceGet", || {
        check_device(ordinal)?;
        // SAFETY: the caller's contract.
        unsafe { write_out(device, "device", ordinal) }
    })
}

/// cuDeviceGetName: [`DEVICE_NAME`], truncated to `len - 1` bytes and NUL-terminated.
///
/// # Safety
/// `name` must have room for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, device: CUdevice) -> CUresult {
    guard("cuDeviceGetName", || {
        check_device(device)?;
        let len = usize::try_from(len).ok().filter(|&l| l > 0).ok_or_else(|| EmuError::invalid("len must be > 0"))?;
        if name.is_null() {
            return Err(EmuError::invalid("name is a null pointer"));
        }
        let bytes = DEVICE_NAME.as_bytes();
        let copied = bytes.len().min(len - 1);
        // SAFETY: `name` has room for `len` bytes (the caller's contract) and `copied + 1 <= len`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name as *mut u8, copied);
            *name.add(copied) = 0;
        }
        Ok(())
    })
}

/// cuDeviceTotalMem_v2
///
/// # Safety
/// `bytes` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CUdevice) -> CUresult {
    guard("cuDeviceTotalMem_v2", || {
        check_device(device)?;
        // SAFETY: the caller's contract.
        unsafe { write_out(bytes, "bytes", TOTAL_MEMORY) }
    })
}

/// The emulated device's attributes: an H100's limits (compute capability 9.0, so NVRTC compiles for compute_90 as
/// on the real machine) but no memory pools and no managed memory.
fn attribute(attribute: c_int) -> Option<c_int> {
    Some(match attribute {
        1 => 1024,              // MAX_THREADS_PER_BLOCK
        2 | 3 => 1024,          // MAX_BLOCK_DIM_X, _Y
        4 => 64,                // MAX_BLOCK_DIM_Z
        5 => i32::MAX,          // MAX_GRID_DIM_X
        6 | 7 => 65535,         // MAX_GRID_DIM_Y, _Z
        8 => 48 * 1024,         // MAX_SHARED_MEMORY_PER_BLOCK
        9 => 64 * 1024,         // TOTAL_CONSTANT_MEMORY
        10 => 32,               // WARP_SIZE
        11 => i32::MAX,         // MAX_PITCH
        12 => 65536,            // MAX_REGISTERS_PER_BLOCK
        13 => 1_980_000,        // CLOCK_RATE (kHz)
        14 => 512,              // TEXTURE_ALIGNMENT
        15 => 1,                // GPU_OVERLAP
        16 => 132,              // MULTIPROCESSOR_COUNT
        19 => 1,                // CAN_MAP_HOST_MEMORY
        31 => 1,                // CONCURRENT_KERNELS
        37 => 5120,             // GLOBAL_MEMORY_BUS_WIDTH
        38 => 50 * 1024 * 1024, // L2_CACHE_SIZE
        39 => 2048,             // MAX_THREADS_PER_MULTIPROCESSOR
        41 => 1,                // UNIFIED_ADDRESSING
        75 => 9,                // COMPUTE_CAPABILITY_MAJOR
        76 => 0,                // COMPUTE_CAPABILITY_MINOR
        81 => 228 * 1024,       // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        82 => 65536,            // MAX_REGISTERS_PER_MULTIPROCESSOR
        97 => 227 * 1024,       // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        115 => 0,               // MEMORY_POOLS_SUPPORTED: no, so cudarc uses cuMemAlloc_v2 / cuMemFree_v2
        a if (1..=150).contains(&a) => 0,
        _ => return None,
    })
}

/// The largest dynamic shared memory a function may be allowed (MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).
pub(crate) const MAX_SHARED_OPTIN: c_int = 227 * 1024;
/// Dynamic shared memory a launch may use without raising the function's limit.
pub(crate) const DEFAULT_SHARED_LIMIT: c_int = 48 * 1024;

/// cuDeviceGetAttribute
///
/// # Safety
/// `value` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(value: *mut c_int, attrib: c_int, device: CUdevice) -> CUresult {
    guard("cuDeviceGetAttribute", || {
        check_device(device)?;
        let answer = attribute(attrib).ok_or_else(|| EmuError::invalid(format!("no device attribute {attrib}")))?;
        // SAFETY: the caller's contract.
        unsafe { write_out(value, "pi", answer) }
    })
}

/// cuDeviceGetUuid_v2 (and cuDeviceGetUuid): a fixed UUID per device (its last byte the ordinal).
///
/// # Safety
/// `uuid` must be valid for a write of 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], device: CUdevice) -> CUresult {
    guard("cuDeviceGetUuid_v2", || {
        let ordinal = check_device(device)?;
        let mut bytes = *b"switchyard-emu\0\0";
        bytes[15] = ordinal as u8;
        // SAFETY: the caller's contract.
        unsafe { write_out(uuid, "uuid", bytes) }
    })
}

/// cuDeviceGetUuid: see [`cuDeviceGetUuid_v2`].
///
/// # Safety
/// `uuid` must be valid for a write of 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], device: CUdevice) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuDeviceGetUuid_v2(uuid, device) }
}

// ---- exported: contexts -------------------------------------------------------------------------------------------

/// cuDevicePrimaryCtxRetain
///
/// # Safety
/// `context` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(context: *mut CUcontext, device: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRetain", || {
        let device = check_device(device)?;
        // SAFETY: the caller's contract.
        unsafe { write_out(context, "pctx", primary_context(device) as CUcontext)? };
        PRIMARY_RETAINS[device].fetch_add(1, Ordering::AcqRel);
        Ok(())
    })
}

/// cuDevicePrimaryCtxRelease_v2
#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(device: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRelease_v2", || {
        let device = check_device(device)?;
        PRIMARY_RETAINS[device]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .map(|_| ())
            .map_err(|_| EmuError::new(code::INVALID_CONTEXT, "the primary context was not retained"))
    })
}

/// cuCtxGetCurrent
///
/// # Safety
/// `context` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(context: *mut CUcontext) -> CUresult {
    guard("cuCtxGetCurrent", || {
        check_initialized()?;
        // SAFETY: the caller's contract.
        unsafe { write_out(context, "pctx", CURRENT.with(Cell::get) as CUcontext) }
    })
}

/// cuCtxSetCurrent: null or a device's primary context.
#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(context: CUcontext) -> CUresult {
    guard("cuCtxSetCurrent", || {
        check_initialized()?;
        let handle = context as usize;
        let devices = device_count()?;
        if handle != 0 && context_device(handle).is_none_or(|device| device >= devices) {
            return Err(EmuError::new(code::INVALID_CONTEXT, format!("0x{handle:x} is not a context")));
        }
        CURRENT.with(|current| current.set(handle));
        Ok(())
    })
}

/// cuCtxGetDevice
///
/// # Safety
/// `device` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guard("cuCtxGetDevice", || {
        let current = check_context()? as CUdevice;
        // SAFETY: the caller's contract.
        unsafe { write_out(device, "device", current) }
    })
}

/// cuCtxSynchronize: all work is already done.
#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    guard("cuCtxSynchronize", || check_context().map(|_| ()))
}

/// cuCtxSetLimit: accepted and ignored (stack size, printf FIFO, heap: the emulator has fixed ones).
#[no_mangle]
pub extern "C" fn cuCtxSetLimit(_limit: c_int, _value: usize) -> CUresult {
    guard("cuCtxSetLimit", || check_context().map(|_| ()))
}

/// cuCtxGetStreamPriorityRange: 0 (least) to -5 (greatest), as on Hopper.
///
/// # Safety
/// Each pointer must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(least: *mut c_int, greatest: *mut c_int) -> CUresult {
    guard("cuCtxGetStreamPriorityRange", || {
        check_context()?;
        // SAFETY: the caller's contract; null pointers are allowed and skipped.
        unsafe {
            if !least.is_null() {
                least.write(0);
            }
            if !greatest.is_null() {
                greatest.write(-5);
            }
        }
        Ok(())
    })
}

// ---- exported: streams --------------------------------------------------------------------------------------------

/// cuStreamCreate
///
/// # Safety
/// `stream` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut CUstream, _flags: c_uint) -> CUresult {
    guard("cuStreamCreate", || {
        check_context()?;
        let handle = new_handle();
        // SAFETY: the caller's contract.
        unsafe { write_out(stream, "phStream", handle as CUstream)? };
        lock(&STREAMS).push(handle);
        Ok(())
    })
}

/// cuStreamCreateWithPriority
///
/// # Safety
/// `stream` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    stream: *mut CUstream,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuStreamCreate(stream, flags) }
}

/// cuStreamDestroy_v2
#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    guard("cuStreamDestroy_v2", || {
        check_context()?;
        let mut streams = lock(&STREAMS);
        let index = streams
            .iter()
            .position(|&s| s == stream as usize)
            .ok_or_else(|| EmuError::new(code::INVALID_HANDLE, format!("stream {stream:?} is not a live stream")))?;
        streams.swap_remove(index);
        Ok(())
    })
}

/// cuStreamSynchronize: the work is already done.
#[no_mangle]
pub extern "C" fn cuStreamSynchronize(stream: CUstream) -> CUresult {
    guard("cuStreamSynchronize", || check_stream(stream))
}

/// cuStreamQuery: always complete.
#[no_mangle]
pub extern "C" fn cuStreamQuery(stream: CUstream) -> CUresult {
    guard("cuStreamQuery", || check_stream(stream))
}

/// cuStreamWaitEvent: nothing to wait for.
#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(stream: CUstream, event: CUevent, _flags: c_uint) -> CUresult {
    guard("cuStreamWaitEvent", || {
        check_stream(stream)?;
        with_event(event, |_| Ok(()))
    })
}

/// cuLaunchHostFunc: calls `function` at once (the stream's earlier work is done).
///
/// # Safety
/// `function` must be safe to call with `user_data`.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(stream: CUstream, function: CUhostFn, user_data: *mut c_void) -> CUresult {
    guard("cuLaunchHostFunc", || {
        check_stream(stream)?;
        let function = function.ok_or_else(|| EmuError::invalid("fn is null"))?;
        // SAFETY: the caller's contract.
        unsafe { function(user_data) };
        Ok(())
    })
}

// ---- exported: events ---------------------------------------------------------------------------------------------

fn with_event<R>(event: CUevent, f: impl FnOnce(&mut Event) -> Result<R, EmuError>) -> Result<R, EmuError> {
    let mut events = lock(&EVENTS);
    let found = events
        .get_or_insert_with(HashMap::new)
        .get_mut(&(event as usize))
        .ok_or_else(|| EmuError::new(code::INVALID_HANDLE, format!("event {event:?} is not a live event")))?;
    f(found)
}

/// cuEventCreate
///
/// # Safety
/// `event` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(event: *mut CUevent, flags: c_uint) -> CUresult {
    guard("cuEventCreate", || {
        check_context()?;
        let handle = new_handle();
        // SAFETY: the caller's contract.
        unsafe { write_out(event, "phEvent", handle as CUevent)? };
        let state = Event { timing: flags & EVENT_DISABLE_TIMING == 0, recorded: None };
        lock(&EVENTS).get_or_insert_with(HashMap::new).insert(handle, state);
        Ok(())
    })
}

/// cuEventDestroy_v2
#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(event: CUevent) -> CUresult {
    guard("cuEventDestroy_v2", || {
        check_context()?;
        lock(&EVENTS)
            .get_or_insert_with(HashMap::new)
            .remove(&(event as usize))
            .map(|_| ())
            .ok_or_else(|| EmuError::new(code::INVALID_HANDLE, format!("event {event:?} is not a live event")))
    })
}

/// cuEventRecord: the event's time is now (everything before it on the stream has run).
#[no_mangle]
pub extern "C" fn cuEventRecord(event: CUevent, stream: CUstream) -> CUresult {
    guard("cuEventRecord", || {
        check_stream(stream)?;
        with_event(event, |e| {
            e.recorded = Some(Instant::now());
            Ok(())
        })
    })
}

/// cuEventRecordWithFlags: as [`cuEventRecord`].
#[no_mangle]
pub extern "C" fn cuEventRecordWithFlags(event: CUevent, stream: CUstream, _flags: c_uint) -> CUresult {
    cuEventRecord(event, stream)
}

/// cuEventSynchronize: complete.
#[no_mangle]
pub extern "C" fn cuEventSynchronize(event: CUevent) -> CUresult {
    guard("cuEventSynchronize", || {
        check_context()?;
        with_event(event, |_| Ok(()))
    })
}

/// cuEventQuery: complete.
#[no_mangle]
pub extern "C" fn cuEventQuery(event: CUevent) -> CUresult {
    guard("cuEventQuery", || {
        check_context()?;
        with_event(event, |_| Ok(()))
    })
}

fn elapsed(start: CUevent, end: CUevent) -> Result<f32, EmuError> {
    check_context()?;
    let start = with_event(start, |e| Ok(*e))?;
    let end = with_event(end, |e| Ok(*e))?;
    if !start.timing || !end.timing {
        return Err(EmuError::new(code::INVALID_HANDLE, "an event was created with CU_EVENT_DISABLE_TIMING"));
    }
    match (start.recorded, end.recorded) {
        (Some(s), Some(e)) => Ok(if e >= s {
            e.duration_since(s).as_secs_f32() * 1000.0
        } else {
            -(s.duration_since(e).as_secs_f32() * 1000.0)
        }),
        _ => Err(EmuError::new(code::INVALID_HANDLE, "an event has not been recorded")),
    }
}

/// cuEventElapsedTime_v2: milliseconds of wall time between the two records.
///
/// # Safety
/// `ms` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    guard("cuEventElapsedTime_v2", || {
        let value = elapsed(start, end)?;
        // SAFETY: the caller's contract.
        unsafe { write_out(ms, "pMilliseconds", value) }
    })
}

/// cuEventElapsedTime: see [`cuEventElapsedTime_v2`].
///
/// # Safety
/// `ms` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuEventElapsedTime_v2(ms, start, end) }
}
