// kernels/cuda/hopper.cu compiled for the CPU emulator (one translation unit per .cu file).
#include "cuda_emulation.h"
#include "hopper.cu"
#include "kernel_registry.h"

void switchyard_emu_register_hopper(switchyard_emu::Registry& registry) {
    SWITCHYARD_EMU_KERNEL(registry, wgmma_probe);
    SWITCHYARD_EMU_KERNEL(registry, fp8_warpgroup_expert_gemm_s3);
    SWITCHYARD_EMU_KERNEL(registry, fp8_warpgroup_expert_gemm_s6);
}
