//! The emulated cuBLASLt against plain reference products: layouts, transposes, leading dimensions, alpha/beta,
//! scales, the FP8 rules it must refuse as the real library does on Hopper, and the enum values it shares with
//! cudarc. Buffers are host memory (the emulator's device memory is host memory).

use std::ffi::c_void;
use std::ptr::null_mut;

use cudarc::cublaslt::sys;
use switchyard_cuda_emulator::blaslt::{
    self, algo_cap, algo_config, compute_type, data_type, desc_attr, layout_attr, pref_attr, status, values,
    MatmulAlgo, MatmulHeuristicResult,
};

/// A 256-byte-aligned host buffer (what cuMemAlloc gives), viewed at a byte offset.
struct Buffer {
    storage: Vec<u128>,
    offset: usize,
}

impl Buffer {
    fn new(bytes: usize) -> Self {
        // u128 storage is 16-byte aligned; over-allocate to realign to 256.
        let mut buffer = Buffer { storage: vec![0u128; bytes / 16 + 32], offset: 0 };
        let misalignment = buffer.storage.as_ptr() as usize % 256;
        buffer.offset = (256 - misalignment) % 256;
        buffer
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        let mut buffer = Buffer::new(bytes.len());
        buffer.bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        buffer
    }

    fn from_f32(values: &[f32]) -> Self {
        Buffer::from_bytes(&values.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<_>>())
    }

    fn from_bf16(values: &[u16]) -> Self {
        Buffer::from_bytes(&values.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<_>>())
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.storage.len() * 16 - self.offset;
        // SAFETY: within the storage.
        unsafe { std::slice::from_raw_parts_mut((self.storage.as_mut_ptr() as *mut u8).add(self.offset), len) }
    }

    fn ptr(&self) -> u64 {
        self.storage.as_ptr() as u64 + self.offset as u64
    }

    fn f32s(&self, len: usize) -> Vec<f32> {
        // SAFETY: within the storage.
        unsafe { std::slice::from_raw_parts(self.ptr() as *const f32, len) }.to_vec()
    }
}

/// Deterministic pseudo-random values.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Descriptors of one GEMM, destroyed on drop.
struct Lt {
    handle: *mut c_void,
    desc: *mut c_void,
    layouts: [*mut c_void; 4],
    pref: *mut c_void,
}

impl Lt {
    fn new(compute: u32, scale: u32) -> Self {
        let mut lt = Lt { handle: null_mut(), desc: null_mut(), layouts: [null_mut(); 4], pref: null_mut() };
        // SAFETY: valid out-pointers.
        unsafe {
            assert_eq!(blaslt::cublasLtCreate(&mut lt.handle), status::SUCCESS);
            assert_eq!(blaslt::cublasLtMatmulDescCreate(&mut lt.desc, compute, scale), status::SUCCESS);
            assert_eq!(blaslt::cublasLtMatmulPreferenceCreate(&mut lt.pref), status::SUCCESS);
        }
        lt
    }

    fn set_i32(&self, attr: u32, value: i32) -> u32 {
        // SAFETY: 4 readable bytes.
        unsafe { blaslt::cublasLtMatmulDescSetAttribute(self.desc, attr, &value as *const i32 as *const c_void, 4) }
    }

    fn set_ptr(&self, attr: u32, value: u64) -> u32 {
        // SAFETY: 8 readable bytes.
        unsafe { blaslt::cublasLtMatmulDescSetAttribute(self.desc, attr, &value as *const u64 as *const c_void, 8) }
    }

    fn trans(&self, a: bool, b: bool) {
        assert_eq!(self.set_i32(desc_attr::TRANSA, i32::from(a)), status::SUCCESS);
        assert_eq!(self.set_i32(desc_attr::TRANSB, i32::from(b)), status::SUCCESS);
    }

    /// Layout `i` (0 A, 1 B, 2 C, 3 D).
    fn layout(&mut self, i: usize, data_type: u32, rows: u64, cols: u64, ld: i64) {
        // SAFETY: valid out-pointer.
        let created = unsafe { blaslt::cublasLtMatrixLayoutCreate(&mut self.layouts[i], data_type, rows, cols, ld) };
        assert_eq!(created, status::SUCCESS);
    }

    fn row_major(&self, i: usize) {
        let order = values::ORDER_ROW;
        // SAFETY: 4 readable bytes.
        let set = unsafe {
            blaslt::cublasLtMatrixLayoutSetAttribute(
                self.layouts[i],
                layout_attr::ORDER,
                &order as *const i32 as *const c_void,
                4,
            )
        };
        assert_eq!(set, status::SUCCESS);
    }

    fn alignment(&self, bytes: u32) {
        for attr in 5..=8 {
            // SAFETY: 4 readable bytes.
            let set = unsafe {
                blaslt::cublasLtMatmulPreferenceSetAttribute(self.pref, attr, &bytes as *const u32 as *const c_void, 4)
            };
            assert_eq!(set, status::SUCCESS);
        }
    }

    /// The heuristic's status and algorithm.
    fn heuristic(&self) -> (u32, i32, blaslt::MatmulAlgo) {
        let (status, count, results) = self.heuristics(1);
        (status, count, results[0].algo)
    }

    /// The heuristic asked for `requested` results: its status, `*returnAlgoCount` and all `requested` slots.
    fn heuristics(&self, requested: usize) -> (u32, i32, Vec<MatmulHeuristicResult>) {
        // SAFETY: plain data for which all zeros is valid.
        let mut results = vec![unsafe { std::mem::zeroed::<MatmulHeuristicResult>() }; requested];
        let mut count = -1;
        let [a, b, c, d] = self.layouts;
        // SAFETY: live objects, `requested` result slots.
        let status = unsafe {
            blaslt::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                self.desc,
                a,
                b,
                c,
                d,
                self.pref,
                requested as i32,
                results.as_mut_ptr(),
                &mut count,
            )
        };
        (status, count, results)
    }

    /// `cublasLtMatmulAlgoCheck` of `algo` for these descriptors, into a result whose fields start as garbage.
    fn check(&self, algo: &MatmulAlgo) -> (u32, MatmulHeuristicResult) {
        let mut result = MatmulHeuristicResult {
            algo: MatmulAlgo { data: [0xA5; 8] },
            workspaceSize: 12345,
            state: 99,
            wavesCount: -1.0,
            reserved: [7; 4],
        };
        let [a, b, c, d] = self.layouts;
        // SAFETY: live objects, a valid algo and result.
        let status = unsafe { blaslt::cublasLtMatmulAlgoCheck(self.handle, self.desc, a, b, c, d, algo, &mut result) };
        (status, result)
    }

    /// Runs the GEMM with `D = C` at `c` unless `d` is given.
    fn matmul(&self, alpha: f32, beta: f32, [a, b, c]: [u64; 3], d: Option<u64>) -> u32 {
        let (status, count, algo) = self.heuristic();
        if status != blaslt::status::SUCCESS {
            return status;
        }
        assert_eq!(count, 1);
        self.matmul_with(&algo, alpha, beta, [a, b, c], d)
    }

    fn matmul_with(
        &self,
        algo: &blaslt::MatmulAlgo,
        alpha: f32,
        beta: f32,
        [a, b, c]: [u64; 3],
        d: Option<u64>,
    ) -> u32 {
        self.matmul_workspace(algo, alpha, beta, [a, b, c], d, (0, 0))
    }

    /// As `matmul_with`, with a workspace (address, size in bytes).
    fn matmul_workspace(
        &self,
        algo: &blaslt::MatmulAlgo,
        alpha: f32,
        beta: f32,
        [a, b, c]: [u64; 3],
        d: Option<u64>,
        (workspace, workspace_size): (u64, usize),
    ) -> u32 {
        let [la, lb, lc, ld] = self.layouts;
        // SAFETY: the tests' buffers match the layouts.
        unsafe {
            blaslt::cublasLtMatmul(
                self.handle,
                self.desc,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                la,
                b as *const c_void,
                lb,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                lc,
                d.unwrap_or(c) as *mut c_void,
                ld,
                algo,
                workspace as *mut c_void,
                workspace_size,
                null_mut(),
            )
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `new` / `layout`.
        unsafe {
            for layout in self.layouts.into_iter().filter(|l| !l.is_null()) {
                blaslt::cublasLtMatrixLayoutDestroy(layout);
            }
            blaslt::cublasLtMatmulPreferenceDestroy(self.pref);
            blaslt::cublasLtMatmulDescDestroy(self.desc);
            blaslt::cublasLtDestroy(self.handle);
        }
    }
}

