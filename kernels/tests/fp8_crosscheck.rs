//! Cross-checks the E4M3 codec of `fp8.rs` against an independent implementation (the `float8` crate), and the
//! FP8 matmul's public entry point against its reference on the weights that quantisation produces.

use float8::F8E4M3;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_kernels::fp8::{e4m3_to_f32, f32_to_e4m3, quantize_rows, E4M3_MAX};
use switchyard_kernels::matmul::{matmul_fp8, matmul_fp8_reference, Fp8Weight};

#[test]
fn decoding_agrees_with_float8_for_every_code() {
    for code in 0..=255u8 {
        let ours = e4m3_to_f32(code);
        let theirs = F8E4M3::from_bits(code).to_f32();
        if theirs.is_nan() {
            assert!(ours.is_nan(), "{code:#04x}: ours {ours}, float8 NaN");
        } else {
            assert_eq!(ours.to_bits(), theirs.to_bits(), "{code:#04x}: ours {ours}, float8 {theirs}");
        }
    }
}

#[test]
fn encoding_agrees_with_float8_inside_the_range() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut values: Vec<f32> = (0..200_000).map(|_| rng.random_range(-E4M3_MAX..E4M3_MAX)).collect();
    // Small magnitudes (subnormals and the normal/subnormal border) and every exact midpoint between codes.
    values.extend((0..20_000).map(|_| rng.random_range(-0.05f32..0.05)));
    for code in 0..0x7Eu8 {
        let (a, b) = (e4m3_to_f32(code), e4m3_to_f32(code + 1));
        values.push((a + b) / 2.0);
        values.push(-(a + b) / 2.0);
    }
    for x in values {
        let ours = f32_to_e4m3(x);
        let theirs = F8E4M3::from_f32(x).to_bits();
        // Both zeros decode to 0.0: compare values, so -0 vs +0 of a rounded-away tiny value is not a mismatch.
        assert_eq!(
            e4m3_to_f32(ours),
            F8E4M3::from_bits(theirs).to_f32(),
            "x = {x}: ours {ours:#04x}, float8 {theirs:#04x}"
        );
    }
}

#[test]
fn matmul_on_quantised_weights_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let (m, n, k) = (3, 37, 131);
    let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.2f32..0.2)).collect();
    let mut codes = vec![0u8; n * k];
    let mut scales = vec![0.0f32; n];
    quantize_rows(&dense, k, &mut codes, &mut scales);
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let weight = Fp8Weight::new(&codes, &scales, n, k).expect("weight");
    let mut got = vec![0.0f32; m * n];
    let mut want = vec![0.0f32; m * n];
    matmul_fp8(&x, m, weight, &mut got).expect("matmul_fp8");
    matmul_fp8_reference(&x, m, weight, &mut want).expect("reference");
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
    // And the dequantised product is close to the dense one (E4M3 keeps ~3 significant bits).
    for i in 0..m {
        for o in 0..n {
            let dense_dot: f32 = (0..k).map(|c| x[i * k + c] * dense[o * k + c]).sum();
            let bound: f32 = (0..k).map(|c| (x[i * k + c] * dense[o * k + c]).abs()).sum::<f32>() * 0.07;
            assert!((got[i * n + o] - dense_dot).abs() <= bound, "quantisation error too large at [{i},{o}]");
        }
    }
}
