// The emulator's execution model: a launch runs its blocks one at a time, in blockIdx order (x fastest); the threads
// of a block are cooperative fibers with 64 KiB stacks (reused across launches), scheduled deterministically from a
// FIFO run queue. A fiber gives way only at __syncthreads (a block barrier that exited threads leave, as on the GPU),
// at a warp collective (shuffle, MMA: every lane of the warp must arrive; the last to arrive completes it for all), and
// when it returns. Nothing runnable while threads remain is a deadlock, reported as a failed launch (a GPU would hang).
//
// SWITCHYARD_CUDA_EMULATOR_SCHEDULE=reverse runs blocks and threads in the opposite order (last block first, highest
// thread first, releases in reverse): a kernel whose results change with it has a race (threads of a block reading
// what others write without a barrier between, or blocks depending on each other), which the fixed order hides.
//
// Context switches: a hand-written x86-64 switch (callee-saved registers, MXCSR and the x87 control word), a few
// nanoseconds, where glibc's swapcontext makes a sigprocmask system call each time; ucontext elsewhere.
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <new>
#include <vector>

#include "cuda_emulation.h"
#include "kernel_registry.h"

#include "mma_emulation.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

void switchyard_emu_register_experts(switchyard_emu::Registry& registry);
void switchyard_emu_register_attention(switchyard_emu::Registry& registry);
void switchyard_emu_register_hopper(switchyard_emu::Registry& registry);
void switchyard_emu_register_dense(switchyard_emu::Registry& registry);
void switchyard_emu_register_selftest(switchyard_emu::Registry& registry);

extern "C" {
uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;
}

// CUresult values (cudarc's sys::cudaError_enum).
enum : int {
    kSuccess = 0,
    kInvalidValue = 1,
    kOutOfMemory = 2,
    kLaunchFailed = 719,
};

#if defined(__x86_64__)
extern "C" void switchyard_emu_switch(void** save_sp, void* load_sp);
extern "C" void switchyard_emu_fiber_start(void);
asm(R"(
    .text
    .p2align 4
    .globl switchyard_emu_switch
    .hidden switchyard_emu_switch
    .type switchyard_emu_switch, @function
switchyard_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size switchyard_emu_switch, .-switchyard_emu_switch

    .p2align 4
    .globl switchyard_emu_fiber_start
    .hidden switchyard_emu_fiber_start
    .type switchyard_emu_fiber_start, @function
switchyard_emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size switchyard_emu_fiber_start, .-switchyard_emu_fiber_start
)");
#endif

