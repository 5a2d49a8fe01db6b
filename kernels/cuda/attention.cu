// The attention worker's kernels on the GPU, f32 throughout, the layouts of the CPU kernels:
//   rms_norm              Llama RMSNorm per row (weight optional: Llama 4's weightless qk-norm)
//   rope_interleaved      interleaved (GPT-J) rotary embedding in place, as switchyard_kernels::rope
//   paged_decode_attention / paged_decode_attention_bf16
//                         one query per sequence over a paged KV cache, as switchyard_kernels::attention
//                         ::paged_attention: block i of a sequence holds positions (first_block + i) * block_size ..,
//                         laid out [2, block_size, kv_heads, head_dim] (keys, then values); causal or chunked mask;
//                         an f32 pool, or a bf16 one (keys and values widened to f32 as read: f32 arithmetic either way);
//                         a long context's keys split over several blocks per query head
//   paged_decode_attention_grouped / _grouped_bf16
//                         the same with one block per KV head for all its query heads (head_dim 128, up to 8 query
//                         heads per KV head: Maverick's), each key read once for the group
//   paged_decode_merge    the splits merged
// Compiled with NVRTC at start-up (kernels/src/device/cuda/compile.rs).

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float local) {
    __shared__ float warp_sum[32];
    for (int offset = 16; offset > 0; offset >>= 1) {
        local += __shfl_xor_sync(0xffffffff, local, offset);
    }
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (lane == 0) {
        warp_sum[warp] = local;
    }
    __syncthreads();
    int warps = blockDim.x / 32;
    float result = lane < warps ? warp_sum[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) {
        result += __shfl_xor_sync(0xffffffff, result, offset);
    }
    __syncthreads();
    return result;
}

// One block per row: out = x * (1 / sqrt(mean(x^2) + eps)) * weight (weight null: no weight).
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight, int rows, int dim,
                                    float eps, float* __restrict__ out) {
    int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* src = x + (size_t)row * dim;
    float local = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        local = fmaf(src[c], src[c], local);
    }
    float inverse = 1.0f / sqrtf(block_sum(local) / (float)dim + eps);
    float* dst = out + (size_t)row * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float v = src[c] * inverse;
        dst[c] = weight ? v * weight[c] : v;
    }
}

// x: [tokens, heads, head_dim]; the pair (x[2i], x[2i+1]) of each head rotated by angle = (float)positions[t] *
// inv_freq[i] (product, cos and sin in f32, as the CPU). Grid: tokens; block threads over (head, pair).
extern "C" __global__ void rope_interleaved(float* __restrict__ x, const unsigned int* __restrict__ positions,
                                            int tokens, int heads, int head_dim,
                                            const float* __restrict__ inv_freq) {
    int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    int half = head_dim / 2;
    float position = (float)positions[t];
    float* row = x + (size_t)t * heads * head_dim;
    for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
        int h = p / half;
        int i = p % half;
        float angle = position * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float* pair = row + h * head_dim + 2 * i;
        float a = pair[0];
        float b = pair[1];
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

// No CUDA header is included here, so no INFINITY macro.
#define NEG_INF __int_as_float(0xff800000)
#define MAX_HEAD_DIM 256
#define ATTENTION_WARPS 4

// `n` consecutive keys or values of the pool as f32 (an f32 pool's as they are, a bf16 pool's widened: exact). Four at
// a time in one load (16 bytes of f32, 8 of bf16) where `n` is 4 (head_dim 128, Maverick's); else one by one. `out`
// is indexed by constants only (the loops unroll), so it stays in registers; N: its size, the most `n` can be.
template <int N>
__device__ __forceinline__ void kv_load(const float* p, int n, float* out) {
    if (n == 4) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        out[0] = v.x;
        out[1] = v.y;
        out[2] = v.z;
        out[3] = v.w;
        return;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (i < n) {
            out[i] = p[i];
        }
    }
}

