//! The paged KV cache: fixed-size blocks from a bounded pool, and each sequence's block tables.
//!
//! A block holds the keys and values of `block_size` consecutive positions of one layer (`[2, block_size, kv_heads,
//! head_dim]`), so every block has the same size and one pool serves every layer. A sequence's cache keeps, per layer,
//! the blocks covering the positions that layer can still attend to: all of them on global (NoPE) layers, only the
//! current chunk's on chunked-attention layers, whose earlier blocks go back to the pool as soon as the sequence moves
//! into a new chunk. The scheduler reserves the blocks a step needs before it runs ([`KvCache::reserve`]), so a step
//! never runs out of memory half-way, and sequences that cannot get blocks wait or are preempted instead of failing.
//!
//! Blocks are owned by the table that holds them (moved out of the pool and back), which lets the sequences of a
//! batch write their own blocks in parallel without sharing anything mutable.
//!
//! Every block carries a stable pool index below the pool's capacity (blocks are reused before new indices are
//! handed out, so no more indices exist than blocks were ever held at once). A pool made with
//! [`KvBlockPool::on_device`] holds no host storage at all: its blocks are only indices into an arena of `capacity`
//! blocks kept elsewhere (a GPU's memory), which a model on that device reads through [`KvCache::block_table`] and
//! writes at [`KvCache::slot`]. The host-storage operations (writing rows, the CPU attention's view, synthetic
//! fills, RMS statistics) refuse such a cache with an error instead of touching storage it does not have.

use std::sync::{Arc, Mutex, MutexGuard};

use switchyard_kernels::device::KvDtype;

use crate::config::TextConfig;
use crate::context::ContextShards;
use crate::memory;
use crate::ModelError;

/// Positions per block when nothing else is configured.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// One block of one layer: `[2, block_size, kv_heads, head_dim]` floats, keys then values.
#[derive(Debug)]
pub struct KvBlock {
    /// Empty for a block of a device pool: its floats live in the device's arena at [`KvBlock::index`].
    data: Box<[f32]>,
    index: usize,
}

impl KvBlock {
    /// The block's floats (none for a block of a device pool).
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The block's index in its pool, stable for the pool's life and below its capacity: a device pool's blocks are
    /// `arena[index * block_floats ..][.. block_floats]`.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl AsRef<[f32]> for KvBlock {
    fn as_ref(&self) -> &[f32] {
        &self.data
    }
}

#[derive(Debug, Default)]
struct PoolState {
    /// Blocks allocated earlier and given back, reused before allocating new ones.
    free: Vec<KvBlock>,
    /// Blocks held by caches now.
    in_use: usize,
    /// Blocks ever made: the next new block's index. New blocks are made only when `free` is empty, so this never
    /// exceeds the most blocks held at once, hence never the capacity.
    made: usize,
}

/// A bounded pool of KV blocks shared by the sequences of one engine.
///
/// Memory is allocated on first use and kept for reuse, so a large budget costs nothing until sequences fill it.
#[derive(Debug)]
pub struct KvBlockPool {
    block_size: usize,
    block_floats: usize,
    /// Blocks the pool may hand out at once; `usize::MAX` for an unbounded pool.
    capacity: usize,
    /// Blocks have no host storage: their floats live in a device arena of `capacity` blocks.
    on_device: bool,
    state: Mutex<PoolState>,
}

impl KvBlockPool {
    /// A pool of at most `capacity` blocks of `block_size` positions for the layers of `config`.
    pub fn new(config: &TextConfig, block_size: usize, capacity: usize) -> Result<Arc<Self>, ModelError> {
        Self::with_storage(config, block_size, capacity, false)
    }

    /// A pool of `capacity` blocks whose storage is a device arena of `capacity * block_floats` values kept by the
    /// caller (block `i` at `i * block_floats`; f32 or bf16, the pool does not care): the pool only hands out indices. The capacity must be at least one
    /// block, and every slot (`index * block_size + offset`) must fit in a `u32`, what device kernels index with.
    pub fn on_device(config: &TextConfig, block_size: usize, capacity: usize) -> Result<Arc<Self>, ModelError> {
        let slots = capacity.checked_mul(block_size).filter(|&slots| slots <= u32::MAX as usize + 1);
        if capacity == 0 || slots.is_none() {
            return Err(ModelError::InvalidInput {
                what: "device KV pool".into(),
                reason: format!(
                    "{capacity} blocks of {block_size} positions: needs at least one block and at most 2^32 positions \
                     in all"
                ),
            });
        }
        let pool = Self::with_storage(config, block_size, capacity, true)?;
        if pool.block_floats.checked_mul(capacity).is_none() {
            return Err(ModelError::InvalidInput {
                what: "device KV pool".into(),
                reason: format!("{capacity} blocks of {} floats overflow", pool.block_floats),
            });
        }
        Ok(pool)
    }