namespace {

using switchyard_emu::KernelEntry;
using switchyard_emu::Registry;

constexpr size_t kStackBytes = 64 * 1024;
constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;

enum class State { Runnable, BlockBarrier, WarpCollective, Done };
enum class Collective { None, Shuffle, Mma };

struct Fiber {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t context;
#endif
    char* stack = nullptr;  // the usable stack (a guard page below it)
    State state = State::Runnable;
    uint3 thread{0, 0, 0};
    unsigned index = 0;
    unsigned warp_ops = 0;  // warp collectives done: selects the exchange buffer (double-buffered)
};

struct Warp {
    unsigned lanes = 0;    // threads of the block in this warp (32 but for a partial last warp)
    unsigned exited = 0;   // lanes that have returned
    unsigned arrived = 0;  // lanes waiting in the current collective
    Collective kind = Collective::None;
    uint64_t exchange[2][kWarpSize];
    uint32_t mma_a[2][kWarpSize][4];
    uint32_t mma_b[2][kWarpSize][2];
    float mma_c[2][kWarpSize][4];
    float mma_d[2][kWarpSize][4];
};

struct Launch {
    const KernelEntry* entry = nullptr;
    void* arguments = nullptr;
    unsigned threads = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<unsigned> queue;  // FIFO run queue (head index below)
    size_t head = 0;
    unsigned live = 0;     // threads of the block not yet returned
    unsigned arrived = 0;  // threads waiting at the block barrier
    unsigned current = 0;
#if defined(__x86_64__)
    void* scheduler_sp = nullptr;
#else
    ucontext_t scheduler;
#endif
    bool failed = false;
    char message[512] = {0};
    unsigned char* shared = nullptr;
    size_t shared_bytes = 0;
};

std::mutex g_launch_mutex;
Launch g_launch;
// The kernel thread id of the thread running the blocks of a launch, 0 when none: the guard-page fault handler
// (src/guard_pages.rs) names the kernel only when the fault is that thread's.
std::atomic<long> g_running_thread{0};
std::vector<char*> g_stacks;  // mmap'd fiber stacks, reused by every launch

// Whether SWITCHYARD_CUDA_EMULATOR_SCHEDULE=reverse (read once).
bool reverse_schedule() {
    static const bool reverse = [] {
        const char* value = getenv("SWITCHYARD_CUDA_EMULATOR_SCHEDULE");
        return value != nullptr && strcmp(value, "reverse") == 0;
    }();
    return reverse;
}

Registry& registry() {
    static Registry* instance = [] {
        auto* r = new Registry();
        switchyard_emu_register_experts(*r);
        switchyard_emu_register_attention(*r);
        switchyard_emu_register_hopper(*r);
        switchyard_emu_register_dense(*r);
        switchyard_emu_register_selftest(*r);
        return r;
    }();
    return *instance;
}

void format_message(const char* format, ...) {
    if (g_launch.failed) {
        return;  // keep the first failure
    }
    g_launch.failed = true;
    va_list args;
    va_start(args, format);
    vsnprintf(g_launch.message, sizeof g_launch.message, format, args);
    va_end(args);
}

Fiber& current() { return g_launch.fibers[g_launch.current]; }

// Gives the CPU back to the scheduler; returns when this fiber is run again.
void yield_to_scheduler() {
    Fiber& fiber = current();
#if defined(__x86_64__)
    switchyard_emu_switch(&fiber.sp, g_launch.scheduler_sp);
#else
    swapcontext(&fiber.context, &g_launch.scheduler);
#endif
}

// Fails the launch from inside a fiber: it is never resumed (its stack is simply reused by the next launch).
[[noreturn]] void fail_in_fiber() {
    Fiber& fiber = current();
    fiber.state = State::Done;
    for (;;) {
        yield_to_scheduler();
    }
}

void make_runnable(unsigned index) {
    g_launch.fibers[index].state = State::Runnable;
    g_launch.queue.push_back(index);
}

void release_block_barrier() {
    g_launch.arrived = 0;
    bool reverse = reverse_schedule();
    for (unsigned i = 0; i < g_launch.threads; ++i) {
        unsigned index = reverse ? g_launch.threads - 1 - i : i;
        if (g_launch.fibers[index].state == State::BlockBarrier) {
            make_runnable(index);
        }
    }
}

void thread_exit() {
    Fiber& fiber = current();
    fiber.state = State::Done;
    g_launch.live -= 1;
    g_launch.warps[fiber.index / kWarpSize].exited += 1;
    // Exited threads leave the barrier: the others may now all be there.
    if (g_launch.arrived > 0 && g_launch.arrived == g_launch.live) {
        release_block_barrier();
    }
    for (;;) {
        yield_to_scheduler();
    }
}

void fiber_main(Fiber*) {
    g_launch.entry->run(g_launch.arguments);
    thread_exit();
}

#if !defined(__x86_64__)
void fiber_trampoline() { fiber_main(&current()); }
#endif

char* stack_for(unsigned index) {
    while (g_stacks.size() <= index) {
        long page = sysconf(_SC_PAGESIZE);
        size_t guard = page > 0 ? (size_t)page : 4096;
        void* memory = mmap(nullptr, kStackBytes + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) {
            throw std::bad_alloc();
        }
        // A stack overflow faults on the guard page instead of corrupting the neighbouring stack.
        mprotect(memory, guard, PROT_NONE);
        g_stacks.push_back(static_cast<char*>(memory) + guard);
    }
    return g_stacks[index];
}

void prepare_fiber(Fiber& fiber) {
    fiber.state = State::Runnable;
    fiber.warp_ops = 0;
#if defined(__x86_64__)
    uintptr_t top = (reinterpret_cast<uintptr_t>(fiber.stack) + kStackBytes) & ~uintptr_t(15);
    auto* slots = reinterpret_cast<uint64_t*>(top) - 8;
    uint32_t mxcsr = __builtin_ia32_stmxcsr();
    uint16_t fpu_control = 0;
    asm volatile("fnstcw %0" : "=m"(fpu_control));
    slots[0] = (uint64_t)mxcsr | ((uint64_t)fpu_control << 32);
    slots[1] = 0;                                            // r15
    slots[2] = 0;                                            // r14
    slots[3] = reinterpret_cast<uint64_t>(&fiber_main);      // r13: called by fiber_start
    slots[4] = reinterpret_cast<uint64_t>(&fiber);           // r12: its argument
    slots[5] = 0;                                            // rbx
    slots[6] = 0;                                            // rbp
    slots[7] = reinterpret_cast<uint64_t>(&switchyard_emu_fiber_start);  // return address
    fiber.sp = slots;
#else
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack;
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_trampoline, 0);
#endif
}