template <int N>
__device__ __forceinline__ void kv_load(const unsigned short* p, int n, float* out) {
    if (n == 4) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        out[0] = __uint_as_float(v.x << 16);
        out[1] = __uint_as_float(v.x & 0xffff0000u);
        out[2] = __uint_as_float(v.y << 16);
        out[3] = __uint_as_float(v.y & 0xffff0000u);
        return;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (i < n) {
            out[i] = __uint_as_float((unsigned int)p[i] << 16);
        }
    }
}

// The keys query `seq` sees in split `split` of `splits`: [lo, hi) (empty when its table row is out of range).
__device__ __forceinline__ void visible_keys(const unsigned int* __restrict__ table_row, int table_rows,
                                             const unsigned int* __restrict__ first_block,
                                             const unsigned int* __restrict__ seq_len,
                                             const unsigned int* __restrict__ positions, int seq, int block_size,
                                             unsigned int chunk, int split, int splits, unsigned int* lo_out,
                                             unsigned int* hi_out) {
    unsigned int position = positions[seq];
    unsigned int key_start = first_block[seq] * (unsigned int)block_size;
    unsigned int first_visible = chunk == 0 ? 0u : position / chunk * chunk;
    unsigned int lo = max(first_visible, key_start);
    unsigned int hi = min(position + 1, seq_len[seq]);
    if (table_row[seq] >= (unsigned int)table_rows || hi < lo) {
        hi = lo;
    }
    if (splits > 1) {
        unsigned long long visible = hi - lo;
        unsigned int split_lo = lo + (unsigned int)(visible * split / splits);
        hi = lo + (unsigned int)(visible * (split + 1) / splits);
        lo = split_lo;
    }
    *lo_out = lo;
    *hi_out = hi;
}

// Where key or value row `pos` of KV head `kv_head` starts in the pool, for a query whose table row is `row_of_table`.
template <typename T>
__device__ __forceinline__ const T* key_row(const T* __restrict__ pool, const unsigned int* __restrict__ block_table,
                                            unsigned int row_of_table, int max_blocks, unsigned int first_block,
                                            unsigned int pos, int block_size, size_t row, int kv_head, int head_dim) {
    unsigned int index = pos / block_size - first_block;
    unsigned int block = block_table[(size_t)row_of_table * max_blocks + index];
    const T* base = pool + (size_t)block * 2 * block_size * row;
    return base + (size_t)(pos % block_size) * row + (size_t)kv_head * head_dim;
}

// Keys (and values) each warp has loading while it works on one: a warp's loads of a key row are issued together
// with its value row and KV_STAGES - 1 keys ahead, so memory latency is paid once per KV_STAGES keys, not twice per
// key (a warp waiting on each row in turn reads about half a KB per microsecond).
#define KV_STAGES 4

// This lane's `n` dims (of at most N) of key and value row `pos` of KV head `kv_head`, as f32: both loads issued
// together.
template <int N, typename T>
__device__ __forceinline__ void load_key_value(const T* __restrict__ pool,
                                               const unsigned int* __restrict__ block_table, unsigned int row_of_table,
                                               int max_blocks, unsigned int first_block, unsigned int pos,
                                               int block_size, size_t row, int kv_head, int head_dim, int lane_offset,
                                               int n, float* key, float* value) {
    const T* k = key_row(pool, block_table, row_of_table, max_blocks, first_block, pos, block_size, row, kv_head,
                         head_dim) +
                 lane_offset;
    kv_load<N>(k, n, key);
    kv_load<N>(k + (size_t)block_size * row, n, value);
}