    fn with_storage(
        config: &TextConfig,
        block_size: usize,
        capacity: usize,
        on_device: bool,
    ) -> Result<Arc<Self>, ModelError> {
        if block_size == 0 {
            return Err(ModelError::InvalidInput {
                what: "KV block size".into(),
                reason: "must be at least 1 position".into(),
            });
        }
        let block_floats =
            2usize.checked_mul(block_size).and_then(|n| n.checked_mul(config.kv_dim())).ok_or_else(|| {
                ModelError::InvalidInput {
                    what: "KV block size".into(),
                    reason: format!("{block_size} positions x {} values overflows", config.kv_dim()),
                }
            })?;
        Ok(Arc::new(Self { block_size, block_floats, capacity, on_device, state: Mutex::new(PoolState::default()) }))
    }

    /// A pool that never runs out (single-sequence use, tests, offline generation).
    pub fn unbounded(config: &TextConfig) -> Result<Arc<Self>, ModelError> {
        Self::new(config, DEFAULT_BLOCK_SIZE, usize::MAX)
    }

    /// The most blocks of `block_size` positions that fit in `bytes` of f32 KV for `config` (the CPU's cache).
    pub fn blocks_in_bytes(config: &TextConfig, block_size: usize, bytes: u64) -> usize {
        Self::blocks_in_bytes_for_dtype(config, block_size, bytes, KvDtype::F32)
    }

    /// Bytes of one block of `block_size` positions for `config` with the KV in f32 (as the CPU holds it).
    pub fn block_bytes(config: &TextConfig, block_size: usize) -> u64 {
        Self::block_bytes_for_dtype(config, block_size, KvDtype::F32)
    }

    /// The most blocks of `block_size` positions that fit in `bytes` of KV held as `dtype` (a GPU arena's element
    /// type: bf16 fits twice the blocks of f32).
    pub fn blocks_in_bytes_for_dtype(config: &TextConfig, block_size: usize, bytes: u64, dtype: KvDtype) -> usize {
        usize::try_from(bytes / Self::block_bytes_for_dtype(config, block_size, dtype).max(1)).unwrap_or(usize::MAX)
    }

