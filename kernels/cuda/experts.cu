// The routed-expert path of an MoE layer on the GPU, FP8 E4M3 weights and activations:
//   quantize_rows_e4m3       per-token dynamic activation quantisation (scale = amax / 448), bit for bit
//                            switchyard_kernels::fp8::quantize_rows
//   permute_plan             counting sort of (token, expert) rows by expert: per-expert offsets and the permutation
//   gather_rows / scatter_rows  the permutation and its inverse on f32 rows
//   silu_mul_quantize_e4m3   SwiGLU on the fused gate_up output, re-quantised per token for the down projection
//   fp8_grouped_gemm_small   grouped FP8 GEMM for few tokens per expert: weight streaming, each weight byte read once
//                            from HBM per pass of up to TOKENS_PER_PASS tokens, 16-byte loads, f32 accumulation
//                            on the CUDA cores (any n; the fallback)
//   fp8_grouped_gemm_mma     the same on the tensor cores (mma.sync m16n8k32 E4M3, f32 accumulation): n % 16 == 0,
//                            k % 64 == 0, up to 64 tokens per expert in one pass over the weights
//   scale_rows_cols          the epilogue after cuBLASLt's unit-scale FP8 GEMM: out[m, n] *= a_scale[m] * w_scale[n]
//
// Layouts (row-major everywhere, as the CPU kernels): an expert weight is nn.Linear [n, k] E4M3 codes with one f32
// scale per output row n; the experts of a layer are stacked, expert e at codes + e * n * k and scales + e * n.
// Compiled with NVRTC at start-up (kernels/src/device/cuda/compile.rs); only cuda_fp8.h is included.

#include <cuda_fp8.h>

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
#ifdef SWITCHYARD_CPU_EMULATION
    unsigned int* shared = switchyard_emu_dynamic_shared<unsigned int>();
#else
    extern __shared__ unsigned int shared[];
#endif
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

// The inverse of gather_rows: out[slot_row[slot], :] = y[slot, :].
extern "C" __global__ void scatter_rows(const float* __restrict__ y, const unsigned int* __restrict__ slot_row,
                                        int slots, int cols, float* __restrict__ out) {
    int slot = blockIdx.x;
    if (slot >= slots) {
        return;
    }
    const float* src = y + (size_t)slot * cols;
    float* dst = out + (size_t)slot_row[slot] * cols;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < cols; c += gridDim.y * blockDim.x) {
        dst[c] = src[c];
    }
}

// SwiGLU on the fused gate_up output and per-token re-quantisation, one block per row:
// gate_up[row] = [gate (inter values), up (inter values)]; a = silu(gate) * up = gate / (1 + exp(-gate)) * up;
// q[row] = e4m3(a / scale), scales[row] = amax(a) / 448. `activated` (optional, may be null) receives a in f32.
// Dynamic shared memory: inter floats (the row of a, so it is computed once).
extern "C" __global__ void silu_mul_quantize_e4m3(const float* __restrict__ gate_up, int rows, int inter,
                                                  unsigned char* __restrict__ q, float* __restrict__ scales,
                                                  float* __restrict__ activated) {
#ifdef SWITCHYARD_CPU_EMULATION
    float* row_values = switchyard_emu_dynamic_shared<float>();
#else
    extern __shared__ float row_values[];
#endif
    int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* gate = gate_up + (size_t)row * 2 * inter;
    const float* up = gate + inter;
    float local = 0.0f;
    for (int c = threadIdx.x; c < inter; c += blockDim.x) {
        float g = gate[c];
        float a = g / (1.0f + expf(-g)) * up[c];
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
                       float* __restrict__ out) {
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
                    out[(size_t)slot * n + o] = acc[t] * scales[o] * a_scale[slot];
                }
            }
        }
    }
}

