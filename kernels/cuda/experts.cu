// The routed-expert path of an MoE layer on the GPU, FP8 E4M3 weights and activations:
//   quantize_rows_e4m3       per-token dynamic activation quantisation (scale = amax / 448), bit for bit
//                            switchyard_kernels::fp8::quantize_rows
//   permute_plan             counting sort of (token, expert) rows by expert: per-expert offsets and the permutation
//   gather_rows / scatter_rows  the permutation and its inverse on f32 rows (scatter can apply the down scales)
//   silu_mul_quantize_e4m3   SwiGLU on the fused gate_up output (applying its scales, optionally), re-quantised per
//                            token for the down projection
//   fp8_grouped_gemm_small   grouped FP8 GEMM for few tokens per expert: weight streaming, each weight byte read once
//                            from HBM per pass of up to TOKENS_PER_PASS tokens, 16-byte loads, f32 accumulation
//                            on the CUDA cores (any n; the fallback)
//   fp8_grouped_gemm_mma_t1/_t2/_t4  the same on the tensor cores (mma.sync m16n8k32 E4M3, f32 accumulation):
//                            n % 16 == 0, k % 128 == 0, up to 8/16/32 tokens per expert in one pass over the weights
//   fp8_lone_expert_gemm_t1/_t2/_t4  one expert's GEMM of up to 8/16/32 tokens on the same MMAs, spread evenly over
//                            every SM (stream-K), the activations staged in shared memory: n % 128 == 0
//   (the grouped kernels can leave the row-wise scales to the kernel that reads their output: apply_scales)
//   scale_rows_cols          the epilogue after cuBLASLt's unit-scale FP8 GEMM: out[m, n] *= a_scale[m] * w_scale[n]
//   mma_e4m3_rate            the tensor cores' mma.sync E4M3 rate, for the GPU benchmark
//
// Layouts (row-major everywhere, as the CPU kernels): an expert weight is nn.Linear [n, k] E4M3 codes with one f32
// scale per output row n; the experts of a layer are stacked, expert e at codes + e * n * k and scales + e * n.
// Compiled with NVRTC at start-up (kernels/src/device/cuda/compile.rs); only cuda_fp8.h is included.

#include <cuda_fp8.h>

// `T name[]`: the launch's dynamic shared memory (the CPU emulator's prelude defines it as a call into its runtime).
#ifndef SWITCHYARD_CPU_EMULATION
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

#define E4M3_MAX 448.0f
#define E4M3_NAN 0x7F
// Tokens whose accumulators one warp keeps in registers while streaming a weight row.
#define TOKENS_PER_PASS 16
#define WARPS_PER_BLOCK 8

// f32 -> E4M3 exactly as switchyard_kernels::fp8::f32_to_e4m3: round to nearest even, saturate to +-448, NaN -> 0x7F.
// Written out (rather than __nv_cvt_float_to_fp8) so that the NaN code and every tie match the CPU bit for bit.
__device__ __forceinline__ unsigned char f32_to_e4m3(float x) {
    if (isnan(x)) {
        return E4M3_NAN;
    }
    unsigned int bits = __float_as_uint(x);
    unsigned char sign = (bits >> 31) ? 0x80 : 0;
    float magnitude = fabsf(x);
    if (magnitude >= E4M3_MAX) {
        return sign | 0x7E;
    }
    unsigned int mbits = __float_as_uint(magnitude);
    int exponent = (int)((mbits >> 23) & 0xFF) - 127;
    if (exponent >= -6) {
        const unsigned int dropped = 20;
        unsigned int biased = (unsigned int)(exponent + 7);
        unsigned int mantissa = (mbits & 0x7FFFFF) >> dropped;
        unsigned int remainder = mbits & ((1u << dropped) - 1);
        unsigned int half = 1u << (dropped - 1);
        if (remainder > half || (remainder == half && (mantissa & 1u))) {
            mantissa += 1;
            if (mantissa == 8) {
                mantissa = 0;
                biased += 1;
            }
        }
        return sign | (unsigned char)(biased << 3) | (unsigned char)mantissa;
    }
    // Subnormal: multiples of 2^-9; rintf rounds half to even in the default rounding mode.
    float units = rintf(magnitude * 512.0f);
    return sign | (unsigned char)units;
}

// The per-row scale of dynamic quantisation, as fp8.rs `row_scale`.
__device__ __forceinline__ float row_scale(float amax) {
    return (amax > 0.0f && isfinite(amax)) ? amax / E4M3_MAX : 1.0f;
}

// Max over the block of non-NaN |values| (fmaxf drops NaN, as Rust's f32::max). blockDim.x is a multiple of 32.
__device__ float block_amax(float local) {
    __shared__ float warp_max[32];
    for (int offset = 16; offset > 0; offset >>= 1) {
        local = fmaxf(local, __shfl_xor_sync(0xffffffff, local, offset));
    }
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (lane == 0) {
        warp_max[warp] = local;
    }
    __syncthreads();
    int warps = blockDim.x / 32;
    float result = lane < warps ? warp_max[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) {
        result = fmaxf(result, __shfl_xor_sync(0xffffffff, result, offset));
    }
    __syncthreads();
    return result;
}