    /// Bytes of one block of `block_size` positions for `config` with the KV held as `dtype`, from the one place
    /// memory is accounted ([`crate::memory`]).
    pub fn block_bytes_for_dtype(config: &TextConfig, block_size: usize, dtype: KvDtype) -> u64 {
        let precision = match dtype {
            KvDtype::F32 => memory::Precision::F32,
            KvDtype::Bf16 => memory::Precision::Bf16,
        };
        block_size as u64 * memory::kv_bytes_per_token_per_layer(config, precision)
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Values (keys and values of every position) per block: floats on the host; on a device, elements of the
    /// arena's type, whatever it is (f32 or bf16).
    pub fn block_floats(&self) -> usize {
        self.block_floats
    }

    /// Blocks the pool may hand out at once (`usize::MAX` when unbounded).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the blocks' storage is a device arena ([`KvBlockPool::on_device`]) rather than host memory.
    pub fn is_on_device(&self) -> bool {
        self.on_device
    }

    /// Blocks held by caches now.
    pub fn in_use(&self) -> usize {
        self.state().in_use
    }

    /// Blocks that can still be handed out.
    pub fn available(&self) -> usize {
        self.capacity.saturating_sub(self.in_use())
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        // The state is two plain counters and a free list, consistent after every statement: a panic elsewhere while
        // it was held leaves nothing half-done, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes `count` blocks, all or none.
    fn take(&self, count: usize) -> Result<Vec<KvBlock>, ModelError> {
        let mut state = self.state();
        let available = self.capacity.saturating_sub(state.in_use);
        if count > available {
            return Err(ModelError::KvCacheFull { needed: count, available, capacity: self.capacity });
        }
        state.in_use += count;
        let reused = state.free.len().saturating_sub(count);
        let mut blocks = state.free.split_off(reused);
        // Indices are claimed under the lock; host storage is allocated after it is released.
        let first_new = state.made;
        state.made += count - blocks.len();
        drop(state);
        let floats = if self.on_device { 0 } else { self.block_floats };
        let mut index = first_new;
        blocks.resize_with(count, || {
            index += 1;
            KvBlock { data: vec![0.0; floats].into_boxed_slice(), index: index - 1 }
        });
        Ok(blocks)
    }

    fn give_back(&self, blocks: impl IntoIterator<Item = KvBlock>) {
        let mut state = self.state();
        for block in blocks {
            state.in_use = state.in_use.saturating_sub(1);
            state.free.push(block);
        }
    }
}

/// One layer's block table as [`KvCache::block_table`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTable {
    /// Absolute index of `blocks[0]`: the block holding positions `first_block * block_size ..`.
    pub first_block: usize,
    /// Pool index ([`KvBlock::index`]) of each block held, in position order.
    pub blocks: Vec<usize>,
}

/// The blocks one layer of one sequence holds: its block table.
#[derive(Debug, Default)]
struct LayerBlocks {
    /// Absolute index of `blocks[0]`: the block holding positions `first * block_size ..`.
    first: usize,
    blocks: Vec<KvBlock>,
}

impl LayerBlocks {
    /// One past the last block held.
    fn end(&self) -> usize {
        self.first + self.blocks.len()
    }
}

/// The KV cache of one sequence: a block table per layer over a shared [`KvBlockPool`]. Its blocks go back to the
/// pool when it is dropped or [`cleared`](KvCache::clear).
///
/// A sequence too long for one attention worker is spread over a context-parallel group: its owner keeps the chunked
/// layers and the global layers' first positions here, and [`ContextShards`] hold the global layers' later ranges on
/// the other members. A member keeps its range of one such sequence in a *shard* cache (global layers only).
pub struct KvCache {
    pool: Arc<KvBlockPool>,
    layers: Vec<LayerBlocks>,
    /// The attention chunk of each layer, `None` for global layers.
    chunks: Vec<Option<usize>>,
    len: usize,
    /// Global layers hold positions `global_start .. global_end` here (`0 .. usize::MAX` but in a context-parallel
    /// group).
    global_start: usize,
    global_end: usize,
    /// A member's shard: chunked layers hold nothing.
    shard: bool,
    /// Where the global layers' positions from `global_end` on live, for the owner of a context-parallel sequence.
    context: Option<Arc<dyn ContextShards>>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("blocks_held", &self.blocks_held())
            .field("global_range", &(self.global_start..self.global_end))
            .field("shard", &self.shard)
            .field("context_parallel", &self.context.is_some())
            .finish()
    }
}

impl KvCache {
    /// An empty cache for `config` whose blocks come from `pool`.
    pub fn in_pool(config: &TextConfig, pool: Arc<KvBlockPool>) -> Self {
        let chunks = (0..config.num_hidden_layers)
            .map(|l| config.is_chunked_attention(l).then(|| config.attention_chunk_size.unwrap_or(usize::MAX)))
            .collect();
        Self {
            pool,
            layers: (0..config.num_hidden_layers).map(|_| LayerBlocks::default()).collect(),
            chunks,
            len: 0,
            global_start: 0,
            global_end: usize::MAX,
            shard: false,
            context: None,
        }
    }

    /// A member's shard of a context-parallel sequence: the global layers' keys and values of positions `start ..
    /// end` (`start` on a block boundary), nothing of the chunked layers.
    pub fn shard(config: &TextConfig, pool: Arc<KvBlockPool>, start: usize, end: usize) -> Result<Self, ModelError> {
        if start % pool.block_size != 0 || end <= start {
            return Err(ModelError::InvalidInput {
                what: "context shard range".into(),
                reason: format!(
                    "{start}..{end} must be non-empty and start on a KV block boundary ({} positions)",
                    pool.block_size
                ),
            });
        }
        let mut cache = Self::in_pool(config, pool);
        cache.global_start = start;
        cache.global_end = end;
        cache.shard = true;
        cache.len = start;
        Ok(cache)
    }

    /// Makes this (empty) cache the owner's part of a context-parallel sequence: global layers keep positions below
    /// `shards.local_end()` here, `shards` hold the rest.
    pub fn set_context(&mut self, shards: Arc<dyn ContextShards>) -> Result<(), ModelError> {
        let local_end = shards.local_end();
        if !self.is_empty() || local_end % self.pool.block_size != 0 {
            return Err(ModelError::InvalidInput {
                what: "context-parallel group".into(),
                reason: format!(
                    "the owner's range must end on a KV block boundary ({} positions; it ends at {local_end}) and be \
                     set before the first step",
                    self.pool.block_size
                ),
            });
        }
        self.global_end = local_end;
        self.context = Some(shards);
        Ok(())
    }

