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
// offset into it).
#ifdef SWITCHYARD_CPU_EMULATION
#include "mma_emulation.h"

__device__ void wgmma_m64n128k32_e4m3(float* d, const unsigned int* a, unsigned long long desc, int scale_d) {
    static unsigned int fragments[1024][4];
    for (int r = 0; r < 4; ++r) {
        fragments[threadIdx.x][r] = a[r];
    }
    __syncthreads();
    const unsigned char* shared = switchyard_emu_dynamic_shared<unsigned char>();
    const size_t start = (size_t)(desc & 0x3FFF) << 4;
    const size_t leading = (size_t)((desc >> 16) & 0x3FFF) << 4;
    const size_t stride = (size_t)((desc >> 32) & 0x3FFF) << 4;
    const int group_base = threadIdx.x / 128 * 128;
    const int warp = (threadIdx.x % 128) / 32;
    const int lane = threadIdx.x % 32;
    float out[64];
    for (int i = 0; i < 64; ++i) {
        const int row = 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
        const int col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        float acc = scale_d ? d[i] : 0.0f;
        for (int k = 0; k < 32; ++k) {
            // The thread holding A[row, k], and which of its registers and bytes.
            const int owner = group_base + (row / 16) * 32 + (row % 8) * 4 + (k % 16) / 4;
            const int reg = ((row % 16) >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
            const float x = switchyard_emu_e4m3_to_f32((unsigned char)(fragments[owner][reg] >> (8 * (k % 4))));
            const size_t at = start + (col / 8) * stride + (k / 16) * leading + (col % 8) * 16 + k % 16;
            const float y = switchyard_emu_e4m3_to_f32(shared[at]);
            acc += x * y;
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
