//! `switchyard bench`: benchmarks that print each figure as a ratio to a limit measured in the same run, because
//! these machines are shared and noisy and only same-run ratios compare across runs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use switchyard_kernels::bench_support::{fp8_matmul_throughput, memory_read_bandwidth, sgemm_gflops};
use switchyard_model::tiny::{preset_text_config, Preset};

/// Flags of `bench`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// FP8-weight GEMM/GEMV of the `small` preset's expert shapes against sgemm and memory bandwidth.
    Kernels(KernelArgs),
    /// Dispatch+combine over gRPC on loopback against a raw TCP stream between the same two processes.
    Transport(crate::commands::bench_transport::Args),
    /// Decode tokens/s of one process against `switchyard up` with expert workers, same run.
    E2e(crate::commands::bench_e2e::Args),
    /// Open-loop Poisson load against `switchyard up`: throughput, TTFT and TPOT percentiles per request rate, and
    /// the rate where TPOT p99 passes twice its unloaded value.
    Serve(crate::commands::bench_serve::Args),
    /// The placement solver on drifting Zipf routing traces: balance, and weights moved per rebalance.
    Placement(crate::commands::bench_placement::Args),
    /// Decode latency per token and prefill throughput against context length on 1, 2 and 4 context-parallel members.
    Context(crate::commands::bench_context::Args),
    /// FP8 expert GEMM on a CUDA GPU (Maverick shapes) against cuBLASLt and a device-to-device copy of the same run.
    Gpu(crate::commands::bench_gpu::Args),
    /// The peer process of `bench transport` (started by it).
    #[command(hide = true)]
    TransportPeer,
}

#[derive(clap::Args)]
struct KernelArgs {
    /// Repetitions per measurement (the best is kept).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Token counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,2048")]
    tokens: Vec<usize>,
    /// Also write the results as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// Runs `bench`.
pub fn run(args: Args) -> Result<()> {
    match args.which {
        Which::Kernels(args) => kernels(args),
        Which::Transport(args) => crate::commands::bench_transport::run(args),
        Which::E2e(args) => crate::commands::bench_e2e::run(args),
        Which::Placement(args) => crate::commands::bench_placement::run(args),
        Which::Serve(args) => crate::commands::bench_serve::run(args),
        Which::Context(args) => crate::commands::bench_context::run(args),
        Which::Gpu(args) => crate::commands::bench_gpu::run(args),
        Which::TransportPeer => crate::commands::bench_transport::run_peer(),
    }
}

fn kernels(args: KernelArgs) -> Result<()> {
    let config = preset_text_config(Preset::Small);
    let dimension = |key: &str| -> Result<usize> {
        config[key].as_u64().map(|v| v as usize).with_context(|| format!("small preset has no {key}"))
    };
    let hidden = dimension("hidden_size")?;
    let intermediate = dimension("intermediate_size")?;
    let repeats = args.repeats.max(1);
    let read_bandwidth = memory_read_bandwidth(256 << 20, repeats);
    println!("memory read bandwidth (limit): {:.2} GB/s", read_bandwidth / 1e9);
    println!(
        "{:<22} {:>7} {:>12} {:>12} {:>9} {:>12} {:>9}",
        "expert shape (n x k)", "tokens", "fp8 GFLOP/s", "sgemm GFLOP/s", "ratio", "weight GB/s", "of read"
    );
    let shapes = [("gate/up", intermediate, hidden), ("down", hidden, intermediate)];
    let mut rows = Vec::new();
    for (name, n, k) in shapes {
        for &m in &args.tokens {
            let (fp8_gflops, weight_bytes_per_s) = fp8_matmul_throughput(m, n, k, repeats);
            let sgemm = sgemm_gflops(m, n, k, repeats);
            let ratio = fp8_gflops / sgemm;
            let of_read = weight_bytes_per_s / read_bandwidth;
            println!(
                "{:<22} {:>7} {:>12.1} {:>12.1} {:>9.2} {:>12.2} {:>9.2}",
                format!("{name} {n}x{k}"),
                m,
                fp8_gflops,
                sgemm,
                ratio,
                weight_bytes_per_s / 1e9,
                of_read
            );
            rows.push(serde_json::json!({
                "shape": name, "n": n, "k": k, "tokens": m,
                "fp8_gflops": fp8_gflops, "sgemm_gflops": sgemm, "ratio_to_sgemm": ratio,
                "weight_bytes_per_s": weight_bytes_per_s, "ratio_to_read_bandwidth": of_read,
            }));
        }
    }
    println!("targets: fp8/sgemm >= 0.60 at 2048 tokens; weight streaming >= 0.70 of read bandwidth at 1 token");
    if let Some(path) = args.output_json {
        let json = serde_json::json!({
            "benchmark": "kernels",
            "memory_read_bytes_per_s": read_bandwidth,
            "threads": rayon_threads(),
            "rows": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
