//! Choosing cuBLASLt's algorithm for the expert path's FP8 GEMMs by timing the candidates, instead of taking the
//! heuristic's first choice.
//!
//! cuBLASLt's heuristic picks well when the GEMM is bound by its multiplications (>= 2048 tokens: 1.00 of PyTorch's
//! cuBLASLt in every measured row), but an expert with a few dozen to a few hundred tokens is bound by reading its
//! weights, and there the first choice left a third of the H100's bandwidth unused (docs/cuda.md, "Measured on a
//! GPU": one expert at 128 tokens streamed 2.0-2.16 TB/s of a 3.0 TB/s copy). Its other candidates, and their
//! split-k, cluster, pipeline-stage and tile variants, fill the SMs differently. Which is fastest depends on the GPU,
//! the driver and the cuBLAS release, so it is measured on the GPU in use, as TensorRT-LLM's GEMM profiler and vLLM's
//! tuned MoE configurations do, rather than written into a table here.
//!
//! What is tuned: the unscaled FP8 GEMM (`Operands::Fp8 { outer_vector: false }`, what `GpuExpertLayer` runs) of
//! each weight shape `(n, k)`, per token bucket (`plan::cublaslt_token_bucket`: the count rounded up to a power of
//! two, from 16 to `plan::CUBLASLT_TUNED_MAX_TOKENS`). The first expert call of a shape and bucket times every
//! candidate on scratch activations of the bucket's size, with the weights rotated over the layer's experts as a
//! serving step reads them (cold in L2 when the layer holds more than L2); later calls of any token count in the
//! bucket use the winner, re-checked by `cublasLtMatmulAlgoCheck` against their own descriptors and alignment (else
//! the heuristic's choice). That first call pays for the timing: about 13 GEMMs per candidate, a fraction of a
//! second for a Maverick shape. A candidate that fails its first call is dropped; a tuning that fails altogether is
//! logged and leaves the heuristic's choice, so tuning never fails an expert call. `SWITCHYARD_CUBLASLT_TUNING=0`
//! turns tuning off (the heuristic's choice everywhere).
//!
//! Our own one-expert kernels compete in the same timing where they take the bucket (`OwnKernel`): the lone-expert
//! kernel (mma.sync, up to 32 tokens) and, on Hopper, the warpgroup kernel (wgmma, 64 and 128 tokens), each launch of
//! it a candidate. Each is first run once and its sums compared with cuBLASLt's (`sums_agree`): a kernel that has
//! not run on this GPU before cannot win with wrong sums.
//!
//! Each tuning goes to the tuning cache (`device::tuning_cache`: one file per GPU kind and cuBLASLt release), where
//! the next process on such a GPU finds it instead of timing again. Different algorithms add the k-sum in different
//! orders, so two processes that tuned separately may differ in the last bits of an expert's output (within the
//! tolerances of docs/cuda.md); processes sharing a cache, or the same process, give the same bits.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::OnceLock;

use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::blaslt::{blas_error, BlasLt, Operands, Plan, PlanKey, WORKSPACE_BYTES};
use super::kernels::{GroupedGemm, MMA_CHUNK};
use super::timing::{interleaved_medians_us, random_codes, Schedule, TimedPath};
use super::{lock, CudaDevice};
use crate::device::gpu_bench::GemmTuningRow;
use crate::device::plan::{
    cublaslt_token_bucket, LoneExpertGrid, WarpgroupExpertGrid, WarpgroupLaunch, WARPGROUP_MAX_TOKENS,
    WARPGROUP_MIN_TOKENS,
};
use crate::device::tuning_cache::{
    add_to_tuning_cache, read_tuning_cache, tuning_cache_dir, tuning_cache_file, CachedChoice, TuningCacheKey,
    TuningRecord,
};
use crate::error::KernelError;

/// Heuristic results asked for: cuBLASLt returns fewer when it has fewer.
const HEURISTIC_RESULTS: usize = 32;

/// Split-k factors tried on each heuristic result whose algorithm can split k.
const SPLIT_K: [u32; 5] = [2, 3, 4, 6, 8];

/// Cluster shapes (`cublasLtClusterShape_t`: 1x1x1, 2x1x1, 4x1x1, 1x2x1, 2x2x1, 1x4x1) tried on the heuristic's first
/// [`SHAPE_VARIANT_RANKS`] results.
const CLUSTER_SHAPES: [u16; 6] = [2, 3, 4, 5, 6, 8];

/// The heuristic's results whose cluster shape, pipeline stages and tile are varied (each alone): a weight-streaming
/// GEMM is bound by the bytes each SM keeps in flight, which those set.
const SHAPE_VARIANT_RANKS: usize = 4;

/// The most candidates timed per shape and bucket (the heuristic's own first, then its others, then variants).
const MAX_CANDIDATES: usize = 256;

/// Candidates after the chosen one kept in the report.
const RUNNERS_UP: usize = 4;

/// One warm-up call and three samples of four calls per candidate, all candidates interleaved.
const SCHEDULE: Schedule = Schedule { warmup: 1, iterations: 3, calls_per_sample: 4 };

/// Whether tuning is on: yes unless `SWITCHYARD_CUBLASLT_TUNING=0`. Read once.
fn tuning_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SWITCHYARD_CUBLASLT_TUNING").map_or(true, |v| v.trim() != "0"))
}

