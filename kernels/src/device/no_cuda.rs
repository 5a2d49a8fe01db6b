//! Stand-in for the CUDA backend in builds without the `cuda` feature: every CUDA request is refused with
//! [`KernelError::NotCompiledWithCuda`], so callers need no `cfg` of their own. The types are uninhabited: no value
//! of them can exist, so their methods are never reached.

use std::sync::Arc;

use crate::device::gpu_bench::{GemmBenchConfig, GemmBenchReport};
use crate::device::plan::{ExpertDims, Fp8Expert};
use crate::device::sources::CudaSource;
use crate::error::KernelError;

pub(super) const COMPILED: bool = false;

pub(super) fn check_cuda(_ordinal: usize) -> Result<String, KernelError> {
    Err(KernelError::NotCompiledWithCuda)
}

/// A CUDA GPU (needs the `cuda` feature; this build has none).
#[derive(Debug)]
pub enum CudaDevice {}

impl CudaDevice {
    /// Always [`KernelError::NotCompiledWithCuda`].
    pub fn new(_ordinal: usize) -> Result<Arc<Self>, KernelError> {
        Err(KernelError::NotCompiledWithCuda)
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        match *self {}
    }

    /// The ordinal opened.
    pub fn ordinal(&self) -> usize {
        match *self {}
    }

    /// The NVRTC virtual architecture.
    pub fn arch(&self) -> &str {
        match *self {}
    }
}

/// The routed experts of one layer resident on a GPU (needs the `cuda` feature).
#[derive(Debug)]
pub enum GpuExpertLayer {}

impl GpuExpertLayer {
    /// Always [`KernelError::NotCompiledWithCuda`].
    pub fn upload(_device: &Arc<CudaDevice>, _experts: &[Fp8Expert<'_>]) -> Result<Self, KernelError> {
        Err(KernelError::NotCompiledWithCuda)
    }

    /// Experts held.
    pub fn experts(&self) -> usize {
        match *self {}
    }

    /// The layer's dimensions.
    pub fn dims(&self) -> ExpertDims {
        match *self {}
    }

    /// Bytes of weights and scales on the device.
    pub fn weight_bytes(&self) -> usize {
        match *self {}
    }

    /// Routed-expert outputs.
    pub fn forward(&self, _inputs: &[f32], _routed: &[u32]) -> Result<Vec<f32>, KernelError> {
        match *self {}
    }
}

/// Always [`KernelError::NotCompiledWithCuda`].
pub fn compile_cuda_source(_source: &CudaSource, _arch: &str) -> Result<String, KernelError> {
    Err(KernelError::NotCompiledWithCuda)
}

/// Always [`KernelError::NotCompiledWithCuda`].
pub fn bench_expert_gemm(_ordinal: usize, _config: &GemmBenchConfig) -> Result<GemmBenchReport, KernelError> {
    Err(KernelError::NotCompiledWithCuda)
}
