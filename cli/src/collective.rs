//! The flags and start-up that put a worker in an NCCL communicator (`--dispatch-transport nccl`), shared by
//! `switchyard attention-worker` and `switchyard expert-worker`: the rank layout, the checks that run before anything
//! is loaded, and the join through the coordinator (rank 0 publishes the communicator's id, the others wait for it).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use switchyard_coordinator::communicator::CommunicatorClient;
use switchyard_coordinator::store::LeaseId;
use switchyard_transport::collective::{join_nccl, nccl_built, nccl_unique_id, Collective, RankLayout, RankRole};

/// How routed tokens travel between attention workers and expert workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DispatchTransport {
    /// A gRPC stream from each attention worker to each expert worker (the default).
    Grpc,
    /// Every attention and expert worker of the deployment in one NCCL communicator, stepping in lockstep.
    Nccl,
}

/// The flags that put a worker in an NCCL communicator, the same on `attention-worker` and `expert-worker`: every
/// rank is given the same `--communicator`, `--rank-layout` and world size, and its own `--rank`.
#[derive(clap::Args, Clone, Debug)]
pub struct CollectiveArgs {
    /// How dispatch and combine travel: `grpc`, or `nccl` (needs a build with `--features cuda`, one GPU per
    /// worker, `--store`, and the coordinator to hand out the communicator's id).
    #[arg(long, env = "SWITCHYARD_DISPATCH_TRANSPORT", value_enum, default_value = "grpc")]
    dispatch_transport: DispatchTransport,
    /// The communicator's name at the coordinator (every rank gives the same).
    #[arg(long, env = "SWITCHYARD_COMMUNICATOR", value_name = "NAME", default_value = "moe")]
    communicator: String,
    /// Worker ids by rank: the attention workers, a colon, the expert workers (`a0,a1:e0,e1` makes a0 rank 0 and e1
    /// rank 3). The same on every rank; a worker's id is its entry.
    #[arg(long, env = "SWITCHYARD_RANK_LAYOUT", value_name = "A0,A1:E0,E1")]
    rank_layout: Option<String>,
    /// This worker's rank in `--rank-layout`.
    #[arg(long, env = "SWITCHYARD_RANK", value_name = "N")]
    rank: Option<usize>,
    /// Ranks in the communicator: checked against `--rank-layout` when given.
    #[arg(long, env = "SWITCHYARD_WORLD_SIZE", value_name = "W")]
    world_size: Option<usize>,
    /// The GPU this rank's NCCL communicator uses.
    #[arg(long, env = "SWITCHYARD_NCCL_GPU", value_name = "N", default_value_t = 0)]
    nccl_gpu: usize,
    /// The coordinator's gRPC endpoint, which hands out the communicator's id. Default: `--store` when that is the
    /// store a coordinator serves (`http://...`).
    #[arg(long, env = "SWITCHYARD_COORDINATOR", value_name = "URL")]
    coordinator: Option<String>,
    /// How long a rank waits for rank 0 to publish the communicator, and then for every rank to join, in
    /// milliseconds.
    #[arg(long, default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..))]
    communicator_wait_ms: u64,
    /// How long one MoE layer step may take over the communicator (both exchanges and the experts' computation), in
    /// milliseconds; a step that takes longer fails the communicator.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    step_timeout_ms: u64,
}

/// A worker's place in an NCCL communicator, checked from [`CollectiveArgs`].
pub struct CommunicatorPlan {
    /// Who is which rank.
    pub layout: RankLayout,
    /// This worker's rank.
    pub rank: usize,
    /// This worker's id: its entry in the layout.
    pub worker_id: String,
    /// The deadline of one step.
    pub step_timeout: Duration,
    name: String,
    coordinator: String,
    gpu: usize,
    wait: Duration,
}

impl CollectiveArgs {
    /// `None` for gRPC. For NCCL: checks that this build has NCCL (first, before anything is loaded), then that the
    /// flags fit together and make this worker a `role` rank (`worker_id`: its `--worker-id`, which must be its entry
    /// in the layout; `store`: its `--store`, which NCCL needs).
    pub fn plan(
        &self,
        role: RankRole,
        worker_id: Option<&str>,
        store: Option<&str>,
    ) -> Result<Option<CommunicatorPlan>> {
        if self.dispatch_transport == DispatchTransport::Grpc {
            return Ok(None);
        }
        nccl_built().context("--dispatch-transport nccl")?;
        let Some(store) = store else {
            bail!("--dispatch-transport nccl needs --store: rank 0 publishes the communicator under its cluster lease");
        };
        let Some(text) = &self.rank_layout else { bail!("--dispatch-transport nccl needs --rank-layout A0,A1:E0,E1") };
        let Some(rank) = self.rank else { bail!("--dispatch-transport nccl needs --rank N") };
        let layout = parse_rank_layout(text)?;
        if let Some(world_size) = self.world_size {
            if world_size != layout.world_size() {
                bail!("--world-size {world_size} but --rank-layout {text:?} has {} ranks", layout.world_size());
            }
        }
        let (Some(id), Some(actual)) = (layout.id(rank), layout.role(rank)) else {
            bail!("--rank {rank} is not in --rank-layout {text:?} ({} ranks)", layout.world_size());
        };
        if actual != role {
            bail!(
                "--rank {rank} is {id:?}, a {actual:?} rank in --rank-layout {text:?}, but this is a {role:?} worker"
            );
        }
        if let Some(given) = worker_id.filter(|given| *given != id) {
            bail!(
                "--worker-id {given:?} but rank {rank} of --rank-layout is {id:?}: give the same id or leave one out"
            );
        }
        let coordinator = match &self.coordinator {
            Some(url) => url.clone(),
            None if store.starts_with("http://") || store.starts_with("https://") => store.to_string(),
            None => bail!("--dispatch-transport nccl with --store {store}: give --coordinator URL (its gRPC endpoint)"),
        };
        Ok(Some(CommunicatorPlan {
            worker_id: id.to_string(),
            layout,
            rank,
            step_timeout: Duration::from_millis(self.step_timeout_ms),
            name: self.communicator.clone(),
            coordinator,
            gpu: self.nccl_gpu,
            wait: Duration::from_millis(self.communicator_wait_ms),
        }))
    }
}

