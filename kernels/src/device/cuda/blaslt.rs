//! cuBLASLt's GEMMs through cudarc's sys bindings (its safe `Matmul` has no FP8): the FP8 expert GEMM, and the
//! f32 / bf16 GEMM of dense layers (`dense_gemm`, what `CudaDevice::linear` runs). All share the "TN" layout below,
//! f32 accumulation (`CUBLAS_COMPUTE_32F`: no TF32) and f32 output, and one plan cache.
//!
//! `out[m, n] = a[m, k] · w[n, k]^T` with E4M3 `a` and `w`, f32 output. Row-wise scales either go into cuBLASLt as
//! outer-vector scales (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`, cuBLAS 12.9+: one f32 per row of each operand)
//! or, where cuBLASLt finds no algorithm with them (the first call per shape tells), the GEMM runs with unit scales
//! and the `scale_rows_cols` epilogue kernel multiplies them in afterwards (exact up to rounding: per-row and
//! per-column scales factor out of the k-sum). In cuBLASLt's column-major terms the row-major `out[m, n]` is
//! `D[n, m] = W^T[n, k] · X[k, m]` with `W` stored `[k, n]` (ld k) and transposed, `X` stored `[k, m]` (ld k): the
//! "TN" layout FP8 requires on Hopper, with 16-byte-aligned pointers and leading dimensions that are multiples of 16.
//! So `w`'s scales are the outer vector of A and `a`'s those of B.
//!
//! cuBLASLt's heuristic assumes 256-byte-aligned buffers unless told otherwise, and callers pass views into larger
//! buffers: every plan is made for the alignment the call's pointers actually have (part of the plan's key).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::result;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};

use super::gemm_tuning::{TuningTable, TuningWeights};
use super::kernels::GroupedGemm;
use super::{driver, lock, CudaDevice};
use crate::error::{check_len, product, KernelError};

/// cuBLASLt workspace: 32 MiB, what cuBLAS recommends for Hopper.
pub(super) const WORKSPACE_BYTES: usize = 32 << 20;

pub(super) fn blas_error(op: &'static str) -> impl FnOnce(result::CublasError) -> KernelError {
    move |e| KernelError::Cuda { op, message: format!("cuBLASLt: {e:?}") }
}

/// The descriptors and algorithm of one GEMM shape, kept so repeated calls (every decode step) skip the heuristic.
pub(super) struct Plan {
    pub(super) desc: sys::cublasLtMatmulDesc_t,
    /// W (A), X (B), out (C and D).
    pub(super) layouts: [sys::cublasLtMatrixLayout_t; 3],
    pub(super) algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `BlasLt::plan` and destroyed once, here.
        unsafe {
            let _ = result::destroy_matmul_desc(self.desc);
            for layout in self.layouts {
                let _ = result::destroy_matrix_layout(layout);
            }
        }
    }
}

/// What the operands A (the weight) and B (the activations) hold; C and D are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Operands {
    /// E4M3 codes; with `outer_vector`, per-row f32 scales of both go into cuBLASLt.
    Fp8 { outer_vector: bool },
    /// f32 (computed as f32: `CUBLAS_COMPUTE_32F` never uses TF32).
    F32,
    /// bf16.
    Bf16,
}

