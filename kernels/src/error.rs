//! The one error type of the kernels crate. Every variant names the operation that refused its input and what was
//! wrong with it, so a caller several layers up can still tell which tensor had which shape.

/// Everything a kernel or the device layer can refuse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// Buffer lengths disagree with the dimensions given (or with each other).
    #[error("{op}: shape mismatch: {what}")]
    Shape {
        /// The kernel, e.g. `"matmul_fp8"`.
        op: &'static str,
        /// What disagreed, with the numbers, e.g. `"x has 10 values, expected m * cols = 3 * 4 = 12"`.
        what: String,
    },
    /// A parameter that is not a buffer length is out of its domain (a zero chunk size, `k` larger than the number
    /// of experts, ...).
    #[error("{op}: invalid argument: {what}")]
    InvalidArgument {
        /// The kernel.
        op: &'static str,
        /// Which argument and why.
        what: String,
    },
    /// A device string that is neither `cpu` nor `cuda:N`.
    #[error("unknown device {input:?}: expected \"cpu\" or \"cuda:N\" (e.g. \"cuda:0\")")]
    BadDevice {
        /// The string as given.
        input: String,
    },
    /// A CUDA device was asked for but this binary was built without the `cuda` feature.
    #[error("this build has no CUDA support: rebuild with `--features cuda`")]
    NotCompiledWithCuda,
    /// The `cuda` feature is on, but a CUDA library could not be loaded on this machine.
    #[error(
        "CUDA is unavailable: library {library} was not found (no NVIDIA driver or CUDA toolkit on the loader path)"
    )]
    CudaUnavailable {
        /// The missing library, e.g. `"libcuda (driver)"`.
        library: String,
    },
    /// The CUDA libraries are there but no GPU has the requested ordinal.
    #[error("no CUDA GPU with ordinal {ordinal}: {count} visible")]
    NoSuchGpu {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many GPUs the driver reports.
        count: usize,
    },
    /// NVRTC refused a CUDA source of `kernels/cuda/`.
    #[error("NVRTC could not compile {file} for {arch}: {log}")]
    CudaCompile {
        /// The source file, e.g. `"experts.cu"`.
        file: &'static str,
        /// The virtual architecture compiled for, e.g. `"compute_90"`.
        arch: String,
        /// NVRTC's log (or the failing step).
        log: String,
    },
    /// No directory with the CUDA headers the kernels include (`cuda_fp8.h`) was found.
    #[error("CUDA headers (cuda_fp8.h) not found; searched: {searched}. Set SWITCHYARD_CUDA_INCLUDE or CUDA_HOME, or run scripts/nvrtc-tools.sh")]
    CudaIncludeNotFound {
        /// The directories looked in, comma-separated.
        searched: String,
    },
    /// A CUDA call failed.
    #[error("CUDA {op} failed: {message}")]
    Cuda {
        /// The call or step, e.g. `"context creation"`.
        op: &'static str,
        /// The driver's message.
        message: String,
    },
}

impl KernelError {
    pub(crate) fn shape(op: &'static str, what: impl Into<String>) -> Self {
        KernelError::Shape { op, what: what.into() }
    }

    pub(crate) fn invalid(op: &'static str, what: impl Into<String>) -> Self {
        KernelError::InvalidArgument { op, what: what.into() }
    }
}

/// Checks `len == expected`, naming the buffer and the formula in the error. Both are `Display` so that callers
/// pass `format_args!`, which formats nothing unless the check fails (these checks run on every kernel call).
pub(crate) fn check_len(
    op: &'static str,
    name: impl std::fmt::Display,
    len: usize,
    expected: usize,
    formula: impl std::fmt::Display,
) -> Result<(), KernelError> {
    if len == expected {
        Ok(())
    } else {
        Err(KernelError::shape(op, format!("{name} has {len} values, expected {formula} = {expected}")))
    }
}

/// `a * b`, or a shape error when the product does not fit a `usize` (only absurd dimensions get there).
pub(crate) fn product(op: &'static str, a: usize, b: usize) -> Result<usize, KernelError> {
    a.checked_mul(b).ok_or_else(|| KernelError::shape(op, format!("{a} x {b} overflows usize")))
}
