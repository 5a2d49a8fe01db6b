//! CUresult codes, the emulator's error type, and the guard every exported function runs its body in: no panic
//! crosses the FFI boundary, and every error is reported on stderr with what was wrong (the CUresult alone rarely
//! says), and kept for `cuGetErrorString` so cudarc's `DriverError` shows it too.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The driver API's status type (cudarc's `sys::CUresult`, a `#[repr(u32)]` enum).
pub type CUresult = u32;

/// The CUresult values the emulator returns; each is a variant of every cudarc `cudaError_enum` (a value that is not
/// would be undefined behaviour on cudarc's side).
pub mod code {
    use super::CUresult;
    /// CUDA_SUCCESS
    pub const SUCCESS: CUresult = 0;
    /// CUDA_ERROR_INVALID_VALUE
    pub const INVALID_VALUE: CUresult = 1;
    /// CUDA_ERROR_OUT_OF_MEMORY
    pub const OUT_OF_MEMORY: CUresult = 2;
    /// CUDA_ERROR_NOT_INITIALIZED
    pub const NOT_INITIALIZED: CUresult = 3;
    /// CUDA_ERROR_INVALID_DEVICE
    pub const INVALID_DEVICE: CUresult = 101;
    /// CUDA_ERROR_INVALID_IMAGE
    pub const INVALID_IMAGE: CUresult = 200;
    /// CUDA_ERROR_INVALID_CONTEXT
    pub const INVALID_CONTEXT: CUresult = 201;
    /// CUDA_ERROR_INVALID_HANDLE
    pub const INVALID_HANDLE: CUresult = 400;
    /// CUDA_ERROR_NOT_FOUND
    pub const NOT_FOUND: CUresult = 500;
    /// CUDA_ERROR_ILLEGAL_ADDRESS
    pub const ILLEGAL_ADDRESS: CUresult = 700;
    /// CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
    pub const LAUNCH_OUT_OF_RESOURCES: CUresult = 701;
    /// CUDA_ERROR_LAUNCH_FAILED
    pub const LAUNCH_FAILED: CUresult = 719;
    /// CUDA_ERROR_NOT_SUPPORTED
    pub const NOT_SUPPORTED: CUresult = 801;
    /// CUDA_ERROR_UNKNOWN
    pub const UNKNOWN: CUresult = 999;
}

/// An emulated driver call that failed: the CUresult to return and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", name(*code))]
pub struct EmuError {
    /// The CUresult the call returns.
    pub code: CUresult,
    /// What was wrong, naming the argument or the kernel.
    pub message: String,
}

impl EmuError {
    /// An error with `code` and `message`.
    pub fn new(code: CUresult, message: impl Into<String>) -> Self {
        EmuError { code, message: message.into() }
    }

    /// CUDA_ERROR_INVALID_VALUE with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        EmuError::new(code::INVALID_VALUE, message)
    }
}

/// The name and the generic description of a CUresult the emulator returns.
fn table(result: CUresult) -> (&'static CStr, &'static CStr) {
    match result {
        code::SUCCESS => (c"CUDA_SUCCESS", c"no error"),
        code::INVALID_VALUE => (c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
        code::OUT_OF_MEMORY => (c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
        code::NOT_INITIALIZED => (c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
        code::INVALID_DEVICE => (c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
        code::INVALID_IMAGE => (c"CUDA_ERROR_INVALID_IMAGE", c"device kernel image is invalid"),
        code::INVALID_CONTEXT => (c"CUDA_ERROR_INVALID_CONTEXT", c"invalid device context"),
        code::INVALID_HANDLE => (c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
        code::NOT_FOUND => (c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
        code::ILLEGAL_ADDRESS => (c"CUDA_ERROR_ILLEGAL_ADDRESS", c"an illegal memory access was encountered"),
        code::LAUNCH_OUT_OF_RESOURCES => {
            (c"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", c"too many resources requested for launch")
        }
        code::LAUNCH_FAILED => (c"CUDA_ERROR_LAUNCH_FAILED", c"unspecified launch failure"),
        code::NOT_SUPPORTED => (c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
        _ => (c"CUDA_ERROR_UNKNOWN", c"unknown error"),
    }
}

/// The name of a CUresult the emulator returns (cuGetErrorName's answer), e.g. `"CUDA_ERROR_INVALID_VALUE"`.
pub fn name(result: CUresult) -> &'static str {
    table(result).0.to_str().unwrap_or("CUDA_ERROR_UNKNOWN")
}

thread_local! {
    // The last detailed message per CUresult on this thread, leaked so the pointer cuGetErrorString hands out stays
    // valid forever (cudarc keeps it as a `&'static CStr`). Errors are rare in a test run, so the leak is small.
    static LAST_MESSAGE: RefCell<HashMap<CUresult, &'static CStr>> = RefCell::new(HashMap::new());
}

fn remember(error: &EmuError) {
    let text =
        format!("{} [switchyard CPU emulation of CUDA: {}]", table(error.code).1.to_string_lossy(), error.message);
    let text = CString::new(text.replace('\0', " ")).unwrap_or_default();
    let leaked: &'static CStr = Box::leak(text.into_boxed_c_str());
    LAST_MESSAGE.with(|last| {
        last.borrow_mut().insert(error.code, leaked);
    });
}

/// The description of `result` for cuGetErrorString: the last detailed message this thread saw for it, else the
/// driver's generic text.
pub fn description(result: CUresult) -> *const c_char {
    let detailed = LAST_MESSAGE.try_with(|last| last.borrow().get(&result).copied()).ok().flatten();
    detailed.unwrap_or_else(|| table(result).1).as_ptr()
}

/// The static name of `result` as a C string (cuGetErrorName).
pub fn name_c(result: CUresult) -> *const c_char {
    table(result).0.as_ptr()
}

/// What a caught panic said (its `&str` or `String` payload).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Runs the body of exported function `function`: its error becomes the CUresult (reported on stderr and kept for
/// cuGetErrorString), a panic becomes CUDA_ERROR_UNKNOWN instead of unwinding into C.
pub fn guard(function: &str, body: impl FnOnce() -> Result<(), EmuError>) -> CUresult {
    let error = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return code::SUCCESS,
        Ok(Err(error)) => error,
        Err(panic) => EmuError::new(code::UNKNOWN, format!("internal error (panic): {}", panic_message(&*panic))),
    };
    eprintln!("switchyard-cuda-emulator: {function}: {error}");
    remember(&error);
    error.code
}

/// Writes `value` through an out-pointer argument, refusing a null one.
///
/// # Safety
/// `out` must be null or valid for a write of `T`.
pub unsafe fn write_out<T>(out: *mut T, what: &str, value: T) -> Result<(), EmuError> {
    if out.is_null() {
        return Err(EmuError::invalid(format!("{what} is a null pointer")));
    }
    // SAFETY: non-null, and valid for writes per the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}
