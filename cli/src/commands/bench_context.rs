//! `switchyard bench context`: decode latency per token and prefill throughput against context length, on 1, 2 and 4
//! context-parallel members, so the scaling can be read off one table.
//!
//! Everything runs in this process, with every expert local (the bench is about attention): the owner's forward pass
//! on a pool of its own (as the engine runs it), and for a group of M members, M - 1 `ShardHost`s served over real
//! gRPC on loopback, each with its own KV pool, reached through the `GrpcTransport` and `RemoteContext` the attention
//! worker uses. The group splits the context into M equal ranges on KV-block boundaries (the coordinator's
//! `assign_group` with equal rooms), the owner first. One member is the plain cache.
//!
//! A context of C positions is C - N prompt tokens prefilled in chunks, then N tokens decoded one step each (fixed
//! token ids, not sampled, so that every group size computes the same thing and the logits can be compared). Every
//! figure is a ratio to a row of the same run: to the same context on one member (the scaling), and to the shortest
//! context on the same members (the growth). For the shortest context the groups' logits must equal the one-member
//! logits within [`LOGIT_TOLERANCE`], or the bench fails: a broken group must not produce a table.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use switchyard_attention_worker::{micro_batch_pool, RemoteContext, ShardHost};
use switchyard_coordinator::context::{assign_group, ContextGroup, ContextRoom};
use switchyard_model::config::TextConfig;
use switchyard_model::kv::DEFAULT_BLOCK_SIZE;
use switchyard_model::memory::{KvBytes, Precision, WeightBytes, WeightPrecision};
use switchyard_model::tiny::Preset;
use switchyard_model::{ExpertSelection, KvBlockPool, KvCache, Llama4Model, LoadOptions, LogitsFor};
use switchyard_planner::HardwareProfile;
use switchyard_transport::context::{ContextServer, ContextService};
use switchyard_transport::grpc::{server_builder, GrpcTransport};
use switchyard_transport::{Transport, WireFormat};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::commands::bench_serve::percentile;
use crate::{model_dir, serving};

/// Largest |difference| allowed between a group's logits and the one-member logits at the shortest context.
pub const LOGIT_TOLERANCE: f32 = 1e-4;
/// Deadline of one member's partial attention: a 2048-query prefill chunk against a long range takes minutes on a
/// shared 2-core machine, far past the transport's default.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a member server may take to stop once its clients are gone.
const STOP_PATIENCE: Duration = Duration::from_secs(10);
/// The owner's worker id in the group.
const OWNER: &str = "owner";

/// Flags of `bench context`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory. Default: the built-in `small` FP8 model (made on first use, ~1.8 GB).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context lengths: positions a sequence reaches, prompt and decoded tokens together (at most the model's
    /// max_position_embeddings, 262144 for `small`).
    #[arg(long, value_delimiter = ',', default_value = "4096,8192")]
    contexts: Vec<usize>,
    /// Context-parallel group sizes; 1 (the plain cache) is the reference of every row and must be included.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    members: Vec<usize>,
    /// Tokens decoded one step each at the end of every context.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = 2048)]
    prefill_chunk: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// One prefill step's time.
struct Chunk {
    start: usize,
    tokens: usize,
    seconds: f64,
}

/// What one (context, members) run measured.
struct Run {
    context: usize,
    members: usize,
    ranges: Vec<(usize, usize)>,
    prompt_tokens: usize,
    chunks: Vec<Chunk>,
    decode_ms: Vec<f64>,
    /// The last prefill step's logits, then every decode step's.
    logits: Vec<f32>,
}

impl Run {
    fn prefill_seconds(&self) -> f64 {
        self.chunks.iter().map(|c| c.seconds).sum()
    }

    fn prefill_rate(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds().max(1e-9)
    }

    fn decode_p50(&self) -> f64 {
        percentile(&self.decode_ms, 50.0).unwrap_or(f64::NAN)
    }

    fn decode_p90(&self) -> f64 {
        percentile(&self.decode_ms, 90.0).unwrap_or(f64::NAN)
    }
}

/// A member's server: its shutdown signal and its task.
type MemberServer = (oneshot::Sender<()>, JoinHandle<Result<(), tonic::transport::Error>>);

