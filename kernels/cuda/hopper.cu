// Hopper-only kernels (sm_90a: compiled for compute_90a, loaded only on an sm_90 GPU): the warpgroup MMA, wgmma.
//   wgmma_probe   one m64n128k32 E4M3 wgmma on given operands, with the shared-memory operand's descriptor read one
//                 way or the other: what a GPU run needs to confirm the operand layouts a streaming wgmma kernel for
//                 128 tokens (docs/cuda.md, "What remains") would rely on, before such a kernel is timed.
//
// The layouts, as read from the PTX ISA ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   - A from registers: warp w of the warpgroup holds rows 16w..16w+15 in the m16n8k32 A fragment (four .b32: row g,
//     k t*4..+3; row g + 8, the same k; row g, k 16 + t*4..+3; row g + 8, the same; g = lane / 4, t = lane % 4).
//   - B from shared memory, K-major without swizzle: 8 x 16-byte core matrices (8 values of n, 16 of k, each row of
//     16 bytes contiguous), core matrix (n / 8, k / 16) at start + (n / 8) * SBO + (k / 16) * LBO, where the
//     descriptor holds start >> 4 in bits 0-13, LBO >> 4 in bits 16-29 ("leading dimension byte offset": between
//     core matrices adjacent in K), SBO >> 4 in bits 32-45 ("stride dimension byte offset": adjacent in N), and the
//     swizzle mode (0: none) in bits 62-63.
//   - D: warp w holds rows 16w..16w+15; d[i] is row 16w + g + 8 * ((i / 2) % 2), column 8 * (i / 4) + 2t + i % 2.
// Shared memory written by ordinary stores is made visible to the tensor cores' (async proxy) reads with
// fence.proxy.async before the wgmma.

// `T name[]`: the launch's dynamic shared memory (the CPU emulator's prelude defines it as a call into its runtime).
#ifndef SWITCHYARD_CPU_EMULATION
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// The CPU emulator (cuda-emulator/) runs a wgmma as every thread of the block depositing its A fragment, a block
// barrier, each thread computing its own 64 outputs from its warpgroup's fragments and the shared memory the
// descriptor names (ascending k, f32), and a second barrier: so every thread of the block must call it together, and
// the descriptor must point into the launch's dynamic shared memory (the emulation's __cvta_generic_to_shared is an
// offset into it; a core matrix outside it fails the launch).
#ifdef SWITCHYARD_CPU_EMULATION
#include "mma_emulation.h"

__device__ void wgmma_m64n128k32_e4m3(float* d, const unsigned int* a, unsigned long long desc, int scale_d) {
    static unsigned int fragments[1024][4];
    static float decoded[256];
    static bool decoded_ready = false;
    if (!decoded_ready) {
        for (int code = 0; code < 256; ++code) {
            decoded[code] = switchyard_emu_e4m3_to_f32((unsigned char)code);
        }
        decoded_ready = true;
    }
    for (int r = 0; r < 4; ++r) {
        fragments[threadIdx.x][r] = a[r];
    }
    __syncthreads();
    const unsigned char* shared = switchyard_emu_dynamic_shared<unsigned char>();
    const size_t start = (size_t)(desc & 0x3FFF) << 4;
    const size_t leading = (size_t)((desc >> 16) & 0x3FFF) << 4;
    const size_t stride = (size_t)((desc >> 32) & 0x3FFF) << 4;
    // The farthest core matrix: n-group 15, k-half 1, 128 bytes.
    if (start + 15 * stride + leading + 128 > switchyard_emu_dynamic_shared_size()) {
        switchyard_emu_fail("wgmma: the B descriptor reads past the launch's dynamic shared memory");
    }
    const int group_base = threadIdx.x / 128 * 128;
    const int warp = (threadIdx.x % 128) / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    // This thread's two rows of A (16w + g and 16w + g + 8) and its 32 columns of B (8c + 2t + e), decoded.
    float rows[2][32];
    for (int half = 0; half < 2; ++half) {
        for (int k = 0; k < 32; ++k) {
            // The thread holding A[row, k] and which of its registers and bytes.
            const int owner = group_base + warp * 32 + g * 4 + (k % 16) / 4;
            const int reg = half + (k >= 16 ? 2 : 0);
            rows[half][k] = decoded[(unsigned char)(fragments[owner][reg] >> (8 * (k % 4)))];
        }
    }
    float cols[32][32];
    for (int c = 0; c < 16; ++c) {
        for (int e = 0; e < 2; ++e) {
            const int col = 8 * c + 2 * t + e;
            for (int k = 0; k < 32; ++k) {
                cols[2 * c + e][k] = decoded[shared[start + (col / 8) * stride + (k / 16) * leading + (col % 8) * 16 + k % 16]];
            }
        }
    }
    float out[64];
    for (int i = 0; i < 64; ++i) {
        const float* x = rows[(i / 2) % 2];
        const float* y = cols[2 * (i / 4) + i % 2];
        float acc = scale_d ? d[i] : 0.0f;
        for (int k = 0; k < 32; ++k) {
            acc += x[k] * y[k];
        }
        out[i] = acc;
    }
    for (int i = 0; i < 64; ++i) {
        d[i] = out[i];
    }
    __syncthreads();
}

