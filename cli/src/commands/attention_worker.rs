//! `switchyard attention-worker`: serve generation with the routed experts on expert workers.
//!
//! Binds first (a port in use fails before a long load), loads only the non-expert weights, gets the placement,
//! connects the dispatch transport, then prints exactly one line `listening on http://IP:PORT` to stdout once serving
//! (what `switchyard up` waits for) and logs to stderr only. Stops gracefully on SIGTERM or Ctrl-C.
//!
//! With `--store URL` it is a member of a coordinated cluster: it registers in the cluster store (role Attention,
//! with its checkpoint's fingerprint: a cluster serving another checkpoint refuses it and the process exits with that
//! error), waits for the coordinator's first placement, then follows the placement the coordinator publishes, reports
//! the routed load, and lets a step whose expert worker was lost wait up to `--recovery-timeout-ms` for the
//! re-placement. With `--expert-workers` instead, the placement is what those workers hold, fixed for the process.
//!
//! With `--dispatch-transport nccl` (a `cuda` build, with `--store`) its routed tokens travel through an NCCL
//! communicator of every attention and expert worker ([`CollectiveArgs`]): once in the cluster, it joins the
//! communicator through the coordinator and makes each MoE layer step one dispatch and one combine exchange, in
//! lockstep with the other ranks: its engine runs on ticks of one forward pass per micro-batch, empty or not
//! ([`EngineOptions::lockstep`]). After its server drained, its engine ticks on, empty, until every attention rank
//! drained, then leaves the communicator in the same exchange as the others ([`Engine::drain`] with a
//! [`CollectiveLeave`]: the agreement travels in the exchanges).
//!
//! With `--device cuda:N` its whole forward pass runs on that GPU (`GpuModel`: dense weights as `--dense-dtype`, the
//! KV cache in a device arena of `--kv-memory` holding `--kv-dtype` keys and values); the routed experts stay on the
//! expert workers. Context parallelism works as on the CPU: as owner the GPU merges the members' partials with its
//! own, as member the worker keeps its shards in the same arena (`ShardHost::served_by`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use switchyard_attention_worker::{
    http_router, placement_from_expert_workers, serve, serve_http, ClusterLink, ClusterOptions, CollectiveLeave,
    ConnectWorker, ContextGroups, Engine, EngineOptions, ExpertWorkerRoute, GenerationService, HttpOptions,
    LockstepOptions, RemoteExperts, RoutingTable, ShardHost, StoreContextGroups, TextCodec,
};
use switchyard_kernels::device::check_device;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::{
    DenseDtype, Device, ExpertSelection, ForwardPass, GpuModel, GpuModelOptions, KvBlockPool, KvDtype, Llama4Model,
    LoadOptions,
};
use switchyard_transport::collective::{CollectiveTransport, RankRole};
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::{Transport, WireDtype, WireFormat};

use crate::collective::{CollectiveArgs, CommunicatorPlan};

/// How long to wait for the expert workers to answer while they start (`--expert-workers`).
const PEER_PATIENCE: Duration = Duration::from_secs(10);

/// The KV cache of a GPU attention worker when `--kv-memory` is not given: a bounded arena, allocated up front
/// (the CPU worker's default, room for every sequence at the full context, is only reserved as it is used).
const DEFAULT_GPU_KV_MEMORY: u64 = 4 << 30;

