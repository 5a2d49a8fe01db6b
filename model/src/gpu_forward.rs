//! The whole forward pass on one CUDA GPU: [`GpuModel`] holds a [`Llama4Model`]'s dense weights on the device (f32 or
//! bf16, [`DenseDtype`]) and its KV cache in a device arena (f32 or bf16, [`KvDtype`]), and implements [`ForwardPass`]
//! with exactly [`Llama4Model::forward_batch`]'s contract (the same validation errors, no cache advanced on error, the
//! same [`LogitsFor`] handling).
//!
//! A step on the device, per layer: RMS norm; q, k, v projections; RoPE (and the weightless qk-norm) or the NoPE
//! temperature scale; the new keys and values written into the paged arena at their slots; paged decode attention
//! with one "sequence" row per query token (its own length `position + 1`, naming its sequence's block-table row,
//! so a prefill runs through the decode kernel); the output projection added into the residual; RMS norm;
//! then a dense SwiGLU MLP (gate and up fused into one GEMM) or an MoE block. The MoE block's router runs on the GPU
//! in f32 (whatever the dense dtype: a top-1 choice is discontinuous in its logits), then the router logits and the
//! normed rows come to the host, where the choice and the sigmoid score are computed as the CPU forward pass does
//! ([`top1`]), and the routed experts are computed by the model's [`RoutedExperts`] (`GpuExperts` on the same GPU,
//! expert workers, or host experts) while the shared expert runs on the GPU; their outputs are added on the device.
//! Final norm and `lm_head` run only on the rows whose logits are wanted.
//!
//! Per-step buffers are allocated for the step (cudarc's stream-ordered allocator) and every kernel runs on the
//! device's one stream, so each sees its predecessors' results; host reads are `download`s, which wait for the
//! stream. The step ends with a synchronisation, and caches advance only after it, so a kernel failure reported late
//! still leaves every sequence where it was.
//!
//! Context parallelism: for the owner of a context-parallel sequence (a cache with [`KvCache::context`]), the arena
//! holds its global layers' positions `0 .. local_end` only: later positions get the slot [`NOT_HELD`], which
//! `kv_write` skips, and each query row sees keys up to `min(position + 1, local_end)` (the key limits of the step's
//! tables). On a global layer the sequence's queries and new keys and values come to the host and go to its members
//! ([`crate::context::ContextShards::start_attend`]) before the local attention is queued; the local partial (the
//! kernel's output and log-sum-exp) comes back, is merged with the members' exactly on the host
//! ([`merge_partials`]) and goes up into the attended rows. As a member, [`ForwardPass::attend_shard`] keeps the
//! shard in the arena and computes its partial with the same kernels.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use switchyard_kernels::attention::{merge_partials, PartialAttention};
use switchyard_kernels::device::{
    CudaDevice, CudaSlice, CudaView, CudaViewMut, DenseDtype, DenseWeight, Device, KvDtype, KvElement, KvWrite,
    PagedDecode,
};
use switchyard_kernels::fp8::dequantize_rows;
use switchyard_kernels::router::top1;
use switchyard_kernels::KernelError;

use crate::config::TextConfig;
use crate::context::{check_shard_step, PartialOutput, PendingPartials, ShardStep};
use crate::experts::RoutedExperts;
use crate::forward::{
    logits_per_sequence, validate_step, wanted_rows, FeedForward, ForwardPass, Llama4Model, Mlp, SequenceStep,
};
use crate::kv::{KvBlockPool, KvCache, DEFAULT_BLOCK_SIZE};
use crate::linear::LinearWeight;
use crate::rope::temperature_factor;
use crate::ModelError;

/// How [`GpuModel::upload`] lays the model out on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuModelOptions {
    /// Element type of the dense weights (attention projections, dense MLPs, shared experts, embedding, `lm_head`;
    /// routers always stay f32).
    pub dense_dtype: DenseDtype,
    /// Blocks of the device KV arena, shared by every sequence of the model ([`KvCache::blocks_for_sequence`] says
    /// what one sequence needs; [`KvBlockPool::blocks_in_bytes_for_dtype`] how many fit a memory budget).
    pub kv_blocks: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Element type of the KV arena: keys and values are computed in f32 and stored as this (bf16: rounded to
    /// nearest even as written, widened to f32 as attention reads them).
    pub kv_dtype: KvDtype,
}

impl Default for GpuModelOptions {
    /// Bf16 dense weights, and 1024 blocks of [`DEFAULT_BLOCK_SIZE`] positions of bf16 KV.
    fn default() -> Self {
        Self { dense_dtype: DenseDtype::Bf16, kv_blocks: 1024, block_size: DEFAULT_BLOCK_SIZE, kv_dtype: KvDtype::Bf16 }
    }
}

/// The device KV arena, `capacity * block_floats` elements of its dtype (bf16 as raw bits).
enum KvArena {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl KvArena {
    /// Bytes on the device.
    fn bytes(&self) -> usize {
        match self {
            KvArena::F32(pool) => pool.len() * 4,
            KvArena::Bf16(pool) => pool.len() * 2,
        }
    }

    /// Writes a layer's new keys and values into the arena, then queues the attention over it into `out` and `lse`.
    fn write_and_attend(
        &mut self,
        dev: &CudaDevice,
        layer: &LayerAttention<'_>,
        out: &mut CudaViewMut<'_, f32>,
        lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        match self {
            KvArena::F32(pool) => layer.run(dev, pool, out, lse),
            KvArena::Bf16(pool) => layer.run(dev, pool, out, lse),
        }
    }
}

/// One layer's KV write and paged attention in a step: the shapes and the device buffers they read (everything but
/// the arena, whose element type picks the kernels, and the outputs).
struct LayerAttention<'a> {
    kv_shape: KvWrite,
    shape: PagedDecode,
    q: CudaView<'a, f32>,
    k: CudaView<'a, f32>,
    v: CudaView<'a, f32>,
    slots: CudaView<'a, u32>,
    table: CudaView<'a, u32>,
    table_row: CudaView<'a, u32>,
    first_block: CudaView<'a, u32>,
    seq_len: CudaView<'a, u32>,
    positions: CudaView<'a, u32>,
}

