//! `switchyard bench transport`: dispatch+combine over gRPC on loopback against a raw TCP stream between the same two
//! processes, measured in the same run.
//!
//! The peer is a second `switchyard` process (`bench transport-peer`) serving the real gRPC dispatch server with an
//! echo expert service, and a raw TCP echo. Each gRPC dispatch is timed whole, encoding and decoding included, because
//! that is what an attention worker pays; the raw stream moves the same number of bytes with no encoding at all.

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
                tokio_stream::wrappers::TcpListenerStream::new(grpc),
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
        let stdout = peer.stdout.take().context("peer stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut raw_addr, mut grpc_url) = (None, None);
        while raw_addr.is_none() || grpc_url.is_none() {
            let Some(line) = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.context("peer start")??
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
        for dtype in [WireDtype::Fp8E4m3, WireDtype::Bf16] {
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
                let grpc = time_loop(budget, || {
                    let future = transport.dispatch("peer", batch.clone());
                    async move { future.await.map(|_| ()).map_err(anyhow::Error::from) }
                })
                .await?;
                // The echo moves `moved` bytes in all: half out, half back.
                let payload = vec![0x5Au8; moved / 2];
                let raw_stream = tokio::sync::Mutex::new(&mut raw);
                let raw_times = time_loop(budget, || async {
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
                });
            }
        }
        drop(raw);
        let _ = peer.start_kill();
        report(&rows, args.output_json.as_deref())
    })
}

/// Runs `operation` repeatedly for about `budget` after two warm-up runs; returns the seconds each returned future
/// took to complete.
async fn time_loop<F, Fut>(budget: Duration, mut operation: F) -> Result<Vec<f64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    for _ in 0..2 {
        operation().await?;
    }
    let start = Instant::now();
    let mut times = Vec::new();
    while start.elapsed() < budget || times.len() < 5 {
        // Calling `operation` builds its inputs (the gRPC side's copy of the batch, which `dispatch` consumes); only
        // awaiting it is the round trip. The raw side's payload is built once, outside the clock, too.
        let round_trip = operation();
        let t = Instant::now();
        round_trip.await?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn mean(times: &[f64]) -> f64 {
    times.iter().sum::<f64>() / times.len().max(1) as f64
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn report(rows: &[Row], json: Option<&std::path::Path>) -> Result<()> {
    println!(
        "{:<6} {:>7} {:>12} {:>11} {:>11} {:>7} {:>10} {:>10} {:>14}",
        "wire", "tokens", "MB/round", "gRPC GB/s", "raw GB/s", "ratio", "gRPC p50", "raw p50", "p50 limit"
    );
    for r in rows {
        let limit = 2.0 * r.raw_p50_us + 100.0;
        println!(
            "{:<6} {:>7} {:>12.2} {:>11.2} {:>11.2} {:>7.2} {:>8.0}us {:>8.0}us {:>12.0}us",
            r.dtype.to_string(),
            r.tokens,
            r.bytes_per_round_trip as f64 / 1e6,
            r.grpc_bytes_per_s / 1e9,
            r.raw_bytes_per_s / 1e9,
            r.grpc_bytes_per_s / r.raw_bytes_per_s,
            r.grpc_p50_us,
            r.raw_p50_us,
            limit
        );
    }
    println!("targets: gRPC >= 0.70 of raw TCP at 4096 tokens; p50 at 16 tokens <= 2 x raw p50 + 100 us");
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
                })
            })
            .collect();
        let json_text = serde_json::to_string_pretty(&serde_json::json!({"benchmark": "transport", "rows": rows}))?;
        std::fs::write(path, json_text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