// Calls `use(key, value)` for each of this warp's keys of [lo, hi) (every ATTENTION_WARPS-th from lo + warp) in
// order, with this lane's `n` dims (of at most N) of the key and value rows as f32, keeping KV_STAGES keys loading.
template <int N, typename T, typename Use>
__device__ __forceinline__ void for_each_key(const T* __restrict__ pool, const unsigned int* __restrict__ block_table,
                                             unsigned int row_of_table, int max_blocks, unsigned int first_block,
                                             unsigned int lo, unsigned int hi, int block_size, size_t row, int kv_head,
                                             int head_dim, int n, Use use) {
    const int warp = threadIdx.x / 32;
    const int lane_offset = (threadIdx.x % 32) * n;
    const unsigned int step = ATTENTION_WARPS * KV_STAGES;
    float keys[KV_STAGES][N];
    float values[KV_STAGES][N];
#pragma unroll
    for (int s = 0; s < KV_STAGES; ++s) {
        unsigned int pos = lo + warp + s * ATTENTION_WARPS;
        if (pos < hi) {
            load_key_value<N>(pool, block_table, row_of_table, max_blocks, first_block, pos, block_size, row, kv_head,
                              head_dim, lane_offset, n, keys[s], values[s]);
        }
    }
    for (unsigned int base = lo + warp; base < hi; base += step) {
#pragma unroll
        for (int s = 0; s < KV_STAGES; ++s) {
            unsigned int pos = base + s * ATTENTION_WARPS;
            if (pos >= hi) {
                break;
            }
            use(keys[s], values[s]);
            if (pos + step < hi) {
                load_key_value<N>(pool, block_table, row_of_table, max_blocks, first_block, pos + step, block_size,
                                  row, kv_head, head_dim, lane_offset, n, keys[s], values[s]);
            }
        }
    }
}

// One query head's result from its ATTENTION_WARPS warps' online softmaxes (warp w's max at warp_max[w * max_stride],
// total likewise, weighted values from warp_acc + w * acc_stride), written by one warp: out and lse, or with several
// splits this split's part (its max, sum and weighted values relative to its max) for paged_decode_merge.
__device__ void finish_head(const float* warp_max, const float* warp_total, int max_stride, const float* warp_acc,
                            int acc_stride, int head_dim, size_t query_head, int split, int splits,
                            float* __restrict__ out, float* __restrict__ lse, float* __restrict__ partial) {
    int lane = threadIdx.x % 32;
    float block_max = NEG_INF;
    for (int w = 0; w < ATTENTION_WARPS; ++w) {
        block_max = fmaxf(block_max, warp_max[w * max_stride]);
    }
    float sum = 0.0f;
    float factor[ATTENTION_WARPS];
#pragma unroll
    for (int w = 0; w < ATTENTION_WARPS; ++w) {
        // A warp that saw no key has max -inf and total 0: its factor is 0.
        float m = warp_max[w * max_stride];
        factor[w] = m == NEG_INF ? 0.0f : expf(m - block_max);
        sum += warp_total[w * max_stride] * factor[w];
    }
    if (splits > 1) {
        // All zero, with max -inf, when this split saw no key.
        float* mine = partial + (query_head * splits + split) * (head_dim + 2);
        for (int d = lane; d < head_dim; d += 32) {
            float value = 0.0f;
#pragma unroll
            for (int w = 0; w < ATTENTION_WARPS; ++w) {
                value += warp_acc[w * acc_stride + d] * factor[w];
            }
            mine[d] = value;
        }
        if (lane == 0) {
            mine[head_dim] = block_max;
            mine[head_dim + 1] = sum;
        }
        return;
    }
    float* dst = out + query_head * head_dim;
    if (block_max == NEG_INF) {
        for (int d = lane; d < head_dim; d += 32) {
            dst[d] = 0.0f;
        }
        if (lane == 0) {
            lse[query_head] = NEG_INF;
        }
        return;
    }
    for (int d = lane; d < head_dim; d += 32) {
        float value = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTENTION_WARPS; ++w) {
            value += warp_acc[w * acc_stride + d] * factor[w];
        }
        dst[d] = value / sum;
    }
    if (lane == 0) {
        lse[query_head] = block_max + logf(sum);
    }
}

