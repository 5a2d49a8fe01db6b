//! `switchyard bench serve`: an open-loop load generator against a serving cluster, reporting throughput, time to
//! first token (TTFT) and time per output token (TPOT) at several request rates, and the rate at which the TPOT p99
//! passes twice its unloaded value.
//!
//! Open loop: each rate's arrival times are drawn up front (exponential inter-arrival times from a seeded RNG, so a
//! Poisson process), and every request is sent at its time whether or not earlier ones have finished; a closed loop
//! (send the next when one finishes) would slow down with the server and hide its queueing. The limit every loaded
//! figure is divided by is measured in the same run: the same kind of requests sent one at a time ("unloaded"), once
//! before the rates and once after them (the second shows whether the machine's other load moved meanwhile).
//!
//! The sweep starts at half a request in flight (Little's law at the unloaded latency) and doubles the rate until the
//! TPOT p99 passes twice the unloaded p99; the crossing is interpolated linearly in rate between the two measured
//! rates around it (from the unloaded run, taken as rate 0, when the first rate is already above).
//!
//! Per request: TTFT is from sending (connecting included: one gRPC connection per request, as
//! `switchyard generate --endpoint` does) to the first token; TPOT is (last token - first token) / (tokens - 1).
//! Percentiles interpolate linearly between the closest ranks. Throughput is completed requests and generated tokens
//! over the time from the rate's start to its last completion.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_model::tiny::Preset;
use switchyard_proto::v1::generate_request::Prompt;
use switchyard_proto::v1::TokenIds;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::commands::remote_generate::{self, RemoteRequest};
use crate::model_dir;

/// Flags of `bench serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory for the cluster this benchmark starts. Default: the built-in `small` FP8 model (made on first
    /// use, ~1.8 GB, in the cache directory; `$SWITCHYARD_CACHE_DIR` moves it).
    #[arg(long, conflicts_with = "endpoint")]
    model: Option<PathBuf>,
    /// Benchmark this already running cluster (its gRPC client endpoint, e.g. `http://127.0.0.1:50051`) instead of
    /// starting `switchyard up`.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Expert worker processes of the cluster this benchmark starts.
    #[arg(long, default_value_t = 2, conflicts_with = "endpoint")]
    expert_workers: usize,
    /// Request rates (requests/s) to measure, comma separated. Default: a sweep from half the unloaded request rate
    /// up by `--rate-factor` until the TPOT p99 passes twice its unloaded value and `--min-rates` rates are measured
    /// (or `--max-rate`, or a rate fails requests or leaves them unfinished).
    #[arg(long, value_delimiter = ',', value_name = "REQ/S")]
    rates: Vec<f64>,
    /// The sweep's step: each rate is this many times the previous one.
    #[arg(long, default_value_t = 2.0)]
    rate_factor: f64,
    /// The sweep measures at least this many rates, even past the crossing, so the table shows how throughput and
    /// latency move with the load.
    #[arg(long, default_value_t = 3)]
    min_rates: usize,
    /// The sweep's highest rate (requests/s). Default: 64 times its first rate.
    #[arg(long)]
    max_rate: Option<f64>,
    /// Seconds of arrivals per rate, longer where needed for `--min-requests` (requests still running at the end are
    /// waited for).
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// Requests per rate at least, with `--duration-s`: a low rate gets a longer window rather than a handful of
    /// requests.
    #[arg(long, default_value_t = 8)]
    min_requests: usize,
    /// Exactly this many requests per rate, instead of `--duration-s` and `--min-requests`.
    #[arg(long, conflicts_with_all = ["duration_s", "min_requests"])]
    requests: Option<usize>,
    /// Requests sent one at a time to measure the unloaded TTFT and TPOT.
    #[arg(long, default_value_t = 5)]
    unloaded_requests: usize,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 16)]
    input_len: usize,
    /// Tokens generated per request (end-of-sequence is ignored, so every request generates exactly this many).
    #[arg(long, default_value_t = 16)]
    output_len: usize,
    /// Seed of the arrival times and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the results as JSON to this file.
    #[arg(long, visible_alias = "output-json", value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Requests sent together before measuring: the first steps fault in the memory-mapped expert weights.
