//! `switchyard attention-worker`: serve generation with the routed experts on expert workers.
//!
//! Binds first (a port in use fails before a long load), loads only the non-expert weights, gets the placement from
//! the coordinator (or builds it from the expert workers' own status), connects the dispatch transport, then prints
//! exactly one line `listening on http://IP:PORT` to stdout once serving (what `switchyard up` waits for) and logs to
//! stderr only. Stops gracefully on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use switchyard_attention_worker::{
    fetch_placement, load_tokenizer, placement_from_expert_workers, serve, Engine, EngineOptions, GenerationService,
    RemoteExperts, RoutingTable,
};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::{ExpertSelection, Llama4Model, LoadOptions};
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::{WireDtype, WireFormat};

/// How long to wait for the coordinator or the expert workers to answer while they start.
const PEER_PATIENCE: Duration = Duration::from_secs(10);

/// Flags of `switchyard attention-worker`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json). Default: the built-in tiny model.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Coordinator endpoint to get the placement from, e.g. `http://127.0.0.1:7000`.
    #[arg(
        long,
        env = "SWITCHYARD_COORDINATOR",
        conflicts_with = "expert_workers",
        required_unless_present = "expert_workers"
    )]
    coordinator: Option<String>,
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
    /// Requests waiting for a slot at most; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SWITCHYARD_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
}

/// Runs the attention worker until SIGTERM or Ctrl-C.
pub fn run(args: Args) -> Result<()> {
    if args.combine == WireDtype::Fp8E4m3 {
        bail!("--combine fp8 is not supported: expert outputs travel as f32 or bf16");
    }
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    // The runtime moves bytes and answers clients; the forward pass runs on the engine's own threads.
    let runtime = crate::serving::runtime(2)?;
    runtime.block_on(serve_until_signal(args))
}

async fn serve_until_signal(args: Args) -> Result<()> {
    let listener = crate::serving::bind(args.listen).await.context("starting the attention worker")?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let worker_id = args.worker_id.clone().unwrap_or_else(|| format!("aw-{}", addr.port()));
    let model_dir = crate::model_dir::resolve(args.model.as_deref())?;

    let (config, mut model) = {
        let dir = model_dir.clone();
        tokio::task::spawn_blocking(move || load_without_experts(&dir)).await.context("the loading task failed")??
    };

    let placement = match (&args.coordinator, &args.expert_workers) {
        (Some(coordinator), _) => fetch_placement(coordinator, PEER_PATIENCE)
            .await
            .with_context(|| format!("getting the placement from the coordinator at {coordinator}"))?,
        (None, Some(workers)) => {
            let workers = workers.iter().map(|w| parse_expert_worker(w)).collect::<Result<Vec<_>>>()?;
            placement_from_expert_workers(&workers, PEER_PATIENCE)
                .await
                .context("building the placement from the expert workers' status")?
        }
        (None, None) => bail!("give --coordinator or --expert-workers"),
    };
    let routing = Arc::new(RoutingTable::new(&placement, &config.text).context("checking the placement")?);
    tracing::info!(
        epoch = routing.epoch(),
        expert_workers = routing.workers().len(),
        "placement: {}",
        routing.workers().iter().map(|w| format!("{}={}", w.id, w.endpoint)).collect::<Vec<_>>().join(",")
    );

    let wire = WireFormat { dispatch: args.wire, combine: args.combine };
    let transport = GrpcTransport::new(wire, worker_id.clone());
    for worker in routing.workers() {
        transport.add_worker(worker.id.clone(), worker.endpoint.clone());
    }
    let remote = RemoteExperts::new(routing, Arc::new(transport), tokio::runtime::Handle::current(), worker_id.clone());
    model.set_routed_experts(Arc::new(remote));

    let options = EngineOptions {
        max_batch: args.max_batch,
        max_waiting: args.max_waiting,
        micro_batches: usize::from(args.micro_batches),
        threads: 0,
    };
    let engine = Arc::new(Engine::start(Arc::new(model), options).context("starting the engine")?);
    let tokenizer = load_tokenizer(&model_dir)?;
    if tokenizer.is_none() {
        tracing::warn!(model = %model_dir.display(), "no tokenizer.json: only token-id prompts are served");
    }
    let service = GenerationService::new(engine, tokenizer, worker_id.clone());
    crate::serving::announce(&listener)?;
    let server = tokio::spawn(serve(listener, service, crate::serving::shutdown_signal()));
    server
        .await
        .context("the server task failed")?
        .with_context(|| format!("attention worker {worker_id} on {addr}"))?;
    tracing::info!(%worker_id, "attention worker stopped");
    Ok(())
}

/// Loads the model's non-expert weights only, logging how much of the checkpoint that read.
fn load_without_experts(dir: &Path) -> Result<(ModelConfig, Llama4Model)> {
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
    Ok((config, model))
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
