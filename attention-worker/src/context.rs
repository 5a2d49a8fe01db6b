//! Context parallelism across attention workers: a sequence whose KV does not fit this worker is spread over a group.
//!
//! Three parts, one per role:
//! - [`ContextGroups`]: how the engine gets a group for a sequence it cannot hold alone. [`StoreContextGroups`] asks
//!   the store for the other attention workers' room, runs the coordinator's assignment
//!   (`switchyard_coordinator::context::assign_group`) and records the group under this worker's lease.
//! - [`RemoteContext`]: the owner's view of its group (the model's `ContextShards`): each global layer of each step
//!   goes to the members whose range the step's queries reach, through the same [`Transport`] as dispatch, all at
//!   once; the answers are the members' partial attentions, which the forward pass merges. Dropping it (the sequence
//!   ended) releases the members' shards and the store record.
//! - [`ShardHost`]: the member side (`switchyard.v1.ContextShard`): one shard cache per sequence, drawn from this
//!   worker's own KV block pool, computed on a blocking thread by the model this worker serves
//!   ([`ShardHost::served_by`]: a GPU model keeps the shards in its device arena) or on the CPU ([`ShardHost::new`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use switchyard_coordinator::context::{assign_group, ContextGroup, ContextRoom};
use switchyard_coordinator::membership::{Member, MemberRole, Membership};
use switchyard_coordinator::store::cluster::ClusterStore;
use switchyard_coordinator::store::LeaseId;
use switchyard_model::config::TextConfig;
use switchyard_model::context::{attend_shard, ContextShards, PartialOutput, PendingPartials, ShardStep};
use switchyard_model::memory::{KvBytes, Precision};
use switchyard_model::{ForwardPass, KvBlockPool, KvCache, KvDtype, ModelError};
use switchyard_transport::context::{check_request, ContextService, PartialAttentionRequest, PartialAttentionResponse};
use switchyard_transport::grpc::GrpcTransport;
use switchyard_transport::{BoxFuture, Transport, TransportError};
use tokio::runtime::Handle;

use crate::AttentionWorkerError;

/// Where the engine gets a context-parallel group for a sequence too long for this worker's KV cache.
pub trait ContextGroups: Send + Sync {
    /// A group for the sequence numbered `sequence` (unique in this worker) that may reach `tokens` positions, of
    /// which this worker can hold the global layers' first `local_tokens`. Blocks on the store; must be called from
    /// outside any async runtime (the engine's scheduler thread). Fails, naming both numbers, when the cluster's
    /// attention workers cannot hold the sequence together.
    fn assign(
        &self,
        sequence: u64,
        tokens: usize,
        local_tokens: usize,
    ) -> Result<Arc<dyn ContextShards>, AttentionWorkerError>;
}

/// Global-layer positions a KV budget of `bytes` holds with `dtype` elements, in whole blocks of `block_size`
/// positions.
pub fn global_tokens_in(config: &TextConfig, block_size: usize, bytes: u64, dtype: KvDtype) -> usize {
    let global_layers = KvBytes::of(config, Precision::F32).global_layers.max(1) as usize;
    KvBlockPool::blocks_in_bytes_for_dtype(config, block_size, bytes, dtype) / global_layers * block_size
}

/// The KV element type a member registered: f32 when it registered none (an older worker) or one this worker does
/// not know (counted as f32 it never offers more room than the member has).
fn registered_kv_dtype(member: &Member) -> KvDtype {
    match member.kv_dtype.as_deref().map(str::parse::<KvDtype>) {
        Some(Ok(dtype)) => dtype,
        Some(Err(e)) => {
            tracing::warn!(
                worker_id = %member.worker_id,
                error = %e,
                "unknown KV dtype in a member record; counting its room as f32"
            );
            KvDtype::F32
        }
        None => KvDtype::F32,
    }
}

/// [`ContextGroups`] from the cluster store: the other attention workers' registered KV budgets, less the ranges
/// recorded groups already gave them, are their room.
pub struct StoreContextGroups {
    /// The cluster's state in the store.
    pub cluster: ClusterStore,
    /// This worker's membership lease: groups are recorded under it.
    pub lease: LeaseId,
    /// This worker (the owner of the sequences it asks groups for).
    pub worker_id: String,
    /// Where members reach it.
    pub endpoint: String,
    /// The model's text config.
    pub config: TextConfig,
    /// Positions per KV block (ranges start on block boundaries).
    pub block_size: usize,
    /// The transport the members are reached through (they are added to it).
    pub transport: Arc<GrpcTransport>,
    /// The runtime store calls run on (the scheduler thread blocks on it).
    pub runtime: Handle,
}

