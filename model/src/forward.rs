//! The Llama 4 text forward pass on CPU.
//!
//! Pre-norm decoder layers: `h = x + o_proj(attn(rmsnorm(x)))`, `out = h + ffn(rmsnorm(h))`, where `ffn` is a dense
//! SwiGLU MLP or an MoE block (top-1 sigmoid router whose score scales the expert input, plus a shared expert). RoPE
//! layers rotate q/k with interleaved pairs and attend within fixed absolute chunks; NoPE layers attend globally and
//! scale q by the temperature factor. Sequences are processed as a batch: projections and experts run once over the
//! tokens of all sequences, attention per sequence against its own paged [`KvCache`].

use std::sync::Arc;

use rayon::prelude::*;
use switchyard_kernels::{
    activation::silu_mul,
    attention::{merge_partials, paged_attention, AttentionMask, AttentionShape, PartialAttention},
    norm::{rms_norm, rms_norm_unweighted_in_place},
    rope::rope_interleaved_in_place,
    router::top1,
};

use crate::checkpoint::Checkpoint;
use crate::config::{ModelConfig, TextConfig};
use crate::context::{PartialOutput, ShardStep};
use crate::experts::{ActivationPrecision, LocalExperts, RoutedExperts};
use crate::kv::{KvBlockPool, KvCache};
use crate::linear::LinearWeight;
use crate::rope::{inverse_frequencies, temperature_factor};
use crate::ModelError;

/// A SwiGLU MLP: the dense layers' FFN and the MoE layers' shared expert.
pub struct Mlp {
    /// `[intermediate, hidden]`.
    pub gate: LinearWeight,
    /// `[intermediate, hidden]`.
    pub up: LinearWeight,
    /// `[hidden, intermediate]`.
    pub down: LinearWeight,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))` over `tokens` rows.
    pub fn forward(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>, ModelError> {
        let gate = self.gate.apply(x, tokens)?;
        let up = self.up.apply(x, tokens)?;
        let mut activated = vec![0.0; gate.len()];
        silu_mul(&gate, &up, &mut activated)?;
        self.down.apply(&activated, tokens)
    }
}

/// The projections of one attention block.
pub struct AttentionWeights {
    /// `[q_heads * head_dim, hidden]`.
    pub q: LinearWeight,
    /// `[kv_heads * head_dim, hidden]`.
    pub k: LinearWeight,
    /// `[kv_heads * head_dim, hidden]`.
    pub v: LinearWeight,
    /// `[hidden, q_heads * head_dim]`.
    pub o: LinearWeight,
}

/// The feed-forward half of a decoder layer.
pub enum FeedForward {
    /// A dense SwiGLU MLP (`intermediate_size_mlp`).
    Dense(Mlp),
    /// Router + shared expert here; routed experts behind [`RoutedExperts`].
    Moe {
        /// `[experts, hidden]` router, no bias.
        router: LinearWeight,
        /// The shared expert, applied to every token.
        shared: Mlp,
    },
}

/// One decoder layer's weights.
pub struct DecoderLayer {
    /// RMSNorm before attention.
    pub input_norm: Vec<f32>,
    /// RMSNorm before the feed-forward block.
    pub post_attention_norm: Vec<f32>,
    /// q, k, v, o.
    pub attention: AttentionWeights,
    /// Dense MLP or MoE.
    pub feed_forward: FeedForward,
}

/// Which experts a process loads (the attention side of a disaggregated deployment loads none).
#[derive(Debug, Clone, Default)]
pub enum ExpertSelection {
    /// Every expert of every MoE layer (single-process serving).
    #[default]
    All,
    /// No routed expert: they are computed elsewhere through a [`RoutedExperts`] supplied later.
    None,
}

/// Options for [`Llama4Model::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Which routed experts to load.
    pub experts: ExpertSelection,
    /// Activation precision for FP8 experts.
    pub activation_precision: ActivationPrecision,
}