/// Whether the warpgroup expert kernel (`fp8_warpgroup_expert_gemm`) takes part in the tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WarpgroupMode {
    /// Not at all (`SWITCHYARD_WGMMA_EXPERT_GEMM=0`: gpu-check turns it off for every step after its own, when the
    /// probe or the kernel's tests failed on the GPU).
    Off,
    /// It competes with cuBLASLt's candidates (the default).
    Compete,
    /// It wins wherever it takes the bucket and its sums agree (`SWITCHYARD_WGMMA_EXPERT_GEMM=force`: the tests run
    /// the expert path through it on the emulator, where timing would never choose it). The tuning cache is neither
    /// read nor written then.
    Force,
}

/// `SWITCHYARD_WGMMA_EXPERT_GEMM`, read once.
fn warpgroup_mode() -> WarpgroupMode {
    static MODE: OnceLock<WarpgroupMode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("SWITCHYARD_WGMMA_EXPERT_GEMM").as_deref().map(str::trim) {
        Ok("0") => WarpgroupMode::Off,
        Ok("force") => WarpgroupMode::Force,
        _ => WarpgroupMode::Compete,
    })
}

/// What one tuning is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct TuneKey {
    n: usize,
    k: usize,
    bucket: usize,
}

impl TuneKey {
    /// The tuning a plan would use, if its GEMM is one that is tuned.
    fn of(key: PlanKey) -> Option<TuneKey> {
        let tuned = key.tuned && key.operands == tuned_operands();
        let bucket = cublaslt_token_bucket(key.m).filter(|_| tuned)?;
        Some(TuneKey { n: key.n, k: key.k, bucket })
    }
}

/// The operands of the tuned GEMM: FP8 with unit scales (the expert path's raw sums).
fn tuned_operands() -> Operands {
    Operands::Fp8 { outer_vector: false }
}

/// One of our kernels, timed with the cuBLASLt candidates where it takes the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OwnKernel {
    /// `fp8_lone_expert_gemm` (at most 32 tokens, `n` and `k` multiples of 128).
    Lone,
    /// `fp8_warpgroup_expert_gemm` with this launch (buckets of 64 and 128 tokens, `n` and `k` multiples of 128, a
    /// Hopper GPU whose wgmma layouts `wgmma_probe` confirmed).
    Warpgroup(WarpgroupLaunch),
}

impl OwnKernel {
    /// How the report names it.
    fn describe(self) -> String {
        match self {
            OwnKernel::Lone => "lone-expert kernel (fp8_lone_expert_gemm)".to_owned(),
            OwnKernel::Warpgroup(launch) => {
                format!("warpgroup kernel ({}, {} blocks)", launch.stages.kernel(), launch.blocks)
            }
        }
    }
}

/// What a tuning chose for a shape and bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TunedChoice {
    /// A cuBLASLt algorithm.
    Cublaslt(sys::cublasLtMatmulAlgo_t),
    /// One of our kernels.
    Own(OwnKernel),
}

impl TunedChoice {
    /// What a cache record keeps.
    fn record(self) -> CachedChoice {
        match self {
            TunedChoice::Cublaslt(algo) => CachedChoice::Cublaslt(algo.data),
            TunedChoice::Own(OwnKernel::Lone) => CachedChoice::LoneKernel,
            TunedChoice::Own(OwnKernel::Warpgroup(launch)) => CachedChoice::WarpgroupKernel(launch),
        }
    }

    /// How the report names it.
    fn describe(self) -> String {
        match self {
            TunedChoice::Cublaslt(algo) => describe(&algo),
            TunedChoice::Own(kernel) => kernel.describe(),
        }
    }
}

/// The tunings made on one device, by shape and bucket: what was chosen (`None`: the tuning failed, and the
/// heuristic's algorithm runs) and the report row; and the device's tuning cache file with what it held when first
/// read (`None` until then).
#[derive(Default)]
pub(super) struct TuningTable {
    entries: BTreeMap<TuneKey, (Option<TunedChoice>, GemmTuningRow)>,
    cache: Option<TuningCache>,
}

/// A device's tuning cache: the file (`None`: no cache) and the records read from it.
struct TuningCache {
    file: Option<PathBuf>,
    identity: String,
    records: BTreeMap<TuningCacheKey, TuningRecord>,
}

/// The expert weights a tuning times its candidates on: `[experts, n, k]` codes.
#[derive(Clone, Copy)]
pub(super) struct TuningWeights<'a, 'b> {
    pub weights: &'a CudaView<'b, u8>,
    pub experts: usize,
}

/// A timed call of one candidate, owned.
type BoxedPath<'a> = Box<dyn FnMut(usize) -> Result<(), KernelError> + 'a>;

/// A candidate algorithm, checked against the bucket's descriptors.
struct Candidate {
    algo: sys::cublasLtMatmulAlgo_t,
}

