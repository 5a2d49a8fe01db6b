//! `switchyard bench context`: decode latency per token and prefill throughput against context length, on 1, 2 and 4
//! context-parallel members, so the scaling can be read off one table.
//!
//! Everything runs in this process, with every expert local (the bench is about attention): the owner's forward pass
//! on a pool of its own (as the engine runs it), and for a group of M members, M - 1 `ShardHost`s served over real
//! gRPC on loopback, each with its own KV pool, reached through the `GrpcTransport` and `RemoteContext` the attention
//! worker uses. The group splits the context into M equal ranges on KV-block boundaries (the coordinator's
//! `assign_group` with equal rooms), the owner first. One member is the plain cache.
//!
//! A context of C positions ends with N tokens decoded one step each (fixed token ids, not sampled, so that every
//! group size computes the same thing and the logits can be compared), after C - N prompt positions. The last `tail`
//! prompt tokens are always really prefilled (the prefill rate at that depth: the marginal cost of a prefill step
//! there). The positions before them are filled one of two ways:
//! - `prefill`: a real prefill in chunks (the true end-to-end prefill rate), for the short contexts of
//!   `--real-prefill`: a 256K-token real prefill would take a day on a 2-core machine;
//! - `synthetic`: [`KvCache::append_synthetic`] writes seeded random keys and values, at the scale (per layer, RMS of
//!   keys and of values) of the real KV of the warm-up prefill, on the owner's chunked layers and on every member's
//!   range of the global layers by position, so that the group holds exactly what one member holds. The time of a
//!   step does not depend on the values of the keys, so decode and the tail's prefill cost what they would after a
//!   real prefill; a context measured both ways shows it.
//!
//! Every figure is a ratio to a row of the same run: to the same context and fill on one member (the scaling), and
//! to the shortest context on the same members and fill (the growth). At every context each group's logits (the
//! tail's last and every decode step's) must equal the one-member logits of the same fill within [`LOGIT_TOLERANCE`],
//! or the bench fails: a broken group must not produce a table.

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

/// Prompt tokens of the warm-up, whose KV gives the synthetic fill its scale.
const WARM_UP_PROMPT: usize = 512;

/// (context, fill, members): a row of the table.
type RunKey = (usize, Fill, usize);

/// Flags of `bench context`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory. Default: the built-in `small` FP8 model (made on first use, ~1.8 GB).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context lengths: positions a sequence reaches, prompt and decoded tokens together (at most the model's
    /// max_position_embeddings, 262144 for `small`). Each is measured with a synthetic fill before its tail.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384,65536,262144")]
    contexts: Vec<usize>,
    /// Context lengths also measured with a real prefill of the whole prompt (the end-to-end prefill rate, and the
    /// check that a synthetic fill costs decode and the tail what a real prefill does); the flag alone for none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "4096")]
    real_prefill: Vec<usize>,
    /// Prompt tokens really prefilled at the end of every context, after the fill: the prefill rate at that depth.
    /// Default: one prefill step (`--prefill-chunk`).
    #[arg(long)]
    tail: Option<usize>,
    /// Context-parallel group sizes; 1 (the plain cache) is the reference of every row and must be included.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    members: Vec<usize>,
    /// Tokens decoded one step each at the end of every context.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Prompt tokens per prefill step (the real prefill, and the tail if longer).
    #[arg(long, default_value_t = 2048)]
    prefill_chunk: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// Prompt tokens prefilled after the fill (`--tail`, one prefill step by default).
fn tail(args: &Args) -> usize {
    args.tail.unwrap_or(args.prefill_chunk)
}

/// How the positions before a context's tail were filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// A real prefill in chunks.
    Prefill,
    /// Seeded random keys and values of the model's scale ([`KvCache::append_synthetic`]).
    Synthetic,
}

impl Fill {
    fn name(self) -> &'static str {
        match self {
            Fill::Prefill => "prefill",
            Fill::Synthetic => "synthetic",
        }
    }
}

