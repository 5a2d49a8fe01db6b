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