// Decode attention: one block (ATTENTION_WARPS warps) per (sequence, query head, split of its keys). The warps take
// keys in turn and keep an online softmax (running max, sum and weighted values; lane l holds dims l * n .. l * n + n,
// n = head_dim / 32, so that a warp reads a key row in one coalesced sweep), then merge.
//   q:           [seqs, q_heads, head_dim]
//   pool:        the KV block pool, block b at pool + b * 2 * block_size * kv_heads * head_dim
//   block_table: [table_rows, max_blocks] block ids, entry i of a row holding block first_block[s] + i
//   table_row:   [seqs] the block_table row of each query (several queries of one sequence, e.g. a prefill's, share
//                their sequence's row); a row >= table_rows sees no key (the host checks; nothing is read outside)
//   first_block: [seqs]; seq_len: [seqs] one past the last valid position; positions: [seqs] the query's position
//   chunk:       0 for the causal mask, else the chunked mask's block length
//   out:         [seqs, q_heads, head_dim]; lse: [seqs, q_heads] natural log-sum-exp of the scaled scores (-inf and
//                zeros when no key is visible), so partial results merge as on the CPU
// With one split (gridDim.z == 1) the block writes out and lse. With more (flash-decoding: a long context's keys
// spread over many SMs, where one block per query head would leave most SMs idle), split z takes the z-th of
// gridDim.z equal parts of the visible keys and leaves its part in `partial` ([seqs, q_heads, splits, head_dim + 2])
// for paged_decode_merge. head_dim must be a multiple of 32 and at most MAX_HEAD_DIM (the caller checks). T: the
// pool's element type (float, or unsigned short holding bf16 bits).
template <typename T>
__device__ void paged_decode(const float* __restrict__ q, const T* __restrict__ pool,
                             const unsigned int* __restrict__ block_table, const unsigned int* __restrict__ table_row,
                             int table_rows, const unsigned int* __restrict__ first_block,
                             const unsigned int* __restrict__ seq_len, const unsigned int* __restrict__ positions,
                             int q_heads, int kv_heads, int head_dim, int block_size, int max_blocks,
                             unsigned int chunk, float scale, float* __restrict__ out, float* __restrict__ lse,
                             float* __restrict__ partial) {
    __shared__ float warp_max[ATTENTION_WARPS];
    __shared__ float warp_total[ATTENTION_WARPS];
    __shared__ float warp_acc[ATTENTION_WARPS][MAX_HEAD_DIM];
    int seq = blockIdx.x;
    int head = blockIdx.y;
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int per_lane = head_dim / 32;
    int kv_head = head / (q_heads / kv_heads);
    unsigned int lo, hi;
    visible_keys(table_row, table_rows, first_block, seq_len, positions, seq, block_size, chunk, blockIdx.z, gridDim.z,
                 &lo, &hi);
    const float* query = q + ((size_t)seq * q_heads + head) * head_dim + lane * per_lane;
    float qv[MAX_HEAD_DIM / 32];
    float acc[MAX_HEAD_DIM / 32];
#pragma unroll
    for (int i = 0; i < MAX_HEAD_DIM / 32; ++i) {
        qv[i] = i < per_lane ? query[i] : 0.0f;
        acc[i] = 0.0f;
    }
    float running_max = NEG_INF;
    float total = 0.0f;
    for_each_key<MAX_HEAD_DIM / 32>(
        pool, block_table, table_row[seq], max_blocks, first_block[seq], lo, hi, block_size,
        (size_t)kv_heads * head_dim, kv_head, head_dim, per_lane, [&](const float* key, const float* value) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < MAX_HEAD_DIM / 32; ++i) {
                if (i < per_lane) {
                    dot = fmaf(qv[i], key[i], dot);
                }
            }
            for (int offset = 16; offset > 0; offset >>= 1) {
                dot += __shfl_xor_sync(0xffffffff, dot, offset);
            }
            float score = dot * scale;
            float new_max = fmaxf(running_max, score);
            float correction = expf(running_max - new_max);
            float weight = expf(score - new_max);
            total = total * correction + weight;
#pragma unroll
            for (int i = 0; i < MAX_HEAD_DIM / 32; ++i) {
                if (i < per_lane) {
                    acc[i] = acc[i] * correction + weight * value[i];
                }
            }
            running_max = new_max;
        });
    if (lane == 0) {
        warp_max[warp] = running_max;
        warp_total[warp] = total;
    }
#pragma unroll
    for (int i = 0; i < MAX_HEAD_DIM / 32; ++i) {
        if (i < per_lane) {
            warp_acc[warp][lane * per_lane + i] = acc[i];
        }
    }
    __syncthreads();
    if (warp == 0) {
        finish_head(warp_max, warp_total, 1, &warp_acc[0][0], MAX_HEAD_DIM, head_dim, (size_t)seq * q_heads + head,
                    blockIdx.z, gridDim.z, out, lse, partial);
    }
}

