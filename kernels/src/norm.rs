//! RMS normalisation over the last dimension, in f32 (Llama's `RMSNorm`, and the weightless variant Llama 4 Scout
//! applies to q and k).

use rayon::prelude::*;

use crate::error::{check_len, KernelError};
use crate::simd::{self, Isa};

/// Rows per rayon task; a row is a few KiB, so smaller tasks would cost more to schedule than to run.
const ROWS_PER_TASK: usize = 16;

fn check_rows(op: &'static str, len: usize, dim: usize) -> Result<usize, KernelError> {
    if dim == 0 {
        return Err(KernelError::invalid(op, "row dimension is 0"));
    }
    if len % dim != 0 {
        return Err(KernelError::shape(op, format!("x has {len} values, not a multiple of the row dimension {dim}")));
    }
    Ok(len / dim)
}

#[inline]
fn inverse_rms(sum_squares: f32, dim: usize, eps: f32) -> f32 {
    1.0 / (sum_squares / dim as f32 + eps).sqrt()
}

/// Llama RMSNorm per row: `out = (x / sqrt(mean(x^2) + eps)) * weight`, computed in f32.
///
/// `x` and `out` hold `x.len() / weight.len()` rows of `weight.len()` values.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    rms_norm_with(Isa::detect(), x, weight, eps, out)
}

pub(crate) fn rms_norm_with(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    const OP: &str = "rms_norm";
    let dim = weight.len();
    check_rows(OP, x.len(), dim)?;
    check_len(OP, "out", out.len(), x.len(), "x.len()")?;
    x.par_chunks(dim).zip(out.par_chunks_mut(dim)).with_min_len(ROWS_PER_TASK).for_each(|(row, dst)| {
        let s = inverse_rms(simd::sum_squares(isa, row), dim, eps);
        simd::scale_mul(isa, row, s, weight, dst);
    });
    Ok(())
}

/// Scalar reference for [`rms_norm`] (f64 mean of squares).
pub fn rms_norm_reference(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    const OP: &str = "rms_norm_reference";
    let dim = weight.len();
    check_rows(OP, x.len(), dim)?;
    check_len(OP, "out", out.len(), x.len(), "x.len()")?;
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let s = (1.0 / (mean + eps as f64).sqrt()) as f32;
        for ((o, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *o = (v * s) * w;
        }
    }
    Ok(())
}

/// Weightless RMS norm in place over rows of `dim` (Llama 4 Scout's qk-norm, `L2Norm` in HF):
/// `x * rsqrt(mean(x^2) + eps)`.
pub fn rms_norm_unweighted_in_place(x: &mut [f32], dim: usize, eps: f32) -> Result<(), KernelError> {
    rms_norm_unweighted_with(Isa::detect(), x, dim, eps)
}

pub(crate) fn rms_norm_unweighted_with(isa: Isa, x: &mut [f32], dim: usize, eps: f32) -> Result<(), KernelError> {
    check_rows("rms_norm_unweighted_in_place", x.len(), dim)?;
    x.par_chunks_mut(dim).with_min_len(ROWS_PER_TASK).for_each(|row| {
        let s = inverse_rms(simd::sum_squares(isa, row), dim, eps);
        simd::scale_in_place(isa, row, s);
    });
    Ok(())
}

/// Scalar reference for [`rms_norm_unweighted_in_place`] (f64 mean of squares).
pub fn rms_norm_unweighted_reference(x: &mut [f32], dim: usize, eps: f32) -> Result<(), KernelError> {
    check_rows("rms_norm_unweighted_reference", x.len(), dim)?;
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let s = (1.0 / (mean + eps as f64).sqrt()) as f32;
        row.iter_mut().for_each(|v| *v *= s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    #[test]
    fn matches_reference_on_awkward_rows() {
        let mut r = rng(3);
        for isa in Isa::available() {
            for &(rows, dim) in &[(1, 1), (5, 7), (3, 33), (40, 130), (2, 5120)] {
                let x = uniform(&mut r, rows * dim, 3.0);
                let w = uniform(&mut r, dim, 1.5);
                let mut got = vec![f32::NAN; x.len()];
                let mut want = vec![0.0; x.len()];
                rms_norm_with(isa, &x, &w, 1e-5, &mut got).expect("rms_norm");
                rms_norm_reference(&x, &w, 1e-5, &mut want).expect("reference");
                assert_close(&got, &want, 1e-6, 2e-6, &format!("{isa:?} rms_norm {rows}x{dim}"));
                let mut got = x.clone();
                let mut want = x.clone();
                rms_norm_unweighted_with(isa, &mut got, dim, 1e-6).expect("unweighted");
                rms_norm_unweighted_reference(&mut want, dim, 1e-6).expect("reference");
                assert_close(&got, &want, 1e-6, 2e-6, &format!("{isa:?} unweighted {rows}x{dim}"));
            }
        }
    }

    #[test]
    fn known_values_and_shape_errors() {
        // mean(3^2, 4^2) = 12.5.
        let mut out = [0.0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out).expect("rms_norm");
        let inv = 1.0 / 12.5f32.sqrt();
        assert_close(&out, &[3.0 * inv, 8.0 * inv], 0.0, 1e-6, "known");
        let mut x = [3.0f32, 4.0];
        rms_norm_unweighted_in_place(&mut x, 2, 0.0).expect("unweighted");
        assert_close(&x, &[3.0 * inv, 4.0 * inv], 0.0, 1e-6, "known unweighted");
        // An all-zero row stays zero thanks to eps.
        let mut zeros = [0.0f32; 4];
        rms_norm_unweighted_in_place(&mut zeros, 2, 1e-6).expect("zeros");
        assert_eq!(zeros, [0.0; 4]);
        let err = rms_norm(&[1.0; 5], &[1.0; 2], 1e-5, &mut [0.0; 5]).expect_err("5 values in rows of 2");
        assert!(matches!(err, KernelError::Shape { op: "rms_norm", .. }), "{err}");
        assert!(rms_norm(&[1.0; 4], &[1.0; 2], 1e-5, &mut [0.0; 3]).is_err());
        assert!(rms_norm(&[], &[], 1e-5, &mut []).is_err());
        assert!(rms_norm_unweighted_in_place(&mut [1.0; 3], 2, 1e-5).is_err());
    }
}
