//! The portable path: plain Rust in 8-lane chunks with independent accumulators, which LLVM turns into the target
//! baseline's vector instructions (a single running sum would force sequential float adds).

use crate::fp8::E4M3_TO_F32;

const LANES: usize = 8;

#[inline]
fn reduce(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut total = reduce(acc);
    for (x, y) in a_tail.iter().zip(b_tail) {
        total += x * y;
    }
    total
}

pub(super) fn sum_squares(a: &[f32]) -> f32 {
    dot(a, a)
}

pub(super) fn sum(a: &[f32]) -> f32 {
    // Four 8-lane accumulators: enough independent adds to keep up with memory on a bandwidth test.
    let mut acc = [[0.0f32; LANES]; 4];
    let main = a.len() / (4 * LANES) * (4 * LANES);
    for chunk in a[..main].chunks_exact(4 * LANES) {
        for (j, part) in chunk.chunks_exact(LANES).enumerate() {
            for l in 0..LANES {
                acc[j][l] += part[l];
            }
        }
    }
    let mut total = (reduce(acc[0]) + reduce(acc[1])) + (reduce(acc[2]) + reduce(acc[3]));
    for v in &a[main..] {
        total += v;
    }
    total
}

pub(super) fn scale_mul(x: &[f32], s: f32, w: &[f32], out: &mut [f32]) {
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = (v * s) * g;
    }
}

pub(super) fn scale_in_place(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

pub(super) fn exp_shifted_sum(x: &mut [f32], max: f32) -> f32 {
    let mut total = 0.0f32;
    for v in x {
        *v = (*v - max).exp();
        total += *v;
    }
    total
}

pub(super) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

pub(super) fn fp8_dequant_row(codes: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = E4M3_TO_F32[c as usize] * scale;
    }
}

pub(super) fn fp8_dot_tokens<const T: usize>(codes: &[u8], xs: [&[f32]; T]) -> [f32; T] {
    let mut acc = [[0.0f32; LANES]; T];
    let main = codes.len() / LANES * LANES;
    let mut w = [0.0f32; LANES];
    for c in (0..main).step_by(LANES) {
        for l in 0..LANES {
            w[l] = E4M3_TO_F32[codes[c + l] as usize];
        }
        for t in 0..T {
            let x = &xs[t][c..c + LANES];
            for l in 0..LANES {
                acc[t][l] += x[l] * w[l];
            }
        }
    }
    let mut totals = [0.0f32; T];
    for t in 0..T {
        totals[t] = reduce(acc[t]);
        for c in main..codes.len() {
            totals[t] += xs[t][c] * E4M3_TO_F32[codes[c] as usize];
        }
    }
    totals
}

pub(super) fn amax(x: &[f32]) -> f32 {
    // `f32::max` ignores a NaN operand, so a NaN never enters an accumulator, as in the scalar fold.
    let mut acc = [0.0f32; LANES];
    let (main, tail) = x.split_at(x.len() / LANES * LANES);
    for chunk in main.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = acc[l].max(chunk[l].abs());
        }
    }
    let mut m = acc.iter().fold(0.0f32, |m, &v| m.max(v));
    for v in tail {
        m = m.max(v.abs());
    }
    m
}

/// `f32_to_e4m3(y)` without branches, so that loops over it vectorise; the steps are explained at
/// `avx2::e4m3_codes8`.
#[inline(always)]
pub(super) fn e4m3_code(y: f32) -> u8 {
    let bits = y.to_bits();
    let magnitude = bits & 0x7FFF_FFFF;
    let sign = (bits >> 24) & 0x80;
    let rounded = magnitude + 0x7_FFFF + ((magnitude >> 20) & 1);
    let normal = (rounded >> 20).wrapping_sub(120 << 3);
    let subnormal = (f32::from_bits(magnitude) + 16384.0).to_bits().wrapping_sub(0x4680_0000);
    let code = if magnitude >= 0x3C80_0000 { normal } else { subnormal };
    let code = code.min(0x7E) | sign;
    if magnitude > 0x7F80_0000 {
        0x7F
    } else {
        code as u8
    }
}

pub(super) fn fp8_encode_scaled(x: &[f32], inverse: f32, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = e4m3_code(v * inverse);
    }
}
