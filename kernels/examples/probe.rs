use switchyard_kernels::bench_support::*;
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (m, n, k, reps) = (args[0], args[1], args[2], args[3]);
    if m == 0 {
        println!("bw {:.2} GB/s", memory_read_bandwidth(256 << 20, reps) / 1e9);
        return;
    }
    let (g, b) = fp8_matmul_throughput(m, n, k, reps);
    println!("fp8 m={m} n={n} k={k}: {g:.1} GFLOP/s {:.2} GB/s", b / 1e9);
    if args.len() > 4 {
        println!("sgemm {:.1}", sgemm_gflops(m, n, k, reps));
    }
}