impl LayerAttention<'_> {
    fn run<T: KvElement>(
        &self,
        dev: &CudaDevice,
        pool: &mut CudaSlice<T>,
        out: &mut CudaViewMut<'_, f32>,
        lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        dev.kv_write(&self.kv_shape, &mut pool.as_view_mut(), &self.k, &self.v, &self.slots)?;
        dev.paged_decode_attention(
            &self.shape,
            &self.q,
            &pool.as_view(),
            &self.table,
            &self.table_row,
            &self.first_block,
            &self.seq_len,
            &self.positions,
            out,
            lse,
        )
    }
}

/// A SwiGLU MLP on the device: gate and up fused into one `[2 * intermediate, hidden]` weight (gate rows first).
struct GpuMlp {
    gate_up: DenseWeight,
    down: DenseWeight,
    intermediate: usize,
}

enum GpuFeedForward {
    Dense(GpuMlp),
    Moe {
        /// `[experts, hidden]`, always f32.
        router: DenseWeight,
        shared: GpuMlp,
    },
}

struct GpuLayer {
    input_norm: CudaSlice<f32>,
    post_attention_norm: CudaSlice<f32>,
    q: DenseWeight,
    k: DenseWeight,
    v: DenseWeight,
    o: DenseWeight,
    feed_forward: GpuFeedForward,
}

/// A Llama 4 text model whose forward pass runs on one CUDA GPU (see the module docs).
pub struct GpuModel {
    config: TextConfig,
    device: Arc<CudaDevice>,
    dense_dtype: DenseDtype,
    kv_dtype: KvDtype,
    /// `[vocab, hidden]`.
    embed_tokens: DenseWeight,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<f32>,
    lm_head: DenseWeight,
    inv_freq: CudaSlice<f32>,
    /// Hands out the arena's block indices.
    pool: Arc<KvBlockPool>,
    /// The KV arena: `pool.capacity()` blocks of `pool.block_floats()` values (f32 or bf16). The lock is held only
    /// while a layer's KV write and attention are queued: two steps (the engine's micro-batches) touch disjoint
    /// blocks, and the one stream orders a block's reuse after the kernels that read it, so one micro-batch's kernels
    /// run while the other waits for its routed experts (the ping-pong overlap).
    kv: Mutex<KvArena>,
    routed: Arc<dyn RoutedExperts>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuModel({} layers, {} dense weights, {} KV blocks of {}, {:?})",
            self.layers.len(),
            self.dense_dtype,
            self.pool.capacity(),
            self.kv_dtype,
            self.device
        )
    }
}

/// A weight's values as f32 on the host: FP8 weights are dequantised (codes times their row's scale).
fn host_f32<'a>(weight: &'a LinearWeight, name: &str) -> Result<Cow<'a, [f32]>, ModelError> {
    match weight {
        LinearWeight::F32 { weight, .. } => Ok(Cow::Borrowed(weight.as_slice())),
        LinearWeight::Fp8 { codes, scales, out_features, in_features } => {
            let values = out_features.checked_mul(*in_features);
            if values != Some(codes.len()) || scales.len() != *out_features {
                return Err(ModelError::InvalidInput {
                    what: format!("weight {name}"),
                    reason: format!(
                        "{} FP8 codes and {} scales for {out_features} x {in_features}",
                        codes.len(),
                        scales.len()
                    ),
                });
            }
            let mut out = vec![0.0; codes.len()];
            dequantize_rows(codes.as_slice(), *in_features, scales, &mut out);
            Ok(Cow::Owned(out))
        }
    }
}

/// Uploads `weight`, which must be `[n, k]`.
fn upload_linear(
    device: &Arc<CudaDevice>,
    weight: &LinearWeight,
    n: usize,
    k: usize,
    dtype: DenseDtype,
    name: &str,
) -> Result<DenseWeight, ModelError> {
    if weight.out_features() != n || weight.in_features() != k {
        return Err(ModelError::InvalidInput {
            what: format!("weight {name}"),
            reason: format!("{weight:?}, expected {n}x{k}"),
        });
    }
    Ok(DenseWeight::upload(device, &host_f32(weight, name)?, n, k, dtype)?)
}

/// Uploads an MLP with gate and up fused.
fn upload_mlp(
    device: &Arc<CudaDevice>,
    mlp: &Mlp,
    hidden: usize,
    intermediate: usize,
    dtype: DenseDtype,
    name: &str,
) -> Result<GpuMlp, ModelError> {
    for (part, weight) in [("gate", &mlp.gate), ("up", &mlp.up)] {
        if weight.out_features() != intermediate || weight.in_features() != hidden {
            return Err(ModelError::InvalidInput {
                what: format!("weight {name}.{part}"),
                reason: format!("{weight:?}, expected {intermediate}x{hidden}"),
            });
        }
    }
    let mut gate_up = Vec::with_capacity(2 * intermediate * hidden);
    gate_up.extend_from_slice(&host_f32(&mlp.gate, name)?);
    gate_up.extend_from_slice(&host_f32(&mlp.up, name)?);
    Ok(GpuMlp {
        gate_up: DenseWeight::upload(device, &gate_up, 2 * intermediate, hidden, dtype)?,
        down: upload_linear(device, &mlp.down, hidden, intermediate, dtype, &format!("{name}.down"))?,
        intermediate,
    })
}

/// Every layer's [`layer_tables`] for one step, one after the other in `meta`, so the step uploads them once (one host
/// to device copy that waits for the stream, instead of one per layer inside the layer loop).
struct StepTables {
    meta: Vec<u32>,
    /// Per layer: where its part of `meta` starts, and its `max_blocks`.
    layers: Vec<(usize, usize)>,
}