/// An f32 GEMM with tight column-major leading dimensions: A stored `m x k` (`k x m` when `transa`), B `k x n`,
/// C = D `m x n`.
fn f32_lt(compute: u32, m: usize, n: usize, k: usize, transa: bool) -> Lt {
    let mut lt = Lt::new(compute, data_type::R_32F);
    lt.trans(transa, false);
    let (a_rows, a_cols) = if transa { (k, m) } else { (m, k) };
    lt.layout(0, data_type::R_32F, a_rows as u64, a_cols as u64, a_rows as i64);
    lt.layout(1, data_type::R_32F, k as u64, n as u64, k as i64);
    lt.layout(2, data_type::R_32F, m as u64, n as u64, m as i64);
    lt.layout(3, data_type::R_32F, m as u64, n as u64, m as i64);
    lt
}

/// Column-major (or row-major) element (r, c) of a stored matrix.
fn at(data: &[f32], row_major: bool, ld: usize, r: usize, c: usize) -> f32 {
    if row_major {
        data[r * ld + c]
    } else {
        data[r + c * ld]
    }
}

fn assert_close(got: f32, want: f64, what: &str) {
    let tolerance = 1e-5 * want.abs().max(1.0);
    assert!((f64::from(got) - want).abs() <= tolerance, "{what}: got {got}, want {want}");
}

#[test]
fn enum_values_match_cudarc() {
    assert_eq!(status::SUCCESS, sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS as u32);
    assert_eq!(status::NOT_INITIALIZED, sys::cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED as u32);
    assert_eq!(status::INVALID_VALUE, sys::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE as u32);
    assert_eq!(status::NOT_SUPPORTED, sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED as u32);
    assert_eq!(status::INTERNAL_ERROR, sys::cublasStatus_t::CUBLAS_STATUS_INTERNAL_ERROR as u32);
    assert_eq!(data_type::R_32F, sys::cudaDataType_t::CUDA_R_32F as u32);
    assert_eq!(data_type::R_16BF, sys::cudaDataType_t::CUDA_R_16BF as u32);
    assert_eq!(data_type::R_8F_E4M3, sys::cudaDataType_t::CUDA_R_8F_E4M3 as u32);
    assert_eq!(data_type::R_8F_E5M2, sys::cudaDataType_t::CUDA_R_8F_E5M2 as u32);
    assert_eq!(compute_type::COMPUTE_32F, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F as u32);
    assert_eq!(compute_type::COMPUTE_32F_FAST_TF32, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32 as u32);
    use sys::cublasLtMatmulDescAttributes_t as D;
    assert_eq!(desc_attr::TRANSA, D::CUBLASLT_MATMUL_DESC_TRANSA as u32);
    assert_eq!(desc_attr::TRANSB, D::CUBLASLT_MATMUL_DESC_TRANSB as u32);
    assert_eq!(desc_attr::A_SCALE_POINTER, D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER as u32);
    assert_eq!(desc_attr::B_SCALE_POINTER, D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER as u32);
    assert_eq!(desc_attr::A_SCALE_MODE, D::CUBLASLT_MATMUL_DESC_A_SCALE_MODE as u32);
    assert_eq!(desc_attr::B_SCALE_MODE, D::CUBLASLT_MATMUL_DESC_B_SCALE_MODE as u32);
    assert_eq!(desc_attr::EPILOGUE, D::CUBLASLT_MATMUL_DESC_EPILOGUE as u32);
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    assert_eq!(pref_attr::MAX_WORKSPACE_BYTES, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES as u32);
    assert_eq!(pref_attr::MIN_ALIGNMENT_A_BYTES, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES as u32);
    assert_eq!(pref_attr::MIN_ALIGNMENT_D_BYTES, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES as u32);
    assert_eq!(layout_attr::ORDER, sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_ORDER as u32);
    assert_eq!(values::ORDER_ROW, sys::cublasLtOrder_t::CUBLASLT_ORDER_ROW as i32);
    assert_eq!(
        values::SCALE_OUTER_VEC_32F,
        sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as i32
    );
    assert_eq!(values::EPILOGUE_DEFAULT, sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT as u32);
    use sys::cublasLtMatmulAlgoConfigAttributes_t as Config;
    assert_eq!(algo_config::ID, Config::CUBLASLT_ALGO_CONFIG_ID as u32);
    assert_eq!(algo_config::TILE_ID, Config::CUBLASLT_ALGO_CONFIG_TILE_ID as u32);
    assert_eq!(algo_config::SPLITK_NUM, Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM as u32);
    assert_eq!(algo_config::REDUCTION_SCHEME, Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME as u32);
    assert_eq!(algo_config::CTA_SWIZZLING, Config::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING as u32);
    assert_eq!(algo_config::CUSTOM_OPTION, Config::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION as u32);
    assert_eq!(algo_config::STAGES_ID, Config::CUBLASLT_ALGO_CONFIG_STAGES_ID as u32);
    assert_eq!(algo_config::INNER_SHAPE_ID, Config::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID as u32);
    assert_eq!(algo_config::CLUSTER_SHAPE_ID, Config::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID as u32);
    use sys::cublasLtMatmulAlgoCapAttributes_t as Cap;
    assert_eq!(algo_cap::SPLITK_SUPPORT, Cap::CUBLASLT_ALGO_CAP_SPLITK_SUPPORT as u32);
    assert_eq!(algo_cap::REDUCTION_SCHEME_MASK, Cap::CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK as u32);
    assert_eq!(algo_cap::CTA_SWIZZLING_SUPPORT, Cap::CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT as u32);
    assert_eq!(algo_cap::TILE_IDS, Cap::CUBLASLT_ALGO_CAP_TILE_IDS as u32);
    assert_eq!(algo_cap::CUSTOM_OPTION_MAX, Cap::CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX as u32);
    assert_eq!(algo_cap::STAGES_IDS, Cap::CUBLASLT_ALGO_CAP_STAGES_IDS as u32);
    assert_eq!(algo_cap::MIN_ALIGNMENT_A_BYTES, Cap::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_A_BYTES as u32);
    assert_eq!(algo_cap::MIN_ALIGNMENT_D_BYTES, Cap::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_D_BYTES as u32);
    use sys::cublasLtReductionScheme_t as R;
    assert_eq!(values::REDUCTION_NONE, R::CUBLASLT_REDUCTION_SCHEME_NONE as u32);
    assert_eq!(values::REDUCTION_INPLACE, R::CUBLASLT_REDUCTION_SCHEME_INPLACE as u32);
    assert_eq!(values::REDUCTION_COMPUTE_TYPE, R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32);
    assert_eq!(values::REDUCTION_OUTPUT_TYPE, R::CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE as u32);
    assert_eq!(values::REDUCTION_MASK, R::CUBLASLT_REDUCTION_SCHEME_MASK as u32);
    use sys::cublasLtMatmulTile_t as T;
    assert_eq!(values::TILE_UNDEFINED, T::CUBLASLT_MATMUL_TILE_UNDEFINED as u32);
    assert_eq!(values::TILE_64X128, T::CUBLASLT_MATMUL_TILE_64x128 as u32);
    assert_eq!(values::TILE_128X128, T::CUBLASLT_MATMUL_TILE_128x128 as u32);
    use sys::cublasLtMatmulStages_t as S;
    assert_eq!(values::STAGES_UNDEFINED, S::CUBLASLT_MATMUL_STAGES_UNDEFINED as u32);
    assert_eq!(values::STAGES_64XAUTO, S::CUBLASLT_MATMUL_STAGES_64xAUTO as u32);
    assert_eq!(
        values::INNER_SHAPE_UNDEFINED,
        sys::cublasLtMatmulInnerShape_t::CUBLASLT_MATMUL_INNER_SHAPE_UNDEFINED as u16
    );
    use sys::cublasLtClusterShape_t as Cluster;
    assert_eq!(values::CLUSTER_SHAPE_AUTO, Cluster::CUBLASLT_CLUSTER_SHAPE_AUTO as u16);
    assert_eq!(values::CLUSTER_SHAPE_1X1X1, Cluster::CUBLASLT_CLUSTER_SHAPE_1x1x1 as u16);
    assert_eq!(values::CLUSTER_SHAPE_2X1X1, Cluster::CUBLASLT_CLUSTER_SHAPE_2x1x1 as u16);
    assert_eq!(values::CLUSTER_SHAPE_4X1X1, Cluster::CUBLASLT_CLUSTER_SHAPE_4x1x1 as u16);
    assert_eq!(values::CLUSTER_SHAPE_1X2X1, Cluster::CUBLASLT_CLUSTER_SHAPE_1x2x1 as u16);
    assert_eq!(
        std::mem::size_of::<blaslt::MatmulHeuristicResult>(),
        std::mem::size_of::<sys::cublasLtMatmulHeuristicResult_t>()
    );
    assert_eq!(std::mem::size_of::<blaslt::MatmulAlgo>(), std::mem::size_of::<sys::cublasLtMatmulAlgo_t>());
}