// One block per row: q[row, :] = e4m3(x[row, :] * (1 / scale)), scales[row] = amax / 448.
extern "C" __global__ void quantize_rows_e4m3(const float* __restrict__ x, int rows, int cols,
                                              unsigned char* __restrict__ q, float* __restrict__ scales) {
    int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* src = x + (size_t)row * cols;
    float local = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        local = fmaxf(local, fabsf(src[c]));
    }
    float scale = row_scale(block_amax(local));
    // The CPU multiplies by the inverse (fp8.rs quantize_row), so must we for the same codes.
    float inverse = 1.0f / scale;
    unsigned char* dst = q + (size_t)row * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dst[c] = f32_to_e4m3(src[c] * inverse);
    }
    if (threadIdx.x == 0) {
        scales[row] = scale;
    }
}

// One block (blockDim.x threads, dynamic shared memory (2 * num_experts + blockDim.x) ints): a stable counting sort
// of rows by expert. offsets[e] .. offsets[e + 1] are the slots of expert e; slot_row[slot] is the input row in that
// slot (rows of one expert keep their input order, as the CPU's grouping does). Expert ids must be < num_experts
// (the caller checks them on the host).
extern "C" __global__ void permute_plan(const unsigned int* __restrict__ experts, int rows, int num_experts,
                                        unsigned int* __restrict__ offsets, unsigned int* __restrict__ slot_row) {
    DYNAMIC_SHARED(unsigned int, shared);
    unsigned int* counts = shared;
    unsigned int* cursor = shared + num_experts;
    unsigned int* tile = shared + 2 * num_experts;
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        counts[e] = 0;
    }
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        atomicAdd(&counts[experts[r]], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int running = 0;
        for (int e = 0; e < num_experts; ++e) {
            offsets[e] = running;
            cursor[e] = running;
            running += counts[e];
        }
        offsets[num_experts] = running;
    }
    __syncthreads();
    for (int base = 0; base < rows; base += blockDim.x) {
        int r = base + threadIdx.x;
        unsigned int expert = r < rows ? experts[r] : 0xFFFFFFFFu;
        tile[threadIdx.x] = expert;
        __syncthreads();
        if (r < rows) {
            // Rank among the earlier rows of this tile with the same expert: keeps the sort stable.
            unsigned int rank = 0;
            for (int j = 0; j < (int)threadIdx.x; ++j) {
                rank += tile[j] == expert ? 1u : 0u;
            }
            slot_row[cursor[expert] + rank] = (unsigned int)r;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int tile_rows = min((int)blockDim.x, rows - base);
            for (int j = 0; j < tile_rows; ++j) {
                cursor[tile[j]] += 1;
            }
        }
        __syncthreads();
    }
}

// out[slot, :] = x[slot_row[slot], :]. Grid: (slots, column blocks).
extern "C" __global__ void gather_rows(const float* __restrict__ x, const unsigned int* __restrict__ slot_row,
                                       int slots, int cols, float* __restrict__ out) {
    int slot = blockIdx.x;
    if (slot >= slots) {
        return;
    }
    const float* src = x + (size_t)slot_row[slot] * cols;
    float* dst = out + (size_t)slot * cols;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < cols; c += gridDim.y * blockDim.x) {
        dst[c] = src[c];
    }
}

// The expert whose slots hold `slot`: the last e with offsets[e] <= slot (offsets: experts + 1 non-decreasing values
// ending past every slot; empty experts are skipped since their offset equals the next one's).
__device__ __forceinline__ int expert_of_slot(const unsigned int* __restrict__ offsets, int experts, unsigned int slot) {
    int lo = 0;
    int hi = experts;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (offsets[mid] <= slot) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// The inverse of gather_rows: out[slot_row[slot], :] = y[slot, :], times a_scale[slot] * w_scale[e, :] (e the slot's
// expert under offsets) when w_scale is not null: the combine of the expert layer applies the down projection's
// row-wise scales here, where it reads every value anyway, rather than in a pass of its own after the GEMM.
extern "C" __global__ void scatter_rows(const float* __restrict__ y, const unsigned int* __restrict__ slot_row,
                                        int slots, int cols, const float* __restrict__ a_scale,
                                        const float* __restrict__ w_scale, const unsigned int* __restrict__ offsets,
                                        int experts, float* __restrict__ out) {
    int slot = blockIdx.x;
    if (slot >= slots) {
        return;
    }
    const float* src = y + (size_t)slot * cols;
    float* dst = out + (size_t)slot_row[slot] * cols;
    if (w_scale) {
        const float* scales = w_scale + (size_t)expert_of_slot(offsets, experts, (unsigned int)slot) * cols;
        float token_scale = a_scale[slot];
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < cols; c += gridDim.y * blockDim.x) {
            dst[c] = src[c] * scales[c] * token_scale;
        }
    } else {
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < cols; c += gridDim.y * blockDim.x) {
            dst[c] = src[c];
        }
    }
}

