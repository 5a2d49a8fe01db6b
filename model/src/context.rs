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

use crate::config::TextConfig;
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

/// What a member computes for one global layer of a step of a sequence whose positions `shard.global_range()` it
/// holds: stores the keys and values (`[kv_positions, kv_dim]`) of the step's positions in that range, then returns
/// its partial attention of `queries` (`[query_positions, q_dim]`) over every key it holds up to each query's
/// position. Repeating a step (after a failure elsewhere) writes the same keys again and returns the same partials.
#[allow(clippy::too_many_arguments)]
pub fn attend_shard(
    config: &TextConfig,
    shard: &mut KvCache,
    layer: usize,
    query_positions: &[usize],
    queries: &[f32],
    kv_positions: &[usize],
    keys: &[f32],
    values: &[f32],
) -> Result<PartialOutput, ModelError> {
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
    if let Some(&last) = kv_positions.iter().max() {
        let grow = (last + 1).saturating_sub(shard.len());
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
