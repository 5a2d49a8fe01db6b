//! Context parallelism: a sequence whose KV does not fit one attention worker is spread over a group of them.
//!
//! Only the global (NoPE) layers attend to every past token, so only their KV is spread: the owner of the sequence
//! keeps the chunked layers' KV, the global layers' first range and the sequence's state; every other member keeps a
//! later range of the global layers' KV. For a global layer the owner sends each member the step's queries (and the
//! new keys and values that fall in the member's range); each member answers with its partial attention over its
//! range, output and log-sum-exp, and the owner merges the partials with its own exactly
//! ([`switchyard_kernels::attention::merge_partials`]). This module holds the owner's view of the members
//! ([`ContextShards`], implemented over the network by the attention worker) and what a member computes
//! ([`attend_shard`]); it knows nothing of the network or of how groups are chosen.

use switchyard_kernels::attention::{paged_attention, AttentionMask, AttentionShape};

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::TextConfig;
use crate::forward::ForwardPass;
use crate::kv::KvCache;
use crate::ModelError;

/// One member's partial attention for a step's queries over the keys it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartialOutput {
    /// `[queries, q_heads, head_dim]`; zeros for a query that sees none of the member's keys.
    pub out: Vec<f32>,
    /// `[queries, q_heads]` natural log-sum-exp of the scaled scores; `-inf` where no key was visible.
    pub lse: Vec<f32>,
}

/// The other members of a context-parallel group, as the owner of the sequence sees them.
pub trait ContextShards: Send + Sync {
    /// The global layers' positions `0 .. local_end()` stay with the owner; the members hold the rest.
    fn local_end(&self) -> usize;

    /// For global layer `layer` of one step: hands each member the new keys and values (`[tokens, kv_dim]` rows at
    /// `positions`) that fall in its range, and returns every member's partial attention of `queries`
    /// (`[tokens, q_dim]`, ready to score: RoPE-free layers' temperature scaling applied) over the keys it holds.
    /// Blocks until every member answered; a member that does not answer fails the step.
    fn attend(
        &self,
        layer: usize,
        positions: &[usize],
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> Result<Vec<PartialOutput>, ModelError>;

    /// [`attend`](ContextShards::attend), started now and finished by the returned [`PendingPartials`], so that the
    /// owner computes its own partial while the members compute theirs. The default computes everything before it
    /// returns (no overlap); implementations that reach members over a network send the requests and return.
    fn start_attend(
        &self,
        layer: usize,
        positions: &[usize],
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> PendingPartials {
        let answers = self.attend(layer, positions, queries, keys, values);
        PendingPartials::new(move || answers)
    }
}

/// The members' answers to a step of one global layer, in flight: [`wait`](PendingPartials::wait) blocks until every
/// member answered (or one failed), in the order of [`ContextShards::attend`].
pub struct PendingPartials(Box<dyn FnOnce() -> Result<Vec<PartialOutput>, ModelError> + Send>);

impl PendingPartials {
    /// Answers that `wait` produces (blocking in it as long as they take).
    pub fn new(wait: impl FnOnce() -> Result<Vec<PartialOutput>, ModelError> + Send + 'static) -> Self {
        Self(Box::new(wait))
    }

    /// Blocks until every member answered.
    pub fn wait(self) -> Result<Vec<PartialOutput>, ModelError> {
        (self.0)()
    }
}

impl std::fmt::Debug for PendingPartials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingPartials")
    }
}

/// One member's step of one global layer of a context-parallel sequence: the owner's queries and the new keys and
/// values that fall in the member's range.
#[derive(Debug, Clone, Copy)]
pub struct ShardStep<'a> {
    /// The global layer.
    pub layer: usize,
    /// Positions of the queries.
    pub query_positions: &'a [usize],
    /// `[query_positions, q_dim]`, ready to score (RoPE-free layers' temperature scaling applied).
    pub queries: &'a [f32],
    /// Positions of the new keys and values, all inside the shard's range.
    pub kv_positions: &'a [usize],
    /// `[kv_positions, kv_dim]`.
    pub keys: &'a [f32],
    /// `[kv_positions, kv_dim]`.
    pub values: &'a [f32],
}

