use switchyard_kernels::matmul::*;
use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (m, n, k, reps) = (args[0], args[1], args[2], args[3]);
    let codes: Vec<u8> = (0..n * k).map(|i| ((i * 2654435761usize) >> 7) as u8 & 0x7E).collect();
    let scales = vec![0.01f32; n];
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut out = vec![0.0f32; m * n];
    let w = Fp8Weight { codes: &codes, scales: &scales, rows: n, cols: k };
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..20 { matmul_fp8(&x, m, w, &mut out).unwrap(); }
        best = best.min(t.elapsed().as_secs_f64() / 20.0);
    }
    println!("hot m={m} n={n} k={k}: {:.1} GFLOP/s, {:.2} GB/s", 2.0 * (m * n * k) as f64 / best / 1e9, (n * k) as f64 / best / 1e9);
}