// SwiGLU on the fused gate_up output and per-token re-quantisation, one block per row:
// gate_up[row] = [gate (inter values), up (inter values)]; a = silu(gate) * up = gate / (1 + exp(-gate)) * up;
// q[row] = e4m3(a / scale), scales[row] = amax(a) / 448. `activated` (optional, may be null) receives a in f32.
// With w_scale not null, gate_up holds the grouped GEMM's raw sums and each value is first scaled by
// w_scale[e, column] * a_scale[row] (e the row's expert under offsets): the gate_up projection's row-wise scales,
// applied here where every value is read anyway.
// Dynamic shared memory: inter floats (the row of a, so it is computed once).
extern "C" __global__ void silu_mul_quantize_e4m3(const float* __restrict__ gate_up, int rows, int inter,
                                                  const float* __restrict__ a_scale, const float* __restrict__ w_scale,
                                                  const unsigned int* __restrict__ offsets, int experts,
                                                  unsigned char* __restrict__ q, float* __restrict__ scales,
                                                  float* __restrict__ activated) {
    DYNAMIC_SHARED(float, row_values);
    int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* gate = gate_up + (size_t)row * 2 * inter;
    const float* up = gate + inter;
    const float* gate_scales = w_scale ? w_scale + (size_t)expert_of_slot(offsets, experts, row) * 2 * inter : nullptr;
    float token_scale = w_scale ? a_scale[row] : 1.0f;
    float local = 0.0f;
    for (int c = threadIdx.x; c < inter; c += blockDim.x) {
        float g = gate[c];
        float u = up[c];
        if (gate_scales) {
            g = g * gate_scales[c] * token_scale;
            u = u * gate_scales[inter + c] * token_scale;
        }
        float a = g / (1.0f + expf(-g)) * u;
        row_values[c] = a;
        local = fmaxf(local, fabsf(a));
    }
    float scale = row_scale(block_amax(local));
    float inverse = 1.0f / scale;
    unsigned char* dst = q + (size_t)row * inter;
    for (int c = threadIdx.x; c < inter; c += blockDim.x) {
        float a = row_values[c];
        dst[c] = f32_to_e4m3(a * inverse);
        if (activated) {
            activated[(size_t)row * inter + c] = a;
        }
    }
    if (threadIdx.x == 0) {
        scales[row] = scale;
    }
}

// Decodes 16 E4M3 codes (one 16-byte load) to f32 through the exact fp8x2 -> half2 conversion (every E4M3 value is
// a half; sm_89+ does it in hardware).
__device__ __forceinline__ void decode16(uint4 packed, float* out) {
    const unsigned int words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            __nv_fp8x2_storage_t pair = (__nv_fp8x2_storage_t)((words[w] >> (16 * h)) & 0xFFFF);
            __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
            __half2 halves = *reinterpret_cast<__half2*>(&raw);
            float2 values = __half22float2(halves);
            out[4 * w + 2 * h] = values.x;
            out[4 * w + 2 * h + 1] = values.y;
        }
    }
}