impl StepTables {
    fn build(layers: usize, batch: &[SequenceStep<'_>]) -> Result<Self, ModelError> {
        let mut meta = Vec::new();
        let mut parts = Vec::with_capacity(layers);
        for l in 0..layers {
            let (layer, max_blocks) = layer_tables(l, batch)?;
            parts.push((meta.len(), max_blocks));
            meta.extend_from_slice(&layer);
        }
        Ok(Self { meta, layers: parts })
    }
}

/// The slot that [`layer_tables`] gives a position its sequence does not hold on a layer (another member's range of a
/// context-parallel sequence): `kv_write` skips any slot past the pool, and no slot of a pool the tables fit is this.
const NOT_HELD: u32 = u32::MAX;

/// Layer `l`'s slots, first blocks, block-table rows and key limits for the step's query rows, packed for one upload:
/// `[slots (tokens) | first_block (tokens) | table_row (tokens) | key_end (tokens) | table (sequences x
/// max_blocks)]`: one table row per sequence, which all its query rows name (a prefill's table is not repeated per
/// query). A row's keys end at `key_end`: `position + 1`, or, on a global layer of a context-parallel sequence, the
/// end of the range held here (the rest is the members', merged on the host), so the kernel reads only held blocks.
/// A position not held here gets the slot [`NOT_HELD`]. Returns it and `max_blocks`.
fn layer_tables(l: usize, batch: &[SequenceStep<'_>]) -> Result<(Vec<u32>, usize), ModelError> {
    let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
    let tables = batch.iter().map(|s| s.cache.block_table(l)).collect::<Result<Vec<_>, _>>()?;
    let max_blocks = tables.iter().map(|t| t.blocks.len()).max().unwrap_or(0).max(1);
    let mut meta = vec![0u32; 4 * tokens + batch.len() * max_blocks];
    let (slots, rest) = meta.split_at_mut(tokens);
    let (first, rest) = rest.split_at_mut(tokens);
    let (table_row, rest) = rest.split_at_mut(tokens);
    let (key_end, table) = rest.split_at_mut(tokens);
    let too_large = |what: &str, value: usize| ModelError::InvalidInput {
        what: "KV cache".into(),
        reason: format!("{what} {value} of layer {l} exceeds the GPU kernels' u32 indices"),
    };
    let mut row = 0;
    for (s, (step, held)) in batch.iter().zip(&tables).enumerate() {
        let first_block = u32::try_from(held.first_block).map_err(|_| too_large("block", held.first_block))?;
        for (entry, &b) in table[s * max_blocks..].iter_mut().zip(&held.blocks) {
            *entry = u32::try_from(b).map_err(|_| too_large("block index", b))?;
        }
        // Sequences are few (a batch), so their index fits u32 whenever the tokens' slots do.
        let sequence_row = u32::try_from(s).map_err(|_| too_large("sequence", s))?;
        let held_end = step.cache.held_end(l);
        for position in step.cache.len()..step.cache.len() + step.tokens.len() {
            // A slot for the position means its block and every block from `first_block` to it are held: the
            // attention kernel reads nothing past the table row's held blocks.
            slots[row] = if step.cache.holds(l, position) {
                let slot = step.cache.slot(l, position)?;
                u32::try_from(slot).ok().filter(|&s| s != NOT_HELD).ok_or_else(|| too_large("slot", slot))?
            } else {
                NOT_HELD
            };
            first[row] = first_block;
            table_row[row] = sequence_row;
            // validate_step checked that every position + 1 fits u32.
            key_end[row] = (position + 1).min(held_end) as u32;
            row += 1;
        }
    }
    Ok((meta, max_blocks))
}

/// The members' answers for one context-parallel sequence of a step on a global layer: its query rows of the step.
struct MemberPartials {
    rows: Range<usize>,
    pending: PendingPartials,
}

/// For a global layer `l`: hands each context-parallel sequence's members its queries (ready to score) and new keys and
/// values of the step, read back from the device (`q`: `[tokens, q_dim]`, `k`, `v`: `[tokens, kv_dim]`). The
/// downloads wait for the stream, so the rows are final.
fn start_members(
    dev: &CudaDevice,
    l: usize,
    batch: &[SequenceStep<'_>],
    positions: &[u32],
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
) -> Result<Vec<MemberPartials>, ModelError> {
    let mut pending = Vec::new();
    let mut offset = 0;
    for step in batch {
        let rows = offset..offset + step.tokens.len();
        offset = rows.end;
        let Some(shards) = step.cache.context() else { continue };
        let q_dim = q.len() / positions.len();
        let kv_dim = k.len() / positions.len();
        let queries = dev.download_view(&q.slice(rows.start * q_dim..rows.end * q_dim))?;
        let keys = dev.download_view(&k.slice(rows.start * kv_dim..rows.end * kv_dim))?;
        let values = dev.download_view(&v.slice(rows.start * kv_dim..rows.end * kv_dim))?;
        let step_positions: Vec<usize> = positions[rows.clone()].iter().map(|&p| p as usize).collect();
        let started = shards.start_attend(l, &step_positions, &queries, &keys, &values);
        pending.push(MemberPartials { rows, pending: started });
    }
    Ok(pending)
}

/// Merges each context-parallel sequence's local partial (its rows of `attended` and `lse`, computed over the range
/// held here) with its members' answers exactly, and writes the merged rows back into `attended`. Every member is
/// waited for, even when `local` (the layer's own attention) failed, so no answer arrives for a step already gone.
fn merge_members(
    dev: &CudaDevice,
    head_dim: usize,
    q_heads: usize,
    pending: Vec<MemberPartials>,
    local: Result<(), ModelError>,
    attended: &mut CudaSlice<f32>,
    lse: &CudaSlice<f32>,
) -> Result<(), ModelError> {
    let mut answers = Vec::with_capacity(pending.len());
    for member in pending {
        answers.push((member.rows, member.pending.wait()));
    }
    local?;
    let q_dim = head_dim * q_heads;
    for (rows, remote) in answers {
        let remote = remote?;
        let values = rows.start * q_dim..rows.end * q_dim;
        let own = PartialOutput {
            out: dev.download_view(&attended.slice(values.clone()))?,
            lse: dev.download_view(&lse.slice(rows.start * q_heads..rows.end * q_heads))?,
        };
        let parts: Vec<PartialAttention<'_>> =
            std::iter::once(&own).chain(&remote).map(|p| PartialAttention { out: &p.out, lse: &p.lse }).collect();
        let mut merged = vec![0.0; values.len()];
        merge_partials(&parts, head_dim, &mut merged, None)?;
        dev.upload_into(&merged, &mut attended.slice_mut(values))?;
    }
    Ok(())
}

impl GpuModel {
    /// Copies `model`'s dense weights to GPU `device` (which must be `cuda:N`) and allocates a KV arena of
    /// `options.kv_blocks` blocks there. The routed experts stay whatever `model` computes them with until
    /// [`GpuModel::set_routed_experts`] (e.g. a `GpuExperts` on the same GPU). A build without the `cuda` feature or a
    /// machine without the GPU answers the kernels' error ([`ModelError::Kernel`]).
    pub fn upload(model: &Llama4Model, device: Device, options: &GpuModelOptions) -> Result<Self, ModelError> {
        let Device::Cuda(ordinal) = device else {
            return Err(ModelError::InvalidInput {
                what: "device".into(),
                reason: "the GPU forward pass needs a CUDA device (cuda:N); on the cpu use Llama4Model itself".into(),
            });
        };
        let cfg = &model.config;
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        if hd == 0 || hd % 32 != 0 || hd > 256 {
            return Err(ModelError::InvalidInput {
                what: "head_dim".into(),
                reason: format!("{hd}: the GPU attention kernel takes a multiple of 32 up to 256"),
            });
        }
        let pool = KvBlockPool::on_device(cfg, options.block_size, options.kv_blocks)?;
        let device = CudaDevice::new(ordinal)?;
        let dtype = options.dense_dtype;
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, layer) in model.layers.iter().enumerate() {
            let name = |part: &str| format!("layer {l} {part}");
            let attention = &layer.attention;
            let feed_forward = match &layer.feed_forward {
                FeedForward::Dense(mlp) => GpuFeedForward::Dense(upload_mlp(
                    &device,
                    mlp,
                    hidden,
                    cfg.intermediate_size_mlp,
                    dtype,
                    &name("feed_forward"),
                )?),
                FeedForward::Moe { router, shared } => GpuFeedForward::Moe {
                    router: upload_linear(
                        &device,
                        router,
                        cfg.num_local_experts,
                        hidden,
                        DenseDtype::F32,
                        &name("router"),
                    )?,
                    shared: upload_mlp(&device, shared, hidden, cfg.intermediate_size, dtype, &name("shared_expert"))?,
                },
            };
            layers.push(GpuLayer {
                input_norm: device.upload(&layer.input_norm)?,
                post_attention_norm: device.upload(&layer.post_attention_norm)?,
                q: upload_linear(&device, &attention.q, q_dim, hidden, dtype, &name("q_proj"))?,
                k: upload_linear(&device, &attention.k, kv_dim, hidden, dtype, &name("k_proj"))?,
                v: upload_linear(&device, &attention.v, kv_dim, hidden, dtype, &name("v_proj"))?,
                o: upload_linear(&device, &attention.o, hidden, q_dim, dtype, &name("o_proj"))?,
                feed_forward,
            });
        }
        let embed_tokens = DenseWeight::upload(&device, &model.embed_tokens, cfg.vocab_size, hidden, dtype)?;
        let lm_head = upload_linear(&device, &model.lm_head, cfg.vocab_size, hidden, dtype, "lm_head")?;
        // `on_device` checked that this product does not overflow.
        let kv_values = pool.capacity() * pool.block_floats();
        let kv = match options.kv_dtype {
            KvDtype::F32 => KvArena::F32(device.zeros(kv_values)?),
            KvDtype::Bf16 => KvArena::Bf16(device.zeros(kv_values)?),
        };
        Ok(Self {
            config: cfg.clone(),
            dense_dtype: dtype,
            kv_dtype: options.kv_dtype,
            embed_tokens,
            layers,
            norm: device.upload(&model.norm)?,
            lm_head,
            inv_freq: device.upload(&model.inv_freq)?,
            pool,
            kv: Mutex::new(kv),
            routed: model.routed.clone(),
            device,
        })
    }

    /// The pool handing out the device arena's blocks: every cache this model attends over comes from it.
    pub fn kv_pool(&self) -> &Arc<KvBlockPool> {
        &self.pool
    }

    /// Replaces where routed experts are computed (e.g. `GpuExperts` on the same GPU, or a dispatch client).
    pub fn set_routed_experts(&mut self, routed: Arc<dyn RoutedExperts>) {
        self.routed = routed;
    }

    /// The element type of the dense weights.
    pub fn dense_dtype(&self) -> DenseDtype {
        self.dense_dtype
    }

    /// The element type of the KV arena.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Bytes of the KV arena on the device.
    pub fn kv_bytes(&self) -> usize {
        self.arena().bytes()
    }

    /// Bytes of weights on the device (the KV arena not included).
    pub fn weight_bytes(&self) -> usize {
        let mlp = |m: &GpuMlp| m.gate_up.bytes() + m.down.bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let ff = match &l.feed_forward {
                    GpuFeedForward::Dense(m) => mlp(m),
                    GpuFeedForward::Moe { router, shared } => router.bytes() + mlp(shared),
                };
                l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + ff + 8 * self.config.hidden_size
            })
            .sum();
        layers
            + self.embed_tokens.bytes()
            + self.lm_head.bytes()
            + 4 * (self.config.hidden_size + self.config.head_dim / 2)
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    fn arena(&self) -> MutexGuard<'_, KvArena> {
        // The arena holds no invariant a panic could break half-way (its contents are rewritten by each step before
        // being read), so a poisoned lock is still usable.
        self.kv.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What [`Llama4Model::forward_batch`] checks, with the same messages, and what the device adds: the cache must
    /// come from this model's pool and not be a member's shard.
    fn validate_step(&self, index: usize, step: &SequenceStep<'_>) -> Result<(), ModelError> {
        validate_step(&self.config, index, step)?;
        if !Arc::ptr_eq(step.cache.pool(), &self.pool) {
            return Err(ModelError::InvalidInput {
                what: "KV cache".into(),
                reason: format!(
                    "sequence {index}'s cache is not from this GPU model's pool (make it with new_cache or kv_pool)"
                ),
            });
        }
        if step.cache.context().is_none() && step.cache.global_range() != (0..usize::MAX) {
            return Err(ModelError::InvalidInput {
                what: "KV cache".into(),
                reason: format!(
                    "sequence {index}'s cache is a member's shard of a context-parallel sequence, which only the \
                     member's attend_shard steps"
                ),
            });
        }
        u32::try_from(step.cache.len() + step.tokens.len()).map_err(|_| ModelError::InvalidInput {
            what: "context length".into(),
            reason: format!("{} positions exceed the GPU kernels' u32 positions", step.cache.len() + step.tokens.len()),
        })?;
        Ok(())
    }

    /// The device part of [`ForwardPass::forward_batch`] after validation and reservation: every layer, then the
    /// final norm and `lm_head` on the `wanted` rows. Returns the logits `[wanted rows, vocab]`, read back after the
    /// stream finished.
    fn run_step(
        &self,
        batch: &[SequenceStep<'_>],
        tokens: usize,
        wanted: &[Range<usize>],
    ) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.config;
        let dev = &*self.device;
        let (hidden, hd, qh, kvh) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let eps = cfg.rms_norm_eps as f32;

        let mut host_tokens = Vec::with_capacity(tokens);
        let mut host_positions = Vec::with_capacity(tokens);
        for step in batch {
            host_tokens.extend_from_slice(step.tokens);
            // validate_step checked that every position fits u32.
            host_positions.extend((step.cache.len()..step.cache.len() + step.tokens.len()).map(|p| p as u32));
        }
        let factors: Vec<f32> = host_positions.iter().map(|&p| temperature_factor(cfg, p as usize)).collect();
        let token_ids = dev.upload(&host_tokens)?;
        let positions = dev.upload(&host_positions)?;
        let factors = dev.upload(&factors)?;

        let mut x = dev.zeros::<f32>(tokens * hidden)?;
        let mut normed = dev.zeros::<f32>(tokens * hidden)?;
        let mut q = dev.zeros::<f32>(tokens * q_dim)?;
        let mut k = dev.zeros::<f32>(tokens * kv_dim)?;
        let v_len = tokens * kv_dim;
        let mut v = dev.zeros::<f32>(v_len)?;
        // The weightless qk-norm writes into a second buffer, then the two swap roles.
        let mut qk_scratch = if cfg.use_qk_norm {
            Some((dev.zeros::<f32>(tokens * q_dim)?, dev.zeros::<f32>(tokens * kv_dim)?))
        } else {
            None
        };
        let mut attended = dev.zeros::<f32>(tokens * q_dim)?;
        let mut lse = dev.zeros::<f32>(tokens * qh)?;
        let intermediate = self
            .layers
            .iter()
            .map(|l| match &l.feed_forward {
                GpuFeedForward::Dense(m) | GpuFeedForward::Moe { shared: m, .. } => m.intermediate,
            })
            .max()
            .unwrap_or(0)
            .max(1);
        let mut gate_up = dev.zeros::<f32>(tokens * 2 * intermediate)?;
        let mut activated = dev.zeros::<f32>(tokens * intermediate)?;
        let experts = cfg.num_local_experts.max(1);
        let mut router_logits = dev.zeros::<f32>(tokens * experts)?;
        let mut routed_out = dev.zeros::<f32>(tokens * hidden)?;

        dev.embed_rows(&self.embed_tokens, &token_ids.as_view(), &mut x.as_view_mut())?;
        let kv_shape = KvWrite {
            block_size: self.pool.block_size(),
            kv_heads: kvh,
            head_dim: hd,
            pool_blocks: self.pool.capacity(),
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let tables = StepTables::build(self.layers.len(), batch)?;
        let step_meta = dev.upload(&tables.meta)?;
        for (l, layer) in self.layers.iter().enumerate() {
            dev.rms_norm(&x.as_view(), Some(&layer.input_norm.as_view()), hidden, eps, &mut normed.as_view_mut())?;
            dev.linear(&normed.as_view(), tokens, &layer.q, &mut q.as_view_mut(), false)?;
            dev.linear(&normed.as_view(), tokens, &layer.k, &mut k.as_view_mut(), false)?;
            dev.linear(&normed.as_view(), tokens, &layer.v, &mut v.as_view_mut(), false)?;
            if cfg.uses_rope(l) {
                dev.rope_interleaved(&mut q.as_view_mut(), &positions.as_view(), qh, hd, &self.inv_freq.as_view())?;
                dev.rope_interleaved(&mut k.as_view_mut(), &positions.as_view(), kvh, hd, &self.inv_freq.as_view())?;
                if let Some((q_normed, k_normed)) = qk_scratch.as_mut() {
                    dev.rms_norm(&q.as_view(), None, hd, eps, &mut q_normed.as_view_mut())?;
                    dev.rms_norm(&k.as_view(), None, hd, eps, &mut k_normed.as_view_mut())?;
                    std::mem::swap(&mut q, q_normed);
                    std::mem::swap(&mut k, k_normed);
                }
            } else if cfg.attn_temperature_tuning {
                dev.scale_rows(&mut q.as_view_mut(), q_dim, &factors.as_view())?;
            }

            let (at, max_blocks) = tables.layers[l];
            let meta = step_meta.slice(at..at + 4 * tokens + batch.len() * max_blocks);
            let slots = meta.slice(0..tokens);
            let first_block = meta.slice(tokens..2 * tokens);
            let table_row = meta.slice(2 * tokens..3 * tokens);
            let key_end = meta.slice(3 * tokens..4 * tokens);
            let table = meta.slice(4 * tokens..4 * tokens + batch.len() * max_blocks);
            let chunk = if cfg.is_chunked_attention(l) {
                // A chunk longer than any u32 position never ends inside the sequence: the causal mask (0).
                u32::try_from(cfg.attention_chunk_size.unwrap_or(usize::MAX)).unwrap_or(0)
            } else {
                0
            };
            let shape = PagedDecode {
                seqs: tokens,
                q_heads: qh,
                kv_heads: kvh,
                head_dim: hd,
                block_size: self.pool.block_size(),
                table_rows: batch.len(),
                max_blocks,
                pool_blocks: self.pool.capacity(),
                chunk,
                scale,
                splits: 0,
            };
            let attention = LayerAttention {
                kv_shape,
                shape,
                q: q.as_view(),
                k: k.as_view(),
                v: v.as_view(),
                slots,
                table,
                table_row,
                first_block,
                seq_len: key_end,
                positions: positions.as_view(),
            };
            // The members of context-parallel sequences get their requests first, so their work overlaps this GPU's.
            let pending = if cfg.is_chunked_attention(l) {
                Vec::new()
            } else {
                start_members(dev, l, batch, &host_positions, &q, &k, &v)?
            };
            let local =
                self.arena().write_and_attend(dev, &attention, &mut attended.as_view_mut(), &mut lse.as_view_mut());
            merge_members(dev, hd, qh, pending, local.map_err(ModelError::from), &mut attended, &lse)?;
            dev.linear(&attended.as_view(), tokens, &layer.o, &mut x.as_view_mut(), true)?;

            dev.rms_norm(
                &x.as_view(),
                Some(&layer.post_attention_norm.as_view()),
                hidden,
                eps,
                &mut normed.as_view_mut(),
            )?;
            let mlp = |m: &GpuMlp, x: &mut CudaSlice<f32>, gate_up: &mut CudaSlice<f32>, act: &mut CudaSlice<f32>| {
                let (gu_len, act_len) = (tokens * 2 * m.intermediate, tokens * m.intermediate);
                dev.linear(&normed.as_view(), tokens, &m.gate_up, &mut gate_up.slice_mut(0..gu_len), false)?;
                dev.silu_mul(&gate_up.slice(0..gu_len), m.intermediate, &mut act.slice_mut(0..act_len))?;
                dev.linear(&act.slice(0..act_len), tokens, &m.down, &mut x.as_view_mut(), true)
            };
            match &layer.feed_forward {
                GpuFeedForward::Dense(m) => mlp(m, &mut x, &mut gate_up, &mut activated)?,
                GpuFeedForward::Moe { router, shared } => {
                    let e = cfg.num_local_experts;
                    let logits_len = tokens * e;
                    dev.linear(&normed.as_view(), tokens, router, &mut router_logits.slice_mut(0..logits_len), false)?;
                    // Both downloads wait for the stream: the rows and logits are final.
                    let logits = dev.download_view(&router_logits.slice(0..logits_len))?;
                    let mut routed_in = dev.download(&normed)?;
                    let choices = top1(&logits, e)?;
                    let mut chosen = Vec::with_capacity(tokens);
                    for (row, (expert, logit)) in routed_in.chunks_exact_mut(hidden).zip(choices) {
                        let score = 1.0 / (1.0 + (-logit).exp());
                        row.iter_mut().for_each(|v| *v *= score);
                        chosen.push(expert);
                    }
                    // The shared expert is queued first, so the GPU computes it while the host (or wherever the
                    // routed experts live) computes the routed ones.
                    mlp(shared, &mut x, &mut gate_up, &mut activated)?;
                    let routed = self.routed.compute(l, &routed_in, &chosen, hidden)?;
                    if routed.len() != tokens * hidden {
                        return Err(ModelError::InvalidInput {
                            what: "routed expert outputs".into(),
                            reason: format!(
                                "layer {l}: {} values for {tokens} tokens of hidden size {hidden}",
                                routed.len()
                            ),
                        });
                    }
                    dev.upload_into(&routed, &mut routed_out.as_view_mut())?;
                    dev.add_in_place(&mut x.as_view_mut(), &routed_out.as_view())?;
                }
            }
        }

        let rows: usize = wanted.iter().map(|r| r.len()).sum();
        if rows == 0 {
            dev.synchronize()?;
            return Ok(Vec::new());
        }
        let mut gathered = dev.zeros::<f32>(rows * hidden)?;
        let mut at = 0;
        for range in wanted {
            let n = range.len();
            dev.copy_view(
                &x.slice(range.start * hidden..range.end * hidden),
                &mut gathered.slice_mut(at * hidden..(at + n) * hidden),
            )?;
            at += n;
        }
        // `normed` is free again and large enough for the gathered rows.
        let final_len = rows * hidden;
        dev.rms_norm(
            &gathered.as_view(),
            Some(&self.norm.as_view()),
            hidden,
            eps,
            &mut normed.slice_mut(0..final_len),
        )?;
        let mut logits = dev.zeros::<f32>(rows * cfg.vocab_size)?;
        dev.linear(&normed.slice(0..final_len), rows, &self.lm_head, &mut logits.as_view_mut(), false)?;
        let logits = dev.download(&logits)?;
        dev.synchronize()?;
        Ok(logits)
    }
}

impl ForwardPass for GpuModel {
    fn config(&self) -> &TextConfig {
        &self.config
    }

    /// A fresh cache in this model's device pool: its blocks are indices into the model's KV arena.
    fn new_cache(&self) -> Result<KvCache, ModelError> {
        Ok(KvCache::in_pool(&self.config, self.pool.clone()))
    }

    /// The device arena's pool, when the engine asks for exactly what it holds (the arena is sized at upload:
    /// [`GpuModelOptions`]).
    fn kv_pool(&self, block_size: usize, capacity: usize) -> Result<Arc<KvBlockPool>, ModelError> {
        if block_size != self.pool.block_size() || capacity != self.pool.capacity() {
            return Err(ModelError::InvalidInput {
                what: "KV pool".into(),
                reason: format!(
                    "asked for {capacity} blocks of {block_size} positions, but the GPU arena holds {} blocks of {} \
                     (size the arena and the engine alike)",
                    self.pool.capacity(),
                    self.pool.block_size()
                ),
            });
        }
        Ok(self.pool.clone())
    }

    fn forward_batch(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        for (i, step) in batch.iter().enumerate() {
            self.validate_step(i, step)?;
        }
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if tokens == 0 {
            // A step with no sequence still takes part in every MoE layer's exchange (expert workers in lockstep
            // expect each attention rank at each layer), as on the CPU.
            for l in (0..self.config.num_hidden_layers).filter(|&l| self.config.is_moe_layer(l)) {
                self.routed.compute(l, &[], &[], self.config.hidden_size)?;
            }
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }
        for step in batch.iter_mut() {
            step.cache.reserve(step.tokens.len())?;
        }
        let wanted = wanted_rows(batch);
        let logits = self.run_step(batch, tokens, &wanted)?;
        // Only now, with every kernel of the step finished, do the sequences move on.
        for step in batch.iter_mut() {
            step.cache.advance(step.tokens.len());
        }
        Ok(logits_per_sequence(batch, &logits, self.config.vocab_size))
    }

    /// A member's step on the device: the shard (from this model's pool) keeps its range in the arena, its new keys
    /// and values are written there, and the partial attention (output and log-sum-exp) is computed by the paged
    /// attention kernel, each query seeing the shard's keys up to its position. The same checks and errors as the CPU's
    /// [`crate::context::attend_shard`]; the shard advances only once the device finished.
    fn attend_shard(&self, shard: &mut KvCache, step: &ShardStep<'_>) -> Result<PartialOutput, ModelError> {
        let cfg = &self.config;
        let grow = check_shard_step(cfg, shard, step)?;
        let ShardStep { layer, query_positions, queries, kv_positions, keys, values } = *step;
        if !Arc::ptr_eq(shard.pool(), &self.pool) {
            return Err(ModelError::InvalidInput {
                what: "context shard".into(),
                reason: "the shard's cache is not from this GPU model's pool (make it with KvCache::shard over \
                         kv_pool)"
                    .into(),
            });
        }
        let too_far = |p: usize| ModelError::InvalidInput {
            what: "context shard step".into(),
            reason: format!("position {p} exceeds the GPU kernels' u32 positions"),
        };
        if let Some(&p) = query_positions.iter().chain(kv_positions).find(|&&p| u32::try_from(p + 1).is_err()) {
            return Err(too_far(p));
        }
        let (tokens, rows) = (query_positions.len(), kv_positions.len());
        if tokens == 0 && rows == 0 {
            return Ok(PartialOutput::default());
        }
        shard.reserve(grow)?;
        let (meta, max_blocks) = shard_tables(shard, layer, query_positions, kv_positions)?;
        let mut inputs = Vec::with_capacity(queries.len() + keys.len() + values.len());
        inputs.extend_from_slice(queries);
        inputs.extend_from_slice(keys);
        inputs.extend_from_slice(values);
        let (hd, qh) = (cfg.head_dim, cfg.num_attention_heads);
        let dev = &*self.device;
        let meta = dev.upload(&meta)?;
        let inputs = dev.upload(&inputs)?;
        let (q_end, k_end) = (queries.len(), queries.len() + keys.len());
        let mut outputs = dev.zeros::<f32>((queries.len() + tokens * qh).max(1))?;
        let (out_len, lse_len) = (queries.len(), tokens * qh);
        let attention = LayerAttention {
            kv_shape: KvWrite {
                block_size: self.pool.block_size(),
                kv_heads: cfg.num_key_value_heads,
                head_dim: hd,
                pool_blocks: self.pool.capacity(),
            },
            shape: PagedDecode {
                seqs: tokens,
                q_heads: qh,
                kv_heads: cfg.num_key_value_heads,
                head_dim: hd,
                block_size: self.pool.block_size(),
                table_rows: 1,
                max_blocks,
                pool_blocks: self.pool.capacity(),
                chunk: 0,
                scale: 1.0 / (hd as f32).sqrt(),
                splits: 0,
            },
            q: inputs.slice(0..q_end),
            k: inputs.slice(q_end..k_end),
            v: inputs.slice(k_end..inputs.len()),
            slots: meta.slice(0..rows),
            first_block: meta.slice(rows..rows + tokens),
            table_row: meta.slice(rows + tokens..rows + 2 * tokens),
            seq_len: meta.slice(rows + 2 * tokens..rows + 3 * tokens),
            positions: meta.slice(rows + 3 * tokens..rows + 4 * tokens),
            table: meta.slice(rows + 4 * tokens..rows + 4 * tokens + max_blocks),
        };
        let (mut out, mut lse) = outputs.split_at_mut(out_len);
        self.arena().write_and_attend(dev, &attention, &mut out, &mut lse.slice_mut(0..lse_len))?;
        // The download waits for the stream: the keys are written and the partial final.
        let partial = dev.download(&outputs)?;
        shard.advance(grow);
        Ok(PartialOutput { out: partial[..out_len].to_vec(), lse: partial[out_len..out_len + lse_len].to_vec() })
    }
}

/// A member's tables for one global layer of its shard, packed for one upload: `[slots (kv rows) | first_block
/// (queries) | table_row (queries, all 0) | key_end (queries) | positions (queries) | table (max_blocks)]`. A query
/// before the shard's range sees none of its keys (the kernel's range starts at the shard's first block); one past
/// its end sees them all. Returns it and `max_blocks`.
fn shard_tables(
    shard: &KvCache,
    layer: usize,
    query_positions: &[usize],
    kv_positions: &[usize],
) -> Result<(Vec<u32>, usize), ModelError> {
    let held = shard.block_table(layer)?;
    let too_large = |what: &str, value: usize| ModelError::InvalidInput {
        what: "context shard".into(),
        reason: format!("{what} {value} of layer {layer} exceeds the GPU kernels' u32 indices"),
    };
    let max_blocks = held.blocks.len().max(1);
    let mut meta = Vec::with_capacity(kv_positions.len() + 4 * query_positions.len() + max_blocks);
    for &position in kv_positions {
        let slot = shard.slot(layer, position)?;
        meta.push(u32::try_from(slot).ok().filter(|&s| s != NOT_HELD).ok_or_else(|| too_large("slot", slot))?);
    }
    let first_block = u32::try_from(held.first_block).map_err(|_| too_large("block", held.first_block))?;
    let held_end = shard.held_end(layer);
    // The caller checked that every position + 1 fits u32.
    meta.extend(query_positions.iter().map(|_| first_block));
    meta.extend(query_positions.iter().map(|_| 0));
    meta.extend(query_positions.iter().map(|&p| (p + 1).min(held_end) as u32));
    meta.extend(query_positions.iter().map(|&p| p as u32));
    for &b in &held.blocks {
        meta.push(u32::try_from(b).map_err(|_| too_large("block index", b))?);
    }
    meta.resize(kv_positions.len() + 4 * query_positions.len() + max_blocks, 0);
    Ok((meta, max_blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::LogitsFor;
    use crate::kv::tests::config;

    /// The tables the attention kernel reads, checked by replaying its index arithmetic on the host: for every query
    /// row, every key the CPU's mask lets it see is inside the row's held blocks, at the block the cache holds it in,
    /// and the row's slot is where `KvCache::slot` puts its own key.
    #[test]
    fn layer_tables_cover_exactly_what_each_query_row_sees() {
        let config = config();
        let block_size = 4;
        let pool = KvBlockPool::on_device(&config, block_size, 400).expect("device pool");
        // A sequence 10 positions in (its chunked layers released the blocks before position 8), a fresh one, and one
        // decoding a single token at a chunk boundary.
        let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::in_pool(&config, pool.clone())).collect();
        for (cache, done) in caches.iter_mut().zip([10, 0, 16]) {
            if done > 0 {
                cache.reserve(done).expect("reserve");
                cache.advance(done);
            }
        }
        let tokens: Vec<Vec<u32>> = vec![vec![1; 7], vec![2; 13], vec![3]];
        let mut batch: Vec<SequenceStep<'_>> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, tokens)| SequenceStep { tokens, cache, logits: LogitsFor::All })
            .collect();
        for step in batch.iter_mut() {
            step.cache.reserve(step.tokens.len()).expect("reserve");
        }
        let rows = 7 + 13 + 1;
        let step = StepTables::build(config.num_hidden_layers, &batch).expect("step tables");
        for l in 0..config.num_hidden_layers {
            let (meta, max_blocks) = layer_tables(l, &batch).expect("tables");
            let (at, step_max_blocks) = step.layers[l];
            assert_eq!((&step.meta[at..at + meta.len()], step_max_blocks), (&meta[..], max_blocks), "layer {l}");
            assert_eq!(meta.len(), 4 * rows + batch.len() * max_blocks);
            let (slots, rest) = meta.split_at(rows);
            let (first, rest) = rest.split_at(rows);
            let (table_row, rest) = rest.split_at(rows);
            let (key_end, table) = rest.split_at(rows);
            let chunk = config.is_chunked_attention(l).then(|| config.attention_chunk_size.unwrap_or(usize::MAX));
            let mut row = 0;
            for (s, step) in batch.iter().enumerate() {
                let held = step.cache.block_table(l).expect("layer").blocks.len();
                for position in step.cache.len()..step.cache.len() + step.tokens.len() {
                    assert_eq!(slots[row] as usize, step.cache.slot(l, position).expect("slot"), "layer {l}");
                    assert_eq!(key_end[row] as usize, position + 1, "layer {l}: a plain sequence sees up to itself");
                    // paged_decode_attention's range: lo = max(first visible, first held), hi = position + 1.
                    let first_visible = chunk.map_or(0, |c| position / c * c);
                    let key_start = first[row] as usize * block_size;
                    assert!(key_start <= first_visible, "layer {l} row {row}: a visible key was released");
                    for key in first_visible..=position {
                        let index = key / block_size - first[row] as usize;
                        assert!(index < held && index < max_blocks, "layer {l} row {row} key {key}");
                        assert_eq!(table_row[row] as usize, s, "layer {l} row {row}: its sequence's table row");
                        let block = table[table_row[row] as usize * max_blocks + index] as usize;
                        assert_eq!(block * block_size + key % block_size, step.cache.slot(l, key).expect("held"));
                    }
                    row += 1;
                }
            }
            assert_eq!(row, rows);
        }
        assert!(layer_tables(config.num_hidden_layers, &batch).is_err());
    }

    /// The owner of a context-parallel sequence: on a global layer, positions past its range get no slot and its
    /// rows see keys only up to the range's end, all inside the blocks it holds; chunked layers are as for any
    /// sequence.
    #[test]
    fn a_context_parallel_owner_writes_and_reads_only_its_range() {
        let config = config();
        let block_size = 4;
        let pool = KvBlockPool::on_device(&config, block_size, 400).expect("device pool");
        let mut cache = KvCache::in_pool(&config, pool.clone());
        cache.set_context(Arc::new(crate::context::LocalShards::new(8, Vec::new()))).expect("context");
        let tokens = vec![1; 13];
        cache.reserve(tokens.len()).expect("reserve");
        let batch = [SequenceStep { tokens: &tokens, cache: &mut cache, logits: LogitsFor::All }];
        for l in 0..config.num_hidden_layers {
            let (meta, max_blocks) = layer_tables(l, &batch).expect("tables");
            let rows = tokens.len();
            let (slots, rest) = meta.split_at(rows);
            let (_, rest) = rest.split_at(rows);
            let (_, rest) = rest.split_at(rows);
            let (key_end, table) = rest.split_at(rows);
            let global = !config.is_chunked_attention(l);
            let held = batch[0].cache.block_table(l).expect("layer").blocks;
            for position in 0..rows {
                let mine = !global || position < 8;
                assert_eq!(slots[position] == NOT_HELD, !mine, "layer {l} position {position}");
                let end = if global { (position + 1).min(8) } else { position + 1 };
                assert_eq!(key_end[position] as usize, end, "layer {l} position {position}");
            }
            if global {
                assert_eq!(held.len(), 2, "layer {l}: only the blocks of 0..8");
                assert_eq!(&table[..2.min(max_blocks)], &held.iter().map(|&b| b as u32).collect::<Vec<_>>()[..]);
            }
        }
    }
}
