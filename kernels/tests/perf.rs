//! Performance smoke test, ignored by default (timings in a debug build or on a loaded CI machine mean nothing):
//! `cargo test -p switchyard-kernels --release -- --ignored --nocapture`. It prints the ratios that
//! `switchyard bench kernels` reports and fails only far below the targets, so that a regression to a scalar path
//! is caught without making the test flaky on a noisy machine.

use switchyard_kernels::bench_support::{fp8_matmul_throughput, memory_read_bandwidth, sgemm_gflops, simd_path};

#[test]
#[ignore = "timing; run with --release -- --ignored"]
fn fp8_matmul_against_limits() {
    println!("simd path: {}", simd_path());
    let bandwidth = memory_read_bandwidth(256 << 20, 5);
    println!("memory read: {:.2} GB/s", bandwidth / 1e9);
    for &(n, k) in &[(8192, 2048), (2048, 4096)] {
        for &m in &[1usize, 4, 16, 64] {
            let (gflops, bytes) = fp8_matmul_throughput(m, n, k, 5);
            println!(
                "fp8 m={m:5} n={n} k={k}: {gflops:7.1} GFLOP/s, weight {:.2} GB/s = {:.2} of memory read",
                bytes / 1e9,
                bytes / bandwidth
            );
            if m == 1 {
                assert!(bytes / bandwidth > 0.35, "decode GEMV far below the bandwidth target");
            }
        }
        let m = 2048;
        let sgemm = sgemm_gflops(m, n, k, 3);
        let (gflops, _) = fp8_matmul_throughput(m, n, k, 3);
        println!("m={m} n={n} k={k}: fp8 {gflops:.1} GFLOP/s, sgemm {sgemm:.1} GFLOP/s, ratio {:.2}", gflops / sgemm);
        assert!(gflops / sgemm > 0.3, "FP8 GEMM far below the sgemm target");
    }
}
