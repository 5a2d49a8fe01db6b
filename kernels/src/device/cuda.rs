//! The CUDA backend (the `cuda` feature), through `cudarc` with its libraries loaded at run time.
//!
//! cudarc panics when a function of a library it cannot load is called, so every library this backend needs is
//! looked for first and reported as [`KernelError::CudaUnavailable`]. The CUDA kernels themselves (`kernels/cuda/`,
//! compiled with NVRTC at start-up) arrive with the CUDA issue; for now this checks the device.

use cudarc::driver::CudaContext;

use crate::error::KernelError;

pub(super) const COMPILED: bool = true;

/// The libraries the backend will use, with the name reported when one is missing.
fn missing_library() -> Option<&'static str> {
    // SAFETY: each `is_culib_present` only tries to dlopen the library's candidate file names; it calls nothing in
    // them.
    let present: [(&'static str, bool); 4] = unsafe {
        [
            (
                "libcuda (NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            (
                "libnvrtc (CUDA runtime compiler)",
                cudarc::nvrtc::sys::is_culib_present(),
            ),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
        ]
    };
    present
        .iter()
        .find(|(_, found)| !found)
        .map(|(name, _)| *name)
}

pub(super) fn check_cuda(ordinal: usize) -> Result<String, KernelError> {
    if let Some(library) = missing_library() {
        return Err(KernelError::CudaUnavailable {
            library: library.to_owned(),
        });
    }
    let count = CudaContext::device_count().map_err(|e| KernelError::Cuda {
        op: "device count",
        message: e.to_string(),
    })?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(KernelError::NoSuchGpu { ordinal, count });
    }
    let context = CudaContext::new(ordinal).map_err(|e| KernelError::Cuda {
        op: "context creation",
        message: e.to_string(),
    })?;
    let name = context.name().map_err(|e| KernelError::Cuda {
        op: "device name",
        message: e.to_string(),
    })?;
    Ok(format!("{name} (cuda:{ordinal})"))
}