void run_fiber(unsigned index) {
    g_launch.current = index;
    Fiber& fiber = g_launch.fibers[index];
    threadIdx = fiber.thread;
#if defined(__x86_64__)
    switchyard_emu_switch(&g_launch.scheduler_sp, fiber.sp);
#else
    swapcontext(&g_launch.scheduler, &fiber.context);
#endif
}

// Runs one block to completion; false when the launch failed (message set).
bool run_block() {
    Launch& l = g_launch;
    l.queue.clear();
    l.head = 0;
    l.live = l.threads;
    l.arrived = 0;
    for (unsigned i = 0; i < l.threads; ++i) {
        prepare_fiber(l.fibers[i]);
        l.queue.push_back(reverse_schedule() ? l.threads - 1 - i : i);
    }
    for (Warp& warp : l.warps) {
        warp.exited = 0;
        warp.arrived = 0;
        warp.kind = Collective::None;
    }
    if (l.shared_bytes > 0) {
        memset(l.shared, 0xCD, l.shared_bytes);
    }
    while (l.head < l.queue.size()) {
        unsigned index = l.queue[l.head++];
        if (l.fibers[index].state != State::Runnable) {
            continue;
        }
        run_fiber(index);
        if (l.failed) {
            return false;
        }
        // Keep the queue from growing without bound on long kernels.
        if (l.head > 4096 && l.head * 2 > l.queue.size()) {
            l.queue.erase(l.queue.begin(), l.queue.begin() + (ptrdiff_t)l.head);
            l.head = 0;
        }
    }
    if (l.live > 0) {
        unsigned at_barrier = 0, at_warp = 0;
        for (const Fiber& fiber : l.fibers) {
            at_barrier += fiber.state == State::BlockBarrier;
            at_warp += fiber.state == State::WarpCollective;
        }
        format_message(
            "deadlock in block (%u, %u, %u): %u threads at __syncthreads and %u in warp collectives whose lanes "
            "never all arrived (a GPU would hang)",
            blockIdx.x, blockIdx.y, blockIdx.z, at_barrier, at_warp);
        return false;
    }
    return true;
}

// The common arrival of a warp collective; `complete` runs once, in the last lane to arrive, before all continue.
template <typename Complete>
void warp_collective(Collective kind, unsigned mask, const char* name, Complete complete) {
    Fiber& fiber = current();
    Warp& warp = g_launch.warps[fiber.index / kWarpSize];
    unsigned expected = warp.lanes == kWarpSize ? 0xFFFFFFFFu : ((1u << warp.lanes) - 1u);
    if (mask != expected) {
        format_message("%s with mask 0x%08x in a warp of %u lanes: only the full warp's mask (0x%08x) is emulated",
                       name, mask, warp.lanes, expected);
        fail_in_fiber();
    }
    if (warp.exited > 0) {
        format_message("%s names all lanes of warp %u but %u of them have exited (undefined on a GPU)", name,
                       fiber.index / kWarpSize, warp.exited);
        fail_in_fiber();
    }
    if (warp.arrived == 0) {
        warp.kind = kind;
    } else if (warp.kind != kind) {
        format_message("lanes of warp %u are in different warp collectives (divergent %s)", fiber.index / kWarpSize,
                       name);
        fail_in_fiber();
    }
    warp.arrived += 1;
    if (warp.arrived == warp.lanes) {
        complete(warp);
        warp.arrived = 0;
        warp.kind = Collective::None;
        unsigned first = (fiber.index / kWarpSize) * kWarpSize;
        for (unsigned i = 0; i < warp.lanes; ++i) {
            unsigned lane = reverse_schedule() ? warp.lanes - 1 - i : i;
            if (first + lane != fiber.index) {
                make_runnable(first + lane);
            }
        }
    } else {
        fiber.state = State::WarpCollective;
        yield_to_scheduler();
    }
    fiber.warp_ops += 1;
}

}  // namespace