/// Which positions of a step produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every token of the step (prompt logits).
    All,
    /// Only the step's last token (decode).
    Last,
    /// None: a prefill chunk that is not the prompt's last (its sequence gets an empty vector).
    None,
}

/// One sequence's part of a batched step: its new tokens and its cache.
pub struct SequenceStep<'a> {
    /// Token ids to append (prompt or decoded tokens).
    pub tokens: &'a [u32],
    /// The sequence's cache; advanced by `tokens.len()`.
    pub cache: &'a mut KvCache,
    /// Which logits to return.
    pub logits: LogitsFor,
}

/// A forward pass over batched sequence steps, wherever it runs: [`Llama4Model`] on the CPU,
/// `GpuModel` on a CUDA GPU. Generation and serving drive either through this.
pub trait ForwardPass: Send + Sync {
    /// The text config the model was loaded with.
    fn config(&self) -> &TextConfig;

    /// A fresh KV cache for one sequence, in a pool this model can attend over.
    fn new_cache(&self) -> Result<KvCache, ModelError>;

    /// One step for a batch of sequences, as [`Llama4Model::forward_batch`] (same contract: on error no cache has
    /// advanced; an empty batch still makes one [`RoutedExperts::compute`] per MoE layer, which ranks in lockstep
    /// rely on).
    fn forward_batch(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>, ModelError>;

    /// The pool a serving engine's sequences take their KV blocks from: `capacity` blocks of `block_size` positions.
    /// On the CPU a new bounded pool; a model whose KV lives elsewhere (a GPU arena) answers its own pool, or an
    /// error when the sizes differ from what it holds.
    fn kv_pool(&self, block_size: usize, capacity: usize) -> Result<Arc<KvBlockPool>, ModelError> {
        KvBlockPool::new(self.config(), block_size, capacity)
    }

    /// One step for one sequence, returning logits `[positions, vocab]`.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache, logits: LogitsFor) -> Result<Vec<f32>, ModelError> {
        let mut out = self.forward_batch(&mut [SequenceStep { tokens, cache, logits }])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// A member's step of a context-parallel sequence on one global layer, as [`crate::context::attend_shard`] (same
    /// contract and errors): stores the step's keys and values in `shard` (a [`KvCache::shard`] from this
    /// model's pool), returns the partial attention of `queries` over the shard. The default computes it on the
    /// CPU; a model whose KV lives elsewhere (a GPU arena) computes it there.
    fn attend_shard(&self, shard: &mut KvCache, step: &ShardStep<'_>) -> Result<PartialOutput, ModelError> {
        crate::context::attend_shard(self.config(), shard, step)
    }
}

impl ForwardPass for Llama4Model {
    fn config(&self) -> &TextConfig {
        Llama4Model::config(self)
    }

    fn new_cache(&self) -> Result<KvCache, ModelError> {
        Llama4Model::new_cache(self)
    }

    fn forward_batch(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        Llama4Model::forward_batch(self, batch)
    }
}

/// A shared model is the model: callers holding an `Arc` pass it as it is.
impl<M: ForwardPass + ?Sized> ForwardPass for Arc<M> {
    fn config(&self) -> &TextConfig {
        (**self).config()
    }

    fn new_cache(&self) -> Result<KvCache, ModelError> {
        (**self).new_cache()
    }

    fn forward_batch(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        (**self).forward_batch(batch)
    }

    fn kv_pool(&self, block_size: usize, capacity: usize) -> Result<Arc<KvBlockPool>, ModelError> {
        (**self).kv_pool(block_size, capacity)
    }

    fn attend_shard(&self, shard: &mut KvCache, step: &ShardStep<'_>) -> Result<PartialOutput, ModelError> {
        (**self).attend_shard(shard, step)
    }
}

/// A loaded Llama 4 text model.
pub struct Llama4Model {
    pub(crate) config: TextConfig,
    /// `[vocab, hidden]`.
    pub(crate) embed_tokens: Vec<f32>,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: LinearWeight,
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) routed: Arc<dyn RoutedExperts>,
}