impl CommunicatorPlan {
    /// Joins the communicator: rank 0 makes its NCCL id and publishes it at the coordinator under `lease` (its
    /// cluster membership's: the id goes when the lease does), the other ranks wait for it; then every rank joins on
    /// its GPU. Both waits are bounded by `--communicator-wait-ms`.
    pub async fn join(&self, lease: LeaseId) -> Result<Arc<dyn Collective>> {
        let name = &self.name;
        let world_size = u32::try_from(self.layout.world_size()).context("the world size does not fit in u32")?;
        let client = CommunicatorClient::new(&self.coordinator)
            .with_context(|| format!("reaching the coordinator {} for communicator {name}", self.coordinator))?;
        let unique_id = if self.rank == 0 {
            let id = nccl_unique_id().context("making the NCCL id (rank 0)")?;
            client
                .publish(name, world_size, &id, lease, &self.worker_id)
                .await
                .with_context(|| format!("publishing communicator {name} at the coordinator {}", self.coordinator))?;
            id
        } else {
            let rank = u32::try_from(self.rank).context("the rank does not fit in u32")?;
            let published = client.wait(name, world_size, rank, self.wait).await.with_context(|| {
                format!("waiting for rank 0 to publish communicator {name} at the coordinator {}", self.coordinator)
            })?;
            published.unique_id
        };
        tracing::info!(communicator = %name, rank = self.rank, world_size, gpu = self.gpu, "joining the NCCL communicator");
        let (rank, world, gpu, wait) = (self.rank, self.layout.world_size(), self.gpu, self.wait);
        let joined = tokio::task::spawn_blocking(move || join_nccl(&unique_id, rank, world, gpu, wait))
            .await
            .context("the joining task failed")?;
        joined.with_context(|| format!("joining communicator {name} as rank {rank} of {world} on GPU {gpu}"))
    }
}

/// `a0,a1:e0,e1`: the attention workers' ids, a colon, the expert workers'.
fn parse_rank_layout(text: &str) -> Result<RankLayout> {
    let Some((attention, experts)) = text.split_once(':') else {
        bail!("--rank-layout {text:?} has no colon: expected the attention workers, ':', the expert workers");
    };
    fn ids(list: &str) -> Vec<&str> {
        list.split(',').map(str::trim).filter(|id| !id.is_empty()).collect()
    }
    RankLayout::attention_first(&ids(attention), &ids(experts)).with_context(|| format!("--rank-layout {text:?}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;
    use switchyard_transport::collective::RankRole;

    use super::{parse_rank_layout, CollectiveArgs};

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        collective: CollectiveArgs,
    }

    fn plan(flags: &[&str], role: RankRole, store: Option<&str>) -> anyhow::Result<Option<String>> {
        let flags = Flags::try_parse_from(std::iter::once("switchyard").chain(flags.iter().copied()))?;
        Ok(flags.collective.plan(role, None, store)?.map(|plan| format!("{} {}", plan.rank, plan.worker_id)))
    }

    #[test]
    fn rank_layouts_parse_attention_first() {
        let layout = parse_rank_layout("a0, a1:e0,e1").unwrap();
        assert_eq!(
            (layout.world_size(), layout.rank_of("e1"), layout.role(1)),
            (4, Some(3), Some(RankRole::Attention))
        );
        for bad in ["a0,e0", "a0:", ":e0", "a0:a0"] {
            assert!(parse_rank_layout(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// gRPC needs none of the communicator's flags; NCCL is refused at once, naming the feature, in a build without
    /// `cuda`, and checks its flags in one with it.
    #[test]
    fn the_nccl_transport_is_checked_before_anything_starts() {
        assert_eq!(plan(&[], RankRole::Attention, None).unwrap(), None);
        let nccl = ["--dispatch-transport", "nccl", "--rank-layout", "a0,a1:e0", "--rank", "2"];
        let planned = plan(&nccl, RankRole::Expert, Some("http://127.0.0.1:1"));
        if cfg!(feature = "cuda") {
            assert_eq!(planned.unwrap().as_deref(), Some("2 e0"));
            let error = plan(&nccl, RankRole::Attention, Some("http://127.0.0.1:1")).unwrap_err();
            assert!(error.to_string().contains("Expert rank"), "{error}");
            let error = plan(&nccl, RankRole::Expert, None).unwrap_err();
            assert!(error.to_string().contains("--store"), "{error}");
        } else {
            let error = format!("{:#}", planned.unwrap_err());
            assert!(error.contains("--dispatch-transport nccl") && error.contains("--features cuda"), "{error}");
        }
    }
}
