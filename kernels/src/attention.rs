//! Grouped-query softmax attention over a contiguous range of absolute key positions, with the causal and the
//! chunked (Llama 4 RoPE layers) masks, and the exact merge of partial attentions computed over disjoint key ranges.
//!
//! Both masks make the keys a query can see one contiguous range of positions, so the kernel computes scores only
//! over that range instead of masking a full row.

use rayon::prelude::*;

use crate::error::{check_len, product, KernelError};
use crate::simd::{self, Isa};

/// Which keys a query sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMask {
    /// Key `j` is visible to the query at position `p` iff `j <= p`.
    Causal,
    /// Key `j` is visible to the query at position `p` iff `j <= p` and `j / chunk == p / chunk` (fixed absolute
    /// blocks, not a sliding window: Llama 4's chunked-attention layers).
    Chunked {
        /// Block length in positions (8192 for Llama 4).
        chunk: usize,
    },
}

impl AttentionMask {
    /// The visible absolute key positions `[lo, hi)` for a query at `position`, clipped to the keys held,
    /// `[key_start, key_end)`. Empty when `lo >= hi`.
    fn visible(self, position: usize, key_start: usize, key_end: usize) -> (usize, usize) {
        let first = match self {
            AttentionMask::Causal => 0,
            AttentionMask::Chunked { chunk } => position / chunk * chunk,
        };
        (first.max(key_start), position.saturating_add(1).min(key_end))
    }
}

/// Head counts and size of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; must divide `q_heads`.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

#[allow(clippy::too_many_arguments)]
fn check(
    op: &'static str,
    q: &[f32],
    q_positions: &[usize],
    k: &[f32],
    v: &[f32],
    key_start: usize,
    shape: AttentionShape,
    mask: AttentionMask,
    out: &[f32],
    lse: Option<&[f32]>,
) -> Result<usize, KernelError> {
    let AttentionShape { q_heads, kv_heads, head_dim } = shape;
    if q_heads == 0 || kv_heads == 0 || head_dim == 0 {
        return Err(KernelError::invalid(op, format!("empty shape {shape:?}")));
    }
    if q_heads % kv_heads != 0 {
        return Err(KernelError::invalid(
            op,
            format!("q_heads = {q_heads} is not a multiple of kv_heads = {kv_heads}"),
        ));
    }
    if let AttentionMask::Chunked { chunk: 0 } = mask {
        return Err(KernelError::invalid(op, "chunk size is 0"));
    }
    let t_q = q_positions.len();
    let q_row = q_heads * head_dim;
    let kv_row = product(op, kv_heads, head_dim)?;
    check_len(
        op,
        "q",
        q.len(),
        product(op, t_q, q_row)?,
        format_args!("t_q * q_heads * head_dim = {t_q} * {q_heads} * {head_dim}"),
    )?;
    check_len(op, "out", out.len(), q.len(), "q.len()")?;
    if k.len() % kv_row != 0 {
        return Err(KernelError::shape(
            op,
            format!("k has {} values, not a multiple of kv_heads * head_dim = {kv_row}", k.len()),
        ));
    }
    check_len(op, "v", v.len(), k.len(), "k.len()")?;
    let t_k = k.len() / kv_row;
    if key_start.checked_add(t_k).is_none() {
        return Err(KernelError::invalid(op, format!("key_start {key_start} + {t_k} keys overflows")));
    }
    if let Some(lse) = lse {
        check_len(op, "lse", lse.len(), t_q * q_heads, format_args!("t_q * q_heads = {t_q} * {q_heads}"))?;
    }
    // The number of keys held.
    Ok(t_k)
}

