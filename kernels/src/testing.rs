//! Helpers for the unit tests: seeded random data and tolerance checks.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `len` values uniform in `[-scale, scale)`.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Random E4M3 codes over the whole range except the two NaN codes.
pub(crate) fn fp8_codes(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| loop {
            let code: u8 = rng.random();
            if code & 0x7F != 0x7F {
                break code;
            }
        })
        .collect()
}

/// Asserts `|got - want| <= atol + rtol * |want|` element-wise, reporting the first offender.
#[track_caller]
pub(crate) fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs() || (g == w);
        assert!(ok, "{what}: element {i}: got {g}, want {w} (diff {})", (g - w).abs());
    }
}
