//! The CUDA sources of `kernels/cuda/`, embedded in the binary (a binary built on a CPU machine carries them to the
//! GPU machine), where NVRTC finds the CUDA headers, and where compiled PTX is cached. Plain data and file-system
//! look-ups: nothing here needs CUDA, so it is compiled with or without the `cuda` feature.

use std::path::{Path, PathBuf};

/// One CUDA source file of `kernels/cuda/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaSource {
    /// The file name, e.g. `"experts.cu"` (the NVRTC program name, and part of the PTX cache key).
    pub file: &'static str,
    /// The source text.
    pub text: &'static str,
    /// The `extern "C"` kernels it defines, each checked to be in the PTX.
    pub kernels: &'static [&'static str],
    /// The architecture it needs, when it uses architecture-specific instructions (Hopper's wgmma: `Some("90")`,
    /// compiled for `compute_90a` and loaded only on a GPU of compute capability 9.0); `None`: any architecture.
    pub only_for: Option<&'static str>,
}

impl CudaSource {
    /// The NVRTC architecture to compile for on a GPU whose virtual architecture is `arch` (e.g. `"compute_90"`), or
    /// `None` when this source does not run there.
    pub fn arch_on(&self, arch: &str) -> Option<String> {
        match self.only_for {
            None => Some(arch.to_owned()),
            Some(only) => (arch.strip_prefix("compute_") == Some(only)).then(|| format!("{arch}a")),
        }
    }
}

/// The routed-expert path: FP8 quantisation, permutation, SwiGLU, the grouped small-m GEMM and the cuBLASLt epilogue.
pub const EXPERTS_CU: CudaSource = CudaSource {
    file: "experts.cu",
    text: include_str!("../../cuda/experts.cu"),
    kernels: &[
        "quantize_rows_e4m3",
        "permute_plan",
        "gather_rows",
        "scatter_rows",
        "silu_mul_quantize_e4m3",
        "fp8_grouped_gemm_small",
        "fp8_grouped_gemm_mma_t1",
        "fp8_grouped_gemm_mma_t2",
        "fp8_grouped_gemm_mma_t4",
        "fp8_lone_expert_gemm_t1",
        "fp8_lone_expert_gemm_t2",
        "fp8_lone_expert_gemm_t4",
        "scale_rows_cols",
        "mma_e4m3_rate",
    ],
    only_for: None,
};

/// The attention worker's kernels: RMS norm, interleaved RoPE, paged decode attention (over an f32 or a bf16 KV pool)
/// and the merge of its key splits.
pub const ATTENTION_CU: CudaSource = CudaSource {
    file: "attention.cu",
    text: include_str!("../../cuda/attention.cu"),
    kernels: &[
        "rms_norm",
        "rope_interleaved",
        "paged_decode_attention",
        "paged_decode_attention_bf16",
        "paged_decode_attention_grouped",
        "paged_decode_attention_grouped_bf16",
        "paged_decode_merge",
    ],
    only_for: None,
};

/// The dense side of a decoder layer besides its GEMMs (cuBLASLt's): bf16 conversion of GEMM inputs, embedding
/// look-up, SwiGLU, residual add, row scaling, writes into the paged KV cache (f32 or bf16).
pub const DENSE_CU: CudaSource = CudaSource {
    file: "dense.cu",
    text: include_str!("../../cuda/dense.cu"),
    kernels: &[
        "f32_to_bf16",
        "embed_rows_f32",
        "embed_rows_bf16",
        "silu_mul",
        "add_in_place",
        "scale_rows",
        "kv_write",
        "kv_write_bf16",
    ],
    only_for: None,
};

/// Hopper's warpgroup MMA (wgmma, sm_90a): the layout probe a wgmma streaming kernel would rest on.
pub const HOPPER_CU: CudaSource = CudaSource {
    file: "hopper.cu",
    text: include_str!("../../cuda/hopper.cu"),
    kernels: &["wgmma_probe", "fp8_warpgroup_expert_gemm_s3", "fp8_warpgroup_expert_gemm_s6"],
    only_for: Some("90"),
};

/// Every CUDA source the backend compiles.
pub const CUDA_SOURCES: &[CudaSource] = &[EXPERTS_CU, ATTENTION_CU, DENSE_CU, HOPPER_CU];

/// The header that tells a directory is the CUDA include directory the kernels need.
const MARKER_HEADER: &str = "cuda_fp8.h";