/// Flags of `switchyard attention-worker`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json). Default: the built-in tiny model.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// The cluster store to register in and follow the coordinator's placement through: `etcd://HOST:PORT[,...]`,
    /// or `http://HOST:PORT` for the store a coordinator serves.
    #[arg(
        long,
        env = "SWITCHYARD_STORE",
        value_name = "URL",
        conflicts_with = "expert_workers",
        required_unless_present = "expert_workers"
    )]
    store: Option<String>,
    /// The cluster's name in the store.
    #[arg(long, env = "SWITCHYARD_CLUSTER", default_value = "default", requires = "store")]
    cluster: String,
    /// Lease of the cluster membership, in milliseconds: the coordinator sees a dead worker leave within about this.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..), requires = "store")]
    lease_ttl_ms: u64,
    /// How often to publish the routed-token load the coordinator balances by, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..), requires = "store")]
    load_report_ms: u64,
    /// How long a step whose experts no reachable expert worker holds waits for the coordinator to re-place them,
    /// in milliseconds (0 fails such a step at once). Store mode only: without a coordinator nothing re-places.
    #[arg(long, default_value_t = 30_000, requires = "store")]
    recovery_timeout_ms: u64,
    /// How long to wait at start for the coordinator's first placement, in milliseconds.
    #[arg(long, default_value_t = 300_000, requires = "store")]
    placement_timeout_ms: u64,
    /// The machine this worker runs on. Default: the hostname.
    #[arg(long, env = "SWITCHYARD_NODE")]
    node: Option<String>,
    /// The endpoint clients reach this worker at, registered in the cluster. Default: `http://` and the bound
    /// address (set it when listening on 0.0.0.0 or behind NAT).
    #[arg(long, env = "SWITCHYARD_ADVERTISE", value_name = "URL")]
    advertise: Option<String>,
    /// Without a coordinator: the expert workers, as `ID=URL` (or `URL`, taking the id the worker reports), comma
    /// separated. Each is asked which experts it holds.
    #[arg(long, env = "SWITCHYARD_EXPERT_WORKERS", value_delimiter = ',', value_name = "ID=URL,...")]
    expert_workers: Option<Vec<String>>,
    /// Address to serve gRPC on (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// This worker's id (sent with every dispatch). Default: `aw-<port>`.
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    worker_id: Option<String>,
    /// Encoding of expert inputs on the wire: f32, bf16 or fp8 (E4M3 with per-token scales).
    #[arg(long, env = "SWITCHYARD_WIRE", default_value = "f32")]
    wire: WireDtype,
    /// Encoding of expert outputs on the wire: f32 or bf16.
    #[arg(long, env = "SWITCHYARD_COMBINE", default_value = "f32")]
    combine: WireDtype,
    /// 2 splits the batch into two micro-batches whose steps overlap (one's attention with the other's dispatch).
    #[arg(long, env = "SWITCHYARD_MICRO_BATCHES", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    micro_batches: u8,
    /// Sequences generated at once at most.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,
    /// Requests waiting for a slot or for KV blocks at most; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SWITCHYARD_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
    /// Tokens one step computes at most: one per decoding sequence, the rest for chunks of prompts (chunked prefill
    /// keeps a long prompt from stalling the others' decoding). At least --max-batch.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Positions per block of the paged KV cache.
    #[arg(long, env = "SWITCHYARD_KV_BLOCK_SIZE", default_value_t = switchyard_model::kv::DEFAULT_BLOCK_SIZE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    kv_block_size: usize,
    /// Memory of the paged KV cache: bytes, or with a K/M/G/T or KiB/MiB/GiB/TiB suffix. When sequences need more,
    /// new requests wait and the newest running sequence is preempted (recomputed later). Default: room for
    /// --max-batch sequences at the model's full context, taken as it is used.
    #[arg(long, env = "SWITCHYARD_KV_MEMORY", value_name = "BYTES", value_parser = crate::commands::expert_worker::parse_byte_size)]
    kv_memory: Option<u64>,
    /// Also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health,
    /// /metrics) on this address.
    #[arg(long, env = "SWITCHYARD_HTTP", value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Bearer token the HTTP API's /v1 routes want (health and metrics stay open).
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true, requires = "http")]
    api_key: Option<String>,
    /// Where the forward pass runs: `cpu`, or `cuda:N` for the whole attention side (attention over the paged KV
    /// cache, norms, RoPE, router, dense layers, shared expert) on that GPU. A build without the `cuda` feature or a
    /// machine without the GPU is refused at start, naming what is missing.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: Device,
    /// Element type of the dense weights on the GPU (`bf16`, the default, or `f32`). Only with `--device cuda:N`.
    #[arg(long, env = "SWITCHYARD_DENSE_DTYPE")]
    dense_dtype: Option<DenseDtype>,
    /// Element type of the KV cache on the GPU (`bf16`, the default: twice the tokens of `f32` in --kv-memory; or
    /// `f32`). Only with `--device cuda:N` (the CPU's cache is f32).
    #[arg(long, env = "SWITCHYARD_KV_DTYPE")]
    kv_dtype: Option<KvDtype>,
    #[command(flatten)]
    collective: CollectiveArgs,
}

