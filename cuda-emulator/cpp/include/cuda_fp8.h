// The CPU emulator's stand-in for CUDA's cuda_fp8.h: only what kernels/cuda/experts.cu uses, with exact conversions
// (every E4M3 and E5M2 value is a half, and every half is a float), so the emulated kernels compute what the GPU's
// hardware conversions compute. Found before the real header because build.rs puts cpp/include first and the real
// CUDA include directory not at all.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_emulation.h"

typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;

enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };

struct __half_raw {
    unsigned short x;
};
struct __half2_raw {
    unsigned short x, y;
};
struct __half {
    unsigned short bits;
};
struct __half2 {
    __half x, y;
};

// half bits -> float, exact.
static inline float switchyard_emu_half_to_float(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exponent = (h >> 10) & 0x1Fu;
    unsigned int mantissa = h & 0x3FFu;
    unsigned int bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        // Subnormal half: mantissa * 2^-24, exact in float.
        float value = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &value, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

// One FP8 code -> half bits, exact (E4M3: bias 7, no infinities, S.1111.111 the NaN; E5M2: the top byte of a half).
static inline unsigned short switchyard_emu_fp8_to_half_bits(unsigned char code, __nv_fp8_interpretation_t kind) {
    if (kind == __NV_E5M2) {
        return (unsigned short)(code << 8);
    }
    unsigned short sign = (unsigned short)((code & 0x80u) << 8);
    unsigned int exponent = (code >> 3) & 0xFu;
    unsigned int mantissa = code & 0x7u;
    if (exponent == 0xF && mantissa == 0x7) {
        return (unsigned short)(sign | 0x7FFFu);
    }
    if (exponent != 0) {
        return (unsigned short)(sign | ((exponent + 8u) << 10) | (mantissa << 7));
    }
    if (mantissa == 0) {
        return sign;
    }
    // Subnormal E4M3: mantissa * 2^-9, a normal half: shift the leading one into the implicit bit.
    int shift = 0;
    while ((mantissa & 0x4u) == 0) {
        mantissa <<= 1;
        ++shift;
    }
    // value = 1.m * 2^(-7 - shift); half exponent field = -7 - shift + 15.
    return (unsigned short)(sign | ((unsigned int)(8 - shift) << 10) | ((mantissa & 0x3u) << 8));
}

static inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t pair, __nv_fp8_interpretation_t kind) {
    __half2_raw out;
    out.x = switchyard_emu_fp8_to_half_bits((unsigned char)(pair & 0xFFu), kind);
    out.y = switchyard_emu_fp8_to_half_bits((unsigned char)(pair >> 8), kind);
    return out;
}

static inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t code, __nv_fp8_interpretation_t kind) {
    __half_raw out;
    out.x = switchyard_emu_fp8_to_half_bits(code, kind);
    return out;
}

static inline float2 __half22float2(__half2 h) {
    return float2{switchyard_emu_half_to_float(h.x.bits), switchyard_emu_half_to_float(h.y.bits)};
}

static inline float __half2float(__half h) { return switchyard_emu_half_to_float(h.bits); }

// float -> E4M3 as the hardware's cvt.rn.satfinite.e4m3x2.f32: round to nearest even; with __NV_SATFINITE values
// beyond the range (and infinities) saturate to +-448, NaN gives 0x7F; with __NV_NOSAT they give the NaN code.
static inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t saturate,
                                                       __nv_fp8_interpretation_t kind) {
    if (kind != __NV_E4M3) {
        // Not used by the kernels: fail the launch rather than guess.
        switchyard_emu_fail("__nv_cvt_float_to_fp8 to E5M2 is not emulated");
        return 0;
    }
    if (isnan(x)) {
        return 0x7F;
    }
    unsigned int bits;
    memcpy(&bits, &x, 4);
    unsigned char sign = (bits >> 31) ? 0x80 : 0;
    float magnitude = fabsf(x);
    if (magnitude > 448.0f) {
        // Beyond the largest finite value: round to nearest even first (464, the midpoint, goes to 448's even code).
        if (saturate == __NV_SATFINITE || magnitude <= 464.0f) {
            return sign | 0x7E;
        }
        return sign | 0x7F;
    }
    unsigned int mbits;
    memcpy(&mbits, &magnitude, 4);
    int exponent = (int)((mbits >> 23) & 0xFF) - 127;
    if (exponent >= -6) {
        unsigned int biased = (unsigned int)(exponent + 7);
        unsigned int mantissa = (mbits & 0x7FFFFFu) >> 20;
        unsigned int remainder = mbits & 0xFFFFFu;
        if (remainder > 0x80000u || (remainder == 0x80000u && (mantissa & 1u))) {
            mantissa += 1;
            if (mantissa == 8) {
                mantissa = 0;
                biased += 1;
            }
        }
        return sign | (unsigned char)(biased << 3) | (unsigned char)mantissa;
    }
    return sign | (unsigned char)rintf(magnitude * 512.0f);
}