extern "C" {

void switchyard_emu_syncthreads(void) {
    Fiber& fiber = current();
    g_launch.arrived += 1;
    if (g_launch.arrived == g_launch.live) {
        release_block_barrier();
        return;
    }
    fiber.state = State::BlockBarrier;
    yield_to_scheduler();
}

uint64_t switchyard_emu_shfl_xor(unsigned int mask, uint64_t value, int lane_mask, int width) {
    Fiber& fiber = current();
    if (width != (int)kWarpSize || lane_mask < 0 || lane_mask >= (int)kWarpSize) {
        format_message("__shfl_xor_sync with lane mask %d and width %d: only width 32 is emulated", lane_mask, width);
        fail_in_fiber();
    }
    unsigned lane = fiber.index % kWarpSize;
    unsigned buffer = fiber.warp_ops & 1;
    Warp& warp = g_launch.warps[fiber.index / kWarpSize];
    warp.exchange[buffer][lane] = value;
    warp_collective(Collective::Shuffle, mask, "__shfl_xor_sync", [](Warp&) {});
    unsigned source = lane ^ (unsigned)lane_mask;
    if (source >= warp.lanes) {
        return value;  // outside a partial warp: the GPU returns the caller's own value
    }
    return warp.exchange[buffer][source];
}

void switchyard_emu_warp_mma(float* c, unsigned int a0, unsigned int a1, unsigned int a2, unsigned int a3,
                             unsigned int b0, unsigned int b1) {
    Fiber& fiber = current();
    unsigned lane = fiber.index % kWarpSize;
    unsigned buffer = fiber.warp_ops & 1;
    Warp& warp = g_launch.warps[fiber.index / kWarpSize];
    if (warp.lanes != kWarpSize) {
        format_message("mma.sync in a partial warp of %u lanes", warp.lanes);
        fail_in_fiber();
    }
    const uint32_t a[4] = {a0, a1, a2, a3};
    memcpy(warp.mma_a[buffer][lane], a, sizeof a);
    warp.mma_b[buffer][lane][0] = b0;
    warp.mma_b[buffer][lane][1] = b1;
    memcpy(warp.mma_c[buffer][lane], c, 4 * sizeof(float));
    warp_collective(Collective::Mma, 0xFFFFFFFFu, "mma.sync", [buffer](Warp& w) {
        switchyard_emu_mma_m16n8k32_e4m3_f32(w.mma_a[buffer], w.mma_b[buffer], w.mma_c[buffer], w.mma_d[buffer]);
    });
    memcpy(c, warp.mma_d[buffer][lane], 4 * sizeof(float));
}

void* switchyard_emu_dynamic_shared_bytes(void) { return g_launch.shared; }

size_t switchyard_emu_dynamic_shared_size(void) { return g_launch.shared_bytes; }

void switchyard_emu_fail(const char* what) {
    format_message("%s", what);
    fail_in_fiber();
}

int switchyard_emu_kernel_count(void) { return (int)registry().entries().size(); }

const char* switchyard_emu_kernel_name(int kernel) {
    const auto& entries = registry().entries();
    return kernel >= 0 && (size_t)kernel < entries.size() ? entries[(size_t)kernel].name : nullptr;
}

int switchyard_emu_kernel_param_count(int kernel) {
    const auto& entries = registry().entries();
    return kernel >= 0 && (size_t)kernel < entries.size() ? (int)entries[(size_t)kernel].params.size() : -1;
}

// Parameter `param` of `kernel`: its size and whether it is a pointer; 0, or -1 when out of range.
int switchyard_emu_kernel_param(int kernel, int param, size_t* size, int* is_pointer) {
    const auto& entries = registry().entries();
    if (kernel < 0 || (size_t)kernel >= entries.size()) {
        return -1;
    }
    const auto& params = entries[(size_t)kernel].params;
    if (param < 0 || (size_t)param >= params.size()) {
        return -1;
    }
    *size = params[(size_t)param].size;
    *is_pointer = params[(size_t)param].pointer ? 1 : 0;
    return 0;
}

// For the guard-page fault handler (async-signal-safe: it only reads): the kernel the calling thread is running, with
// the block and thread being run in block[0..3] and thread[0..3]; null when the calling thread runs no kernel (the
// fault then came from host code: the emulated cuBLASLt or NCCL, or a copy).
const char* switchyard_emu_faulting_kernel(unsigned* block, unsigned* thread) {
    long self = (long)syscall(SYS_gettid);
    if (self == 0 || g_running_thread.load(std::memory_order_acquire) != self || g_launch.entry == nullptr) {
        return nullptr;
    }
    block[0] = blockIdx.x;
    block[1] = blockIdx.y;
    block[2] = blockIdx.z;
    thread[0] = threadIdx.x;
    thread[1] = threadIdx.y;
    thread[2] = threadIdx.z;
    return g_launch.entry->name;
}

// Runs `kernel` over the grid synchronously. Returns a CUresult value; on failure `message` (NUL-terminated, at most
// `message_len` bytes) says why. The caller has validated the dimensions and the arguments.
int switchyard_emu_launch(int kernel, const unsigned* grid, const unsigned* block, unsigned shared_bytes,
                          void* const* kernel_params, char* message, size_t message_len) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    Launch& l = g_launch;
    auto report = [&](int code, const char* text) {
        if (message_len > 0) {
            snprintf(message, message_len, "%s", text);
        }
        return code;
    };
    try {
        const auto& entries = registry().entries();
        if (kernel < 0 || (size_t)kernel >= entries.size()) {
            return report(kInvalidValue, "no such kernel");
        }
        unsigned threads = block[0] * block[1] * block[2];
        if (threads == 0 || threads > kMaxThreads) {
            return report(kInvalidValue, "bad block size");
        }
        l.entry = &entries[(size_t)kernel];
        l.failed = false;
        l.message[0] = 0;
        l.threads = threads;
        if (l.fibers.size() < threads) {
            l.fibers.resize(threads);
        }
        for (unsigned i = 0; i < threads; ++i) {
            Fiber& fiber = l.fibers[i];
            fiber.index = i;
            fiber.stack = stack_for(i);
            fiber.thread = uint3{i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
        }
        unsigned warps = (threads + kWarpSize - 1) / kWarpSize;
        l.warps.resize(warps);
        for (unsigned w = 0; w < warps; ++w) {
            l.warps[w].lanes = threads - w * kWarpSize < kWarpSize ? threads - w * kWarpSize : kWarpSize;
        }
        // Dynamic shared memory, with room so that a zero-size request still yields a valid pointer.
        size_t shared_capacity = ((size_t)shared_bytes + 255) / 256 * 256 + 256;
        void* shared = aligned_alloc(256, shared_capacity);
        if (shared == nullptr) {
            return report(kOutOfMemory, "no memory for the dynamic shared memory");
        }
        l.shared = static_cast<unsigned char*>(shared);
        l.shared_bytes = shared_bytes;
        l.arguments = l.entry->unpack(kernel_params);
        blockDim = dim3{block[0], block[1], block[2]};
        gridDim = dim3{grid[0], grid[1], grid[2]};
        bool ok = true;
        uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
        g_running_thread.store((long)syscall(SYS_gettid), std::memory_order_release);
        for (uint64_t i = 0; ok && i < blocks; ++i) {
            uint64_t b = reverse_schedule() ? blocks - 1 - i : i;
            blockIdx = uint3{(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]),
                             (unsigned)(b / ((uint64_t)grid[0] * grid[1]))};
            ok = run_block();
        }
        g_running_thread.store(0, std::memory_order_release);
        l.entry->release(l.arguments);
        l.arguments = nullptr;
        free(l.shared);
        l.shared = nullptr;
        l.shared_bytes = 0;
        if (!ok) {
            return report(kLaunchFailed, l.message);
        }
        return kSuccess;
    } catch (const std::bad_alloc&) {
        return report(kOutOfMemory, "out of host memory while launching");
    } catch (...) {
        return report(kLaunchFailed, "unexpected C++ exception while launching");
    }
}

}  // extern "C"
