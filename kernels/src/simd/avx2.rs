//! The AVX2 + FMA + F16C path (x86_64). Every function here requires those three CPU features: the dispatchers in
//! `simd/mod.rs` only call them with `Isa::Avx2`, which `Isa::detect` hands out after checking.
//!
//! FP8 weights are widened with F16C: the E4M3 byte `b` placed as the f16 bit pattern
//! `((b & 0x80) << 8) | ((b & 0x7F) << 7)` is an f16 whose value is exactly `e4m3(b) * 2^-8` (the 4-bit exponent
//! lands in the low bits of f16's 5-bit exponent, whose bias is 8 larger; E4M3 subnormals land on f16 subnormals).
//! `_mm256_cvtph_ps` then yields eight f32 per instruction, and the 2^8 is folded into a scale or the final sum.
//! The one difference from the table: the NaN codes 0x7F/0xFF decode to ±480 * 2^-8 instead of NaN. Checkpoint
//! weights never hold NaN, so the hot loops do not pay to propagate it.

use std::arch::x86_64::*;

use crate::fp8::E4M3_TO_F32;

/// The power of two that the F16C trick divides every E4M3 value by.
const F16_TRICK_SCALE: f32 = 256.0;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Sixteen E4M3 codes at `p` as two vectors of `value * 2^-8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode16(p: *const u8) -> (__m256, __m256) {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let bytes = unsafe { _mm_loadu_si128(p as *const __m128i) };
    // Each code into the high byte of a 16-bit lane (b << 8), then an arithmetic shift by one puts the sign at bit
    // 15 (and a copy at bit 14, masked off) and exponent/mantissa at bits 13..7: the f16 pattern of the module docs.
    let zero = _mm_setzero_si128();
    let mask = _mm_set1_epi16(0xBF80u16 as i16);
    let lo = _mm_and_si128(_mm_srai_epi16::<1>(_mm_unpacklo_epi8(zero, bytes)), mask);
    let hi = _mm_and_si128(_mm_srai_epi16::<1>(_mm_unpackhi_epi8(zero, bytes)), mask);
    (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
}

/// Thirty-two E4M3 codes at `p` as four vectors of `value * 2^-8`, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode32(p: *const u8) -> [__m256; 4] {
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    let bytes = unsafe { _mm256_loadu_si256(p as *const __m256i) };
    // Same trick as `decode16` on a full register. The 256-bit unpacks work within 128-bit lanes, so `lo` holds
    // codes 0..8 and 16..24 and `hi` codes 8..16 and 24..32; the halves are picked back into order below.
    let zero = _mm256_setzero_si256();
    let mask = _mm256_set1_epi16(0xBF80u16 as i16);
    let lo = _mm256_and_si256(_mm256_srai_epi16::<1>(_mm256_unpacklo_epi8(zero, bytes)), mask);
    let hi = _mm256_and_si256(_mm256_srai_epi16::<1>(_mm256_unpackhi_epi8(zero, bytes)), mask);
    [
        _mm256_cvtph_ps(_mm256_castsi256_si128(lo)),
        _mm256_cvtph_ps(_mm256_castsi256_si128(hi)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(lo)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(hi)),
    ]
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads indices below `n`.
    unsafe {
        while i + 32 <= n {
            for (j, slot) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                *slot = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(off)), _mm256_loadu_ps(pb.add(off)), *slot);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
    }
    let mut total = unsafe { hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) };
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn sum_squares(a: &[f32]) -> f32 {
    // SAFETY: same features.
    unsafe { dot(a, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn sum(a: &[f32]) -> f32 {
    let n = a.len();
    let p = a.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads indices below `n`.
    unsafe {
        while i + 32 <= n {
            for (j, slot) in acc.iter_mut().enumerate() {
                *slot = _mm256_add_ps(*slot, _mm256_loadu_ps(p.add(i + 8 * j)));
            }
            i += 32;
        }
    }
    let mut total = unsafe { hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) };
    while i < n {
        total += a[i];
        i += 1;
    }
    total
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_mul(x: &[f32], s: f32, w: &[f32], out: &mut [f32]) {
    let n = x.len().min(w.len()).min(out.len());
    let vs = _mm256_set1_ps(s);
    let mut i = 0;
    // SAFETY: every access is below `n`.
    unsafe {
        while i + 8 <= n {
            let v = _mm256_mul_ps(
                _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), vs),
                _mm256_loadu_ps(w.as_ptr().add(i)),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
            i += 8;
        }
    }
    while i < n {
        out[i] = (x[i] * s) * w[i];
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_in_place(x: &mut [f32], s: f32) {
    let n = x.len();
    let vs = _mm256_set1_ps(s);
    let mut i = 0;
    // SAFETY: every access is below `n`.
    unsafe {
        while i + 8 <= n {
            let p = x.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), vs));
            i += 8;
        }
    }
    while i < n {
        x[i] *= s;
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    // SAFETY: every access is below `n`.
    unsafe {
        while i + 8 <= n {
            let p = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)));
            i += 8;
        }
    }
    while i < n {
        y[i] += alpha * x[i];
        i += 1;
    }
}

/// `exp(x)` on eight lanes: Cephes' `expf` (range reduction by ln 2 in two parts, degree-5 polynomial), relative
/// error about 2e-7 over the clamped range. Inputs below -88 give 0 (or a tiny subnormal) instead of f32's
/// smallest subnormals, above 88 they saturate at exp(88); NaN stays NaN.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8(x: __m256) -> __m256 {
    // `min`/`max` return their second operand when one is NaN: keep `x` second so NaN flows through.
    let x = _mm256_max_ps(_mm256_set1_ps(-88.0), _mm256_min_ps(_mm256_set1_ps(88.0), x));
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.398_2e-3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.333_452e-3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.166_579_6e-2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.666_666_5e-1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5));
    let r2 = _mm256_mul_ps(r, r);
    y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^fx through the exponent field; fx is in [-127, 127] after the clamp, and -127 gives exactly 0.
    let exponent = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(exponent))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_shifted_sum(x: &mut [f32], max: f32) -> f32 {
    let n = x.len();
    let vmax = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY: every access is below `n`.
    unsafe {
        while i + 8 <= n {
            let p = x.as_mut_ptr().add(i);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), vmax));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
    }
    let mut total = unsafe { hsum(acc) };
    while i < n {
        x[i] = (x[i] - max).exp();
        total += x[i];
        i += 1;
    }
    total
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len().min(up.len()).min(out.len());
    let one = _mm256_set1_ps(1.0);
    let negate = _mm256_set1_ps(-0.0);
    let mut i = 0;
    // SAFETY: every access is below `n`.
    unsafe {
        while i + 8 <= n {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp8(_mm256_xor_ps(g, negate));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
            i += 8;
        }
    }
    while i < n {
        let g = gate[i];
        out[i] = g / (1.0 + (-g).exp()) * up[i];
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fp8_dequant_row(codes: &[u8], scale: f32, out: &mut [f32]) {
    let n = codes.len().min(out.len());
    let vs = _mm256_set1_ps(scale * F16_TRICK_SCALE);
    let mut i = 0;
    // SAFETY: every access is below `n`.
    unsafe {
        while i + 32 <= n {
            let w = decode32(codes.as_ptr().add(i));
            for (j, v) in w.into_iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * j), _mm256_mul_ps(v, vs));
            }
            i += 32;
        }
        while i + 16 <= n {
            let (lo, hi) = decode16(codes.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(lo, vs));
            _mm256_storeu_ps(out.as_mut_ptr().add(i + 8), _mm256_mul_ps(hi, vs));
            i += 16;
        }
    }
    while i < n {
        out[i] = E4M3_TO_F32[codes[i] as usize] * scale;
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fp8_dot_tokens<const T: usize>(codes: &[u8], xs: [&[f32]; T]) -> [f32; T] {
    let n = codes.len();
    let cp = codes.as_ptr();
    let mut totals = [0.0f32; T];
    let mut i = 0;
    // SAFETY: every load reads indices below `n`; each `xs[t]` has `n` values (checked by the dispatcher's caller).
    unsafe {
        if T <= 2 {
            // Four accumulators per token hide the FMA latency.
            let mut acc = [[_mm256_setzero_ps(); 4]; T];
            while i + 32 <= n {
                let w = decode32(cp.add(i));
                for t in 0..T {
                    let xp = xs[t].as_ptr().add(i);
                    for j in 0..4 {
                        acc[t][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xp.add(8 * j)), acc[t][j]);
                    }
                }
                i += 32;
            }
            for t in 0..T {
                let a = &acc[t];
                totals[t] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
            }
        } else {
            // Two accumulators per token: with the four weight vectors that keeps four tokens in 16 registers.
            let mut acc = [[_mm256_setzero_ps(); 2]; T];
            while i + 32 <= n {
                let w = decode32(cp.add(i));
                for t in 0..T {
                    let xp = xs[t].as_ptr().add(i);
                    for j in 0..4 {
                        acc[t][j % 2] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xp.add(8 * j)), acc[t][j % 2]);
                    }
                }
                i += 32;
            }
            for t in 0..T {
                totals[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
            }
        }
        if i + 16 <= n {
            let (w0, w1) = decode16(cp.add(i));
            for t in 0..T {
                let xp = xs[t].as_ptr().add(i);
                let v = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), _mm256_mul_ps(w0, _mm256_loadu_ps(xp)));
                totals[t] += hsum(v);
            }
            i += 16;
        }
    }
    for total in totals.iter_mut() {
        *total *= F16_TRICK_SCALE;
    }
    for c in i..n {
        let w = E4M3_TO_F32[codes[c] as usize];
        for t in 0..T {
            totals[t] += xs[t][c] * w;
        }
    }
    totals
}

/// `max |x[i]|`, NaN ignored (the scalar `fold(0.0, |m, v| m.max(v.abs()))`: `maxps` returns its second operand
/// when either is NaN, so the accumulator goes second). Max is exact and order-free, so the lanes may split the work.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn amax(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads indices below `n`.
    unsafe {
        while i + 32 <= n {
            for (j, slot) in acc.iter_mut().enumerate() {
                let v = _mm256_and_ps(_mm256_loadu_ps(p.add(i + 8 * j)), abs_mask);
                *slot = _mm256_max_ps(v, *slot);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p.add(i)), abs_mask), acc[0]);
            i += 8;
        }
    }
    let v = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
    let v = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    let v = _mm_max_ss(v, _mm_shuffle_ps::<1>(v, v));
    let mut m = _mm_cvtss_f32(v);
    while i < n {
        m = m.max(x[i].abs());
        i += 1;
    }
    m
}

/// The E4M3 codes of eight `x * inverse` lanes as eight `i32`, bit for bit [`crate::fp8::f32_to_e4m3`]:
/// - normal range (`|y| >= 2^-6`): round the f32 bits to nearest-even at bit 20 (`b + 0x7FFFF + ((b >> 20) & 1)`,
///   a carry moves into the exponent as it should) and rebias the exponent 127 -> 7 (`- 120 << 3`);
/// - subnormal range: adding 2^14, whose ulp is 2^-9, rounds `|y|` to a multiple of 2^-9 the way the hardware
///   rounds (nearest-even), so the bit difference to 2^14 is `round_ties_even(|y| * 512)`;
/// - saturation is a clamp of the code to 0x7E (every `|y| >= 448` and infinity land above it, no finite `|y| <
///   448` does); NaN gives 0x7F without sign, like the scalar code.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn e4m3_codes8(x: __m256, inverse: __m256) -> __m256i {
    let bits = _mm256_castps_si256(_mm256_mul_ps(x, inverse));
    let magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF_FFFF));
    let sign = _mm256_and_si256(_mm256_srli_epi32::<24>(bits), _mm256_set1_epi32(0x80));
    let odd = _mm256_and_si256(_mm256_srli_epi32::<20>(magnitude), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(magnitude, _mm256_add_epi32(_mm256_set1_epi32(0x7_FFFF), odd));
    let normal = _mm256_sub_epi32(_mm256_srli_epi32::<20>(rounded), _mm256_set1_epi32(120 << 3));
    let shifted = _mm256_add_ps(_mm256_castsi256_ps(magnitude), _mm256_set1_ps(16384.0));
    let subnormal = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4680_0000));
    // `magnitude` is below 2^31, so signed compares order it correctly. 0x3C80_0000 is 2^-6.
    let is_normal = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x3C7F_FFFF));
    let code = _mm256_blendv_epi8(subnormal, normal, is_normal);
    let code = _mm256_or_si256(_mm256_min_epi32(code, _mm256_set1_epi32(0x7E)), sign);
    let is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F80_0000));
    _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), is_nan)
}