impl Operands {
    fn data_type(self) -> sys::cudaDataType {
        match self {
            Operands::Fp8 { .. } => sys::cudaDataType::CUDA_R_8F_E4M3,
            Operands::F32 => sys::cudaDataType::CUDA_R_32F,
            Operands::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// Everything a plan depends on. `alignment`: the largest power of two up to 256 dividing every pointer of the call.
/// `tuned`: the algorithm is the one `gemm_tuning` timed fastest for the shape's token bucket, where it has one (the
/// expert path); else cuBLASLt's heuristic's first choice (everything else, and `bench gpu`'s cuBLASLt column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct PlanKey {
    pub(super) operands: Operands,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) alignment: u32,
    pub(super) tuned: bool,
}

impl PlanKey {
    pub(super) fn new(operands: Operands, m: usize, n: usize, k: usize, pointers: &[u64]) -> Self {
        let all = pointers.iter().fold(0u64, |acc, &p| acc | p);
        let alignment = if all == 0 { 256 } else { (1u64 << all.trailing_zeros()).min(256) as u32 };
        PlanKey { operands, m, n, k, alignment, tuned: false }
    }
}

/// Plans by key; `None`: cuBLASLt has no algorithm with outer-vector scales there.
type PlanCache = HashMap<PlanKey, Option<Arc<Plan>>>;

/// An element type of dense GEMM operands, and what cuBLASLt calls it.
pub(super) trait DenseElement: DeviceRepr {
    /// The operands' description in the plan key.
    const OPERANDS: Operands;
}

impl DenseElement for f32 {
    const OPERANDS: Operands = Operands::F32;
}

/// bf16 bits.
impl DenseElement for u16 {
    const OPERANDS: Operands = Operands::Bf16;
}

/// A cuBLASLt handle with its workspace and plan cache, and the scratch buffer bf16 GEMM inputs are converted into.
pub(super) struct BlasLt {
    pub(super) handle: sys::cublasLtHandle_t,
    pub(super) workspace: Mutex<CudaSlice<u8>>,
    plans: Mutex<PlanCache>,
    bf16_scratch: Mutex<Option<CudaSlice<u16>>>,
    /// What `gemm_tuning` found, by shape and token bucket.
    pub(super) tunings: Mutex<TuningTable>,
}

// SAFETY: the handle and descriptors are plain pointers cuBLASLt allows to be used from any thread; every use goes
// through `&self` with the workspace behind a mutex, and all work is ordered on one stream.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        lock(&self.plans).clear();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}

impl BlasLt {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Self, KernelError> {
        let handle = result::create_handle().map_err(blas_error("handle creation"))?;
        let workspace = match stream.alloc_zeros::<u8>(WORKSPACE_BYTES) {
            Ok(workspace) => workspace,
            Err(e) => {
                // SAFETY: just created.
                unsafe {
                    let _ = result::destroy_handle(handle);
                }
                return Err(driver("cuBLASLt workspace allocation")(e));
            }
        };
        Ok(BlasLt {
            handle,
            workspace: Mutex::new(workspace),
            plans: Mutex::new(HashMap::new()),
            bf16_scratch: Mutex::new(None),
            tunings: Mutex::new(TuningTable::default()),
        })
    }

    /// The plan of one shape, made on first use. With outer-vector FP8 operands the descriptor takes per-row scale
    /// vectors for both; `Ok(None)` when cuBLASLt has no algorithm for that (the caller falls back to the epilogue).
    fn plan(&self, key: PlanKey) -> Result<Option<Arc<Plan>>, KernelError> {
        if let Some(plan) = lock(&self.plans).get(&key) {
            return Ok(plan.clone());
        }
        let plan = match self.make_plan(key) {
            Ok(plan) => Some(Arc::new(plan)),
            Err(_) if key.operands == (Operands::Fp8 { outer_vector: true }) => None,
            Err(e) => return Err(e),
        };
        lock(&self.plans).insert(key, plan.clone());
        Ok(plan)
    }

    fn make_plan(&self, key: PlanKey) -> Result<Plan, KernelError> {
        let mut plan = self.describe(key)?;
        if key.tuned {
            if let Some(algo) = self.tuned_algo(&plan, key) {
                plan.algo = algo;
                return Ok(plan);
            }
        }
        let PlanKey { operands, m, n, k, alignment, .. } = key;
        let none = |why: String| KernelError::Cuda {
            op: "cuBLASLt algorithm",
            message: format!(
                "no {operands:?} GEMM algorithm for m = {m}, n = {n}, k = {k}, {alignment}-byte alignment: {why}"
            ),
        };
        let results = self.heuristic(&plan, alignment, 1).map_err(|e| none(format!("{e:?}")))?;
        let first = results.into_iter().next().ok_or_else(|| none("the heuristic returned none".into()))?;
        plan.algo = first.algo;
        Ok(plan)
    }