/// The M - 1 members of a group, served over gRPC on loopback in this process.
struct Members {
    group: ContextGroup,
    transport: Arc<GrpcTransport>,
    servers: Vec<MemberServer>,
}

impl Members {
    /// Serves `members - 1` shard hosts, each with a KV pool of its own, and splits `context` positions over the
    /// owner and them in equal ranges of whole KV blocks.
    fn start(runtime: &Runtime, config: &TextConfig, context: usize, members: usize) -> Result<Self> {
        let range = member_range(context, members);
        let transport =
            Arc::new(GrpcTransport::new(WireFormat::default(), OWNER.into()).with_request_timeout(MEMBER_TIMEOUT));
        let mut rooms = Vec::with_capacity(members - 1);
        let mut servers = Vec::with_capacity(members - 1);
        for member in 1..members {
            let listener = runtime.block_on(serving::bind(([127, 0, 0, 1], 0).into()))?;
            let addr = listener.local_addr().context("reading a member's address")?;
            let host: Arc<dyn ContextService> =
                Arc::new(ShardHost::new(config.clone(), KvBlockPool::unbounded(config)?));
            let (stop, stopped) = oneshot::channel::<()>();
            let serve =
                server_builder().add_service(ContextServer::new(host).into_service()).serve_with_incoming_shutdown(
                    // Nagle's algorithm would hold a decode step's small answers back (see `grpc::server_builder`).
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                );
            servers.push((stop, runtime.spawn(serve)));
            rooms.push(ContextRoom {
                worker_id: format!("member-{member}"),
                endpoint: format!("http://{addr}"),
                tokens: range,
            });
        }
        let owner = ContextRoom { worker_id: OWNER.into(), endpoint: "in-process".into(), tokens: range };
        let sequence_id = format!("bench-context-{context}-{members}");
        let group = assign_group(&sequence_id, &owner, &rooms, context, DEFAULT_BLOCK_SIZE)
            .with_context(|| format!("splitting {context} positions over {members} members"))?;
        ensure!(
            group.ranges.len() == members,
            "{context} positions split into {} ranges, not {members} (checked before the runs)",
            group.ranges.len()
        );
        // Lazy channels register with the runtime's reactor when they are made.
        let _runtime = runtime.enter();
        for range in &group.ranges[1..] {
            transport.add_context_member(range.worker_id.clone(), range.endpoint.clone());
        }
        Ok(Self { group, transport, servers })
    }

    /// The owner's view of the group, to give its cache.
    fn context(&self, config: &TextConfig, runtime: &Runtime) -> Arc<RemoteContext> {
        let transport: Arc<dyn Transport> = self.transport.clone();
        Arc::new(RemoteContext::new(self.group.clone(), config.clone(), transport, runtime.handle().clone()))
    }

    /// Releases the members' shards and stops their servers, so their KV pools are freed before the next run.
    fn stop(self, runtime: &Runtime) {
        let Self { group, transport, servers } = self;
        runtime.block_on(async {
            for range in &group.ranges[1..] {
                if let Err(error) = transport.release_shard(&range.worker_id, &group.sequence_id).await {
                    tracing::warn!(member = %range.worker_id, %error, "could not release a context shard");
                }
            }
        });
        // The servers drain their connections on shutdown; the clients close them when the transport goes.
        drop(transport);
        for (stop, server) in servers {
            let _ = stop.send(());
            match runtime.block_on(async { tokio::time::timeout(STOP_PATIENCE, server).await }) {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::warn!(%error, "a member server failed"),
                Ok(Err(join)) => tracing::warn!(%join, "a member server task failed"),
                Err(_) => tracing::warn!("a member server did not stop in {STOP_PATIENCE:?}; leaving it"),
            }
        }
    }
}

/// The forward pass's own thread pool: `rayon::ThreadPool::install` of the attention worker's `micro_batch_pool`.
struct ForwardPool<'a>(&'a (dyn Fn(&mut (dyn FnMut() + Send)) + Sync));