#[test]
fn f32_gemm_honours_transposes_leading_dimensions_and_order() {
    let (m, n, k) = (5usize, 3usize, 7usize);
    for (transa, transb, row_major) in
        [(false, false, false), (true, false, false), (false, true, false), (true, true, false), (true, false, true)]
    {
        let mut lt = Lt::new(compute_type::COMPUTE_32F, data_type::R_32F);
        lt.trans(transa, transb);
        let (a_rows, a_cols) = if transa { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if transb { (n, k) } else { (k, n) };
        // Leading dimensions larger than needed, so a wrong stride shows.
        let lda = if row_major { a_cols + 3 } else { a_rows + 3 };
        let ldb = if row_major { b_cols + 2 } else { b_rows + 2 };
        let ldc = if row_major { n + 1 } else { m + 1 };
        let a = values(lda * a_rows.max(a_cols), 1);
        let b = values(ldb * b_rows.max(b_cols), 2);
        let c = values(ldc * m.max(n), 3);
        lt.layout(0, data_type::R_32F, a_rows as u64, a_cols as u64, lda as i64);
        lt.layout(1, data_type::R_32F, b_rows as u64, b_cols as u64, ldb as i64);
        lt.layout(2, data_type::R_32F, m as u64, n as u64, ldc as i64);
        lt.layout(3, data_type::R_32F, m as u64, n as u64, ldc as i64);
        if row_major {
            (0..4).for_each(|i| lt.row_major(i));
        }
        let (ba, bb, bc) = (Buffer::from_f32(&a), Buffer::from_f32(&b), Buffer::from_f32(&c));
        let (alpha, beta) = (1.5f32, -0.5f32);
        assert_eq!(lt.matmul(alpha, beta, [ba.ptr(), bb.ptr(), bc.ptr()], None), status::SUCCESS);
        let d = bc.f32s(c.len());
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k)
                    .map(|l| {
                        let x = if transa { at(&a, row_major, lda, l, i) } else { at(&a, row_major, lda, i, l) };
                        let y = if transb { at(&b, row_major, ldb, j, l) } else { at(&b, row_major, ldb, l, j) };
                        f64::from(x) * f64::from(y)
                    })
                    .sum();
                let want = f64::from(alpha) * sum + f64::from(beta) * f64::from(at(&c, row_major, ldc, i, j));
                assert_close(at(&d, row_major, ldc, i, j), want, &format!("{transa} {transb} {row_major} ({i}, {j})"));
            }
        }
        // Padding between columns (rows) is untouched.
        let (r, c0) = if row_major { (0, n) } else { (m, 0) };
        assert_eq!(at(&d, row_major, ldc, r, c0), at(&c, row_major, ldc, r, c0));
    }
}

#[test]
fn beta_zero_does_not_read_c_and_out_of_place_keeps_c() {
    let (m, n, k) = (4usize, 2usize, 3usize);
    let lt = f32_lt(compute_type::COMPUTE_32F, m, n, k, false);
    let (a, b) = (values(m * k, 4), values(k * n, 5));
    let (ba, bb) = (Buffer::from_f32(&a), Buffer::from_f32(&b));
    let nan_c = Buffer::from_f32(&vec![f32::NAN; m * n]);
    assert_eq!(lt.matmul(1.0, 0.0, [ba.ptr(), bb.ptr(), nan_c.ptr()], None), status::SUCCESS);
    assert!(nan_c.f32s(m * n).iter().all(|v| v.is_finite()), "beta = 0 must not read C");

    let c = values(m * n, 6);
    let bc = Buffer::from_f32(&c);
    let bd = Buffer::from_f32(&vec![0.0; m * n]);
    assert_eq!(lt.matmul(1.0, 1.0, [ba.ptr(), bb.ptr(), bc.ptr()], Some(bd.ptr())), status::SUCCESS);
    assert_eq!(bc.f32s(m * n), c, "out of place: C unchanged");
    let d = bd.f32s(m * n);
    for i in 0..m {
        for j in 0..n {
            let sum: f64 = (0..k).map(|l| f64::from(a[i + l * m]) * f64::from(b[l + j * k])).sum();
            assert_close(d[i + j * m], sum + f64::from(c[i + j * m]), "out of place");
        }
    }
}

#[test]
fn bf16_inputs_with_f32_output_are_exact_products() {
    let (m, n, k) = (6usize, 4usize, 9usize);
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| blaslt::f32_to_bf16(x)).collect::<Vec<u16>>();
    let (a, b) = (to_bf16(&values(m * k, 7)), to_bf16(&values(n * k, 8)));
    // Our dense GEMM's shape: A = W stored k x n, transposed; B = X stored k x m; D n x m.
    let mut lt = Lt::new(compute_type::COMPUTE_32F, data_type::R_32F);
    lt.trans(true, false);
    lt.layout(0, data_type::R_16BF, k as u64, n as u64, k as i64);
    lt.layout(1, data_type::R_16BF, k as u64, m as u64, k as i64);
    lt.layout(2, data_type::R_32F, n as u64, m as u64, n as i64);
    lt.layout(3, data_type::R_32F, n as u64, m as u64, n as i64);
    let (bw, bx) = (Buffer::from_bf16(&b), Buffer::from_bf16(&a));
    let out = Buffer::from_f32(&vec![0.0; m * n]);
    assert_eq!(lt.matmul(1.0, 0.0, [bw.ptr(), bx.ptr(), out.ptr()], None), status::SUCCESS);
    let d = out.f32s(m * n);
    for t in 0..m {
        for o in 0..n {
            let want: f64 = (0..k)
                .map(|c| f64::from(blaslt::bf16_to_f32(a[t * k + c])) * f64::from(blaslt::bf16_to_f32(b[o * k + c])))
                .sum();
            assert_close(d[t * n + o], want, "bf16");
        }
    }
}