// Grouped FP8 GEMM for few tokens per expert (the decode regime, bound by reading the weights):
//   out[slot, o] = w_scale[e, o] * a_scale[slot] * sum_c e4m3(a[slot, c]) * e4m3(w[e, o, c])
// for every slot of every expert e with 0 < offsets[e + 1] - offsets[e] <= max_tokens (the other experts go through
// cuBLASLt). Grid: (ceil(n / (WARPS_PER_BLOCK * rows_per_warp)), num_experts); block: WARPS_PER_BLOCK warps. Each warp
// streams whole weight rows, VECTORS_IN_FLIGHT 16-byte loads per lane issued before any is used (memory-level
// parallelism is what a streaming kernel lives on), keeping TOKENS_PER_PASS f32 accumulators per lane; the
// activations (a few KB per token) come from L1/L2. More tokens than TOKENS_PER_PASS take further passes over the
// row (re-read from L2). k must be a multiple of 16 (the caller checks).
#define VECTORS_IN_FLIGHT 2
extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32, 2)
fp8_grouped_gemm_small(const unsigned char* __restrict__ a, const float* __restrict__ a_scale,
                       const unsigned int* __restrict__ offsets, const unsigned char* __restrict__ w,
                       const float* __restrict__ w_scale, int n, int k, int max_tokens, int rows_per_warp,
                       int apply_scales, float* __restrict__ out) {
    int expert = blockIdx.y;
    unsigned int first = offsets[expert];
    int tokens = (int)(offsets[expert + 1] - first);
    if (tokens == 0 || tokens > max_tokens) {
        return;
    }
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int vectors = k / 16;
    const unsigned char* weights = w + (size_t)expert * n * k;
    const float* scales = w_scale + (size_t)expert * n;
    int row_begin = (blockIdx.x * WARPS_PER_BLOCK + warp) * rows_per_warp;
    for (int o = row_begin; o < min(row_begin + rows_per_warp, n); ++o) {
        const uint4* wrow = reinterpret_cast<const uint4*>(weights + (size_t)o * k);
        for (int pass = 0; pass < tokens; pass += TOKENS_PER_PASS) {
            int pass_tokens = min(TOKENS_PER_PASS, tokens - pass);
            const unsigned char* pass_a = a + (size_t)(first + pass) * k;
            float acc[TOKENS_PER_PASS];
#pragma unroll
            for (int t = 0; t < TOKENS_PER_PASS; ++t) {
                acc[t] = 0.0f;
            }
            for (int v0 = lane; v0 < vectors; v0 += 32 * VECTORS_IN_FLIGHT) {
                uint4 raw[VECTORS_IN_FLIGHT];
#pragma unroll
                for (int u = 0; u < VECTORS_IN_FLIGHT; ++u) {
                    int v = v0 + 32 * u;
                    raw[u] = v < vectors ? __ldg(wrow + v) : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
                for (int u = 0; u < VECTORS_IN_FLIGHT; ++u) {
                    int v = v0 + 32 * u;
                    if (v < vectors) {
                        float wv[16];
                        decode16(raw[u], wv);
#pragma unroll
                        for (int t = 0; t < TOKENS_PER_PASS; ++t) {
                            if (t < pass_tokens) {
                                const uint4* arow = reinterpret_cast<const uint4*>(pass_a + (size_t)t * k);
                                float av[16];
                                decode16(__ldg(arow + v), av);
                                float sum = acc[t];
#pragma unroll
                                for (int i = 0; i < 16; ++i) {
                                    sum = fmaf(av[i], wv[i], sum);
                                }
                                acc[t] = sum;
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < TOKENS_PER_PASS; ++t) {
                float value = acc[t];
                for (int offset = 16; offset > 0; offset >>= 1) {
                    value += __shfl_xor_sync(0xffffffff, value, offset);
                }
                acc[t] = value;
            }
            // Lane t writes token t: every lane holds every reduced sum after the butterfly.
#pragma unroll
            for (int t = 0; t < TOKENS_PER_PASS; ++t) {
                if (t == lane && t < pass_tokens) {
                    unsigned int slot = first + pass + t;
                    out[(size_t)slot * n + o] = apply_scales ? acc[t] * scales[o] * a_scale[slot] : acc[t];
                }
            }
        }
    }
}

// The same grouped GEMM on the tensor cores (sm_89+: mma.sync m16n8k32 with E4M3 inputs and f32 accumulation), for
// experts of 1..=max_tokens tokens (max_tokens <= 8 * TILES). It is a weight-streaming kernel: every weight byte is
// read once, so its speed is the memory-level parallelism it keeps in flight. The first version (one warp per 16
// rows, 16 bytes per lane per step, one step in flight) reached 0.8 TB/s of 4.2 on an H200: too little in flight,
// and too few warps for the down projection's 5120 rows. So:
//   - a block of MMA_WARPS warps owns 16 weight rows of one expert and splits k among its warps (warp w takes the
//     128-column chunks w, w + MMA_WARPS, ...), reducing the partial sums in shared memory at the end; the grid is
//     (n / 16, experts), 320 blocks for one expert's down projection instead of 80;
//   - each warp keeps STAGES chunks loading while it multiplies one (a ring refilled right after each use), the
//     weights with the evict-first hint (read once, they must not push the activations out of L2);
//   - a lane loads 32 contiguous bytes of weight rows g and g + 8 (g = lane / 4, at column (lane % 4) * 32 of the
//     chunk) and of token g of each 8-token tile, so the four lanes of a row read one 128-byte line.
// The k-order inside a chunk is permuted the same way for W and X, so four MMAs cover its 128 columns: MMA i takes
// words 2i and 2i + 1 of each lane's 32 bytes,
//   A = {w_g[2i], w_g8[2i], w_g[2i+1], w_g8[2i+1]}, B = {x[2i], x[2i+1]}.
// (A fragment: a0-a3 row g cols t*4+j, a4-a7 row g+8, a8-a15 the same rows at +16; B: b0-b3 k t*4+j, b4-b7 +16, column
// g; C: c0,c1 row g cols t*2, t*2+1, c2,c3 row g+8 — PTX ISA, mma.m16n8k32 fragments.) With apply_scales == 0 the
// raw sums are written and the caller applies a_scale[slot] * w_scale[e, o] where it reads them (the expert layer
// does so in its SwiGLU and combine kernels, which read every value anyway). n must be a multiple of 16 and k of
// MMA_CHUNK (the caller checks). One kernel per tile count (fp8_grouped_gemm_mma_t1/_t2/_t4: up to 8, 16, 32 tokens),
// so that a decode step's few tokens do not pay for 32 tokens' registers. Measured (docs/cuda.md): 0.93-0.98 of the
// device-to-device copy on an H100 and 0.83-0.90 on an H200 for 9-16 experts of a few tokens each.
#define MMA_WARPS 4
#define MMA_CHUNK 128
__device__ __forceinline__ void mma_e4m3(float* c, unsigned int a0, unsigned int a1, unsigned int a2,
                                         unsigned int a3, unsigned int b0, unsigned int b1) {
#ifdef SWITCHYARD_CPU_EMULATION
    // The CPU emulator (cuda-emulator/) gathers the warp's fragments and computes the MMA once for all lanes.
    switchyard_emu_warp_mma(c, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Word j (0..7) of a lane's 32 bytes held as two uint4.
__device__ __forceinline__ unsigned int word_of(const uint4* v, int j) {
    const uint4 q = v[j / 4];
    return (j % 4 == 0) ? q.x : (j % 4 == 1) ? q.y : (j % 4 == 2) ? q.z : q.w;
}

// One chunk's operands in a lane's registers: 32 bytes of weight rows g (w[0..2]) and g + 8 (w[2..4]), and 32 bytes
// of token g of each tile.
template <int TILES>
struct MmaChunk {
    uint4 w[4];
    uint4 x[TILES][2];
};

// A lane's 32 bytes of two weight rows (`lo`: row g, `hi`: row g + 8), with the evict-first hint: read once, they
// must not push the activations out of L2.
__device__ __forceinline__ void mma_load_weights(uint4* w, const unsigned char* lo, const unsigned char* hi) {
    const uint4* lo4 = reinterpret_cast<const uint4*>(lo);
    const uint4* hi4 = reinterpret_cast<const uint4*>(hi);
    w[0] = __ldcs(lo4);
    w[1] = __ldcs(lo4 + 1);
    w[2] = __ldcs(hi4);
    w[3] = __ldcs(hi4 + 1);
}

template <int TILES>
__device__ __forceinline__ void mma_load(MmaChunk<TILES>& chunk, const unsigned char* w_lo, const unsigned char* w_hi,
                                         const unsigned char* x_lane, int tokens, int g, int k, int index) {
    size_t column = (size_t)index * MMA_CHUNK;
    mma_load_weights(chunk.w, w_lo + column, w_hi + column);
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
        int token = tile * 8 + g;
        if (token < tokens) {
            const uint4* x = reinterpret_cast<const uint4*>(x_lane + (size_t)token * k + column);
            chunk.x[tile][0] = __ldg(x);
            chunk.x[tile][1] = __ldg(x + 1);
        } else {
            chunk.x[tile][0] = make_uint4(0, 0, 0, 0);
            chunk.x[tile][1] = make_uint4(0, 0, 0, 0);
        }
    }
}

// One 128-column chunk of 16 weight rows times one 8-token tile: four MMAs. `w`: a lane's 32 bytes of rows g
// (w[0..2]) and g + 8 (w[2..4]); `x`: its 32 bytes of token g of the tile.
__device__ __forceinline__ void mma_chunk_tile(float* acc, const uint4* w, const uint4* x) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        mma_e4m3(acc, word_of(w, 2 * i), word_of(w + 2, 2 * i), word_of(w, 2 * i + 1), word_of(w + 2, 2 * i + 1),
                 word_of(x, 2 * i), word_of(x, 2 * i + 1));
    }
}

template <int TILES>
__device__ __forceinline__ void mma_chunk(const MmaChunk<TILES>& chunk, int tiles, float (*acc)[4]) {
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
        if (tile < tiles) {
            mma_chunk_tile(acc[tile], chunk.w, chunk.x[tile]);
        }
    }
}

template <int TILES>
__device__ __forceinline__ void fp8_grouped_gemm_mma_tiles(const unsigned char* __restrict__ a,
                                                           const float* __restrict__ a_scale,
                                                           const unsigned int* __restrict__ offsets,
                                                           const unsigned char* __restrict__ w,
                                                           const float* __restrict__ w_scale, int n, int k,
                                                           int max_tokens, int apply_scales, float* __restrict__ out) {
    // Registers bound the ring: fewer tiles leave room for more chunks in flight (launch bounds: 128 registers).
    constexpr int STAGES = TILES == 1 ? 4 : (TILES == 2 ? 3 : 2);
    __shared__ float partial[MMA_WARPS][TILES][4][32];
    int expert = blockIdx.y;
    unsigned int first = offsets[expert];
    int tokens = (int)(offsets[expert + 1] - first);
    if (tokens == 0 || tokens > max_tokens || tokens > TILES * 8) {
        return;
    }
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int g = lane / 4;
    int t = lane % 4;
    int row_base = blockIdx.x * 16;
    int tiles = (tokens + 7) / 8;
    const unsigned char* weights = w + (size_t)expert * n * k;
    const unsigned char* w_lo = weights + (size_t)(row_base + g) * k + t * 32;
    const unsigned char* w_hi = weights + (size_t)(row_base + g + 8) * k + t * 32;
    const unsigned char* x_lane = a + (size_t)first * k + t * 32;
    float acc[TILES][4];
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    }
    int chunks = k / MMA_CHUNK;
    MmaChunk<TILES> ring[STAGES];
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        int index = warp + s * MMA_WARPS;
        if (index < chunks) {
            mma_load<TILES>(ring[s], w_lo, w_hi, x_lane, tokens, g, k, index);
        }
    }
    for (int base = warp; base < chunks; base += STAGES * MMA_WARPS) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            int index = base + s * MMA_WARPS;
            if (index < chunks) {
                mma_chunk<TILES>(ring[s], tiles, acc);
                int refill = index + STAGES * MMA_WARPS;
                if (refill < chunks) {
                    mma_load<TILES>(ring[s], w_lo, w_hi, x_lane, tokens, g, k, refill);
                }
            }
        }
    }
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            partial[warp][tile][j][lane] = acc[tile][j];
        }
    }
    __syncthreads();
    const float* scales = w_scale + (size_t)expert * n;
    // The block's 16 rows x (8 * TILES) tokens, summed over the warps in a fixed order (deterministic).
    for (int index = threadIdx.x; index < TILES * 4 * 32; index += MMA_WARPS * 32) {
        int tile = index / 128;
        int j = (index / 32) % 4;
        int source = index % 32;
        int token = tile * 8 + (source % 4) * 2 + (j & 1);
        if (tile >= tiles || token >= tokens) {
            continue;
        }
        float sum = 0.0f;
#pragma unroll
        for (int from = 0; from < MMA_WARPS; ++from) {
            sum += partial[from][tile][j][source];
        }
        int row = row_base + source / 4 + (j >= 2 ? 8 : 0);
        unsigned int slot = first + token;
        out[(size_t)slot * n + row] = apply_scales ? sum * scales[row] * a_scale[slot] : sum;
    }
}