/// The directories looked in for the CUDA headers, in order: `$SWITCHYARD_CUDA_INCLUDE`,
/// `$CUDA_HOME/targets/x86_64-linux/include`, `$CUDA_HOME/include` (and the same under `$CUDA_PATH`),
/// `/usr/local/cuda/targets/x86_64-linux/include`, `/usr/local/cuda/include`, and the include directory of the
/// `nvidia-cuda-runtime-cu12` wheel that `scripts/nvrtc-tools.sh` unpacks.
pub fn cuda_include_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("SWITCHYARD_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(dir));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let home = PathBuf::from(home);
            candidates.push(home.join("targets/x86_64-linux/include"));
            candidates.push(home.join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/include"));
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(cache) = cache_root() {
        // scripts/nvrtc-tools.sh's layout: <cache>/nvrtc/nvrtc-<v>-runtime-<v>/nvidia/cuda_runtime/include.
        if let Ok(entries) = std::fs::read_dir(cache.join("nvrtc")) {
            let mut found: Vec<PathBuf> =
                entries.flatten().map(|e| e.path().join("nvidia/cuda_runtime/include")).collect();
            found.sort();
            candidates.extend(found.into_iter().rev());
        }
    }
    candidates
}

/// The first of [`cuda_include_candidates`] that holds `cuda_fp8.h`, or the list searched when none does.
pub fn find_cuda_include() -> Result<PathBuf, Vec<PathBuf>> {
    let candidates = cuda_include_candidates();
    candidates.iter().find(|dir| dir.join(MARKER_HEADER).is_file()).cloned().ok_or(candidates)
}

/// `$XDG_CACHE_HOME/switchyard` or `$HOME/.cache/switchyard`.
pub(crate) fn cache_root() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("switchyard"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/switchyard"))
}

/// Where compiled PTX is cached: `$SWITCHYARD_PTX_CACHE`, else `<cache root>/ptx`; `None` when there is no home.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SWITCHYARD_PTX_CACHE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    cache_root().map(|root| root.join("ptx"))
}

/// The cached PTX file of `source` compiled for `arch` with `options` by NVRTC `nvrtc_version`: the name carries a
/// 64-bit FNV-1a hash of all of them, so an edited source, another GPU or another NVRTC misses the cache instead of
/// loading stale code. FNV rather than `DefaultHasher` because the key must not change between Rust releases.
pub fn ptx_cache_file(
    dir: &Path,
    source: &CudaSource,
    arch: &str,
    options: &[String],
    nvrtc_version: (i32, i32),
) -> PathBuf {
    let mut hash = Fnv1a::default();
    hash.write(source.text.as_bytes());
    hash.write(&[0]);
    hash.write(arch.as_bytes());
    for option in options {
        hash.write(&[0]);
        hash.write(option.as_bytes());
    }
    hash.write(&nvrtc_version.0.to_le_bytes());
    hash.write(&nvrtc_version.1.to_le_bytes());
    let stem = source.file.trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{:016x}.ptx", hash.0))
}

/// The 64-bit FNV-1a hash of `bytes`: cache file names that must not change between Rust releases.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = Fnv1a::default();
    hash.write(bytes);
    hash.0
}

/// Writes through a temporary file and a rename, so a concurrent reader never sees half a file. A cache that cannot
/// be written is skipped: caches here only save time.
pub(crate) fn write_atomically(file: &Path, text: &str) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let temporary = file.with_extension(format!("tmp.{}", std::process::id()));
    if std::fs::write(&temporary, text).is_ok() && std::fs::rename(&temporary, file).is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
}

/// 64-bit FNV-1a.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source with whitespace collapsed and `__launch_bounds__(...)` removed, so a declaration reads
    /// `extern "C" __global__ void name(` however it is wrapped.
    fn declarations(text: &str) -> String {
        let mut flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        while let Some(start) = flat.find("__launch_bounds__(") {
            let end = flat[start..].find(')').map_or(flat.len(), |i| start + i + 1);
            flat.replace_range(start..end, "");
        }
        flat.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn every_declared_kernel_is_defined_extern_c() {
        for source in CUDA_SOURCES {
            let flat = declarations(source.text);
            for kernel in source.kernels {
                let declaration = format!("extern \"C\" __global__ void {kernel}(");
                assert!(flat.contains(&declaration), "{} does not define {declaration}", source.file);
            }
            // And nothing undeclared: every extern "C" kernel is listed (so the PTX check covers it).
            let defined = flat.matches("extern \"C\" __global__ void ").count();
            assert_eq!(defined, source.kernels.len(), "{}: kernels defined vs listed", source.file);
        }
    }

    #[test]
    fn cache_key_changes_with_source_arch_options_and_nvrtc() {
        let dir = Path::new("/cache");
        let base = ptx_cache_file(dir, &EXPERTS_CU, "compute_90", &[], (12, 9));
        assert!(base.to_string_lossy().starts_with("/cache/experts-compute_90-"), "{base:?}");
        assert_eq!(base, ptx_cache_file(dir, &EXPERTS_CU, "compute_90", &[], (12, 9)));
        assert_ne!(base, ptx_cache_file(dir, &ATTENTION_CU, "compute_90", &[], (12, 9)));
        assert_ne!(base, ptx_cache_file(dir, &EXPERTS_CU, "compute_80", &[], (12, 9)));
        assert_ne!(base, ptx_cache_file(dir, &EXPERTS_CU, "compute_90", &["-G".into()], (12, 9)));
        assert_ne!(base, ptx_cache_file(dir, &EXPERTS_CU, "compute_90", &[], (13, 0)));
    }
}