// The same grouped GEMM on the tensor cores (sm_89+: mma.sync m16n8k32 with E4M3 inputs and f32 accumulation), for
// the same experts (1..=max_tokens tokens, max_tokens <= MMA_MAX_TOKENS). With 16 tokens or more, CUDA-core FMAs cannot
// keep up with HBM (2 * 16 * 5120 * 16384 FLOP for one gate_up is ~40 us at the FP32 peak, the whole streaming time),
// so the products go to the tensor cores: out^T = W . X^T with 16 weight rows as the MMA's M, 8 tokens as its N.
// Each warp streams 16 weight rows: per 64-column step a lane loads 16 bytes of row g and 16 of row g + 8 (g = lane /
// 4, at column (lane % 4) * 16) and 16 bytes of each of its 8-token tiles' token g; the k-order inside the step is
// permuted the same way for W and X, so two MMAs cover the 64 columns:
//   MMA 1: A = {w_g.x, w_g8.x, w_g.y, w_g8.y}, B = {x.x, x.y};  MMA 2: the .z and .w words.
// (A fragment: a0-a3 row g cols t*4+j, a4-a7 row g+8, a8-a15 the same rows at +16; B: b0-b3 k t*4+j, b4-b7 +16, column
// g; C: c0,c1 row g cols t*2, t*2+1, c2,c3 row g+8 — PTX ISA, mma.m16n8k32 fragments.) n must be a multiple of 16 and
// k of 64 (the caller checks). Grid: (n / (16 * MMA_WARPS), num_experts); block: MMA_WARPS warps.
#define MMA_WARPS 4
#define MMA_MAX_TOKENS 64
#define MMA_TILES (MMA_MAX_TOKENS / 8)
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

extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)
fp8_grouped_gemm_mma(const unsigned char* __restrict__ a, const float* __restrict__ a_scale,
                     const unsigned int* __restrict__ offsets, const unsigned char* __restrict__ w,
                     const float* __restrict__ w_scale, int n, int k, int max_tokens, float* __restrict__ out) {
    int expert = blockIdx.y;
    unsigned int first = offsets[expert];
    int tokens = (int)(offsets[expert + 1] - first);
    if (tokens == 0 || tokens > max_tokens || tokens > MMA_MAX_TOKENS) {
        return;
    }
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int g = lane / 4;
    int t = lane % 4;
    int row_base = (blockIdx.x * MMA_WARPS + warp) * 16;
    if (row_base >= n) {
        return;
    }
    int tiles = (tokens + 7) / 8;
    const unsigned char* weights = w + (size_t)expert * n * k;
    const uint4* w_lo = reinterpret_cast<const uint4*>(weights + (size_t)(row_base + g) * k + t * 16);
    const uint4* w_hi = reinterpret_cast<const uint4*>(weights + (size_t)(row_base + g + 8) * k + t * 16);
    // Token g of each tile (rows past the expert's tokens read as zeros, never out of bounds).
    const unsigned char* a_rows = a + (size_t)first * k + t * 16;
    float acc[MMA_TILES][4];
#pragma unroll
    for (int i = 0; i < MMA_TILES; ++i) {
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    }
    int steps = k / 64;
    for (int step = 0; step < steps; ++step) {
        uint4 lo = __ldg(w_lo + step * 4);
        uint4 hi = __ldg(w_hi + step * 4);
#pragma unroll
        for (int tile = 0; tile < MMA_TILES; ++tile) {
            if (tile < tiles) {
                int token = tile * 8 + g;
                uint4 x = make_uint4(0, 0, 0, 0);
                if (token < tokens) {
                    x = __ldg(reinterpret_cast<const uint4*>(a_rows + (size_t)token * k) + step * 4);
                }
                mma_e4m3(acc[tile], lo.x, hi.x, lo.y, hi.y, x.x, x.y);
                mma_e4m3(acc[tile], lo.z, hi.z, lo.w, hi.w, x.z, x.w);
            }
        }
    }
    const float* scales = w_scale + (size_t)expert * n;
    float scale_lo = scales[row_base + g];
    float scale_hi = scales[row_base + g + 8];
#pragma unroll
    for (int tile = 0; tile < MMA_TILES; ++tile) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            int token = tile * 8 + t * 2 + j;
            if (tile < tiles && token < tokens) {
                unsigned int slot = first + token;
                float token_scale = a_scale[slot];
                out[(size_t)slot * n + row_base + g] = acc[tile][j] * scale_lo * token_scale;
                out[(size_t)slot * n + row_base + g + 8] = acc[tile][2 + j] * scale_hi * token_scale;
            }
        }
    }
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