// The kernels NVRTC exports, one per tile count (their parameters spelled once).
#define MMA_PARAMS                                                                                                  \
    const unsigned char *__restrict__ a, const float *__restrict__ a_scale, const unsigned int *__restrict__ offsets, \
        const unsigned char *__restrict__ w, const float *__restrict__ w_scale, int n, int k, int max_tokens,       \
        int apply_scales, float *__restrict__ out
#define MMA_ARGS a, a_scale, offsets, w, w_scale, n, k, max_tokens, apply_scales, out
extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32, 4) fp8_grouped_gemm_mma_t1(MMA_PARAMS) {
    fp8_grouped_gemm_mma_tiles<1>(MMA_ARGS);
}
extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32, 4) fp8_grouped_gemm_mma_t2(MMA_PARAMS) {
    fp8_grouped_gemm_mma_tiles<2>(MMA_ARGS);
}
extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32, 4) fp8_grouped_gemm_mma_t4(MMA_PARAMS) {
    fp8_grouped_gemm_mma_tiles<4>(MMA_ARGS);
}

// One expert's FP8 GEMM of a few tokens spread evenly over every SM (stream-K: Osama et al., PPoPP 2023), for an
// expert the grouped kernel above would leave alone: a lone small expert of a decode step, or one of 17..=32 tokens.
// The grouped kernel gives each block 16 weight rows of one expert, which for one expert's down projection (5120
// rows) is 320 blocks on 132 SMs: some SMs stream three blocks' rows, others two, and its 16 tokens' activations
// were re-read from L2 by every block, as many bytes as the weights (docs/cuda.md: 24.2 us against cuBLASLt's 19.5
// on an H100). Here:
//   - the work is units of (row block of LONE_ROWS rows, 128-column chunk), numbered row block by row block; the grid
//     is about two blocks per SM and block b takes units [units * b / blocks, units * (b + 1) / blocks), so every SM
//     streams the same number of weight bytes whatever n and k are;
//   - a block stages the activations of the chunks of its range in shared memory once (its range spans at most all
//     k chunks), and its LONE_WARPS warps, one per 16 rows of the row block, read them there: the activations cost
//     L2 one read per block instead of one per 16 rows;
//   - each warp streams its rows' weights through a register ring as the grouped kernel does (3-4 chunks in
//     flight, the first issued before the staging so that both latencies overlap) and multiplies with the same MMAs;
//   - a row block whose chunks all fall in one block's range is written directly; the others (at most two per block:
//     where its range starts and ends) leave each warp's partial sums in `workspace`, and the block that arrives last
//     at a row block (`arrivals`, one counter per row block, reset to 0 by that block for the next launch) adds the
//     partials in block order (deterministic: the same sums in the same order whoever arrives last) and writes them.
// `a`: [tokens, k] codes, `a_scale`: [tokens], `w`: [n, k], `w_scale`: [n], `out`: [tokens, n], raw sums unless
// apply_scales; n % LONE_ROWS == 0 and k % MMA_CHUNK == 0; the launch gives LONE_WARPS warps per block, at most as
// many blocks as units, dynamic shared memory for min(largest range, k / 128) chunks of 8 * TILES tokens of
// LONE_TOKEN_BYTES, a workspace of blocks * 2 * LONE_WARPS * TILES * 128 floats and n / LONE_ROWS zeroed arrival
// counters (kernels/src/device/plan.rs computes the grid; cuda/kernels.rs checks and launches).
#define LONE_WARPS 8
#define LONE_ROWS (16 * LONE_WARPS)
// One token's 128 staged columns and 16 bytes of padding: the eight tokens a quarter-warp reads sit 36 words apart,
// in eight different groups of four banks.
#define LONE_TOKEN_BYTES 144