const WARMUP_REQUESTS: usize = 8;

/// Prompt ids are drawn below `vocab - RESERVED_IDS`: the top of the tiny models' vocabularies holds special tokens.
const RESERVED_IDS: usize = 32;

/// How many arrivals one rate gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Window {
    /// Exactly this many.
    Requests(usize),
    /// Every arrival before `seconds`, and on until there are `min_requests`.
    Duration {
        /// Seconds of arrivals.
        seconds: f64,
        /// Arrivals at least.
        min_requests: usize,
    },
}

/// Arrival times (seconds from the start) of a Poisson process at `rate` requests/s: cumulative sums of exponential
/// inter-arrival times, as many as `window` says.
pub fn poisson_schedule(rate: f64, window: Window, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut times = Vec::new();
    let mut t = 0.0;
    loop {
        // Inverse CDF of the exponential distribution; `1 - u` lies in (0, 1], so the logarithm is finite.
        let u: f64 = rng.random();
        t += -(1.0 - u).ln() / rate;
        let enough = match window {
            Window::Requests(n) => times.len() >= n,
            Window::Duration { seconds, min_requests } => t >= seconds && times.len() >= min_requests,
        };
        if enough {
            break;
        }
        times.push(t);
    }
    times
}

/// The `p`-th percentile (0..=100) of `values`, interpolating linearly between the closest ranks (numpy's default);
/// `None` when there are none.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64))
}

/// Where a TPOT p99 curve passes `limit`, given `(rate, tpot_p99)` points sorted by rate: the first point above it and
/// the one before (the unloaded point at rate 0 when the first measured rate is already above), interpolated linearly
/// in rate. `None` when no point is above the limit.
pub fn crossing(points: &[(f64, f64)], unloaded: f64, limit: f64) -> Option<Crossing> {
    let above = points.iter().position(|&(_, tpot)| tpot > limit)?;
    let (low_rate, low_tpot) = if above == 0 { (0.0, unloaded) } else { points[above - 1] };
    let (high_rate, high_tpot) = points[above];
    let fraction =
        if high_tpot > low_tpot { ((limit - low_tpot) / (high_tpot - low_tpot)).clamp(0.0, 1.0) } else { 0.0 };
    Some(Crossing { rate: low_rate + (high_rate - low_rate) * fraction, low_rate, high_rate })
}

/// The rate where TPOT p99 passes its limit, and the two measured rates around it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crossing {
    /// Interpolated rate, requests/s.
    pub rate: f64,
    /// The highest rate at or below the limit before it (0: the unloaded measurement).
    pub low_rate: f64,
    /// The first rate above the limit.
    pub high_rate: f64,
}

/// One request's timings.
struct Sample {
    /// Sent this long after its scheduled time (how far the load generator fell behind).
    lag: Duration,
    ttft: Duration,
    /// `None` for a single generated token.
    tpot: Option<Duration>,
    /// Send to last token.
    latency: Duration,
    tokens: usize,
    /// Last token, from the rate's start.
    done_at: Duration,
}

/// What one rate (or the unloaded run) measured.
struct Measurement {
    /// Offered rate, requests/s; `None` for the unloaded run.
    rate: Option<f64>,
    sent: usize,
    samples: Vec<Sample>,
    failed: usize,
    /// Still running at the drain deadline, cancelled.
    unfinished: usize,
    first_error: Option<String>,
}

impl Measurement {
    fn ms(values: impl Iterator<Item = Duration>) -> Vec<f64> {
        values.map(|d| d.as_secs_f64() * 1e3).collect()
    }

    fn ttft_ms(&self) -> Vec<f64> {
        Self::ms(self.samples.iter().map(|s| s.ttft))
    }

