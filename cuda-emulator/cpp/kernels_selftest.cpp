// Kernels that exercise the emulated execution model itself (cuda-emulator/tests/driver_*.rs launch them through the
// exported driver API). Written as CUDA, compiled only here.
#include "cuda_emulation.h"
#include "kernel_registry.h"

// Odd threads return at once; the others count themselves at a barrier, twice. Every survivor must see the number of
// survivors both times (exited threads leave the barrier instead of deadlocking it).
extern "C" __global__ void switchyard_emu_test_barrier_early_exit(unsigned int* counts) {
    __shared__ unsigned int survivors;
    __shared__ unsigned int second;
    if (threadIdx.x == 0) {
        survivors = 0;
        second = 0;
    }
    __syncthreads();
    if (threadIdx.x % 2 == 1) {
        return;
    }
    atomicAdd(&survivors, 1u);
    __syncthreads();
    unsigned int first_count = survivors;
    // Half of the survivors leave between the two barriers.
    if (threadIdx.x % 4 == 2) {
        counts[2 * threadIdx.x] = first_count;
        counts[2 * threadIdx.x + 1] = 0;
        return;
    }
    atomicAdd(&second, 1u);
    __syncthreads();
    counts[2 * threadIdx.x] = first_count;
    counts[2 * threadIdx.x + 1] = second;
}

// out[t] = the butterfly sum of in over t's warp; swapped[t] = in[t ^ 5] (within the warp).
extern "C" __global__ void switchyard_emu_test_shuffle(const float* in, float* sums, float* swapped) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    float value = in[t];
    swapped[t] = __shfl_xor_sync(0xffffffff, value, 5);
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(0xffffffff, value, offset);
    }
    sums[t] = value;
}

// Thread 0 reports the first `bytes` bytes of dynamic shared memory as found (garbage), then every thread writes its
// index and reads its mirror's after a barrier: mirrored[t] = blockDim.x - 1 - t.
extern "C" __global__ void switchyard_emu_test_dynamic_shared(unsigned char* found, int bytes, unsigned int* mirrored) {
#ifdef SWITCHYARD_CPU_EMULATION
    unsigned int* shared = switchyard_emu_dynamic_shared<unsigned int>();
#else
    extern __shared__ unsigned int shared[];
#endif
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        const unsigned char* raw = reinterpret_cast<const unsigned char*>(shared);
        for (int i = 0; i < bytes; ++i) {
            found[i] = raw[i];
        }
    }
    __syncthreads();
    shared[threadIdx.x] = threadIdx.x;
    __syncthreads();
    mirrored[blockIdx.x * blockDim.x + threadIdx.x] = shared[blockDim.x - 1 - threadIdx.x];
}

// Each thread writes its coordinates: out[linear * 4 ..] = (thread x | y << 10 | z << 20, block x, y, z) with the
// dimensions in out's tail.
extern "C" __global__ void switchyard_emu_test_indices(unsigned int* out) {
    unsigned int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    unsigned int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    unsigned int linear = block * blockDim.x * blockDim.y * blockDim.z + thread;
    out[linear * 4] = threadIdx.x | threadIdx.y << 10 | threadIdx.z << 20;
    out[linear * 4 + 1] = blockIdx.x;
    out[linear * 4 + 2] = blockIdx.y;
    out[linear * 4 + 3] = blockIdx.z;
}

// Lane 0 leaves, then the others shuffle with the full mask: undefined on a GPU, a failed launch here.
extern "C" __global__ void switchyard_emu_test_shuffle_after_exit(float* out) {
    if (threadIdx.x == 0) {
        return;
    }
    out[threadIdx.x] = __shfl_xor_sync(0xffffffff, 1.0f, 1);
}

// Thread 0 waits at a barrier the others never reach (they wait at a shuffle lane 0 never joins): a deadlock.
extern "C" __global__ void switchyard_emu_test_deadlock(float* out) {
    if (threadIdx.x == 0) {
        __syncthreads();
        out[0] = 1.0f;
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffff, 1.0f, 1);
    }
}

// The warp MMA through the runtime's gathering: lane l passes registers a[l][0..4], b[l][0..2], c[l][0..4] and
// writes its d fragment to d[l][0..4].
extern "C" __global__ void switchyard_emu_test_warp_mma(const unsigned int* a, const unsigned int* b, const float* c,
                                                        float* d) {
    unsigned int lane = threadIdx.x;
    float acc[4] = {c[lane * 4], c[lane * 4 + 1], c[lane * 4 + 2], c[lane * 4 + 3]};
    switchyard_emu_warp_mma(acc, a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2], a[lane * 4 + 3], b[lane * 2],
                            b[lane * 2 + 1]);
    for (int i = 0; i < 4; ++i) {
        d[lane * 4 + i] = acc[i];
    }
}

// Every scalar parameter kind the launcher unpacks, written back: out = {i, u, f, ll, ull as two words...}.
extern "C" __global__ void switchyard_emu_test_scalars(int i, unsigned int u, float f, long long ll,
                                                       unsigned long long ull, unsigned char* out) {
    if (threadIdx.x != 0) {
        return;
    }
    memcpy(out, &i, 4);
    memcpy(out + 4, &u, 4);
    memcpy(out + 8, &f, 4);
    memcpy(out + 12, &ll, 8);
    memcpy(out + 20, &ull, 8);
}

// out[0] = in[index], read by thread 0 only: with an index past the end (or before the start) of `in`, a read the
// guard pages must catch (cuda-emulator/tests/driver_guard_pages.rs).
extern "C" __global__ void switchyard_emu_test_read_element(const float* in, int index, float* out) {
    if (threadIdx.x == 0) {
        out[0] = in[index];
    }
}

// data[index] = value, written by thread 0 only: the write counterpart of switchyard_emu_test_read_element.
extern "C" __global__ void switchyard_emu_test_write_element(float* data, int index, float value) {
    if (threadIdx.x == 0) {
        data[index] = value;
    }
}

void switchyard_emu_register_selftest(switchyard_emu::Registry& registry) {
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_barrier_early_exit);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_shuffle);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_dynamic_shared);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_indices);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_shuffle_after_exit);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_deadlock);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_warp_mma);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_scalars);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_read_element);
    SWITCHYARD_EMU_KERNEL(registry, switchyard_emu_test_write_element);
}