// Copies 16 bytes from global to shared memory without passing through registers (cp.async, sm_80+): a thread issues
// all its copies of the staging back to back and waits once (lone_copies_wait), where a load and a store per piece
// would wait for L2 once per piece.
__device__ __forceinline__ void lone_copy16(void* shared, const void* global) {
#ifdef SWITCHYARD_CPU_EMULATION
    memcpy(shared, global, 16);
#else
    unsigned int address = (unsigned int)__cvta_generic_to_shared(shared);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global) : "memory");
#endif
}

// Waits for this thread's cp.async copies (the block barrier after it makes everyone's visible).
__device__ __forceinline__ void lone_copies_wait() {
#ifndef SWITCHYARD_CPU_EMULATION
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The block whose range holds unit `u`: the largest b with units * b / blocks <= u.
__device__ __forceinline__ int lone_block_of(int u, int units, int blocks) {
    return ((u + 1) * blocks - 1) / units;
}

// Starts loading a warp's weights of `unit` into a ring stage.
__device__ __forceinline__ void lone_load(uint4* stage, const unsigned char* w, int k, int chunks, int unit,
                                          int warp, int g, int t) {
    int row_block = unit / chunks;
    int chunk = unit % chunks;
    const size_t row = (size_t)row_block * LONE_ROWS + warp * 16 + g;
    const unsigned char* lo = w + row * k + (size_t)chunk * MMA_CHUNK + t * 32;
    mma_load_weights(stage, lo, lo + (size_t)8 * k);
}

// Writes a warp's sums of its 16 rows (from row0) in the MMA's C layout to out, scaled when asked.
template <int TILES>
__device__ __forceinline__ void lone_store(const float (*sums)[4], int row0, int tokens, int n,
                                           const float* __restrict__ a_scale, const float* __restrict__ w_scale,
                                           int apply_scales, float* __restrict__ out) {
    int lane = threadIdx.x % 32;
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int token = tile * 8 + (lane % 4) * 2 + (j & 1);
            int row = row0 + lane / 4 + (j >= 2 ? 8 : 0);
            if (token < tokens) {
                float sum = sums[tile][j];
                out[(size_t)token * n + row] = apply_scales ? sum * w_scale[row] * a_scale[token] : sum;
            }
        }
    }
}