#[test]
fn e4m3_decoding_is_exact() {
    assert_eq!(blaslt::e4m3_to_f32(0x38), 1.0);
    assert_eq!(blaslt::e4m3_to_f32(0xB8), -1.0);
    assert_eq!(blaslt::e4m3_to_f32(0x7E), 448.0);
    assert_eq!(blaslt::e4m3_to_f32(0x08), 2f32.powi(-6));
    assert_eq!(blaslt::e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(blaslt::e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
    assert_eq!(blaslt::e4m3_to_f32(0x3C), 1.5);
    assert!(blaslt::e4m3_to_f32(0x7F).is_nan() && blaslt::e4m3_to_f32(0xFF).is_nan());
    assert_eq!(blaslt::e4m3_to_f32(0x80), 0.0);
    // Monotone over the positive codes.
    let positive: Vec<f32> = (0u8..0x7F).map(blaslt::e4m3_to_f32).collect();
    assert!(positive.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(blaslt::e5m2_to_f32(0x3C), 1.0);
    assert_eq!(blaslt::e5m2_to_f32(0x7B), 57344.0);
    assert!(blaslt::e5m2_to_f32(0x7C).is_infinite() && blaslt::e5m2_to_f32(0x7D).is_nan());
}

/// FP8 codes that avoid NaN (0x7F / 0xFF).
fn codes(len: usize, seed: u64) -> Vec<u8> {
    values(len, seed).iter().map(|v| (((v + 1.0) * 127.0) as u8) & 0xF7).collect()
}

/// Our FP8 expert GEMM's descriptors (kernels/src/device/cuda/blaslt.rs): `out[t, o] = a_scale[t] * w_scale[o] *
/// sum_c e4m3(x[t, c]) * e4m3(w[o, c])`, as `D[n, m] = W^T X` with W stored `[k, n]`, X `[k, m]`.
fn fp8_lt(m: usize, n: usize, k: usize, outer: bool) -> Lt {
    let mut lt = Lt::new(compute_type::COMPUTE_32F, data_type::R_32F);
    lt.trans(true, false);
    if outer {
        assert_eq!(lt.set_i32(desc_attr::A_SCALE_MODE, values::SCALE_OUTER_VEC_32F), status::SUCCESS);
        assert_eq!(lt.set_i32(desc_attr::B_SCALE_MODE, values::SCALE_OUTER_VEC_32F), status::SUCCESS);
    }
    lt.layout(0, data_type::R_8F_E4M3, k as u64, n as u64, k as i64);
    lt.layout(1, data_type::R_8F_E4M3, k as u64, m as u64, k as i64);
    lt.layout(2, data_type::R_32F, n as u64, m as u64, n as i64);
    lt.layout(3, data_type::R_32F, n as u64, m as u64, n as i64);
    lt
}

#[test]
fn fp8_tn_with_outer_vector_and_tensorwide_scales() {
    let (m, n, k) = (5usize, 32usize, 48usize);
    let (x, w) = (codes(m * k, 9), codes(n * k, 10));
    let x_scale: Vec<f32> = (0..m).map(|t| 0.5 + t as f32).collect();
    let w_scale: Vec<f32> = (0..n).map(|o| 0.25 * (1 + o % 3) as f32).collect();
    let (bx, bw) = (Buffer::from_bytes(&x), Buffer::from_bytes(&w));
    let (bxs, bws) = (Buffer::from_f32(&x_scale), Buffer::from_f32(&w_scale));
    let dot = |t: usize, o: usize| -> f64 {
        (0..k)
            .map(|c| f64::from(blaslt::e4m3_to_f32(x[t * k + c])) * f64::from(blaslt::e4m3_to_f32(w[o * k + c])))
            .sum()
    };

    let lt = fp8_lt(m, n, k, true);
    lt.alignment(16);
    let out = Buffer::from_f32(&vec![0.0; m * n]);
    assert_eq!(lt.set_ptr(desc_attr::A_SCALE_POINTER, bws.ptr()), status::SUCCESS);
    assert_eq!(lt.set_ptr(desc_attr::B_SCALE_POINTER, bxs.ptr()), status::SUCCESS);
    assert_eq!(lt.matmul(1.0, 0.0, [bw.ptr(), bx.ptr(), out.ptr()], None), status::SUCCESS);
    let d = out.f32s(m * n);
    for t in 0..m {
        for o in 0..n {
            let want = f64::from(x_scale[t]) * f64::from(w_scale[o]) * dot(t, o);
            assert_close(d[t * n + o], want, &format!("outer-vector ({t}, {o})"));
        }
    }

    // Tensorwide: one scalar per operand, alpha and beta on top.
    let lt = fp8_lt(m, n, k, false);
    let c = values(m * n, 11);
    let out = Buffer::from_f32(&c);
    let (sa, sb) = (Buffer::from_f32(&[2.0]), Buffer::from_f32(&[0.125]));
    assert_eq!(lt.set_ptr(desc_attr::A_SCALE_POINTER, sa.ptr()), status::SUCCESS);
    assert_eq!(lt.set_ptr(desc_attr::B_SCALE_POINTER, sb.ptr()), status::SUCCESS);
    assert_eq!(lt.matmul(3.0, 1.0, [bw.ptr(), bx.ptr(), out.ptr()], None), status::SUCCESS);
    let d = out.f32s(m * n);
    for t in 0..m {
        for o in 0..n {
            let want = 3.0 * 2.0 * 0.125 * dot(t, o) + f64::from(c[t * n + o]);
            assert_close(d[t * n + o], want, &format!("tensorwide ({t}, {o})"));
        }
    }
}

#[test]
fn fp8_refuses_what_hopper_refuses() {
    let (m, n, k) = (4usize, 16usize, 32usize);
    // NN instead of TN (A stored n x k).
    let mut lt = fp8_lt(m, n, k, false);
    lt.trans(false, false);
    lt.layout(0, data_type::R_8F_E4M3, n as u64, k as u64, n as i64);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    assert!(blaslt::last_refusal().is_some_and(|r| r.contains("TN")), "{:?}", blaslt::last_refusal());
    // k not a multiple of 16.
    let mut lt = fp8_lt(m, n, 24, false);
    lt.layout(0, data_type::R_8F_E4M3, 24, n as u64, 32);
    lt.layout(1, data_type::R_8F_E4M3, 24, m as u64, 32);
    let (status, count, _) = lt.heuristic();
    assert_eq!((status, count), (status::NOT_SUPPORTED, 0));
    // lda not a multiple of 16.
    let mut lt = fp8_lt(m, n, k, false);
    lt.layout(0, data_type::R_8F_E4M3, k as u64, n as u64, 40);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    // m (rows of D) * 4 bytes not a multiple of 16.
    let lt = fp8_lt(m, 18, k, false);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    // Outer-vector on A only.
    let lt = fp8_lt(m, n, k, false);
    assert_eq!(lt.set_i32(desc_attr::A_SCALE_MODE, values::SCALE_OUTER_VEC_32F), status::SUCCESS);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    // Block scaling of Blackwell.
    let lt = fp8_lt(m, n, k, false);
    assert_eq!(lt.set_i32(desc_attr::A_SCALE_MODE, values::SCALE_VEC32_UE8M0), status::SUCCESS);
    assert_eq!(lt.set_i32(desc_attr::B_SCALE_MODE, values::SCALE_VEC32_UE8M0), status::SUCCESS);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    // Compute type other than 32F.
    let mut lt = Lt::new(compute_type::COMPUTE_32F_PEDANTIC, data_type::R_32F);
    lt.trans(true, false);
    lt.layout(0, data_type::R_8F_E4M3, k as u64, n as u64, k as i64);
    lt.layout(1, data_type::R_8F_E4M3, k as u64, m as u64, k as i64);
    lt.layout(2, data_type::R_32F, n as u64, m as u64, n as i64);
    lt.layout(3, data_type::R_32F, n as u64, m as u64, n as i64);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    // The preference promises only 4-byte alignment: no FP8 algorithm.
    let lt = fp8_lt(m, n, k, false);
    lt.alignment(4);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    // Pointers not 16-byte aligned at the call, with an algorithm chosen for 16.
    let lt = fp8_lt(m, n, k, false);
    lt.alignment(16);
    let (x, w) = (Buffer::from_bytes(&codes(m * k + 8, 1)), Buffer::from_bytes(&codes(n * k, 2)));
    let out = Buffer::from_f32(&vec![0.0; m * n]);
    assert_eq!(lt.matmul(1.0, 0.0, [w.ptr(), x.ptr() + 8, out.ptr()], None), status::INVALID_VALUE);
    assert_eq!(lt.matmul(1.0, 0.0, [w.ptr(), x.ptr(), out.ptr()], None), status::SUCCESS);
    // Outer-vector mode without the scale vectors.
    let lt = fp8_lt(m, n, k, true);
    assert_eq!(lt.matmul(1.0, 0.0, [w.ptr(), x.ptr(), out.ptr()], None), status::INVALID_VALUE);
}

#[test]
fn wide_types_refuse_scales_tf32_and_foreign_algorithms() {
    let (m, n, k) = (3usize, 2usize, 4usize);
    let make = |compute| f32_lt(compute, m, n, k, false);
    let (a, b, c) = (Buffer::from_f32(&values(m * k, 1)), Buffer::from_f32(&values(k * n, 2)), Buffer::new(64));
    // A scale pointer on an f32 matmul: "If any scale is set for a non-narrow precisions matmul, cuBLAS will return
    // an error".
    let lt = make(compute_type::COMPUTE_32F);
    let scale = Buffer::from_f32(&[2.0]);
    assert_eq!(lt.set_ptr(desc_attr::A_SCALE_POINTER, scale.ptr()), status::SUCCESS);
    assert_eq!(lt.heuristic().0, status::INVALID_VALUE);
    // TF32 is valid cuBLASLt but rounds inputs: not emulated.
    assert_eq!(make(compute_type::COMPUTE_32F_FAST_TF32).heuristic().0, status::NOT_SUPPORTED);
    // An epilogue other than DEFAULT: not emulated.
    let lt = make(compute_type::COMPUTE_32F);
    assert_eq!(lt.set_i32(desc_attr::EPILOGUE, 4), status::SUCCESS);
    assert_eq!(lt.heuristic().0, status::NOT_SUPPORTED);
    // An algorithm chosen for bf16 used for f32.
    let mut bf16 = Lt::new(compute_type::COMPUTE_32F, data_type::R_32F);
    bf16.layout(0, data_type::R_16BF, m as u64, k as u64, m as i64);
    bf16.layout(1, data_type::R_16BF, k as u64, n as u64, k as i64);
    bf16.layout(2, data_type::R_32F, m as u64, n as u64, m as i64);
    bf16.layout(3, data_type::R_32F, m as u64, n as u64, m as i64);
    let (heuristic, _, algo) = bf16.heuristic();
    assert_eq!(heuristic, status::SUCCESS);
    let f32 = make(compute_type::COMPUTE_32F);
    assert_eq!(f32.matmul_with(&algo, 1.0, 0.0, [a.ptr(), b.ptr(), c.ptr()], None), status::INVALID_VALUE);
    // An algorithm chosen for 256-byte alignment used on a 4-byte-aligned view.
    let (_, _, algo) = f32.heuristic();
    assert_eq!(f32.matmul_with(&algo, 1.0, 0.0, [a.ptr() + 4, b.ptr(), c.ptr()], None), status::INVALID_VALUE);
    f32.alignment(4);
    let (_, _, algo) = f32.heuristic();
    assert_eq!(f32.matmul_with(&algo, 1.0, 0.0, [a.ptr() + 4, b.ptr(), c.ptr()], None), status::SUCCESS);
    // Shapes that do not chain.
    let mut lt = make(compute_type::COMPUTE_32F);
    lt.layout(1, data_type::R_32F, (k + 1) as u64, n as u64, (k + 1) as i64);
    assert_eq!(lt.heuristic().0, status::INVALID_VALUE);
    // A leading dimension smaller than the rows.
    let mut lt = make(compute_type::COMPUTE_32F);
    lt.layout(0, data_type::R_32F, m as u64, k as u64, (m - 1) as i64);
    assert_eq!(lt.heuristic().0, status::INVALID_VALUE);
}

#[test]
fn descriptors_are_checked() {
    let mut desc = null_mut();
    // SAFETY: valid out-pointer; the rest pass ids and small host values.
    unsafe {
        assert_eq!(blaslt::cublasLtMatmulDescCreate(&mut desc, compute_type::COMPUTE_32F, data_type::R_32F), 0);
        let one = 1i32;
        // Wrong size for an int32 attribute.
        let wrong = blaslt::cublasLtMatmulDescSetAttribute(desc, desc_attr::TRANSA, &one as *const i32 as _, 8);
        assert_eq!(wrong, status::INVALID_VALUE);
        assert_eq!(
            blaslt::cublasLtMatmulDescSetAttribute(desc, desc_attr::TRANSA, null_mut(), 4),
            status::INVALID_VALUE
        );
        assert_eq!(blaslt::cublasLtMatmulDescSetAttribute(desc, desc_attr::TRANSA, &one as *const i32 as _, 4), 0);
        let mut read = 0i32;
        let mut written = 0usize;
        let got = blaslt::cublasLtMatmulDescGetAttribute(
            desc,
            desc_attr::TRANSA,
            &mut read as *mut i32 as _,
            4,
            &mut written,
        );
        assert_eq!((got, read, written), (status::SUCCESS, 1, 4));
        assert_eq!(blaslt::cublasLtMatmulDescDestroy(desc), status::SUCCESS);
        // Destroyed: every use is refused, not a crash.
        assert_eq!(blaslt::cublasLtMatmulDescDestroy(desc), status::INVALID_VALUE);
        assert_eq!(
            blaslt::cublasLtMatmulDescSetAttribute(desc, desc_attr::TRANSA, &one as *const i32 as _, 4),
            status::INVALID_VALUE
        );
        assert_eq!(blaslt::cublasLtDestroy(desc), status::NOT_INITIALIZED);
        let mut handle = null_mut();
        assert_eq!(blaslt::cublasLtCreate(&mut handle), status::SUCCESS);
        let mut count = 7;
        let heuristic = blaslt::cublasLtMatmulAlgoGetHeuristic(
            handle,
            desc,
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            0,
            null_mut(),
            &mut count,
        );
        assert_eq!((heuristic, count), (status::INVALID_VALUE, 0));
        assert_eq!(blaslt::cublasLtDestroy(handle), status::SUCCESS);
    }
    assert_eq!(blaslt::cublasLtGetVersion(), 130000);
}

#[test]
fn large_products_use_threads_and_stay_exact() {
    // Big enough for the threaded path.
    let (m, n, k) = (64usize, 96usize, 80usize);
    let lt = f32_lt(compute_type::COMPUTE_32F, m, n, k, true);
    let (a, b) = (values(k * m, 12), values(k * n, 13));
    let (ba, bb) = (Buffer::from_f32(&a), Buffer::from_f32(&b));
    let out = Buffer::from_f32(&vec![0.0; m * n]);
    assert_eq!(lt.matmul(1.0, 0.0, [ba.ptr(), bb.ptr(), out.ptr()], None), status::SUCCESS);
    let d = out.f32s(m * n);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k).map(|l| f64::from(a[l + i * k]) * f64::from(b[l + j * k])).sum();
            assert_eq!(d[i + j * m], want as f32, "({i}, {j})");
        }
    }
}

