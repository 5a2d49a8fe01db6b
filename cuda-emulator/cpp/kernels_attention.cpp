// kernels/cuda/attention.cu compiled for the CPU emulator (one translation unit per .cu file).
#include "cuda_emulation.h"
#include "attention.cu"
#include "kernel_registry.h"

void switchyard_emu_register_attention(switchyard_emu::Registry& registry) {
    SWITCHYARD_EMU_KERNEL(registry, rms_norm);
    SWITCHYARD_EMU_KERNEL(registry, rope_interleaved);
    SWITCHYARD_EMU_KERNEL(registry, paged_decode_attention);
    SWITCHYARD_EMU_KERNEL(registry, paged_decode_attention_bf16);
    SWITCHYARD_EMU_KERNEL(registry, paged_decode_attention_grouped);
    SWITCHYARD_EMU_KERNEL(registry, paged_decode_attention_grouped_bf16);
    SWITCHYARD_EMU_KERNEL(registry, paged_decode_merge);
}