/// Grouped-query attention.
///
/// `q`: `[t_q, q_heads, head_dim]` for absolute positions `q_positions` (`t_q = q_positions.len()`); `k`, `v`:
/// `[t_k, kv_heads, head_dim]` holding the keys of absolute positions `key_start .. key_start + t_k`. Query head `h`
/// uses kv head `h / (q_heads / kv_heads)`. Scores are `q · k * scale`, masked, softmaxed in f32 (max-subtracted);
/// `out`: `[t_q, q_heads, head_dim]`. If `lse` is given it receives, per (query, head) (`[t_q, q_heads]`), the
/// natural log-sum-exp of the scaled, masked scores, so that partial attentions over disjoint key ranges can be
/// merged exactly with [`merge_partials`]. A query that sees no key gets zeros and `lse = -inf`.
///
/// Multi-threaded over (KV head, tile of query positions, segment of keys): the query heads sharing a KV head and
/// a tile of query positions are scored together against blocks of keys, so each key and value is read once per
/// tile, not once per (query, head).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_positions: &[usize],
    k: &[f32],
    v: &[f32],
    key_start: usize,
    shape: AttentionShape,
    mask: AttentionMask,
    scale: f32,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<(), KernelError> {
    attention_with(Isa::detect(), q, q_positions, k, v, key_start, shape, mask, scale, out, lse)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_with(
    isa: Isa,
    q: &[f32],
    q_positions: &[usize],
    k: &[f32],
    v: &[f32],
    key_start: usize,
    shape: AttentionShape,
    mask: AttentionMask,
    scale: f32,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<(), KernelError> {
    let t_k = check("attention", q, q_positions, k, v, key_start, shape, mask, out, lse.as_deref())?;
    let keys = ContiguousKv { k, v, key_start, kv_heads: shape.kv_heads, head_dim: shape.head_dim };
    attend(isa, q, q_positions, &keys, (key_start, key_start + t_k), shape, mask, scale, out, lse);
    Ok(())
}

/// Where the keys and values of one attention call live: one row of `head_dim` values per (position, kv head).
trait KeyValueRows: Sync {
    fn key(&self, position: usize, kv_head: usize) -> &[f32];
    fn value(&self, position: usize, kv_head: usize) -> &[f32];
}

/// Keys and values as two `[t_k, kv_heads, head_dim]` arrays starting at `key_start`.
struct ContiguousKv<'a> {
    k: &'a [f32],
    v: &'a [f32],
    key_start: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KeyValueRows for ContiguousKv<'_> {
    fn key(&self, position: usize, kv_head: usize) -> &[f32] {
        let at = ((position - self.key_start) * self.kv_heads + kv_head) * self.head_dim;
        &self.k[at..at + self.head_dim]
    }

    fn value(&self, position: usize, kv_head: usize) -> &[f32] {
        let at = ((position - self.key_start) * self.kv_heads + kv_head) * self.head_dim;
        &self.v[at..at + self.head_dim]
    }
}

/// Keys and values held in fixed-size blocks of a paged KV cache, for one layer of one sequence.
///
/// Block `i` of `blocks` holds absolute positions `(first_block + i) * block_size ..` and is laid out
/// `[2, block_size, kv_heads, head_dim]`: the block's keys, then its values. Positions `key_start()..len` are valid.
#[derive(Debug)]
pub struct PagedKv<'a, B> {
    /// The sequence's blocks for this layer, in position order (its block table, resolved).
    pub blocks: &'a [B],
    /// Absolute index of `blocks[0]` (earlier blocks were released: chunked layers drop past chunks).
    pub first_block: usize,
    /// Positions per block.
    pub block_size: usize,
    /// One past the last valid position.
    pub len: usize,
}

impl<B: AsRef<[f32]>> PagedKv<'_, B> {
    /// The first position held.
    pub fn key_start(&self) -> usize {
        self.first_block * self.block_size
    }
}

/// [`PagedKv`] with the head layout resolved.
struct PagedRows<'a, B> {
    paged: PagedKv<'a, B>,
    kv_heads: usize,
    head_dim: usize,
}

impl<B: AsRef<[f32]> + Sync> PagedRows<'_, B> {
    fn row(&self, position: usize, kv_head: usize, values: bool) -> &[f32] {
        let block_size = self.paged.block_size;
        let block = &self.paged.blocks[position / block_size - self.paged.first_block];
        let half = if values { block_size } else { 0 };
        let at = ((half + position % block_size) * self.kv_heads + kv_head) * self.head_dim;
        &block.as_ref()[at..at + self.head_dim]
    }
}

impl<B: AsRef<[f32]> + Sync> KeyValueRows for PagedRows<'_, B> {
    fn key(&self, position: usize, kv_head: usize) -> &[f32] {
        self.row(position, kv_head, false)
    }

    fn value(&self, position: usize, kv_head: usize) -> &[f32] {
        self.row(position, kv_head, true)
    }
}

/// [`attention`] over the keys and values of a paged KV cache: the same arithmetic, in the same order, so a paged
/// call returns bit-for-bit what the contiguous call over the same keys returns.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<B: AsRef<[f32]> + Sync>(
    q: &[f32],
    q_positions: &[usize],
    keys: PagedKv<'_, B>,
    shape: AttentionShape,
    mask: AttentionMask,
    scale: f32,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<(), KernelError> {
    const OP: &str = "paged_attention";
    if keys.block_size == 0 {
        return Err(KernelError::invalid(OP, "block_size is 0"));
    }
    let kv_row = product(OP, shape.kv_heads, shape.head_dim)?;
    let block_floats = product(OP, 2 * keys.block_size, kv_row)?;
    if let Some((i, block)) = keys.blocks.iter().enumerate().find(|(_, b)| b.as_ref().len() != block_floats) {
        return Err(KernelError::shape(
            OP,
            format!(
                "block {i} has {} values, not 2 * block_size * kv_heads * head_dim = {block_floats}",
                block.as_ref().len()
            ),
        ));
    }
    let key_start = keys.key_start();
    let held_end = (keys.first_block + keys.blocks.len()) * keys.block_size;
    if keys.len < key_start || keys.len > held_end {
        return Err(KernelError::invalid(
            OP,
            format!("len {} is outside the positions {key_start}..{held_end} the blocks hold", keys.len),
        ));
    }
    // The contiguous checks on an empty key array cover q, positions, out, lse and the shape.
    check(OP, q, q_positions, &[], &[], key_start, shape, mask, out, lse.as_deref())?;
    let key_end = keys.len;
    let rows = PagedRows { paged: keys, kv_heads: shape.kv_heads, head_dim: shape.head_dim };
    attend(Isa::detect(), q, q_positions, &rows, (key_start, key_end), shape, mask, scale, out, lse);
    Ok(())
}

