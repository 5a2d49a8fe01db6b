// kernels/cuda/experts.cu compiled for the CPU emulator (one translation unit per .cu file).
#include "cuda_emulation.h"
#include "experts.cu"
#include "kernel_registry.h"

void switchyard_emu_register_experts(switchyard_emu::Registry& registry) {
    SWITCHYARD_EMU_KERNEL(registry, quantize_rows_e4m3);
    SWITCHYARD_EMU_KERNEL(registry, permute_plan);
    SWITCHYARD_EMU_KERNEL(registry, gather_rows);
    SWITCHYARD_EMU_KERNEL(registry, scatter_rows);
    SWITCHYARD_EMU_KERNEL(registry, silu_mul_quantize_e4m3);
    SWITCHYARD_EMU_KERNEL(registry, fp8_grouped_gemm_small);
    SWITCHYARD_EMU_KERNEL(registry, fp8_grouped_gemm_mma_t1);
    SWITCHYARD_EMU_KERNEL(registry, fp8_grouped_gemm_mma_t2);
    SWITCHYARD_EMU_KERNEL(registry, fp8_grouped_gemm_mma_t4);
    SWITCHYARD_EMU_KERNEL(registry, fp8_lone_expert_gemm_t1);
    SWITCHYARD_EMU_KERNEL(registry, fp8_lone_expert_gemm_t2);
    SWITCHYARD_EMU_KERNEL(registry, fp8_lone_expert_gemm_t4);
    SWITCHYARD_EMU_KERNEL(registry, scale_rows_cols);
    SWITCHYARD_EMU_KERNEL(registry, mma_e4m3_rate);
}