    fn tpot_ms(&self) -> Vec<f64> {
        Self::ms(self.samples.iter().filter_map(|s| s.tpot))
    }

    /// Start of the rate to its last completion, seconds.
    fn span_s(&self) -> f64 {
        self.samples.iter().map(|s| s.done_at.as_secs_f64()).fold(0.0, f64::max)
    }

    fn request_throughput(&self) -> f64 {
        self.samples.len() as f64 / self.span_s().max(1e-9)
    }

    fn token_throughput(&self) -> f64 {
        self.samples.iter().map(|s| s.tokens).sum::<usize>() as f64 / self.span_s().max(1e-9)
    }

    /// Mean requests in flight (Little's law: total latency over the span).
    fn concurrency(&self) -> f64 {
        self.samples.iter().map(|s| s.latency.as_secs_f64()).sum::<f64>() / self.span_s().max(1e-9)
    }

    fn max_lag_ms(&self) -> f64 {
        self.samples.iter().map(|s| s.lag.as_secs_f64() * 1e3).fold(0.0, f64::max)
    }

    fn tpot_p99(&self) -> Option<f64> {
        percentile(&self.tpot_ms(), 99.0)
    }

    fn json(&self, unloaded_tpot_p99: f64, unloaded_tokens_per_s: f64) -> serde_json::Value {
        let stats = |values: Vec<f64>| {
            serde_json::json!({
                "p50": percentile(&values, 50.0), "p90": percentile(&values, 90.0), "p99": percentile(&values, 99.0),
                "mean": (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64),
            })
        };
        serde_json::json!({
            "rate": self.rate, "sent": self.sent, "completed": self.samples.len(), "failed": self.failed,
            "unfinished": self.unfinished, "first_error": self.first_error,
            "requests_per_s": self.request_throughput(), "output_tokens_per_s": self.token_throughput(),
            "output_tokens_per_s_over_unloaded": self.token_throughput() / unloaded_tokens_per_s,
            "mean_concurrency": self.concurrency(), "max_send_lag_ms": self.max_lag_ms(),
            "ttft_ms": stats(self.ttft_ms()), "tpot_ms": stats(self.tpot_ms()),
            "tpot_p99_over_unloaded": self.tpot_p99().map(|p| p / unloaded_tpot_p99),
        })
    }
}

/// One benchmark request: `input_len` random prompt ids, exactly `output_len` generated tokens, greedy.
fn request(prompt: Vec<u32>, output_len: usize) -> RemoteRequest {
    RemoteRequest {
        prompt: Prompt::TokenIds(TokenIds { ids: prompt }),
        max_new_tokens: output_len as u32,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        ignore_eos: true,
        return_logits: false,
    }
}

/// Sends one request and times its tokens; `scheduled` is when it should have gone out, `start` the rate's start.
async fn timed_request(endpoint: &str, request: RemoteRequest, start: Instant, scheduled: Instant) -> Result<Sample> {
    let sent = Instant::now();
    let (mut first, mut last, mut tokens) = (None, None, 0usize);
    remote_generate::generate(endpoint, request, &mut |_| {
        let now = Instant::now();
        first.get_or_insert(now);
        last = Some(now);
        tokens += 1;
    })
    .await?;
    let (Some(first), Some(last)) = (first, last) else { bail!("{endpoint} finished a request with no tokens") };
    Ok(Sample {
        lag: sent.saturating_duration_since(scheduled),
        ttft: first - sent,
        tpot: (tokens >= 2).then(|| (last - first) / (tokens - 1) as u32),
        latency: last - sent,
        tokens,
        done_at: last - start,
    })
}

/// The workload: prompts and arrival times, all drawn from `--seed`.
struct Workload {
    endpoint: Arc<str>,
    vocab: usize,
    input_len: usize,
    output_len: usize,
    seed: u64,
}

