//! Vector building blocks shared by the kernels, behind one runtime switch.
//!
//! [`Isa::detect`] picks AVX2 + FMA + F16C on x86_64 when the CPU has all three (checked once with
//! `is_x86_feature_detected!`, which caches), and a portable path everywhere else. The portable path is written in
//! 8-lane chunks so that LLVM vectorises it with whatever the target baseline offers (SSE2 on x86_64, NEON on
//! aarch64). Both paths are tested against the scalar references that live next to each kernel; the tests run every
//! path this CPU can execute, so the portable one is covered on AVX2 machines too.
//!
//! Intrinsics live in one file per architecture (`avx2.rs`); nothing outside this module touches them.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;

/// An instruction-set path. Kernels take one so tests can force each path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Plain Rust, auto-vectorised for the target baseline.
    Portable,
    /// AVX2 + FMA + F16C intrinsics (x86_64 only, chosen only when the CPU has them).
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The fastest path this CPU supports.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every path this CPU can run, slowest first (for tests).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut paths = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            paths.push(Isa::detect());
        }
        paths
    }

    /// A short name for reports ("avx2+fma+f16c" or "portable").
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+fma+f16c",
        }
    }
}

// Each dispatcher below is safe to call: the `Avx2` variant is only ever constructed by `detect` after the CPU
// reported the features (tests obtain it the same way), which is the precondition of every `avx2::*` function.

/// `sum(a[i] * b[i])`. Panics in debug builds if the lengths differ; callers pass equal-length slices.
#[inline]
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa {
        Isa::Portable => portable::dot(a, b),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
    }
}

/// `sum(a[i]^2)`.
#[inline]
pub(crate) fn sum_squares(isa: Isa, a: &[f32]) -> f32 {
    match isa {
        Isa::Portable => portable::sum_squares(a),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::sum_squares(a) },
    }
}

/// `sum(a[i])`.
#[inline]
pub(crate) fn sum(isa: Isa, a: &[f32]) -> f32 {
    match isa {
        Isa::Portable => portable::sum(a),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::sum(a) },
    }
}

/// `out[i] = (x[i] * s) * w[i]`.
#[inline]
pub(crate) fn scale_mul(isa: Isa, x: &[f32], s: f32, w: &[f32], out: &mut [f32]) {
    debug_assert!(x.len() == w.len() && x.len() == out.len());
    match isa {
        Isa::Portable => portable::scale_mul(x, s, w, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::scale_mul(x, s, w, out) },
    }
}

/// `x[i] *= s`.
#[inline]
pub(crate) fn scale_in_place(isa: Isa, x: &mut [f32], s: f32) {
    match isa {
        Isa::Portable => portable::scale_in_place(x, s),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::scale_in_place(x, s) },
    }
}

/// `y[i] += alpha * x[i]`.
#[inline]
pub(crate) fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    match isa {
        Isa::Portable => portable::axpy(alpha, x, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::axpy(alpha, x, y) },
    }
}

/// `x[i] = exp(x[i] - max)`, returning the sum of the results (a softmax numerator and denominator).
#[inline]
pub(crate) fn exp_shifted_sum(isa: Isa, x: &mut [f32], max: f32) -> f32 {
    match isa {
        Isa::Portable => portable::exp_shifted_sum(x, max),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::exp_shifted_sum(x, max) },
    }
}

/// `out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]`.
#[inline]
pub(crate) fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == up.len() && gate.len() == out.len());
    match isa {
        Isa::Portable => portable::silu_mul(gate, up, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::silu_mul(gate, up, out) },
    }
}

/// `out[c] = e4m3(codes[c]) * scale`: one weight row dequantised.
#[inline]
pub(crate) fn fp8_dequant_row(isa: Isa, codes: &[u8], scale: f32, out: &mut [f32]) {
    debug_assert_eq!(codes.len(), out.len());
    match isa {
        Isa::Portable => portable::fp8_dequant_row(codes, scale, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::fp8_dequant_row(codes, scale, out) },
    }
}