/// Reads a configuration attribute of `N` bytes, asserting success and the size written.
fn config<const N: usize>(algo: &MatmulAlgo, attr: u32) -> [u8; N] {
    let mut value = [0u8; N];
    let mut written = 0usize;
    // SAFETY: N writable bytes.
    let got =
        unsafe { blaslt::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, value.as_mut_ptr().cast(), N, &mut written) };
    assert_eq!((got, written), (status::SUCCESS, N), "attribute {attr}: {:?}", blaslt::last_refusal());
    value
}

fn config_u32(algo: &MatmulAlgo, attr: u32) -> u32 {
    u32::from_ne_bytes(config(algo, attr))
}

fn config_u16(algo: &MatmulAlgo, attr: u32) -> u16 {
    u16::from_ne_bytes(config(algo, attr))
}

fn set_config(algo: &mut MatmulAlgo, attr: u32, bytes: &[u8]) -> u32 {
    // SAFETY: bytes.len() readable bytes.
    unsafe { blaslt::cublasLtMatmulAlgoConfigSetAttribute(algo, attr, bytes.as_ptr().cast(), bytes.len()) }
}

/// A capability read into a buffer of `size` bytes: status, the bytes written, `sizeWritten`.
fn capability(algo: &MatmulAlgo, attr: u32, size: usize) -> (u32, Vec<u8>, usize) {
    let mut value = vec![0u8; size];
    let mut written = 0usize;
    // SAFETY: `size` writable bytes.
    let got =
        unsafe { blaslt::cublasLtMatmulAlgoCapGetAttribute(algo, attr, value.as_mut_ptr().cast(), size, &mut written) };
    (got, value, written)
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A split-K variant of `algo`, as an autotuner makes it.
fn split_k(algo: &MatmulAlgo, splits: u32, reduction: u32) -> MatmulAlgo {
    let mut variant = *algo;
    assert_eq!(set_config(&mut variant, algo_config::SPLITK_NUM, &splits.to_ne_bytes()), status::SUCCESS);
    assert_eq!(set_config(&mut variant, algo_config::REDUCTION_SCHEME, &reduction.to_ne_bytes()), status::SUCCESS);
    variant
}

#[test]
fn heuristic_offers_two_configurations_of_one_algorithm() {
    let (m, n, k) = (6usize, 5usize, 12usize);
    let lt = f32_lt(compute_type::COMPUTE_32F, m, n, k, true);
    let (status_all, count, results) = lt.heuristics(32);
    assert_eq!((status_all, count), (status::SUCCESS, 2));
    // Slots past *returnAlgoCount are not written.
    assert!(results[2..].iter().all(|r| r.algo.data == [0; 8]));
    let (status_one, count, first) = lt.heuristics(1);
    assert_eq!((status_one, count), (status::SUCCESS, 1));
    assert_eq!(first[0].algo, results[0].algo, "the first result does not depend on how many are asked for");
    for (result, tile) in results[..2].iter().zip([values::TILE_128X128, values::TILE_64X128]) {
        assert_eq!((result.workspaceSize, result.state, result.wavesCount), (0, status::SUCCESS, 1.0));
        let algo = &result.algo;
        assert_eq!(i32::from_ne_bytes(config(algo, algo_config::ID)), blaslt::EMULATED_ALGO_ID);
        assert_eq!(config_u32(algo, algo_config::TILE_ID), tile);
        assert_eq!(config_u32(algo, algo_config::SPLITK_NUM), 1);
        assert_eq!(config_u32(algo, algo_config::REDUCTION_SCHEME), values::REDUCTION_NONE);
        assert_eq!(config_u32(algo, algo_config::CTA_SWIZZLING), 0);
        assert_eq!(config_u32(algo, algo_config::CUSTOM_OPTION), 0);
        assert_eq!(config_u32(algo, algo_config::STAGES_ID), values::STAGES_64XAUTO);
        assert_eq!(config_u16(algo, algo_config::INNER_SHAPE_ID), values::INNER_SHAPE_UNDEFINED);
        assert_eq!(config_u16(algo, algo_config::CLUSTER_SHAPE_ID), values::CLUSTER_SHAPE_AUTO);
    }
    // Both compute the same D.
    let (a, b) = (values(k * m, 21), values(k * n, 22));
    let (ba, bb) = (Buffer::from_f32(&a), Buffer::from_f32(&b));
    let outputs: Vec<Vec<f32>> = results[..2]
        .iter()
        .map(|result| {
            let out = Buffer::from_f32(&vec![0.0; m * n]);
            assert_eq!(lt.matmul_with(&result.algo, 1.0, 0.0, [ba.ptr(), bb.ptr(), out.ptr()], None), status::SUCCESS);
            out.f32s(m * n)
        })
        .collect();
    assert_eq!(outputs[0], outputs[1]);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k).map(|l| f64::from(a[l + i * k]) * f64::from(b[l + j * k])).sum();
            assert_close(outputs[0][i + j * m], want, &format!("({i}, {j})"));
        }
    }
}