// The same for the query heads of one KV head together (grouped-query attention), head_dim GROUPED_HEAD_DIM and at
// most MAX_GROUP query heads per KV head (Maverick: 128, and 5): one block per (sequence, KV head, split), so each key
// and value row is read once for its group instead of once per query head (from L2 at best). Each lane holds 4
// contiguous dims of every query of the group and its online softmax; per key, one 8-byte (bf16) or 16-byte (f32)
// load a lane for the key and one for the value, then a dot product and warp reduction per query. The result is written per query head as above.
#define GROUPED_HEAD_DIM 128
#define MAX_GROUP 8
template <typename T>
__device__ void paged_decode_grouped(const float* __restrict__ q, const T* __restrict__ pool,
                                     const unsigned int* __restrict__ block_table,
                                     const unsigned int* __restrict__ table_row, int table_rows,
                                     const unsigned int* __restrict__ first_block,
                                     const unsigned int* __restrict__ seq_len,
                                     const unsigned int* __restrict__ positions, int q_heads, int kv_heads,
                                     int head_dim, int block_size, int max_blocks, unsigned int chunk, float scale,
                                     float* __restrict__ out, float* __restrict__ lse, float* __restrict__ partial) {
    constexpr int PER_LANE = GROUPED_HEAD_DIM / 32;
    __shared__ float warp_max[ATTENTION_WARPS][MAX_GROUP];
    __shared__ float warp_total[ATTENTION_WARPS][MAX_GROUP];
    __shared__ float warp_acc[ATTENTION_WARPS][MAX_GROUP][GROUPED_HEAD_DIM];
    int seq = blockIdx.x;
    int kv_head = blockIdx.y;
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int group = q_heads / kv_heads;
    if (head_dim != GROUPED_HEAD_DIM || group > MAX_GROUP) {
        return;  // the host sends other shapes to paged_decode
    }
    unsigned int lo, hi;
    visible_keys(table_row, table_rows, first_block, seq_len, positions, seq, block_size, chunk, blockIdx.z, gridDim.z,
                 &lo, &hi);
    float qv[MAX_GROUP][PER_LANE];
    float acc[MAX_GROUP][PER_LANE];
    float running_max[MAX_GROUP];
    float total[MAX_GROUP];
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        const float* query = q + ((size_t)seq * q_heads + kv_head * group + h) * GROUPED_HEAD_DIM + lane * PER_LANE;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            qv[h][i] = h < group ? query[i] : 0.0f;
            acc[h][i] = 0.0f;
        }
        running_max[h] = NEG_INF;
        total[h] = 0.0f;
    }
    for_each_key<PER_LANE>(
        pool, block_table, table_row[seq], max_blocks, first_block[seq], lo, hi, block_size,
        (size_t)kv_heads * GROUPED_HEAD_DIM, kv_head, GROUPED_HEAD_DIM, PER_LANE,
        [&](const float* key, const float* value) {
#pragma unroll
            for (int h = 0; h < MAX_GROUP; ++h) {
                if (h < group) {
                    float dot = 0.0f;
#pragma unroll
                    for (int i = 0; i < PER_LANE; ++i) {
                        dot = fmaf(qv[h][i], key[i], dot);
                    }
                    for (int offset = 16; offset > 0; offset >>= 1) {
                        dot += __shfl_xor_sync(0xffffffff, dot, offset);
                    }
                    float score = dot * scale;
                    float new_max = fmaxf(running_max[h], score);
                    float correction = expf(running_max[h] - new_max);
                    float weight = expf(score - new_max);
                    total[h] = total[h] * correction + weight;
                    running_max[h] = new_max;
#pragma unroll
                    for (int i = 0; i < PER_LANE; ++i) {
                        acc[h][i] = acc[h][i] * correction + weight * value[i];
                    }
                }
            }
        });
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        if (h < group) {
            if (lane == 0) {
                warp_max[warp][h] = running_max[h];
                warp_total[warp][h] = total[h];
            }
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                warp_acc[warp][h][lane * PER_LANE + i] = acc[h][i];
            }
        }
    }
    __syncthreads();
    // Warp w finishes query heads w, w + ATTENTION_WARPS, ... of the group.
    for (int h = warp; h < group; h += ATTENTION_WARPS) {
        finish_head(&warp_max[0][h], &warp_total[0][h], MAX_GROUP, &warp_acc[0][h][0], MAX_GROUP * GROUPED_HEAD_DIM,
                    GROUPED_HEAD_DIM, (size_t)seq * q_heads + kv_head * group + h, blockIdx.z, gridDim.z, out, lse,
                    partial);
    }
}

