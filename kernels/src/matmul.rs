//! Matrix products against weights in `nn.Linear` layout (`[out_features, in_features]`, row-major):
//! `out[m, n] = x[m, k] · W[n, k]^T`.
//!
//! [`matmul_f32`] hands the whole product to the `gemm` crate. [`matmul_fp8`] multiplies by an FP8 E4M3 weight with
//! one scale per output row and never expands the weight to f32 as a whole; it picks one of two strategies by the
//! number of tokens:
//! - few tokens (decode, fewer than 48 tokens): the product is bound by reading the weight, so each weight row is
//!   streamed once, widened eight codes per instruction (F16C) and multiplied against up to four tokens while it sits
//!   in registers; rows are split across rayon threads in blocks of ~128 KiB of codes, columns into blocks whose
//!   activations stay in L1.
//! - many tokens (prefill): the product is bound by arithmetic, so a panel of weight rows is dequantised (scale
//!   folded in) into an f32 scratch of 16 MiB and multiplied with `gemm`; the dequantisation is amortised over the
//!   `m` tokens.

use rayon::prelude::*;

use crate::error::{check_len, product, KernelError};
use crate::fp8::E4M3_TO_F32;
use crate::simd::{self, Isa};

/// How [`matmul_fp8`] splits its work. The defaults are the tuned values; tests shrink them to reach every branch
/// (several panels, several tasks) with small matrices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fp8Plan {
    /// Below this many tokens the product streams weight rows; from it on it dequantises panels and runs a GEMM.
    pub(crate) panel_min_tokens: usize,
    /// Size of the dequantised weight panel in f32 values.
    pub(crate) panel_values: usize,
    /// Weight codes each streaming task reads (rows are grouped to about this many bytes).
    pub(crate) stream_task_bytes: usize,
    /// Activation bytes of one column block in the streaming strategy (kept in L1 across the rows of a task).
    pub(crate) x_block_bytes: usize,
}

impl Default for Fp8Plan {
    fn default() -> Self {
        Fp8Plan {
            // Measured on a 2-core EPYC (AVX2): streaming holds ~75-85 GFLOP/s from 8 tokens on, the gemm panels
            // overtake it between 48 and 64 tokens.
            panel_min_tokens: 48,
            // 16 MiB: gemm packs `x` again for every panel, so panels must span many output rows to amortise it
            // (1 MiB panels reached 0.75-0.8 of sgemm at m = 2048, 16 MiB ones 0.95).
            panel_values: 4 << 20,
            stream_task_bytes: 128 << 10,
            // Half of a 32 KiB L1D, leaving the rest to the codes streaming past.
            x_block_bytes: 16 << 10,
        }
    }
}

/// Products with fewer multiply-adds than this run `gemm` on the calling thread only.
const GEMM_PARALLEL_MIN_MACS: usize = 1 << 18;

fn gemm_parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= GEMM_PARALLEL_MIN_MACS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// The shape checks `matmul_f32` and its reference share: `x` is `m * k`, `weight` is `n * k`, `out` is `m * n`.
fn check_f32_shapes(
    op: &'static str,
    x: &[f32],
    m: usize,
    weight: &[f32],
    n: usize,
    k: usize,
    out: &[f32],
) -> Result<(), KernelError> {
    check_len(op, "x", x.len(), product(op, m, k)?, format_args!("m * k = {m} * {k}"))?;
    check_len(op, "weight", weight.len(), product(op, n, k)?, format_args!("n * k = {n} * {k}"))?;
    check_len(op, "out", out.len(), product(op, m, n)?, format_args!("m * n = {m} * {n}"))
}

/// `out[m, n] = x[m, k] · weight[n, k]^T` (weight in `nn.Linear` layout `[out_features, in_features]`).
///
/// Runs the `gemm` crate, on all rayon threads once the product is large enough to pay for them.
pub fn matmul_f32(x: &[f32], m: usize, weight: &[f32], n: usize, k: usize, out: &mut [f32]) -> Result<(), KernelError> {
    const OP: &str = "matmul_f32";
    check_f32_shapes(OP, x, m, weight, n, k, out)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    if m <= FEW_ROWS {
        few_rows_f32(Isa::detect(), x, m, weight, n, k, out);
        return Ok(());
    }
    // SAFETY: the three buffers were checked above to hold exactly m*k, n*k and m*n values; the strides describe
    // row-major x [m, k], weight^T viewed as [k, n] (element (kk, j) at j*k + kk) and row-major out [m, n], so every
    // address gemm forms lies inside its buffer. `read_dst = false` means out's previous contents are ignored.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm_parallelism(m, n, k),
        );
    }
    Ok(())
}