#[test]
fn algo_configuration_round_trips_with_exact_sizes() {
    let lt = f32_lt(compute_type::COMPUTE_32F, 4, 3, 8, false);
    let (_, _, original) = lt.heuristic();
    let mut algo = original;
    let u32_attrs = [
        (algo_config::TILE_ID, values::TILE_64X128),
        (algo_config::SPLITK_NUM, 3),
        (algo_config::REDUCTION_SCHEME, values::REDUCTION_OUTPUT_TYPE),
        (algo_config::CTA_SWIZZLING, 1),
        (algo_config::CUSTOM_OPTION, 5),
        (algo_config::STAGES_ID, values::STAGES_UNDEFINED),
    ];
    let u16_attrs = [(algo_config::INNER_SHAPE_ID, 1u16), (algo_config::CLUSTER_SHAPE_ID, values::CLUSTER_SHAPE_2X1X1)];
    for (attr, value) in u32_attrs {
        // Size query, then the wrong sizes both ways.
        let mut written = 0usize;
        // SAFETY: a size query writes only `written`; the other calls pass buffers of the sizes given.
        unsafe {
            let query = blaslt::cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, null_mut(), 0, &mut written);
            assert_eq!((query, written), (status::SUCCESS, 4));
            let no_size = blaslt::cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, null_mut(), 0, null_mut());
            assert_eq!(no_size, status::INVALID_VALUE);
            let mut wide = 0u64;
            let get = blaslt::cublasLtMatmulAlgoConfigGetAttribute(
                &algo,
                attr,
                (&mut wide as *mut u64).cast(),
                8,
                null_mut(),
            );
            assert_eq!(get, status::INVALID_VALUE);
            let null_buf = blaslt::cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, null_mut(), 4, null_mut());
            assert_eq!(null_buf, status::INVALID_VALUE);
            let null_set = blaslt::cublasLtMatmulAlgoConfigSetAttribute(&mut algo, attr, std::ptr::null(), 4);
            assert_eq!(null_set, status::INVALID_VALUE);
        }
        assert_eq!(set_config(&mut algo, attr, &u64::from(value).to_ne_bytes()), status::INVALID_VALUE);
        assert_eq!(set_config(&mut algo, attr, &(value as u16).to_ne_bytes()), status::INVALID_VALUE);
        assert_eq!(set_config(&mut algo, attr, &value.to_ne_bytes()), status::SUCCESS);
        assert_eq!(config_u32(&algo, attr), value, "attribute {attr}");
    }
    for (attr, value) in u16_attrs {
        let mut written = 0usize;
        // SAFETY: a size query.
        let query = unsafe { blaslt::cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, null_mut(), 0, &mut written) };
        assert_eq!((query, written), (status::SUCCESS, 2));
        let mut wide = 0u32;
        // SAFETY: 4 writable bytes.
        let get = unsafe {
            blaslt::cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, (&mut wide as *mut u32).cast(), 4, null_mut())
        };
        assert_eq!(get, status::INVALID_VALUE, "a uint16 attribute read as int");
        assert_eq!(set_config(&mut algo, attr, &u32::from(value).to_ne_bytes()), status::INVALID_VALUE);
        assert_eq!(set_config(&mut algo, attr, &value.to_ne_bytes()), status::SUCCESS);
        assert_eq!(config_u16(&algo, attr), value, "attribute {attr}");
    }
    // Every attribute kept its own value: none overwrote another.
    for (attr, value) in u32_attrs {
        assert_eq!(config_u32(&algo, attr), value, "attribute {attr} after all sets");
    }
    for (attr, value) in u16_attrs {
        assert_eq!(config_u16(&algo, attr), value, "attribute {attr} after all sets");
    }
    // The algorithm id: int32, read-only.
    assert_eq!(i32::from_ne_bytes(config(&algo, algo_config::ID)), blaslt::EMULATED_ALGO_ID);
    assert_eq!(set_config(&mut algo, algo_config::ID, &7i32.to_ne_bytes()), status::INVALID_VALUE);
    assert!(blaslt::last_refusal().is_some_and(|r| r.contains("read-only")), "{:?}", blaslt::last_refusal());
    // Unknown attributes, a NULL algo and an algo the emulator did not make are refused.
    assert_eq!(set_config(&mut algo, 9, &0u32.to_ne_bytes()), status::INVALID_VALUE);
    let mut value = 0u32;
    // SAFETY: 4 writable bytes; a NULL algo is refused before any read.
    unsafe {
        let buf = (&mut value as *mut u32).cast();
        assert_eq!(blaslt::cublasLtMatmulAlgoConfigGetAttribute(&algo, 9, buf, 4, null_mut()), status::INVALID_VALUE);
        let null_algo = blaslt::cublasLtMatmulAlgoConfigGetAttribute(std::ptr::null(), 1, buf, 4, null_mut());
        assert_eq!(null_algo, status::INVALID_VALUE);
        let foreign = MatmulAlgo { data: [0; 8] };
        let got = blaslt::cublasLtMatmulAlgoConfigGetAttribute(&foreign, algo_config::TILE_ID, buf, 4, null_mut());
        assert_eq!(got, status::INVALID_VALUE);
    }
    let mut foreign = MatmulAlgo { data: [1; 8] };
    assert_eq!(set_config(&mut foreign, algo_config::TILE_ID, &0u32.to_ne_bytes()), status::INVALID_VALUE);
    assert_eq!(foreign.data, [1; 8], "a refused set leaves the bytes alone");
    // The problem signature and alignment survive configuration changes.
    let mut back = algo;
    for (attr, _) in u32_attrs {
        assert_eq!(set_config(&mut back, attr, &config_u32(&original, attr).to_ne_bytes()), status::SUCCESS);
    }
    for (attr, _) in u16_attrs {
        assert_eq!(set_config(&mut back, attr, &config_u16(&original, attr).to_ne_bytes()), status::SUCCESS);
    }
    assert_eq!(back, original);
}