/// Query positions scored together in one task: with the query heads of one KV head, the rows that share every key
/// and value read (prefill; a decode step has one position).
const QUERY_TILE: usize = 16;
/// Keys scored at once: a block's keys and values (64 KiB for 128-value heads) stay in cache while every row of a
/// tile uses them, so each is read from memory once per tile instead of once per (query, head).
const KEY_BLOCK: usize = 64;
/// A step of one query tile (decode) splits its keys into segments of this many positions, computed in parallel and
/// merged like partial attentions: otherwise a decode step would have only `kv_heads` tasks for any context length.
const KEY_SEGMENT: usize = 4096;

/// The running softmax of one task's rows (a tile's positions times one KV head's query heads) over one segment of
/// keys: per row the running maximum score, the sum of `exp(score - max)`, and the value sum weighted by it.
struct RowsState {
    max: Vec<f32>,
    total: Vec<f32>,
    /// `[rows, head_dim]`.
    acc: Vec<f32>,
}

/// The kernel behind [`attention`] and [`paged_attention`], on checked arguments; `held` is the range of positions
/// `keys` holds.
///
/// Work is split into tasks of (KV head, tile of [`QUERY_TILE`] query positions, segment of keys); a task runs an
/// online softmax over blocks of [`KEY_BLOCK`] keys for all its rows, and the segments of a row are merged at the
/// end. The split depends only on the shapes and `held`, never on the storage or the thread count, so the contiguous
/// and the paged calls over the same keys do the same arithmetic in the same order.
#[allow(clippy::too_many_arguments)]
fn attend<K: KeyValueRows>(
    isa: Isa,
    q: &[f32],
    q_positions: &[usize],
    keys: &K,
    held: (usize, usize),
    shape: AttentionShape,
    mask: AttentionMask,
    scale: f32,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    let AttentionShape { q_heads, kv_heads, head_dim } = shape;
    let group = q_heads / kv_heads;
    let t_q = q_positions.len();
    let tiles = t_q.div_ceil(QUERY_TILE);
    let segment = if tiles == 1 { KEY_SEGMENT } else { usize::MAX };
    let segments = if segment == usize::MAX { 1 } else { (held.1 - held.0).div_ceil(segment).max(1) };
    let tasks: Vec<(usize, usize, usize)> =
        (0..kv_heads).flat_map(|g| (0..tiles).flat_map(move |t| (0..segments).map(move |s| (g, t, s)))).collect();
    let states: Vec<RowsState> = tasks
        .par_iter()
        .map_init(Vec::new, |scores, &(kv_head, tile, s)| {
            let queries = tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(t_q);
            let seg_lo = held.0.saturating_add(s.saturating_mul(segment));
            let seg = (seg_lo, seg_lo.saturating_add(segment).min(held.1));
            attend_rows(isa, q, q_positions, queries, keys, seg, kv_head, shape, mask, scale, scores)
        })
        .collect();
    let mut own_lse;
    let lse = match lse {
        Some(lse) => lse,
        None => {
            own_lse = vec![0.0f32; t_q * q_heads];
            &mut own_lse[..]
        }
    };
    // Merge each task group's segments into its rows of `out` (positions x this KV head's query heads).
    for (first, parts) in states.chunks(segments).enumerate() {
        let (kv_head, tile) = (tasks[first * segments].0, tasks[first * segments].1);
        for (r, i) in (tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(t_q)).enumerate() {
            for j in 0..group {
                let (row, h) = (r * group + j, kv_head * group + j);
                let at = i * q_heads + h;
                let dst = &mut out[at * head_dim..(at + 1) * head_dim];
                let max = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[row]));
                dst.fill(0.0);
                if max == f32::NEG_INFINITY {
                    lse[at] = f32::NEG_INFINITY;
                    continue;
                }
                let mut total = 0.0f32;
                for part in parts.iter().filter(|p| p.max[row] > f32::NEG_INFINITY) {
                    let weight = (part.max[row] - max).exp();
                    simd::axpy(isa, weight, &part.acc[row * head_dim..(row + 1) * head_dim], dst);
                    total += weight * part.total[row];
                }
                simd::scale_in_place(isa, dst, 1.0 / total);
                lse[at] = max + total.ln();
            }
        }
    }
}