/// Rows of `x` up to which [`matmul_f32`] streams the weight once and takes every row's dot product with each weight
/// row, instead of calling `gemm`: decode steps have a few tokens, and `gemm` packs the whole weight for them (on the
/// 2-core machine a 2-row product took ~3x a 1-row one, so a batch of 2 decoded slower than a batch of 1).
const FEW_ROWS: usize = 8;

/// `out = x · weightᵀ` for at most [`FEW_ROWS`] rows of `x`: parallel over weight rows, each read once while it is in
/// L1 for the dot products of every row of `x`. The per-row arithmetic does not depend on `m`, so a token's result
/// is the same alone or in a small batch.
fn few_rows_f32(isa: Isa, x: &[f32], m: usize, weight: &[f32], n: usize, k: usize, out: &mut [f32]) {
    // out[i, j] is written as transposed[j, i] so every task owns a contiguous block.
    let mut transposed = vec![0.0f32; n * m];
    let rows_per_task = (GEMM_PARALLEL_MIN_MACS / (k * m).max(1)).clamp(1, n);
    transposed.par_chunks_mut(m).zip(weight.par_chunks(k)).with_min_len(rows_per_task).for_each(|(dst, w)| {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = simd::dot(isa, &x[i * k..(i + 1) * k], w);
        }
    });
    if m == 1 {
        out.copy_from_slice(&transposed);
        return;
    }
    for (j, row) in transposed.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

/// Scalar reference for [`matmul_f32`]: three loops, f64 accumulation.
pub fn matmul_f32_reference(
    x: &[f32],
    m: usize,
    weight: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    const OP: &str = "matmul_f32_reference";
    check_f32_shapes(OP, x, m, weight, n, k, out)?;
    for i in 0..m {
        for o in 0..n {
            let mut acc = 0.0f64;
            for c in 0..k {
                acc += x[i * k + c] as f64 * weight[o * k + c] as f64;
            }
            out[i * n + o] = acc as f32;
        }
    }
    Ok(())
}

/// An FP8 E4M3 weight in `nn.Linear` layout: `rows` output features of `cols` input features, row-major codes, one
/// f32 scale per output row. The dequantised weight is `W[o, c] = e4m3(codes[o * cols + c]) * scales[o]`.
#[derive(Clone, Copy)]
pub struct Fp8Weight<'a> {
    /// `rows * cols` E4M3 codes, row-major.
    pub codes: &'a [u8],
    /// One scale per output row.
    pub scales: &'a [f32],
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

// By hand: a derived `Debug` would print every code of a many-megabyte weight.
impl std::fmt::Debug for Fp8Weight<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fp8Weight")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("codes", &format_args!("[{} bytes]", self.codes.len()))
            .field("scales", &format_args!("[{} values]", self.scales.len()))
            .finish()
    }
}

impl<'a> Fp8Weight<'a> {
    /// A weight whose buffers are checked against `rows` and `cols`.
    pub fn new(codes: &'a [u8], scales: &'a [f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let weight = Fp8Weight { codes, scales, rows, cols };
        weight.check("Fp8Weight::new")?;
        Ok(weight)
    }

    fn check(&self, op: &'static str) -> Result<(), KernelError> {
        let (rows, cols) = (self.rows, self.cols);
        check_len(
            op,
            "weight codes",
            self.codes.len(),
            product(op, rows, cols)?,
            format_args!("rows * cols = {rows} * {cols}"),
        )?;
        check_len(op, "weight scales", self.scales.len(), rows, "rows")
    }

    fn row(&self, o: usize) -> &'a [u8] {
        &self.codes[o * self.cols..(o + 1) * self.cols]
    }
}

