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

