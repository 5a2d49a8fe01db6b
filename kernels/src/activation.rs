//! Element-wise activations: the SwiGLU gate `silu(gate) * up` of Llama's MLPs and experts.

use rayon::prelude::*;

use crate::error::{check_len, KernelError};
use crate::simd::{self, Isa};

/// Values per rayon task (64 KiB of each input).
const VALUES_PER_TASK: usize = 16 << 10;

/// `out[i] = silu(gate[i]) * up[i]` with `silu(g) = g / (1 + exp(-g))`.
///
/// The AVX2 path evaluates `exp` with a polynomial (relative error ~2e-7; see `simd/avx2.rs`).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    silu_mul_with(Isa::detect(), gate, up, out)
}

fn check(op: &'static str, gate: &[f32], up: &[f32], out: &[f32]) -> Result<(), KernelError> {
    check_len(op, "up", up.len(), gate.len(), "gate.len()")?;
    check_len(op, "out", out.len(), gate.len(), "gate.len()")
}

pub(crate) fn silu_mul_with(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    check("silu_mul", gate, up, out)?;
    if gate.len() <= VALUES_PER_TASK {
        simd::silu_mul(isa, gate, up, out);
        return Ok(());
    }
    out.par_chunks_mut(VALUES_PER_TASK)
        .zip(gate.par_chunks(VALUES_PER_TASK).zip(up.par_chunks(VALUES_PER_TASK)))
        .for_each(|(o, (g, u))| simd::silu_mul(isa, g, u, o));
    Ok(())
}

/// Scalar reference for [`silu_mul`].
pub fn silu_mul_reference(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    check("silu_mul_reference", gate, up, out)?;
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    #[test]
    fn matches_reference_including_large_magnitudes() {
        let mut r = rng(4);
        for isa in Isa::available() {
            // The last size spans several rayon tasks.
            for len in [0usize, 1, 7, 8, 9, 33, 1000, 3 * VALUES_PER_TASK + 5] {
                let gate = uniform(&mut r, len, 12.0);
                let up = uniform(&mut r, len, 3.0);
                let mut got = vec![f32::NAN; len];
                let mut want = vec![0.0; len];
                silu_mul_with(isa, &gate, &up, &mut got).expect("silu_mul");
                silu_mul_reference(&gate, &up, &mut want).expect("reference");
                assert_close(&got, &want, 1e-6, 1e-6, &format!("{isa:?} silu_mul len {len}"));
            }
            let gate = [-100.0f32, -88.5, -20.0, 0.0, 20.0, 88.5, 100.0, 1.0];
            let up = [1.0f32; 8];
            let mut got = [f32::NAN; 8];
            let mut want = [0.0; 8];
            silu_mul_with(isa, &gate, &up, &mut got).expect("silu_mul");
            silu_mul_reference(&gate, &up, &mut want).expect("reference");
            assert_close(&got, &want, 1e-6, 1e-6, &format!("{isa:?} extremes"));
        }
    }

    #[test]
    fn refuses_mismatched_lengths() {
        let err = silu_mul(&[1.0; 3], &[1.0; 2], &mut [0.0; 3]).expect_err("up too short");
        assert!(matches!(err, KernelError::Shape { op: "silu_mul", .. }), "{err}");
        assert!(silu_mul(&[1.0; 3], &[1.0; 3], &mut [0.0; 4]).is_err());
    }
}