impl Workload {
    /// `count` prompts from the RNG stream `stream` (each measurement draws its own, so rates do not share prompts).
    fn prompts(&self, stream: u64, count: usize) -> Vec<Vec<u32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let ids = self.vocab.saturating_sub(RESERVED_IDS).max(1) as u32;
        (0..count).map(|_| (0..self.input_len).map(|_| rng.random_range(0..ids)).collect()).collect()
    }

    /// Sends every request at its arrival time, then waits for them, at most `drain` after the last arrival.
    async fn open_loop(&self, rate: Option<f64>, arrivals: &[f64], stream: u64, drain: Duration) -> Measurement {
        let prompts = self.prompts(stream, arrivals.len());
        let mut running = tokio::task::JoinSet::new();
        let start = Instant::now();
        for (prompt, &at) in prompts.into_iter().zip(arrivals) {
            let scheduled = start + Duration::from_secs_f64(at);
            tokio::time::sleep_until(scheduled.into()).await;
            let endpoint = self.endpoint.clone();
            let request = request(prompt, self.output_len);
            running.spawn_local(async move { timed_request(&endpoint, request, start, scheduled).await });
        }
        self.collect(rate, arrivals.len(), running, Instant::now() + drain).await
    }

    /// The same requests one at a time: the unloaded limit.
    async fn one_at_a_time(&self, count: usize, stream: u64) -> Measurement {
        let mut measurement =
            Measurement { rate: None, sent: count, samples: Vec::new(), failed: 0, unfinished: 0, first_error: None };
        let start = Instant::now();
        for prompt in self.prompts(stream, count) {
            match timed_request(&self.endpoint, request(prompt, self.output_len), start, Instant::now()).await {
                Ok(sample) => measurement.samples.push(sample),
                Err(e) => {
                    measurement.failed += 1;
                    measurement.first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
        measurement
    }

    async fn collect(
        &self,
        rate: Option<f64>,
        sent: usize,
        mut running: tokio::task::JoinSet<Result<Sample>>,
        deadline: Instant,
    ) -> Measurement {
        let mut measurement =
            Measurement { rate, sent, samples: Vec::new(), failed: 0, unfinished: 0, first_error: None };
        loop {
            match tokio::time::timeout_at(deadline.into(), running.join_next()).await {
                Ok(None) => break,
                Ok(Some(Ok(Ok(sample)))) => measurement.samples.push(sample),
                Ok(Some(Ok(Err(e)))) => {
                    measurement.failed += 1;
                    measurement.first_error.get_or_insert(format!("{e:#}"));
                }
                Ok(Some(Err(e))) => {
                    measurement.failed += 1;
                    measurement.first_error.get_or_insert(format!("request task: {e}"));
                }
                Err(_) => {
                    // Dropping the streams tells the server these clients went away, so it frees their sequences.
                    measurement.unfinished = running.len();
                    running.abort_all();
                    break;
                }
            }
        }
        measurement
    }
}

/// A `switchyard up` started by a benchmark, stopped (SIGTERM, then killed) when dropped or [`Cluster::stop`]ped.
pub struct Cluster {
    child: tokio::process::Child,
    /// The gRPC client endpoint from the `ready` line.
    pub endpoint: String,
}

impl Cluster {
    /// Starts this binary's `up` with `args` and waits (at most `timeout`) for its `ready: client endpoint` line.
    pub async fn start(args: &[String], timeout: Duration) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the switchyard binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("up")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting switchyard up")?;
        let stdout = child.stdout.take().context("switchyard up has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let endpoint = loop {
            let line = tokio::time::timeout(timeout, lines.next_line())
                .await
                .with_context(|| format!("switchyard up was not ready within {} s", timeout.as_secs()))?
                .context("reading switchyard up's output")?;
            match line {
                Some(line) => {
                    if let Some(rest) = line.strip_prefix("ready: client endpoint ") {
                        break rest.split_whitespace().next().unwrap_or_default().to_string();
                    }
                }
                None => bail!("switchyard up exited before it was ready (its errors are above)"),
            }
        };
        // Keep reading, so that `up` never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, endpoint })
    }

    /// SIGTERM (`up` stops its own children on it), then waits up to 10 s.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: a signal to the child process this value owns; no memory is touched.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Checks the flags that clap cannot.
fn validate(args: &Args) -> Result<()> {
    if args.output_len < 2 {
        bail!("--output-len must be at least 2: TPOT needs two tokens");
    }
    if args.input_len == 0 {
        bail!("--input-len must be at least 1");
    }
    if args.unloaded_requests == 0 {
        bail!("--unloaded-requests must be at least 1");
    }
    if let Some(bad) = args.rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rates: {bad} is not a positive number of requests/s");
    }
    if !(args.rate_factor.is_finite() && args.rate_factor > 1.0) {
        bail!("--rate-factor must be above 1, got {}", args.rate_factor);
    }
    if let Some(bad) = args.max_rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--max-rate must be positive, got {bad}");
    }
    if args.requests == Some(0) {
        bail!("--requests must be at least 1");
    }
    if args.requests.is_none() && !(args.duration_s.is_finite() && args.duration_s > 0.0) {
        bail!("--duration-s must be positive, got {}", args.duration_s);
    }
    if args.min_rates == 0 {
        bail!("--min-rates must be at least 1");
    }
    Ok(())
}