    /// The descriptors of `key`'s GEMM, with no algorithm chosen yet (all zeros).
    pub(super) fn describe(&self, key: PlanKey) -> Result<Plan, KernelError> {
        let PlanKey { operands, m, n, k, .. } = key;
        let input_type = operands.data_type();
        let f32_type = sys::cudaDataType::CUDA_R_32F;
        let desc = result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32_type)
            .map_err(blas_error("matmul descriptor"))?;
        // Owned from here on, so an early return destroys what was made.
        // SAFETY: cublasLtMatmulAlgo_t is plain data (an array of u64) for which all zeros is a valid value.
        let mut plan = Plan { desc, layouts: [std::ptr::null_mut(); 3], algo: unsafe { std::mem::zeroed() } };
        let transpose: i32 = 1;
        let no_transpose: i32 = 0;
        let outer = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as u32;
        // SAFETY: the descriptor is live; the buffers have the types the attributes require (int32 / the scale-mode
        // enum, 4 bytes).
        unsafe {
            let set = |attribute, value: *const c_void| result::set_matmul_desc_attribute(desc, attribute, value, 4);
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &transpose as *const i32 as _)
                .map_err(blas_error("matmul TRANSA"))?;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &no_transpose as *const i32 as _)
                .map_err(blas_error("matmul TRANSB"))?;
            if operands == (Operands::Fp8 { outer_vector: true }) {
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer as *const u32 as _)
                    .map_err(blas_error("matmul A scale mode"))?;
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer as *const u32 as _)
                    .map_err(blas_error("matmul B scale mode"))?;
            }
        }
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        plan.layouts[0] =
            result::create_matrix_layout(input_type, k64, n64, k as i64).map_err(blas_error("layout W"))?;
        plan.layouts[1] =
            result::create_matrix_layout(input_type, k64, m64, k as i64).map_err(blas_error("layout X"))?;
        plan.layouts[2] = result::create_matrix_layout(f32_type, n64, m64, n as i64).map_err(blas_error("layout D"))?;
        Ok(plan)
    }

    /// Up to `count` of the heuristic's algorithms for `plan`'s descriptors and buffers aligned to `alignment`
    /// bytes, best first, each with the workspace it needs (at most ours).
    pub(super) fn heuristic(
        &self,
        plan: &Plan,
        alignment: u32,
        count: usize,
    ) -> Result<Vec<sys::cublasLtMatmulHeuristicResult_t>, result::CublasError> {
        let preference = result::create_matmul_pref()?;
        let workspace_bytes = WORKSPACE_BYTES as u64;
        let requested = i32::try_from(count.max(1)).unwrap_or(i32::MAX);
        // SAFETY: zeroed heuristic results are plain data, overwritten by cuBLASLt for the ones it returns.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            (0..requested).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut returned = 0i32;
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        // SAFETY: all descriptors are live; the preference is destroyed right after the heuristic; the attribute
        // values have the types cuBLASLt documents (uint64 workspace size, uint32 alignments); `results` has room
        // for `requested` entries.
        let status = unsafe {
            let mut set = result::set_matmul_pref_attribute(
                preference,
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace_bytes as *const u64 as *const c_void,
                8,
            );
            for attribute in [
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                set = set.and_then(|()| {
                    result::set_matmul_pref_attribute(
                        preference,
                        attribute,
                        &alignment as *const u32 as *const c_void,
                        4,
                    )
                });
            }
            let status = set.and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    preference,
                    requested,
                    results.as_mut_ptr(),
                    &mut returned,
                )
                .result()
            });
            let _ = result::destroy_matmul_pref(preference);
            status
        };
        status?;
        results.truncate(usize::try_from(returned).unwrap_or(0));
        results.retain(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= WORKSPACE_BYTES);
        Ok(results)
    }

    /// `D = W^T X + beta C` with `C = D = out` (the layout of the module doc) on `stream`, through `algo` (the
    /// plan's own, or a candidate being timed).
    ///
    /// # Safety
    /// The pointers are live device buffers of the sizes `plan` was made for, used in stream order on `stream`;
    /// `algo` was checked against `plan`'s descriptors and needs at most [`WORKSPACE_BYTES`] of workspace.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        w_ptr: u64,
        x_ptr: u64,
        out_ptr: u64,
        beta: f32,
        workspace_ptr: u64,
        stream: &CudaStream,
    ) -> Result<(), result::CublasError> {
        let alpha = 1.0f32;
        // SAFETY: the caller's contract (above); alpha and beta are f32, the descriptor's scale type.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w_ptr as *const c_void,
                plan.layouts[0],
                x_ptr as *const c_void,
                plan.layouts[1],
                out_ptr as *const c_void,
                plan.layouts[2],
                out_ptr as *mut c_void,
                plan.layouts[2],
                algo,
                workspace_ptr as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
    }
}

