//! The OCP FP8 E4M3 ("e4m3fn") number format: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities,
//! NaN at `0x7F`/`0xFF`, largest finite value 448, subnormals down to 2^-9.
//!
//! Decoding goes through a 256-entry table because every hot loop that reads FP8 weights either uses the table or a
//! SIMD bit trick that is tested against it. Encoding rounds to nearest-even and saturates, which is what
//! `torch.float8_e4m3fn` casts and compressed-tensors' quantisation do, so weights we quantise match theirs bit for
//! bit.

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

/// Per-row dynamic quantisation, the activation scheme of Maverick's FP8 checkpoint ("per token, dynamic"):
/// `scale = amax(|row|) / 448`, `q = e4m3(row / scale)`. An all-zero row gets scale 1 so that decoding stays finite.
///
/// `x` holds `scales.len()` rows of `cols` values; `q` receives the codes in the same layout.
///
/// # Panics
/// If the slice lengths disagree with `cols` and `scales.len()`: callers size them from the same shape.
pub fn quantize_rows(x: &[f32], cols: usize, q: &mut [u8], scales: &mut [f32]) {
    assert_eq!(x.len(), cols * scales.len(), "quantize_rows: x length");
    assert_eq!(q.len(), x.len(), "quantize_rows: q length");
    for ((row, q_row), scale) in x.chunks_exact(cols.max(1)).zip(q.chunks_exact_mut(cols.max(1))).zip(scales.iter_mut()) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *scale = if amax > 0.0 && amax.is_finite() { amax / E4M3_MAX } else { 1.0 };
        let inverse = 1.0 / *scale;
        for (code, value) in q_row.iter_mut().zip(row) {
            *code = f32_to_e4m3(value * inverse);
        }
    }
}

/// Quantises each row of `x` to E4M3 with a per-row dynamic scale and writes back the decoded values, so the f32
/// kernels that follow compute exactly `(x_q W^T) * s_x` as an FP8-activation kernel would (up to summation order).
pub fn fake_quantize_rows(x: &mut [f32], cols: usize) {
    if cols == 0 {
        return;
    }
    for row in x.chunks_exact_mut(cols) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 && amax.is_finite() { amax / E4M3_MAX } else { 1.0 };
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
}