/// One task of [`attend`]: the rows of query positions `queries` (indices into `q_positions`) and the query heads of
/// `kv_head`, over the keys of `seg`, block by block. Row `r * group + j` is position `queries.start + r`, head
/// `kv_head * group + j`.
#[allow(clippy::too_many_arguments)]
fn attend_rows<K: KeyValueRows>(
    isa: Isa,
    q: &[f32],
    q_positions: &[usize],
    queries: std::ops::Range<usize>,
    keys: &K,
    seg: (usize, usize),
    kv_head: usize,
    shape: AttentionShape,
    mask: AttentionMask,
    scale: f32,
    scores: &mut Vec<f32>,
) -> RowsState {
    let AttentionShape { q_heads, kv_heads, head_dim } = shape;
    let group = q_heads / kv_heads;
    let rows = queries.len() * group;
    let mut state =
        RowsState { max: vec![f32::NEG_INFINITY; rows], total: vec![0.0; rows], acc: vec![0.0; rows * head_dim] };
    // The keys each of the tile's queries sees within this segment, and their union.
    let visible: Vec<(usize, usize)> = queries.clone().map(|i| mask.visible(q_positions[i], seg.0, seg.1)).collect();
    let lo = visible.iter().filter(|(a, b)| a < b).map(|v| v.0).min();
    let hi = visible.iter().filter(|(a, b)| a < b).map(|v| v.1).max();
    let (Some(lo), Some(hi)) = (lo, hi) else { return state };
    let mut key_rows: Vec<&[f32]> = Vec::with_capacity(KEY_BLOCK);
    let mut value_rows: Vec<&[f32]> = Vec::with_capacity(KEY_BLOCK);
    let mut block = lo;
    while block < hi {
        let block_end = (block + KEY_BLOCK).min(hi);
        key_rows.clear();
        value_rows.clear();
        key_rows.extend((block..block_end).map(|pos| keys.key(pos, kv_head)));
        value_rows.extend((block..block_end).map(|pos| keys.value(pos, kv_head)));
        for (r, &(a, b)) in visible.iter().enumerate() {
            let (a, b) = (a.max(block), b.min(block_end));
            if a >= b {
                continue;
            }
            let i = queries.start + r;
            let (k_rows, v_rows) = (&key_rows[a - block..b - block], &value_rows[a - block..b - block]);
            // The query heads of this position that share `kv_head`, up to four at a time.
            let mut j = 0;
            while j < group {
                let n = (group - j).min(4);
                let first_head = kv_head * group + j;
                let query_rows = &q[(i * q_heads + first_head) * head_dim..(i * q_heads + first_head + n) * head_dim];
                let row = r * group + j;
                let part = RowsPart {
                    max: &mut state.max[row..row + n],
                    total: &mut state.total[row..row + n],
                    acc: &mut state.acc[row * head_dim..(row + n) * head_dim],
                };
                match n {
                    4 => block_rows::<4>(isa, query_rows, k_rows, v_rows, scale, part, scores),
                    3 => block_rows::<3>(isa, query_rows, k_rows, v_rows, scale, part, scores),
                    2 => block_rows::<2>(isa, query_rows, k_rows, v_rows, scale, part, scores),
                    _ => block_rows::<1>(isa, query_rows, k_rows, v_rows, scale, part, scores),
                }
                j += n;
            }
        }
        block = block_end;
    }
    state
}

/// `R` consecutive rows of a [`RowsState`].
struct RowsPart<'a> {
    max: &'a mut [f32],
    total: &'a mut [f32],
    acc: &'a mut [f32],
}

/// The online-softmax update of `R` query rows (`[R, head_dim]`, heads sharing one KV head) by one block of keys
/// they all see: each key and value row is loaded once for the `R` rows.
fn block_rows<const R: usize>(
    isa: Isa,
    query_rows: &[f32],
    key_rows: &[&[f32]],
    value_rows: &[&[f32]],
    scale: f32,
    part: RowsPart<'_>,
    scores: &mut Vec<f32>,
) {
    let head_dim = query_rows.len() / R;
    let n = key_rows.len();
    scores.clear();
    scores.resize(R * n, 0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only constructed after the CPU reported AVX2 and FMA (see `simd`); every row has
        // `head_dim` values and `scores` has `R * n`.
        Isa::Avx2 => unsafe { avx2_rows::scores::<R>(query_rows, head_dim, key_rows, scale, scores) },
        Isa::Portable => {
            for (t, key) in key_rows.iter().enumerate() {
                for r in 0..R {
                    scores[r * n + t] = simd::dot(isa, &query_rows[r * head_dim..(r + 1) * head_dim], key) * scale;
                }
            }
        }
    }
    for r in 0..R {
        let row_scores = &mut scores[r * n..(r + 1) * n];
        let block_max = row_scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        if block_max > part.max[r] {
            if part.max[r] > f32::NEG_INFINITY {
                let rescale = (part.max[r] - block_max).exp();
                simd::scale_in_place(isa, &mut part.acc[r * head_dim..(r + 1) * head_dim], rescale);
                part.total[r] *= rescale;
            }
            part.max[r] = block_max;
        }
        part.total[r] += simd::exp_shifted_sum(isa, row_scores, part.max[r]);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; `acc` has `R * head_dim` values and every value row `head_dim`.
        Isa::Avx2 => unsafe { avx2_rows::accumulate::<R>(scores, value_rows, head_dim, part.acc) },
        Isa::Portable => {
            for r in 0..R {
                let acc = &mut part.acc[r * head_dim..(r + 1) * head_dim];
                for (t, value) in value_rows.iter().enumerate() {
                    simd::axpy(isa, scores[r * n + t], value, acc);
                }
            }
        }
    }
}