// The exported kernels differ only in the pool's element type (f32, or bf16 bits) and in one block per query head or
// per KV head; their parameters are spelled once.
#define PAGED_DECODE_PARAMS(POOL)                                                                                   \
    const float *__restrict__ q, const POOL *__restrict__ pool, const unsigned int *__restrict__ block_table,        \
        const unsigned int *__restrict__ table_row, int table_rows, const unsigned int *__restrict__ first_block,   \
        const unsigned int *__restrict__ seq_len, const unsigned int *__restrict__ positions, int q_heads,          \
        int kv_heads, int head_dim, int block_size, int max_blocks, unsigned int chunk, float scale,                \
        float *__restrict__ out, float *__restrict__ lse, float *__restrict__ partial
#define PAGED_DECODE_ARGS                                                                                           \
    q, pool, block_table, table_row, table_rows, first_block, seq_len, positions, q_heads, kv_heads, head_dim,      \
        block_size, max_blocks, chunk, scale, out, lse, partial
extern "C" __global__ void paged_decode_attention(PAGED_DECODE_PARAMS(float)) {
    paged_decode(PAGED_DECODE_ARGS);
}
extern "C" __global__ void paged_decode_attention_bf16(PAGED_DECODE_PARAMS(unsigned short)) {
    paged_decode(PAGED_DECODE_ARGS);
}
extern "C" __global__ void paged_decode_attention_grouped(PAGED_DECODE_PARAMS(float)) {
    paged_decode_grouped(PAGED_DECODE_ARGS);
}
extern "C" __global__ void paged_decode_attention_grouped_bf16(PAGED_DECODE_PARAMS(unsigned short)) {
    paged_decode_grouped(PAGED_DECODE_ARGS);
}

// The splits of paged_decode_attention merged, in split order (the same sums whatever ran first): one warp per
// (sequence, query head); out and lse as one split would have written them (to f32 rounding).
extern "C" __global__ void paged_decode_merge(const float* __restrict__ partial, int seqs, int q_heads, int head_dim,
                                              int splits, float* __restrict__ out, float* __restrict__ lse) {
    int seq = blockIdx.x;
    int head = blockIdx.y;
    int lane = threadIdx.x;
    if (seq >= seqs || head >= q_heads) {
        return;
    }
    const float* parts = partial + ((size_t)seq * q_heads + head) * splits * (head_dim + 2);
    float merged_max = NEG_INF;
    for (int s = 0; s < splits; ++s) {
        merged_max = fmaxf(merged_max, parts[(size_t)s * (head_dim + 2) + head_dim]);
    }
    float* dst = out + ((size_t)seq * q_heads + head) * head_dim;
    if (merged_max == NEG_INF) {
        for (int d = lane; d < head_dim; d += 32) {
            dst[d] = 0.0f;
        }
        if (lane == 0) {
            lse[(size_t)seq * q_heads + head] = NEG_INF;
        }
        return;
    }
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* part = parts + (size_t)s * (head_dim + 2);
        float split_max = part[head_dim];
        sum += split_max == NEG_INF ? 0.0f : part[head_dim + 1] * expf(split_max - merged_max);
    }
    for (int d = lane; d < head_dim; d += 32) {
        float value = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float* part = parts + (size_t)s * (head_dim + 2);
            float split_max = part[head_dim];
            value += split_max == NEG_INF ? 0.0f : part[d] * expf(split_max - merged_max);
        }
        dst[d] = value / sum;
    }
    if (lane == 0) {
        lse[(size_t)seq * q_heads + head] = merged_max + logf(sum);
    }
}
