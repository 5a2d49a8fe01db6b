// The dense side of a decoder layer on the GPU (what is not a GEMM: the GEMMs of dense layers are cuBLASLt's), f32
// activations, the layouts of the CPU kernels:
//   f32_to_bf16     GEMM inputs rounded to bf16 for the bf16 dense GEMM, bit for bit
//                   switchyard_kernels::device::f32_to_bf16_bits (round to nearest even, NaN stays NaN)
//   embed_rows_f32 / embed_rows_bf16
//                   out[t, :] = table[tokens[t], :], an f32 or bf16 embedding table [vocab, hidden]
//   silu_mul        SwiGLU of a fused gate|up output [rows, 2 * inter] (gate columns first), as
//                   switchyard_kernels::activation::silu_mul_reference: g / (1 + exp(-g)) * u
//   add_in_place    x += y (the residual adds)
//   scale_rows      x[r, :] *= factors[r] (NoPE layers' attention temperature)
//   kv_write / kv_write_bf16
//                   keys and values of each token into its slot of the paged KV pool, blocks laid out
//                   [2, block_size, kv_heads, head_dim] (keys, then values) as attention::paged_attention reads them;
//                   an f32 pool, or a bf16 one (each value rounded to nearest even as f32_to_bf16)
// Compiled with NVRTC at start-up (kernels/src/device/cuda/compile.rs); no header is included.

// f32 -> bf16 bits, round to nearest even; NaN keeps its sign and becomes quiet.
__device__ __forceinline__ unsigned short bf16_bits(float value) {
    unsigned int bits = __float_as_uint(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((bits >> 16) | 0x0040u);
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)(bits >> 16);
}

__device__ __forceinline__ float bf16_value(unsigned short bits) {
    return __uint_as_float((unsigned int)bits << 16);
}

// Grid-stride over n values.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, long long n, unsigned short* __restrict__ out) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = bf16_bits(x[i]);
    }
}

__device__ __forceinline__ float embed_value(float value) {
    return value;
}

__device__ __forceinline__ float embed_value(unsigned short bits) {
    return bf16_value(bits);
}

// One block per token (grid.x), threads over the hidden values. An id >= vocab writes zeros: the host checks ids
// (the device cannot report one), and the kernel never reads outside the table.
template <typename T>
__device__ void embed_rows(const T* __restrict__ table, const unsigned int* __restrict__ tokens, int count,
                           unsigned int vocab, int hidden, float* __restrict__ out) {
    int t = blockIdx.x;
    if (t >= count) {
        return;
    }
    unsigned int token = tokens[t];
    float* dst = out + (size_t)t * hidden;
    if (token >= vocab) {
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
            dst[c] = 0.0f;
        }
        return;
    }
    const T* src = table + (size_t)token * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        dst[c] = embed_value(src[c]);
    }
}

extern "C" __global__ void embed_rows_f32(const float* __restrict__ table, const unsigned int* __restrict__ tokens,
                                          int count, unsigned int vocab, int hidden, float* __restrict__ out) {
    embed_rows(table, tokens, count, vocab, hidden, out);
}

extern "C" __global__ void embed_rows_bf16(const unsigned short* __restrict__ table,
                                           const unsigned int* __restrict__ tokens, int count, unsigned int vocab,
                                           int hidden, float* __restrict__ out) {
    embed_rows(table, tokens, count, vocab, hidden, out);
}

// Grid (rows, column blocks): out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i], the CPU's order of operations.
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, int rows, int inter, float* __restrict__ out) {
    int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const float* gate = gate_up + (size_t)r * 2 * inter;
    const float* up = gate + inter;
    float* dst = out + (size_t)r * inter;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < inter; i += gridDim.y * blockDim.x) {
        float g = gate[i];
        dst[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// Grid-stride over n values: x += y.
extern "C" __global__ void add_in_place(float* __restrict__ x, const float* __restrict__ y, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        x[i] += y[i];
    }
}

// Grid (rows, column blocks): x[r, :] *= factors[r].
extern "C" __global__ void scale_rows(float* __restrict__ x, int rows, int cols, const float* __restrict__ factors) {
    int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    float factor = factors[r];
    float* row = x + (size_t)r * cols;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < cols; c += gridDim.y * blockDim.x) {
        row[c] *= factor;
    }
}

// A KV pool element from an f32 key or value: stored as is, or rounded to bf16 (nearest even).
__device__ __forceinline__ void kv_store(float* dst, float value) {
    *dst = value;
}

__device__ __forceinline__ void kv_store(unsigned short* dst, float value) {
    *dst = bf16_bits(value);
}

// One block per token (grid.x): token t's key and value rows (row = kv_heads * head_dim values each) go to slot
// slots[t] = block * block_size + offset of the pool: the key at block's [0, offset], the value at [1, offset]. A slot
// >= pool_slots is skipped (the host checks slots; the device cannot report one and never writes outside the pool).
// T: the pool's element type (float, or unsigned short holding bf16 bits).
template <typename T>
__device__ void kv_write_into(T* __restrict__ pool, const float* __restrict__ k, const float* __restrict__ v,
                              const unsigned int* __restrict__ slots, int tokens, int block_size, int row,
                              unsigned long long pool_slots) {
    int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    unsigned int slot = slots[t];
    if ((unsigned long long)slot >= pool_slots) {
        return;
    }
    unsigned int block = slot / (unsigned int)block_size;
    unsigned int offset = slot % (unsigned int)block_size;
    T* key = pool + ((size_t)block * 2 * block_size + offset) * row;
    T* value = key + (size_t)block_size * row;
    const float* k_src = k + (size_t)t * row;
    const float* v_src = v + (size_t)t * row;
    for (int c = threadIdx.x; c < row; c += blockDim.x) {
        kv_store(key + c, k_src[c]);
        kv_store(value + c, v_src[c]);
    }
}

extern "C" __global__ void kv_write(float* __restrict__ pool, const float* __restrict__ k, const float* __restrict__ v,
                                    const unsigned int* __restrict__ slots, int tokens, int block_size, int row,
                                    unsigned long long pool_slots) {
    kv_write_into(pool, k, v, slots, tokens, block_size, row, pool_slots);
}

extern "C" __global__ void kv_write_bf16(unsigned short* __restrict__ pool, const float* __restrict__ k,
                                         const float* __restrict__ v, const unsigned int* __restrict__ slots,
                                         int tokens, int block_size, int row, unsigned long long pool_slots) {
    kv_write_into(pool, k, v, slots, tokens, block_size, row, pool_slots);
}
