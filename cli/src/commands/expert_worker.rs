//! `switchyard expert-worker`: serve a subset of the routed experts over gRPC.
//!
//! Binds first (a port in use fails before a long load), loads only the experts of `--experts`, then prints exactly
//! one line `listening on http://IP:PORT` to stdout once serving (what `switchyard up` waits for) and logs to stderr
//! only. Stops gracefully on SIGTERM or Ctrl-C.
//!
//! With `--store URL` it is a member of a coordinated cluster: once serving, it registers in the cluster store (role
//! Expert, its endpoint, node, memory budget and checkpoint fingerprint) under a lease it keeps alive, and holds what
//! the coordinator loads into it (nothing at start unless `--experts` says otherwise). A registration that fails (the
//! cluster serves another checkpoint, the store stays unreachable) ends the process with an error. On SIGTERM it
//! leaves the cluster (revokes its lease) before it stops serving, so the coordinator moves its experts at once.
//!
//! With `--dispatch-transport nccl` (a `cuda` build, with `--store`) it is also an expert rank of an NCCL
//! communicator (`crate::collective`, shared with `switchyard attention-worker`): once registered, it joins the
//! communicator through the coordinator and serves the attention ranks' steps (`serve_expert_rank`) beside its gRPC
//! endpoint, which still answers status and placement calls. A communicator that fails ends the process with the
//! error: it cannot be put back in step.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use switchyard_coordinator::membership::Registration;
use switchyard_expert_worker::{all_experts_bytes, join_cluster, serve, ExpertSpec, ExpertWorker, WorkerOptions};
use switchyard_model::{ActivationPrecision, Device};
use switchyard_transport::collective::{serve_expert_rank, ExpertRankSummary, RankRole};
use switchyard_transport::{ExpertService, TransportError};

use crate::collective::CollectiveArgs;
use crate::serving;

/// Flags of `switchyard expert-worker`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json and safetensors). Default: the built-in tiny model.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Experts to hold at start: `all`, `none`, a list for every MoE layer like `0-3,8`, or per decoder layer like
    /// `1:0-3;3:4-7`. Required without `--store`; with it the default is none (the coordinator assigns experts).
    #[arg(long, env = "SWITCHYARD_EXPERTS", value_name = "SPEC", required_unless_present = "store")]
    experts: Option<ExpertSpec>,
    /// Address to serve gRPC on (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The endpoint other processes reach this worker at, registered in the cluster. Default: `http://` and the
    /// bound address (set it when listening on 0.0.0.0 or behind NAT).
    #[arg(long, env = "SWITCHYARD_ADVERTISE", value_name = "URL")]
    advertise: Option<String>,
    /// This worker's id in the placement and the cluster. Default: `ew-<port>`.
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    worker_id: Option<String>,
    /// Placement epoch dispatches must carry at start (the coordinator widens the accepted window as it moves
    /// experts).
    #[arg(long, env = "SWITCHYARD_PLACEMENT_EPOCH", default_value_t = 0)]
    placement_epoch: u64,
    /// Quantise expert activations per token to FP8 (E4M3) before FP8 weights, as the FP8 checkpoint describes.
    #[arg(long, env = "SWITCHYARD_FP8_ACTIVATIONS")]
    fp8_activations: bool,
    /// Where the experts compute: `cpu`, or `cuda:N` (FP8 checkpoints; the experts' weights stay on the GPU and
    /// activations go to FP8 per token). Registered in the cluster as the worker's device.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: Device,
    /// The cluster store to register in: `etcd://HOST:PORT[,HOST:PORT...]`, or `http://HOST:PORT` for the store a
    /// coordinator serves. Without it the worker serves its `--experts` alone, with no coordinator.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The cluster's name in the store.
    #[arg(long, default_value = "default", requires = "store")]
    cluster: String,
    /// Memory this worker offers for expert weights: bytes, or with a K/M/G/T (powers of 1000) or KiB/MiB/GiB/TiB
    /// suffix. Default: every routed expert of the checkpoint (it can hold them all).
    #[arg(long, value_name = "BYTES", value_parser = parse_byte_size, requires = "store")]
    memory_budget: Option<u64>,
    /// The machine this worker runs on (the coordinator puts replicas of one expert on different nodes). Default:
    /// the hostname.
    #[arg(long, env = "SWITCHYARD_NODE")]
    node: Option<String>,
    /// Lease of the cluster membership, in milliseconds: the coordinator sees a dead worker leave within about this.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..), requires = "store")]
    lease_ttl_ms: u64,
    #[command(flatten)]
    collective: CollectiveArgs,
}