/// Runs the attention worker until SIGTERM or Ctrl-C.
pub fn run(args: Args) -> Result<()> {
    if args.combine == WireDtype::Fp8E4m3 {
        bail!("--combine fp8 is not supported: expert outputs travel as f32 or bf16");
    }
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    // Before anything is bound or loaded: a GPU that cannot be used is the operator's first thing to know.
    check_device(&args.device).with_context(|| format!("--device {}", args.device))?;
    if args.dense_dtype.is_some() && args.device == Device::Cpu {
        bail!("--dense-dtype chooses the GPU's dense weights: it needs --device cuda:N");
    }
    if args.kv_dtype.is_some() && args.device == Device::Cpu {
        bail!("--kv-dtype chooses the GPU's KV cache element type: it needs --device cuda:N (the CPU's cache is f32)");
    }
    // The runtime moves bytes and answers clients; the forward pass runs on the engine's own threads.
    let runtime = crate::serving::runtime(2)?;
    runtime.block_on(serve_until_signal(args))
}

async fn serve_until_signal(args: Args) -> Result<()> {
    let plan = args.collective.plan(RankRole::Attention, args.worker_id.as_deref(), args.store.as_deref())?;
    let listener = crate::serving::bind(args.listen).await.context("starting the attention worker")?;
    let http_listener = match args.http {
        Some(addr) => Some(crate::serving::bind(addr).await.context("starting the attention worker's HTTP API")?),
        None => None,
    };
    let addr = listener.local_addr().context("reading the bound address")?;
    let worker_id = match &plan {
        Some(plan) => plan.worker_id.clone(),
        None => args.worker_id.clone().unwrap_or_else(|| format!("aw-{}", addr.port())),
    };
    let model_dir = crate::model_dir::resolve(args.model.as_deref())?;

    let store_mode = args.store.is_some();
    let (config, model, fingerprint) = {
        let dir = model_dir.clone();
        tokio::task::spawn_blocking(move || load_without_experts(&dir, store_mode))
            .await
            .context("the loading task failed")??
    };

    let wire = WireFormat { dispatch: args.wire, combine: args.combine };
    let transport = Arc::new(GrpcTransport::new(wire, worker_id.clone()));
    let connect: ConnectWorker = {
        let transport = Arc::clone(&transport);
        Arc::new(move |worker: &ExpertWorkerRoute| {
            transport.add_worker(worker.id.clone(), worker.endpoint.clone());
        })
    };
    let on_gpu = args.device != Device::Cpu;
    let kv_memory = if on_gpu { Some(args.kv_memory.unwrap_or(DEFAULT_GPU_KV_MEMORY)) } else { args.kv_memory };
    // The CPU's cache is f32; a GPU's arena holds --kv-dtype (run refused --kv-dtype on the CPU).
    let kv_dtype = if on_gpu { args.kv_dtype.unwrap_or_default() } else { KvDtype::F32 };
    let kv_blocks = kv_memory
        .map(|bytes| KvBlockPool::blocks_in_bytes_for_dtype(&config.text, args.kv_block_size, bytes, kv_dtype));
    let mut options = EngineOptions {
        max_batch: args.max_batch,
        max_waiting: args.max_waiting,
        max_batch_tokens: args.max_batch_tokens,
        kv_block_size: args.kv_block_size,
        kv_blocks,
        micro_batches: usize::from(args.micro_batches),
        threads: 0,
        lockstep: None,
    };
    let kv_memory_bytes = options.kv_blocks_for(&config.text) as u64
        * KvBlockPool::block_bytes_for_dtype(&config.text, args.kv_block_size, kv_dtype);
    // The GPU copy is made before joining the cluster: a long upload, or a GPU without room, fails before this worker
    // counts as serving. The host copy then goes.
    let model = if on_gpu {
        let gpu_options = GpuModelOptions {
            dense_dtype: args.dense_dtype.unwrap_or_default(),
            kv_blocks: options.kv_blocks_for(&config.text),
            block_size: args.kv_block_size,
            kv_dtype,
        };
        let device = args.device;
        let uploaded = tokio::task::spawn_blocking(move || {
            let uploaded = GpuModel::upload(&model, device, &gpu_options);
            drop(model);
            uploaded
        })
        .await
        .context("the GPU upload task failed")?
        .with_context(|| format!("copying the model to {device}"))?;
        tracing::info!(
            device = %args.device,
            gpu = uploaded.device_name(),
            dense_dtype = %gpu_options.dense_dtype,
            weight_bytes = uploaded.weight_bytes(),
            kv_blocks = gpu_options.kv_blocks,
            kv_dtype = %gpu_options.kv_dtype,
            kv_bytes = uploaded.kv_bytes(),
            "the attention side runs on the GPU"
        );
        ServingModel::Gpu(Box::new(uploaded))
    } else {
        ServingModel::Cpu(Box::new(model))
    };
    let endpoint = args.advertise.clone().unwrap_or_else(|| format!("http://{addr}"));
    let (routing, link) = match (&args.store, &args.expert_workers) {
        (Some(url), _) => {
            let cluster_options = ClusterOptions {
                cluster: args.cluster.clone(),
                worker_id: worker_id.clone(),
                endpoint: endpoint.clone(),
                node: args.node.clone().unwrap_or_else(crate::serving::hostname),
                device: args.device.to_string(),
                checkpoint_hash: fingerprint.unwrap_or_default(),
                lease_ttl: Duration::from_millis(args.lease_ttl_ms),
                load_report: Duration::from_millis(args.load_report_ms),
                kv_memory_bytes,
                kv_dtype,
            };
            let patience = Duration::from_millis(args.placement_timeout_ms);
            let (routing, link) = tokio::select! {
                joined = join_cluster(url, cluster_options, &config, patience) => joined.with_context(|| {
                    format!("attention worker {worker_id} joining cluster {} in the store {url}", args.cluster)
                })?,
                () = crate::serving::shutdown_signal() => {
                    tracing::info!(%worker_id, "stopped before the first placement");
                    return Ok(());
                }
            };
            (routing, Some(link))
        }
        (None, Some(workers)) => {
            let workers = workers.iter().map(|w| parse_expert_worker(w)).collect::<Result<Vec<_>>>()?;
            let placement = placement_from_expert_workers(&workers, PEER_PATIENCE)
                .await
                .context("building the placement from the expert workers' status")?;
            (RoutingTable::new(&placement, &config.text).context("checking the placement")?, None)
        }
        (None, None) => bail!("give --store or --expert-workers"),
    };
    tracing::info!(
        epoch = routing.epoch(),
        expert_workers = routing.workers().len(),
        "placement: {}",
        routing.workers().iter().map(|w| format!("{}={}", w.id, w.endpoint)).collect::<Vec<_>>().join(",")
    );
    for worker in routing.workers() {
        connect(worker);
    }
    let recovery_timeout =
        if link.is_some() { Duration::from_millis(args.recovery_timeout_ms) } else { Duration::ZERO };
    // Context parallelism between attention workers stays on gRPC; only the routed experts move to the communicator.
    let collective = match (&plan, &link) {
        (Some(plan), Some(link)) => Some(join_communicator(plan, link.lease(), wire, &routing).await?),
        _ => None,
    };
    let dispatch: Arc<dyn Transport> = match &collective {
        Some(collective) => {
            // Every attention rank makes the same steps, whatever its traffic: one forward pass per micro-batch a tick.
            // Said to the other attention ranks in the first step, before the engine's first tick: ranks whose ticks
            // differ (another --micro-batches) are refused there, naming both.
            options.lockstep = Some(LockstepOptions::default());
            collective.set_steps_per_tick(options.steps_per_tick(&config.text));
            collective.clone()
        }
        None => transport.clone(),
    };
    let remote = Arc::new(
        RemoteExperts::new(Arc::new(routing), dispatch, tokio::runtime::Handle::current(), worker_id.clone())
            .with_recovery_timeout(recovery_timeout)
            .with_wire(wire),
    );
    let forward = model.with_routed_experts(remote.clone());
    let link = link.map(|mut link| {
        link.follow(remote, &config.text, connect);
        link
    });

    // Sequences too long for this worker's KV are spread over the cluster's attention workers (with a store), on the
    // CPU or the GPU alike: the model computes both the owner's merge and a member's partials (in its device arena).
    let context_groups = link.as_ref().map(|link| {
        Arc::new(StoreContextGroups {
            cluster: link.cluster().clone(),
            lease: link.lease(),
            worker_id: worker_id.clone(),
            endpoint: endpoint.clone(),
            config: config.text.clone(),
            block_size: args.kv_block_size,
            transport: transport.clone(),
            runtime: tokio::runtime::Handle::current(),
        }) as Arc<dyn ContextGroups>
    });
    let engine =
        Arc::new(Engine::start_with_context(forward.clone(), options, context_groups).context("starting the engine")?);
    let shards = link.is_some().then(|| Arc::new(ShardHost::served_by(forward, engine.kv_pool().clone())));
    let text = TextCodec::load(&model_dir)?;
    if text.is_none() {
        tracing::warn!(model = %model_dir.display(), "no tokenizer.json: only token-id prompts are served");
    }
    let tokenizer = text.as_ref().map(|t| t.tokenizer.clone());
    let http = http_listener.map(|http_listener| {
        let options = HttpOptions {
            model_name: model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            api_key: args.api_key.clone(),
            worker_id: worker_id.clone(),
        };
        let router = http_router(engine.clone(), text, options);
        if let Ok(addr) = http_listener.local_addr() {
            tracing::info!(%worker_id, "OpenAI-compatible HTTP API on http://{addr}");
        }
        tokio::spawn(serve_http(http_listener, router, stop_serving(collective.clone())))
    });
    let drain = collective.as_ref().map(|_| engine.clone());
    let service = GenerationService::new(engine, tokenizer, worker_id.clone());
    crate::serving::announce(&listener)?;
    let server = tokio::spawn(serve(listener, service, shards, stop_serving(collective.clone())));
    let served = server.await.context("the server task failed")?;
    if let Some(http) = http {
        http.await.context("the HTTP server task failed")?.context("the HTTP API")?;
    }
    if let (Some(collective), Some(engine)) = (&collective, drain) {
        // The engine ticks on, empty, until every attention rank drained (they agree on the last tick through the
        // exchanges), then leaves in the same exchange as the others. That lasts until the last rank is stopped: a
        // second signal gives up waiting, and the ranks still serving then fail their next step.
        tracing::info!(%worker_id, "drained; stepping until every attention rank drained, then leaving the communicator");
        let leave = Arc::new(CollectiveLeave::new(collective.clone(), tokio::runtime::Handle::current()));
        let drained = tokio::task::spawn_blocking(move || engine.drain(Some(leave)));
        tokio::select! {
            drained = drained => match drained {
                Ok(Ok(())) => tracing::info!(%worker_id, "left the NCCL communicator"),
                Ok(Err(error)) => tracing::warn!(%worker_id, %error, "leaving the NCCL communicator failed"),
                Err(error) => tracing::warn!(%worker_id, %error, "the engine's drain failed"),
            },
            () = crate::serving::shutdown_signal() => tracing::warn!(
                %worker_id,
                "stopped again before every attention rank drained: leaving without them (their next step fails)"
            ),
        }
    }
    // Left only once the server has drained: until then its requests route with the placement the coordinator
    // counts on this worker having adopted.
    if let Some(link) = link {
        let patience = Duration::from_millis(args.lease_ttl_ms);
        match tokio::time::timeout(patience, link.leave()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%worker_id, %error, "could not leave the cluster; the lease will lapse"),
            Err(_) => tracing::warn!(%worker_id, "the store did not answer the leave; the lease will lapse"),
        }
    }
    served.with_context(|| format!("attention worker {worker_id} on {addr}"))?;
    if let Some(failure) = collective.as_ref().and_then(|collective| collective.failure()) {
        bail!(
            "attention worker {worker_id}: the NCCL communicator failed ({failure}); it cannot recover: restart every \
             rank of the deployment for a new one"
        );
    }
    tracing::info!(%worker_id, "attention worker stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C, or when the NCCL communicator (if any) failed: a failed communicator never recovers,
/// so the worker stops serving (and exits with the error) rather than failing every request from then on.
async fn stop_serving(collective: Option<Arc<CollectiveTransport>>) {
    let Some(collective) = collective else {
        return crate::serving::shutdown_signal().await;
    };
    tokio::select! {
        () = crate::serving::shutdown_signal() => {}
        failure = collective.failed() => {
            tracing::error!(%failure, "the NCCL communicator failed: stopping (every rank needs a new one)");
        }
    }
}

/// The model a worker computes with: on the CPU, or copied to a GPU (the host copy gone).
enum ServingModel {
    Cpu(Box<Llama4Model>),
    Gpu(Box<GpuModel>),
}

impl ServingModel {
    /// The model with its routed experts computed by `routed`, ready for the engine.
    fn with_routed_experts(self, routed: Arc<RemoteExperts>) -> Arc<dyn ForwardPass> {
        match self {
            ServingModel::Cpu(mut model) => {
                model.set_routed_experts(routed);
                Arc::new(*model)
            }
            ServingModel::Gpu(mut model) => {
                model.set_routed_experts(routed);
                Arc::new(*model)
            }
        }
    }
}

/// Joins the NCCL communicator of `plan` (under the cluster `lease`) and makes this worker's attention rank of it,
/// after checking that every expert worker `routing` dispatches to is an expert rank of the communicator.
async fn join_communicator(
    plan: &CommunicatorPlan,
    lease: switchyard_coordinator::store::LeaseId,
    wire: WireFormat,
    routing: &RoutingTable,
) -> Result<Arc<CollectiveTransport>> {
    for worker in routing.workers() {
        let rank = plan.layout.rank_of(&worker.id);
        if rank.and_then(|rank| plan.layout.role(rank)) != Some(RankRole::Expert) {
            bail!(
                "expert worker {} of placement epoch {} is not an expert rank of --rank-layout: every expert worker \
                 of an NCCL deployment must be in the communicator",
                worker.id,
                routing.epoch()
            );
        }
    }
    let collective = plan.join(lease).await?;
    let transport = CollectiveTransport::new(collective, plan.layout.clone(), wire)
        .context("making the attention rank of the communicator")?
        .with_step_timeout(plan.step_timeout);
    Ok(Arc::new(transport))
}

/// Connects to the store at `url`, registers the worker and waits up to `patience` for the coordinator's first
/// placement, returning its routing table and the link (not following yet).
async fn join_cluster(
    url: &str,
    options: ClusterOptions,
    config: &ModelConfig,
    patience: Duration,
) -> Result<(RoutingTable, ClusterLink)> {
    let store = switchyard_coordinator::store::connect(url).await.context("connecting to the cluster store")?;
    let link = ClusterLink::join(store, options).await.context("registering in the cluster")?;
    tracing::info!(lease = %link.lease(), "joined the cluster; waiting for the coordinator's placement");
    let placement = link.wait_for_placement(patience).await?;
    let routing = RoutingTable::from_placement(&placement, &config.text)
        .with_context(|| format!("checking the coordinator's placement epoch {}", placement.epoch))?;
    Ok((routing, link))
}

/// Loads the model's non-expert weights only, logging how much of the checkpoint that read, and (for a cluster
/// member) fingerprints the checkpoint.
fn load_without_experts(dir: &Path, fingerprint: bool) -> Result<(ModelConfig, Llama4Model, Option<String>)> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)
        .with_context(|| format!("reading the model config {}", config_path.display()))?;
    let checkpoint = Checkpoint::open(dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    let options = LoadOptions { experts: ExpertSelection::None, ..LoadOptions::default() };
    let model = Llama4Model::load(&checkpoint, &config, &options, &mut |_, _| {})
        .with_context(|| format!("loading the non-expert weights in {}", dir.display()))?;
    let checkpoint_bytes: u64 = checkpoint.tensors().map(|t| t.range.len() as u64).sum();
    tracing::info!(
        model = %dir.display(),
        checkpoint_bytes_read = checkpoint.ledger().bytes_read(),
        checkpoint_bytes,
        "non-expert weights loaded"
    );
    let fingerprint = fingerprint
        .then(|| checkpoint.fingerprint())
        .transpose()
        .with_context(|| format!("fingerprinting the checkpoint in {}", dir.display()))?;
    Ok((config, model, fingerprint))
}

/// `ID=URL` or `URL` (the id is then the one the worker reports).
fn parse_expert_worker(text: &str) -> Result<(String, String)> {
    let (id, endpoint) = match text.split_once('=') {
        Some((id, endpoint)) => (id.trim(), endpoint.trim()),
        None => ("", text.trim()),
    };
    if endpoint.is_empty() {
        bail!("--expert-workers entry {text:?} has no endpoint: expected ID=URL");
    }
    let endpoint = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    Ok((id.to_string(), endpoint))
}
