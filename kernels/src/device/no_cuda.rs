//! Stand-in for the CUDA backend in builds without the `cuda` feature: every CUDA request is refused with
//! [`KernelError::NotCompiledWithCuda`], so callers need no `cfg` of their own.

use crate::error::KernelError;

pub(super) const COMPILED: bool = false;

pub(super) fn check_cuda(_ordinal: usize) -> Result<String, KernelError> {
    Err(KernelError::NotCompiledWithCuda)
}