/// Runs the expert worker until SIGTERM or Ctrl-C.
pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The runtime only moves bytes; the experts compute on the worker's own executor thread (and rayon).
        .worker_threads(2)
        .thread_name("expert-worker-io")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve_until_signal(args))
}

async fn serve_until_signal(args: Args) -> Result<()> {
    let plan = args.collective.plan(RankRole::Expert, args.worker_id.as_deref(), args.store.as_deref())?;
    let listener = serving::bind(args.listen).await.context("binding the expert worker")?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let worker_id = match &plan {
        Some(plan) => plan.worker_id.clone(),
        None => args.worker_id.clone().unwrap_or_else(|| format!("ew-{}", addr.port())),
    };
    let model_dir = crate::model_dir::resolve(args.model.as_deref())?;
    let options = WorkerOptions {
        worker_id: worker_id.clone(),
        experts: args.experts.clone().unwrap_or_else(ExpertSpec::none),
        placement_epoch: args.placement_epoch,
        activation_precision: if args.fp8_activations {
            ActivationPrecision::Fp8PerToken
        } else {
            ActivationPrecision::F32
        },
        device: args.device,
    };
    let context = format!("loading expert worker {worker_id} from {}", model_dir.display());
    let worker = tokio::task::spawn_blocking(move || ExpertWorker::load(&model_dir, options))
        .await
        .context("the loading task failed")?
        .context(context)?;
    let worker = Arc::new(worker);
    // Connections made between this line and the server's first poll wait in the listener's backlog.
    serving::announce(&listener).context("writing the listening line to stdout")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(serve(worker.clone(), listener, async move {
        let _ = stopped.await;
    }));
    let signal = serving::shutdown_signal();
    tokio::pin!(signal);

    let mut registration = match &args.store {
        None => None,
        Some(url) => {
            tokio::select! {
                registration = register(&args, url, &worker, addr) => Some(registration?),
                () = &mut signal => {
                    let _ = stop.send(());
                    return finish(server, &worker_id, addr).await;
                }
            }
        }
    };
    let mut expert_rank = None;
    if let (Some(plan), Some(lease)) = (&plan, registration.as_ref().map(Registration::lease)) {
        let joined = tokio::select! {
            joined = plan.join(lease) => Some(joined),
            () = &mut signal => None,
        };
        match joined {
            Some(Ok(collective)) => {
                let service: Arc<dyn ExpertService> = worker.clone();
                let serving = serve_expert_rank(collective, plan.layout.clone(), service, plan.step_timeout);
                expert_rank = Some(tokio::spawn(serving));
            }
            failed => {
                if let Some(registration) = registration.take() {
                    leave(registration, Duration::from_millis(args.lease_ttl_ms)).await;
                }
                let _ = stop.send(());
                finish(server, &worker_id, addr).await?;
                return failed.map_or(Ok(()), |joined| joined.map(|_| ()));
            }
        }
    }

    let failure = loop {
        tokio::select! {
            () = &mut signal => break None,
            result = &mut server => {
                // The server stopped without being asked: that is an error worth the exit status.
                result.context("the server task failed")?.with_context(|| format!("expert worker {worker_id} on {addr}"))?;
                anyhow::bail!("expert worker {worker_id} on {addr}: the server stopped by itself");
            }
            ended = expert_rank_ended(&mut expert_rank) => {
                expert_rank = None;
                if let Err(error) = ended {
                    break Some(error.context(format!("expert worker {worker_id}: the NCCL communicator failed")));
                }
            }
        }
    };
    if let Some(registration) = registration {
        leave(registration, Duration::from_millis(args.lease_ttl_ms)).await;
    }
    let _ = stop.send(());
    finish(server, &worker_id, addr).await?;
    failure.map_or(Ok(()), Err)
}

/// Resolves when the expert rank's serving ends (never without one): `Ok` once every attention rank left.
async fn expert_rank_ended(
    expert_rank: &mut Option<tokio::task::JoinHandle<Result<ExpertRankSummary, TransportError>>>,
) -> Result<()> {
    let Some(task) = expert_rank else { return std::future::pending().await };
    let summary = task.await.context("the expert rank's task failed")??;
    tracing::info!(steps = summary.steps, requests = summary.requests, "every attention rank left the communicator");
    Ok(())
}

