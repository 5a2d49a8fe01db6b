// Warp-collective tensor-core MMA emulation (see mma.cpp).
#pragma once
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

/// D = A(16x32, e4m3, row) * B(32x8, e4m3, col) + C(16x8, f32) for a whole warp's register fragments of
/// `mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32`: lane l holds a[l][0..4], b[l][0..2], c[l][0..4];
/// d[l][0..4] receives lane l's output fragment. `d` may alias `c`.
void switchyard_emu_mma_m16n8k32_e4m3_f32(const uint32_t a[32][4], const uint32_t b[32][2], const float c[32][4],
                                          float d[32][4]);

/// Exact decode of one OCP FP8 E4M3 byte (bias 7, no infinities, 0x7F/0xFF are NaN).
float switchyard_emu_e4m3_to_f32(uint8_t v);

#ifdef __cplusplus
}
#endif