__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit_and_wait() {}
__device__ __forceinline__ void shared_to_async_proxy() {}
#else
// One m64n128k32 E4M3 x E4M3 -> f32 wgmma of the warpgroup: d (64 per thread, the layout above) = A B^T (+ d when
// scale_d), A in registers, B through its descriptor.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float* d, const unsigned int* a, unsigned long long desc,
                                                      int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
        "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
        "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));
}

// Orders the registers the next wgmma reads (A, and d) after the instructions that wrote them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Commits the wgmmas issued so far as a group and waits for every group.
__device__ __forceinline__ void wgmma_commit_and_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// Makes this thread's ordinary shared-memory stores visible to the tensor cores' reads (the async proxy).
__device__ __forceinline__ void shared_to_async_proxy() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif

// A K-major, unswizzled shared-memory matrix descriptor (the layout above); `leading` and `stride` in bytes,
// multiples of 16.
__device__ __forceinline__ unsigned long long wgmma_descriptor(const void* shared, unsigned int leading,
                                                               unsigned int stride) {
    unsigned long long address = (unsigned long long)__cvta_generic_to_shared(shared);
    return ((address & 0x3FFFF) >> 4) | ((unsigned long long)((leading >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)((stride >> 4) & 0x3FFF) << 32);
}

// a: [64, 32] E4M3 codes (row-major), b: [128, 32] (one row of 32 k per n), out: [64, 128] f32 = a b^T. B is staged
// as two K-halves of sixteen 128-byte core matrices (k-half h, n-group c at h * 2048 + c * 128); variant 0 describes
// that with LBO = 2048 (K-adjacent) and SBO = 128 (N-adjacent) as read above, variant 1 with the two swapped, so
// that one GPU run says which reading the hardware has. The other reading's core matrices lie up to 30 KiB in, so the
// block takes 32 KiB of dynamic shared memory, zeroed first: either reading stays inside it. One block of 128 threads.
extern "C" __global__ void __launch_bounds__(128, 1) wgmma_probe(const unsigned char* __restrict__ a,
                                                                 const unsigned char* __restrict__ b, int variant,
                                                                 float* __restrict__ out) {
    DYNAMIC_SHARED(uint4, probe_staged);
    unsigned char* staged = reinterpret_cast<unsigned char*>(probe_staged);
    for (int i = threadIdx.x; i < 32768 / 16; i += blockDim.x) {
        reinterpret_cast<uint4*>(staged)[i] = make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
    // 128 x 32 bytes of B: thread i stages row n = i, both K-halves.
    const int n = threadIdx.x;
    for (int half = 0; half < 2; ++half) {
        const uint4 value = *reinterpret_cast<const uint4*>(b + n * 32 + half * 16);
        *reinterpret_cast<uint4*>(staged + half * 2048 + (n / 8) * 128 + (n % 8) * 16) = value;
    }
    shared_to_async_proxy();
    __syncthreads();
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const unsigned char* row_lo = a + (16 * warp + g) * 32;
    const unsigned char* row_hi = row_lo + 8 * 32;
    unsigned int fragment[4];
    fragment[0] = *reinterpret_cast<const unsigned int*>(row_lo + t * 4);
    fragment[1] = *reinterpret_cast<const unsigned int*>(row_hi + t * 4);
    fragment[2] = *reinterpret_cast<const unsigned int*>(row_lo + 16 + t * 4);
    fragment[3] = *reinterpret_cast<const unsigned int*>(row_hi + 16 + t * 4);
    float d[64];
    for (int i = 0; i < 64; ++i) {
        d[i] = 0.0f;
    }
    const unsigned long long desc =
        variant == 0 ? wgmma_descriptor(staged, 2048, 128) : wgmma_descriptor(staged, 128, 2048);
    wgmma_fence();
    wgmma_m64n128k32_e4m3(d, fragment, desc, 0);
    wgmma_commit_and_wait();
    for (int i = 0; i < 64; ++i) {
        const int row = 16 * warp + g + 8 * ((i / 2) % 2);
        const int col = 8 * (i / 4) + 2 * t + i % 2;
        out[row * 128 + col] = d[i];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// fp8_warpgroup_expert_gemm_s3 / _s6: one expert's FP8 GEMM of 33..=128 tokens on wgmma, for the rows mma.sync cannot
// serve (docs/cuda.md, "What remains": at 128 tokens a warp's 16-row MMA tile re-reads the block's staged tokens once
// per 16 weight rows; a warpgroup's wgmma reads them once per 64). Stream-K over every SM as fp8_lone_expert_gemm in
// experts.cu, with these differences:
//   - a unit is WG_ROWS (128) weight rows x one 128-column chunk; a block is two warpgroups, each owning 64 rows of
//     the unit, with 128 tokens' f32 accumulators (64 a thread);
//   - a unit's weights and its chunk of activations are staged together in a ring of STAGES slots by 16-byte
//     cp.async (the weights with L2's evict-first policy: read once; the activations, read by every row block, with
//     evict-normal), so that STAGES - 1 units' bytes are in flight while one is multiplied, without holding
//     registers: _s3 (two blocks an SM) and _s6 (one block an SM, deeper);
//   - A (weights) from registers, read from the slot's rows in the m16n8k32 fragment layout (wgmma_probe's); B (tokens)
//     through a descriptor, the chunk staged in core matrices as it is copied;
//   - the descriptor's two byte offsets are arguments (`leading`, `stride`): the host passes the reading wgmma_probe
//     confirmed on this GPU, so a misread of the PTX ISA costs this kernel its use, not its correctness;
//   - partial sums (row blocks split between blocks) go through `workspace` and the last block to arrive adds them in
//     block order, as fp8_lone_expert_gemm does: the same bits whoever arrives last.
// `a`: [tokens, k] codes, `a_scale`: [tokens], `w`: [n, k], `w_scale`: [n], `out`: [tokens, n], raw sums unless
// apply_scales; n % WG_ROWS == 0, k % WG_CHUNK == 0; the launch gives WG_THREADS threads a block, at most as many blocks
// as units, STAGES * WG_STAGE_BYTES of dynamic shared memory, a workspace of blocks * 2 * 64 * WG_THREADS floats and
// n / WG_ROWS zeroed arrival counters (kernels/src/device/plan.rs: WarpgroupExpertGrid).
#define WG_GROUPS 2
#define WG_THREADS (128 * WG_GROUPS)
#define WG_ROWS (64 * WG_GROUPS)
#define WG_TOKENS 128
#define WG_CHUNK 128
// A staged weight row: its 128 bytes and 16 of padding, so that a warp's lanes reading their A fragments (rows g, the
// word at 4t of a step's half) hit 32 different banks.
#define WG_ROW_BYTES 144
// A slot: the tokens' chunk in wgmma's core-matrix order (4 steps x 2 k-halves x 16 core matrices of 128 bytes), then
// the weight rows.
#define WG_TOKEN_BYTES (WG_TOKENS * WG_CHUNK)
#define WG_STAGE_BYTES (WG_TOKEN_BYTES + WG_ROWS * WG_ROW_BYTES)

#ifdef SWITCHYARD_CPU_EMULATION
__device__ __forceinline__ unsigned long long wg_evict_first_policy() { return 0; }
__device__ __forceinline__ unsigned long long wg_keep_policy() { return 0; }
__device__ __forceinline__ void wg_copy16(void* shared, const void* global, unsigned long long) {
    memcpy(shared, global, 16);
}
__device__ __forceinline__ void wg_commit() {}
template <int PENDING>
__device__ __forceinline__ void wg_wait() {}
#else
// An L2 policy that evicts what it covers first: the weights are read once per step.
__device__ __forceinline__ unsigned long long wg_evict_first_policy() {
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}
// The ordinary L2 policy, for bytes other blocks read too (the activations).
__device__ __forceinline__ unsigned long long wg_keep_policy() {
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}
// 16 bytes global -> shared without registers, through L2 only (cp.async.cg), under `policy`.
__device__ __forceinline__ void wg_copy16(void* shared, const void* global, unsigned long long policy) {
    unsigned int address = (unsigned int)__cvta_generic_to_shared(shared);
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global),
                 "l"(policy)
                 : "memory");
}
// Closes this thread's copies issued since the last commit into one group.
__device__ __forceinline__ void wg_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most PENDING of this thread's groups are still copying.
template <int PENDING>
__device__ __forceinline__ void wg_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}
#endif

// Issues the copies of `unit` (its weight rows' chunk and the tokens' chunk) into a slot, 16 bytes each; tokens past
// `tokens` are zeroed there (ordinary stores).
__device__ __forceinline__ void wg_stage(unsigned char* slot, const unsigned char* __restrict__ a,
                                         const unsigned char* __restrict__ w, int tokens, int k, int chunks, int unit,
                                         unsigned long long weights_policy, unsigned long long tokens_policy) {
    const size_t column = (size_t)(unit % chunks) * WG_CHUNK;
    const unsigned char* rows = w + (size_t)(unit / chunks) * WG_ROWS * k + column;
    unsigned char* weights = slot + WG_TOKEN_BYTES;
    // Eight lanes copy one row's 128 bytes: whole lines from L2, one 16-byte piece per bank group in shared memory.
#pragma unroll
    for (int r = 0; r < WG_ROWS * 8 / WG_THREADS; ++r) {
        const int i = r * WG_THREADS + threadIdx.x;
        const int row = i / 8;
        const int piece = i % 8;
        wg_copy16(weights + row * WG_ROW_BYTES + piece * 16, rows + (size_t)row * k + piece * 16, weights_policy);
    }
    // Piece p of token n (k 16p..16p + 15) is the core-matrix row n % 8 of core matrix (n / 8, k-half p % 2) of step
    // p / 2. A warp copies pieces 0-3 or 4-7 of eight tokens: whole sectors from L2, and each eight lanes that write
    // together hold eight different n % 8, so eight different bank groups.
#pragma unroll
    for (int r = 0; r < WG_TOKENS * 8 / WG_THREADS; ++r) {
        const int lane = threadIdx.x % 32;
        const int token = (threadIdx.x / 32) * 8 + lane % 8 + 64 * (r / 2);
        const int piece = lane / 8 + 4 * (r % 2);
        unsigned char* place = slot + (piece / 2) * 4096 + (piece % 2) * 2048 + (token / 8) * 128 + (token % 8) * 16;
        if (token < tokens) {
            wg_copy16(place, a + (size_t)token * k + column + piece * 16, tokens_policy);
        } else {
            *reinterpret_cast<uint4*>(place) = make_uint4(0, 0, 0, 0);
        }
    }
}

// Writes a thread's 64 sums (wgmma's D layout; `row0`: its warp's first row) to out, scaled when asked.
__device__ __forceinline__ void wg_store(const float* sums, int row0, int tokens, int n,
                                         const float* __restrict__ a_scale, const float* __restrict__ w_scale,
                                         int apply_scales, float* __restrict__ out) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        const int row = row0 + lane / 4 + 8 * ((i / 2) % 2);
        const int token = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        if (token < tokens) {
            out[(size_t)token * n + row] = apply_scales ? sums[i] * w_scale[row] * a_scale[token] : sums[i];
        }
    }
}