impl ForwardPool<'_> {
    /// One forward step of one sequence on the pool.
    fn forward(&self, model: &Llama4Model, tokens: &[u32], cache: &mut KvCache, logits: LogitsFor) -> Result<Vec<f32>> {
        let mut out = None;
        (self.0)(&mut || out = Some(model.forward(tokens, cache, logits)));
        Ok(out.context("the forward pass's pool did not run the step")??)
    }
}

/// Positions each member of a group of `members` holds of a `context`-position sequence (the last one the rest):
/// an equal share rounded up to whole KV blocks.
fn member_range(context: usize, members: usize) -> usize {
    context.div_ceil(members.max(1)).div_ceil(DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE
}

/// `len` token ids below the vocabulary's last 32 (special tokens), from a fixed generator.
fn sequence_tokens(len: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % vocab.saturating_sub(32).max(1) as u64) as u32
        })
        .collect()
}

/// Prefills `context - decode_tokens` positions in chunks and decodes the rest one step each, on `members` members.
fn measure(
    model: &Llama4Model,
    runtime: &Runtime,
    forward_pool: &ForwardPool<'_>,
    context: usize,
    members: usize,
    args: &Args,
) -> Result<Run> {
    let config = model.config();
    let tokens = sequence_tokens(context, config.vocab_size);
    let (prompt, decode) = tokens.split_at(context - args.decode_tokens);
    let group = (members > 1).then(|| Members::start(runtime, config, context, members)).transpose()?;
    let mut cache = KvCache::in_pool(config, KvBlockPool::unbounded(config)?);
    let ranges = match &group {
        Some(group) => {
            cache.set_context(group.context(config, runtime))?;
            group.group.ranges.iter().map(|r| (r.start, r.end)).collect()
        }
        None => vec![(0, context)],
    };
    let what = |step: &str| format!("{step} of a {context}-position context on {members} member(s)");
    let mut run = Run {
        context,
        members,
        ranges,
        prompt_tokens: prompt.len(),
        chunks: Vec::new(),
        decode_ms: Vec::new(),
        logits: Vec::new(),
    };
    let chunk_count = prompt.len().div_ceil(args.prefill_chunk);
    for (i, chunk) in prompt.chunks(args.prefill_chunk).enumerate() {
        let last = i + 1 == chunk_count;
        let start = cache.len();
        let began = Instant::now();
        let logits = forward_pool
            .forward(model, chunk, &mut cache, if last { LogitsFor::Last } else { LogitsFor::None })
            .with_context(|| what(&format!("prefill step at position {start}")))?;
        run.chunks.push(Chunk { start, tokens: chunk.len(), seconds: began.elapsed().as_secs_f64() });
        if last {
            run.logits.extend(logits);
        }
    }
    for &token in decode {
        let position = cache.len();
        let began = Instant::now();
        let logits = forward_pool
            .forward(model, &[token], &mut cache, LogitsFor::Last)
            .with_context(|| what(&format!("decode step at position {position}")))?;
        run.decode_ms.push(began.elapsed().as_secs_f64() * 1e3);
        run.logits.extend(logits);
    }
    drop(cache);
    if let Some(group) = group {
        group.stop(runtime);
    }
    Ok(run)
}