    /// The members holding the global layers' later positions, for the owner of a context-parallel sequence.
    pub fn context(&self) -> Option<&Arc<dyn ContextShards>> {
        self.context.as_ref()
    }

    /// The positions the global layers hold here.
    pub fn global_range(&self) -> std::ops::Range<usize> {
        self.global_start..self.global_end
    }

    /// Whether layer `l` holds position `position` here (false for a global position another member holds, or for a
    /// chunked layer of a shard).
    pub(crate) fn holds(&self, l: usize, position: usize) -> bool {
        match self.chunks[l] {
            Some(_) => !self.shard,
            None => (self.global_start..self.global_end).contains(&position),
        }
    }

    /// One past the last position layer `l` holds here: the global range's end on a global layer (where the members'
    /// ranges begin, for the owner of a context-parallel sequence), unbounded on a chunked one.
    pub(crate) fn held_end(&self, l: usize) -> usize {
        match self.chunks.get(l) {
            Some(None) => self.global_end,
            _ => usize::MAX,
        }
    }

    /// An empty cache for `config` with a pool of its own that never runs out.
    pub fn new(config: &TextConfig) -> Result<Self, ModelError> {
        Ok(Self::in_pool(config, KvBlockPool::unbounded(config)?))
    }

    /// Tokens processed so far (the next token's absolute position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been processed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layers the cache was made for.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Blocks held across all layers.
    pub fn blocks_held(&self) -> usize {
        self.layers.iter().map(|l| l.blocks.len()).sum()
    }

    /// Floats held across all layers (keys and values, whole blocks).
    pub fn floats_held(&self) -> usize {
        self.blocks_held() * self.pool.block_floats()
    }

    /// The pool the cache draws from.
    pub fn pool(&self) -> &Arc<KvBlockPool> {
        &self.pool
    }

    /// The absolute block range layer `l` must hold for a step over positions `len .. len + tokens`: from the block
    /// of the first position any of those queries sees to the block of the last position.
    fn needed_range(&self, l: usize, tokens: usize) -> (usize, usize) {
        let block_size = self.pool.block_size;
        match self.chunks[l] {
            Some(_) if self.shard => (0, 0),
            Some(chunk) => (self.len / chunk * chunk / block_size, (self.len + tokens).div_ceil(block_size)),
            None => {
                let end = (self.len + tokens).min(self.global_end).div_ceil(block_size);
                let first = self.global_start / block_size;
                (first, end.max(first))
            }
        }
    }

    /// Blocks a step of `tokens` more positions would take from the pool.
    pub fn blocks_needed(&self, tokens: usize) -> usize {
        (0..self.layers.len())
            .map(|l| {
                let (first, end) = self.needed_range(l, tokens);
                let layer = &self.layers[l];
                let held_end = if layer.blocks.is_empty() { first } else { layer.end() };
                end.saturating_sub(held_end.max(first))
            })
            .sum()
    }

    /// Blocks a sequence of `tokens` positions holds at most at once, computed in steps of at most `step_tokens`:
    /// what admitting it can cost. Chunked layers hold the current chunk plus, during a step that crosses into the
    /// next chunk, that step's positions.
    pub fn blocks_for_sequence(config: &TextConfig, block_size: usize, tokens: usize, step_tokens: usize) -> usize {
        let block_size = block_size.max(1);
        let every = tokens.div_ceil(block_size);
        (0..config.num_hidden_layers)
            .map(|l| match config.is_chunked_attention(l).then_some(config.attention_chunk_size).flatten() {
                // A span that does not start on a block boundary can straddle one more block.
                Some(chunk) => every.min(chunk.saturating_add(step_tokens).div_ceil(block_size) + 1),
                None => every,
            })
            .sum()
    }