impl StoreContextGroups {
    async fn plan(
        &self,
        sequence_id: &str,
        tokens: usize,
        local_tokens: usize,
    ) -> Result<ContextGroup, AttentionWorkerError> {
        let members = Membership::new(self.cluster.clone()).members().await?;
        let groups = self.cluster.context_groups().await?;
        let mut taken: HashMap<&str, usize> = HashMap::new();
        for group in &groups {
            for range in group.ranges.iter().filter(|r| r.worker_id != group.owner) {
                *taken.entry(range.worker_id.as_str()).or_default() += range.len();
            }
        }
        let others: Vec<ContextRoom> = members
            .iter()
            .filter(|m| m.role == MemberRole::Attention && m.worker_id != self.worker_id)
            .map(|m| {
                let room =
                    global_tokens_in(&self.config, self.block_size, m.memory_budget_bytes, registered_kv_dtype(m));
                ContextRoom {
                    worker_id: m.worker_id.clone(),
                    endpoint: m.endpoint.clone(),
                    tokens: room.saturating_sub(taken.get(m.worker_id.as_str()).copied().unwrap_or(0)),
                }
            })
            .collect();
        let owner =
            ContextRoom { worker_id: self.worker_id.clone(), endpoint: self.endpoint.clone(), tokens: local_tokens };
        let group = assign_group(sequence_id, &owner, &others, tokens, self.block_size)?;
        self.cluster.record_context_group(&group, self.lease).await?;
        Ok(group)
    }
}

impl ContextGroups for StoreContextGroups {
    fn assign(
        &self,
        sequence: u64,
        tokens: usize,
        local_tokens: usize,
    ) -> Result<Arc<dyn ContextShards>, AttentionWorkerError> {
        let sequence_id = format!("{}.{sequence}", self.worker_id);
        let group = self.runtime.block_on(self.plan(&sequence_id, tokens, local_tokens))?;
        // Lazy channels register with the runtime's reactor when they are made.
        let _runtime = self.runtime.enter();
        for range in &group.ranges[1..] {
            self.transport.add_context_member(range.worker_id.clone(), range.endpoint.clone());
        }
        tracing::info!(
            sequence_id,
            tokens,
            members = ?group.ranges.iter().map(|r| (r.worker_id.as_str(), r.start, r.end)).collect::<Vec<_>>(),
            "context-parallel group"
        );
        Ok(Arc::new(RemoteContext {
            group,
            config: self.config.clone(),
            transport: self.transport.clone(),
            cluster: Some(self.cluster.clone()),
            runtime: self.runtime.clone(),
        }))
    }
}

/// The owner's view of a context-parallel group (see the module docs).
pub struct RemoteContext {
    group: ContextGroup,
    config: TextConfig,
    transport: Arc<dyn Transport>,
    /// Where the group is recorded, to forget it when the sequence ends.
    cluster: Option<ClusterStore>,
    runtime: Handle,
}

impl RemoteContext {
    /// The group of `group` reached through `transport` on `runtime`, not recorded anywhere (tests, single hosts).
    pub fn new(group: ContextGroup, config: TextConfig, transport: Arc<dyn Transport>, runtime: Handle) -> Self {
        Self { group, config, transport, cluster: None, runtime }
    }

    /// The group.
    pub fn group(&self) -> &ContextGroup {
        &self.group
    }
}

impl ContextShards for RemoteContext {
    fn local_end(&self) -> usize {
        self.group.ranges.first().map_or(0, |r| r.end)
    }