/// `[sum_c x_t[c] * e4m3(codes[c]) for t in 0..T]`: one weight row against up to `T` tokens, reading the row once.
/// Every `xs[t]` has `codes.len()` values.
#[inline]
pub(crate) fn fp8_dot_tokens<const T: usize>(isa: Isa, codes: &[u8], xs: [&[f32]; T]) -> [f32; T] {
    debug_assert!(xs.iter().all(|x| x.len() == codes.len()));
    match isa {
        Isa::Portable => portable::fp8_dot_tokens(codes, xs),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::fp8_dot_tokens(codes, xs) },
    }
}

/// `max |x[i]|` ignoring NaN, exactly `x.iter().fold(0.0, |m, v| m.max(v.abs()))`.
#[inline]
pub(crate) fn amax(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        Isa::Portable => portable::amax(x),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::amax(x) },
    }
}

/// `out[i] = f32_to_e4m3(x[i] * inverse)`, bit for bit.
#[inline]
pub(crate) fn fp8_encode_scaled(isa: Isa, x: &[f32], inverse: f32, out: &mut [u8]) {
    debug_assert_eq!(x.len(), out.len());
    match isa {
        Isa::Portable => portable::fp8_encode_scaled(x, inverse, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::fp8_encode_scaled(x, inverse, out) },
    }
}

