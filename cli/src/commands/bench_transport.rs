//! `switchyard bench transport`: dispatch+combine over gRPC on loopback against a raw TCP stream between the same two
//! processes, measured in the same run.
//!
//! The peer is a second `switchyard` process (`bench transport-peer`) serving the real gRPC dispatch server with an
//! echo expert service, and a raw TCP echo. Each gRPC dispatch is timed whole, encoding and decoding included, because
//! that is what an attention worker pays; the raw stream moves the same number of bytes with no encoding at all.
//!
//! Wall-clock ratios are noisy on a small shared machine, so each round also records the CPU time both processes spent
//! on it (Linux: the scheduler's per-thread accounting), which says where the time goes and moves much less.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use switchyard_transport::bench::{raw_tcp_echo_server, raw_tcp_round_trip, EchoExpertService};
use switchyard_transport::codec::bytes_per_value;
use switchyard_transport::grpc::{server_builder, DispatchServer, GrpcTransport};
use switchyard_transport::{ExpertBatch, ExpertService, Transport, WireDtype, WireFormat};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::serving;

/// Flags of `bench transport`.
#[derive(clap::Args)]
pub struct Args {
    /// Tokens per dispatch.
    #[arg(long, value_delimiter = ',', default_value = "16,256,4096")]
    tokens: Vec<usize>,
    /// Dispatch encodings to measure (the combine direction is always bf16).
    #[arg(long, value_delimiter = ',', default_value = "fp8,bf16")]
    wire: Vec<WireDtype>,
    /// Hidden size (Maverick: 5120).
    #[arg(long, default_value_t = 5120)]
    hidden: usize,
    /// Seconds to spend on each measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Also write the results as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// Runs the peer: prints its gRPC and raw TCP addresses, serves until stdin closes or a signal.
pub fn run_peer() -> Result<()> {
    serving::runtime(2)?.block_on(async {
        let grpc = serving::bind("127.0.0.1:0".parse()?).await?;
        let raw = serving::bind("127.0.0.1:0".parse()?).await?;
        println!("raw tcp on {}", raw.local_addr()?);
        serving::announce(&grpc)?;
        tokio::spawn(raw_tcp_echo_server(raw));
        let service: Arc<dyn ExpertService> = Arc::new(EchoExpertService);
        let server = DispatchServer::new(service, "bench-peer".into());
        server_builder()
            .add_service(server.into_service())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                serving::shutdown_signal(),
            )
            .await
            .context("serving the benchmark peer")
    })
}

struct Row {
    dtype: WireDtype,
    tokens: usize,
    bytes_per_round_trip: usize,
    grpc_bytes_per_s: f64,
    raw_bytes_per_s: f64,
    grpc_p50_us: f64,
    raw_p50_us: f64,
    grpc_cpu: Cpu,
    raw_cpu: Cpu,
}

/// Mean CPU milliseconds per round trip of the two processes (NaN where the platform does not say).
#[derive(Clone, Copy)]
struct Cpu {
    caller_ms: f64,
    peer_ms: f64,
}

/// CPU time the threads of process `pid` have run so far, in nanoseconds, from the scheduler's accounting
/// (`/proc/PID/task/*/schedstat`, Linux); `None` where that is not available.
fn peer_cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        // A thread may exit between listing and reading: it is skipped.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        total += stat.split_whitespace().next().and_then(|ns| ns.parse::<u64>().ok())?;
    }
    Some(total)
}

/// The CPU-time clock `clock` (this process, or the calling thread) in nanoseconds.
#[cfg(unix)]
fn cpu_clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `clock_gettime` only writes the `timespec` it is given.
    let status = unsafe { libc::clock_gettime(clock, &mut now) };
    (status == 0).then(|| now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}

/// All threads of this process, nanoseconds of CPU.
fn own_cpu_ns() -> Option<u64> {
    #[cfg(unix)]
    return cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
    #[cfg(not(unix))]
    None
}

/// The calling thread, nanoseconds of CPU.
fn thread_cpu_ns() -> Option<u64> {
    #[cfg(unix)]
    return cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
    #[cfg(not(unix))]
    None
}

/// The CPU time both processes spend on a measurement's round trips. The clocks are read once before and once after
/// the loop, not around each round (reading the peer's takes tens of microseconds, which would disturb the small
/// rounds); what the calling thread spends outside the rounds (building inputs, freeing outputs) is taken off.
struct CpuMeter {
    peer: Option<u32>,
    start: Option<(u64, u64)>,
    outside_ns: u64,
}