fn check_fp8(op: &'static str, x: &[f32], m: usize, weight: &Fp8Weight<'_>, out: &[f32]) -> Result<(), KernelError> {
    weight.check(op)?;
    let (rows, cols) = (weight.rows, weight.cols);
    check_len(op, "x", x.len(), product(op, m, cols)?, format_args!("m * cols = {m} * {cols}"))?;
    check_len(op, "out", out.len(), product(op, m, rows)?, format_args!("m * rows = {m} * {rows}"))
}

/// `out[m, rows] = x[m, cols] · (dequantised W)^T`, i.e. `out[i, o] = scales[o] * sum_c x[i, c] * e4m3(codes[o,c])`.
///
/// The weight is dequantised inside the kernel, a row or a panel of rows at a time (see the module docs for the two
/// strategies). Multi-threaded with rayon. The NaN codes (0x7F, 0xFF) are not propagated by the AVX2 path; real
/// checkpoints hold none.
pub fn matmul_fp8(x: &[f32], m: usize, weight: Fp8Weight<'_>, out: &mut [f32]) -> Result<(), KernelError> {
    matmul_fp8_with(Isa::detect(), Fp8Plan::default(), x, m, weight, out)
}

pub(crate) fn matmul_fp8_with(
    isa: Isa,
    plan: Fp8Plan,
    x: &[f32],
    m: usize,
    weight: Fp8Weight<'_>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_fp8("matmul_fp8", x, m, &weight, out)?;
    if m == 0 || weight.rows == 0 {
        return Ok(());
    }
    if weight.cols == 0 {
        out.fill(0.0);
        return Ok(());
    }
    if m < plan.panel_min_tokens {
        fp8_streaming(isa, plan, x, m, weight, out);
    } else {
        fp8_panels(isa, plan, x, m, weight, out);
    }
    Ok(())
}

/// A raw pointer to the output matrix that rayon tasks may share because each writes a disjoint set of columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the pointer is only written through at indices owned by exactly one task (see `fp8_streaming`), and the
// buffer outlives the parallel loop because the loop borrows it mutably for its whole duration.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` is inside the buffer and no other task writes or reads it during the parallel loop.
    unsafe fn write(&self, index: usize, value: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(index) = value };
    }
}

/// Few tokens: stream each weight row once, against all tokens four at a time.
///
/// The columns are cut into blocks sized so that one block of four tokens' activations stays in L1 while every row
/// of the task is multiplied against it (four tokens of 5120 values would otherwise be re-read from L2 for each row,
/// which caps the rate below the memory bandwidth). Each code is still read exactly once.
fn fp8_streaming(isa: Isa, plan: Fp8Plan, x: &[f32], m: usize, weight: Fp8Weight<'_>, out: &mut [f32]) {
    let (rows, cols) = (weight.rows, weight.cols);
    let rows_per_task = (plan.stream_task_bytes / cols).clamp(1, rows);
    let tokens_per_pass = m.min(4);
    // A multiple of 32 keeps the SIMD loop free of tails except at the last block.
    let block = (plan.x_block_bytes / (4 * tokens_per_pass) / 32 * 32).max(32);
    let dst = SharedOut(out.as_mut_ptr());
    let tasks = rows.div_ceil(rows_per_task);
    (0..tasks).into_par_iter().for_each_init(Vec::new, |sums, task| {
        let first = task * rows_per_task;
        let count = rows_per_task.min(rows - first);
        // sums[r * m + t]: the dot product of row first + r with token t so far.
        sums.clear();
        sums.resize(count * m, 0.0f32);
        let mut start = 0;
        while start < cols {
            let end = (start + block).min(cols);
            let token = |t: usize| &x[t * cols + start..t * cols + end];
            for (r, row_sums) in sums.chunks_exact_mut(m).enumerate() {
                let codes = &weight.row(first + r)[start..end];
                let mut t = 0;
                while t < m {
                    let step = (m - t).min(4);
                    let part = &mut row_sums[t..t + step];
                    let add = |s: &[f32], part: &mut [f32]| part.iter_mut().zip(s).for_each(|(p, v)| *p += v);
                    match step {
                        1 => add(&simd::fp8_dot_tokens(isa, codes, [token(t)]), part),
                        2 => add(&simd::fp8_dot_tokens(isa, codes, [token(t), token(t + 1)]), part),
                        3 => add(&simd::fp8_dot_tokens(isa, codes, [token(t), token(t + 1), token(t + 2)]), part),
                        _ => add(
                            &simd::fp8_dot_tokens(isa, codes, [token(t), token(t + 1), token(t + 2), token(t + 3)]),
                            part,
                        ),
                    }
                    t += step;
                }
            }
            start = end;
        }
        for (r, row_sums) in sums.chunks_exact(m).enumerate() {
            let o = first + r;
            let scale = weight.scales[o];
            for (t, &v) in row_sums.iter().enumerate() {
                // SAFETY: t < m and o < rows, so the index is inside out (m * rows values), and column o belongs to
                // this task's rows only.
                unsafe { dst.write(t * rows + o, v * scale) };
            }
        }
    });
}

