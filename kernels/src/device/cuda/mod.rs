//! The CUDA backend (the `cuda` feature), through `cudarc` with its libraries loaded at run time.
//!
//! cudarc panics when a function of a library it cannot load is called, so every library this backend needs is
//! looked for first and reported as [`KernelError::CudaUnavailable`]. The kernels of `kernels/cuda/` are compiled
//! with NVRTC the first time a [`CudaDevice`] needs them (`compile.rs`, PTX cached on disk), launched through typed
//! wrappers that check shapes (`kernels.rs`); cuBLASLt's FP8 GEMM goes through its sys bindings (`blaslt.rs`); the
//! routed-expert layer (`experts.rs`) and the GEMM benchmark (`bench.rs`) are built from those; dense weights, their
//! GEMM and the dense side of a decoder layer are in `dense.rs`.
//!
//! Everything runs on one stream per [`CudaDevice`], so kernels see each other's results in launch order.

mod bench;
mod blaslt;
mod compile;
mod dense;
mod experts;
mod gemm_tuning;
mod kernels;
mod timing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::device::sources::CudaSource;
use crate::error::KernelError;

pub use bench::bench_expert_gemm;
pub use compile::compile_cuda_source;
/// Device buffers and views: cudarc's own types (`no_cuda.rs` has stand-ins of the same names).
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
pub use dense::DenseWeight;
pub use experts::GpuExpertLayer;
pub use experts::{lone_expert_max_tokens, small_m_max_tokens};
pub use kernels::{ExpertScales, GroupedGemm, MMA_CHUNK, MMA_MAX_TOKENS};

pub(super) const COMPILED: bool = true;

/// Maps a cudarc driver error to [`KernelError::Cuda`] naming the step.
pub(crate) fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Cuda { op, message: e.to_string() }
}

/// Locks a mutex, taking the data even if another thread panicked while holding it (the caches stay consistent: each
/// insert is one `HashMap` call).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The libraries the backend will use, with the name reported when one is missing.
fn missing_library() -> Option<&'static str> {
    // SAFETY: each `is_culib_present` only tries to dlopen the library's candidate file names; it calls nothing in
    // them.
    let present: [(&'static str, bool); 4] = unsafe {
        [
            ("libcuda (NVIDIA driver)", cudarc::driver::sys::is_culib_present()),
            ("libnvrtc (CUDA runtime compiler)", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
        ]
    };
    present.iter().find(|(_, found)| !found).map(|(name, _)| *name)
}

/// Creates a context on `ordinal` after checking the libraries and the ordinal.
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, KernelError> {
    if let Some(library) = missing_library() {
        return Err(KernelError::CudaUnavailable { library: library.to_owned() });
    }
    let count = CudaContext::device_count().map_err(driver("device count"))?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(KernelError::NoSuchGpu { ordinal, count });
    }
    CudaContext::new(ordinal).map_err(driver("context creation"))
}

pub(super) fn check_cuda(ordinal: usize) -> Result<String, KernelError> {
    let context = open_context(ordinal)?;
    let name = context.name().map_err(driver("device name"))?;
    Ok(format!("{name} (cuda:{ordinal})"))
}