#[test]
fn algo_capabilities() {
    let lt = f32_lt(compute_type::COMPUTE_32F, 4, 3, 8, false);
    let (_, _, algo) = lt.heuristic();
    let read = |attr: u32, size: usize| {
        let (got, value, written) = capability(&algo, attr, size);
        assert_eq!((got, written), (status::SUCCESS, size), "capability {attr}: {:?}", blaslt::last_refusal());
        value
    };
    // int32 values, read with the same bits as uint32.
    assert_eq!(u32s(&read(algo_cap::SPLITK_SUPPORT, 4)), [1]);
    assert_eq!(
        u32s(&read(algo_cap::REDUCTION_SCHEME_MASK, 4)),
        [values::REDUCTION_INPLACE | values::REDUCTION_COMPUTE_TYPE | values::REDUCTION_OUTPUT_TYPE]
    );
    assert_eq!(u32s(&read(algo_cap::CTA_SWIZZLING_SUPPORT, 4)), [1]);
    assert_eq!(u32s(&read(algo_cap::CUSTOM_OPTION_MAX, 4)), [0]);
    // The default preference promises 256-byte alignment; the algorithm needs 16.
    assert_eq!(u32s(&read(algo_cap::MIN_ALIGNMENT_A_BYTES, 4)), [16]);
    assert_eq!(u32s(&read(algo_cap::MIN_ALIGNMENT_D_BYTES, 4)), [16]);
    // Sizes must match a scalar capability.
    assert_eq!(capability(&algo, algo_cap::SPLITK_SUPPORT, 8).0, status::INVALID_VALUE);
    // Tile ids: the size query, then the header's way (a buffer for every tile id, the count from sizeWritten).
    let mut written = 0usize;
    // SAFETY: a size query.
    let query =
        unsafe { blaslt::cublasLtMatmulAlgoCapGetAttribute(&algo, algo_cap::TILE_IDS, null_mut(), 0, &mut written) };
    assert_eq!((query, written), (status::SUCCESS, 8));
    let (got, tiles, written) = capability(&algo, algo_cap::TILE_IDS, 4 * 64);
    assert_eq!((got, written), (status::SUCCESS, 8));
    assert_eq!(u32s(&tiles[..written]), [values::TILE_128X128, values::TILE_64X128]);
    assert_eq!(u32s(&read(algo_cap::TILE_IDS, 8)), [values::TILE_128X128, values::TILE_64X128]);
    assert_eq!(capability(&algo, algo_cap::TILE_IDS, 4).0, status::INVALID_VALUE, "too small for the array");
    assert_eq!(u32s(&read(algo_cap::STAGES_IDS, 4)), [values::STAGES_64XAUTO]);
    // Capabilities not emulated, and algorithms not made here.
    let (got, _, _) = capability(&algo, 12, 4);
    assert_eq!(got, status::NOT_SUPPORTED);
    assert!(blaslt::last_refusal().is_some_and(|r| r.contains("not emulated")), "{:?}", blaslt::last_refusal());
    let foreign = MatmulAlgo { data: [0; 8] };
    assert_eq!(capability(&foreign, algo_cap::SPLITK_SUPPORT, 4).0, status::INVALID_VALUE);
}