/// `out[i] = E4M3_TO_F32[codes[i]] * scale`, bit for bit, NaN codes included (unlike [`fp8_dequant_row`], whose
/// AVX2 path turns NaN codes into ±480 * scale).
#[inline]
pub(crate) fn fp8_decode_scaled(isa: Isa, codes: &[u8], scale: f32, out: &mut [f32]) {
    debug_assert_eq!(codes.len(), out.len());
    match isa {
        Isa::Portable => portable::fp8_dequant_row(codes, scale, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see the note above the dispatchers.
        Isa::Avx2 => unsafe { avx2::fp8_decode_scaled(codes, scale, out) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::E4M3_TO_F32;
    use crate::testing::{assert_close, rng, uniform};

    #[test]
    fn fp8_decode_matches_the_table_for_every_code() {
        // Every finite code, at every position of a 32- and 16-wide step and the scalar tail.
        let codes: Vec<u8> = (0..=255u8).filter(|c| c & 0x7F != 0x7F).collect();
        for isa in Isa::available() {
            for shift in 0..codes.len() {
                let rotated: Vec<u8> = codes.iter().cycle().skip(shift).take(codes.len() + 17).copied().collect();
                let mut out = vec![f32::NAN; rotated.len()];
                fp8_dequant_row(isa, &rotated, 1.0, &mut out);
                for (c, v) in rotated.iter().zip(&out) {
                    assert_eq!(v.to_bits(), E4M3_TO_F32[*c as usize].to_bits(), "{isa:?} code {c:#04x}");
                }
            }
        }
    }

    #[test]
    fn fp8_dot_matches_a_plain_sum() {
        let mut r = rng(7);
        for isa in Isa::available() {
            for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 48, 100, 257] {
                let codes = crate::testing::fp8_codes(&mut r, len);
                let xs: Vec<Vec<f32>> = (0..4).map(|_| uniform(&mut r, len, 1.0)).collect();
                let want: Vec<f32> = xs
                    .iter()
                    .map(|x| {
                        x.iter().zip(&codes).map(|(a, &c)| *a as f64 * E4M3_TO_F32[c as usize] as f64).sum::<f64>()
                            as f32
                    })
                    .collect();
                let atol = 1e-5 * (len as f32 + 1.0) * 448.0;
                assert_close(&fp8_dot_tokens(isa, &codes, [&xs[0][..]]), &want[..1], atol, 1e-5, "T=1");
                assert_close(&fp8_dot_tokens(isa, &codes, [&xs[0][..], &xs[1][..]]), &want[..2], atol, 1e-5, "T=2");
                assert_close(
                    &fp8_dot_tokens(isa, &codes, [&xs[0][..], &xs[1][..], &xs[2][..]]),
                    &want[..3],
                    atol,
                    1e-5,
                    "T=3",
                );
                let four = fp8_dot_tokens(isa, &codes, [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]]);
                assert_close(&four, &want, atol, 1e-5, "T=4");
            }
        }
    }

    #[test]
    fn vector_helpers_match_scalar_loops() {
        let mut r = rng(8);
        for isa in Isa::available() {
            for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 100] {
                let a = uniform(&mut r, len, 2.0);
                let b = uniform(&mut r, len, 2.0);
                let tol = 1e-5 * (len as f32 + 1.0);
                let dot_ref: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                assert_close(&[dot(isa, &a, &b)], &[dot_ref], tol, 1e-5, "dot");
                assert_close(&[sum_squares(isa, &a)], &[a.iter().map(|x| x * x).sum()], tol, 1e-5, "sum_squares");
                assert_close(&[sum(isa, &a)], &[a.iter().sum()], tol, 1e-5, "sum");
                let mut y = b.clone();
                axpy(isa, 0.5, &a, &mut y);
                let y_ref: Vec<f32> = a.iter().zip(&b).map(|(x, y)| y + 0.5 * x).collect();
                assert_close(&y, &y_ref, 1e-6, 1e-6, "axpy");
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_and_silu_range() {
        for isa in Isa::available() {
            // exp(x - max) with x - max in [-100, 0] (softmax), and exp(-g) for g in [-88, 88] (silu).
            let values: Vec<f32> = (0..=20_000).map(|i| -100.0 + i as f32 * 0.0094).collect();
            let mut shifted = values.clone();
            exp_shifted_sum(isa, &mut shifted, 0.0);
            for (&x, &e) in values.iter().zip(&shifted) {
                let want = x.exp();
                // Below e^-87 the result is allowed to flush to zero.
                assert!((e - want).abs() <= 4e-7 * want + 1e-37, "{isa:?} exp({x}) = {e}, want {want}");
            }
            // The returned sum, on a softmax-shaped row.
            let mut row: Vec<f32> = (0..1001).map(|i| i as f32 * 0.01).collect();
            let want_total: f64 = row.iter().map(|&x| (x as f64 - 10.0).exp()).sum();
            let total = exp_shifted_sum(isa, &mut row, 10.0);
            assert!(((total as f64) - want_total).abs() <= 1e-5 * want_total, "{total} vs {want_total}");
            let mut nan = [f32::NAN; 9];
            exp_shifted_sum(isa, &mut nan, 0.0);
            assert!(nan.iter().all(|v| v.is_nan()), "{isa:?} NaN must propagate");
        }
    }

    /// f32 values that reach every branch of the E4M3 encoder, both signs: a sweep over every exponent and the top
    /// mantissa bits (zeros, f32 subnormals, infinities, NaNs), every E4M3 rounding point of the normal range with its
    /// tie and neighbours, the subnormal grid's ties, and the values around the saturation point 448.
    fn e4m3_edge_values() -> Vec<f32> {
        let mut values = Vec::new();
        for high in 0..=0xFFFFu32 {
            values.push(f32::from_bits(high << 16));
            values.push(f32::from_bits((high << 16) | 0xFFFF));
        }
        for exponent in 110u32..=137 {
            for mantissa in 0..8u32 {
                for rest in [0, 1, 0x7_FFFF, 0x8_0000, 0x8_0001, 0xF_FFFF] {
                    let x = f32::from_bits((exponent << 23) | (mantissa << 20) | rest);
                    values.extend([x, -x]);
                }
            }
        }
        for half_units in 0..=20u32 {
            let bits = (half_units as f32 / 1024.0).to_bits();
            for b in [bits.saturating_sub(1), bits, bits + 1] {
                values.extend([f32::from_bits(b), -f32::from_bits(b)]);
            }
        }
        for x in [448.0f32, 464.0, 480.0, 1e30, f32::MAX, f32::INFINITY, f32::NAN, 0.0, f32::MIN_POSITIVE, 1e-45] {
            let bits = x.to_bits();
            for b in [bits.saturating_sub(1), bits, bits.saturating_add(1)] {
                values.extend([f32::from_bits(b), -f32::from_bits(b)]);
            }
        }
        let mut r = rng(11);
        values.extend((0..50_000).map(|_| f32::from_bits(rand::Rng::random::<u32>(&mut r))));
        values.extend(uniform(&mut r, 50_000, 500.0));
        values.extend(uniform(&mut r, 20_000, 0.02));
        values
    }

    #[test]
    fn fp8_encode_matches_the_scalar_encoder_bit_for_bit() {
        let values = e4m3_edge_values();
        for isa in Isa::available() {
            for inverse in [1.0f32, 0.37, 448.0 / 3.0, 1e-3, 2e5] {
                let mut codes = vec![0u8; values.len()];
                fp8_encode_scaled(isa, &values, inverse, &mut codes);
                for (&x, &code) in values.iter().zip(&codes) {
                    let want = crate::fp8::f32_to_e4m3(x * inverse);
                    assert_eq!(code, want, "{isa:?}: {x:e} ({:#010x}) * {inverse}", x.to_bits());
                }
            }
            // Every length up to two 32-wide steps, so each tail path sees every edge value.
            for len in 0..70 {
                for start in (0..values.len() - len).step_by(7919) {
                    let slice = &values[start..start + len];
                    let mut codes = vec![0xAAu8; len];
                    fp8_encode_scaled(isa, slice, 1.0, &mut codes);
                    let want: Vec<u8> = slice.iter().map(|&x| crate::fp8::f32_to_e4m3(x)).collect();
                    assert_eq!(codes, want, "{isa:?} len {len}");
                }
            }
        }
    }

    #[test]
    fn fp8_decode_scaled_matches_the_table_bit_for_bit() {
        // All 256 codes (NaN codes included) at every position of a 32-wide step and the tail.
        let codes: Vec<u8> = (0..=255u8).collect();
        let scales = [1.0f32, 0.0, -0.0, 2.5e-3, 1e-40, 1.3e36, 1.4e36, 3e37, f32::MAX, f32::INFINITY, f32::NAN, -0.75];
        for isa in Isa::available() {
            for &scale in &scales {
                for shift in (0..codes.len()).step_by(5) {
                    let rotated: Vec<u8> = codes.iter().cycle().skip(shift).take(codes.len() + 19).copied().collect();
                    let mut out = vec![0.0f32; rotated.len()];
                    fp8_decode_scaled(isa, &rotated, scale, &mut out);
                    for (c, v) in rotated.iter().zip(&out) {
                        let want = E4M3_TO_F32[*c as usize] * scale;
                        // NaN times NaN: which operand's NaN comes out is the compiler's choice (it may swap
                        // the operands of a multiply), so only NaN-ness is defined there.
                        let same = v.to_bits() == want.to_bits() || (scale.is_nan() && v.is_nan());
                        assert!(same, "{isa:?} code {c:#04x} scale {scale:e}: {v} vs {want}");
                    }
                }
            }
            // Blocks without any NaN code take the F16C path; with random scales of every magnitude.
            let mut r = rng(12);
            let finite = crate::testing::fp8_codes(&mut r, 4096 + 13);
            for _ in 0..200 {
                let scale = f32::from_bits(rand::Rng::random_range(&mut r, 0..0x7F80_0000u32));
                let mut out = vec![0.0f32; finite.len()];
                fp8_decode_scaled(isa, &finite, scale, &mut out);
                for (c, v) in finite.iter().zip(&out) {
                    let want = E4M3_TO_F32[*c as usize] * scale;
                    assert_eq!(v.to_bits(), want.to_bits(), "{isa:?} code {c:#04x} scale {scale:e}");
                }
            }
        }
    }

    #[test]
    fn amax_matches_the_scalar_fold() {
        let mut r = rng(13);
        for isa in Isa::available() {
            for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 64, 100, 5120] {
                let base = uniform(&mut r, len, 3.0);
                let mut cases = vec![base.clone(), vec![-0.0; len], vec![0.0; len]];
                for special in [f32::NAN, -f32::NAN, f32::INFINITY, -f32::INFINITY, -1e30, 1e-42] {
                    for position in [0, len / 2, len.saturating_sub(1)] {
                        let mut x = base.clone();
                        if let Some(v) = x.get_mut(position) {
                            *v = special;
                        }
                        cases.push(x);
                    }
                }
                for x in cases {
                    let want = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    assert_eq!(amax(isa, &x).to_bits(), want.to_bits(), "{isa:?} len {len}");
                }
            }
        }
    }
}