/// The two inner products of [`block_rows`] for AVX2 + FMA, register-blocked: `R` query rows against two keys at a
/// time, and `R` rows of 16 output values against every value row, so each loaded key or value feeds `R` (or `2R`)
/// independent multiply-add chains.
#[cfg(target_arch = "x86_64")]
mod avx2_rows {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// `scores[r * n + t] = dot(query row r, key_rows[t]) * scale`, `n = key_rows.len()`.
    ///
    /// Safety: AVX2 and FMA present; `query_rows` has `R * head_dim` values, every key row at least `head_dim`,
    /// `scores` `R * n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores<const R: usize>(
        query_rows: &[f32],
        head_dim: usize,
        key_rows: &[&[f32]],
        scale: f32,
        scores: &mut [f32],
    ) {
        let n = key_rows.len();
        let main = head_dim / 8 * 8;
        let q = query_rows.as_ptr();
        let dot_tail = |r: usize, key: &[f32]| -> f32 {
            (main..head_dim).fold(0.0f32, |d, c| query_rows[r * head_dim + c].mul_add(key[c], d))
        };
        let mut t = 0;
        while t + 2 <= n {
            let (k0, k1) = (key_rows[t].as_ptr(), key_rows[t + 1].as_ptr());
            let mut a0 = [_mm256_setzero_ps(); R];
            let mut a1 = [_mm256_setzero_ps(); R];
            let mut c = 0;
            while c < main {
                // SAFETY: c + 8 <= head_dim for every row read.
                let (x0, x1) = unsafe { (_mm256_loadu_ps(k0.add(c)), _mm256_loadu_ps(k1.add(c))) };
                for r in 0..R {
                    let qr = unsafe { _mm256_loadu_ps(q.add(r * head_dim + c)) };
                    a0[r] = _mm256_fmadd_ps(qr, x0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(qr, x1, a1[r]);
                }
                c += 8;
            }
            for r in 0..R {
                scores[r * n + t] = (hsum(a0[r]) + dot_tail(r, key_rows[t])) * scale;
                scores[r * n + t + 1] = (hsum(a1[r]) + dot_tail(r, key_rows[t + 1])) * scale;
            }
            t += 2;
        }
        if t < n {
            let k0 = key_rows[t].as_ptr();
            let mut a0 = [_mm256_setzero_ps(); R];
            let mut c = 0;
            while c < main {
                // SAFETY: as above.
                let x0 = unsafe { _mm256_loadu_ps(k0.add(c)) };
                for (r, acc) in a0.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(q.add(r * head_dim + c)) }, x0, *acc);
                }
                c += 8;
            }
            for (r, acc) in a0.iter().enumerate() {
                scores[r * n + t] = (hsum(*acc) + dot_tail(r, key_rows[t])) * scale;
            }
        }
    }

    /// `acc[r] += sum_t weights[r * n + t] * value_rows[t]` for the `R` rows of `acc` (`[R, head_dim]`).
    ///
    /// Safety: AVX2 and FMA present; `weights` has `R * n` values, every value row at least `head_dim`, `acc`
    /// `R * head_dim`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate<const R: usize>(
        weights: &[f32],
        value_rows: &[&[f32]],
        head_dim: usize,
        acc: &mut [f32],
    ) {
        let n = value_rows.len();
        let out = acc.as_mut_ptr();
        let mut c = 0;
        while c + 16 <= head_dim {
            // SAFETY: c + 16 <= head_dim for every row touched.
            let mut lo: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(out.add(r * head_dim + c)) });
            let mut hi: [__m256; R] =
                std::array::from_fn(|r| unsafe { _mm256_loadu_ps(out.add(r * head_dim + c + 8)) });
            for (t, value) in value_rows.iter().enumerate() {
                let v = value.as_ptr();
                let (v0, v1) = unsafe { (_mm256_loadu_ps(v.add(c)), _mm256_loadu_ps(v.add(c + 8))) };
                for r in 0..R {
                    let w = _mm256_set1_ps(weights[r * n + t]);
                    lo[r] = _mm256_fmadd_ps(w, v0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(w, v1, hi[r]);
                }
            }
            for r in 0..R {
                unsafe {
                    _mm256_storeu_ps(out.add(r * head_dim + c), lo[r]);
                    _mm256_storeu_ps(out.add(r * head_dim + c + 8), hi[r]);
                }
            }
            c += 16;
        }
        for c in c..head_dim {
            for r in 0..R {
                let mut sum = acc[r * head_dim + c];
                for (t, value) in value_rows.iter().enumerate() {
                    sum = weights[r * n + t].mul_add(value[c], sum);
                }
                acc[r * head_dim + c] = sum;
            }
        }
    }
}