// The end of a row block in this block's range (every thread calls it at the same unit): written directly when the
// range holds all its chunks, else through the workspace (slot 0: the range's first row block, 1: its last) and added
// up by the block that arrives last, in block order. Zeroes the accumulators.
__device__ __forceinline__ void wg_finish_row_block(float* acc, int unit, int u0, int u1, int units, int chunks,
                                                    int tokens, int n, const float* __restrict__ a_scale,
                                                    const float* __restrict__ w_scale, int apply_scales,
                                                    float* __restrict__ workspace,
                                                    unsigned int* __restrict__ arrivals, float* __restrict__ out) {
    __shared__ int wg_last;
    const int row_block = unit / chunks;
    const int begin = row_block * chunks;
    const int end = begin + chunks;
    const int row0 = row_block * WG_ROWS + (threadIdx.x / 32) * 16;
    if (begin >= u0 && end <= u1) {
        wg_store(acc, row0, tokens, n, a_scale, w_scale, apply_scales, out);
    } else {
        const int blocks = gridDim.x;
        const int which = row_block == u0 / chunks ? 0 : 1;
        // Value i of every thread side by side: the writes and the last block's reads are whole lines.
        float* mine = workspace + (size_t)(blockIdx.x * 2 + which) * 64 * WG_THREADS + threadIdx.x;
#pragma unroll
        for (int i = 0; i < 64; ++i) {
            mine[i * WG_THREADS] = acc[i];
        }
        __threadfence();
        __syncthreads();
        // The blocks whose ranges hold this row block's first and last units.
        const int first_block = ((begin + 1) * blocks - 1) / units;
        const int last_block = (end * blocks - 1) / units;
        if (threadIdx.x == 0) {
            const unsigned int arrived = atomicAdd(arrivals + row_block, 1u);
            wg_last = arrived == (unsigned int)(last_block - first_block);
            if (wg_last) {
                arrivals[row_block] = 0;
            }
        }
        __syncthreads();
        if (wg_last) {
            __threadfence();
#pragma unroll
            for (int i = 0; i < 64; ++i) {
                acc[i] = 0.0f;
            }
            for (int b = first_block; b <= last_block; ++b) {
                const int slot = row_block == ((long long)units * b / blocks) / chunks ? 0 : 1;
                const float* part = workspace + (size_t)(b * 2 + slot) * 64 * WG_THREADS + threadIdx.x;
                // A quarter of the values at a time: loads in flight together, within the registers left.
#pragma unroll
                for (int quarter = 0; quarter < 4; ++quarter) {
                    float loaded[16];
#pragma unroll
                    for (int i = 0; i < 16; ++i) {
                        // Through L2: another SM wrote it, and L1 is not coherent.
                        loaded[i] = __ldcg(part + (quarter * 16 + i) * WG_THREADS);
                    }
#pragma unroll
                    for (int i = 0; i < 16; ++i) {
                        acc[quarter * 16 + i] += loaded[i];
                    }
                }
            }
            wg_store(acc, row0, tokens, n, a_scale, w_scale, apply_scales, out);
        }
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        acc[i] = 0.0f;
    }
}

