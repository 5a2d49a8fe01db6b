//! Compute kernels of Switchyard: the CPU kernels a Llama 4 forward pass needs, and the seam of the CUDA backend.
//!
//! This crate owns arithmetic on plain row-major `f32` buffers (and FP8 E4M3 weight codes): matrix products against
//! `nn.Linear`-layout weights ([`matmul`], including FP8 weights with per-row scales), RMS norm ([`norm`]),
//! interleaved RoPE ([`rope`]), the SwiGLU gate ([`activation`]), top-k routing ([`router`]), grouped-query
//! attention with causal and chunked masks and exact merging of partial results ([`attention`]), the E4M3 codec
//! ([`fp8`]), the measurements behind `switchyard bench kernels` ([`bench_support`]) and the device choice
//! ([`device`]). It must know nothing of the model, checkpoints or the network: no tensor names, no config, no
//! files, no sockets. Callers pass shapes; every kernel checks them and answers a [`KernelError`] naming the
//! operation and the sizes instead of panicking.
//!
//! Every kernel has a scalar reference (`*_reference`, public so tests and benchmarks can use it) and a fast
//! version: AVX2 + FMA + F16C intrinsics on x86_64 when the CPU has them (detected at run time), a portable
//! auto-vectorised path otherwise, multi-threaded with rayon where the work is large enough. The fast versions are
//! tested against the references on random inputs of awkward sizes.
//!
//! # Feature flags
//! - `cuda` (off by default): compiles the CUDA backend in [`device`] on top of `cudarc`: the kernels of
//!   `kernels/cuda/` (compiled with NVRTC at start-up), cuBLASLt's FP8 GEMM, the routed-expert layer on the GPU
//!   ([`device::GpuExpertLayer`]) and the GPU benchmark. CUDA libraries are loaded at run time, so the feature builds
//!   on machines without CUDA; there, [`device::check_device`] and [`device::CudaDevice::new`] answer
//!   [`KernelError::CudaUnavailable`]. Without the feature they answer [`KernelError::NotCompiledWithCuda`].
//!   `docs/cuda.md` has the design and the tolerances.

pub mod activation;
pub mod attention;
pub mod bench_support;
pub mod device;
pub mod error;
pub mod fp8;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod router;
mod simd;
#[cfg(test)]
mod testing;

pub use error::KernelError;