impl CpuMeter {
    fn start(peer: Option<u32>) -> Self {
        let start = own_cpu_ns().zip(peer.and_then(peer_cpu_ns));
        CpuMeter { peer, start, outside_ns: 0 }
    }

    /// Adds the calling thread's CPU time of `work` (building a round's inputs, freeing its outputs) to what is not
    /// a round trip.
    fn outside_round<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let before = thread_cpu_ns();
        let built = work();
        if let (Some(before), Some(after)) = (before, thread_cpu_ns()) {
            self.outside_ns += after.saturating_sub(before);
        }
        built
    }

    /// Mean CPU per round trip since `start`, over `rounds` rounds.
    fn per_round(&self, rounds: usize) -> Cpu {
        let end = own_cpu_ns().zip(self.peer.and_then(peer_cpu_ns));
        match (self.start, end) {
            (Some((caller0, peer0)), Some((caller1, peer1))) if rounds > 0 => {
                let ms = |ns: u64| ns as f64 / rounds as f64 / 1e6;
                let caller = caller1.saturating_sub(caller0).saturating_sub(self.outside_ns);
                Cpu { caller_ms: ms(caller), peer_ms: ms(peer1.saturating_sub(peer0)) }
            }
            _ => Cpu { caller_ms: f64::NAN, peer_ms: f64::NAN },
        }
    }
}