/// Reads one attribute of type `T` through `get(buffer, size, written)`, `None` when cuBLASLt does not answer or
/// writes another size.
fn read_attribute<T: Default + Copy>(
    get: impl FnOnce(*mut c_void, usize, &mut usize) -> sys::cublasStatus_t,
) -> Option<T> {
    let mut value = T::default();
    let mut written = 0usize;
    let size = std::mem::size_of::<T>();
    get(&mut value as *mut T as *mut c_void, size, &mut written)
        .result()
        .ok()
        .filter(|()| written == size)
        .map(|()| value)
}

/// Reads configuration attribute `attribute` of `algo` (`T`: the attribute's documented type), `None` when cuBLASLt
/// does not answer.
fn config<T: Default + Copy>(
    algo: &sys::cublasLtMatmulAlgo_t,
    attribute: sys::cublasLtMatmulAlgoConfigAttributes_t,
) -> Option<T> {
    // SAFETY: the buffer is a live `T` of the size passed, the attribute's documented type.
    read_attribute(|buffer, size, written| unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(algo, attribute, buffer, size, written)
    })
}

/// `algo` with configuration attribute `attribute` set to `value` (`T`: the attribute's documented type), `None`
/// when cuBLASLt refuses the value.
fn with_config<T: Copy>(
    algo: &sys::cublasLtMatmulAlgo_t,
    attribute: sys::cublasLtMatmulAlgoConfigAttributes_t,
    value: T,
) -> Option<sys::cublasLtMatmulAlgo_t> {
    let mut variant = *algo;
    // SAFETY: `value` is a live `T` of the size passed, the attribute's documented type; `variant` is our copy.
    unsafe {
        sys::cublasLtMatmulAlgoConfigSetAttribute(
            &mut variant,
            attribute,
            &value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .result()
    .ok()
    .map(|()| variant)
}

/// Reads capability attribute `attribute` of `algo`, `None` when cuBLASLt does not answer.
fn capability<T: Default + Copy>(
    algo: &sys::cublasLtMatmulAlgo_t,
    attribute: sys::cublasLtMatmulAlgoCapAttributes_t,
) -> Option<T> {
    // SAFETY: the buffer is a live `T` of the size passed, the attribute's documented type.
    read_attribute(|buffer, size, written| unsafe {
        sys::cublasLtMatmulAlgoCapGetAttribute(algo, attribute, buffer, size, written)
    })
}

/// Whether `algo` splits k and adds the splits in place, with atomic additions whose order varies from call to call.
fn splits_in_place(algo: &sys::cublasLtMatmulAlgo_t) -> bool {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as Config;
    let split = config::<u32>(algo, Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM).unwrap_or(1);
    let scheme = config::<u32>(algo, Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME).unwrap_or(0);
    split > 1 && scheme == sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_INPLACE as u32
}

/// The configuration of `algo` in cuBLASLt's own numbers, for the tuning report.
fn describe(algo: &sys::cublasLtMatmulAlgo_t) -> String {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as Config;
    let show = |value: Option<u64>| value.map_or_else(|| "?".to_owned(), |v| v.to_string());
    let u32_of = |attribute| show(config::<u32>(algo, attribute).map(u64::from));
    let u16_of = |attribute| show(config::<u16>(algo, attribute).map(u64::from));
    format!(
        "algo {} tile {} stages {} split-k {} reduction {} swizzle {} custom {} cluster {}",
        config::<i32>(algo, Config::CUBLASLT_ALGO_CONFIG_ID).map_or_else(|| "?".to_owned(), |v| v.to_string()),
        u32_of(Config::CUBLASLT_ALGO_CONFIG_TILE_ID),
        u32_of(Config::CUBLASLT_ALGO_CONFIG_STAGES_ID),
        u32_of(Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        u32_of(Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
        u32_of(Config::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
        u32_of(Config::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
        u16_of(Config::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
    )
}

/// The variants of a heuristic result (`rank`: its place in the heuristic's order), unchecked: split-k for every
/// result whose algorithm can split k; cluster shape, pipeline stages and tile, each alone, for the first
/// [`SHAPE_VARIANT_RANKS`].
fn variants(algo: &sys::cublasLtMatmulAlgo_t, rank: usize) -> Vec<sys::cublasLtMatmulAlgo_t> {
    use sys::cublasLtMatmulAlgoCapAttributes_t as Cap;
    use sys::cublasLtMatmulAlgoConfigAttributes_t as Config;
    use sys::cublasLtReductionScheme_t as Reduction;
    let mut variants = Vec::new();
    if capability::<i32>(algo, Cap::CUBLASLT_ALGO_CAP_SPLITK_SUPPORT) == Some(1) {
        let mask = capability::<u32>(algo, Cap::CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK).unwrap_or(0);
        // The splits are added through the workspace in f32 (the compute type; here also the output type), in a
        // fixed order: never in place, whose atomic additions would make the sums differ from call to call.
        let scheme =
            [Reduction::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE, Reduction::CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE]
                .map(|scheme| scheme as u32)
                .into_iter()
                .find(|scheme| mask & scheme != 0);
        for (scheme, split) in scheme.into_iter().flat_map(|scheme| SPLIT_K.map(|split| (scheme, split))) {
            let variant = with_config(algo, Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, split)
                .and_then(|v| with_config(&v, Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, scheme));
            variants.extend(variant);
        }
    }
    if rank < SHAPE_VARIANT_RANKS {
        variants.extend(
            CLUSTER_SHAPES
                .iter()
                .filter_map(|&shape| with_config(algo, Config::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, shape)),
        );
        for (cap, attribute) in [
            (Cap::CUBLASLT_ALGO_CAP_STAGES_IDS, Config::CUBLASLT_ALGO_CONFIG_STAGES_ID),
            (Cap::CUBLASLT_ALGO_CAP_TILE_IDS, Config::CUBLASLT_ALGO_CONFIG_TILE_ID),
        ] {
            variants.extend(capability_ids(algo, cap).into_iter().filter_map(|id| with_config(algo, attribute, id)));
        }
    }
    variants
}

/// An array capability of `algo` (`CUBLASLT_ALGO_CAP_STAGES_IDS`, `_TILE_IDS`: uint32 ids), empty when cuBLASLt does
/// not answer. The size is asked first, as the header describes ("If sizeInBytes is 0 and sizeWritten is not NULL,
/// then the function returns the number of bytes needed").
fn capability_ids(algo: &sys::cublasLtMatmulAlgo_t, attribute: sys::cublasLtMatmulAlgoCapAttributes_t) -> Vec<u32> {
    let mut bytes = 0usize;
    // SAFETY: a size query: no buffer is written.
    let asked = unsafe { sys::cublasLtMatmulAlgoCapGetAttribute(algo, attribute, std::ptr::null_mut(), 0, &mut bytes) };
    if asked.result().is_err() || bytes == 0 {
        return Vec::new();
    }
    let mut ids = vec![0u32; bytes.div_ceil(4)];
    let mut written = 0usize;
    // SAFETY: `ids` holds at least `bytes` bytes, the size passed.
    let read = unsafe {
        sys::cublasLtMatmulAlgoCapGetAttribute(algo, attribute, ids.as_mut_ptr() as *mut c_void, bytes, &mut written)
    };
    if read.result().is_err() {
        return Vec::new();
    }
    ids.truncate(written / 4);
    ids
}

impl BlasLt {
    /// Whether `algo` runs `plan`'s GEMM (`cublasLtMatmulAlgoCheck`) with at most our workspace and buffers aligned to
    /// `alignment` bytes.
    fn check(&self, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t, alignment: u32) -> bool {
        use sys::cublasLtMatmulAlgoCapAttributes_t as Cap;
        // SAFETY: zeroed results are plain data, written by the check.
        let mut checked: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        // SAFETY: the handle and descriptors are live; `algo` and `checked` are live values of their types.
        let status = unsafe {
            sys::cublasLtMatmulAlgoCheck(
                self.handle,
                plan.desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                algo,
                &mut checked,
            )
        };
        // A variant keeps its base's alignment needs, which the heuristic matched to `alignment`; asked anyway, since
        // a variant that needs more would fail only at the call.
        let aligned = [
            Cap::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_A_BYTES,
            Cap::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_B_BYTES,
            Cap::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_C_BYTES,
            Cap::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_D_BYTES,
        ]
        .into_iter()
        .all(|cap| capability::<u32>(algo, cap).is_none_or(|needed| needed <= alignment));
        status.result().is_ok()
            && checked.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && checked.workspaceSize <= WORKSPACE_BYTES
            && aligned
    }

    /// The tuned algorithm for `key`'s bucket, if one was tuned and it runs `plan`'s GEMM (a different token count
    /// than the bucket's may not suit every algorithm: then the heuristic decides).
    pub(super) fn tuned_algo(&self, plan: &Plan, key: PlanKey) -> Option<sys::cublasLtMatmulAlgo_t> {
        let tune_key = TuneKey::of(key)?;
        let Some(TunedChoice::Cublaslt(algo)) = lock(&self.tunings).entries.get(&tune_key).and_then(|(c, _)| *c) else {
            return None;
        };
        self.check(plan, &algo, key.alignment).then_some(algo)
    }

    /// Every candidate for `plan` (descriptors of one bucket): the heuristic's results in its order, then their
    /// variants, each checked, without repeats, at most [`MAX_CANDIDATES`]. The first is the heuristic's choice.
    fn candidates(&self, plan: &Plan, alignment: u32) -> Result<Vec<Candidate>, KernelError> {
        let results = self.heuristic(plan, alignment, HEURISTIC_RESULTS).map_err(|e| KernelError::Cuda {
            op: "cuBLASLt algorithm",
            message: format!("the heuristic for the tuning's candidates at {alignment}-byte alignment: {e:?}"),
        })?;
        let mut seen = HashSet::new();
        let mut candidates = Vec::new();
        let bases = results.iter().map(|r| r.algo);
        let derived = results.iter().enumerate().flat_map(|(rank, r)| variants(&r.algo, rank));
        for algo in bases.chain(derived) {
            if candidates.len() == MAX_CANDIDATES {
                break;
            }
            // The heuristic's first choice is what runs untuned, whatever it is; the others must add their splits in
            // a fixed order.
            let fixed_order = candidates.is_empty() || !splits_in_place(&algo);
            if fixed_order && seen.insert(algo) && self.check(plan, &algo, alignment) {
                candidates.push(Candidate { algo });
            }
        }
        Ok(candidates)
    }
}

impl CudaDevice {
    /// Tunes the expert path's cuBLASLt GEMM of `(n, k)` for the bucket of `tokens` on `experts` experts' weights
    /// (`[experts, n, k]` codes, rotated call by call), unless tuning is off, the count is not tuned, or it was tuned
    /// before. The expert path does this itself on first use, over all of a layer's experts; a caller whose first use
    /// would see fewer weights than a serving step reads (`bench gpu`'s one-expert cases: L2 would hold them) tunes
    /// first.
    pub fn tune_fp8_expert_gemm(
        &self,
        n: usize,
        k: usize,
        tokens: usize,
        weights: &CudaView<'_, u8>,
        experts: usize,
    ) -> Result<(), KernelError> {
        let need = n.checked_mul(k).and_then(|weight| weight.checked_mul(experts));
        if experts == 0 || need.is_none_or(|need| weights.len() < need) {
            return Err(KernelError::invalid(
                "cuBLASLt tuning",
                format!("{} weight codes cannot hold {experts} experts of {n} x {k}", weights.len()),
            ));
        }
        self.ensure_fp8_tuned(n, k, tokens, TuningWeights { weights, experts })
    }

    /// Tunes the FP8 GEMM of `(n, k)` for the bucket of `tokens`, unless tuning is off, the count is not tuned, or
    /// it was tuned before.
    pub(super) fn ensure_fp8_tuned(
        &self,
        n: usize,
        k: usize,
        tokens: usize,
        weights: TuningWeights<'_, '_>,
    ) -> Result<(), KernelError> {
        let Some(bucket) = cublaslt_token_bucket(tokens).filter(|_| tuning_enabled()) else {
            return Ok(());
        };
        let key = TuneKey { n, k, bucket };
        let blas = self.blas()?;
        if lock(&blas.tunings).entries.contains_key(&key) {
            return Ok(());
        }
        // A forced choice is not a measured one: it neither comes from the cache nor goes to it.
        let cache = warpgroup_mode() != WarpgroupMode::Force;
        if let Some((choice, row)) = self.cached_tuning(&blas, key).filter(|_| cache) {
            lock(&blas.tunings).entries.insert(key, (Some(choice), row));
            return Ok(());
        }
        // A tuning that fails leaves the heuristic's choice in place: the expert call goes on, and the report says why.
        let tuned = match self.tune_fp8(&blas, key, weights) {
            Ok((choice, row)) => (Some(choice), row),
            Err(error) => {
                tracing::warn!(n, k, bucket, %error, "cuBLASLt tuning failed; the heuristic's algorithm runs");
                let failed = format!("tuning failed: {error}");
                let row = GemmTuningRow {
                    n,
                    k,
                    tokens: bucket,
                    alignment: 0,
                    candidates: 0,
                    heuristic_us: None,
                    tuned_us: None,
                    lone_us: None,
                    warpgroup_us: None,
                    heuristic: "-".to_owned(),
                    tuned: failed,
                    cached: false,
                    runners_up: Vec::new(),
                };
                (None, row)
            }
        };
        let mut tunings = lock(&blas.tunings);
        if let (Some(choice), Some(cache), true) = (tuned.0, tunings.cache.as_ref(), cache) {
            if let Some(file) = &cache.file {
                add_to_tuning_cache(
                    file,
                    &cache.identity,
                    &TuningRecord { row: tuned.1.clone(), choice: choice.record() },
                );
            }
        }
        tunings.entries.insert(key, tuned);
        Ok(())
    }

    /// The tuning of `key` an earlier process cached for this kind of GPU and cuBLASLt release, if what it chose
    /// still runs the bucket's GEMM here (cuBLASLt passes the algorithm; our kernel takes the shape). Reads the cache
    /// file on first use.
    fn cached_tuning(&self, blas: &BlasLt, key: TuneKey) -> Option<(TunedChoice, GemmTuningRow)> {
        let record = {
            let mut tunings = lock(&blas.tunings);
            let cache = tunings.cache.get_or_insert_with(|| {
                // SAFETY: cuBLASLt is loaded (the handle exists); the call only returns a number.
                let version = unsafe { sys::cublasLtGetVersion() };
                let identity = format!("{}; {} SMs; {}; cuBLASLt {version}", self.name(), self.sms(), self.arch());
                let file = tuning_cache_dir().map(|dir| tuning_cache_file(&dir, &identity));
                let records = file.as_ref().map(|file| read_tuning_cache(file, &identity)).unwrap_or_default();
                TuningCache { file, identity, records }
            });
            cache.records.get(&(key.n, key.k, key.bucket))?.clone()
        };
        let own =
            |kernel| self.own_kernels(key).contains(&kernel).then_some((TunedChoice::Own(kernel), record.row.clone()));
        let data = match record.choice {
            CachedChoice::LoneKernel => return own(OwnKernel::Lone),
            CachedChoice::WarpgroupKernel(launch) => return own(OwnKernel::Warpgroup(launch)),
            CachedChoice::Cublaslt(data) => data,
        };
        let algo = sys::cublasLtMatmulAlgo_t { data };
        let alignment = record.row.alignment;
        let plan =
            blas.describe(PlanKey { alignment, ..PlanKey::new(tuned_operands(), key.bucket, key.n, key.k, &[]) });
        plan.ok().filter(|plan| blas.check(plan, &algo, alignment)).map(|_| (TunedChoice::Cublaslt(algo), record.row))
    }

    /// Our kernels that take `key`'s GEMM (its bucket's token count and shape), each launch the tuning would time:
    /// the lone-expert kernel up to 32 tokens; the warpgroup kernel's launches for 33..=128 on a Hopper GPU whose
    /// wgmma layouts `wgmma_probe` confirmed (asked here the first time: one small launch).
    fn own_kernels(&self, key: TuneKey) -> Vec<OwnKernel> {
        let TuneKey { n, k, bucket } = key;
        let mut kernels = Vec::new();
        if k % MMA_CHUNK == 0 && LoneExpertGrid::new(bucket, n, k, self.sms(), None).is_ok() {
            kernels.push(OwnKernel::Lone);
        }
        let warpgroup = (WARPGROUP_MIN_TOKENS..=WARPGROUP_MAX_TOKENS).contains(&bucket)
            && warpgroup_mode() != WarpgroupMode::Off
            && self.arch() == "compute_90";
        if warpgroup {
            let launches = WarpgroupLaunch::candidates(n, k, self.sms());
            let takes = |launch: &WarpgroupLaunch| WarpgroupExpertGrid::new(bucket, n, k, *launch).is_ok();
            if launches.iter().any(takes) {
                match self.wgmma_reading() {
                    Ok(_) => kernels.extend(launches.into_iter().filter(takes).map(OwnKernel::Warpgroup)),
                    Err(error) => tracing::warn!(%error, "the warpgroup expert kernel is not used on this GPU"),
                }
            }
        }
        kernels
    }

    /// Which of our kernels the tuning of `(n, k)` for the bucket of `tokens` chose, if it chose one, tuning it first
    /// (on `weights`) if it was not yet.
    pub(super) fn tuned_own_kernel(
        &self,
        n: usize,
        k: usize,
        tokens: usize,
        weights: TuningWeights<'_, '_>,
    ) -> Result<Option<OwnKernel>, KernelError> {
        self.ensure_fp8_tuned(n, k, tokens, weights)?;
        let Some(bucket) = cublaslt_token_bucket(tokens) else { return Ok(None) };
        let key = TuneKey { n, k, bucket };
        let choice = lock(&self.blas()?.tunings).entries.get(&key).and_then(|(choice, _)| *choice);
        Ok(match choice {
            Some(TunedChoice::Own(kernel)) => Some(kernel),
            _ => None,
        })
    }

    /// What tuning found so far on this device: one row per shape and bucket, in that order.
    pub fn cublaslt_tunings(&self) -> Result<Vec<GemmTuningRow>, KernelError> {
        Ok(lock(&self.blas()?.tunings).entries.values().map(|(_, row)| row.clone()).collect())
    }

    /// Times every candidate for `key` and returns the fastest with its report row.
    fn tune_fp8(
        &self,
        blas: &BlasLt,
        key: TuneKey,
        weights: TuningWeights<'_, '_>,
    ) -> Result<(TunedChoice, GemmTuningRow), KernelError> {
        const OP: &str = "cuBLASLt tuning";
        let TuneKey { n, k, bucket } = key;
        let weight = n * k;
        if weights.experts == 0 || weights.weights.len() < weights.experts * weight {
            return Err(KernelError::invalid(
                OP,
                format!("{} weight codes for {} experts of {n} x {k}", weights.weights.len(), weights.experts),
            ));
        }
        let stream = self.stream();
        // Random activations: our kernels' sums are compared with cuBLASLt's before they may compete.
        let a = self.upload(&random_codes(bucket * k, 0x7475_6e65 ^ weight as u64))?;
        let mut out = self.zeros::<f32>(bucket * n)?;
        // Raw pointers for the cuBLASLt calls: the buffers live to the end of this function, and everything runs on
        // this one stream.
        let w_ptr = weights.weights.device_ptr(stream).0;
        let a_ptr = a.device_ptr(stream).0;
        let out_ptr = out.device_ptr_mut(stream).0;
        // The alignment every timed call has (expert e's weights start e * n * k bytes in). The expert path's calls
        // have the same: its weights and buffers are whole allocations, its offsets multiples of k and n. A call
        // with less runs the tuned algorithm only where its alignment needs allow (`BlasLt::tuned_algo`).
        let plan = PlanKey::new(tuned_operands(), bucket, n, k, &[w_ptr, weight as u64, a_ptr, out_ptr]);
        let alignment = plan.alignment;
        let plan = blas.describe(plan)?;
        let mut candidates = blas.candidates(&plan, alignment)?;
        let Some(first) = candidates.first().map(|candidate| Candidate { algo: candidate.algo }) else {
            return Err(KernelError::Cuda {
                op: "cuBLASLt algorithm",
                message: format!(
                    "no FP8 GEMM algorithm for m = {bucket}, n = {n}, k = {k} at {alignment}-byte alignment"
                ),
            });
        };
        let mut row = GemmTuningRow {
            n,
            k,
            tokens: bucket,
            alignment,
            candidates: candidates.len(),
            heuristic_us: None,
            tuned_us: None,
            lone_us: None,
            warpgroup_us: None,
            heuristic: describe(&first.algo),
            tuned: describe(&first.algo),
            cached: false,
            runners_up: Vec::new(),
        };
        let experts = weights.experts;
        let plan = &plan;
        let workspace = &blas.workspace;
        // SAFETY: `w` is expert (call mod experts) of the checked weights, `a` and `out` hold the bucket's rows, all
        // live for this function on this stream; every algorithm was checked against `plan` with at most our
        // workspace, which is locked for the call.
        let run = |algo: &sys::cublasLtMatmulAlgo_t, call: usize| unsafe {
            let w = w_ptr + ((call % experts) * weight) as u64;
            let mut workspace = lock(workspace);
            let (workspace_ptr, _workspace_sync) = workspace.device_ptr_mut(stream);
            blas.matmul(plan, algo, w, a_ptr, out_ptr, 0.0, workspace_ptr, stream)
        };
        // The heuristic's choice must run (the untuned path would fail on it too); its sums are the reference our
        // kernels are checked against.
        run(&first.algo, 0).map_err(blas_error("FP8 matmul (tuning)"))?;
        let own = self.own_kernels(key);
        let checked = if own.is_empty() || weights.weights.len() != experts * weight {
            None
        } else {
            let reference = self.download(&out)?;
            Some(self.checked_own_kernels(key, own, &a, weights, &reference)?)
        };
        let (own_scratch, own) = match checked {
            Some((scratch, kernels)) if !kernels.is_empty() => (Some(RefCell::new(scratch)), kernels),
            _ => (None, Vec::new()),
        };
        // A forced warpgroup kernel wins whatever cuBLASLt's other candidates take: only the heuristic's is timed.
        if warpgroup_mode() == WarpgroupMode::Force && own.iter().any(|k| matches!(k, OwnKernel::Warpgroup(_))) {
            candidates.truncate(1);
        }
        if candidates.len() == 1 && own.is_empty() {
            return Ok((TunedChoice::Cublaslt(first.algo), row));
        }
        let a_view = a.as_view();
        let mut choices: Vec<TunedChoice> = candidates.iter().map(|c| TunedChoice::Cublaslt(c.algo)).collect();
        let mut paths: Vec<BoxedPath<'_>> = candidates
            .iter()
            .map(|candidate| {
                Box::new(move |call: usize| run(&candidate.algo, call).map_err(blas_error("FP8 matmul (tuning)")))
                    as BoxedPath<'_>
            })
            .collect();
        if let Some(scratch) = own_scratch.as_ref() {
            let a = &a_view;
            for kernel in own {
                choices.push(TunedChoice::Own(kernel));
                paths.push(Box::new(move |call: usize| {
                    scratch.borrow_mut().run(self, a, weights, key, call % experts, kernel)
                }));
            }
        }
        // One call of each other candidate first: one the check passed but the call refuses is dropped, not the
        // expert call.
        let mut kept = vec![0];
        kept.extend((1..paths.len()).filter(|&i| paths[i](0).is_ok()));
        let mut timed: Vec<TimedPath<'_>> = Vec::with_capacity(kept.len());
        for (i, path) in paths.iter_mut().enumerate() {
            if kept.contains(&i) {
                timed.push(&mut **path);
            }
        }
        row.candidates = kept.len();
        let medians = interleaved_medians_us(self, SCHEDULE, &mut timed)?;
        let mut ranked: Vec<(usize, f64)> = kept.iter().copied().zip(medians.iter().copied()).collect();
        ranked.sort_by(|(_, a), (_, b)| a.total_cmp(b));
        let forced = ranked
            .iter()
            .find(|&&(i, _)| matches!(choices[i], TunedChoice::Own(OwnKernel::Warpgroup(_))))
            .filter(|_| warpgroup_mode() == WarpgroupMode::Force);
        let Some(&(best, best_us)) = forced.or(ranked.first()) else {
            return Ok((TunedChoice::Cublaslt(first.algo), row));
        };
        let fastest =
            |wanted: fn(TunedChoice) -> bool| ranked.iter().find(|&&(i, _)| wanted(choices[i])).map(|&(_, us)| us);
        row.heuristic_us = medians.first().copied();
        row.tuned_us = Some(best_us);
        row.lone_us = fastest(|choice| choice == TunedChoice::Own(OwnKernel::Lone));
        row.warpgroup_us = fastest(|choice| matches!(choice, TunedChoice::Own(OwnKernel::Warpgroup(_))));
        row.tuned = choices[best].describe();
        row.runners_up = ranked
            .iter()
            .filter(|&&(i, _)| i != best)
            .take(RUNNERS_UP)
            .map(|&(i, us)| (choices[i].describe(), us))
            .collect();
        Ok((choices[best], row))
    }

    /// The scratch our kernels are timed with for `key`, and those of `kernels` whose run on expert 0 gave
    /// `reference` (cuBLASLt's sums of the same product) to within what two tensor-core summations may differ by;
    /// the others are left out with a warning. Our kernels, unlike cuBLASLt's, are checked where they are chosen.
    fn checked_own_kernels(
        &self,
        key: TuneKey,
        kernels: Vec<OwnKernel>,
        a: &CudaSlice<u8>,
        weights: TuningWeights<'_, '_>,
        reference: &[f32],
    ) -> Result<(OwnKernelScratch, Vec<OwnKernel>), KernelError> {
        let mut offsets = vec![key.bucket as u32; weights.experts + 1];
        offsets[0] = 0;
        let mut scratch = OwnKernelScratch {
            offsets: self.upload(&offsets)?,
            a_scale: self.zeros::<f32>(key.bucket)?,
            w_scale: self.zeros::<f32>(weights.experts * key.n)?,
            out: self.zeros::<f32>(key.bucket * key.n)?,
        };
        let mut agreeing = Vec::new();
        for kernel in kernels {
            let (n, k, bucket, kernel_name) = (key.n, key.k, key.bucket, kernel.describe());
            if let Err(error) = scratch.run(self, &a.as_view(), weights, key, 0, kernel) {
                tracing::warn!(n, k, bucket, kernel = kernel_name, %error, "our kernel failed; not used");
                continue;
            }
            if sums_agree(&self.download(&scratch.out)?, reference) {
                agreeing.push(kernel);
            } else {
                tracing::warn!(
                    n,
                    k,
                    bucket,
                    kernel = kernel_name,
                    "our kernel's sums differ from cuBLASLt's; not used"
                );
            }
        }
        Ok((scratch, agreeing))
    }
}

/// Whether `sums` are `reference` computed in another order on the tensor cores. Hopper's FP8 MMAs add with fewer
/// bits than f32 (2^-12 of the sum of the products' magnitudes, the kernel tests' bound), which over thousands of
/// random products can reach a percent of a small sum, so the check is loose: a relative RMS difference of at most
/// 1%, and no sum off by more than 5% of the largest. A wrong kernel (a lost or doubled partial sum, a misread
/// operand) is off by tens of percent wherever it is wrong.
fn sums_agree(sums: &[f32], reference: &[f32]) -> bool {
    if sums.len() != reference.len() {
        return false;
    }
    let (mut difference, mut energy, mut largest, mut worst) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&s, &r) in sums.iter().zip(reference) {
        let (s, r) = (f64::from(s), f64::from(r));
        difference += (s - r) * (s - r);
        energy += r * r;
        largest = largest.max(r.abs());
        worst = worst.max((s - r).abs());
    }
    // NaN anywhere fails both comparisons.
    difference <= 1e-4 * energy && worst <= 0.05 * largest
}

/// What timing our kernels needs besides the activations and weights the cuBLASLt candidates use: the grouped-GEMM
/// arguments they take (offsets of one expert's slots, unit scales; raw sums) and their own output.
struct OwnKernelScratch {
    offsets: CudaSlice<u32>,
    a_scale: CudaSlice<f32>,
    w_scale: CudaSlice<f32>,
    out: CudaSlice<f32>,
}

impl OwnKernelScratch {
    /// `kernel` on `a` (the bucket's activations) and expert `expert` of `weights`.
    fn run(
        &mut self,
        device: &CudaDevice,
        a: &CudaView<'_, u8>,
        weights: TuningWeights<'_, '_>,
        key: TuneKey,
        expert: usize,
        kernel: OwnKernel,
    ) -> Result<(), KernelError> {
        let gemm = GroupedGemm {
            a,
            a_scale: &self.a_scale.as_view(),
            offsets: &self.offsets.as_view(),
            w: weights.weights,
            w_scale: &self.w_scale.as_view(),
            n: key.n,
            k: key.k,
            apply_scales: false,
        };
        let out = &mut self.out.as_view_mut();
        match kernel {
            OwnKernel::Lone => device.fp8_lone_expert_gemm(&gemm, expert, 0, key.bucket, None, out),
            OwnKernel::Warpgroup(launch) => device.fp8_warpgroup_expert_gemm(&gemm, expert, 0, key.bucket, launch, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lone_kernel_check_allows_summation_order_and_catches_lost_sums() {
        let reference: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25).collect();
        let reordered: Vec<f32> = reference.iter().map(|r| r * (1.0 + 1e-4) + 1e-3).collect();
        assert!(sums_agree(&reordered, &reference));
        let mut lost = reference.clone();
        lost[500..525].iter_mut().for_each(|s| *s *= 0.5);
        assert!(!sums_agree(&lost, &reference), "one row block's partial sum lost");
        let mut nan = reference.clone();
        nan[3] = f32::NAN;
        assert!(!sums_agree(&nan, &reference));
        assert!(!sums_agree(&reference[1..], &reference));
    }

    #[test]
    fn only_tuned_unscaled_fp8_plans_use_a_tuning() {
        let key = |operands, m, tuned| PlanKey { operands, m, n: 64, k: 32, alignment: 256, tuned };
        let fp8 = Operands::Fp8 { outer_vector: false };
        assert_eq!(TuneKey::of(key(fp8, 40, true)), Some(TuneKey { n: 64, k: 32, bucket: 64 }));
        assert_eq!(TuneKey::of(key(fp8, 40, false)), None);
        assert_eq!(TuneKey::of(key(Operands::Fp8 { outer_vector: true }, 40, true)), None);
        assert_eq!(TuneKey::of(key(Operands::F32, 40, true)), None);
        assert_eq!(TuneKey::of(key(fp8, 4096, true)), None);
    }
}
