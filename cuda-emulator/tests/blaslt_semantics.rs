//! The emulated cuBLASLt against plain reference products: layouts, transposes, leading dimensions, alpha/beta,
//! scales, the FP8 rules it must refuse as the real library does on Hopper, and the enum values it shares with
//! cudarc. Buffers are host memory (the emulator's device memory is host memory).

use std::ffi::c_void;
use std::ptr::null_mut;

use cudarc::cublaslt::sys;
use switchyard_cuda_emulator::blaslt::{
    self, compute_type, data_type, desc_attr, layout_attr, pref_attr, status, values,
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
        let mut result = std::mem::MaybeUninit::<blaslt::MatmulHeuristicResult>::zeroed();
        let mut count = -1;
        let [a, b, c, d] = self.layouts;
        // SAFETY: live objects, one result slot.
        let status = unsafe {
            blaslt::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                self.desc,
                a,
                b,
                c,
                d,
                self.pref,
                1,
                result.as_mut_ptr(),
                &mut count,
            )
        };
        // SAFETY: zero-initialised plain data.
        (status, count, unsafe { result.assume_init() }.algo)
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
                null_mut(),
                0,
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