/// Many tokens: dequantise a panel of weight rows (scaled) into f32, multiply it with `gemm`, next panel.
fn fp8_panels(isa: Isa, plan: Fp8Plan, x: &[f32], m: usize, weight: Fp8Weight<'_>, out: &mut [f32]) {
    let (rows, cols) = (weight.rows, weight.cols);
    // Whole multiples of 16 rows keep gemm's column blocks full.
    let panel_rows = ((plan.panel_values / cols) / 16 * 16).max(16).min(rows);
    let mut panel = vec![0.0f32; panel_rows * cols];
    let mut first = 0;
    while first < rows {
        let count = panel_rows.min(rows - first);
        let panel = &mut panel[..count * cols];
        panel.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
            let o = first + r;
            simd::fp8_dequant_row(isa, weight.row(o), weight.scales[o], dst);
        });
        // SAFETY: x holds m * cols values (checked by the caller); the panel holds count * cols values viewed as
        // [cols, count] with element (c, j) at j * cols + c; the destination starts at column `first` of the
        // row-major out [m, rows], so element (i, j) is at i * rows + first + j < m * rows because
        // first + count <= rows.
        unsafe {
            gemm::gemm(
                m,
                count,
                cols,
                out.as_mut_ptr().add(first),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                panel.as_ptr(),
                cols as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm_parallelism(m, count, cols),
            );
        }
        first += count;
    }
}