    /// Makes sure the cache holds blocks for `tokens` more positions, taking them from the pool all at once or not
    /// at all (then it fails with [`ModelError::KvCacheFull`] and nothing changed).
    pub fn reserve(&mut self, tokens: usize) -> Result<(), ModelError> {
        let needed = self.blocks_needed(tokens);
        if needed == 0 {
            return Ok(());
        }
        let mut fresh = self.pool.take(needed)?.into_iter();
        for l in 0..self.layers.len() {
            let (first, end) = self.needed_range(l, tokens);
            let layer = &mut self.layers[l];
            if layer.blocks.is_empty() {
                layer.first = first;
            }
            while layer.end() < end {
                match fresh.next() {
                    Some(block) => layer.blocks.push(block),
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Records that a step wrote `tokens` more positions, and gives back the blocks no later query can see (those
    /// before the current chunk on chunked layers). Called only once the whole step succeeded, so a failed step can
    /// be retried over the same blocks.
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
        let block_size = self.pool.block_size;
        let mut released = Vec::new();
        for (layer, chunk) in self.layers.iter_mut().zip(&self.chunks) {
            let Some(chunk) = chunk else { continue };
            let keep_from = self.len / chunk * chunk / block_size;
            let drop = keep_from.saturating_sub(layer.first).min(layer.blocks.len());
            if drop > 0 {
                released.extend(layer.blocks.drain(..drop));
                layer.first += drop;
            }
        }
        self.pool.give_back(released);
    }

    /// Gives every block back and forgets every position: the sequence will be recomputed from its tokens.
    pub fn clear(&mut self) {
        let released: Vec<KvBlock> = self.layers.iter_mut().flat_map(|l| l.blocks.drain(..)).collect();
        self.pool.give_back(released);
        for layer in &mut self.layers {
            layer.first = 0;
        }
        self.len = if self.shard { self.global_start } else { 0 };
    }

    /// Appends `tokens` positions without running the model: `fill(layer, position, key, value)` writes the key and
    /// value rows (`kv_dim` floats each) of every position a layer holds here afterwards (chunked layers only the
    /// current chunk's, a shard's global layers only its range). For benchmarks that need a long context's KV without
    /// hours of prefill; the cache then reads as if a prefill had written those rows.
    pub fn append_synthetic(
        &mut self,
        tokens: usize,
        mut fill: impl FnMut(usize, usize, &mut [f32], &mut [f32]),
    ) -> Result<(), ModelError> {
        self.check_host_storage("a synthetic fill")?;
        let end = self.len + tokens;
        let kv_floats = self.pool.block_floats / 2 / self.pool.block_size;
        let (mut key, mut value) = (vec![0.0f32; kv_floats], vec![0.0f32; kv_floats]);
        // In steps of at most one chunk, so chunked layers hold at most two chunks' blocks at once.
        let step = self.chunks.iter().flatten().copied().min().unwrap_or(usize::MAX).clamp(1, 1 << 16);
        while self.len < end {
            let n = step.min(end - self.len);
            self.reserve(n)?;
            for l in 0..self.layers.len() {
                let first = match self.chunks[l] {
                    Some(chunk) => self.len.max(end / chunk * chunk),
                    None => self.len,
                };
                for position in first..self.len + n {
                    if self.holds(l, position) {
                        fill(l, position, &mut key, &mut value);
                        self.write(l, position, &key, &value)?;
                    }
                }
            }
            self.advance(n);
        }
        Ok(())
    }

    /// Root mean square of the keys and of the values each layer holds here (`None` for a layer holding nothing):
    /// the scale a synthetic fill ([`KvCache::append_synthetic`]) should have to look like this model's KV. A cache of
    /// a device pool holds nothing on the host: every layer is `None`.
    pub fn layer_rms(&self) -> Vec<Option<(f32, f32)>> {
        if self.pool.on_device {
            return vec![None; self.layers.len()];
        }
        let block_size = self.pool.block_size;
        let row = self.pool.block_floats / 2 / block_size;
        (0..self.layers.len())
            .map(|l| {
                let paged = self.paged(l, self.len);
                let (mut keys, mut values, mut count) = (0.0f64, 0.0f64, 0usize);
                // A chunked layer's blocks may still hold positions of the previous chunk, no longer read.
                let first = match self.chunks[l] {
                    Some(chunk) => paged.key_start().max(self.len / chunk * chunk),
                    None => paged.key_start(),
                };
                for position in first..paged.len {
                    let Some(block) = paged.blocks.get(position / block_size - paged.first_block) else { continue };
                    let slot = position % block_size;
                    let sum = |at: usize| {
                        block.data[at * row..(at + 1) * row].iter().map(|&v| (v as f64).powi(2)).sum::<f64>()
                    };
                    keys += sum(slot);
                    values += sum(block_size + slot);
                    count += row;
                }
                (count > 0).then(|| ((keys / count as f64).sqrt() as f32, (values / count as f64).sqrt() as f32))
            })
            .collect()
    }

    /// Writes the key and value rows (`kv_dim` floats each) of absolute `position` into layer `l`'s block. The
    /// position must have been reserved.
    pub(crate) fn write(&mut self, l: usize, position: usize, key: &[f32], value: &[f32]) -> Result<(), ModelError> {
        self.check_host_storage("writing keys and values from the host")?;
        let block_size = self.pool.block_size;
        let layer = &mut self.layers[l];
        let block = (position / block_size).checked_sub(layer.first).and_then(|i| layer.blocks.get_mut(i)).ok_or_else(
            || ModelError::InvalidInput {
                what: "KV cache".into(),
                reason: format!("position {position} of layer {l} has no reserved block"),
            },
        )?;
        let row = key.len();
        let offset = position % block_size;
        block.data[offset * row..(offset + 1) * row].copy_from_slice(key);
        block.data[(block_size + offset) * row..(block_size + offset + 1) * row].copy_from_slice(value);
        Ok(())
    }

    /// An error naming `what` when this cache's blocks have no host storage (a device pool).
    fn check_host_storage(&self, what: &str) -> Result<(), ModelError> {
        if self.pool.on_device {
            return Err(ModelError::InvalidInput {
                what: "KV cache".into(),
                reason: format!(
                    "{what} needs host storage, but this cache's blocks live on a device (its model reads and writes \
                     them there)"
                ),
            });
        }
        Ok(())
    }

    /// Layer `l`'s block table: the absolute index of its first block (earlier ones released, or held by another
    /// member of a context-parallel group) and the pool index of each block held, in position order. Position `p`
    /// of the layer is in `blocks[p / block_size - first_block]`. Valid for host and device pools alike.
    pub fn block_table(&self, l: usize) -> Result<BlockTable, ModelError> {
        let layer = self.layer(l)?;
        Ok(BlockTable {
            first_block: self.first_block(layer),
            blocks: layer.blocks.iter().map(KvBlock::index).collect(),
        })
    }

    /// Where layer `l` keeps `position`: `index * block_size + position % block_size`, the block's pool index and the
    /// row inside it (what a device kernel writing the position's key and value takes). The position must be
    /// reserved ([`KvCache::reserve`]) and held by the layer (not released, not another member's).
    pub fn slot(&self, l: usize, position: usize) -> Result<usize, ModelError> {
        let layer = self.layer(l)?;
        let block_size = self.pool.block_size;
        let block =
            (position / block_size).checked_sub(layer.first).and_then(|i| layer.blocks.get(i)).ok_or_else(|| {
                ModelError::InvalidInput {
                    what: "KV cache".into(),
                    reason: format!("position {position} of layer {l} has no reserved block"),
                }
            })?;
        Ok(block.index * block_size + position % block_size)
    }

    fn layer(&self, l: usize) -> Result<&LayerBlocks, ModelError> {
        self.layers.get(l).ok_or_else(|| ModelError::InvalidInput {
            what: "KV cache layer".into(),
            reason: format!("layer {l} of a cache with {} layers", self.layers.len()),
        })
    }

    /// The absolute index of a layer's first block; for a layer holding nothing, where its first block will be.
    fn first_block(&self, layer: &LayerBlocks) -> usize {
        if layer.blocks.is_empty() {
            self.global_start / self.pool.block_size
        } else {
            layer.first
        }
    }

    /// Layer `l`'s blocks as the attention kernel reads them, valid up to `end` (exclusive; clipped to the positions
    /// held here). The blocks of a device pool have no floats: the CPU kernel refuses them (a shape error naming the
    /// block), and [`KvCache::write`] refuses such a cache before any step gets this far.
    pub(crate) fn paged(&self, l: usize, end: usize) -> switchyard_kernels::attention::PagedKv<'_, KvBlock> {
        let layer = &self.layers[l];
        let block_size = self.pool.block_size;
        let first = self.first_block(layer);
        let end = match self.chunks[l] {
            Some(_) => end,
            None => end.min(self.global_end),
        };
        switchyard_kernels::attention::PagedKv {
            blocks: &layer.blocks,
            first_block: first,
            block_size,
            len: end.max(first * block_size),
        }
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tiny::{preset_text_config, Preset};

    /// The tiny preset with chunked layers of 8 positions (the GPU forward pass's table tests use it too).
    pub(crate) fn config() -> TextConfig {
        let mut text = preset_text_config(Preset::Tiny);
        text["attention_chunk_size"] = 8.into();
        let json = serde_json::json!({ "model_type": "llama4", "text_config": text }).to_string();
        crate::config::ModelConfig::from_json_str(&json, "tiny config.json").expect("tiny config").text
    }

    #[test]
    fn chunked_layers_give_blocks_back_and_global_layers_keep_them() {
        let config = config();
        let pool = KvBlockPool::new(&config, 4, 1000).expect("pool");
        let mut cache = KvCache::in_pool(&config, pool.clone());
        let (global, chunked) =
            (0..config.num_hidden_layers).partition::<Vec<_>, _>(|&l| !config.is_chunked_attention(l));
        assert!(!global.is_empty() && !chunked.is_empty(), "the tiny preset has both kinds of layers");
        for _ in 0..5 {
            cache.reserve(4).expect("reserve");
            cache.advance(4);
        }
        // 20 positions: global layers hold 5 blocks, chunked layers the blocks of chunk 16..24, one block.
        assert_eq!(cache.blocks_held(), global.len() * 5 + chunked.len());
        assert_eq!(pool.in_use(), cache.blocks_held());
        assert!(cache.blocks_held() <= KvCache::blocks_for_sequence(&config, 4, 20, 4));
        drop(cache);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let config = config();
        let pool = KvBlockPool::new(&config, 4, 3).expect("pool");
        let mut cache = KvCache::in_pool(&config, pool.clone());
        let err = cache.reserve(1).expect_err("one block per layer is more than 3");
        assert!(matches!(err, ModelError::KvCacheFull { available: 3, .. }), "{err}");
        assert_eq!(pool.in_use(), 0);
        assert_eq!(cache.blocks_held(), 0);
    }

    /// Every pool index held by any of `caches`, checked distinct and below the pool's capacity.
    fn held_indices(caches: &[&KvCache], capacity: usize) -> Vec<usize> {
        let mut all = Vec::new();
        for cache in caches {
            for l in 0..cache.layers() {
                all.extend(cache.block_table(l).expect("layer").blocks);
            }
        }
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len(), "a pool index is held twice: {all:?}");
        assert!(all.iter().all(|&i| i < capacity), "an index is not below the capacity {capacity}: {all:?}");
        all
    }

    #[test]
    fn device_pool_indices_stay_below_capacity_and_are_reused() {
        let config = config();
        let layers = config.num_hidden_layers;
        // Enough for two sequences of 20 positions (global layers 5 blocks, chunked layers at most 3 mid-step).
        let capacity = KvCache::blocks_for_sequence(&config, 4, 20, 4) * 2;
        let pool = KvBlockPool::on_device(&config, 4, capacity).expect("device pool");
        assert!(pool.is_on_device());
        let mut a = KvCache::in_pool(&config, pool.clone());
        let mut b = KvCache::in_pool(&config, pool.clone());
        for round in 0..3 {
            for _ in 0..5 {
                for cache in [&mut a, &mut b] {
                    cache.reserve(4).expect("reserve");
                    cache.advance(4);
                }
                held_indices(&[&a, &b], capacity);
            }
            assert_eq!(pool.in_use(), a.blocks_held() + b.blocks_held());
            // Chunked layers gave blocks back and later steps took them again: no index was ever made past the
            // most blocks held at once.
            let made = pool.state().made;
            assert!(made <= capacity, "round {round}: {made} indices made");
            a.clear();
            b.clear();
            assert_eq!(pool.in_use(), 0);
        }
        let made = pool.state().made;
        assert!(made <= capacity);
        // A full pool refuses instead of handing out an index past the arena.
        let mut caches: Vec<KvCache> = Vec::new();
        loop {
            let mut cache = KvCache::in_pool(&config, pool.clone());
            match cache.reserve(4) {
                Ok(()) => caches.push(cache),
                Err(ModelError::KvCacheFull { capacity: c, .. }) => {
                    assert_eq!(c, capacity);
                    break;
                }
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        held_indices(&caches.iter().collect::<Vec<_>>(), capacity);
        let made = pool.state().made;
        assert!(made <= capacity, "{made} indices made");
        assert!(pool.available() < layers, "refused with {} blocks free", pool.available());
        assert_eq!(layers * caches.len(), pool.in_use());
    }

    #[test]
    fn block_table_and_slots_locate_every_position() {
        let config = config();
        let pool = KvBlockPool::on_device(&config, 4, 1000).expect("device pool");
        // Another sequence first, so this one's indices do not start at 0.
        let mut other = KvCache::in_pool(&config, pool.clone());
        other.reserve(3).expect("reserve");
        let mut cache = KvCache::in_pool(&config, pool.clone());
        cache.reserve(10).expect("reserve");
        cache.advance(10);
        cache.reserve(3).expect("reserve");
        for l in 0..config.num_hidden_layers {
            let table = cache.block_table(l).expect("layer");
            let chunked = config.is_chunked_attention(l);
            // 13 positions reserved; chunked layers (chunk 8) released the blocks before position 8.
            let expected_first = if chunked { 2 } else { 0 };
            assert_eq!(table.first_block, expected_first, "layer {l}");
            assert_eq!(table.blocks.len(), 4 - expected_first, "layer {l}");
            for position in expected_first * 4..13 {
                let block = table.blocks[position / 4 - table.first_block];
                assert_eq!(cache.slot(l, position).expect("reserved"), block * 4 + position % 4, "layer {l}");
            }
            // Past the reservation, and (chunked layers) before the current chunk: no slot.
            assert!(cache.slot(l, 16).is_err());
            if chunked {
                let err = cache.slot(l, 3).expect_err("released");
                assert!(err.to_string().contains("position 3 of layer"), "{err}");
            }
        }
        assert!(cache.block_table(config.num_hidden_layers).is_err());
        assert!(cache.slot(config.num_hidden_layers, 0).is_err());
        // The same reading works on a host pool.
        let host = KvBlockPool::new(&config, 4, 1000).expect("pool");
        let mut cache = KvCache::in_pool(&config, host);
        cache.reserve(5).expect("reserve");
        let table = cache.block_table(0).expect("layer 0");
        assert_eq!(table.first_block, 0);
        assert_eq!(cache.slot(0, 4).expect("reserved"), table.blocks[1] * 4);
    }

    #[test]
    fn device_caches_refuse_host_storage_operations() {
        let config = config();
        let pool = KvBlockPool::on_device(&config, 4, 64).expect("device pool");
        let mut cache = KvCache::in_pool(&config, pool);
        cache.reserve(4).expect("reserve");
        let row = vec![0.0; config.kv_dim()];
        let err = cache.write(0, 0, &row, &row).expect_err("no host storage");
        assert!(err.to_string().contains("live on a device"), "{err}");
        assert!(cache.layer_rms().iter().all(Option::is_none));
        let mut fresh = KvCache::in_pool(&config, cache.pool().clone());
        let err = fresh.append_synthetic(4, |_, _, _, _| {}).expect_err("no host storage");
        assert!(err.to_string().contains("synthetic fill"), "{err}");
        assert_eq!(fresh.len(), 0);
        assert_eq!(fresh.blocks_held(), 0);
        // The CPU attention's view of a device block has no floats: its kernel refuses it instead of reading any.
        assert!(cache.paged(0, 4).blocks.iter().all(|b| b.data().is_empty()));
    }

    #[test]
    fn block_sizing_counts_the_element_type() {
        let config = config();
        // [2, block_size, kv_heads, head_dim] values per block, 4 or 2 bytes each.
        let values = 2 * 16 * config.kv_dim() as u64;
        assert_eq!(KvBlockPool::block_bytes(&config, 16), 4 * values);
        assert_eq!(KvBlockPool::block_bytes_for_dtype(&config, 16, KvDtype::F32), 4 * values);
        assert_eq!(KvBlockPool::block_bytes_for_dtype(&config, 16, KvDtype::Bf16), 2 * values);
        let bytes = 1000 * 4 * values + 7;
        assert_eq!(KvBlockPool::blocks_in_bytes(&config, 16, bytes), 1000);
        assert_eq!(KvBlockPool::blocks_in_bytes_for_dtype(&config, 16, bytes, KvDtype::Bf16), 2000);
        let most = KvBlockPool::blocks_in_bytes_for_dtype(&config, 16, u64::MAX, KvDtype::Bf16);
        assert_eq!(most as u64, u64::MAX / (2 * values));
    }

    #[test]
    fn device_pools_refuse_impossible_sizes() {
        let config = config();
        for (block_size, capacity) in [(4, 0), (0, 8), (1 << 20, 1 << 13), (2, usize::MAX)] {
            let err = KvBlockPool::on_device(&config, block_size, capacity).expect_err("refused");
            assert!(matches!(err, ModelError::InvalidInput { .. }), "{block_size} x {capacity}: {err}");
        }
        // Exactly 2^32 slots still fit u32 indices.
        KvBlockPool::on_device(&config, 1 << 20, 1 << 12).expect("2^32 slots");
    }
}
