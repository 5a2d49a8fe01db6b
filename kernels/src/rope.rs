//! Rotary position embedding, interleaved (GPT-J) pairing, which is what Llama 4's HF weights expect: the pair
//! `(x[2i], x[2i+1])` of each head is rotated as the complex number `x[2i] + i x[2i+1]` times `e^(i angle)`.

use rayon::prelude::*;

use crate::error::{check_len, product, KernelError};

/// Tokens per rayon task.
const TOKENS_PER_TASK: usize = 8;

fn check(
    op: &'static str,
    x: &[f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
) -> Result<(), KernelError> {
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(KernelError::invalid(op, format!("head_dim must be even and positive, got {head_dim}")));
    }
    check_len(op, "inv_freq", inv_freq.len(), head_dim / 2, format_args!("head_dim / 2 = {head_dim} / 2"))?;
    let tokens = positions.len();
    let expected = product(op, product(op, tokens, heads)?, head_dim)?;
    check_len(op, "x", x.len(), expected, format_args!("tokens * heads * head_dim = {tokens} * {heads} * {head_dim}"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    #[test]
    fn matches_reference() {
        let mut r = rng(5);
        for &(tokens, heads, head_dim) in &[(1, 1, 2), (3, 5, 6), (17, 3, 128), (9, 40, 64)] {
            let x = uniform(&mut r, tokens * heads * head_dim, 2.0);
            let positions: Vec<usize> = (0..tokens).map(|t| t * 977 + 3 * (t % 2)).collect();
            let inv_freq = default_inv_freq(head_dim, 500_000.0);
            let mut got = x.clone();
            let mut want = x.clone();
            rope_interleaved_in_place(&mut got, &positions, heads, head_dim, &inv_freq).expect("rope");
            rope_interleaved_reference(&mut want, &positions, heads, head_dim, &inv_freq).expect("reference");
            assert_close(&got, &want, 0.0, 0.0, &format!("rope {tokens}x{heads}x{head_dim}"));
        }
    }

    #[test]
    fn matches_the_direct_formula() {
        // head_dim 4: pairs (x0, x1) at frequency 1 and (x2, x3) at frequency 0.25, position 3.
        let mut x = [1.0f32, 0.0, 0.5, 2.0];
        rope_interleaved_in_place(&mut x, &[3], 1, 4, &[1.0, 0.25]).expect("rope");
        let (a, b) = (3.0f32, 0.75f32);
        let want = [a.cos(), a.sin(), 0.5 * b.cos() - 2.0 * b.sin(), 0.5 * b.sin() + 2.0 * b.cos()];
        assert_close(&x, &want, 1e-7, 1e-6, "direct");
        // Position 0 is the identity.
        let mut y = [0.3f32, -0.7, 1.1, 2.2];
        rope_interleaved_in_place(&mut y, &[0], 1, 4, &[1.0, 0.25]).expect("rope");
        assert_eq!(y, [0.3, -0.7, 1.1, 2.2]);
        // Llama's inverse frequencies: theta^(-2i/d).
        let f = default_inv_freq(128, 500_000.0);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 500_000f64.powf(-2.0 / 128.0) as f32).abs() < 1e-9);
    }

    #[test]
    fn refuses_bad_shapes() {
        let mut x = [0.0f32; 6];
        assert!(matches!(
            rope_interleaved_in_place(&mut x, &[0], 2, 3, &[1.0]),
            Err(KernelError::InvalidArgument { op: "rope_interleaved_in_place", .. })
        ));
        assert!(rope_interleaved_in_place(&mut x, &[0], 1, 6, &[1.0, 1.0]).is_err());
        assert!(rope_interleaved_in_place(&mut x, &[0, 1], 1, 4, &[1.0, 1.0]).is_err());
        assert!(rope_interleaved_in_place(&mut [], &[], 4, 4, &[1.0, 1.0]).is_ok());
    }
}
