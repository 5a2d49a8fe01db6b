// kernels/cuda/dense.cu compiled for the CPU emulator (one translation unit per .cu file).
#include "cuda_emulation.h"
#include "dense.cu"
#include "kernel_registry.h"

void switchyard_emu_register_dense(switchyard_emu::Registry& registry) {
    SWITCHYARD_EMU_KERNEL(registry, f32_to_bf16);
    SWITCHYARD_EMU_KERNEL(registry, embed_rows_f32);
    SWITCHYARD_EMU_KERNEL(registry, embed_rows_bf16);
    SWITCHYARD_EMU_KERNEL(registry, silu_mul);
    SWITCHYARD_EMU_KERNEL(registry, add_in_place);
    SWITCHYARD_EMU_KERNEL(registry, scale_rows);
    SWITCHYARD_EMU_KERNEL(registry, kv_write);
    SWITCHYARD_EMU_KERNEL(registry, kv_write_bf16);
}