/// What a member computes for one global layer of a step of a sequence whose positions `shard.global_range()` it
/// holds: stores the step's keys and values, then returns its partial attention of the queries over every key it
/// holds up to each query's position. Repeating a step (after a failure elsewhere) writes the same keys again and
/// returns the same partials. This is the CPU's computation; [`ForwardPass::attend_shard`] is where a model computes
/// it (a GPU model on its device).
pub fn attend_shard(
    config: &TextConfig,
    shard: &mut KvCache,
    step: &ShardStep<'_>,
) -> Result<PartialOutput, ModelError> {
    let ShardStep { layer, query_positions, queries, kv_positions, keys, values } = *step;
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    let grow = check_shard_step(config, shard, step)?;
    if !kv_positions.is_empty() {
        shard.reserve(grow)?;
        for (row, &position) in kv_positions.iter().enumerate() {
            let at = row * kv_dim..(row + 1) * kv_dim;
            shard.write(layer, position, &keys[at.clone()], &values[at])?;
        }
        shard.advance(grow);
    }
    let shape = AttentionShape {
        q_heads: config.num_attention_heads,
        kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
    };
    let tokens = query_positions.len();
    debug_assert_eq!(queries.len(), tokens * q_dim);
    let mut partial = PartialOutput { out: vec![0.0; queries.len()], lse: vec![0.0; tokens * shape.q_heads] };
    let scale = 1.0 / (config.head_dim as f32).sqrt();
    paged_attention(
        queries,
        query_positions,
        shard.paged(layer, shard.len()),
        shape,
        AttentionMask::Causal,
        scale,
        &mut partial.out,
        Some(&mut partial.lse),
    )?;
    Ok(partial)
}

/// The checks of a member's step, wherever it is computed: a global layer, shapes that match, keys only in the
/// shard's range. Returns how many positions the shard grows by (to reserve, then advance once the step succeeded).
pub(crate) fn check_shard_step(
    config: &TextConfig,
    shard: &KvCache,
    step: &ShardStep<'_>,
) -> Result<usize, ModelError> {
    let ShardStep { layer, query_positions, queries, kv_positions, keys, values } = *step;
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    let invalid = |reason: String| ModelError::InvalidInput { what: "context shard step".into(), reason };
    if layer >= config.num_hidden_layers || config.is_chunked_attention(layer) {
        return Err(invalid(format!("layer {layer} is not a global attention layer of this model")));
    }
    let (tokens, rows) = (query_positions.len(), kv_positions.len());
    if queries.len() != tokens * q_dim || keys.len() != rows * kv_dim || values.len() != rows * kv_dim {
        return Err(invalid(format!(
            "{tokens} queries need {} values and {rows} key/value rows {} each, got {}, {} and {}",
            tokens * q_dim,
            rows * kv_dim,
            queries.len(),
            keys.len(),
            values.len()
        )));
    }
    let range = shard.global_range();
    if let Some(p) = kv_positions.iter().find(|p| !range.contains(p)) {
        return Err(invalid(format!("key position {p} is outside this shard's range {range:?}")));
    }
    Ok(kv_positions.iter().max().map_or(0, |&last| (last + 1).saturating_sub(shard.len())))
}

/// A whole context-parallel group in one process: each member a shard cache and the model that computes its partials
/// ([`ForwardPass::attend_shard`], so a GPU model computes on its device), asked in turn. For tests and tools; serving
/// reaches members over the network (the attention worker's `RemoteContext`).
pub struct LocalShards {
    local_end: usize,
    members: Vec<(Arc<dyn ForwardPass>, Mutex<KvCache>)>,
}

impl LocalShards {
    /// The owner keeps `0 .. local_end`; each member the range of its shard cache ([`KvCache::shard`]).
    pub fn new(local_end: usize, members: Vec<(Arc<dyn ForwardPass>, KvCache)>) -> Self {
        Self { local_end, members: members.into_iter().map(|(model, shard)| (model, Mutex::new(shard))).collect() }
    }

    /// Member `index`'s shard cache (to look at what it holds).
    pub fn member(&self, index: usize) -> Option<MutexGuard<'_, KvCache>> {
        // A panic while a shard was locked left it as a failed step does: still usable.
        self.members.get(index).map(|(_, shard)| shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl std::fmt::Debug for LocalShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalShards(owner 0..{}, {} members)", self.local_end, self.members.len())
    }
}

impl ContextShards for LocalShards {
    fn local_end(&self) -> usize {
        self.local_end
    }

    fn attend(
        &self,
        layer: usize,
        positions: &[usize],
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> Result<Vec<PartialOutput>, ModelError> {
        (0..self.members.len())
            .map(|index| {
                let model = &self.members[index].0;
                let mut shard = self.member(index).ok_or_else(|| ModelError::InvalidInput {
                    what: "context shard".into(),
                    reason: format!("no member {index}"),
                })?;
                let range = shard.global_range();
                let kv_dim = model.config().kv_dim();
                let held: Vec<usize> = (0..positions.len()).filter(|&t| range.contains(&positions[t])).collect();
                let kv_positions: Vec<usize> = held.iter().map(|&t| positions[t]).collect();
                let rows = |all: &[f32]| -> Vec<f32> {
                    held.iter().flat_map(|&t| all[t * kv_dim..(t + 1) * kv_dim].iter().copied()).collect()
                };
                let (keys, values) = (rows(keys), rows(values));
                let step = ShardStep {
                    layer,
                    query_positions: positions,
                    queries,
                    kv_positions: &kv_positions,
                    keys: &keys,
                    values: &values,
                };
                model.attend_shard(&mut shard, &step)
            })
            .collect()
    }
}