/// Per layer, the RMS of the keys and of the values a synthetic fill writes.
type KvScales = Vec<(f32, f32)>;

/// Seed of the synthetic keys and values (the same for every group: they must hold the same KV).
const FILL_SEED: u64 = 0x5eed_c0de_2026_1127;

/// The synthetic key and value rows of `position` in `layer`: uniform values of RMS `scales[layer]`, a function of
/// (layer, position) only.
fn synthetic_rows(scales: &KvScales, layer: usize, position: usize, key: &mut [f32], value: &mut [f32]) {
    let mut state = FILL_SEED ^ ((layer as u64) << 48) ^ position as u64;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (key_rms, value_rms) = scales.get(layer).copied().unwrap_or((1.0, 1.0));
    // Uniform on [-a, a) has RMS a / sqrt(3).
    let unit = |bits: u64| (bits >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    for (row, rms) in [(key, key_rms), (value, value_rms)] {
        let a = rms * 3f32.sqrt();
        for pair in row.chunks_mut(2) {
            let bits = next();
            for (slot, v) in pair.iter_mut().zip([bits, bits << 24]) {
                *slot = unit(v) * a;
            }
        }
    }
}

/// One prefill step's time.
struct Chunk {
    start: usize,
    tokens: usize,
    seconds: f64,
}

/// What one (context, fill, members) run measured.
struct Run {
    context: usize,
    members: usize,
    fill: Fill,
    ranges: Vec<(usize, usize)>,
    prompt_tokens: usize,
    /// Positions filled before the tail: prefilled (`chunks` before the tail's) or written synthetically.
    filled: usize,
    fill_seconds: f64,
    /// Every prefill step, the tail's last.
    chunks: Vec<Chunk>,
    tail_tokens: usize,
    decode_ms: Vec<f64>,
    /// The tail's last step's logits, then every decode step's.
    logits: Vec<f32>,
}

impl Run {
    fn tail_seconds(&self) -> f64 {
        self.chunks.iter().filter(|c| c.start >= self.filled).map(|c| c.seconds).sum()
    }

    /// Prompt tokens per second of the whole real prefill; `None` after a synthetic fill.
    fn prefill_rate(&self) -> Option<f64> {
        let seconds: f64 = self.chunks.iter().map(|c| c.seconds).sum();
        (self.fill == Fill::Prefill).then(|| self.prompt_tokens as f64 / seconds.max(1e-9))
    }

    /// Tokens per second of the tail's prefill, at the context's depth.
    fn tail_rate(&self) -> f64 {
        self.tail_tokens as f64 / self.tail_seconds().max(1e-9)
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
    /// The shard hosts, in the order of `group.ranges[1..]`.
    hosts: Vec<Arc<ShardHost>>,
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
        let mut hosts = Vec::with_capacity(members - 1);
        for member in 1..members {
            let listener = runtime.block_on(serving::bind(([127, 0, 0, 1], 0).into()))?;
            let addr = listener.local_addr().context("reading a member's address")?;
            let shard_host = Arc::new(ShardHost::new(config.clone(), KvBlockPool::unbounded(config)?));
            hosts.push(shard_host.clone());
            let host: Arc<dyn ContextService> = shard_host;
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
        ensure!(
            group.ranges[1..].iter().zip(1..).all(|(r, m)| r.worker_id == format!("member-{m}")),
            "the group's members are not in the order they were started"
        );
        Ok(Self { group, transport, servers, hosts })
    }

    /// Fills every member's range of the global layers with synthetic keys and values up to position `end`.
    fn fill(&self, end: usize, scales: &KvScales) -> Result<()> {
        for (range, host) in self.group.ranges[1..].iter().zip(&self.hosts) {
            if range.start >= end {
                continue;
            }
            let tokens = end.min(range.end) - range.start;
            host.prepare_shard(&self.group.sequence_id, OWNER, range.start, range.end, |shard| {
                shard.append_synthetic(tokens, |l, p, k, v| synthetic_rows(scales, l, p, k, v))
            })
            .with_context(|| format!("filling {}'s range {}..{}", range.worker_id, range.start, range.end))?;
        }
        Ok(())
    }

    /// The owner's view of the group, to give its cache.
    fn context(&self, config: &TextConfig, runtime: &Runtime) -> Arc<RemoteContext> {
        let transport: Arc<dyn Transport> = self.transport.clone();
        Arc::new(RemoteContext::new(self.group.clone(), config.clone(), transport, runtime.handle().clone()))
    }

    /// Releases the members' shards and stops their servers, so their KV pools are freed before the next run.
    fn stop(self, runtime: &Runtime) {
        let Self { group, transport, servers, hosts } = self;
        drop(hosts);
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

/// Fills the positions before the tail (`fill`), prefills the tail in steps and decodes the rest one step each, on
/// `members` members.
#[allow(clippy::too_many_arguments)]
fn measure(
    model: &Llama4Model,
    runtime: &Runtime,
    forward_pool: &ForwardPool<'_>,
    context: usize,
    members: usize,
    fill: Fill,
    scales: &KvScales,
    args: &Args,
) -> Result<Run> {
    let config = model.config();
    let tokens = sequence_tokens(context, config.vocab_size);
    let (prompt, decode) = tokens.split_at(context - args.decode_tokens);
    let filled = prompt.len() - tail(args).min(prompt.len());
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
        fill,
        ranges,
        prompt_tokens: prompt.len(),
        filled,
        fill_seconds: 0.0,
        chunks: Vec::new(),
        tail_tokens: prompt.len() - filled,
        decode_ms: Vec::new(),
        logits: Vec::new(),
    };
    let began = Instant::now();
    if fill == Fill::Synthetic {
        cache
            .append_synthetic(filled, |l, p, k, v| synthetic_rows(scales, l, p, k, v))
            .with_context(|| what("the owner's synthetic fill"))?;
        if let Some(group) = &group {
            group.fill(filled, scales)?;
        }
        run.fill_seconds = began.elapsed().as_secs_f64();
    }
    let (head, tail) = prompt.split_at(filled);
    let steps: Vec<(&[u32], bool)> = match fill {
        Fill::Prefill => head.chunks(args.prefill_chunk).map(|c| (c, false)).collect(),
        Fill::Synthetic => Vec::new(),
    };
    let tail_steps = tail.chunks(args.prefill_chunk).count();
    let steps =
        steps.into_iter().chain(tail.chunks(args.prefill_chunk).enumerate().map(|(i, c)| (c, i + 1 == tail_steps)));
    for (chunk, last) in steps {
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
    if fill == Fill::Prefill {
        run.fill_seconds = run.chunks.iter().filter(|c| c.start < filled).map(|c| c.seconds).sum();
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
    ensure!(
        tail(args) >= 1,
        "--tail must be at least 1: the tail's prefill gives the logits every group is checked on"
    );
    ensure!(!args.contexts.is_empty(), "--contexts lists no context length");
    ensure!(args.members.contains(&1), "--members must include 1: every row is compared with the one-member run");
    if let Some(&zero) = args.members.iter().find(|&&m| m == 0) {
        bail!("--members {zero}: a group has at least one member");
    }
    for &context in args.contexts.iter().chain(&args.real_prefill) {
        ensure!(
            context >= args.decode_tokens + tail(args),
            "context {context} is shorter than its {} decoded tokens (--decode-tokens) and the {}-token prefilled tail \
             (--tail) together",
            args.decode_tokens,
            tail(args)
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
    let longest = args.contexts.iter().chain(&args.real_prefill).copied().max().unwrap_or(0) as u64;
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
    for list in [&mut args.contexts, &mut args.real_prefill, &mut args.members] {
        list.sort_unstable();
        list.dedup();
    }
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

    // Warm-up: the first steps fault in the weights and fill caches; its KV gives the synthetic fill its scale.
    let mut warm = KvCache::in_pool(&config, KvBlockPool::unbounded(&config)?);
    let warm_tokens = sequence_tokens(WARM_UP_PROMPT + 2, config.vocab_size);
    forward_pool.forward(&model, &warm_tokens[..WARM_UP_PROMPT], &mut warm, LogitsFor::Last).context("warming up")?;
    for &token in &warm_tokens[WARM_UP_PROMPT..] {
        forward_pool.forward(&model, &[token], &mut warm, LogitsFor::Last).context("warming up")?;
    }
    let scales: KvScales = warm.layer_rms().into_iter().map(|s| s.unwrap_or((1.0, 1.0))).collect();
    drop(warm);

    let started = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    let mut diffs: Vec<(RunKey, Option<f32>)> = Vec::new();
    // Shortest first, so that a broken group stops the bench before the long runs.
    // A context measured both ways runs them back to back for each group size, so that both see the same load.
    let mut contexts: Vec<usize> = args.contexts.iter().chain(&args.real_prefill).copied().collect();
    contexts.sort_unstable();
    contexts.dedup();
    for context in contexts {
        let fills: Vec<Fill> = [(Fill::Prefill, &args.real_prefill), (Fill::Synthetic, &args.contexts)]
            .into_iter()
            .filter(|(_, list)| list.contains(&context))
            .map(|(fill, _)| fill)
            .collect();
        for (members, fill) in args.members.iter().flat_map(|&m| fills.iter().map(move |&f| (m, f))) {
            let mut run = measure(&model, &runtime, &forward_pool, context, members, fill, &scales, &args)?;
            let diff = match runs.iter().find(|r| r.context == context && r.fill == fill && r.members == 1) {
                Some(reference) if members > 1 => Some(check_logits(&run, reference)?),
                _ => None,
            };
            eprintln!(
                "context {context} ({}) on {members} member(s): fill {:.1} s, tail {:.1} tok/s, decode p50 {:.1} ms{} \
                 ({:.0} s so far)",
                fill.name(),
                run.fill_seconds,
                run.tail_rate(),
                run.decode_p50(),
                diff.map(|d| format!(", logits within {d:e} of 1 member")).unwrap_or_default(),
                started.elapsed().as_secs_f64()
            );
            diffs.push(((context, fill, members), diff));
            if members > 1 {
                run.logits = Vec::new();
            }
            runs.push(run);
        }
    }
    report(&args, &dir, &config, &runs, &diffs, &scales, started.elapsed())
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
        "at context {} ({}), {} members' logits differ from one member's by {diff:e} (allowed {LOGIT_TOLERANCE:e}): \
         the group is broken",
        run.context,
        run.fill.name(),
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
    diffs: &[(RunKey, Option<f32>)],
    scales: &KvScales,
    elapsed: Duration,
) -> Result<()> {
    let find = |context: usize, fill: Fill, members: usize| {
        runs.iter().find(|r| r.context == context && r.fill == fill && r.members == members)
    };
    let shortest = |fill: Fill| runs.iter().filter(|r| r.fill == fill).map(|r| r.context).min().unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let kv = KvBytes::of(config, Precision::F32);
    println!(
        "model {} ; {} of {} layers global: f32 KV grows {:.1} KiB per position ; prefill steps of {} tokens, the last \
         {} prompt tokens of every context prefilled after the fill ; {} decoded tokens per context ; {threads} cores \
         shared by the owner and every member ; {:.0} s",
        dir.display(),
        kv.global_layers,
        kv.global_layers + kv.chunked_layers,
        kv.per_token_global() as f64 / 1024.0,
        args.prefill_chunk,
        tail(args),
        args.decode_tokens,
        elapsed.as_secs_f64()
    );
    println!(
        "{:>8} {:>7} {:>9} {:>9} {:>9} {:>7} {:>10} {:>10} {:>7} {:>9} {:>10}",
        "context",
        "members",
        "fill",
        "prefill",
        "tail",
        "speedup",
        "decode p50",
        "decode p90",
        "x 1 mem",
        "x short",
        "logit diff"
    );
    let mut rows = Vec::new();
    for run in runs {
        let one = find(run.context, run.fill, 1).context("a one-member run is missing")?;
        let base = find(shortest(run.fill), run.fill, run.members).context("a shortest-context run is missing")?;
        let tail_scaling = run.tail_rate() / one.tail_rate();
        let decode_scaling = run.decode_p50() / one.decode_p50();
        let decode_growth = run.decode_p50() / base.decode_p50();
        let diff = diffs.iter().find(|(key, _)| *key == (run.context, run.fill, run.members)).and_then(|(_, d)| *d);
        println!(
            "{:>8} {:>7} {:>9} {:>9} {:>9.1} {:>7.2} {:>7.1} ms {:>7.1} ms {:>7.2} {:>9.2} {:>10}",
            run.context,
            run.members,
            run.fill.name(),
            run.prefill_rate().map_or("-".into(), |r| format!("{r:.1}")),
            run.tail_rate(),
            tail_scaling,
            run.decode_p50(),
            run.decode_p90(),
            decode_scaling,
            decode_growth,
            diff.map_or("-".into(), |d| format!("{d:.1e}"))
        );
        rows.push(serde_json::json!({
            "context": run.context,
            "members": run.members,
            "fill": run.fill.name(),
            "ranges": run.ranges,
            "prompt_tokens": run.prompt_tokens,
            "filled_positions": run.filled,
            "fill_seconds": run.fill_seconds,
            "tail_tokens": run.tail_tokens,
            "tail_seconds": run.tail_seconds(),
            "tail_tokens_per_s": run.tail_rate(),
            "prefill_tokens_per_s": run.prefill_rate(),
            "prefill_steps": run.chunks.iter().map(|c| serde_json::json!({
                "start": c.start, "tokens": c.tokens, "seconds": c.seconds,
            })).collect::<Vec<_>>(),
            "decode_ms": run.decode_ms,
            "decode_p50_ms": run.decode_p50(),
            "decode_p90_ms": run.decode_p90(),
            "tail_rate_vs_one_member": tail_scaling,
            "decode_p50_vs_one_member": decode_scaling,
            "decode_p50_vs_shortest_context": decode_growth,
            "max_abs_logit_diff_vs_one_member": diff,
        }));
    }
    println!(
        "(prefill: tok/s of a real prefill of the whole prompt; tail: tok/s of the last {} prompt tokens' prefill at \
         that depth; speedup: tail tok/s over one member's (> 1 faster); x 1 mem: decode p50 over one member's (< 1 \
         faster); x short: decode p50 over the same members' and fill's at the shortest context; logit diff: largest \
         |difference| from one member's logits, allowed {LOGIT_TOLERANCE:e})",
        tail(args)
    );
    let mut both_ways = Vec::new();
    for real in runs.iter().filter(|r| r.fill == Fill::Prefill) {
        if let Some(synthetic) = find(real.context, Fill::Synthetic, real.members) {
            let (decode, tail) = (synthetic.decode_p50() / real.decode_p50(), synthetic.tail_rate() / real.tail_rate());
            println!(
                "context {} on {} member(s): after a synthetic fill, decode p50 x {decode:.2} and tail tok/s x {tail:.2} \
                 of the values after a real prefill",
                real.context, real.members
            );
            both_ways.push(serde_json::json!({
                "context": real.context,
                "members": real.members,
                "synthetic_over_real_decode_p50": decode,
                "synthetic_over_real_tail_rate": tail,
            }));
        }
    }
    if let Some(path) = &args.output_json {
        let json = serde_json::json!({
            "benchmark": "context",
            "model": dir.display().to_string(),
            "decode_tokens": args.decode_tokens,
            "prefill_chunk": args.prefill_chunk,
            "tail": tail(args),
            "kv_block_size": DEFAULT_BLOCK_SIZE,
            "kv_bytes_per_position_global_layers": kv.per_token_global(),
            "synthetic_kv_rms_per_layer": scales,
            "threads": threads,
            "seconds": elapsed.as_secs_f64(),
            "rows": rows,
            "synthetic_against_real": both_ways,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