/// Scalar reference for [`attention`]: every key scored, the mask applied as `-inf`, softmax in f64.
#[allow(clippy::too_many_arguments)]
pub fn attention_reference(
    q: &[f32],
    q_positions: &[usize],
    k: &[f32],
    v: &[f32],
    key_start: usize,
    shape: AttentionShape,
    mask: AttentionMask,
    scale: f32,
    out: &mut [f32],
    mut lse: Option<&mut [f32]>,
) -> Result<(), KernelError> {
    let t_k = check("attention_reference", q, q_positions, k, v, key_start, shape, mask, out, lse.as_deref())?;
    let AttentionShape { q_heads, kv_heads, head_dim } = shape;
    let visible = |p: usize, j: usize| match mask {
        AttentionMask::Causal => j <= p,
        AttentionMask::Chunked { chunk } => j <= p && j / chunk == p / chunk,
    };
    for (i, &p) in q_positions.iter().enumerate() {
        for h in 0..q_heads {
            let g = h / (q_heads / kv_heads);
            let qo = (i * q_heads + h) * head_dim;
            let scores: Vec<f64> = (0..t_k)
                .map(|j| {
                    if !visible(p, key_start + j) {
                        return f64::NEG_INFINITY;
                    }
                    let ko = (j * kv_heads + g) * head_dim;
                    let d: f64 = (0..head_dim).map(|c| q[qo + c] as f64 * k[ko + c] as f64).sum();
                    d * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                out[qo..qo + head_dim].fill(0.0);
                if let Some(lse) = lse.as_deref_mut() {
                    lse[i * q_heads + h] = f32::NEG_INFINITY;
                }
                continue;
            }
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..head_dim {
                let acc: f64 = (0..t_k).map(|j| weights[j] * v[(j * kv_heads + g) * head_dim + c] as f64).sum();
                out[qo + c] = (acc / total) as f32;
            }
            if let Some(lse) = lse.as_deref_mut() {
                lse[i * q_heads + h] = (max + total.ln()) as f32;
            }
        }
    }
    Ok(())
}

/// One partial attention result: the output and log-sum-exp of [`attention`] over one range of keys.
#[derive(Debug, Clone, Copy)]
pub struct PartialAttention<'a> {
    /// `[rows, head_dim]` (rows = queries x heads).
    pub out: &'a [f32],
    /// `[rows]`, `-inf` where the range held no visible key.
    pub lse: &'a [f32],
}

