// The prelude that lets kernels/cuda/*.cu compile as C++ (g++, -DSWITCHYARD_CPU_EMULATION) and run on the CPU under
// the emulator's block scheduler (runtime.cpp):
//   - the threads of a block are cooperative fibers run one at a time, so a thread only ever gives way inside a call
//     into the runtime (__syncthreads, a warp shuffle, the warp MMA, returning). threadIdx & co. are globals the
//     scheduler rewrites on every switch; kernels read them after such calls, and those calls are opaque (runtime.cpp
//     is another translation unit), so the compiler reloads them.
//   - __shared__ variables become `static`: blocks run one at a time, so "shared by the block being run" is exactly
//     one instance. Dynamic shared memory (`extern __shared__`) is declared with DYNAMIC_SHARED(T, name) in the kernel
//     source, which this prelude defines as a call to switchyard_emu_dynamic_shared().
//   - atomics are plain read-modify-writes: nothing else runs while a fiber runs.
//   - __device__ functions are `static` so that helpers of the same name in two .cu files never collide.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>

#ifndef SWITCHYARD_CPU_EMULATION
#error "cuda_emulation.h is the CPU emulator's prelude: compile with -DSWITCHYARD_CPU_EMULATION"
#endif

#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static const

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return uint4{x, y, z, w};
}
static inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

extern "C" {
// Rewritten by the scheduler before each fiber runs (runtime.cpp).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

/// The block barrier: returns once every thread of the block that has not exited has arrived.
void switchyard_emu_syncthreads(void);
/// The xor butterfly of a warp: every lane named in `mask` (all 32 of a full warp) must call it; returns the value
/// of lane `lane ^ lane_mask`.
uint64_t switchyard_emu_shfl_xor(unsigned int mask, uint64_t value, int lane_mask, int width);
/// The warp-collective mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32: gathers the 32 lanes' fragments, computes
/// D = A * B + C once (mma.cpp), and gives each lane its D fragment back in c[0..4].
void switchyard_emu_warp_mma(float* c, unsigned int a0, unsigned int a1, unsigned int a2, unsigned int a3,
                             unsigned int b0, unsigned int b1);
/// Fails the launch with `what` (for constructs the emulator does not model); the calling thread never resumes.
void switchyard_emu_fail(const char* what);
/// The launch's dynamic shared memory (sharedMemBytes, 0xCD-filled at the start of every block).
void* switchyard_emu_dynamic_shared_bytes(void);
/// Its size in bytes.
size_t switchyard_emu_dynamic_shared_size(void);
}

#define __syncthreads() switchyard_emu_syncthreads()

template <typename T>
static inline T* switchyard_emu_dynamic_shared() {
    return static_cast<T*>(switchyard_emu_dynamic_shared_bytes());
}

// A kernel's `DYNAMIC_SHARED(T, name)` (its `extern __shared__ T name[]` on the GPU): a pointer to the launch's dynamic
// shared memory.
#define DYNAMIC_SHARED(T, name) T* name = switchyard_emu_dynamic_shared<T>()

// A shared-memory address as the shared window sees it: here an offset into the launch's dynamic shared memory (the
// only shared memory a descriptor of the emulated wgmma may point into).
static inline size_t __cvta_generic_to_shared(const void* p) {
    return static_cast<size_t>(static_cast<const char*>(p) - static_cast<const char*>(switchyard_emu_dynamic_shared_bytes()));
}

template <typename T>
static inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 64 bits");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    uint64_t out = switchyard_emu_shfl_xor(mask, bits, lane_mask, width);
    T result;
    memcpy(&result, &out, sizeof(T));
    return result;
}

template <typename T>
static inline T __ldg(const T* p) {
    return *p;
}

// The evict-first (streaming) load: a cache hint only, so a plain read here.
template <typename T>
static inline T __ldcs(const T* p) {
    return *p;
}

// The L2-only load (skipping the SM's L1, which is not coherent with other SMs' writes): a plain read here, where
// every block's writes are visible at once.
template <typename T>
static inline T __ldcg(const T* p) {
    return *p;
}

// Atomics (only atomicAdd is used): fibers never interleave inside a read-modify-write.
template <typename T>
static inline T atomicAdd(T* address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}

static inline void __threadfence(void) {}
static inline void __threadfence_block(void) {}
static inline void __syncwarp(unsigned int = 0xffffffffu) {}

// Bit casts.
static inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    memcpy(&u, &x, 4);
    return u;
}
static inline float __uint_as_float(unsigned int u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}
static inline int __float_as_int(float x) {
    int i;
    memcpy(&i, &x, 4);
    return i;
}
static inline float __int_as_float(int i) {
    float x;
    memcpy(&x, &i, 4);
    return x;
}

// CUDA's integer min/max overloads (and the mixed signed/unsigned ones, which compare as unsigned).
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
static inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
static inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
static inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

using std::isfinite;
using std::isinf;
using std::isnan;
