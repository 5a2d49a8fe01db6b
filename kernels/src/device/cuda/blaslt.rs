//! cuBLASLt's FP8 GEMM through cudarc's sys bindings (its safe `Matmul` has no FP8).
//!
//! `out[m, n] = a[m, k] · w[n, k]^T` with E4M3 `a` and `w`, f32 output. Row-wise scales either go into cuBLASLt as
//! outer-vector scales (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`, cuBLAS 12.9+: one f32 per row of each operand)
//! or, where cuBLASLt finds no algorithm with them (the first call per shape tells), the GEMM runs with unit scales
//! and the `scale_rows_cols` epilogue kernel multiplies them in afterwards (exact up to rounding: per-row and
//! per-column scales factor out of the k-sum). In cuBLASLt's column-major terms the row-major `out[m, n]` is
//! `D[n, m] = W^T[n, k] · X[k, m]` with `W` stored `[k, n]` (ld k) and transposed, `X` stored `[k, m]` (ld k): the
//! "TN" layout FP8 requires on Hopper, with 16-byte-aligned pointers and leading dimensions that are multiples of 16.
//! So `w`'s scales are the outer vector of A and `a`'s those of B.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::result;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{driver, lock, CudaDevice};
use crate::error::{check_len, product, KernelError};

/// cuBLASLt workspace: 32 MiB, what cuBLAS recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_error(op: &'static str) -> impl FnOnce(result::CublasError) -> KernelError {
    move |e| KernelError::Cuda { op, message: format!("cuBLASLt: {e:?}") }
}

/// The descriptors and algorithm of one GEMM shape, kept so repeated calls (every decode step) skip the heuristic.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
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

/// Plans by `(m, n, k, outer-vector scales)`; `None`: cuBLASLt has no algorithm with outer-vector scales there.
type PlanCache = HashMap<(usize, usize, usize, bool), Option<Arc<Plan>>>;

/// A cuBLASLt handle with its workspace and plan cache.
pub(super) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: Mutex<CudaSlice<u8>>,
    plans: Mutex<PlanCache>,
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
        Ok(BlasLt { handle, workspace: Mutex::new(workspace), plans: Mutex::new(HashMap::new()) })
    }

    /// The plan of one shape, made on first use. With `outer_vector` the descriptor takes per-row scale vectors for
    /// both operands; `Ok(None)` when cuBLASLt has no algorithm for that (the caller falls back to the epilogue).
    fn plan(&self, m: usize, n: usize, k: usize, outer_vector: bool) -> Result<Option<Arc<Plan>>, KernelError> {
        if let Some(plan) = lock(&self.plans).get(&(m, n, k, outer_vector)) {
            return Ok(plan.clone());
        }
        let plan = match self.make_plan(m, n, k, outer_vector) {
            Ok(plan) => Some(Arc::new(plan)),
            Err(_) if outer_vector => None,
            Err(e) => return Err(e),
        };
        lock(&self.plans).insert((m, n, k, outer_vector), plan.clone());
        Ok(plan)
    }

    fn make_plan(&self, m: usize, n: usize, k: usize, outer_vector: bool) -> Result<Plan, KernelError> {
        let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
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
            if outer_vector {
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer as *const u32 as _)
                    .map_err(blas_error("matmul A scale mode"))?;
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer as *const u32 as _)
                    .map_err(blas_error("matmul B scale mode"))?;
            }
        }
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        plan.layouts[0] = result::create_matrix_layout(e4m3, k64, n64, k as i64).map_err(blas_error("layout W"))?;
        plan.layouts[1] = result::create_matrix_layout(e4m3, k64, m64, k as i64).map_err(blas_error("layout X"))?;
        plan.layouts[2] = result::create_matrix_layout(f32_type, n64, m64, n as i64).map_err(blas_error("layout D"))?;
        let preference = result::create_matmul_pref().map_err(blas_error("preference"))?;
        let workspace_bytes = WORKSPACE_BYTES as u64;
        // SAFETY: all descriptors are live; the preference is destroyed right after the heuristic.
        let heuristic = unsafe {
            let set = result::set_matmul_pref_attribute(
                preference,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace_bytes as *const u64 as *const c_void,
                8,
            );
            let heuristic = set.and_then(|()| {
                result::get_matmul_algo_heuristic(
                    self.handle,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    preference,
                )
            });
            let _ = result::destroy_matmul_pref(preference);
            heuristic
        }
        .map_err(|e| KernelError::Cuda {
            op: "cuBLASLt FP8 algorithm",
            message: format!("no FP8 GEMM algorithm for m = {m}, n = {n}, k = {k}: {e:?}"),
        })?;
        plan.algo = heuristic.algo;
        Ok(plan)
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
        self.cublaslt_gemm(a, w, m, n, k, None, out).map(|_| ())
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
        let fused = self.cublaslt_gemm(a, w, m, n, k, Some(RowScales { a_scale, w_scale }), out)?;
        if !fused {
            self.scale_rows_cols(out, a_scale, w_scale)?;
        }
        Ok(fused)
    }

    /// The GEMM; with `scales`, tries the outer-vector plan and answers whether it was used (when not, the output is
    /// unscaled and the caller applies the epilogue).
    #[allow(clippy::too_many_arguments)]
    fn cublaslt_gemm(
        &self,
        a: &CudaView<'_, u8>,
        w: &CudaView<'_, u8>,
        m: usize,
        n: usize,
        k: usize,
        scales: Option<RowScales<'_, '_>>,
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
        let blas = self.blas()?;
        let fused_plan = match scales {
            Some(_) if fused_scales_allowed() => blas.plan(m, n, k, true)?,
            _ => None,
        };
        let fused = fused_plan.is_some();
        let plan = match fused_plan {
            Some(plan) => plan,
            None => blas.plan(m, n, k, false)?.ok_or_else(|| KernelError::Cuda {
                op: "cuBLASLt FP8 algorithm",
                message: format!("no FP8 GEMM algorithm for m = {m}, n = {n}, k = {k}"),
            })?,
        };
        let stream = &self.stream;
        // The workspace lock is held for the whole call: it also serialises the scale pointers set on the shared
        // descriptor. The borrows of the buffers end with this block.
        let outcome = {
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
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: pointers are live device buffers of the checked sizes on this stream; descriptors match them.
            unsafe {
                result::matmul(
                    blas.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    w_ptr as *const c_void,
                    plan.layouts[0],
                    a_ptr as *const c_void,
                    plan.layouts[1],
                    out_ptr as *const c_void,
                    plan.layouts[2],
                    out_ptr as *mut c_void,
                    plan.layouts[2],
                    &plan.algo,
                    workspace_ptr as *mut c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            }
        };
        match outcome {
            Ok(()) => Ok(fused),
            // The heuristic offered an algorithm with outer-vector scales but the call refused it: remember that
            // and use the epilogue for this shape from now on.
            Err(_) if fused => {
                lock(&blas.plans).insert((m, n, k, true), None);
                self.cublaslt_gemm(a, w, m, n, k, scales, out)
            }
            Err(e) => Err(blas_error("FP8 matmul")(e)),
        }
    }
}