// The end of a row block in this block's range: its sums written directly, or as a partial (see above). Every warp of
// the block calls it at the same unit. Zeroes the accumulators.
template <int TILES>
__device__ __forceinline__ void lone_finish_row_block(float (*acc)[4], int unit, int u0, int u1,
                                                      int units, int chunks, int tokens, int n,
                                                      const float* __restrict__ a_scale,
                                                      const float* __restrict__ w_scale, int apply_scales,
                                                      float* __restrict__ workspace,
                                                      unsigned int* __restrict__ arrivals, float* __restrict__ out) {
    __shared__ int lone_last;
    constexpr int PARTIAL = TILES * 4 * 32;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row_block = unit / chunks;
    const int begin = row_block * chunks;
    const int end = begin + chunks;
    const int row0 = row_block * LONE_ROWS + warp * 16;
    if (begin >= u0 && end <= u1) {
        lone_store<TILES>(acc, row0, tokens, n, a_scale, w_scale, apply_scales, out);
    } else {
        const int blocks = gridDim.x;
        // Slot 0: the first row block of the range; 1: its last.
        const int which = row_block == u0 / chunks ? 0 : 1;
        float* mine = workspace + ((size_t)(blockIdx.x * 2 + which) * LONE_WARPS + warp) * PARTIAL;
#pragma unroll
        for (int tile = 0; tile < TILES; ++tile) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                mine[(tile * 4 + j) * 32 + lane] = acc[tile][j];
            }
        }
        // Publish the partial before counting in (the threadFenceReduction pattern of the CUDA samples).
        __threadfence();
        __syncthreads();
        const int first_block = lone_block_of(begin, units, blocks);
        const int last_block = lone_block_of(end - 1, units, blocks);
        if (threadIdx.x == 0) {
            unsigned int arrived = atomicAdd(arrivals + row_block, 1u);
            lone_last = arrived == (unsigned int)(last_block - first_block);
            if (lone_last) {
                arrivals[row_block] = 0;
            }
        }
        __syncthreads();
        if (lone_last) {
            __threadfence();
            float sums[TILES][4];
#pragma unroll
            for (int tile = 0; tile < TILES; ++tile) {
                sums[tile][0] = sums[tile][1] = sums[tile][2] = sums[tile][3] = 0.0f;
            }
            // Several blocks' partials loaded at once (16 values a lane: what the registers allow), then added in
            // block order: this runs at the end of the kernel, and one L2 round trip per block would be its tail.
            constexpr int BATCH = 4 / TILES;
            for (int batch = first_block; batch <= last_block; batch += BATCH) {
                float loaded[BATCH][TILES][4];
#pragma unroll
                for (int i = 0; i < BATCH; ++i) {
                    const int b = batch + i;
                    if (b <= last_block) {
                        const int slot = row_block == (units * b / blocks) / chunks ? 0 : 1;
                        const float* part = workspace + ((size_t)(b * 2 + slot) * LONE_WARPS + warp) * PARTIAL;
#pragma unroll
                        for (int tile = 0; tile < TILES; ++tile) {
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                // Through L2: another SM wrote it, and L1 is not coherent.
                                loaded[i][tile][j] = __ldcg(part + (tile * 4 + j) * 32 + lane);
                            }
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < BATCH; ++i) {
                    if (batch + i <= last_block) {
#pragma unroll
                        for (int tile = 0; tile < TILES; ++tile) {
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                sums[tile][j] += loaded[i][tile][j];
                            }
                        }
                    }
                }
            }
            lone_store<TILES>(sums, row0, tokens, n, a_scale, w_scale, apply_scales, out);
        }
    }
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
        acc[tile][0] = acc[tile][1] = acc[tile][2] = acc[tile][3] = 0.0f;
    }
}