/// Scalar reference for [`matmul_fp8`]: the table decode and f64 accumulation, `scales[o]` applied at the end.
pub fn matmul_fp8_reference(x: &[f32], m: usize, weight: Fp8Weight<'_>, out: &mut [f32]) -> Result<(), KernelError> {
    check_fp8("matmul_fp8_reference", x, m, &weight, out)?;
    let (rows, cols) = (weight.rows, weight.cols);
    for i in 0..m {
        for o in 0..rows {
            let mut acc = 0.0f64;
            for c in 0..cols {
                acc += x[i * cols + c] as f64 * E4M3_TO_F32[weight.codes[o * cols + c] as usize] as f64;
            }
            out[i * rows + o] = (acc * weight.scales[o] as f64) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, fp8_codes, rng, uniform};

    /// Checks `got` against the f64 reference with error at most `1e-5 * sum_c |x[i,c]| |w[o,c]|` per output.
    fn assert_fp8_close(got: &[f32], x: &[f32], m: usize, weight: Fp8Weight<'_>, what: &str) {
        let mut want = vec![0.0f32; m * weight.rows];
        matmul_fp8_reference(x, m, weight, &mut want).expect("reference");
        for i in 0..m {
            for o in 0..weight.rows {
                let magnitude: f32 = (0..weight.cols)
                    .map(|c| {
                        (x[i * weight.cols + c] * crate::fp8::e4m3_to_f32(weight.codes[o * weight.cols + c])).abs()
                    })
                    .sum::<f32>()
                    * weight.scales[o].abs();
                let (g, w) = (got[i * weight.rows + o], want[i * weight.rows + o]);
                assert!(
                    (g - w).abs() <= 1e-5 * magnitude + 1e-30,
                    "{what}: out[{i},{o}] = {g}, reference {w}, scale of terms {magnitude}"
                );
            }
        }
    }

    #[test]
    fn fp8_matches_reference_on_awkward_shapes() {
        let mut r = rng(1);
        let shapes = [
            (1, 7, 33),
            (2, 31, 100),
            (3, 129, 257),
            (4, 5, 1),
            (5, 16, 64),
            (17, 33, 47),
            (65, 9, 131),
            (300, 23, 61),
        ];
        for &(m, n, k) in &shapes {
            let x = uniform(&mut r, m * k, 2.0);
            let codes = fp8_codes(&mut r, n * k);
            let scales: Vec<f32> = (0..n).map(|_| r.random_range(1e-3..1e-1f32)).collect();
            let weight = Fp8Weight::new(&codes, &scales, n, k).expect("weight");
            for isa in Isa::available() {
                // Both strategies at every m, with tiny panels and tasks so that several of each run.
                let small =
                    Fp8Plan { panel_min_tokens: usize::MAX, panel_values: 1, stream_task_bytes: 64, x_block_bytes: 1 };
                let panels = Fp8Plan { panel_min_tokens: 0, panel_values: 40 * k, ..small };
                for (name, plan) in [("default", Fp8Plan::default()), ("streaming", small), ("panels", panels)] {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_fp8_with(isa, plan, &x, m, weight, &mut out).expect("matmul_fp8");
                    assert_fp8_close(&out, &x, m, weight, &format!("{isa:?} {name} m={m} n={n} k={k}"));
                }
            }
            let mut out = vec![f32::NAN; m * n];
            matmul_fp8(&x, m, weight, &mut out).expect("public matmul_fp8");
            assert_fp8_close(&out, &x, m, weight, "public");
        }
    }

    use rand::Rng;

    #[test]
    fn fp8_checks_shapes() {
        let codes = vec![0u8; 12];
        let scales = vec![1.0f32; 3];
        let weight = Fp8Weight { codes: &codes, scales: &scales, rows: 3, cols: 4 };
        let x = vec![0.0f32; 8];
        let mut out = vec![0.0f32; 6];
        assert!(matmul_fp8(&x, 2, weight, &mut out).is_ok());
        let err = matmul_fp8(&x, 3, weight, &mut out).expect_err("x too short");
        assert!(matches!(err, KernelError::Shape { op: "matmul_fp8", .. }), "{err}");
        assert!(err.to_string().contains("m * cols = 3 * 4 = 12"), "{err}");
        let err = matmul_fp8(&x, 2, weight, &mut out[..5]).expect_err("out too short");
        assert!(err.to_string().contains("out has 5 values"), "{err}");
        assert!(Fp8Weight::new(&codes, &scales[..2], 3, 4).is_err());
        assert_eq!(format!("{weight:?}"), "Fp8Weight { rows: 3, cols: 4, codes: [12 bytes], scales: [3 values] }");
        assert!(Fp8Weight::new(&codes[..11], &scales, 3, 4).is_err());
        // Zero-sized dimensions are valid and produce zeros or nothing.
        let mut out = vec![1.0f32; 6];
        matmul_fp8(&[], 2, Fp8Weight { codes: &[], scales: &scales, rows: 3, cols: 0 }, &mut out).expect("k = 0");
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn f32_matches_reference() {
        let mut r = rng(2);
        // The last shape is large enough for gemm's threaded path.
        for &(m, n, k) in &[(1, 1, 1), (1, 9, 17), (3, 7, 5), (17, 33, 65), (65, 129, 65)] {
            let x = uniform(&mut r, m * k, 1.0);
            let w = uniform(&mut r, n * k, 1.0);
            let mut got = vec![f32::NAN; m * n];
            let mut want = vec![0.0f32; m * n];
            matmul_f32(&x, m, &w, n, k, &mut got).expect("matmul_f32");
            matmul_f32_reference(&x, m, &w, n, k, &mut want).expect("reference");
            assert_close(&got, &want, 1e-5 * k as f32, 1e-5, &format!("matmul_f32 {m}x{n}x{k}"));
        }
        let err = matmul_f32(&[0.0; 5], 2, &[0.0; 6], 3, 2, &mut [0.0; 6]).expect_err("bad x");
        assert!(matches!(err, KernelError::Shape { op: "matmul_f32", .. }));
    }
}