impl Llama4Model {
    /// Loads the model from an opened checkpoint, checking every tensor against the config. `progress` is told
    /// (tensors done, tensors total).
    pub fn load(
        checkpoint: &Checkpoint,
        config: &ModelConfig,
        options: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let text = &config.text;
        text.validate()?;
        checkpoint.check_against(text)?;
        let hidden = text.hidden_size;
        let layer_count = text.num_hidden_layers;
        let moe_layers = (0..layer_count).filter(|&l| text.is_moe_layer(l)).count();
        let experts_to_load = match options.experts {
            ExpertSelection::All => text.num_local_experts,
            ExpertSelection::None => 0,
        };
        let total = 3 + layer_count + moe_layers * experts_to_load;
        let mut done = 0;
        let mut tick = |progress: &mut dyn FnMut(usize, usize)| {
            done += 1;
            progress(done, total);
        };

        let embed_tokens = checkpoint.tensor_f32("model.embed_tokens.weight", &[text.vocab_size, hidden])?;
        tick(progress);
        let mut layers = Vec::with_capacity(layer_count);
        let mut local = LocalExperts::new(options.activation_precision);
        for l in 0..layer_count {
            let p = format!("model.layers.{l}");
            let attention = AttentionWeights {
                q: checkpoint.linear(&format!("{p}.self_attn.q_proj.weight"), text.q_dim(), hidden)?,
                k: checkpoint.linear(&format!("{p}.self_attn.k_proj.weight"), text.kv_dim(), hidden)?,
                v: checkpoint.linear(&format!("{p}.self_attn.v_proj.weight"), text.kv_dim(), hidden)?,
                o: checkpoint.linear(&format!("{p}.self_attn.o_proj.weight"), hidden, text.q_dim())?,
            };
            let mlp = |prefix: &str, intermediate: usize| -> Result<Mlp, ModelError> {
                Ok(Mlp {
                    gate: checkpoint.linear(&format!("{prefix}.gate_proj.weight"), intermediate, hidden)?,
                    up: checkpoint.linear(&format!("{prefix}.up_proj.weight"), intermediate, hidden)?,
                    down: checkpoint.linear(&format!("{prefix}.down_proj.weight"), hidden, intermediate)?,
                })
            };
            let feed_forward = if text.is_moe_layer(l) {
                FeedForward::Moe {
                    router: checkpoint.linear(
                        &format!("{p}.feed_forward.router.weight"),
                        text.num_local_experts,
                        hidden,
                    )?,
                    shared: mlp(&format!("{p}.feed_forward.shared_expert"), text.intermediate_size)?,
                }
            } else {
                FeedForward::Dense(mlp(&format!("{p}.feed_forward"), text.intermediate_size_mlp)?)
            };
            layers.push(DecoderLayer {
                input_norm: checkpoint.tensor_f32(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                post_attention_norm: checkpoint
                    .tensor_f32(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                attention,
                feed_forward,
            });
            tick(progress);
            if text.is_moe_layer(l) {
                for e in 0..experts_to_load {
                    local.insert(l, e as u32, checkpoint.expert(l, e, text)?);
                    tick(progress);
                }
            }
        }
        let norm = checkpoint.tensor_f32("model.norm.weight", &[hidden])?;
        tick(progress);
        let lm_head = if text.tie_word_embeddings && !checkpoint.contains("lm_head.weight") {
            LinearWeight::F32 { weight: embed_tokens.clone(), out_features: text.vocab_size, in_features: hidden }
        } else {
            checkpoint.linear("lm_head.weight", text.vocab_size, hidden)?
        };
        tick(progress);
        Ok(Self {
            config: text.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq: inverse_frequencies(text),
            routed: Arc::new(local),
        })
    }

    /// The text config the model was loaded with.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// Replaces where routed experts are computed (e.g. a dispatch client to expert workers).
    pub fn set_routed_experts(&mut self, routed: Arc<dyn RoutedExperts>) {
        self.routed = routed;
    }

    /// A fresh KV cache for one sequence, with a pool of its own that never runs out (offline use and tests; the
    /// serving engine shares one bounded pool between its sequences).
    pub fn new_cache(&self) -> Result<KvCache, ModelError> {
        KvCache::new(&self.config)
    }

    /// Runs one step for one sequence, returning logits `[positions, vocab]`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, logits: LogitsFor) -> Result<Vec<f32>, ModelError> {
        let mut out = self.forward_batch(&mut [SequenceStep { tokens, cache, logits }])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Runs one step for a batch of sequences. Returns, per sequence, logits `[positions, vocab]` where positions are
    /// all its new tokens or only the last one. Each cache must hold (or be able to take from its pool) the blocks for
    /// its new tokens: [`KvCache::reserve`]. On error no cache has advanced, and the step can be retried.
    ///
    /// An empty batch still runs every layer on no rows, so it makes exactly one [`RoutedExperts::compute`] (of no
    /// rows) per MoE layer and returns no logits: a lockstep engine's empty micro-batch relies on it to make its steps.
    pub fn forward_batch(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.config;
        let hidden = cfg.hidden_size;
        for (i, step) in batch.iter().enumerate() {
            validate_step(&self.config, i, step)?;
        }
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut x = Vec::with_capacity(tokens * hidden);
        for step in batch.iter() {
            for &t in step.tokens {
                let row = t as usize * hidden;
                x.extend_from_slice(&self.embed_tokens[row..row + hidden]);
            }
        }
        for step in batch.iter_mut() {
            step.cache.reserve(step.tokens.len())?;
        }
        // New keys go into blocks past each cache's length; the length moves (and chunked layers release blocks) only
        // once the whole step succeeded, so a failed step (e.g. a lost expert worker) leaves every sequence where it
        // was and can be retried over the same blocks.
        let mut normed = vec![0.0; x.len()];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps as f32, &mut normed)?;
            let attended = self.attention_block(l, layer, &normed, batch)?;
            for (xi, ai) in x.iter_mut().zip(&attended) {
                *xi += ai;
            }
            rms_norm(&x, &layer.post_attention_norm, cfg.rms_norm_eps as f32, &mut normed)?;
            let ff = self.feed_forward(l, layer, &normed, tokens)?;
            for (xi, fi) in x.iter_mut().zip(&ff) {
                *xi += fi;
            }
        }
        for step in batch.iter_mut() {
            step.cache.advance(step.tokens.len());
        }
        // Final norm and lm_head only on the rows whose logits are wanted.
        let wanted: Vec<usize> = wanted_rows(batch).into_iter().flatten().collect();
        let mut rows = Vec::with_capacity(wanted.len() * hidden);
        for &r in &wanted {
            rows.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        let logits = if wanted.is_empty() {
            Vec::new()
        } else {
            let mut final_normed = vec![0.0; rows.len()];
            rms_norm(&rows, &self.norm, cfg.rms_norm_eps as f32, &mut final_normed)?;
            self.lm_head.apply(&final_normed, wanted.len())?
        };
        Ok(logits_per_sequence(batch, &logits, cfg.vocab_size))
    }

    fn attention_block(
        &self,
        l: usize,
        layer: &DecoderLayer,
        normed: &[f32],
        batch: &mut [SequenceStep<'_>],
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.config;
        let tokens = normed.len() / cfg.hidden_size;
        let (hd, qh, kvh) = (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut q = layer.attention.q.apply(normed, tokens)?;
        let mut k = layer.attention.k.apply(normed, tokens)?;
        let v = layer.attention.v.apply(normed, tokens)?;
        let uses_rope = cfg.uses_rope(l);
        let mask = if cfg.is_chunked_attention(l) {
            AttentionMask::Chunked { chunk: cfg.attention_chunk_size.unwrap_or(usize::MAX) }
        } else {
            AttentionMask::Causal
        };
        let shape = AttentionShape { q_heads: qh, kv_heads: kvh, head_dim: hd };
        let scale = 1.0 / (hd as f32).sqrt();

        let mut positions = Vec::with_capacity(tokens);
        for step in batch.iter() {
            positions.extend(step.cache.len()..step.cache.len() + step.tokens.len());
        }
        if uses_rope {
            rope_interleaved_in_place(&mut q, &positions, qh, hd, &self.inv_freq)?;
            rope_interleaved_in_place(&mut k, &positions, kvh, hd, &self.inv_freq)?;
            if cfg.use_qk_norm {
                let eps = cfg.rms_norm_eps as f32;
                rms_norm_unweighted_in_place(&mut q, hd, eps)?;
                rms_norm_unweighted_in_place(&mut k, hd, eps)?;
            }
        } else if cfg.attn_temperature_tuning {
            for (row, &pos) in q.chunks_exact_mut(qh * hd).zip(&positions) {
                let factor = temperature_factor(cfg, pos);
                row.iter_mut().for_each(|v| *v *= factor);
            }
        }

        let q_dim = qh * hd;
        let kv_dim = kvh * hd;
        let mut attended = vec![0.0; tokens * q_dim];
        // Split the batch's rows per sequence, then write and attend each sequence's own blocks in parallel.
        let mut work = Vec::with_capacity(batch.len());
        let mut rest_out = &mut attended[..];
        let mut offset = 0;
        for step in batch.iter_mut() {
            let n = step.tokens.len();
            let (out, rest) = rest_out.split_at_mut(n * q_dim);
            rest_out = rest;
            work.push((&mut *step.cache, out, offset..offset + n));
            offset += n;
        }
        let global = !cfg.is_chunked_attention(l);
        work.into_par_iter().try_for_each(|(cache, out, rows)| -> Result<(), ModelError> {
            for (row, &position) in rows.clone().zip(&positions[rows.clone()]) {
                if cache.holds(l, position) {
                    let kv = row * kv_dim..(row + 1) * kv_dim;
                    cache.write(l, position, &k[kv.clone()], &v[kv])?;
                }
            }
            let end = positions[rows.end - 1] + 1;
            let (q_rows, kv_rows) = (rows.start * q_dim..rows.end * q_dim, rows.start * kv_dim..rows.end * kv_dim);
            let shards = cache.context().filter(|_| global).cloned();
            let Some(shards) = shards else {
                paged_attention(&q[q_rows], &positions[rows], cache.paged(l, end), shape, mask, scale, out, None)?;
                return Ok(());
            };
            // A context-parallel sequence: this worker's range and every member's, merged exactly by log-sum-exp.
            // The members' requests leave first, so their round trip and computation overlap this worker's own.
            let (step_positions, queries) = (&positions[rows.clone()], &q[q_rows]);
            let pending = shards.start_attend(l, step_positions, queries, &k[kv_rows.clone()], &v[kv_rows]);
            let mut local = PartialOutput { out: vec![0.0; out.len()], lse: vec![0.0; rows.len() * qh] };
            let computed = paged_attention(
                queries,
                step_positions,
                cache.paged(l, end),
                shape,
                mask,
                scale,
                &mut local.out,
                Some(&mut local.lse),
            );
            // Wait for the members even when the local part failed, so no answer arrives for a step already gone.
            let remote = pending.wait();
            computed?;
            let remote = remote?;
            let parts: Vec<PartialAttention<'_>> =
                std::iter::once(&local).chain(&remote).map(|p| PartialAttention { out: &p.out, lse: &p.lse }).collect();
            merge_partials(&parts, hd, out, None)?;
            Ok(())
        })?;
        layer.attention.o.apply(&attended, tokens)
    }

    fn feed_forward(
        &self,
        l: usize,
        layer: &DecoderLayer,
        normed: &[f32],
        tokens: usize,
    ) -> Result<Vec<f32>, ModelError> {
        match &layer.feed_forward {
            FeedForward::Dense(mlp) => mlp.forward(normed, tokens),
            FeedForward::Moe { router, shared } => {
                let hidden = self.config.hidden_size;
                let logits = router.apply(normed, tokens)?;
                let choices = top1(&logits, self.config.num_local_experts)?;
                let mut routed_in = normed.to_vec();
                let mut experts = Vec::with_capacity(tokens);
                for (row, (expert, logit)) in routed_in.chunks_exact_mut(hidden).zip(choices) {
                    let score = 1.0 / (1.0 + (-logit).exp());
                    row.iter_mut().for_each(|v| *v *= score);
                    experts.push(expert);
                }
                let (routed, shared_out) = rayon::join(
                    || self.routed.compute(l, &routed_in, &experts, hidden),
                    || shared.forward(normed, tokens),
                );
                let mut out = shared_out?;
                for (o, r) in out.iter_mut().zip(routed?) {
                    *o += r;
                }
                Ok(out)
            }
        }
    }
}

/// The checks every forward pass makes of one sequence's step before touching anything: tokens present and in the
/// vocabulary, the context within the model's limit, a cache made for this model's layers.
pub(crate) fn validate_step(cfg: &TextConfig, index: usize, step: &SequenceStep<'_>) -> Result<(), ModelError> {
    if step.tokens.is_empty() {
        return Err(ModelError::InvalidInput {
            what: format!("sequence {index} of the batch"),
            reason: "no tokens to process".into(),
        });
    }
    if let Some(&bad) = step.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(ModelError::InvalidInput {
            what: "token id".into(),
            reason: format!("token id {bad} is outside the vocabulary (vocab_size {})", cfg.vocab_size),
        });
    }
    let end = step.cache.len() + step.tokens.len();
    if end > cfg.max_position_embeddings {
        return Err(ModelError::InvalidInput {
            what: "context length".into(),
            reason: format!(
                "{end} tokens ({} cached + {} new) exceed the model's max_position_embeddings {}",
                step.cache.len(),
                step.tokens.len(),
                cfg.max_position_embeddings
            ),
        });
    }
    if step.cache.layers() != cfg.num_hidden_layers {
        return Err(ModelError::InvalidInput {
            what: "KV cache".into(),
            reason: format!("cache has {} layers, the model {}", step.cache.layers(), cfg.num_hidden_layers),
        });
    }
    Ok(())
}

/// The rows of a step's batch (tokens of all sequences, in order) whose logits are wanted, as one range per
/// sequence that wants any: all its tokens, or its last.
pub(crate) fn wanted_rows(batch: &[SequenceStep<'_>]) -> Vec<std::ops::Range<usize>> {
    let mut wanted = Vec::new();
    let mut offset = 0;
    for step in batch {
        let n = step.tokens.len();
        match step.logits {
            LogitsFor::All => wanted.push(offset..offset + n),
            LogitsFor::Last => wanted.push(offset + n - 1..offset + n),
            LogitsFor::None => {}
        }
        offset += n;
    }
    wanted
}

/// The logits of [`wanted_rows`] (`[rows, vocab]`) split back per sequence (empty for those that wanted none).
pub(crate) fn logits_per_sequence(batch: &[SequenceStep<'_>], logits: &[f32], vocab: usize) -> Vec<Vec<f32>> {
    let mut result = Vec::with_capacity(batch.len());
    let mut row = 0;
    for step in batch {
        let n = match step.logits {
            LogitsFor::All => step.tokens.len(),
            LogitsFor::Last => 1,
            LogitsFor::None => 0,
        };
        result.push(logits[row * vocab..(row + n) * vocab].to_vec());
        row += n;
    }
    result
}
