//! The OCP FP8 E4M3 ("e4m3fn") number format: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities,
//! NaN at `0x7F`/`0xFF`, largest finite value 448, subnormals down to 2^-9.
//!
//! Decoding goes through a 256-entry table because every hot loop that reads FP8 weights either uses the table or a
//! SIMD bit trick that is tested against it. Encoding rounds to nearest-even and saturates, which is what
//! `torch.float8_e4m3fn` casts and compressed-tensors' quantisation do, so weights we quantise match theirs bit for
//! bit.
//!
//! The row functions ([`quantize_rows`], [`dequantize_rows`], [`fake_quantize_rows`]) carry activations over the wire
//! and into the FP8 expert path, so they are vectorised and, for large blocks, threaded; each is bit for bit its
//! scalar definition (`*_reference`, and [`f32_to_e4m3`] / [`E4M3_TO_F32`] per value), including NaN, infinities,
//! subnormals and ties.

use rayon::prelude::*;

use crate::simd::{self, Isa};

/// Largest finite E4M3 value. (`float8::F8E4M3::MAX` reads 416 in some versions; scales must use 448.)
pub const E4M3_MAX: f32 = 448.0;

/// The code of the canonical E4M3 NaN.
pub const E4M3_NAN: u8 = 0x7F;

const fn decode_slow(code: u8) -> f32 {
    let negative = code & 0x80 != 0;
    let exponent = ((code >> 3) & 0x0F) as u32;
    let mantissa = (code & 0x07) as u32;
    let magnitude = if exponent == 0x0F && mantissa == 0x07 {
        f32::NAN
    } else if exponent == 0 {
        // Subnormal: mantissa * 2^-9, exact in f32.
        mantissa as f32 * (1.0 / 512.0)
    } else {
        // Rebias 7 -> 127 and widen the mantissa 3 -> 23 bits.
        f32::from_bits(((exponent + 120) << 23) | (mantissa << 20))
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

const fn build_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_slow(code as u8);
        code += 1;
    }
    table
}

/// `E4M3_TO_F32[code]` is the value of the E4M3 byte `code`.
pub static E4M3_TO_F32: [f32; 256] = build_table();

/// Decodes one E4M3 byte.
#[inline(always)]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TO_F32[code as usize]
}

/// Encodes `x` as E4M3, rounding to nearest-even and saturating to ±448. NaN becomes [`E4M3_NAN`].
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let magnitude = x.abs();
    if magnitude >= E4M3_MAX {
        return sign | 0x7E;
    }
    let bits = magnitude.to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32 - 127;
    if exponent >= -6 {
        // Normal in E4M3: keep 3 of 23 mantissa bits, round half to even.
        const DROPPED: u32 = 20;
        let mut biased = (exponent + 7) as u32;
        let mut mantissa = (bits & 0x7F_FFFF) >> DROPPED;
        let remainder = bits & ((1 << DROPPED) - 1);
        let half = 1 << (DROPPED - 1);
        if remainder > half || (remainder == half && mantissa & 1 == 1) {
            mantissa += 1;
            if mantissa == 8 {
                mantissa = 0;
                biased += 1;
            }
        }
        // magnitude < 448 rounds to at most 448 (biased 15, mantissa 6), never to the NaN code.
        sign | ((biased as u8) << 3) | mantissa as u8
    } else {
        // Subnormal: multiples of 2^-9. A result of 8 is exactly the smallest normal, 2^-6 (code 0x08).
        let units = (magnitude * 512.0).round_ties_even();
        sign | units as u8
    }
}

/// Values from which the row loops below split their rows over rayon's threads (1 MiB of f32): smaller blocks
/// finish before the threads would be woken.
const PARALLEL_VALUES: usize = 1 << 18;

/// Rows per rayon task for rows of `cols` values: about [`PARALLEL_VALUES`] / 4 values each.
fn rows_per_task(cols: usize) -> usize {
    (PARALLEL_VALUES / 4 / cols.max(1)).max(1)
}

/// The per-row scale of dynamic quantisation: `amax / 448`, or 1 for an all-zero (or non-finite) row.
#[inline]
fn row_scale(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / E4M3_MAX
    } else {
        1.0
    }
}

/// Quantises one row, returning its scale.
#[inline]
fn quantize_row(isa: Isa, row: &[f32], q_row: &mut [u8]) -> f32 {
    let scale = row_scale(simd::amax(isa, row));
    simd::fp8_encode_scaled(isa, row, 1.0 / scale, q_row);
    scale
}