template <int TILES>
__device__ __forceinline__ void fp8_lone_expert_gemm_tiles(
    const unsigned char* __restrict__ a, const float* __restrict__ a_scale, const unsigned char* __restrict__ w,
    const float* __restrict__ w_scale, int tokens, int n, int k, int apply_scales, float* __restrict__ workspace,
    unsigned int* __restrict__ arrivals, float* __restrict__ out) {
    DYNAMIC_SHARED(uint4, lone_staged);
    unsigned char* staged = reinterpret_cast<unsigned char*>(lone_staged);
    constexpr int TOKENS = TILES * 8;
    // Weight chunks in flight per warp (launch bounds: 128 registers; 32 tokens' accumulators leave room for three).
    constexpr int LONE_STAGES = TILES == 4 ? 3 : 4;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int chunks = k / MMA_CHUNK;
    const int units = (n / LONE_ROWS) * chunks;
    const int u0 = (int)(units * blockIdx.x / gridDim.x);
    const int u1 = (int)(units * (blockIdx.x + 1) / gridDim.x);
    if (u0 >= u1 || tokens <= 0 || tokens > TOKENS) {
        return;
    }
    const int tiles = (tokens + 7) / 8;
    const int first_chunk = u0 % chunks;
    const int staged_chunks = min(u1 - u0, chunks);

    uint4 ring[LONE_STAGES][4];
#pragma unroll
    for (int s = 0; s < LONE_STAGES; ++s) {
        if (u0 + s < u1) {
            lone_load(ring[s], w, k, chunks, u0 + s, warp, g, t);
        }
    }
    // The range's activations, chunk by chunk from its first, token-major; tokens past `tokens` are zero.
    const int pieces = staged_chunks * TOKENS * (MMA_CHUNK / 16);
    for (int i = threadIdx.x; i < pieces; i += blockDim.x) {
        const int piece = i % (MMA_CHUNK / 16);
        const int token = (i / (MMA_CHUNK / 16)) % TOKENS;
        const int slot = i / ((MMA_CHUNK / 16) * TOKENS);
        const int chunk = (first_chunk + slot) % chunks;
        unsigned char* target = staged + ((size_t)slot * TOKENS + token) * LONE_TOKEN_BYTES + piece * 16;
        if (token < tokens) {
            lone_copy16(target, a + (size_t)token * k + (size_t)chunk * MMA_CHUNK + piece * 16);
        } else {
            *reinterpret_cast<uint4*>(target) = make_uint4(0, 0, 0, 0);
        }
    }
    lone_copies_wait();
    __syncthreads();

    float acc[TILES][4];
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
        acc[tile][0] = acc[tile][1] = acc[tile][2] = acc[tile][3] = 0.0f;
    }
    for (int base = u0; base < u1; base += LONE_STAGES) {
#pragma unroll
        for (int s = 0; s < LONE_STAGES; ++s) {
            const int unit = base + s;
            if (unit < u1) {
                const int chunk = unit % chunks;
                const int slot = (chunk - first_chunk + chunks) % chunks;
                const unsigned char* panel = staged + (size_t)slot * TOKENS * LONE_TOKEN_BYTES + t * 32;
#pragma unroll
                for (int tile = 0; tile < TILES; ++tile) {
                    if (tile < tiles) {
                        const uint4* x = reinterpret_cast<const uint4*>(panel + (tile * 8 + g) * LONE_TOKEN_BYTES);
                        const uint4 pair[2] = {x[0], x[1]};
                        mma_chunk_tile(acc[tile], ring[s], pair);
                    }
                }
                if (unit + LONE_STAGES < u1) {
                    lone_load(ring[s], w, k, chunks, unit + LONE_STAGES, warp, g, t);
                }
                if (chunk == chunks - 1 || unit == u1 - 1) {
                    lone_finish_row_block<TILES>(acc, unit, u0, u1, units, chunks, tokens, n, a_scale, w_scale,
                                                 apply_scales, workspace, arrivals, out);
                }
            }
        }
    }
}

#define LONE_PARAMS                                                                                                 \
    const unsigned char *__restrict__ a, const float *__restrict__ a_scale, const unsigned char *__restrict__ w,  \
        const float *__restrict__ w_scale, int tokens, int n, int k, int apply_scales,                            \
        float *__restrict__ workspace, unsigned int *__restrict__ arrivals, float *__restrict__ out
#define LONE_ARGS a, a_scale, w, w_scale, tokens, n, k, apply_scales, workspace, arrivals, out
extern "C" __global__ void __launch_bounds__(LONE_WARPS * 32, 2) fp8_lone_expert_gemm_t1(LONE_PARAMS) {
    fp8_lone_expert_gemm_tiles<1>(LONE_ARGS);
}
extern "C" __global__ void __launch_bounds__(LONE_WARPS * 32, 2) fp8_lone_expert_gemm_t2(LONE_PARAMS) {
    fp8_lone_expert_gemm_tiles<2>(LONE_ARGS);
}
extern "C" __global__ void __launch_bounds__(LONE_WARPS * 32, 2) fp8_lone_expert_gemm_t4(LONE_PARAMS) {
    fp8_lone_expert_gemm_tiles<4>(LONE_ARGS);
}

// The rate of mma.sync m16n8k32 E4M3 on this GPU, for `switchyard bench gpu`: each warp runs `rounds` rounds of 8
// independent MMAs on registers (no memory traffic, so the MMA pipe alone is timed), and writes one sum so that
// nothing is dead. Whether a kernel for 128 tokens can stay on mma.sync or needs Hopper's wgmma depends on it.
extern "C" __global__ void __launch_bounds__(256, 2) mma_e4m3_rate(int rounds, float* __restrict__ out) {
    float acc[8][4];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.0f;
    }
    // E4M3 0x30 is 0.5 (and 0x28 0.25): the sums stay exact and finite for any number of rounds a benchmark runs.
    const unsigned int a = 0x30303030u;
    const unsigned int b = 0x28282828u;
    for (int round = 0; round < rounds; ++round) {
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            mma_e4m3(acc[c], a, a, a, a, b, b);
        }
    }
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        sum += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
    }
    out[(size_t)blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// The epilogue after cuBLASLt's FP8 GEMM with unit scales: out[i, j] *= a_scale[i] * w_scale[j]. Exact in the sense
// that row-wise scales factor out of the k-sum; only the product's rounding differs from scaling inside.
extern "C" __global__ void scale_rows_cols(float* __restrict__ out, const float* __restrict__ a_scale,
                                           const float* __restrict__ w_scale, int m, int n) {
    size_t total = (size_t)m * n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int row = (int)(i / n);
        int col = (int)(i % n);
        out[i] = out[i] * (w_scale[col] * a_scale[row]);
    }
}