#[test]
fn algo_check_judges_the_configuration_and_reports_its_workspace() {
    let (m, n, k) = (8usize, 6usize, 16usize);
    let lt = f32_lt(compute_type::COMPUTE_32F, m, n, k, true);
    let (_, _, algo) = lt.heuristic();
    let (got, result) = lt.check(&algo);
    assert_eq!(
        (got, result.workspaceSize, result.state, result.wavesCount),
        (status::SUCCESS, 0, status::SUCCESS, 1.0)
    );
    assert_eq!(result.algo.data, [0xA5; 8], "\"algo field is never updated\"");
    // Split-K 2 keeping partial sums in the compute type: m * n f32 per split in the workspace.
    let split = split_k(&algo, 2, values::REDUCTION_COMPUTE_TYPE);
    let (got, result) = lt.check(&split);
    assert_eq!((got, result.workspaceSize, result.state), (status::SUCCESS, m * n * 4 * 2, status::SUCCESS));
    assert_eq!(lt.check(&split_k(&algo, 4, values::REDUCTION_OUTPUT_TYPE)).1.workspaceSize, m * n * 4 * 4);
    // In place: reduced in the output buffer.
    let (got, result) = lt.check(&split_k(&algo, 2, values::REDUCTION_INPLACE));
    assert_eq!((got, result.workspaceSize), (status::SUCCESS, 0));
    // algo may point to result->algo.
    let mut result =
        MatmulHeuristicResult { algo: split, workspaceSize: 0, state: 99, wavesCount: 0.0, reserved: [0; 4] };
    let [a, b, c, d] = lt.layouts;
    let algo_in_result = std::ptr::addr_of!(result.algo);
    // SAFETY: live objects; the algo is the result's own.
    let got = unsafe { blaslt::cublasLtMatmulAlgoCheck(lt.handle, lt.desc, a, b, c, d, algo_in_result, &mut result) };
    assert_eq!((got, result.workspaceSize, result.algo), (status::SUCCESS, m * n * 8, split));

    let refused = |variant: MatmulAlgo, want: u32, reason: &str| {
        let (got, result) = lt.check(&variant);
        assert_eq!(got, want, "{reason}: {:?}", blaslt::last_refusal());
        assert_eq!(result.state, 99, "{reason}: a refused check writes no result");
        assert!(blaslt::last_refusal().is_some_and(|r| r.contains(reason)), "{:?}", blaslt::last_refusal());
    };
    // Split-K without a reduction scheme, outside 1..=k, or with a combination of schemes.
    refused(split_k(&algo, 2, values::REDUCTION_NONE), status::NOT_SUPPORTED, "REDUCTION_SCHEME NONE");
    refused(split_k(&algo, 0, values::REDUCTION_COMPUTE_TYPE), status::NOT_SUPPORTED, "SPLITK_NUM = 0");
    refused(split_k(&algo, k as u32 + 1, values::REDUCTION_COMPUTE_TYPE), status::NOT_SUPPORTED, "SPLITK_NUM = 17");
    refused(split_k(&algo, 2, 3), status::NOT_SUPPORTED, "REDUCTION_SCHEME = 3");
    // A cluster shape valid in cuBLASLt but not emulated, and the ones that are.
    let mut cluster = algo;
    assert_eq!(
        set_config(&mut cluster, algo_config::CLUSTER_SHAPE_ID, &values::CLUSTER_SHAPE_4X1X1.to_ne_bytes()),
        status::SUCCESS
    );
    refused(cluster, status::NOT_SUPPORTED, "not emulated");
    for shape in [values::CLUSTER_SHAPE_1X1X1, values::CLUSTER_SHAPE_2X1X1, values::CLUSTER_SHAPE_1X2X1] {
        assert_eq!(set_config(&mut cluster, algo_config::CLUSTER_SHAPE_ID, &shape.to_ne_bytes()), status::SUCCESS);
        assert_eq!(lt.check(&cluster).0, status::SUCCESS, "cluster shape {shape}");
    }
    // A tile id not among the capabilities', a custom option above its maximum, a reserved swizzle value.
    let with = |attr: u32, value: u32| {
        let mut variant = algo;
        assert_eq!(set_config(&mut variant, attr, &value.to_ne_bytes()), status::SUCCESS);
        variant
    };
    refused(with(algo_config::TILE_ID, 1), status::NOT_SUPPORTED, "TILE_IDS");
    assert_eq!(lt.check(&with(algo_config::TILE_ID, values::TILE_UNDEFINED)).0, status::SUCCESS);
    refused(with(algo_config::CUSTOM_OPTION, 1), status::NOT_SUPPORTED, "CUSTOM_OPTION_MAX");
    refused(with(algo_config::CTA_SWIZZLING, 2), status::NOT_SUPPORTED, "CTA_SWIZZLING");
    assert_eq!(lt.check(&with(algo_config::CTA_SWIZZLING, 1)).0, status::SUCCESS);
    refused(with(algo_config::STAGES_ID, 1), status::NOT_SUPPORTED, "STAGES_IDS");
    // "If matrix layout descriptors or operation descriptor don't match algo descriptor": an algorithm for bf16.
    let mut bf16 = Lt::new(compute_type::COMPUTE_32F, data_type::R_32F);
    bf16.trans(true, false);
    bf16.layout(0, data_type::R_16BF, k as u64, m as u64, k as i64);
    bf16.layout(1, data_type::R_16BF, k as u64, n as u64, k as i64);
    bf16.layout(2, data_type::R_32F, m as u64, n as u64, m as i64);
    bf16.layout(3, data_type::R_32F, m as u64, n as u64, m as i64);
    let (_, _, bf16_algo) = bf16.heuristic();
    refused(bf16_algo, status::INVALID_VALUE, "other data");
    refused(MatmulAlgo { data: [0; 8] }, status::INVALID_VALUE, "not made by this emulator");
    // The problem is checked as the heuristic checks it.
    let tf32 = f32_lt(compute_type::COMPUTE_32F_FAST_TF32, m, n, k, true);
    assert_eq!(tf32.check(&algo).0, status::NOT_SUPPORTED);
}

#[test]
fn a_kept_configuration_is_rechecked_and_run_for_another_size() {
    // The autotuner's path: tune for one token count, keep the algo's bytes, check them again for another (the
    // columns of B and D in the TN layout) and run.
    let (rows, k) = (16usize, 32usize);
    let tuned_for = f32_lt(compute_type::COMPUTE_32F, rows, 8, k, true);
    let (_, _, algo) = tuned_for.heuristic();
    let chosen = split_k(&algo, 4, values::REDUCTION_COMPUTE_TYPE);
    assert_eq!(tuned_for.check(&chosen).1.workspaceSize, rows * 8 * 4 * 4);
    let kept: [u64; 8] = chosen.data;

    let columns = 5usize;
    let lt = f32_lt(compute_type::COMPUTE_32F, rows, columns, k, true);
    let rebuilt = MatmulAlgo { data: kept };
    let (got, result) = lt.check(&rebuilt);
    assert_eq!((got, result.state), (status::SUCCESS, status::SUCCESS), "{:?}", blaslt::last_refusal());
    assert_eq!(result.workspaceSize, rows * columns * 4 * 4);
    assert_eq!(config_u32(&rebuilt, algo_config::SPLITK_NUM), 4);
    let (a, b) = (values(k * rows, 31), values(k * columns, 32));
    let (ba, bb) = (Buffer::from_f32(&a), Buffer::from_f32(&b));
    let workspace = Buffer::new(result.workspaceSize);
    let out = Buffer::from_f32(&vec![0.0; rows * columns]);
    let run = lt.matmul_workspace(
        &rebuilt,
        1.0,
        0.0,
        [ba.ptr(), bb.ptr(), out.ptr()],
        None,
        (workspace.ptr(), result.workspaceSize),
    );
    assert_eq!(run, status::SUCCESS, "{:?}", blaslt::last_refusal());
    let d = out.f32s(rows * columns);
    for i in 0..rows {
        for j in 0..columns {
            let want: f64 = (0..k).map(|l| f64::from(a[l + i * k]) * f64::from(b[l + j * k])).sum();
            assert_close(d[i + j * rows], want, &format!("({i}, {j})"));
        }
    }
}

#[test]
fn split_k_matmul_matches_the_default_and_needs_its_workspace() {
    let (m, n, k) = (12usize, 7usize, 40usize);
    let lt = f32_lt(compute_type::COMPUTE_32F, m, n, k, true);
    let (a, b, c) = (values(k * m, 41), values(k * n, 42), values(m * n, 43));
    let (ba, bb) = (Buffer::from_f32(&a), Buffer::from_f32(&b));
    let (_, _, algo) = lt.heuristic();
    let default = Buffer::from_f32(&c);
    assert_eq!(lt.matmul_with(&algo, 0.75, 0.5, [ba.ptr(), bb.ptr(), default.ptr()], None), status::SUCCESS);

    let split = split_k(&algo, 4, values::REDUCTION_COMPUTE_TYPE);
    let needed = lt.check(&split).1.workspaceSize;
    assert_eq!(needed, m * n * 4 * 4);
    let workspace = Buffer::new(needed);
    let out = Buffer::from_f32(&c);
    let ptrs = [ba.ptr(), bb.ptr(), out.ptr()];
    // A workspace one byte short, or none, is refused and D is left alone.
    let short = lt.matmul_workspace(&split, 0.75, 0.5, ptrs, None, (workspace.ptr(), needed - 1));
    assert_eq!(short, status::INVALID_VALUE);
    assert!(blaslt::last_refusal().is_some_and(|r| r.contains("workspaceSizeInBytes")), "{:?}", blaslt::last_refusal());
    assert_eq!(lt.matmul_with(&split, 0.75, 0.5, ptrs, None), status::INVALID_VALUE);
    assert_eq!(lt.matmul_workspace(&split, 0.75, 0.5, ptrs, None, (0, needed)), status::INVALID_VALUE);
    assert_eq!(out.f32s(m * n), c);
    // Enough workspace: the same D, bit for bit.
    assert_eq!(lt.matmul_workspace(&split, 0.75, 0.5, ptrs, None, (workspace.ptr(), needed)), status::SUCCESS);
    assert_eq!(out.f32s(m * n), default.f32s(m * n));
    // The configuration is judged at the call as cublasLtMatmulAlgoCheck judges it.
    let none = split_k(&algo, 4, values::REDUCTION_NONE);
    assert_eq!(lt.matmul_workspace(&none, 0.75, 0.5, ptrs, None, (workspace.ptr(), needed)), status::NOT_SUPPORTED);
    // In-place reduction needs no workspace.
    let inplace = split_k(&algo, 4, values::REDUCTION_INPLACE);
    let out = Buffer::from_f32(&c);
    assert_eq!(lt.matmul_with(&inplace, 0.75, 0.5, [ba.ptr(), bb.ptr(), out.ptr()], None), status::SUCCESS);
    assert_eq!(out.f32s(m * n), default.f32s(m * n));
}