/// Registers `worker` in the cluster store at `url`, reachable at `addr` (or `--advertise`).
async fn register(args: &Args, url: &str, worker: &ExpertWorker, addr: SocketAddr) -> Result<Registration> {
    let endpoint = args.advertise.clone().unwrap_or_else(|| format!("http://{addr}"));
    let memory_budget = match args.memory_budget {
        Some(bytes) => bytes,
        None => all_experts_bytes(worker.checkpoint(), worker.text_config())
            .context("sizing the default memory budget (every routed expert of the checkpoint)")?,
    };
    let node = args.node.clone().unwrap_or_else(serving::hostname);
    let store = switchyard_coordinator::store::connect(url)
        .await
        .with_context(|| format!("connecting to the cluster store {url}"))?;
    let ttl = Duration::from_millis(args.lease_ttl_ms);
    let registration =
        join_cluster(store, &args.cluster, worker, endpoint.clone(), memory_budget, node, args.device.to_string(), ttl)
            .await
            .with_context(|| {
                format!("expert worker {} joining cluster {} in the store {url}", worker.worker_id(), args.cluster)
            })?;
    tracing::info!(
        worker_id = %worker.worker_id(),
        cluster = %args.cluster,
        %endpoint,
        memory_budget,
        lease = %registration.lease(),
        "joined the cluster"
    );
    Ok(registration)
}

/// Leaves the cluster: revokes the lease so the coordinator sees the worker go now, not a lease period later. A
/// store that does not answer within `patience` is left to expire the lease by itself.
async fn leave(registration: Registration, patience: Duration) {
    let worker_id = registration.worker_id().to_string();
    match tokio::time::timeout(patience, registration.deregister()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%worker_id, %error, "could not leave the cluster; the lease will lapse"),
        Err(_) => tracing::warn!(%worker_id, ?patience, "the store did not answer the leave; the lease will lapse"),
    }
}

/// Waits for the server to finish after its shutdown was signalled.
async fn finish(
    server: tokio::task::JoinHandle<Result<(), switchyard_expert_worker::WorkerError>>,
    worker_id: &str,
    addr: SocketAddr,
) -> Result<()> {
    server.await.context("the server task failed")?.with_context(|| format!("expert worker {worker_id} on {addr}"))?;
    tracing::info!(%worker_id, "expert worker stopped");
    Ok(())
}

/// Parses a byte count: plain bytes (`68719476736`), or a number (fractions allowed) with a suffix, case-insensitive:
/// `K`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB` are powers of 1000, `KiB`, `MiB`, `GiB`, `TiB` (or `Ki`...) powers of 1024.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let unit: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "invalid byte size {text:?}: unknown suffix {other:?} (use K, M, G, T for powers of 1000 or KiB, MiB, \
                 GiB, TiB for powers of 1024)"
            ))
        }
    };
    let bytes = if let Ok(whole) = number.parse::<u64>() {
        whole.checked_mul(unit).ok_or_else(|| format!("byte size {text:?} is too large"))?
    } else {
        let value: f64 = number.parse().map_err(|_| {
            format!("invalid byte size {text:?}: expected a number of bytes, optionally with a suffix like GiB")
        })?;
        let bytes = (value * unit as f64).round();
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("byte size {text:?} is too large"));
        }
        bytes as u64
    };
    if bytes == 0 {
        return Err(format!("byte size {text:?} is zero: a worker needs room for at least one expert"));
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_byte_size;

    #[test]
    fn byte_sizes_parse_with_and_without_suffixes() {
        assert_eq!(parse_byte_size("123"), Ok(123));
        assert_eq!(parse_byte_size("4K"), Ok(4_000));
        assert_eq!(parse_byte_size("4kb"), Ok(4_000));
        assert_eq!(parse_byte_size("3M"), Ok(3_000_000));
        assert_eq!(parse_byte_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_byte_size("4KiB"), Ok(4096));
        assert_eq!(parse_byte_size("3 MiB"), Ok(3 << 20));
        assert_eq!(parse_byte_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_byte_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_byte_size("2Ti"), Ok(2 << 40));
        for bad in ["", "GiB", "12XB", "1.2.3G", "-5", "0", "0GiB", "99999999999999999999", "20000000TiB"] {
            assert!(parse_byte_size(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_byte_size("7 parsecs").expect_err("not a unit").contains("parsecs"));
    }
}
