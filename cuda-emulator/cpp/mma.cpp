// The warp-collective FP8 tensor-core MMA as a pure function of the whole warp's registers.
//
// Fragment layout: PTX ISA 9.7.14.5.10 "Matrix Fragments for mma.m16n8k32" (docs.nvidia.com/cuda/
// parallel-thread-execution/#warp-level-matrix-fragment-mma-16832), the .e4m3 rows of its tables, with
//   groupID = %laneid >> 2, threadID_in_group = %laneid % 4, elements numbered "low to high":
//   A (16x32, .row): a0..a15 in four .b32 registers, four elements each, so element i is byte (i & 3) of register
//     i >> 2;  row = groupID for 0 <= i < 4 || 8 <= i < 12, groupID + 8 otherwise;
//              col = threadID_in_group * 4 + (i & 3) for i < 8, threadID_in_group * 4 + (i & 3) + 16 for i >= 8.
//   B (32x8, .col): b0..b7 in two .b32 registers, element i is byte (i & 3) of register i >> 2;
//              row = threadID_in_group * 4 + (i & 3) for i < 4, threadID_in_group * 4 + (i & 3) + 16 for i >= 4;
//              col = groupID.
//   C, D (16x8, .f32): c0..c3, one per register;  row = groupID for i < 2, groupID + 8 for i >= 2;
//              col = threadID_in_group * 2 + (i & 1).
// The same layout appears in CUTLASS's SM80/SM89 16x8x32 8-bit traits (A: row gid + 8 * ((i >> 2) & 1), col tig * 4 +
// (i & 3) + 16 * (i >> 3)).
//
// Arithmetic: E4M3 decodes exactly to f32 and the product of two E4M3 values is exact in f32 (4 + 4 significant bits,
// exponents within f32's range). Each output element accumulates in f32, starting from c, adding the 32 products in
// ascending k order, each addition rounded to nearest even. The real tensor core adds in its own (unspecified,
// partly wider, partly truncating) order, so results agree to f32 rounding of the sum, not bit for bit.
#include "mma_emulation.h"

#include <cmath>

namespace {

constexpr int kRows = 16;
constexpr int kCols = 8;
constexpr int kDepth = 32;

}  // namespace

extern "C" float switchyard_emu_e4m3_to_f32(uint8_t v) {
  const bool negative = (v & 0x80) != 0;
  const int exponent = (v >> 3) & 0xF;
  const int mantissa = v & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    // OCP E4M3 has no infinities; S.1111.111 is the only NaN encoding.
    return std::nanf("");
  } else if (exponent == 0) {
    // Subnormal: mantissa/8 * 2^(1 - 7).
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 7 - 3);
  }
  return negative ? -magnitude : magnitude;
}

extern "C" void switchyard_emu_mma_m16n8k32_e4m3_f32(const uint32_t a[32][4], const uint32_t b[32][2],
                                                     const float c[32][4], float d[32][4]) {
  float a_matrix[kRows][kDepth];
  float b_matrix[kDepth][kCols];
  float c_matrix[kRows][kCols];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2;
    const int thread_in_group = lane & 3;
    for (int i = 0; i < 16; ++i) {
      const int row = ((i < 4) || (i >= 8 && i < 12)) ? group : group + 8;
      const int col = thread_in_group * 4 + (i & 3) + (i >= 8 ? 16 : 0);
      const uint8_t code = static_cast<uint8_t>(a[lane][i >> 2] >> (8 * (i & 3)));
      a_matrix[row][col] = switchyard_emu_e4m3_to_f32(code);
    }
    for (int i = 0; i < 8; ++i) {
      const int row = thread_in_group * 4 + (i & 3) + (i >= 4 ? 16 : 0);
      const uint8_t code = static_cast<uint8_t>(b[lane][i >> 2] >> (8 * (i & 3)));
      b_matrix[row][group] = switchyard_emu_e4m3_to_f32(code);
    }
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? group : group + 8;
      const int col = thread_in_group * 2 + (i & 1);
      c_matrix[row][col] = c[lane][i];
    }
  }
  // Computed fully before d is written, so d may alias c.
  float d_matrix[kRows][kCols];
  for (int row = 0; row < kRows; ++row) {
    for (int col = 0; col < kCols; ++col) {
      float acc = c_matrix[row][col];
      for (int k = 0; k < kDepth; ++k) {
        // The product is exact, so a contracted FMA would round identically.
        acc += a_matrix[row][k] * b_matrix[k][col];
      }
      d_matrix[row][col] = acc;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2;
    const int thread_in_group = lane & 3;
    for (int i = 0; i < 4; ++i) {
      d[lane][i] = d_matrix[i < 2 ? group : group + 8][thread_in_group * 2 + (i & 1)];
    }
  }
}
