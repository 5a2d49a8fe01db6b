//! `switchyard coordinator`: the cluster's coordinator. It campaigns for the lead; the leader places the experts on
//! the registered expert workers, rebalances them from measured loads or on request, and re-places the experts of
//! workers that are gone (`switchyard_coordinator::controller`). Every coordinator also answers `GetPlacement` from
//! the store.
//!
//! Without `--store` it hosts the cluster store in memory and serves it on its own listener, so workers join with
//! `--store http://<its address>`; the cluster then lives as long as this process. With `--store etcd://...` several
//! coordinators can run: one leads, the others take over when it dies.
//!
//! Prints exactly one line `listening on http://IP:PORT` to stdout once it serves, logs to stderr, and stops on
//! SIGTERM or Ctrl-C (resigning the lead, so a standby leads at once).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use switchyard_coordinator::controller::{Controller, ControllerOptions, GrpcExpertControl, ModelShape};
use switchyard_coordinator::service::{serve, CoordinatorService};
use switchyard_coordinator::store::{self, ClusterStore, MemoryStore, Store};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use tokio::sync::watch;

use crate::serving;

/// Flags of `coordinator`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json and safetensors): the MoE layers, expert count and expert size come from it.
    /// Default: the built-in tiny model.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// The cluster store: `etcd://HOST:PORT[,HOST:PORT...]`, or `http://HOST:PORT` for the store another coordinator
    /// serves. Default: host the store in memory and serve it on `--listen`.
    #[arg(long, env = "SWITCHYARD_STORE", value_name = "URL")]
    store: Option<String>,
    /// The cluster's name in the store.
    #[arg(long, env = "SWITCHYARD_CLUSTER", default_value = "default")]
    cluster: String,
    /// Address to serve gRPC on (port 0 picks one).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The first placement waits until this many expert workers have registered.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    expert_workers: u64,
    /// Replicas beyond one per expert in each MoE layer, given to the hottest experts.
    #[arg(long, default_value_t = 0)]
    redundant_slots: usize,
    /// Rebalance when the most loaded expert worker carries more than this many times the mean load (averaged over
    /// MoE layers).
    #[arg(long, default_value_t = 1.25)]
    rebalance_threshold: f64,
    /// Least time between two load-driven rebalances, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    rebalance_interval_ms: u64,
    /// This coordinator's id in the election and the status. Default: `c-<port>`.
    #[arg(long, env = "SWITCHYARD_COORDINATOR_ID", value_name = "NAME")]
    id: Option<String>,
    /// Lease of the candidacy, in milliseconds: a standby leads within about this after the leader dies.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    lease_ttl_ms: u64,
}

/// Runs `coordinator` until SIGTERM or Ctrl-C.
pub fn run(args: Args) -> Result<()> {
    if !(args.rebalance_threshold.is_finite() && args.rebalance_threshold >= 1.0) {
        bail!("--rebalance-threshold must be a max/mean load ratio >= 1, got {}", args.rebalance_threshold);
    }
    let dir = crate::model_dir::resolve(args.model.as_deref())?;
    let model = model_shape(&dir)?;
    serving::runtime(2)?.block_on(coordinate(args, model))
}

/// The MoE layers, expert count and bytes per expert of the checkpoint in `dir`, from its headers only.
fn model_shape(dir: &Path) -> Result<ModelShape> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)
        .with_context(|| format!("reading the model config {}", config_path.display()))?;
    let text = &config.text;
    if text.moe_layers.is_empty() || text.num_local_experts == 0 {
        bail!("the model in {} has no routed experts: there is nothing to coordinate", dir.display());
    }
    let checkpoint = Checkpoint::open(dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    let all = switchyard_expert_worker::all_experts_bytes(&checkpoint, text)
        .with_context(|| format!("reading the expert sizes of {}", dir.display()))?;
    // Experts of one checkpoint have one size; the mean keeps a worker whose budget is `all` able to hold them all.
    let replicas = (text.moe_layers.len() * text.num_local_experts) as u64;
    let moe_layers = text
        .moe_layers
        .iter()
        .map(|&l| u32::try_from(l))
        .collect::<Result<Vec<u32>, _>>()
        .context("MoE layer index out of range")?;
    Ok(ModelShape {
        moe_layers,
        experts: u32::try_from(text.num_local_experts).context("expert count out of range")?,
        bytes_per_expert: all / replicas,
    })
}

async fn coordinate(args: Args, model: ModelShape) -> Result<()> {
    let listener = serving::bind(args.listen).await?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let id = args.id.clone().unwrap_or_else(|| format!("c-{}", addr.port()));
    let (store, hosted): (Arc<dyn Store>, Option<Arc<dyn Store>>) = match &args.store {
        Some(url) => {
            let store = store::connect(url).await.with_context(|| format!("connecting to the cluster store {url}"))?;
            (store, None)
        }
        None => {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            (Arc::clone(&store), Some(store))
        }
    };
    let cluster = ClusterStore::new(store, &args.cluster).context("opening the cluster state")?;
    let options = ControllerOptions {
        expert_workers: args.expert_workers as usize,
        redundant_slots: args.redundant_slots,
        rebalance_threshold: args.rebalance_threshold,
        rebalance_interval: Duration::from_millis(args.rebalance_interval_ms),
        lease_ttl: Duration::from_millis(args.lease_ttl_ms),
        ..ControllerOptions::new(id.clone(), model.clone())
    };
    let controller = Controller::new(cluster.clone(), options, Arc::new(GrpcExpertControl::default()))
        .context("configuring the coordinator")?;
    tracing::info!(
        coordinator = %id, cluster = %args.cluster, moe_layers = model.moe_layers.len(), experts = model.experts,
        bytes_per_expert = model.bytes_per_expert, store = args.store.as_deref().unwrap_or("hosted in memory"),
        "starting"
    );

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|&s| s).await;
    };
    // Connections made between this line and the server's first poll wait in the listener's backlog.
    serving::announce(&listener)?;
    let mut server =
        tokio::spawn(serve(CoordinatorService::new(cluster), hosted, listener, until_stopped(stopped.clone())));
    let leader = tokio::spawn(controller.run(until_stopped(stopped)));
    let served_early = tokio::select! {
        _ = serving::shutdown_signal() => None,
        served = &mut server => Some(served),
    };
    let _ = stop.send(true);
    // The controller resigns first, while the store it may be hosting is still served.
    if let Err(e) = leader.await {
        tracing::warn!("the coordinator's leader loop ended abnormally: {e}");
    }
    let served = match served_early {
        Some(served) => served,
        None => server.await,
    };
    served.context("the gRPC server task failed")?.context("serving the coordinator")?;
    Ok(())
}
