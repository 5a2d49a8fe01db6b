//! `switchyard expert-worker`: serve a subset of the routed experts over gRPC.
//!
//! Binds first (a port in use fails before a long load), loads only the experts of `--experts`, then prints exactly
//! one line `listening on http://IP:PORT` to stdout once serving (what `switchyard up` waits for) and logs to stderr
//! only. Stops gracefully on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use switchyard_expert_worker::{serve, ExpertSpec, ExpertWorker, WorkerOptions};
use switchyard_model::ActivationPrecision;

/// Flags of `switchyard expert-worker`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json and safetensors). Default: the built-in tiny model.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Experts to hold: `all`, a list for every MoE layer like `0-3,8`, or per decoder layer like `1:0-3;3:4-7`.
    #[arg(long, env = "SWITCHYARD_EXPERTS", value_name = "SPEC")]
    experts: ExpertSpec,
    /// Address to serve gRPC on (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// This worker's id in the placement. Default: `ew-<port>`.
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    worker_id: Option<String>,
    /// Placement epoch dispatches must carry.
    #[arg(long, env = "SWITCHYARD_PLACEMENT_EPOCH", default_value_t = 0)]
    placement_epoch: u64,
    /// Quantise expert activations per token to FP8 (E4M3) before FP8 weights, as the FP8 checkpoint describes.
    #[arg(long, env = "SWITCHYARD_FP8_ACTIVATIONS")]
    fp8_activations: bool,
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
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the expert worker to {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let worker_id = args.worker_id.unwrap_or_else(|| format!("ew-{}", addr.port()));
    let model_dir = crate::model_dir::resolve(args.model.as_deref())?;
    let options = WorkerOptions {
        worker_id: worker_id.clone(),
        experts: args.experts,
        placement_epoch: args.placement_epoch,
        activation_precision: if args.fp8_activations {
            ActivationPrecision::Fp8PerToken
        } else {
            ActivationPrecision::F32
        },
    };
    let context = format!("loading expert worker {worker_id} from {}", model_dir.display());
    let worker = tokio::task::spawn_blocking(move || ExpertWorker::load(&model_dir, options))
        .await
        .context("the loading task failed")?
        .context(context)?;
    let worker = Arc::new(worker);
    let server = tokio::spawn(serve(worker, listener, shutdown_signal()));
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on http://{addr}").context("writing the listening line to stdout")?;
        stdout.flush().context("flushing stdout")?;
    }
    server.await.context("the server task failed")?.with_context(|| format!("expert worker {worker_id} on {addr}"))?;
    tracing::info!(%worker_id, "expert worker stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT). If a handler cannot be installed, that signal is simply not awaited.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => Some(stream),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM");
            None
        }
    };
    let sigterm = async {
        match terminate.as_mut() {
            Some(stream) => {
                stream.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        () = sigterm => tracing::info!("SIGTERM: shutting down"),
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
    }
}