/// Per-row dynamic quantisation, the activation scheme of Maverick's FP8 checkpoint ("per token, dynamic"):
/// `scale = amax(|row|) / 448`, `q = e4m3(row / scale)`. An all-zero row gets scale 1 so that decoding stays finite.
/// NaN values are left out of `amax` and encode as [`E4M3_NAN`].
///
/// `x` holds `scales.len()` rows of `cols` values; `q` receives the codes in the same layout. Vectorised (and split
/// over threads for large blocks), bit for bit [`quantize_rows_reference`].
///
/// # Panics
/// If the slice lengths disagree with `cols` and `scales.len()`: callers size them from the same shape.
pub fn quantize_rows(x: &[f32], cols: usize, q: &mut [u8], scales: &mut [f32]) {
    assert_eq!(x.len(), cols * scales.len(), "quantize_rows: x length");
    assert_eq!(q.len(), x.len(), "quantize_rows: q length");
    if cols == 0 {
        return;
    }
    let isa = Isa::detect();
    let rows = |x: &[f32], q: &mut [u8], scales: &mut [f32]| {
        for ((row, q_row), scale) in x.chunks_exact(cols).zip(q.chunks_exact_mut(cols)).zip(scales.iter_mut()) {
            *scale = quantize_row(isa, row, q_row);
        }
    };
    if x.len() < PARALLEL_VALUES {
        rows(x, q, scales);
        return;
    }
    let per_task = rows_per_task(cols);
    x.par_chunks(per_task * cols)
        .zip(q.par_chunks_mut(per_task * cols))
        .zip(scales.par_chunks_mut(per_task))
        .for_each(|((x, q), scales)| rows(x, q, scales));
}

/// The scalar definition of [`quantize_rows`] (same contract), one [`f32_to_e4m3`] per value.
pub fn quantize_rows_reference(x: &[f32], cols: usize, q: &mut [u8], scales: &mut [f32]) {
    assert_eq!(x.len(), cols * scales.len(), "quantize_rows: x length");
    assert_eq!(q.len(), x.len(), "quantize_rows: q length");
    for ((row, q_row), scale) in x.chunks_exact(cols.max(1)).zip(q.chunks_exact_mut(cols.max(1))).zip(scales.iter_mut())
    {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *scale = row_scale(amax);
        let inverse = 1.0 / *scale;
        for (code, value) in q_row.iter_mut().zip(row) {
            *code = f32_to_e4m3(value * inverse);
        }
    }
}

/// Decodes rows quantised by [`quantize_rows`]: `out[r * cols + c] = e4m3_to_f32(q[r * cols + c]) * scales[r]`,
/// bit for bit that product (NaN codes decode to NaN), for any scale. Vectorised, split over threads for large
/// blocks.
///
/// # Panics
/// If the slice lengths disagree with `cols` and `scales.len()`.
pub fn dequantize_rows(q: &[u8], cols: usize, scales: &[f32], out: &mut [f32]) {
    assert_eq!(q.len(), cols * scales.len(), "dequantize_rows: q length");
    assert_eq!(out.len(), q.len(), "dequantize_rows: out length");
    if cols == 0 {
        return;
    }
    let isa = Isa::detect();
    let rows = |q: &[u8], scales: &[f32], out: &mut [f32]| {
        for ((q_row, &scale), o) in q.chunks_exact(cols).zip(scales).zip(out.chunks_exact_mut(cols)) {
            simd::fp8_decode_scaled(isa, q_row, scale, o);
        }
    };
    if q.len() < PARALLEL_VALUES {
        rows(q, scales, out);
        return;
    }
    let per_task = rows_per_task(cols);
    q.par_chunks(per_task * cols)
        .zip(scales.par_chunks(per_task))
        .zip(out.par_chunks_mut(per_task * cols))
        .for_each(|((q, scales), out)| rows(q, scales, out));
}

/// Quantises each row of `x` to E4M3 with a per-row dynamic scale and writes back the decoded values, so the f32
/// kernels that follow compute exactly `(x_q W^T) * s_x` as an FP8-activation kernel would (up to summation order).
/// Vectorised, bit for bit [`fake_quantize_rows_reference`].
pub fn fake_quantize_rows(x: &mut [f32], cols: usize) {
    if cols == 0 {
        return;
    }
    let isa = Isa::detect();
    let rows = |x: &mut [f32]| {
        let mut codes = vec![0u8; cols];
        for row in x.chunks_exact_mut(cols) {
            let scale = quantize_row(isa, row, &mut codes);
            simd::fp8_decode_scaled(isa, &codes, scale, row);
        }
    };
    if x.len() < PARALLEL_VALUES {
        rows(x);
        return;
    }
    x.par_chunks_mut(rows_per_task(cols) * cols).for_each(rows);
}