/// Whether row-wise scales may go into cuBLASLt (outer-vector scale mode): yes unless
/// `SWITCHYARD_CUBLASLT_FUSED_SCALES=0`, which forces the epilogue kernel (to test that path, or to rule the fused one
/// out when results look wrong). Read once.
fn fused_scales_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("SWITCHYARD_CUBLASLT_FUSED_SCALES").map_or(true, |v| v.trim() != "0"))
}

/// Per-row scales of both operands, on the device.
#[derive(Clone, Copy)]
pub(super) struct RowScales<'a, 'b> {
    a_scale: &'a CudaView<'b, f32>,
    w_scale: &'a CudaView<'b, f32>,
}

impl CudaDevice {
    /// cuBLASLt FP8 GEMM with unit scales: `out[m, n] = sum_c e4m3(a[m, c]) * e4m3(w[n, c])`, f32 accumulation and
    /// output. `k` and `n` must be multiples of 16 (FP8 alignment).
    pub fn fp8_gemm_cublaslt(
        &self,
        a: &CudaView<'_, u8>,
        w: &CudaView<'_, u8>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        self.cublaslt_gemm(a, w, m, n, k, None, None, out).map(|_| ())
    }

    /// cuBLASLt FP8 GEMM with row-wise scales: `out[i, o] = a_scale[i] * w_scale[o] * sum_c e4m3(a[i, c]) *
    /// e4m3(w[o, c])`, the scales inside cuBLASLt where it supports outer-vector scaling for the shape, else through
    /// the `scale_rows_cols` epilogue. Returns whether the scales were fused.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_gemm_cublaslt_scaled(
        &self,
        a: &CudaView<'_, u8>,
        a_scale: &CudaView<'_, f32>,
        w: &CudaView<'_, u8>,
        w_scale: &CudaView<'_, f32>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<bool, KernelError> {
        const OP: &str = "cublaslt fp8 gemm";
        check_len(OP, "a_scale", a_scale.len(), m, "m")?;
        check_len(OP, "w_scale", w_scale.len(), n, "n")?;
        let fused = self.cublaslt_gemm(a, w, m, n, k, Some(RowScales { a_scale, w_scale }), None, out)?;
        if !fused {
            self.scale_rows_cols(out, a_scale, w_scale)?;
        }
        Ok(fused)
    }

    /// One expert's GEMM of the expert path through cuBLASLt: `tokens` rows from slot `first` of `gemm.a` times
    /// expert `expert` of `gemm.w`, into the same rows of `out` (all experts' slots), scaled or raw as
    /// `gemm.apply_scales` says. The raw GEMM runs the algorithm tuned for its shape and token bucket
    /// (`gemm_tuning`), timed over all of `gemm.w`'s experts on first use.
    pub(super) fn fp8_expert_gemm_cublaslt(
        &self,
        gemm: &GroupedGemm<'_, '_>,
        expert: usize,
        first: usize,
        tokens: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cublaslt expert gemm";
        let GroupedGemm { a, a_scale, w, w_scale, n, k, apply_scales, .. } = *gemm;
        let weight = product(OP, n, k)?;
        let a_part = a.slice(first * k..(first + tokens) * k);
        let w_part = w.slice(expert * weight..(expert + 1) * weight);
        let mut out_part = out.slice_mut(first * n..(first + tokens) * n);
        if apply_scales {
            let a_scale_part = a_scale.slice(first..first + tokens);
            let w_scale_part = w_scale.slice(expert * n..(expert + 1) * n);
            return self
                .fp8_gemm_cublaslt_scaled(&a_part, &a_scale_part, &w_part, &w_scale_part, tokens, n, k, &mut out_part)
                .map(|_| ());
        }
        let tuning = TuningWeights { weights: w, experts: w.len() / weight };
        self.cublaslt_gemm(&a_part, &w_part, tokens, n, k, None, Some(tuning), &mut out_part).map(|_| ())
    }

    /// The GEMM; with `scales`, tries the outer-vector plan and answers whether it was used (when not, the output is
    /// unscaled and the caller applies the epilogue). With `tuning`, the unscaled GEMM runs the tuned algorithm of
    /// its bucket, tuning it first on `tuning`'s weights if it is the bucket's first call.
    #[allow(clippy::too_many_arguments)]
    fn cublaslt_gemm(
        &self,
        a: &CudaView<'_, u8>,
        w: &CudaView<'_, u8>,
        m: usize,
        n: usize,
        k: usize,
        scales: Option<RowScales<'_, '_>>,
        tuning: Option<TuningWeights<'_, '_>>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<bool, KernelError> {
        const OP: &str = "cublaslt fp8 gemm";
        if k == 0 || k % 16 != 0 || n == 0 || n % 16 != 0 {
            return Err(KernelError::invalid(OP, format!("k = {k} and n = {n} must be positive multiples of 16")));
        }
        check_len(OP, "a", a.len(), product(OP, m, k)?, format_args!("m * k = {m} * {k}"))?;
        check_len(OP, "w", w.len(), product(OP, n, k)?, format_args!("n * k = {n} * {k}"))?;
        check_len(OP, "out", out.len(), product(OP, m, n)?, format_args!("m * n = {m} * {n}"))?;
        if m == 0 {
            return Ok(scales.is_some());
        }
        let stream = &self.stream;
        if let Some(tuning) = tuning {
            self.ensure_fp8_tuned(n, k, m, tuning)?;
        }
        let blas = self.blas()?;
        // The workspace lock is held for the whole call: it also serialises the scale pointers set on the shared
        // descriptor. The borrows of the buffers end with this block.
        let (outcome, fused, fused_key) = {
            let mut workspace = lock(&blas.workspace);
            let (a_ptr, _a_sync) = a.device_ptr(stream);
            let (w_ptr, _w_sync) = w.device_ptr(stream);
            let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
            let (workspace_ptr, _workspace_sync) = workspace.device_ptr_mut(stream);
            if (a_ptr | w_ptr | out_ptr) % 16 != 0 {
                return Err(KernelError::invalid(
                    OP,
                    "FP8 GEMM buffers must be 16-byte aligned (offset views by 16 codes)",
                ));
            }
            let key = |outer_vector: bool| PlanKey {
                // The outer-vector GEMM is not tuned (Hopper has none; where it exists, the heuristic's choice).
                tuned: tuning.is_some() && !outer_vector,
                ..PlanKey::new(Operands::Fp8 { outer_vector }, m, n, k, &[a_ptr, w_ptr, out_ptr])
            };
            let fused_plan = match scales {
                Some(_) if fused_scales_allowed() => blas.plan(key(true))?,
                _ => None,
            };
            let fused = fused_plan.is_some();
            let plan = match fused_plan {
                Some(plan) => plan,
                None => blas.plan(key(false))?.ok_or_else(|| KernelError::Cuda {
                    op: "cuBLASLt FP8 algorithm",
                    message: format!("no FP8 GEMM algorithm for m = {m}, n = {n}, k = {k}"),
                })?,
            };
            let mut scale_syncs = Vec::new();
            if let (true, Some(scales)) = (fused, scales.as_ref()) {
                let (a_scale_ptr, a_sync) = scales.a_scale.device_ptr(stream);
                let (w_scale_ptr, w_sync) = scales.w_scale.device_ptr(stream);
                scale_syncs.push(a_sync);
                scale_syncs.push(w_sync);
                // SAFETY: the descriptor is live; the attribute values are device pointers (8 bytes), valid until the
                // GEMM queued below has run (the views outlive this call and the stream orders the work).
                unsafe {
                    let set = |attribute, pointer: &u64| {
                        result::set_matmul_desc_attribute(
                            plan.desc,
                            attribute,
                            pointer as *const u64 as *const c_void,
                            8,
                        )
                    };
                    // A is W (outer vector along n), B is X (outer vector along m).
                    set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale_ptr)
                        .map_err(blas_error("A scale pointer"))?;
                    set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &a_scale_ptr)
                        .map_err(blas_error("B scale pointer"))?;
                }
            }
            // SAFETY: pointers are live device buffers of the checked sizes on this stream; descriptors match them.
            let outcome = unsafe { blas.matmul(&plan, &plan.algo, w_ptr, a_ptr, out_ptr, 0.0, workspace_ptr, stream) };
            (outcome, fused, key(true))
        };
        match outcome {
            Ok(()) => Ok(fused),
            // The heuristic offered an algorithm with outer-vector scales but the call refused it: remember that
            // and use the epilogue for this shape from now on.
            Err(_) if fused => {
                lock(&blas.plans).insert(fused_key, None);
                self.cublaslt_gemm(a, w, m, n, k, scales, tuning, out)
            }
            Err(e) => Err(blas_error("FP8 matmul")(e)),
        }
    }

    /// The dense GEMM of `linear`: `out[m, n] = x[m, k] . w[n, k]^T`, plus `out` when `accumulate`; `x` and `w` both
    /// f32 or both bf16 bits, f32 accumulation and output. Lengths are checked here; any alignment works (the plan is
    /// made for the pointers' own).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dense_gemm<T: DenseElement>(
        &self,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        m: usize,
        n: usize,
        k: usize,
        out: &mut CudaViewMut<'_, f32>,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        const OP: &str = "cublaslt dense gemm";
        if k == 0 || n == 0 {
            return Err(KernelError::invalid(OP, format!("k = {k} and n = {n} must be positive")));
        }
        check_len(OP, "x", x.len(), product(OP, m, k)?, format_args!("m * k = {m} * {k}"))?;
        check_len(OP, "w", w.len(), product(OP, n, k)?, format_args!("n * k = {n} * {k}"))?;
        check_len(OP, "out", out.len(), product(OP, m, n)?, format_args!("m * n = {m} * {n}"))?;
        if m == 0 {
            return Ok(());
        }
        let blas = self.blas()?;
        let stream = &self.stream;
        let mut workspace = lock(&blas.workspace);
        let (x_ptr, _x_sync) = x.device_ptr(stream);
        let (w_ptr, _w_sync) = w.device_ptr(stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
        let (workspace_ptr, _workspace_sync) = workspace.device_ptr_mut(stream);
        let plan = blas.plan(PlanKey::new(T::OPERANDS, m, n, k, &[x_ptr, w_ptr, out_ptr]))?.ok_or_else(|| {
            KernelError::Cuda {
                op: "cuBLASLt algorithm",
                message: format!("no dense GEMM for m = {m}, n = {n}, k = {k}"),
            }
        })?;
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: pointers are live device buffers of the checked sizes on this stream; the plan was made for them.
        unsafe { blas.matmul(&plan, &plan.algo, w_ptr, x_ptr, out_ptr, beta, workspace_ptr, stream) }
            .map_err(blas_error("dense matmul"))
    }
    /// Runs `f` on the first `len` values of this device's bf16 scratch buffer (grown to the next power of two when
    /// too small, kept for later calls). Its lock is held during `f`, and the stream orders the work `f` queues before
    /// any later user's.
    pub(super) fn with_bf16_scratch<R>(
        &self,
        len: usize,
        f: impl FnOnce(&mut CudaViewMut<'_, u16>) -> Result<R, KernelError>,
    ) -> Result<R, KernelError> {
        let blas = self.blas()?;
        let mut scratch = lock(&blas.bf16_scratch);
        let buffer = match scratch.take() {
            Some(buffer) if buffer.len() >= len => buffer,
            // The old buffer (if any) is freed in stream order, after the work queued on it.
            _ => self.zeros::<u16>(len.max(1).next_power_of_two())?,
        };
        let buffer = scratch.insert(buffer);
        f(&mut buffer.slice_mut(..len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_key_records_the_pointers_common_alignment() {
        let key = |pointers: &[u64]| PlanKey::new(Operands::F32, 1, 2, 3, pointers).alignment;
        assert_eq!(key(&[0x7000_0000, 0x7000_1000]), 256, "capped at cuBLASLt's default");
        assert_eq!(key(&[0x7000_0000, 0x7000_0010]), 16);
        assert_eq!(key(&[0x7000_0004, 0x7000_0100, 0x7000_0200]), 4);
        assert_eq!(key(&[0]), 256);
        assert_ne!(PlanKey::new(Operands::F32, 1, 2, 3, &[0]), PlanKey::new(Operands::Bf16, 1, 2, 3, &[0]));
    }
}