/// Checks the flags against the model, and the longest context's KV against this machine's memory.
fn check_args(args: &Args, config: &TextConfig) -> Result<()> {
    ensure!(args.decode_tokens >= 1, "--decode-tokens must be at least 1");
    ensure!(args.prefill_chunk >= 1, "--prefill-chunk must be at least 1");
    ensure!(!args.contexts.is_empty(), "--contexts lists no context length");
    ensure!(args.members.contains(&1), "--members must include 1: every row is compared with the one-member run");
    if let Some(&zero) = args.members.iter().find(|&&m| m == 0) {
        bail!("--members {zero}: a group has at least one member");
    }
    for &context in &args.contexts {
        ensure!(
            context > args.decode_tokens,
            "context {context} leaves no prompt before its {} decoded tokens (--decode-tokens)",
            args.decode_tokens
        );
        ensure!(
            context <= config.max_position_embeddings,
            "context {context} exceeds the model's max_position_embeddings {}",
            config.max_position_embeddings
        );
        for &members in &args.members {
            let range = member_range(context, members);
            ensure!(
                (members - 1) * range < context,
                "a context of {context} positions does not fill {members} members' ranges of whole \
                 {DEFAULT_BLOCK_SIZE}-position KV blocks ({range} positions each): use a longer context or fewer \
                 members"
            );
        }
    }
    let longest = args.contexts.iter().copied().max().unwrap_or(0) as u64;
    let kv = KvBytes::of(config, Precision::F32).sequence(longest);
    // The CPU runtime holds dense weights in f32 and streams FP8 expert codes.
    let weights =
        WeightBytes::of(config, WeightPrecision { dense: Precision::F32, routed_experts: Precision::Fp8 }).total();
    let memory = HardwareProfile::named("cpu").context("this machine's hardware profile")?.memory_bytes;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    ensure!(
        kv + weights <= memory,
        "a context of {longest} positions needs {:.2} GiB ({:.2} GiB of f32 KV + {:.2} GiB of weights); this machine \
         has {:.2} GiB",
        gib(kv + weights),
        gib(kv),
        gib(weights),
        gib(memory)
    );
    Ok(())
}

/// Runs `bench context`.
pub fn run(mut args: Args) -> Result<()> {
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => model_dir::builtin(Preset::Small)?,
    };
    args.contexts.sort_unstable();
    args.contexts.dedup();
    args.members.sort_unstable();
    args.members.dedup();
    let (config, model) = model_dir::load(&dir, &LoadOptions { experts: ExpertSelection::All, ..Default::default() })?;
    let config = config.text;
    check_args(&args, &config)?;
    let runtime = serving::runtime(2)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The engine's arrangement: the forward pass on a pool of its own, so that while it waits for the members their
    // partial attention (on the global rayon pool) has every core.
    let pool = micro_batch_pool(0, threads).context("starting the forward pass's thread pool")?;
    let install = |step: &mut (dyn FnMut() + Send)| pool.install(step);
    let forward_pool = ForwardPool(&install);

    // Warm-up: the first steps fault in the weights and fill caches.
    let mut warm = KvCache::in_pool(&config, KvBlockPool::unbounded(&config)?);
    let warm_tokens = sequence_tokens(258, config.vocab_size);
    forward_pool.forward(&model, &warm_tokens[..256], &mut warm, LogitsFor::Last).context("warming up")?;
    for &token in &warm_tokens[256..] {
        forward_pool.forward(&model, &[token], &mut warm, LogitsFor::Last).context("warming up")?;
    }
    drop(warm);

    let started = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    // The correctness guard, at the shortest context (first, so a broken group stops the bench before the long runs).
    let mut diffs = Vec::new();
    for &context in &args.contexts {
        for &members in &args.members {
            let mut run = measure(&model, &runtime, &forward_pool, context, members, &args)?;
            if context == args.contexts[0] {
                if let Some(reference) = runs.iter().find(|r| r.context == context && r.members == 1) {
                    diffs.push((members, check_logits(&run, reference)?));
                }
            } else {
                run.logits = Vec::new();
            }
            eprintln!(
                "context {context} on {members} member(s): prefill {:.1} tok/s, decode p50 {:.1} ms ({:.0} s so far)",
                run.prefill_rate(),
                run.decode_p50(),
                started.elapsed().as_secs_f64()
            );
            runs.push(run);
        }
    }
    report(&args, &dir, &config, &runs, &diffs, started.elapsed())
}

/// Largest |difference| between two logit vectors of the same length.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Fails unless `run`'s logits equal the one-member run's of the same context within [`LOGIT_TOLERANCE`]; returns
/// the largest difference.
fn check_logits(run: &Run, reference: &Run) -> Result<f32> {
    ensure!(
        run.logits.len() == reference.logits.len(),
        "{} members returned {} logits, one member {}",
        run.members,
        run.logits.len(),
        reference.logits.len()
    );
    let diff = max_abs_diff(&run.logits, &reference.logits);
    ensure!(
        diff <= LOGIT_TOLERANCE,
        "at context {}, {} members' logits differ from one member's by {diff:e} (allowed {LOGIT_TOLERANCE:e}): the \
         group is broken",
        run.context,
        run.members
    );
    Ok(diff)
}

