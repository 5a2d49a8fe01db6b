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