template <int STAGES>
__device__ __forceinline__ void fp8_warpgroup_expert_gemm_stages(
    const unsigned char* __restrict__ a, const float* __restrict__ a_scale, const unsigned char* __restrict__ w,
    const float* __restrict__ w_scale, int tokens, int n, int k, int apply_scales, unsigned int leading,
    unsigned int stride, float* __restrict__ workspace, unsigned int* __restrict__ arrivals,
    float* __restrict__ out) {
    DYNAMIC_SHARED(uint4, wg_staged);
    unsigned char* staged = reinterpret_cast<unsigned char*>(wg_staged);
    const int chunks = k / WG_CHUNK;
    const int units = (n / WG_ROWS) * chunks;
    const int u0 = (int)(units * blockIdx.x / gridDim.x);
    const int u1 = (int)(units * (blockIdx.x + 1) / gridDim.x);
    if (u0 >= u1 || tokens <= 0 || tokens > WG_TOKENS || blockDim.x != WG_THREADS) {
        return;
    }
    const unsigned long long weights_policy = wg_evict_first_policy();
    const unsigned long long tokens_policy = wg_keep_policy();
    // The first STAGES - 1 units in flight; one group committed per unit (empty past the range), so that waiting
    // for "all but STAGES - 2 groups" is waiting for the unit about to be multiplied.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (u0 + s < u1) {
            wg_stage(staged + s * WG_STAGE_BYTES, a, w, tokens, k, chunks, u0 + s, weights_policy, tokens_policy);
        }
        wg_commit();
    }
    const int group = threadIdx.x / 128;
    const int warp = (threadIdx.x % 128) / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        acc[i] = 0.0f;
    }
    for (int unit = u0; unit < u1; ++unit) {
        wg_wait<STAGES - 2>();
        // This thread's copies and zero stores are visible to the tensor cores (the async proxy); after the barrier,
        // everyone's are, and every warpgroup has finished multiplying the slot refilled next.
        shared_to_async_proxy();
        __syncthreads();
        const int next = unit + STAGES - 1;
        if (next < u1) {
            wg_stage(staged + ((next - u0) % STAGES) * WG_STAGE_BYTES, a, w, tokens, k, chunks, next, weights_policy,
                     tokens_policy);
        }
        wg_commit();
        const unsigned char* slot = staged + ((unit - u0) % STAGES) * WG_STAGE_BYTES;
        // This lane's A fragments of the four steps: rows g and g + 8 of its warp's 16, k 4t and 16 + 4t of each
        // step's 32 (a quarter-warp's eight rows lie 36 words apart: 32 different banks).
        const unsigned char* lo = slot + WG_TOKEN_BYTES + (64 * group + 16 * warp + g) * WG_ROW_BYTES + 4 * t;
        const unsigned char* hi = lo + 8 * WG_ROW_BYTES;
        unsigned int fragments[4][4];
#pragma unroll
        for (int step = 0; step < 4; ++step) {
            fragments[step][0] = *reinterpret_cast<const unsigned int*>(lo + 32 * step);
            fragments[step][1] = *reinterpret_cast<const unsigned int*>(hi + 32 * step);
            fragments[step][2] = *reinterpret_cast<const unsigned int*>(lo + 32 * step + 16);
            fragments[step][3] = *reinterpret_cast<const unsigned int*>(hi + 32 * step + 16);
        }
        wgmma_fence();
#pragma unroll
        for (int step = 0; step < 4; ++step) {
            wgmma_m64n128k32_e4m3(acc, fragments[step], wgmma_descriptor(slot + step * 4096, leading, stride), 1);
        }
        wgmma_commit_and_wait();
        if (unit % chunks == chunks - 1 || unit == u1 - 1) {
            wg_finish_row_block(acc, unit, u0, u1, units, chunks, tokens, n, a_scale, w_scale, apply_scales,
                                workspace, arrivals, out);
        }
    }
}

#define WG_PARAMS                                                                                                   \
    const unsigned char *__restrict__ a, const float *__restrict__ a_scale, const unsigned char *__restrict__ w,  \
        const float *__restrict__ w_scale, int tokens, int n, int k, int apply_scales, unsigned int leading,      \
        unsigned int stride, float *__restrict__ workspace, unsigned int *__restrict__ arrivals,                  \
        float *__restrict__ out
#define WG_ARGS a, a_scale, w, w_scale, tokens, n, k, apply_scales, leading, stride, workspace, arrivals, out
extern "C" __global__ void __launch_bounds__(WG_THREADS, 2) fp8_warpgroup_expert_gemm_s3(WG_PARAMS) {
    fp8_warpgroup_expert_gemm_stages<3>(WG_ARGS);
}
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) fp8_warpgroup_expert_gemm_s6(WG_PARAMS) {
    fp8_warpgroup_expert_gemm_stages<6>(WG_ARGS);
}
