//! NVRTC compilation of `kernels/cuda/*.cu` to PTX, and the on-disk PTX cache.
//!
//! PTX for a virtual architecture (`compute_90`), which the driver JIT-compiles for the GPU when the module is
//! loaded; NVRTC needs no GPU, which is how `tests/cuda_nvrtc.rs` checks every kernel on machines without one.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileError, CompileOptions};

use crate::device::sources::{find_cuda_include, ptx_cache_dir, ptx_cache_file, write_atomically, CudaSource};
use crate::error::KernelError;

/// The CUDA include directory (see `sources::cuda_include_candidates`).
pub(super) fn include_dir() -> Result<PathBuf, KernelError> {
    find_cuda_include().map_err(|searched| KernelError::CudaIncludeNotFound {
        searched: searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// Options besides the include path and the architecture: C++17, and IEEE division and square root (NVRTC's
/// defaults, spelled out: quantisation scales must round as the CPU's `amax / 448` and `1 / scale` do).
fn options() -> Vec<String> {
    vec!["--std=c++17".into(), "--prec-div=true".into(), "--prec-sqrt=true".into()]
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library was found (callers check `is_culib_present`); nvrtcVersion only writes the two ints.
    unsafe {
        let _ = cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor);
    }
    (major, minor)
}

fn nvrtc_present() -> Result<(), KernelError> {
    // SAFETY: only tries to dlopen libnvrtc's candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::CudaUnavailable { library: "libnvrtc (CUDA runtime compiler)".into() })
    }
}

/// Compiles `source` with NVRTC for the virtual architecture `arch` (e.g. `"compute_90"`) with the CUDA headers in
/// `include_dir`, and checks that every kernel `source` declares is in the PTX. Returns the PTX text.
fn compile(source: &CudaSource, arch: &str, include_dir: &Path) -> Result<String, KernelError> {
    nvrtc_present()?;
    let failed = |log: String| KernelError::CudaCompile { file: source.file, arch: arch.to_owned(), log };
    let mut options = options();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = CompileOptions {
        include_paths: vec![include_dir.display().to_string()],
        options,
        name: Some(source.file.to_owned()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source.text, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => failed(log.to_string_lossy().into_owned()),
        other => failed(format!("{other:?}")),
    })?;
    let text = ptx.to_src();
    for kernel in source.kernels {
        if !text.contains(&format!(".entry {kernel}(")) {
            return Err(failed(format!("the PTX has no entry {kernel}")));
        }
    }
    Ok(text)
}

/// Compiles one source of `kernels/cuda/` to PTX for `arch` (e.g. `"compute_90"`), finding the CUDA headers as
/// [`crate::device::CudaDevice::new`] does. Needs libnvrtc but no GPU. No cache: this is the check that the sources
/// compile.
pub fn compile_cuda_source(source: &CudaSource, arch: &str) -> Result<String, KernelError> {
    nvrtc_present()?;
    compile(source, arch, &include_dir()?)
}

/// The PTX of `source` for `arch`: from the disk cache when this source, architecture, option set and NVRTC version
/// were compiled before, else compiled and written there (a cache that cannot be written is skipped: it only saves
/// start-up time).
pub(super) fn cached_ptx(source: &CudaSource, arch: &str, include_dir: &Path) -> Result<String, KernelError> {
    nvrtc_present()?;
    let mut key_options = options();
    key_options.push(include_dir.display().to_string());
    let file = ptx_cache_dir().map(|dir| ptx_cache_file(&dir, source, arch, &key_options, nvrtc_version()));
    if let Some(cached) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        if source.kernels.iter().all(|k| cached.contains(&format!(".entry {k}("))) {
            return Ok(cached);
        }
    }
    let ptx = compile(source, arch, include_dir)?;
    if let Some(file) = file {
        write_atomically(&file, &ptx);
    }
    Ok(ptx)
}
