//! Rotary position embedding, interleaved (GPT-J) pairing, which is what Llama 4's HF weights expect: the pair
//! `(x[2i], x[2i+1])` of each head is rotated as the complex number `x[2i] + i x[2i+1]` times `e^(i angle)`.

use rayon::prelude::*;

use crate::error::{check_len, product, KernelError};

/// Tokens per rayon task.
const TOKENS_PER_TASK: usize = 8;

fn check(op: &'static str, x: &[f32], positions: &[usize], heads: usize, head_dim: usize, inv_freq: &[f32]) -> Result<(), KernelError> {
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(KernelError::invalid(op, format!("head_dim must be even and positive, got {head_dim}")));
    }
    check_len(op, "inv_freq", inv_freq.len(), head_dim / 2, &format!("head_dim / 2 = {head_dim} / 2"))?;
    let tokens = positions.len();
    let expected = product(op, product(op, tokens, heads)?, head_dim)?;
    check_len(op, "x", x.len(), expected, &format!("tokens * heads * head_dim = {tokens} * {heads} * {head_dim}"))
}

/// The angle of pair `i` at `position`: the product is taken in f32, as HF's Llama 4 does (its `freqs` are f32), so
/// large positions lose the same precision here as there.
#[inline]
fn angle(position: usize, inv_freq: f32) -> f32 {
    position as f32 * inv_freq
}

#[inline]
fn rotate(a: f32, b: f32, cos: f32, sin: f32) -> (f32, f32) {
    (a * cos - b * sin, a * sin + b * cos)
}

/// Interleaved (GPT-J) rotary embedding in place. `x`: `[tokens, heads, head_dim]` with `tokens = positions.len()`;
/// the pair `(x[2i], x[2i+1])` of each head is rotated by `angle = (positions[t] as f32) * inv_freq[i]` (product and
/// cos/sin in f32). `inv_freq.len() == head_dim / 2`.
///
/// Cos and sin are computed once per token and shared by its heads; tokens are split across rayon threads.
pub fn rope_interleaved_in_place(
    x: &mut [f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
) -> Result<(), KernelError> {
    check("rope_interleaved_in_place", x, positions, heads, head_dim, inv_freq)?;
    if x.is_empty() {
        return Ok(());
    }
    let half = head_dim / 2;
    x.par_chunks_mut(heads * head_dim).zip(positions.par_iter()).with_min_len(TOKENS_PER_TASK).for_each_init(
        || vec![(0.0f32, 0.0f32); half],
        |table, (token, &position)| {
            for (slot, &f) in table.iter_mut().zip(inv_freq) {
                let (sin, cos) = angle(position, f).sin_cos();
                *slot = (cos, sin);
            }
            for head in token.chunks_exact_mut(head_dim) {
                for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(table.iter()) {
                    let (a, b) = rotate(pair[0], pair[1], cos, sin);
                    pair[0] = a;
                    pair[1] = b;
                }
            }
        },
    );
    Ok(())
}

/// Scalar reference for [`rope_interleaved_in_place`]: the angle recomputed for every element.
pub fn rope_interleaved_reference(
    x: &mut [f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
) -> Result<(), KernelError> {
    check("rope_interleaved_reference", x, positions, heads, head_dim, inv_freq)?;
    for (t, &position) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for i in 0..head_dim / 2 {
                let theta = angle(position, inv_freq[i]);
                let (a, b) = rotate(x[base + 2 * i], x[base + 2 * i + 1], theta.cos(), theta.sin());
                x[base + 2 * i] = a;
                x[base + 2 * i + 1] = b;
            }
        }
    }
    Ok(())
}

/// The inverse frequencies of standard RoPE, `theta^(-2i / head_dim)` for `i in 0..head_dim / 2`, computed in f64
/// and rounded once (HF computes `1 / theta^(arange(0, d, 2) / d)` in f32; the two agree to an ulp).
pub fn default_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64) as f32).collect()
}