/// Prints the table (ratios to rows of the same run) and writes the JSON.
fn report(
    args: &Args,
    dir: &std::path::Path,
    config: &TextConfig,
    runs: &[Run],
    diffs: &[(usize, f32)],
    elapsed: Duration,
) -> Result<()> {
    let shortest = args.contexts.first().copied().unwrap_or(0);
    let find = |context: usize, members: usize| runs.iter().find(|r| r.context == context && r.members == members);

    let kv = KvBytes::of(config, Precision::F32);
    println!(
        "model {} ; {} of {} layers global: f32 KV grows {:.1} KiB per position ; prefill steps of {} tokens ; {} \
         decoded tokens per context ; {} cores shared by the owner and every member ; {:.0} s",
        dir.display(),
        kv.global_layers,
        kv.global_layers + kv.chunked_layers,
        kv.per_token_global() as f64 / 1024.0,
        args.prefill_chunk,
        args.decode_tokens,
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        elapsed.as_secs_f64()
    );
    let growth = format!("x {shortest}");
    println!(
        "{:>8} {:>8} {:>14} {:>10} {:>11} {:>11} {:>10} {:>10}",
        "context", "members", "prefill tok/s", "speedup", "decode p50", "decode p90", "x 1 member", growth
    );
    let mut rows = Vec::new();
    for run in runs {
        let one = find(run.context, 1).context("a one-member run is missing")?;
        let base = find(shortest, run.members).context("a shortest-context run is missing")?;
        let prefill_scaling = run.prefill_rate() / one.prefill_rate();
        let decode_scaling = run.decode_p50() / one.decode_p50();
        let decode_growth = run.decode_p50() / base.decode_p50();
        println!(
            "{:>8} {:>8} {:>14.1} {:>10.2} {:>8.1} ms {:>8.1} ms {:>10.2} {:>10.2}",
            run.context,
            run.members,
            run.prefill_rate(),
            prefill_scaling,
            run.decode_p50(),
            run.decode_p90(),
            decode_scaling,
            decode_growth
        );
        let diff = diffs.iter().find(|(m, _)| *m == run.members && run.context == shortest).map(|&(_, d)| d);
        rows.push(serde_json::json!({
            "context": run.context,
            "members": run.members,
            "ranges": run.ranges,
            "prompt_tokens": run.prompt_tokens,
            "prefill_seconds": run.prefill_seconds(),
            "prefill_tokens_per_s": run.prefill_rate(),
            "prefill_steps": run.chunks.iter().map(|c| serde_json::json!({
                "start": c.start, "tokens": c.tokens, "seconds": c.seconds,
            })).collect::<Vec<_>>(),
            "decode_ms": run.decode_ms,
            "decode_p50_ms": run.decode_p50(),
            "decode_p90_ms": run.decode_p90(),
            "prefill_rate_vs_one_member": prefill_scaling,
            "decode_p50_vs_one_member": decode_scaling,
            "decode_p50_vs_shortest_context": decode_growth,
            "max_abs_logit_diff_vs_one_member": diff,
        }));
    }
    println!(
        "(speedup: prefill tok/s over the one-member rate of the same context (> 1 faster); x 1 member: decode p50 \
         over the one-member p50 of the same context (< 1 faster); {growth}: decode p50 over the same members' p50 at \
         context {shortest})"
    );
    for (members, diff) in diffs {
        println!(
            "logits at context {shortest}: {members} members differ from 1 by at most {diff:e} (allowed \
             {LOGIT_TOLERANCE:e})"
        );
    }
    if let Some(path) = &args.output_json {
        let json = serde_json::json!({
            "benchmark": "context",
            "model": dir.display().to_string(),
            "decode_tokens": args.decode_tokens,
            "prefill_chunk": args.prefill_chunk,
            "kv_block_size": DEFAULT_BLOCK_SIZE,
            "kv_bytes_per_position_global_layers": kv.per_token_global(),
            "threads": std::thread::available_parallelism().map_or(2, |n| n.get()),
            "seconds": elapsed.as_secs_f64(),
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