/// Runs `bench serve`.
pub fn run(args: Args) -> Result<()> {
    validate(&args)?;
    // One thread: the client is light, and the cores are the cluster's. The gRPC client's token callback is not
    // `Send`, so requests run as local tasks.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    tokio::task::LocalSet::new().block_on(&runtime, async {
        match &args.endpoint {
            Some(endpoint) => bench(&args, endpoint, format!("the running cluster at {endpoint}")).await,
            None => {
                let dir = match &args.model {
                    Some(dir) => dir.clone(),
                    None => model_dir::builtin(Preset::Small)?,
                };
                let up_args = vec![
                    "--model".to_string(),
                    dir.to_string_lossy().into_owned(),
                    "--expert-workers".to_string(),
                    args.expert_workers.to_string(),
                ];
                eprintln!("starting switchyard up {}", up_args.join(" "));
                let cluster = Cluster::start(&up_args, Duration::from_secs(300)).await?;
                let what = format!(
                    "switchyard up --model {} (1 attention worker, {} expert workers)",
                    dir.display(),
                    args.expert_workers
                );
                let result = bench(&args, &cluster.endpoint, what).await;
                cluster.stop().await;
                result
            }
        }
    })
}

/// The vocabulary size, from a one-token request's prompt logits (a row per prompt token).
async fn probe_vocab(endpoint: &str) -> Result<usize> {
    let probe = RemoteRequest { return_logits: true, ..request(vec![0], 1) };
    let generation = remote_generate::generate(endpoint, probe, &mut |_| {})
        .await
        .with_context(|| format!("probing {endpoint} with a one-token request"))?;
    generation.prompt_logits.first().map(Vec::len).filter(|&v| v > 0).context("the server sent no prompt logits")
}

/// The unloaded run and the limits derived from it.
struct Baseline {
    measurement: Measurement,
    tpot_p99_ms: f64,
    /// Mean send-to-last-token time, seconds.
    latency_s: f64,
    /// Generated tokens per second of one request at a time.
    tokens_per_s: f64,
}

impl Baseline {
    /// The TPOT p99 the sweep looks for.
    fn limit_ms(&self) -> f64 {
        2.0 * self.tpot_p99_ms
    }
}