/// `out[i] = f32_to_e4m3(x[i] * inverse)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fp8_encode_scaled(x: &[f32], inverse: f32, out: &mut [u8]) {
    let n = x.len().min(out.len());
    let (p, o) = (x.as_ptr(), out.as_mut_ptr());
    let vi = _mm256_set1_ps(inverse);
    // Packing interleaves the four 8-lane vectors by 128-bit half; this puts the 4-byte groups back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    // SAFETY: every load and store is below `n`.
    unsafe {
        while i + 32 <= n {
            let a = e4m3_codes8(_mm256_loadu_ps(p.add(i)), vi);
            let b = e4m3_codes8(_mm256_loadu_ps(p.add(i + 8)), vi);
            let c = e4m3_codes8(_mm256_loadu_ps(p.add(i + 16)), vi);
            let d = e4m3_codes8(_mm256_loadu_ps(p.add(i + 24)), vi);
            // Codes are 0..=255: neither saturating pack changes them.
            let bytes = _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            _mm256_storeu_si256(o.add(i) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
            i += 32;
        }
        while i + 8 <= n {
            let a = e4m3_codes8(_mm256_loadu_ps(p.add(i)), vi);
            let words = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
            let bytes = _mm_packus_epi16(words, words);
            _mm_storel_epi64(o.add(i) as *mut __m128i, bytes);
            i += 8;
        }
    }
    while i < n {
        out[i] = crate::fp8::f32_to_e4m3(x[i] * inverse);
        i += 1;
    }
}

