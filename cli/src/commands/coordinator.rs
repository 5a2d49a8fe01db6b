//! `switchyard coordinator`: serves the placement to attention workers.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use switchyard_coordinator::service::{serve, CoordinatorService};
use switchyard_coordinator::Placement;

use crate::serving;

/// Flags of `coordinator`.
#[derive(clap::Args)]
pub struct Args {
    /// Placement JSON (`{"epoch": N, "workers": [{"worker_id", "endpoint", "experts": {layer: [ids]}}]}`).
    #[arg(long, env = "SWITCHYARD_PLACEMENT")]
    placement: PathBuf,
    /// Address to serve on (port 0 picks one).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

/// Runs `coordinator`.
pub fn run(args: Args) -> Result<()> {
    let placement = Placement::read(&args.placement)?;
    if let Some(worker) = placement.workers.iter().find(|w| w.endpoint.is_empty()) {
        anyhow::bail!("placement {}: worker {} has no endpoint", args.placement.display(), worker.worker_id);
    }
    serving::runtime(2)?.block_on(async move {
        let listener = serving::bind(args.listen).await?;
        serving::announce(&listener)?;
        tracing::info!(epoch = placement.epoch, workers = placement.workers.len(), "serving placement");
        serve(CoordinatorService::new(placement), listener, serving::shutdown_signal())
            .await
            .context("serving the coordinator")
    })
}