async fn bench(args: &Args, endpoint: &str, target: String) -> Result<()> {
    let vocab = probe_vocab(endpoint).await?;
    let workload = Workload {
        endpoint: Arc::from(endpoint),
        vocab,
        input_len: args.input_len,
        output_len: args.output_len,
        seed: args.seed,
    };
    eprintln!("warm-up: {WARMUP_REQUESTS} requests at once");
    let warmup = workload.open_loop(None, &[0.0; WARMUP_REQUESTS], u64::MAX, Duration::from_secs(300)).await;
    if let Some(error) = warmup.first_error {
        bail!("warm-up request failed: {error}");
    }

    eprintln!("unloaded: {} requests one at a time", args.unloaded_requests);
    let measurement = workload.one_at_a_time(args.unloaded_requests, 0).await;
    let Some(tpot_p99_ms) = measurement.tpot_p99() else {
        bail!("the unloaded requests all failed: {}", measurement.first_error.as_deref().unwrap_or("no error given"));
    };
    let latency_s =
        measurement.samples.iter().map(|s| s.latency.as_secs_f64()).sum::<f64>() / measurement.samples.len() as f64;
    let baseline = Baseline { measurement, tpot_p99_ms, latency_s, tokens_per_s: args.output_len as f64 / latency_s };
    eprintln!(
        "unloaded: TTFT p50 {:.1} ms, TPOT p99 {tpot_p99_ms:.1} ms, {latency_s:.2} s a request",
        percentile(&baseline.measurement.ttft_ms(), 50.0).unwrap_or(f64::NAN)
    );

    let measured = sweep(args, &workload, &baseline).await;

    // The same requests again: if the machine's other load changed during the sweep, this shows it.
    eprintln!("unloaded again: {} requests one at a time", args.unloaded_requests);
    let after = workload.one_at_a_time(args.unloaded_requests, 0).await;
    report(args, &target, &baseline, &measured, &after)
}

/// Measures the `--rates`, or sweeps geometrically from half a request in flight (Little's law at the
/// unloaded latency) until TPOT p99 passes the limit (after `--min-rates` rates), a rate does not finish, or
/// `--max-rate`.
async fn sweep(args: &Args, workload: &Workload, baseline: &Baseline) -> Vec<Measurement> {
    let auto = args.rates.is_empty();
    let first_rate = 0.5 / baseline.latency_s;
    let max_rate = args.max_rate.unwrap_or(64.0 * first_rate);
    let rates: Box<dyn Iterator<Item = f64>> = if auto {
        Box::new(
            std::iter::successors(Some(first_rate), |r| Some(r * args.rate_factor))
                .take_while(move |&r| r <= max_rate * (1.0 + 1e-9)),
        )
    } else {
        Box::new(args.rates.clone().into_iter())
    };
    // Requests still running this long after the last arrival mean the server is not keeping up: stop waiting.
    let drain = Duration::from_secs_f64((10.0 * baseline.latency_s).max(30.0));
    let mut measured = Vec::new();
    for (stream, rate) in (1u64..).zip(rates) {
        let window = match args.requests {
            Some(n) => Window::Requests(n),
            None => Window::Duration { seconds: args.duration_s, min_requests: args.min_requests },
        };
        let arrivals = poisson_schedule(rate, window, args.seed ^ stream);
        eprintln!("rate {rate:.3} req/s: {} requests over {:.1} s", arrivals.len(), arrivals.last().unwrap_or(&0.0));
        let measurement = workload.open_loop(Some(rate), &arrivals, stream, drain).await;
        let tpot = measurement.tpot_p99();
        eprintln!(
            "  {}/{} completed, TPOT p99 {} ms ({} x unloaded)",
            measurement.samples.len(),
            measurement.sent,
            tpot.map_or("-".into(), |t| format!("{t:.1}")),
            tpot.map_or("-".into(), |t| format!("{:.2}", t / baseline.tpot_p99_ms)),
        );
        let overloaded = measurement.unfinished > 0 || measurement.failed > 0;
        let crossed = tpot.is_none_or(|t| t > baseline.limit_ms());
        measured.push(measurement);
        if auto && (overloaded || (crossed && measured.len() >= args.min_rates)) {
            break;
        }
    }
    measured
}