/// The scalar definition of [`fake_quantize_rows`].
pub fn fake_quantize_rows_reference(x: &mut [f32], cols: usize) {
    if cols == 0 {
        return;
    }
    for row in x.chunks_exact_mut(cols) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = row_scale(amax);
        let inverse = 1.0 / scale;
        for value in row.iter_mut() {
            *value = e4m3_to_f32(f32_to_e4m3(*value * inverse)) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            let value = e4m3_to_f32(code);
            if value.is_nan() {
                assert!(code & 0x7F == 0x7F, "NaN only at 0x7F/0xFF, got {code:#x}");
                continue;
            }
            let back = f32_to_e4m3(value);
            // +0 and -0 are distinct codes that both decode to zero.
            assert!(back == code || (value == 0.0 && back & 0x7F == 0), "{code:#x} -> {value} -> {back:#x}");
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(f32_to_e4m3(1000.0), 0x7E);
        assert_eq!(f32_to_e4m3(-1000.0), 0xFE);
        assert_eq!(f32_to_e4m3(f32::NAN), E4M3_NAN);
        // Halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1): ties to even -> 1.0.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        // Halfway between 1.125 and 1.25: ties to even -> 1.25.
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        // Below half the smallest subnormal rounds to zero.
        assert_eq!(f32_to_e4m3(2f32.powi(-11)), 0x00);
    }

    #[test]
    fn per_row_scales_hit_the_range() {
        let x = [0.5f32, -2.0, 1.0, 0.0, 0.0, 0.0];
        let mut q = [0u8; 6];
        let mut s = [0f32; 2];
        quantize_rows(&x, 3, &mut q, &mut s);
        assert_eq!(s[0], 2.0 / 448.0);
        assert_eq!(e4m3_to_f32(q[1]), -448.0);
        assert_eq!(s[1], 1.0);
        assert!(q[3..].iter().all(|&c| c & 0x7F == 0));
    }

    /// Rows of every kind the row functions must treat exactly like the scalar code: ordinary values over many
    /// magnitudes, an all-zero row, rows with NaN, an infinity, -0.0, f32 subnormals and exact E4M3 ties.
    fn awkward_rows(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        let mut state = seed | 1;
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let unit = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                unit * 10f32.powi((i % 11) as i32 - 5)
            })
            .collect();
        for (r, row) in x.chunks_exact_mut(cols).enumerate() {
            match r % 6 {
                0 => row.iter_mut().for_each(|v| *v = 0.0),
                1 => row[cols / 2] = f32::NAN,
                2 => row[0] = f32::NEG_INFINITY,
                3 => {
                    row[0] = -0.0;
                    row[cols - 1] = 1e-44;
                }
                4 => {
                    // amax 448 makes the scale exactly 1, so these stay ties after scaling.
                    row[0] = 448.0;
                    for (c, v) in row.iter_mut().enumerate().skip(1) {
                        let code = (c % 0x7E) as u8;
                        *v = (e4m3_to_f32(code) + e4m3_to_f32(code + 1)) / 2.0;
                    }
                }
                _ => {}
            }
        }
        x
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn row_functions_match_their_scalar_definitions() {
        // 6 x 37: below the threading threshold; 64 x 5120: above it, with several rows per task.
        for (rows, cols) in [(6usize, 37usize), (12, 1), (64, 5120)] {
            let x = awkward_rows(rows, cols, (rows * cols) as u32);
            let (mut q, mut scales) = (vec![0u8; x.len()], vec![0f32; rows]);
            let (mut q_ref, mut scales_ref) = (vec![0u8; x.len()], vec![0f32; rows]);
            quantize_rows(&x, cols, &mut q, &mut scales);
            quantize_rows_reference(&x, cols, &mut q_ref, &mut scales_ref);
            assert_eq!(q, q_ref, "{rows} x {cols} codes");
            assert_eq!(bits(&scales), bits(&scales_ref), "{rows} x {cols} scales");

            let mut decoded = vec![0f32; x.len()];
            dequantize_rows(&q, cols, &scales, &mut decoded);
            let table: Vec<f32> = q.iter().enumerate().map(|(i, &c)| e4m3_to_f32(c) * scales[i / cols]).collect();
            assert_eq!(bits(&decoded), bits(&table), "{rows} x {cols} decode");

            let (mut fake, mut fake_ref) = (x.clone(), x.clone());
            fake_quantize_rows(&mut fake, cols);
            fake_quantize_rows_reference(&mut fake_ref, cols);
            assert_eq!(bits(&fake), bits(&fake_ref), "{rows} x {cols} fake quantisation");
            assert_eq!(bits(&fake), bits(&table), "{rows} x {cols} fake = decode(quantise)");
        }
        // No columns: nothing is touched.
        let mut scales = [5.0f32; 3];
        quantize_rows(&[], 0, &mut [], &mut scales);
        assert_eq!(scales, [5.0; 3]);
        dequantize_rows(&[], 0, &scales, &mut []);
        fake_quantize_rows(&mut [], 0);
    }
}