/// Runs `bench transport`.
pub fn run(args: Args) -> Result<()> {
    let exe = std::env::current_exe().context("locating the switchyard binary")?;
    serving::runtime(2)?.block_on(async move {
        let mut peer = tokio::process::Command::new(exe)
            .args(["bench", "transport-peer"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the benchmark peer")?;
        let peer_pid = peer.id();
        let stdout = peer.stdout.take().context("peer stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut raw_addr, mut grpc_url) = (None, None);
        while raw_addr.is_none() || grpc_url.is_none() {
            let Some(line) =
                tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.context("peer start")??
            else {
                bail!("the benchmark peer exited before it was ready")
            };
            if let Some(addr) = line.strip_prefix("raw tcp on ") {
                raw_addr = Some(addr.to_string());
            } else if let Some(url) = line.strip_prefix("listening on ") {
                grpc_url = Some(url.to_string());
            }
        }
        let (raw_addr, grpc_url) = (raw_addr.unwrap_or_default(), grpc_url.unwrap_or_default());
        let mut raw = tokio::net::TcpStream::connect(&raw_addr).await.context("connecting to the raw echo")?;
        raw.set_nodelay(true)?;

        let budget = Duration::from_secs_f64(args.seconds.max(0.05));
        let mut rows = Vec::new();
        for &dtype in &args.wire {
            // Outputs come back as bf16 in both cases: FP8 is for the dispatch direction.
            let wire = WireFormat { dispatch: dtype, combine: WireDtype::Bf16 };
            let transport = GrpcTransport::new(wire, "bench".into());
            transport.add_worker("peer", grpc_url.clone());
            for &tokens in &args.tokens {
                let batch = ExpertBatch {
                    step_id: 0,
                    micro_batch: 0,
                    layer: 0,
                    placement_epoch: 0,
                    attention_worker: "bench".into(),
                    experts: vec![0; tokens],
                    inputs: (0..tokens * args.hidden).map(|i| ((i % 251) as f32 - 125.0) / 64.0).collect(),
                    hidden: args.hidden,
                };
                let dispatch_bytes = tokens * args.hidden * bytes_per_value(dtype)
                    + if dtype == WireDtype::Fp8E4m3 { tokens * 4 } else { 0 };
                let combine_bytes = tokens * args.hidden * bytes_per_value(WireDtype::Bf16);
                let moved = dispatch_bytes + combine_bytes;
                let (grpc, grpc_cpu) = time_loop(budget, peer_pid, || {
                    let future = transport.dispatch("peer", batch.clone());
                    async move { future.await.map_err(anyhow::Error::from) }
                })
                .await?;
                // The echo moves `moved` bytes in all: half out, half back.
                let payload = vec![0x5Au8; moved / 2];
                let raw_stream = tokio::sync::Mutex::new(&mut raw);
                let (raw_times, raw_cpu) = time_loop(budget, peer_pid, || async {
                    let mut stream = raw_stream.lock().await;
                    raw_tcp_round_trip(&mut stream, &payload).await.map_err(anyhow::Error::from)
                })
                .await?;
                rows.push(Row {
                    dtype,
                    tokens,
                    bytes_per_round_trip: moved,
                    grpc_bytes_per_s: moved as f64 / mean(&grpc),
                    raw_bytes_per_s: moved as f64 / mean(&raw_times),
                    grpc_p50_us: median(&grpc) * 1e6,
                    raw_p50_us: median(&raw_times) * 1e6,
                    grpc_cpu,
                    raw_cpu,
                });
            }
        }
        drop(raw);
        let _ = peer.start_kill();
        report(&rows, args.output_json.as_deref())
    })
}

/// Runs `operation` repeatedly for about `budget` after two warm-up runs; returns the seconds each returned future
/// took to complete and the CPU time per round trip of this process and the peer (`peer`, its process id).
async fn time_loop<F, Fut, T>(budget: Duration, peer: Option<u32>, mut operation: F) -> Result<(Vec<f64>, Cpu)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    for _ in 0..2 {
        operation().await?;
    }
    let mut cpu = CpuMeter::start(peer);
    let start = Instant::now();
    let mut times = Vec::new();
    while start.elapsed() < budget || times.len() < 5 {
        // Calling `operation` builds its inputs (the gRPC side's copy of the batch, which `dispatch` consumes); only
        // awaiting it is the round trip, which ends when the outputs are in the caller's hands. Freeing them is the
        // caller's business as building the inputs is: both stay off the clock (an 84 MB block is unmapped on free,
        // ~5 ms here, which the raw loop, reusing one buffer, never pays). The raw payload is built once, outside.
        let round_trip = cpu.outside_round(&mut operation);
        let t = Instant::now();
        let outputs = round_trip.await?;
        times.push(t.elapsed().as_secs_f64());
        cpu.outside_round(move || drop(outputs));
    }
    let cpu = cpu.per_round(times.len());
    Ok((times, cpu))
}

fn mean(times: &[f64]) -> f64 {
    times.iter().sum::<f64>() / times.len().max(1) as f64
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// A number for JSON: NaN (not measured) becomes null.
fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

fn report(rows: &[Row], json: Option<&std::path::Path>) -> Result<()> {
    println!(
        "{:<6} {:>7} {:>10} {:>10} {:>9} {:>6} {:>10} {:>10} {:>11} {:>15} {:>15}",
        "wire",
        "tokens",
        "MB/round",
        "gRPC GB/s",
        "raw GB/s",
        "ratio",
        "gRPC p50",
        "raw p50",
        "p50 limit",
        "gRPC cpu ms",
        "raw cpu ms"
    );
    let cpu = |c: Cpu| format!("{:.2}/{:.2}", c.caller_ms, c.peer_ms);
    for r in rows {
        let limit = 2.0 * r.raw_p50_us + 100.0;
        println!(
            "{:<6} {:>7} {:>10.2} {:>10.2} {:>9.2} {:>6.2} {:>8.0}us {:>8.0}us {:>9.0}us {:>15} {:>15}",
            r.dtype.to_string(),
            r.tokens,
            r.bytes_per_round_trip as f64 / 1e6,
            r.grpc_bytes_per_s / 1e9,
            r.raw_bytes_per_s / 1e9,
            r.grpc_bytes_per_s / r.raw_bytes_per_s,
            r.grpc_p50_us,
            r.raw_p50_us,
            limit,
            cpu(r.grpc_cpu),
            cpu(r.raw_cpu)
        );
    }
    println!("targets: gRPC >= 0.70 of raw TCP at 4096 tokens; p50 at 16 tokens <= 2 x raw p50 + 100 us");
    println!("cpu ms: mean CPU time per round trip of the caller / the peer process, all threads");
    if let Some(path) = json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "wire": r.dtype.to_string(), "tokens": r.tokens, "bytes_per_round_trip": r.bytes_per_round_trip,
                    "grpc_bytes_per_s": r.grpc_bytes_per_s, "raw_bytes_per_s": r.raw_bytes_per_s,
                    "ratio": r.grpc_bytes_per_s / r.raw_bytes_per_s,
                    "grpc_p50_us": r.grpc_p50_us, "raw_p50_us": r.raw_p50_us,
                    "p50_limit_us": 2.0 * r.raw_p50_us + 100.0,
                    "grpc_cpu_ms": {"caller": finite(r.grpc_cpu.caller_ms), "peer": finite(r.grpc_cpu.peer_ms)},
                    "raw_cpu_ms": {"caller": finite(r.raw_cpu.caller_ms), "peer": finite(r.raw_cpu.peer_ms)},
                })
            })
            .collect();
        let json_text = serde_json::to_string_pretty(&serde_json::json!({"benchmark": "transport", "rows": rows}))?;
        std::fs::write(path, json_text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