/// Prints the table and the crossing, and writes the JSON.
fn report(args: &Args, target: &str, baseline: &Baseline, measured: &[Measurement], after: &Measurement) -> Result<()> {
    let limit = baseline.limit_ms();
    let mut points: Vec<(f64, f64)> =
        measured.iter().filter_map(|m| Some((m.rate?, m.tpot_p99().unwrap_or(f64::INFINITY)))).collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let cross = crossing(&points, baseline.tpot_p99_ms, limit);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    println!(
        "bench serve: {target}; {} prompt + {} generated tokens a request, greedy; seed {}; {cores} cores shared by \
         this client and the cluster",
        args.input_len, args.output_len, args.seed,
    );
    println!(
        "{:>9} {:>5} {:>5} {:>7} {:>8} {:>6} {:>5} | {:>23} | {:>23} | {:>6} {:>7}",
        "rate",
        "sent",
        "done",
        "req/s",
        "tok/s",
        "x unl",
        "conc",
        "TTFT ms p50/p90/p99",
        "TPOT ms p50/p90/p99",
        "x unl",
        "lag ms"
    );
    let rows = std::iter::once(("unloaded".to_string(), &baseline.measurement))
        .chain(measured.iter().map(|m| (m.rate.map_or("-".into(), |r| format!("{r:.3}")), m)))
        .chain(std::iter::once(("unl after".to_string(), after)));
    for (label, m) in rows {
        let three = |values: Vec<f64>| {
            let p = |q| percentile(&values, q).map_or("-".to_string(), |v| format!("{v:.1}"));
            format!("{}/{}/{}", p(50.0), p(90.0), p(99.0))
        };
        let missing = m.failed + m.unfinished;
        println!(
            "{label:>9} {:>5} {:>5} {:>7.3} {:>8.1} {:>6.2} {:>5.1} | {:>23} | {:>23} | {:>6} {:>7.1}",
            m.sent,
            if missing > 0 { format!("{}!", m.samples.len()) } else { m.samples.len().to_string() },
            m.request_throughput(),
            m.token_throughput(),
            m.token_throughput() / baseline.tokens_per_s,
            m.concurrency(),
            three(m.ttft_ms()),
            three(m.tpot_ms()),
            m.tpot_p99().map_or("-".into(), |t| format!("{:.2}", t / baseline.tpot_p99_ms)),
            m.max_lag_ms(),
        );
        if let Some(error) = &m.first_error {
            println!("          {} failed, {} unfinished; first error: {error}", m.failed, m.unfinished);
        } else if m.unfinished > 0 {
            println!("          {} still running at the drain deadline, cancelled", m.unfinished);
        }
    }
    println!(
        "rate: offered requests/s (Poisson arrivals); unl after: the unloaded requests again after the sweep; req/s, \
         tok/s: completed requests and generated tokens per second; x unl: tok/s over one request at a time ({:.1} \
         tok/s); conc: mean requests in flight; TPOT x unl: TPOT p99 over the unloaded p99; lag: latest send behind \
         its scheduled time",
        baseline.tokens_per_s
    );
    let max_measured = points.last().map(|p| p.0);
    let summary = match (cross, max_measured) {
        (Some(c), _) if c.low_rate == 0.0 => format!(
            "TPOT p99 passes 2 x unloaded ({limit:.1} ms) at ~{:.3} req/s: below the lowest rate measured ({:.3}), \
             interpolated linearly in rate from the unloaded run (as rate 0)",
            c.rate, c.high_rate
        ),
        (Some(c), _) => format!(
            "TPOT p99 passes 2 x unloaded ({limit:.1} ms) at ~{:.3} req/s, interpolated linearly in rate between \
             {:.3} (below) and {:.3} req/s (above)",
            c.rate, c.low_rate, c.high_rate
        ),
        (None, Some(max)) => format!("TPOT p99 stays within 2 x unloaded ({limit:.1} ms) up to {max:.3} req/s"),
        (None, None) => "no rate measured".to_string(),
    };
    println!("{summary}");
    let drift = after.tpot_p99().map(|t| t / baseline.tpot_p99_ms);
    if let Some(drift) = drift {
        println!(
            "unloaded TPOT p99 after the sweep: {:.2} x before{}",
            drift,
            if (drift - 1.0).abs() > 0.2 { " (the machine's other load changed: compare with care)" } else { "" }
        );
    }

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "benchmark": "serve",
            "target": target,
            "endpoint_given": args.endpoint.is_some(),
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "duration_s": args.requests.is_none().then_some(args.duration_s),
            "min_requests_per_rate": args.requests.is_none().then_some(args.min_requests),
            "requests_per_rate": args.requests,
            "cores": cores,
            "unloaded": baseline.measurement.json(baseline.tpot_p99_ms, baseline.tokens_per_s),
            "unloaded_output_tokens_per_s": baseline.tokens_per_s,
            "unloaded_after_sweep": after.json(baseline.tpot_p99_ms, baseline.tokens_per_s),
            "tpot_p99_limit_ms": limit,
            "rates": measured.iter().map(|m| m.json(baseline.tpot_p99_ms, baseline.tokens_per_s)).collect::<Vec<_>>(),
            "crossing": cross.map(|c| serde_json::json!({
                "rate": c.rate, "low_rate": c.low_rate, "high_rate": c.high_rate,
                "method": "linear in rate between the two measured rates around the limit (low 0: the unloaded run)",
            })),
            "summary": summary,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_schedule_is_seeded_increasing_and_has_the_asked_rate() {
        let a = poisson_schedule(4.0, Window::Requests(20_000), 7);
        assert_eq!(a, poisson_schedule(4.0, Window::Requests(20_000), 7));
        assert_ne!(a, poisson_schedule(4.0, Window::Requests(20_000), 8));
        assert_eq!(a.len(), 20_000);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        // Mean gap 1/rate; the standard error over 20,000 exponential gaps is 0.7%.
        let mean_gap = a[a.len() - 1] / a.len() as f64;
        assert!((mean_gap - 0.25).abs() < 0.25 * 0.03, "mean gap {mean_gap}");
        // Exponential gaps: about 1 - 1/e of them are shorter than the mean.
        let gaps: Vec<f64> = std::iter::once(a[0]).chain(a.windows(2).map(|w| w[1] - w[0])).collect();
        let short = gaps.iter().filter(|&&g| g < 0.25).count() as f64 / gaps.len() as f64;
        assert!((short - (1.0 - (-1.0f64).exp())).abs() < 0.02, "share below the mean {short}");

        let by_time = poisson_schedule(4.0, Window::Duration { seconds: 10.0, min_requests: 1 }, 7);
        assert!(by_time.last().is_some_and(|&t| t < 10.0));
        assert!(a[by_time.len()] >= 10.0);
        assert_eq!(by_time[..], a[..by_time.len()]);
        // Too few arrivals in the window: it runs on until there are enough.
        let at_least = poisson_schedule(4.0, Window::Duration { seconds: 1.0, min_requests: 100 }, 7);
        assert_eq!(at_least[..], a[..100]);
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let values = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&values, 0.0), Some(1.0));
        assert_eq!(percentile(&values, 50.0), Some(3.0));
        assert_eq!(percentile(&values, 100.0), Some(5.0));
        assert_eq!(percentile(&values, 90.0), Some(4.6));
        assert_eq!(percentile(&[2.0], 99.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn crossing_interpolates_between_the_bracketing_rates() {
        let points = [(1.0, 50.0), (2.0, 80.0), (4.0, 140.0), (8.0, 400.0)];
        let c = crossing(&points, 50.0, 100.0).expect("crosses");
        assert_eq!((c.low_rate, c.high_rate), (2.0, 4.0));
        assert!((c.rate - (2.0 + 2.0 * 20.0 / 60.0)).abs() < 1e-12);
        // Above the limit from the first rate: bracketed by the unloaded run at rate 0.
        let c = crossing(&[(1.0, 150.0)], 50.0, 100.0).expect("crosses");
        assert_eq!((c.low_rate, c.high_rate, c.rate), (0.0, 1.0, 0.5));
        assert_eq!(crossing(&points[..2], 50.0, 100.0), None);
    }
}
