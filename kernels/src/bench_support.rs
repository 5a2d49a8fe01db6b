//! Measurements that `switchyard bench kernels` divides by one another: this machine's memory-read bandwidth and
//! f32 GEMM rate (the limits), and our FP8 matmul's rate and weight-streaming bandwidth (the results). Every figure
//! is the best of `repeats` timed runs after one warm-up run, so background noise on a shared machine only ever
//! makes a number worse, never better.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

use crate::matmul::{matmul_f32, matmul_fp8, Fp8Weight};
use crate::simd::{self, Isa};

/// Total FP8 weight bytes the throughput measurement cycles through when few tokens are multiplied, so that the
/// weight comes from memory and not from a last-level cache (32 MiB on the EPYC machines).
const COLD_WEIGHT_BYTES: usize = 128 << 20;

/// Up to this many tokens the FP8 measurement counts as weight-streaming and rotates weight copies.
const STREAMING_MAX_TOKENS: usize = 64;

/// The SIMD path the kernels use on this CPU: `"avx2+fma+f16c"` or `"portable"`.
pub fn simd_path() -> &'static str {
    Isa::detect().name()
}

/// A cheap deterministic fill (xorshift), so the benchmarks need no RNG crate and measure the same data every run.
fn fill_pseudo_random(values: &mut [f32], seed: u64) {
    values.par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, part)| {
        let mut state = seed ^ (chunk as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for v in part {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Uniform in [-1, 1).
            *v = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        }
    });
}

fn best_seconds(repeats: usize, mut run: impl FnMut()) -> f64 {
    run();
    (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
        .max(1e-9)
}

/// Memory-read bandwidth of this machine in bytes/s: a sum over a buffer of `bytes` (choose it much larger than the
/// last-level cache, e.g. 256 MB), on all rayon threads, best of `repeats` runs.
pub fn memory_read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    let mut buffer = vec![0.0f32; (bytes / 4).max(1 << 10)];
    // Writing every page first makes the timed runs read real memory, not the shared zero page.
    fill_pseudo_random(&mut buffer, 1);
    let isa = Isa::detect();
    let seconds = best_seconds(repeats, || {
        let total: f32 = buffer.par_chunks(1 << 18).map(|part| simd::sum(isa, part)).sum();
        black_box(total);
    });
    (buffer.len() * 4) as f64 / seconds
}

/// GFLOP/s (`2 m n k` per product) of the f32 sgemm of the `gemm` crate on all threads, for
/// `out[m, n] = x[m, k] · w[n, k]^T`, best of `repeats`.
pub fn sgemm_gflops(m: usize, n: usize, k: usize, repeats: usize) -> f64 {
    let mut x = vec![0.0f32; m * k];
    let mut w = vec![0.0f32; n * k];
    let mut out = vec![0.0f32; m * n];
    fill_pseudo_random(&mut x, 2);
    fill_pseudo_random(&mut w, 3);
    let seconds = best_seconds(repeats, || {
        // The shapes are consistent by construction, so this cannot fail.
        let _ = matmul_f32(&x, m, &w, n, k, &mut out);
        black_box(&out);
    });
    2.0 * (m * n * k) as f64 / seconds / 1e9
}

/// Our [`matmul_fp8`] at `out[m, n] = x[m, k] · W[n, k]^T`, best of `repeats`: its GFLOP/s (`2 m n k` per product)
/// and the FP8 weight bytes (codes and scales) it streamed per second.
///
/// With at most 64 tokens the run cycles through enough copies of the weight (128 MiB in all) that every call
/// reads its weight from memory, as a decode step over many experts does; with more tokens one copy is used.
pub fn fp8_matmul_throughput(m: usize, n: usize, k: usize, repeats: usize) -> (f64, f64) {
    let weight_bytes = n * k + 4 * n;
    let copies =
        if m <= STREAMING_MAX_TOKENS { COLD_WEIGHT_BYTES.div_ceil(weight_bytes.max(1)).clamp(1, 1024) } else { 1 };
    let mut x = vec![0.0f32; m * k];
    fill_pseudo_random(&mut x, 4);
    let mut raw = vec![0.0f32; n * k];
    let weights: Vec<(Vec<u8>, Vec<f32>)> = (0..copies)
        .map(|copy| {
            fill_pseudo_random(&mut raw, 5 + copy as u64);
            // Codes spread over the whole E4M3 range except the NaN codes.
            let codes = raw
                .iter()
                .map(|&v| ((v * 127.0) as i32 & 0xFF) as u8)
                .map(|c| if c & 0x7F == 0x7F { c - 1 } else { c })
                .collect();
            let scales = (0..n).map(|o| 1e-3 * (1.0 + (o % 7) as f32)).collect();
            (codes, scales)
        })
        .collect();
    drop(raw);
    let mut out = vec![0.0f32; m * n];
    let seconds = best_seconds(repeats, || {
        for (codes, scales) in &weights {
            let weight = Fp8Weight { codes, scales, rows: n, cols: k };
            // The shapes are consistent by construction, so this cannot fail.
            let _ = matmul_fp8(&x, m, weight, &mut out);
            black_box(&out);
        }
    }) / copies as f64;
    (2.0 * (m * n * k) as f64 / seconds / 1e9, weight_bytes as f64 / seconds)
}