    fn attend(
        &self,
        layer: usize,
        positions: &[usize],
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> Result<Vec<PartialOutput>, ModelError> {
        self.start_attend(layer, positions, queries, keys, values).wait()
    }

    /// Sends every member its request at once on the runtime and returns; the answers are checked in `wait`.
    fn start_attend(
        &self,
        layer: usize,
        positions: &[usize],
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> PendingPartials {
        let kv_dim = self.config.kv_dim();
        let last = positions.iter().copied().max().unwrap_or(0);
        // Members whose range starts past every query would only answer "nothing visible".
        let members: Vec<String> =
            self.group.ranges[1..].iter().filter(|r| r.start <= last).map(|r| r.worker_id.clone()).collect();
        let calls: Vec<_> = self.group.ranges[1..]
            .iter()
            .filter(|r| r.start <= last)
            .map(|range| {
                let held: Vec<usize> =
                    (0..positions.len()).filter(|&t| (range.start..range.end).contains(&positions[t])).collect();
                let rows = |all: &[f32]| -> Vec<f32> {
                    held.iter().flat_map(|&t| all[t * kv_dim..(t + 1) * kv_dim].iter().copied()).collect()
                };
                let request = PartialAttentionRequest {
                    sequence_id: self.group.sequence_id.clone(),
                    owner: self.group.owner.clone(),
                    range_start: range.start as u64,
                    range_end: range.end as u64,
                    layer: layer as u32,
                    query_positions: positions.iter().map(|&p| p as u64).collect(),
                    queries: queries.to_vec(),
                    kv_positions: held.iter().map(|&t| positions[t] as u64).collect(),
                    keys: rows(keys),
                    values: rows(values),
                };
                self.transport.attend(&range.worker_id, request)
            })
            .collect();
        // Spawned, so the requests go out while the caller computes its own partial.
        let answers = self.runtime.spawn(join_all(calls));
        let runtime = self.runtime.clone();
        let expected = (queries.len(), positions.len() * self.config.num_attention_heads);
        PendingPartials::new(move || {
            let member_error = |member: &str, retryable: bool, source: Box<dyn std::error::Error + Send + Sync>| {
                ModelError::ContextMember { member: member.to_string(), layer, retryable, source }
            };
            let answers = runtime.block_on(answers).map_err(|join| {
                let member = members.first().map_or("?", String::as_str);
                member_error(member, false, format!("the requests' task failed: {join}").into())
            })?;
            members
                .iter()
                .zip(answers)
                .map(|(member, answer)| {
                    let answer = answer.map_err(|e| member_error(member, e.retryable(), Box::new(e)))?;
                    if (answer.out.len(), answer.lse.len()) != expected {
                        let reason = format!(
                            "answered {} outputs and {} log-sum-exps, expected {} and {}",
                            answer.out.len(),
                            answer.lse.len(),
                            expected.0,
                            expected.1
                        );
                        return Err(member_error(member, false, reason.into()));
                    }
                    Ok(PartialOutput { out: answer.out, lse: answer.lse })
                })
                .collect()
        })
    }
}

impl Drop for RemoteContext {
    fn drop(&mut self) {
        let (transport, group, cluster) = (self.transport.clone(), self.group.clone(), self.cluster.take());
        // The scheduler must not wait for this: members that are gone answer nothing, and the store record lapses
        // with this worker's lease anyway.
        self.runtime.spawn(async move {
            for range in &group.ranges[1..] {
                if let Err(error) = transport.release_shard(&range.worker_id, &group.sequence_id).await {
                    tracing::debug!(member = %range.worker_id, %error, "could not release a context shard");
                }
            }
            if let Some(cluster) = cluster {
                if let Err(error) = cluster.remove_context_group(&group.sequence_id).await {
                    tracing::debug!(sequence_id = %group.sequence_id, %error, "could not remove a context group");
                }
            }
        });
    }
}

/// The member side of context parallelism: holds shards of other workers' sequences in this worker's KV pool.
pub struct ShardHost {
    config: TextConfig,
    /// Computes the partials ([`ForwardPass::attend_shard`]: a GPU model on its device); `None`: the CPU's
    /// [`attend_shard`].
    model: Option<Arc<dyn ForwardPass>>,
    pool: Arc<KvBlockPool>,
    shards: Mutex<HashMap<String, Arc<Mutex<KvCache>>>>,
}

impl ShardHost {
    /// Shards for `config`'s model, drawn from `pool` (the engine's, so shards and this worker's own sequences share
    /// its KV budget), computed on the CPU.
    pub fn new(config: TextConfig, pool: Arc<KvBlockPool>) -> Self {
        Self { config, model: None, pool, shards: Mutex::new(HashMap::new()) }
    }

    /// Shards computed by `model` (the one this worker serves, e.g. a `GpuModel` keeping them in its device arena),
    /// drawn from `pool` (the engine's, which for a GPU model is its arena's).
    pub fn served_by(model: Arc<dyn ForwardPass>, pool: Arc<KvBlockPool>) -> Self {
        Self { config: model.config().clone(), model: Some(model), pool, shards: Mutex::new(HashMap::new()) }
    }

    /// Sequences this worker holds a shard of.
    pub fn shards(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<KvCache>>>> {
        // A map of handles, consistent after every statement.
        self.shards.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn shard(&self, request: &PartialAttentionRequest) -> Result<Arc<Mutex<KvCache>>, TransportError> {
        let (start, end) = (request.range_start as usize, request.range_end as usize);
        self.shard_for(&request.sequence_id, &request.owner, start, end)
    }

    /// The shard of `sequence_id` for positions `start .. end`, made (empty) if this worker holds none yet.
    fn shard_for(
        &self,
        sequence_id: &str,
        owner: &str,
        start: usize,
        end: usize,
    ) -> Result<Arc<Mutex<KvCache>>, TransportError> {
        let mut shards = self.lock();
        if let Some(shard) = shards.get(sequence_id) {
            let range = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).global_range();
            if range != (start..end) {
                return Err(TransportError::InvalidPayload {
                    what: "range".into(),
                    reason: format!("sequence {sequence_id} is held here for positions {range:?}, not {start}..{end}"),
                });
            }
            return Ok(shard.clone());
        }
        let cache = KvCache::shard(&self.config, self.pool.clone(), start, end)
            .map_err(|e| TransportError::InvalidPayload { what: "range".into(), reason: e.to_string() })?;
        tracing::info!(sequence_id, owner, start, end, "holding a context shard");
        let shard = Arc::new(Mutex::new(cache));
        shards.insert(sequence_id.to_string(), shard.clone());
        Ok(shard)
    }

    /// Runs `prepare` on this worker's shard of `sequence_id` (positions `start .. end`, made empty if not held yet)
    /// outside any request: benchmarks fill a long context's shard with
    /// [`KvCache::append_synthetic`](switchyard_model::KvCache::append_synthetic) instead of hours of prefill.
    pub fn prepare_shard<R>(
        &self,
        sequence_id: &str,
        owner: &str,
        start: usize,
        end: usize,
        prepare: impl FnOnce(&mut KvCache) -> Result<R, ModelError>,
    ) -> Result<R, AttentionWorkerError> {
        let shard = self.shard_for(sequence_id, owner, start, end)?;
        let mut cache = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(prepare(&mut cache)?)
    }
}

impl ContextService for ShardHost {
    fn attend(
        &self,
        request: PartialAttentionRequest,
    ) -> BoxFuture<'static, Result<PartialAttentionResponse, TransportError>> {
        let checked =
            check_request(&request, self.config.q_dim(), self.config.kv_dim()).and_then(|()| self.shard(&request));
        let (config, model) = (self.config.clone(), self.model.clone());
        Box::pin(async move {
            let shard = checked?;
            let compute = move || {
                let mut cache = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let positions = |p: &[u64]| p.iter().map(|&p| p as usize).collect::<Vec<_>>();
                let (layer, query_positions, kv_positions) =
                    (request.layer as usize, positions(&request.query_positions), positions(&request.kv_positions));
                let step = ShardStep {
                    layer,
                    query_positions: &query_positions,
                    queries: &request.queries,
                    kv_positions: &kv_positions,
                    keys: &request.keys,
                    values: &request.values,
                };
                match model {
                    Some(model) => model.attend_shard(&mut cache, &step),
                    None => attend_shard(&config, &mut cache, &step),
                }
            };
            match tokio::task::spawn_blocking(compute).await {
                Ok(Ok(partial)) => Ok(PartialAttentionResponse { out: partial.out, lse: partial.lse }),
                Ok(Err(ModelError::InvalidInput { what, reason })) => {
                    Err(TransportError::InvalidPayload { what, reason })
                }
                Ok(Err(error)) => Err(TransportError::Compute { reason: error.to_string() }),
                Err(join) => Err(TransportError::Compute { reason: format!("the shard computation panicked: {join}") }),
            }
        })
    }

    fn release(&self, sequence_id: &str) -> BoxFuture<'static, Result<u64, TransportError>> {
        let released = self.lock().remove(sequence_id).map_or(0, |shard| {
            let cache = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            cache.blocks_held() as u64
        });
        // The cache's blocks go back to the pool when the last handle (this one, or a computation's) drops.
        Box::pin(std::future::ready(Ok(released)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_model::config::ModelConfig;
    use switchyard_model::tiny::{preset_text_config, Preset};

    fn member(kv_dtype: Option<&str>) -> Member {
        Member {
            worker_id: "aw-2".into(),
            role: MemberRole::Attention,
            endpoint: "http://127.0.0.1:1".into(),
            node: "node-b".into(),
            device: "cuda:0".into(),
            memory_budget_bytes: 1 << 30,
            checkpoint_hash: "sha256:x".into(),
            kv_dtype: kv_dtype.map(str::to_string),
        }
    }

    #[test]
    fn a_bf16_cache_offers_twice_the_positions_and_an_unknown_dtype_counts_as_f32() {
        let json = serde_json::json!({ "model_type": "llama4", "text_config": preset_text_config(Preset::Tiny) });
        let config = ModelConfig::from_json_str(&json.to_string(), "tiny config.json").expect("tiny config").text;
        let bytes = 64 << 20;
        let f32_room = global_tokens_in(&config, 16, bytes, KvDtype::F32);
        assert!(f32_room > 0);
        assert_eq!(global_tokens_in(&config, 16, bytes, KvDtype::Bf16), 2 * f32_room);
        assert_eq!(registered_kv_dtype(&member(Some("bf16"))), KvDtype::Bf16);
        assert_eq!(registered_kv_dtype(&member(Some("f32"))), KvDtype::F32);
        // Records of workers from before the field, and dtypes this worker does not know, never overstate the room.
        assert_eq!(registered_kv_dtype(&member(None)), KvDtype::F32);
        assert_eq!(registered_kv_dtype(&member(Some("fp4"))), KvDtype::F32);
    }
}