/// One CUDA GPU ready to run this crate's kernels: a context, the stream everything runs on, the compiled modules and
/// (created on first use) a cuBLASLt handle with its workspace.
pub struct CudaDevice {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    /// The NVRTC virtual architecture of this GPU, e.g. `"compute_90"`.
    arch: String,
    include_dir: PathBuf,
    /// Streaming multiprocessors: `fp8_lone_expert_gemm` spreads one expert over all of them.
    sms: usize,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blas: Mutex<Option<Arc<blaslt::BlasLt>>>,
    stream_k_scratch: Mutex<kernels::StreamKScratch>,
    /// How this GPU's wgmma reads a shared-memory descriptor, found by `wgmma_probe` on first use.
    wgmma_reading: OnceLock<Result<kernels::WgmmaReading, String>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({} (cuda:{}), {})", self.name, self.ordinal, self.arch)
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: checks the CUDA libraries ([`KernelError::CudaUnavailable`] names the first missing),
    /// the ordinal ([`KernelError::NoSuchGpu`]) and that the CUDA headers the kernels include can be found
    /// ([`KernelError::CudaIncludeNotFound`]). Kernels are compiled when first used.
    pub fn new(ordinal: usize) -> Result<Arc<Self>, KernelError> {
        let context = open_context(ordinal)?;
        let name = context.name().map_err(driver("device name"))?;
        let (major, minor) = context.compute_capability().map_err(driver("compute capability"))?;
        let include_dir = compile::include_dir()?;
        let sms = context
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("multiprocessor count"))?;
        let stream = context.default_stream();
        Ok(Arc::new(CudaDevice {
            context,
            stream,
            ordinal,
            name,
            arch: format!("compute_{major}{minor}"),
            include_dir,
            sms: usize::try_from(sms).unwrap_or(1).max(1),
            modules: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            stream_k_scratch: Mutex::new(kernels::StreamKScratch::default()),
            wgmma_reading: OnceLock::new(),
        }))
    }

    /// The GPU's name from the driver.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The ordinal opened.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The NVRTC virtual architecture compiled for, e.g. `"compute_90"` on an H100.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Streaming multiprocessors of the GPU.
    pub fn sms(&self) -> usize {
        self.sms
    }

    /// The context (for events).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The stream every kernel of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(driver("stream synchronize"))
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, KernelError> {
        self.stream.clone_htod(host).map_err(driver("host-to-device copy"))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, device: &CudaSlice<T>) -> Result<Vec<T>, KernelError> {
        self.stream.clone_dtoh(device).map_err(driver("device-to-host copy"))
    }

    /// A zeroed device buffer of `len` values.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>, KernelError> {
        self.stream.alloc_zeros(len.max(1)).map_err(driver("device allocation"))
    }

    /// A device buffer of `len` values whose contents are whatever the allocator hands back, for a buffer a kernel
    /// writes in full before anything reads it: no memset launch, which a zeroed buffer costs on every call.
    pub fn uninit<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>, KernelError> {
        // SAFETY: `ValidAsZeroBits` types here are plain numbers (u8, u32, f32, ...), for which any bytes are a value;
        // the host only ever sees them through a copy, after a kernel has written them.
        unsafe { self.stream.alloc(len.max(1)) }.map_err(driver("device allocation"))
    }

    /// Kernel `kernel` of `source`, compiling and loading the source the first time (PTX from the disk cache when an
    /// earlier run compiled the same source for the same architecture and NVRTC).
    pub fn function(&self, source: &CudaSource, kernel: &str) -> Result<CudaFunction, KernelError> {
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(source.file) {
                Some(module) => module.clone(),
                None => {
                    let arch = source.arch_on(&self.arch).ok_or_else(|| KernelError::Cuda {
                        op: "kernel look-up",
                        message: format!(
                            "{} is for compute capability {}.x only; this GPU is {}",
                            source.file,
                            source.only_for.unwrap_or("?"),
                            self.arch
                        ),
                    })?;
                    let ptx = compile::cached_ptx(source, &arch, &self.include_dir)?;
                    let module = self
                        .context
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                        .map_err(driver("PTX module load"))?;
                    modules.insert(source.file, module.clone());
                    module
                }
            }
        };
        module.load_function(kernel).map_err(|e| KernelError::Cuda {
            op: "kernel look-up",
            message: format!("{kernel} in {}: {e}", source.file),
        })
    }

    /// The cuBLASLt handle, created on first use.
    fn blas(&self) -> Result<Arc<blaslt::BlasLt>, KernelError> {
        let mut blas = lock(&self.blas);
        if let Some(handle) = blas.as_ref() {
            return Ok(handle.clone());
        }
        let handle = Arc::new(blaslt::BlasLt::new(&self.stream)?);
        *blas = Some(handle.clone());
        Ok(handle)
    }
}
