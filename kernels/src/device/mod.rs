//! Where compute runs: the CPU or a CUDA GPU, and the check that the chosen device can be used.
//!
//! The CUDA backend is a seam in the candle style: `cuda.rs` holds the code that talks to `cudarc` and is compiled
//! only with the `cuda` feature; `no_cuda.rs` is its stand-in, which answers [`KernelError::NotCompiledWithCuda`].
//! This file is the only place that chooses between them, so `#[cfg(feature = "cuda")]` appears nowhere else.
//! `sources.rs` (the embedded `kernels/cuda/*.cu`, header discovery, the PTX cache key), `plan.rs` (the host side of
//! the expert path), `tuning_cache.rs` (the on-disk cache of cuBLASLt tunings), `types.rs` (the kernels' plain
//! argument types, the bf16 codec) and `gpu_bench.rs` (the GPU benchmark's data) need no CUDA and are compiled in
//! every build.

use std::fmt;
use std::str::FromStr;

use crate::error::KernelError;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
use cuda as backend;
#[cfg(not(feature = "cuda"))]
mod no_cuda;
#[cfg(not(feature = "cuda"))]
use no_cuda as backend;

pub mod gpu_bench;
pub mod plan;
pub mod sources;
pub mod tuning_cache;
mod types;

/// The backend's API. With the `cuda` feature these are the real types (and [`CudaDevice`] has more methods than the
/// stand-in: the FP8 expert-path kernels, used by `tests/cuda_kernels.rs`; `CudaSlice`, `CudaView` and
/// `CudaViewMut` are cudarc's); without it, uninhabited stand-ins whose constructors answer
/// [`KernelError::NotCompiledWithCuda`] and which have the methods the model's GPU forward pass uses, so callers
/// compile either way without a `cfg`.
pub use backend::{
    bench_expert_gemm, compile_cuda_source, CudaDevice, CudaSlice, CudaView, CudaViewMut, DenseWeight, GpuExpertLayer,
};
/// The operands of the grouped FP8 expert GEMM, the scales a later kernel applies to its raw sums, the tensor-core
/// streaming kernel's limits and the thresholds in force (`cuda` feature only: the expert path's kernels
/// have no stand-ins).
#[cfg(feature = "cuda")]
pub use backend::{lone_expert_max_tokens, small_m_max_tokens, ExpertScales, GroupedGemm, MMA_CHUNK, MMA_MAX_TOKENS};
/// Plain argument types of the device kernels (the KV cache's element types among them), and the bf16 codec of dense
/// weights and bf16 KV (every build).
pub use types::{bf16_bits_to_f32, f32_to_bf16_bits, DenseDtype, KvDtype, KvElement, KvWrite, PagedDecode};

/// Where compute runs. Parsed from `"cpu"` or `"cuda:N"` (`"cuda"` alone means `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU (the kernels of this crate).
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for Device {
    type Err = KernelError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = || KernelError::BadDevice { input: input.to_owned() };
        let lower = input.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => {
                let ordinal = other.strip_prefix("cuda:").ok_or_else(bad)?;
                // `usize::from_str` accepts a leading '+', which no one means in a device name.
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                ordinal.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

/// What [`check_device`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device checked.
    pub device: Device,
    /// A human-readable name: the GPU's name from the driver, or the CPU's SIMD path.
    pub name: String,
}

/// Checks that `device` can be used.
///
/// The CPU always can. A CUDA device needs the `cuda` feature (else [`KernelError::NotCompiledWithCuda`]); with it,
/// the driver, NVRTC, cuBLAS and cuBLASLt libraries are looked for before anything is called (cudarc panics on a
/// missing library), giving [`KernelError::CudaUnavailable`] naming the first one missing; then a context is created
/// on the ordinal ([`KernelError::NoSuchGpu`] if there is no such GPU).
pub fn check_device(device: &Device) -> Result<DeviceInfo, KernelError> {
    match *device {
        Device::Cpu => {
            Ok(DeviceInfo { device: Device::Cpu, name: format!("cpu ({})", crate::bench_support::simd_path()) })
        }
        Device::Cuda(ordinal) => {
            let name = backend::check_cuda(ordinal)?;
            Ok(DeviceInfo { device: *device, name })
        }
    }
}

/// Whether this build has the CUDA backend compiled in (the `cuda` feature).
pub const fn cuda_compiled() -> bool {
    backend::COMPILED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!(" CPU ".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda:0".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        for device in [Device::Cpu, Device::Cuda(7)] {
            assert_eq!(device.to_string().parse::<Device>(), Ok(device));
        }
    }

    #[test]
    fn refuses_garbage_naming_the_string() {
        for input in
            ["tpu", "", "cuda:", "cuda:x", "cuda:+1", "cuda:-1", "cuda0", "gpu:0", "cuda:99999999999999999999999"]
        {
            let err = input.parse::<Device>().expect_err(input);
            assert_eq!(err, KernelError::BadDevice { input: input.to_owned() });
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }

    #[test]
    fn cpu_is_always_usable() {
        let info = check_device(&Device::Cpu).expect("cpu");
        assert_eq!(info.device, Device::Cpu);
        assert!(info.name.starts_with("cpu"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_refused() {
        let device: Device = "cuda:0".parse().expect("parses");
        assert_eq!(check_device(&device), Err(KernelError::NotCompiledWithCuda));
        assert!(!cuda_compiled());
    }

    /// On a machine without an NVIDIA driver the check must answer `CudaUnavailable`, not panic inside cudarc.
    /// Where a driver and a GPU exist (the GPU test machine) it must succeed instead.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_check_reports_instead_of_panicking() {
        assert!(cuda_compiled());
        // SAFETY: only tries to dlopen the driver library.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        match check_device(&Device::Cuda(0)) {
            Ok(info) => assert!(driver_present && !info.name.is_empty()),
            Err(KernelError::CudaUnavailable { library }) => {
                assert!(driver_present || library.contains("libcuda"), "{library}");
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
        // No machine has a GPU with this ordinal.
        match check_device(&Device::Cuda(4096)) {
            Err(KernelError::CudaUnavailable { .. }) | Err(KernelError::NoSuchGpu { .. }) => {}
            other => panic!("ordinal 4096 should be refused, got {other:?}"),
        }
    }
}