/// `out[i] = E4M3_TO_F32[codes[i]] * scale`, bit for bit, NaN codes included (unlike [`fp8_dequant_row`]).
///
/// The F16C trick gives `e4m3 * 2^-8` exactly and `scale * 2^8` is exact while it stays finite, so their product
/// is the same real number as the table's, rounded once the same way. Scales where `scale * 2^8` would overflow,
/// and 32-code blocks holding a NaN code, take the table.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fp8_decode_scaled(codes: &[u8], scale: f32, out: &mut [f32]) {
    let n = codes.len().min(out.len());
    let mut i = 0;
    if scale.abs() < f32::MAX / F16_TRICK_SCALE {
        let vs = _mm256_set1_ps(scale * F16_TRICK_SCALE);
        let all_ones = _mm256_set1_epi8(-1);
        let sign = _mm256_set1_epi8(0x80u8 as i8);
        // SAFETY: every load and store is below `n`.
        unsafe {
            while i + 32 <= n {
                let p = codes.as_ptr().add(i);
                let bytes = _mm256_loadu_si256(p as *const __m256i);
                // A NaN code is 0x7F or 0xFF: with the sign bit forced on, all ones.
                let nan = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, sign), all_ones);
                if _mm256_movemask_epi8(nan) == 0 {
                    let w = decode32(p);
                    for (j, v) in w.into_iter().enumerate() {
                        _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * j), _mm256_mul_ps(v, vs));
                    }
                } else {
                    for j in i..i + 32 {
                        *out.get_unchecked_mut(j) = E4M3_TO_F32[*codes.get_unchecked(j) as usize] * scale;
                    }
                }
                i += 32;
            }
        }
    }
    while i < n {
        out[i] = E4M3_TO_F32[codes[i] as usize] * scale;
        i += 1;
    }
}
