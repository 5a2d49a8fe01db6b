//! Normal samples from one ChaCha8 stream per (seed, tensor name).
//!
//! Box-Muller on one `u64` per pair of values, with our own logarithm, sine and cosine built from IEEE basic
//! operations only (never the platform's libm), so a seed gives the same bytes on every machine. The inner loop is
//! branch-free so that it vectorises: a sampler with rejection or libm calls dominated the time to write `small`.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Replaces `out` with `len` values N(0, std^2) from the stream of (seed, name). Reusing `out` across calls avoids
/// faulting in fresh pages for every tensor.
pub(super) fn gaussian_into(seed: u64, name: &str, len: usize, std: f32, out: &mut Vec<f32>) {
    const BLOCK: usize = 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(stream_key(seed, name));
    out.clear();
    out.resize(len.next_multiple_of(2), 0.0);
    let mut bits = [0u64; BLOCK];
    for chunk in out.chunks_mut(2 * BLOCK) {
        let bits = &mut bits[..chunk.len() / 2];
        bits.iter_mut().for_each(|b| *b = rng.next_u64());
        for (pair, &b) in chunk.chunks_exact_mut(2).zip(bits.iter()) {
            let (z0, z1) = box_muller(b);
            pair[0] = z0 * std;
            pair[1] = z1 * std;
        }
    }
    out.truncate(len);
}

/// Two independent standard normal values from 64 random bits: 24 bits for the radius, 2 for the quadrant of the
/// angle and 22 for the angle within it.
#[inline(always)]
fn box_muller(bits: u64) -> (f32, f32) {
    use std::f32::consts::FRAC_PI_2;
    // u in (0, 1]: ln(u) is finite, and the radius tops out at sqrt(2 ln 2^24) = 5.77. The casts go through i32
    // because SSE2 converts signed integers to floats in one instruction and unsigned ones in many.
    let u = ((((bits as u32) >> 8) + 1) as i32) as f32 * (1.0 / 16_777_216.0);
    let radius = (-2.0 * ln(u)).sqrt();
    let quadrant = (bits >> 62) as u32;
    let a = ((((bits >> 40) & 0x3F_FFFF) as i32) as f32 + 0.5) * (FRAC_PI_2 / 4_194_304.0);
    let (sin_a, cos_a) = sin_cos_quarter(a);
    // Rotate (cos a, sin a) by quadrant * 90 degrees.
    let (x, y) = if quadrant & 1 == 1 { (sin_a, cos_a) } else { (cos_a, sin_a) };
    let cos = if (quadrant + 1) & 2 != 0 { -x } else { x };
    let sin = if quadrant & 2 != 0 { -y } else { y };
    (radius * cos, radius * sin)
}

/// Natural logarithm of a positive normal f32, to about 1e-7 relative.
#[inline(always)]
fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    // x = m * 2^e with m in [1, 2), then moved to [sqrt(1/2), sqrt(2)) where the series converges fast.
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    let high = m > std::f32::consts::SQRT_2;
    let m = if high { m * 0.5 } else { m };
    let e = ((bits >> 23) as i32 - 127 + i32::from(high)) as f32;
    // ln m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172.
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series = 2.0 + t2 * (2.0 / 3.0 + t2 * (2.0 / 5.0 + t2 * (2.0 / 7.0 + t2 * (2.0 / 9.0))));
    e * std::f32::consts::LN_2 + t * series
}

/// (sin a, cos a) for a in [0, pi/2], Taylor polynomials to about 1e-7.
#[inline(always)]
fn sin_cos_quarter(a: f32) -> (f32, f32) {
    let a2 = a * a;
    let sin = a
        * (1.0
            + a2 * (-1.0 / 6.0
                + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 + a2 * (1.0 / 362_880.0 + a2 * (-1.0 / 39_916_800.0))))));
    let cos = 1.0
        + a2 * (-0.5
            + a2 * (1.0 / 24.0
                + a2 * (-1.0 / 720.0
                    + a2 * (1.0 / 40_320.0 + a2 * (-1.0 / 3_628_800.0 + a2 * (1.0 / 479_001_600.0))))));
    (sin, cos)
}

/// A 64-bit key for the stream of (seed, name): FNV-1a over the name, mixed with the seed by SplitMix64's finaliser.
fn stream_key(seed: u64, name: &str) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut z = seed ^ hash.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(seed: u64, name: &str, len: usize, std: f32) -> Vec<f32> {
        let mut out = Vec::new();
        gaussian_into(seed, name, len, std, &mut out);
        out
    }

    #[test]
    fn ln_and_sin_cos_match_std() {
        for x in [6e-8f32, 1e-6, 0.001, 0.1, 0.5, 0.707, 0.7072, 0.9, 0.999_999, 1.0] {
            let expected = (x as f64).ln();
            assert!((ln(x) as f64 - expected).abs() <= 2e-7 * expected.abs().max(1.0), "ln({x}) = {}", ln(x));
        }
        for i in 0..=100 {
            let a = i as f32 / 100.0 * std::f32::consts::FRAC_PI_2;
            let (sin, cos) = sin_cos_quarter(a);
            assert!((sin as f64 - (a as f64).sin()).abs() < 2e-7, "sin({a})");
            assert!((cos as f64 - (a as f64).cos()).abs() < 2e-7, "cos({a})");
        }
    }

    #[test]
    fn box_muller_covers_all_four_quadrants() {
        // u = 2^23 / 2^24 = 1/2 in the radius bits, so the radius is sqrt(2 ln 2).
        let radius_bits = 0x7F_FFFFu64 << 8;
        let radius = (2.0f64 * 2.0f64.ln()).sqrt();
        for quadrant in 0..4u64 {
            let (z0, z1) = box_muller(quadrant << 62 | radius_bits);
            let angle = (quadrant as f64 + 0.5 / 4_194_304.0) * std::f64::consts::FRAC_PI_2;
            assert!((z0 as f64 - radius * angle.cos()).abs() < 1e-6, "quadrant {quadrant}: {z0}");
            assert!((z1 as f64 - radius * angle.sin()).abs() < 1e-6, "quadrant {quadrant}: {z1}");
        }
    }

    #[test]
    fn gaussian_has_the_requested_moments() {
        let values = gaussian(7, "some.weight", 200_000, 0.5);
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64;
        let kurtosis =
            values.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / values.len() as f64 / (var * var);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
        assert!((kurtosis - 3.0).abs() < 0.1, "kurtosis {kurtosis}");
        // An odd length takes the first of a pair: the prefix of a longer draw.
        assert_eq!(gaussian(7, "some.weight", 5, 0.5), values[..5]);
        let mut reused = vec![9.0; 3];
        gaussian_into(7, "some.weight", 6, 0.5, &mut reused);
        assert_eq!(reused, values[..6]);
    }

    #[test]
    fn streams_differ_by_seed_and_name() {
        let a = gaussian(1, "a.weight", 8, 1.0);
        assert_ne!(a, gaussian(2, "a.weight", 8, 1.0));
        assert_ne!(a, gaussian(1, "b.weight", 8, 1.0));
    }
}
