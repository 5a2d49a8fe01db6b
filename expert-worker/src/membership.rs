//! An expert worker as a member of a coordinated cluster: it registers itself in the cluster store (role Expert,
//! its endpoint, node, device, memory budget and checkpoint fingerprint) under a lease the returned
//! [`Registration`] keeps alive, so the coordinator sees it join, and leave when it stops or dies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_coordinator::membership::{Member, MemberRole, Membership, Registration};
use switchyard_coordinator::store::{ClusterStore, Store};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::TextConfig;

use crate::error::WorkerError;
use crate::worker::ExpertWorker;

/// How long [`join_cluster`] keeps retrying while the store answers with retryable errors (a store or coordinator
/// still starting, an etcd election): long enough to ride out a restart, short enough that a launcher waiting for
/// the worker hears about a store that stays away.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// Registers `worker` as an expert member of `cluster`: role Expert, its worker id, `endpoint` (`http://IP:PORT`,
/// where it serves), `node`, `device`, `memory_budget_bytes` and the fingerprint of its checkpoint, under a lease of
/// `ttl` that the returned [`Registration`] keeps alive until it is dropped or deregistered.
///
/// Retryable store errors are retried for up to [`JOIN_PATIENCE`]. A cluster serving another checkpoint is refused
/// at once with [`WorkerError::Cluster`] holding
/// [`CoordinatorError::CheckpointMismatch`](switchyard_coordinator::CoordinatorError::CheckpointMismatch), whose
/// message names both hashes.
// The arguments are the member record's fields; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn join_cluster(
    store: Arc<dyn Store>,
    cluster: &str,
    worker: &ExpertWorker,
    endpoint: String,
    memory_budget_bytes: u64,
    node: String,
    device: String,
    ttl: Duration,
) -> Result<Registration, WorkerError> {
    let membership = Membership::new(ClusterStore::new(store, cluster)?);
    let checkpoint = worker.checkpoint();
    let checkpoint_hash = checkpoint
        .fingerprint()
        .map_err(|source| WorkerError::Fingerprint { dir: checkpoint.dir().to_path_buf(), source: Box::new(source) })?;
    let member = Member {
        worker_id: worker.worker_id().to_string(),
        role: MemberRole::Expert,
        endpoint,
        node,
        device,
        memory_budget_bytes,
        checkpoint_hash,
        kv_dtype: None,
    };
    tracing::info!(
        worker_id = %member.worker_id,
        cluster,
        endpoint = %member.endpoint,
        node = %member.node,
        memory_budget_bytes,
        checkpoint = %member.checkpoint_hash,
        "joining the cluster"
    );
    let deadline = Instant::now() + JOIN_PATIENCE;
    let mut delay = Duration::from_millis(100);
    loop {
        match membership.register(member.clone(), ttl).await {
            Ok(registration) => return Ok(registration),
            Err(error) if error.retryable() && Instant::now() + delay < deadline => {
                tracing::warn!(worker_id = %member.worker_id, cluster, %error, "cannot join the cluster yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Bytes of every routed expert of every MoE layer of the checkpoint as stored (weights and FP8 scales), counted
/// from the headers without reading any tensor: the memory budget of a worker that can hold the whole model's
/// experts, and the unit the coordinator's slots are sized in.
pub fn all_experts_bytes(checkpoint: &Checkpoint, text: &TextConfig) -> Result<u64, WorkerError> {
    let mut total = 0u64;
    for &layer in &text.moe_layers {
        for expert in 0..text.num_local_experts {
            let ranges = checkpoint.expert_ranges(layer, expert, text).map_err(|source| WorkerError::ExpertSizes {
                dir: checkpoint.dir().to_path_buf(),
                source: Box::new(source),
            })?;
            total += ranges.iter().map(|range| range.len() as u64).sum::<u64>();
        }
    }
    Ok(total)
}