/// Merges partial attentions over disjoint key ranges into the attention over their union, exactly (up to
/// rounding): `out = sum_p exp(lse_p - L) * out_p` with `L = log(sum_p exp(lse_p))`. Rows no part saw a key for get
/// zeros and `lse = -inf`. `out` has `rows * head_dim` values; `lse`, if given, receives `L` (`rows` values).
pub fn merge_partials(
    parts: &[PartialAttention<'_>],
    head_dim: usize,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<(), KernelError> {
    const OP: &str = "merge_partials";
    if head_dim == 0 {
        return Err(KernelError::invalid(OP, "head_dim is 0"));
    }
    if out.len() % head_dim != 0 {
        return Err(KernelError::shape(
            OP,
            format!("out has {} values, not a multiple of head_dim = {head_dim}", out.len()),
        ));
    }
    let rows = out.len() / head_dim;
    for (p, part) in parts.iter().enumerate() {
        check_len(OP, format_args!("part {p} out"), part.out.len(), out.len(), "out.len()")?;
        check_len(OP, format_args!("part {p} lse"), part.lse.len(), rows, "out.len() / head_dim")?;
    }
    if let Some(lse) = lse.as_deref() {
        check_len(OP, "lse", lse.len(), rows, "out.len() / head_dim")?;
    }
    let isa = Isa::detect();
    let mut merged_lse = vec![0.0f32; rows];
    out.par_chunks_mut(head_dim).zip(merged_lse.par_iter_mut()).enumerate().for_each(|(r, (dst, row_lse))| {
        let max = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.lse[r]));
        dst.fill(0.0);
        if max == f32::NEG_INFINITY {
            *row_lse = f32::NEG_INFINITY;
            return;
        }
        let mut total = 0.0f32;
        for part in parts {
            let weight = (part.lse[r] - max).exp();
            if weight > 0.0 {
                simd::axpy(isa, weight, &part.out[r * head_dim..(r + 1) * head_dim], dst);
                total += weight;
            }
        }
        simd::scale_in_place(isa, dst, 1.0 / total);
        *row_lse = max + total.ln();
    });
    if let Some(lse) = lse {
        lse.copy_from_slice(&merged_lse);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    struct Case {
        q: Vec<f32>,
        positions: Vec<usize>,
        k: Vec<f32>,
        v: Vec<f32>,
        key_start: usize,
        shape: AttentionShape,
    }

    fn case(seed: u64, positions: Vec<usize>, key_start: usize, t_k: usize, shape: AttentionShape) -> Case {
        let mut r = rng(seed);
        let q = uniform(&mut r, positions.len() * shape.q_heads * shape.head_dim, 1.0);
        let k = uniform(&mut r, t_k * shape.kv_heads * shape.head_dim, 1.0);
        let v = uniform(&mut r, t_k * shape.kv_heads * shape.head_dim, 1.0);
        Case { q, positions, k, v, key_start, shape }
    }

    fn run(isa: Isa, c: &Case, mask: AttentionMask, scale: f32) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; c.q.len()];
        let mut lse = vec![f32::NAN; c.positions.len() * c.shape.q_heads];
        attention_with(
            isa,
            &c.q,
            &c.positions,
            &c.k,
            &c.v,
            c.key_start,
            c.shape,
            mask,
            scale,
            &mut out,
            Some(&mut lse),
        )
        .expect("attention");
        (out, lse)
    }

    fn reference(c: &Case, mask: AttentionMask, scale: f32) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; c.q.len()];
        let mut lse = vec![f32::NAN; c.positions.len() * c.shape.q_heads];
        attention_reference(
            &c.q,
            &c.positions,
            &c.k,
            &c.v,
            c.key_start,
            c.shape,
            mask,
            scale,
            &mut out,
            Some(&mut lse),
        )
        .expect("reference");
        (out, lse)
    }

    fn assert_lse_eq(got: &[f32], want: &[f32], what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if w == f32::NEG_INFINITY {
                assert_eq!(g, w, "{what}: lse[{i}]");
            } else {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: lse[{i}] = {g}, want {w}");
            }
        }
    }

    const GQA: AttentionShape = AttentionShape { q_heads: 6, kv_heads: 2, head_dim: 19 };

    #[test]
    fn matches_reference_causal_and_chunked_with_gqa() {
        // Prefill: queries at the positions of the keys, which start at 5 (a cache that began mid-sequence).
        let prefill = case(11, (5..5 + 23).collect(), 5, 23, GQA);
        // Decode-like: a few queries past the keys, plus one before them that sees nothing.
        let decode = case(12, vec![2, 40, 41, 57], 10, 31, GQA);
        // Wide heads (Llama 4 sizes, fewer heads) and a single kv head.
        let wide = case(13, vec![0, 1, 7, 8, 63], 0, 64, AttentionShape { q_heads: 5, kv_heads: 1, head_dim: 128 });
        for isa in Isa::available() {
            for (name, c) in [("prefill", &prefill), ("decode", &decode), ("wide", &wide)] {
                for mask in
                    [AttentionMask::Causal, AttentionMask::Chunked { chunk: 8 }, AttentionMask::Chunked { chunk: 3 }]
                {
                    let scale = 1.0 / (c.shape.head_dim as f32).sqrt();
                    let (out, lse) = run(isa, c, mask, scale);
                    let (want_out, want_lse) = reference(c, mask, scale);
                    let what = format!("{isa:?} {name} {mask:?}");
                    assert_close(&out, &want_out, 2e-6, 1e-5, &what);
                    assert_lse_eq(&lse, &want_lse, &what);
                }
            }
        }
    }

    /// Splits a case's contiguous keys into blocks of `block_size` positions aligned to absolute positions; the
    /// positions of the first block before `key_start` and of the last block past the keys are filled with NaN,
    /// which must never be read.
    fn into_blocks(c: &Case, block_size: usize) -> (Vec<Vec<f32>>, usize) {
        let row = c.shape.kv_heads * c.shape.head_dim;
        let t_k = c.k.len() / row;
        let first_block = c.key_start / block_size;
        let end_block = (c.key_start + t_k).div_ceil(block_size);
        let blocks = (first_block..end_block)
            .map(|b| {
                let mut block = vec![f32::NAN; 2 * block_size * row];
                for slot in 0..block_size {
                    let position = b * block_size + slot;
                    if position < c.key_start || position >= c.key_start + t_k {
                        continue;
                    }
                    let from = (position - c.key_start) * row;
                    block[slot * row..(slot + 1) * row].copy_from_slice(&c.k[from..from + row]);
                    let values = (block_size + slot) * row;
                    block[values..values + row].copy_from_slice(&c.v[from..from + row]);
                }
                block
            })
            .collect();
        (blocks, first_block)
    }

    #[test]
    fn paged_equals_contiguous_bit_for_bit() {
        // The cache's first block starts at position 8 (earlier blocks released); the last is partly filled.
        let c = case(21, vec![10, 11, 12, 29, 40, 41], 8, 34, GQA);
        for block_size in [1, 2, 4, 8] {
            let (blocks, first_block) = into_blocks(&c, block_size);
            for mask in [AttentionMask::Causal, AttentionMask::Chunked { chunk: 8 }] {
                let (want_out, want_lse) = run(Isa::detect(), &c, mask, 0.25);
                let mut out = vec![f32::NAN; c.q.len()];
                let mut lse = vec![f32::NAN; want_lse.len()];
                let keys = PagedKv { blocks: &blocks, first_block, block_size, len: 42 };
                paged_attention(&c.q, &c.positions, keys, c.shape, mask, 0.25, &mut out, Some(&mut lse))
                    .expect("paged attention");
                assert_eq!(out, want_out, "block_size {block_size} {mask:?}");
                assert_eq!(lse, want_lse, "block_size {block_size} {mask:?}");
            }
        }
    }

    #[test]
    fn paged_refuses_blocks_of_the_wrong_size_and_a_len_past_them() {
        let c = case(22, vec![3], 0, 8, GQA);
        let (mut blocks, _) = into_blocks(&c, 4);
        let mut out = vec![0.0; c.q.len()];
        fn keys(blocks: &[Vec<f32>], len: usize) -> PagedKv<'_, Vec<f32>> {
            PagedKv { blocks, first_block: 0, block_size: 4, len }
        }
        let err =
            paged_attention(&c.q, &c.positions, keys(&blocks, 9), GQA, AttentionMask::Causal, 1.0, &mut out, None)
                .expect_err("len past the blocks");
        assert!(err.to_string().contains("outside the positions 0..8"), "{err}");
        blocks[1].pop();
        let err =
            paged_attention(&c.q, &c.positions, keys(&blocks, 8), GQA, AttentionMask::Causal, 1.0, &mut out, None)
                .expect_err("short block");
        assert!(err.to_string().contains("block 1 has"), "{err}");
    }

    #[test]
    fn invisible_queries_get_zeros_and_negative_infinity() {
        // Keys 16..24; chunk 8: a query at 30 sees keys 24.. (none held), one at 3 sees nothing either.
        let c = case(14, vec![3, 17, 30], 16, 8, GQA);
        let (out, lse) = run(Isa::detect(), &c, AttentionMask::Chunked { chunk: 8 }, 0.3);
        let row = GQA.q_heads * GQA.head_dim;
        assert!(out[..row].iter().all(|&v| v == 0.0));
        assert!(out[2 * row..].iter().all(|&v| v == 0.0));
        assert!(out[row..2 * row].iter().all(|v| v.is_finite()) && out[row..2 * row].iter().any(|&v| v != 0.0));
        assert!(lse[..6].iter().chain(&lse[12..]).all(|&l| l == f32::NEG_INFINITY));
        assert!(lse[6..12].iter().all(|l| l.is_finite()));
    }

    #[test]
    fn merging_two_halves_equals_the_whole() {
        let shape = GQA;
        let c = case(15, vec![9, 20, 21, 33, 34, 35], 4, 32, shape);
        let split = 4 + 13;
        let kv_row = shape.kv_heads * shape.head_dim;
        let (k_lo, k_hi) = c.k.split_at(13 * kv_row);
        let (v_lo, v_hi) = c.v.split_at(13 * kv_row);
        for mask in [AttentionMask::Causal, AttentionMask::Chunked { chunk: 16 }] {
            let (whole, whole_lse) = run(Isa::detect(), &c, mask, 0.25);
            let mut parts = Vec::new();
            for (k, v, start) in [(k_lo, v_lo, 4), (k_hi, v_hi, split)] {
                let half = Case {
                    q: c.q.clone(),
                    positions: c.positions.clone(),
                    k: k.to_vec(),
                    v: v.to_vec(),
                    key_start: start,
                    shape,
                };
                parts.push(run(Isa::detect(), &half, mask, 0.25));
            }
            // The query at 9 sees no key of the upper half: its lse there is -inf and the merge must ignore it.
            assert!(parts[1].1[..shape.q_heads].iter().all(|&l| l == f32::NEG_INFINITY));
            let partials: Vec<PartialAttention<'_>> =
                parts.iter().map(|(out, lse)| PartialAttention { out, lse }).collect();
            let mut merged = vec![f32::NAN; whole.len()];
            let mut merged_lse = vec![f32::NAN; whole_lse.len()];
            merge_partials(&partials, shape.head_dim, &mut merged, Some(&mut merged_lse)).expect("merge");
            assert_close(&merged, &whole, 2e-6, 1e-5, &format!("{mask:?} merged out"));
            assert_lse_eq(&merged_lse, &whole_lse, &format!("{mask:?} merged lse"));
            // Merging is order-independent and a lone part merges to itself.
            let reversed: Vec<PartialAttention<'_>> = partials.iter().rev().copied().collect();
            let mut again = vec![f32::NAN; whole.len()];
            merge_partials(&reversed, shape.head_dim, &mut again, None).expect("merge reversed");
            assert_close(&again, &whole, 2e-6, 1e-5, "reversed");
            let mut lone = vec![f32::NAN; whole.len()];
            merge_partials(&partials[..1], shape.head_dim, &mut lone, None).expect("merge one");
            assert_close(&lone, &parts[0].0, 0.0, 1e-6, "lone");
        }
        // Nothing to merge: zeros and -inf.
        let mut out = [f32::NAN; 4];
        let mut lse = [0.0f32; 2];
        merge_partials(&[], 2, &mut out, Some(&mut lse)).expect("empty merge");
        assert_eq!(out, [0.0; 4]);
        assert_eq!(lse, [f32::NEG_INFINITY; 2]);
    }

    #[test]
    fn refuses_bad_shapes() {
        let c = case(16, vec![0, 1], 0, 2, GQA);
        let mut out = vec![0.0f32; c.q.len()];
        let call = |shape: AttentionShape, mask: AttentionMask, k: &[f32], out: &mut [f32], lse: Option<&mut [f32]>| {
            attention(&c.q, &c.positions, k, &c.v, 0, shape, mask, 1.0, out, lse)
        };
        let bad_heads = AttentionShape { q_heads: 6, kv_heads: 4, head_dim: 19 };
        assert!(matches!(
            call(bad_heads, AttentionMask::Causal, &c.k, &mut out, None),
            Err(KernelError::InvalidArgument { .. })
        ));
        assert!(call(GQA, AttentionMask::Chunked { chunk: 0 }, &c.k, &mut out, None).is_err());
        let err = call(GQA, AttentionMask::Causal, &c.k[1..], &mut out, None).expect_err("k not whole rows");
        assert!(matches!(err, KernelError::Shape { op: "attention", .. }), "{err}");
        assert!(call(GQA, AttentionMask::Causal, &c.k, &mut out[1..], None).is_err());
        assert!(call(GQA, AttentionMask::Causal, &c.k, &mut out, Some(&mut [0.0; 3])).is_err());
        assert!(merge_partials(&[PartialAttention { out: &[0.0; 4], lse: &[0.0; 3] }], 2, &mut [0.0; 4], None).is_err());
    }
}
