//! Every CUDA kernel, and the whole routed-expert layer, against the CPU kernels on random fresh inputs (never zeros).
//! Each test opens GPU 0 and, where there is none (no driver, no GPU, no CUDA headers), prints why and passes: these
//! run for real on the GPU machine (`scripts/gpu-check.sh`).
//!
//! Tolerances (docs/cuda.md has the reasoning at length):
//! - FP8 quantisation, the permutation, gather/scatter: exact (the same integer rounding, the same IEEE divisions).
//! - FP8 GEMMs: every product of two E4M3 values is exact in f32 (4-bit by 4-bit significands), so only the order of
//!   the f32 additions differs from the CPU's f64 reference. Recursive f32 summation of k terms errs by at most
//!   `gamma_k = k * u / (1 - k * u)` (u = 2^-24) times `sum |a_c * w_c|`; the CUDA-core streaming kernel is held to
//!   `(k + 4) * u` of that sum (the 4 for the two scale multiplications). FP8 tensor cores (cuBLASLt, the mma.sync
//!   streaming kernel) accumulate blocks of the k-sum with fewer bits before adding them in f32 (about 2^-14 relative
//!   per block on Hopper), so their allowance is `2^-12` of the same sum.
//! - SwiGLU: `expf` on the GPU and the CPU's exp differ by ulps, so re-quantised codes may differ by one step where a
//!   value sits on a rounding boundary: each decoded value within one E4M3 step (1/8 relative) and at most 0.1% of
//!   codes differing.
//! - The expert layer: its f32 outputs differ from the CPU path by the GEMM allowances above and by one-step flips of
//!   the re-quantised SwiGLU output wherever a value sits near a rounding boundary. With tensor-core accumulation
//!   (relative ~2^-14 per MMA) a few tenths of a percent of the codes can flip, each by one E4M3 step (1/16 to 1/8),
//!   which moves an output by about sqrt(0.004) / 12 ~ 5e-3 relative: relative RMS error at most 2e-2, and each
//!   output within 1/8 of `sum_c |h_c * w_c|` (the bound if every code flipped).
//! - RMS norm: f32 sum of squares against the f64 reference: `(dim + 8) * u` relative.
//! - RoPE: GPU `sincosf` and the CPU's f32 sin/cos are within 2 ulps each: `16 * u * (|a| + |b|)` per element.
//! - Paged attention: f32 online softmax against the CPU's f32 two-pass: `1e-4` of the largest |value| (n * u for
//!   up to 1000 keys is 6e-5), and `1e-4 * (1 + |lse|)` for the log-sum-exp. Over a bf16 pool the same bounds, against
//!   the CPU on the pool's values widened to f32: widening is exact and the kernel's arithmetic stays f32, so only
//!   the summation order differs, as over an f32 pool.
//! - Dense `linear`, F32 (cuBLASLt, CUBLAS_COMPUTE_32F, no TF32): products exact in f64, f32 summation in any order:
//!   `(k + 4) * u` of `sum |x_c * w_c|` (plus `|out|` when accumulating), as the CUDA-core FP8 kernel.
//! - Dense `linear`, Bf16: against the reference on the bf16-rounded x and w, products of two bf16 values are exact in
//!   f32 and only the summation errs; tensor cores may truncate instead of rounding when they add (Fasi et al.,
//!   "Numerical behavior of NVIDIA tensor cores", 2021), doubling the per-addition error: `2 * (k + 4) * u` of
//!   `sum |x_b * w_b|`. Against the unrounded f32 reference, each operand moves by at most 2^-8 relative (bf16's unit
//!   roundoff: an 8-bit significand), so each product by at most 2^-7 + 2^-16: `2^-7` of `sum |x * w|` plus the
//!   summation allowance (which exceeds 2^-16 for every k tested).
//! - bf16 conversion, embedding rows, residual add, row scaling, KV writes (f32, and bf16 bit for bit
//!   `f32_to_bf16_bits`): exact (the same single IEEE operation or a copy).
//! - SwiGLU (`silu_mul`): the GPU's `expf` (2 ulp) against the CPU kernel's exp (AVX2 polynomial, ~2e-7 relative, or
//!   libm), each followed by an add, a division and a multiplication rounded on both sides: `g / (1 + e)` moves by at
//!   most the relative error of `e`, so `32 * u` of |out| is a comfortable bound (plus 1e-30 absolute where exp
//!   overflows on one side only, near g = -88.7).

use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use switchyard_kernels::activation::{silu_mul, silu_mul_reference};
use switchyard_kernels::attention::{paged_attention, AttentionMask, AttentionShape, PagedKv};
use switchyard_kernels::device::gpu_bench::{GemmBenchConfig, GemmShape};
use switchyard_kernels::device::plan::{ExpertPlan, Fp8Expert, WarpgroupLaunch, WarpgroupStages, SMALL_M_MAX_TOKENS};
use switchyard_kernels::device::{
    bench_expert_gemm, bf16_bits_to_f32, f32_to_bf16_bits, CudaDevice, CudaSlice, CudaViewMut, DenseDtype, DenseWeight,
    ExpertScales, GpuExpertLayer, GroupedGemm, KvDtype, KvElement, KvWrite, PagedDecode,
};
use switchyard_kernels::fp8::{dequantize_rows, fake_quantize_rows, quantize_rows};
use switchyard_kernels::matmul::{matmul_f32_reference, matmul_fp8, matmul_fp8_reference, Fp8Weight};
use switchyard_kernels::norm::rms_norm_reference;
use switchyard_kernels::rope::rope_interleaved_in_place;
use switchyard_kernels::KernelError;

// The unit tests' seeded data helpers, shared rather than copied (the module is private to the crate's own tests).
#[allow(dead_code)]
#[path = "../src/testing.rs"]
mod testing;
use testing::{fp8_codes, rng, uniform};

const U: f64 = 1.0 / 16_777_216.0; // 2^-24, the f32 unit roundoff

/// GPU 0, or `None` after printing why it cannot be used here.
fn gpu(test: &str) -> Option<Arc<CudaDevice>> {
    match CudaDevice::new(0) {
        Ok(device) => Some(device),
        Err(
            reason @ (KernelError::CudaUnavailable { .. }
            | KernelError::NoSuchGpu { .. }
            | KernelError::CudaIncludeNotFound { .. }),
        ) => {
            println!("SKIPPED {test}: no usable GPU: {reason}");
            None
        }
        Err(other) => panic!("{test}: opening GPU 0 failed: {other}"),
    }
}

/// The GPU for a test of Hopper's wgmma, or `None` with a printed reason (no GPU, or one without wgmma).
fn hopper(test: &str) -> Option<Arc<CudaDevice>> {
    let device = gpu(test)?;
    if device.arch() != "compute_90" {
        println!("SKIPPED {test}: wgmma is Hopper's (compute_90); this GPU is {}", device.arch());
        return None;
    }
    Some(device)
}

fn positive_scales(rng: &mut ChaCha8Rng, len: usize, around: f32) -> Vec<f32> {
    (0..len).map(|_| around * rng.random_range(0.5f32..1.5)).collect()
}

/// `sum_c |x[i, c]| * |w[o, c]| * scale[o]` for every output: the magnitude the summation error is relative to.
fn magnitude(x: &[f32], m: usize, weight: &Fp8Weight<'_>) -> Vec<f32> {
    let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let abs_codes: Vec<u8> = weight.codes.iter().map(|c| c & 0x7F).collect();
    let mut out = vec![0.0; m * weight.rows];
    let abs_weight = Fp8Weight { codes: &abs_codes, ..*weight };
    matmul_fp8_reference(&abs_x, m, abs_weight, &mut out).expect("magnitude");
    out
}

#[track_caller]
fn assert_within(got: &[f32], want: &[f32], bound: impl Fn(usize) -> f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let error = (f64::from(g) - f64::from(w)).abs();
        assert!(error <= bound(i), "{what}: element {i}: got {g}, want {w}, error {error:e} > bound {:e}", bound(i));
    }
}

#[test]
fn quantize_rows_matches_the_cpu_bit_for_bit() {
    let Some(device) = gpu("quantize_rows") else { return };
    let mut r = rng(1);
    for (rows, cols) in [(37, 5120), (3, 1000), (1, 8192)] {
        let mut x = uniform(&mut r, rows * cols, 3.0);
        // Awkward rows: all zeros (scale 1), one NaN (left out of amax, coded 0x7F), one huge value.
        x[..cols].fill(0.0);
        if rows > 2 {
            x[cols + 5] = f32::NAN;
            x[2 * cols + 7] = 1.0e30;
        }
        let (mut want_q, mut want_s) = (vec![0u8; rows * cols], vec![0f32; rows]);
        quantize_rows(&x, cols, &mut want_q, &mut want_s);
        let x_dev = device.upload(&x).expect("upload");
        let mut q = device.zeros::<u8>(rows * cols).expect("alloc");
        let mut s = device.zeros::<f32>(rows).expect("alloc");
        device
            .quantize_rows(&x_dev.as_view(), rows, cols, &mut q.as_view_mut(), &mut s.as_view_mut())
            .expect("quantize");
        assert_eq!(device.download(&s).expect("scales"), want_s, "scales {rows}x{cols}");
        let got_q = device.download(&q).expect("codes");
        let first_difference = got_q.iter().zip(&want_q).position(|(g, w)| g != w);
        assert_eq!(first_difference, None, "codes {rows}x{cols}: first difference");
    }
}

#[test]
fn permute_plan_gather_and_scatter_match_the_host_plan() {
    let Some(device) = gpu("permute_plan") else { return };
    let mut r = rng(2);
    let (rows, experts, cols) = (1000, 16, 96);
    let routed: Vec<u32> = (0..rows).map(|_| r.random_range(0..experts as u32)).collect();
    let plan = ExpertPlan::new(&routed, experts).expect("plan");
    let routed_dev = device.upload(&routed).expect("upload");
    let mut offsets = device.zeros::<u32>(experts + 1).expect("alloc");
    let mut slot_row = device.zeros::<u32>(rows).expect("alloc");
    device
        .permute_plan(&routed_dev.as_view(), experts, &mut offsets.as_view_mut(), &mut slot_row.as_view_mut())
        .expect("permute_plan");
    assert_eq!(device.download(&offsets).expect("offsets"), plan.offsets);
    assert_eq!(device.download(&slot_row).expect("slot_row"), plan.slot_row);

    let x = uniform(&mut r, rows * cols, 1.0);
    let x_dev = device.upload(&x).expect("upload");
    let mut gathered = device.zeros::<f32>(rows * cols).expect("alloc");
    device.gather_rows(&x_dev.as_view(), &slot_row.as_view(), cols, &mut gathered.as_view_mut()).expect("gather");
    let got = device.download(&gathered).expect("download");
    for (slot, &row) in plan.slot_row.iter().enumerate() {
        let row = row as usize;
        assert_eq!(got[slot * cols..(slot + 1) * cols], x[row * cols..(row + 1) * cols], "slot {slot}");
    }
    let mut back = device.zeros::<f32>(rows * cols).expect("alloc");
    device
        .scatter_rows(&gathered.as_view(), &slot_row.as_view(), cols, &mut back.as_view_mut(), None)
        .expect("scatter");
    assert_eq!(device.download(&back).expect("download"), x);

    // The combine's form: each value times its slot's scale and its expert's column scale.
    let a_scale = positive_scales(&mut r, rows, 1.0);
    let w_scale = positive_scales(&mut r, experts * cols, 1.0);
    let (a_scale_dev, w_scale_dev) =
        (device.upload(&a_scale).expect("upload"), device.upload(&w_scale).expect("upload"));
    let scales =
        ExpertScales { a_scale: &a_scale_dev.as_view(), w_scale: &w_scale_dev.as_view(), offsets: &offsets.as_view() };
    device
        .scatter_rows(&gathered.as_view(), &slot_row.as_view(), cols, &mut back.as_view_mut(), Some(&scales))
        .expect("scaled scatter");
    let got = device.download(&back).expect("download");
    for (slot, &row) in plan.slot_row.iter().enumerate() {
        let (row, expert) = (row as usize, routed[row as usize] as usize);
        let want: Vec<f32> =
            (0..cols).map(|c| x[row * cols + c] * w_scale[expert * cols + c] * a_scale[slot]).collect();
        assert_eq!(got[row * cols..(row + 1) * cols], want, "scaled slot {slot}");
    }
    let short = ExpertScales { a_scale: &a_scale_dev.slice(..rows - 1), ..scales };
    let err = device
        .scatter_rows(&gathered.as_view(), &slot_row.as_view(), cols, &mut back.as_view_mut(), Some(&short))
        .expect_err("a_scale one short");
    assert!(err.to_string().contains("a_scale"), "{err}");
}

#[test]
fn silu_mul_quantize_matches_the_cpu_within_one_fp8_step() {
    let Some(device) = gpu("silu_mul_quantize") else { return };
    let mut r = rng(3);
    let (rows, inter) = (19, 8192);
    let gate_up = uniform(&mut r, rows * 2 * inter, 6.0);
    let mut activated = vec![0.0; rows * inter];
    for row in 0..rows {
        let base = row * 2 * inter;
        silu_mul(
            &gate_up[base..base + inter],
            &gate_up[base + inter..base + 2 * inter],
            &mut activated[row * inter..(row + 1) * inter],
        )
        .expect("silu_mul");
    }
    let (mut want_q, mut want_s) = (vec![0u8; rows * inter], vec![0f32; rows]);
    quantize_rows(&activated, inter, &mut want_q, &mut want_s);
    let input = device.upload(&gate_up).expect("upload");
    let mut q = device.zeros::<u8>(rows * inter).expect("alloc");
    let mut s = device.zeros::<f32>(rows).expect("alloc");
    device
        .silu_mul_quantize(&input.as_view(), rows, inter, None, &mut q.as_view_mut(), &mut s.as_view_mut())
        .expect("swiglu");
    let (got_q, got_s) = (device.download(&q).expect("codes"), device.download(&s).expect("scales"));
    // The same values as raw GEMM sums and the scales that make them (three experts over the rows, one empty):
    // the kernel scales each value as the grouped GEMM would have, so the codes must come out the same.
    let offsets = [0u32, 7, 7, rows as u32];
    let expert_of = |row: usize| offsets.iter().rposition(|&o| o as usize <= row).expect("an expert");
    let a_scale = positive_scales(&mut r, rows, 1.0);
    let w_scale = positive_scales(&mut r, 3 * 2 * inter, 1.0);
    let raw: Vec<f32> = (0..rows * 2 * inter)
        .map(|i| {
            let (row, column) = (i / (2 * inter), i % (2 * inter));
            gate_up[i] / (w_scale[expert_of(row) * 2 * inter + column] * a_scale[row])
        })
        .collect();
    let (raw_dev, offsets_dev) = (device.upload(&raw).expect("upload"), device.upload(&offsets).expect("upload"));
    let (a_scale_dev, w_scale_dev) =
        (device.upload(&a_scale).expect("upload"), device.upload(&w_scale).expect("upload"));
    let scales = ExpertScales {
        a_scale: &a_scale_dev.as_view(),
        w_scale: &w_scale_dev.as_view(),
        offsets: &offsets_dev.as_view(),
    };
    let (mut q_scaled, mut s_scaled) =
        (device.zeros::<u8>(rows * inter).expect("alloc"), device.zeros::<f32>(rows).expect("alloc"));
    device
        .silu_mul_quantize(
            &raw_dev.as_view(),
            rows,
            inter,
            Some(&scales),
            &mut q_scaled.as_view_mut(),
            &mut s_scaled.as_view_mut(),
        )
        .expect("swiglu on raw sums");
    let scaled_q = device.download(&q_scaled).expect("codes");
    let differing = scaled_q.iter().zip(&got_q).filter(|(a, b)| a != b).count();
    assert!(differing * 1000 <= got_q.len(), "raw sums scaled in the kernel: {differing} codes differ");
    assert_within(&got_s, &want_s, |i| 4.0 * U * f64::from(want_s[i]), "scales");
    let (mut got, mut want) = (vec![0.0; rows * inter], vec![0.0; rows * inter]);
    dequantize_rows(&got_q, inter, &got_s, &mut got);
    dequantize_rows(&want_q, inter, &want_s, &mut want);
    assert_within(&got, &want, |i| f64::from(want[i].abs()) / 8.0 + 1e-3 * f64::from(want_s[i / inter]), "values");
    let differing = got_q.iter().zip(&want_q).filter(|(g, w)| g != w).count();
    assert!(differing * 1000 <= got_q.len(), "{differing} of {} codes differ", got_q.len());
}

/// The grouped GEMM (streaming kernel for small experts, cuBLASLt + epilogue for the large one) against the CPU's
/// f64 reference, one expert per group of tokens.
#[test]
fn fp8_grouped_gemm_matches_the_cpu_reference() {
    let Some(device) = gpu("fp8_grouped_gemm") else { return };
    let mut r = rng(4);
    let (experts, n, k) = (6, 272, 1024);
    // Expert 1: none; 2 and 3: the streaming kernel's one and two 8-token tiles (partly filled); 0, 4 and 5: above
    // its threshold, cuBLASLt (the streaming kernels' three- and four-tile cases run on their own further down).
    let counts = [SMALL_M_MAX_TOKENS + 9, 0, 1, 12, 21, 32];
    let mut routed: Vec<u32> = counts.iter().enumerate().flat_map(|(e, &c)| std::iter::repeat_n(e as u32, c)).collect();
    // Shuffle so the plan's permutation is not the identity.
    for i in (1..routed.len()).rev() {
        routed.swap(i, r.random_range(0..=i));
    }
    let plan = ExpertPlan::new(&routed, experts).expect("plan");
    let slots = routed.len();
    let codes = fp8_codes(&mut r, experts * n * k);
    let w_scale = positive_scales(&mut r, experts * n, 1.0 / 448.0);
    let a_codes = fp8_codes(&mut r, slots * k);
    let a_scale = positive_scales(&mut r, slots, 1.0 / 448.0);

    let offsets = device.upload(&plan.offsets).expect("upload");
    let (a_dev, a_scale_dev) = (device.upload(&a_codes).expect("upload"), device.upload(&a_scale).expect("upload"));
    let (w_dev, w_scale_dev) = (device.upload(&codes).expect("upload"), device.upload(&w_scale).expect("upload"));
    let mut out = device.zeros::<f32>(slots * n).expect("alloc");
    let gemm = GroupedGemm {
        a: &a_dev.as_view(),
        a_scale: &a_scale_dev.as_view(),
        offsets: &offsets.as_view(),
        w: &w_dev.as_view(),
        w_scale: &w_scale_dev.as_view(),
        n,
        k,
        apply_scales: true,
    };
    device.fp8_grouped_gemm(&plan, &gemm, &mut out.as_view_mut()).expect("grouped gemm");
    let got = device.download(&out).expect("download");
    // Raw sums (the expert layer's form): the scaled output divided by both scales, to rounding.
    let mut raw = device.zeros::<f32>(slots * n).expect("alloc");
    let raw_gemm = GroupedGemm { apply_scales: false, ..gemm };
    device.fp8_grouped_gemm(&plan, &raw_gemm, &mut raw.as_view_mut()).expect("raw grouped gemm");
    let raw = device.download(&raw).expect("download");
    // The raw GEMM of an expert left to cuBLASLt runs the algorithm tuned for its token bucket, which may add in
    // another order than the scaled GEMM's (the heuristic's choice): those are checked against the reference below.
    for e in (0..experts).filter(|&e| plan.tokens(e) <= SMALL_M_MAX_TOKENS) {
        for slot in plan.offsets[e] as usize..plan.offsets[e + 1] as usize {
            for o in 0..n {
                let (scaled, raw) = (got[slot * n + o], raw[slot * n + o] * w_scale[e * n + o] * a_scale[slot]);
                assert!(
                    (scaled - raw).abs() <= 4.0 * f32::EPSILON * scaled.abs(),
                    "raw sum [{slot}, {o}]: {raw} vs {scaled}"
                );
            }
        }
    }
    // The raw cuBLASLt GEMMs (experts of 25, 21 and 32 tokens) were tuned for their bucket of 32 on that first call:
    // every candidate that passed cuBLASLt's check timed, the fastest kept, and the next call runs it without timing
    // again.
    let tunings = device.cublaslt_tunings().expect("tunings");
    let [tuning] = &tunings[..] else { panic!("one tuning: {tunings:?}") };
    assert_eq!((tuning.n, tuning.k, tuning.tokens), (n, k, 32), "{tuning:?}");
    println!("cuBLASLt tuning: {tuning:?}");
    if tuning.candidates > 1 {
        let (heuristic, tuned) = (tuning.heuristic_us.expect("timed"), tuning.tuned_us.expect("timed"));
        assert!(tuned > 0.0 && tuned <= heuristic, "{tuning:?}");
        // The report's runners-up (timed in this process, not read from the cache) come after the choice, in order.
        let times: Vec<f64> = std::iter::once(tuned).chain(tuning.runners_up.iter().map(|(_, us)| *us)).collect();
        assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "{tuning:?}");
        assert!(tuning.cached || !tuning.runners_up.is_empty(), "{tuning:?}");
    }
    let mut again = device.zeros::<f32>(slots * n).expect("alloc");
    device.fp8_grouped_gemm(&plan, &raw_gemm, &mut again.as_view_mut()).expect("raw grouped gemm");
    assert_eq!(device.download(&again).expect("download"), raw, "the same algorithm on the next call");
    assert_eq!(device.cublaslt_tunings().expect("tunings"), tunings, "tuned once");

    // Which way cuBLASLt took the row-wise scales on this machine (fused outer-vector scales or the epilogue).
    let (first, tokens) = (plan.offsets[0] as usize, plan.tokens(0));
    let mut probe = device.zeros::<f32>(tokens * n).expect("alloc");
    let fused = device
        .fp8_gemm_cublaslt_scaled(
            &a_dev.slice(first * k..(first + tokens) * k),
            &a_scale_dev.slice(first..first + tokens),
            &w_dev.slice(..n * k),
            &w_scale_dev.slice(..n),
            tokens,
            n,
            k,
            &mut probe.as_view_mut(),
        )
        .expect("scaled cuBLASLt");
    println!("cuBLASLt row-wise scales: {}", if fused { "fused (outer-vector scale mode)" } else { "epilogue kernel" });
    assert_eq!(
        device.download(&probe).expect("download"),
        got[first * n..(first + tokens) * n],
        "same call, same bits"
    );

    // The streaming kernels on their own (the grouped call used one of them for the small experts): the CUDA-core
    // one, and the tensor-core one with each of its tile counts (8, 16, 32 tokens), which computes the experts up to
    // its limit and leaves the others' rows alone.
    let run_small = |mma: bool, max_tokens: usize| -> Vec<f32> {
        let mut out = device.zeros::<f32>(slots * n).expect("alloc");
        if mma {
            device.fp8_grouped_gemm_mma(&gemm, max_tokens, &mut out.as_view_mut())
        } else {
            device.fp8_grouped_gemm_small(&gemm, max_tokens, &mut out.as_view_mut())
        }
        .expect("streaming kernel");
        device.download(&out).expect("download")
    };
    let simt = run_small(false, SMALL_M_MAX_TOKENS);
    let mma: Vec<(usize, Vec<f32>)> = [8, 16, 32].into_iter().map(|max| (max, run_small(true, max))).collect();

    let mut a = vec![0.0; slots * k];
    dequantize_rows(&a_codes, k, &a_scale, &mut a);
    // f32 accumulation on the CUDA cores: (k + 4) u of sum |a w|. Tensor cores (cuBLASLt, mma.sync) accumulate FP8
    // products with fewer bits before promoting to f32: 2^-12 of the same sum.
    let simt_allowance = (k as f64 + 4.0) * U;
    let tensor_allowance = 1.0 / 4096.0;
    for e in 0..experts {
        let (first, tokens) = (plan.offsets[e] as usize, plan.tokens(e));
        if tokens == 0 {
            continue;
        }
        let weight = Fp8Weight {
            codes: &codes[e * n * k..(e + 1) * n * k],
            scales: &w_scale[e * n..(e + 1) * n],
            rows: n,
            cols: k,
        };
        let x = &a[first * k..(first + tokens) * k];
        let mut want = vec![0.0; tokens * n];
        matmul_fp8_reference(x, tokens, weight, &mut want).expect("reference");
        let size = magnitude(x, tokens, &weight);
        let rows = first * n..(first + tokens) * n;
        let check = |got: &[f32], allowance: f64, what: &str| {
            assert_within(
                got,
                &want,
                |i| allowance * f64::from(size[i]) + f64::from(f32::MIN_POSITIVE),
                &format!("expert {e} ({tokens} tokens, {what})"),
            )
        };
        let path = if tokens > SMALL_M_MAX_TOKENS { "cuBLASLt" } else { "grouped streaming" };
        check(&got[rows.clone()], tensor_allowance, path);
        let raw_scaled: Vec<f32> = rows.clone().map(|i| raw[i] * w_scale[e * n + i % n] * a_scale[i / n]).collect();
        check(&raw_scaled, tensor_allowance, &format!("{path}, raw sums"));
        if tokens <= SMALL_M_MAX_TOKENS {
            check(&simt[rows.clone()], simt_allowance, "CUDA-core streaming kernel");
        } else {
            // Experts above the threshold are left to cuBLASLt: the streaming kernels must not touch their rows.
            assert!(simt[rows.clone()].iter().all(|&v| v == 0.0), "expert {e} rows written");
        }
        for (max, out) in &mma {
            if tokens <= *max {
                check(&out[rows.clone()], tensor_allowance, &format!("tensor-core streaming kernel, {max} tokens"));
            } else {
                assert!(out[rows.clone()].iter().all(|&v| v == 0.0), "expert {e} rows written ({max}-token kernel)");
            }
        }
    }
}

/// A cuBLASLt tuning is written to the tuning cache and read back by the next device of the same kind (as a restarted
/// worker would), whose GEMM then runs the same algorithm without timing again.
#[test]
fn cublaslt_tunings_are_cached_for_the_next_process() {
    let Some(first) = gpu("cublaslt_tunings_are_cached_for_the_next_process") else { return };
    // A shape no other test tunes, so that this test's first device tunes it (or finds it from an earlier run).
    let (experts, n, k, tokens) = (2, 208, 96, 20);
    let mut r = rng(12);
    let codes = first.upload(&fp8_codes(&mut r, experts * n * k)).expect("upload");
    first.tune_fp8_expert_gemm(n, k, tokens, &codes.as_view(), experts).expect("tune");
    let [tuned] = &first.cublaslt_tunings().expect("tunings")[..] else { panic!("one tuning") };
    assert_eq!((tuned.n, tuned.k, tuned.tokens), (n, k, 32), "{tuned:?}");
    // The cache only saves time: where it is off or cannot be written, there is nothing for the next device to read.
    let writable = switchyard_kernels::device::tuning_cache::tuning_cache_dir().is_some_and(|dir| {
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        let written = std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&probe, b"").is_ok();
        let _ = std::fs::remove_file(&probe);
        written
    });
    if !writable {
        println!("cublaslt_tunings_are_cached_for_the_next_process: no writable tuning cache, nothing to read back");
        return;
    }
    let next = gpu("cublaslt_tunings_are_cached_for_the_next_process").expect("the GPU again");
    let codes = next.upload(&fp8_codes(&mut rng(12), experts * n * k)).expect("upload");
    next.tune_fp8_expert_gemm(n, k, tokens, &codes.as_view(), experts).expect("tune");
    let [again] = &next.cublaslt_tunings().expect("tunings")[..] else { panic!("one tuning") };
    assert!(again.cached, "read from the cache: {again:?}");
    assert_eq!(
        (&again.tuned, again.tuned_us, again.candidates),
        (&tuned.tuned, tuned.tuned_us, tuned.candidates),
        "the same choice"
    );
}

/// The lone-expert kernel (one expert over the whole GPU, stream-K) against the CPU's f64 reference: every tile
/// count, partly filled tiles, grids where every row block is split over several blocks, where some are whole in one
/// block and where one block takes everything (see [`check_one_expert_kernel`]).
#[test]
fn fp8_lone_expert_gemm_matches_the_cpu_reference() {
    let Some(device) = gpu("fp8_lone_expert_gemm") else { return };
    // None: the default grid (more blocks than units here: one unit each, every row block split 8 ways).
    let grids = [None, Some(1), Some(2), Some(5), Some(7)];
    check_one_expert_kernel(
        &device,
        11,
        &[1, 8, 9, 16, 21, 32],
        &grids,
        33,
        |gemm, expert, first, tokens, grid, out| device.fp8_lone_expert_gemm(gemm, expert, first, tokens, grid, out),
    );
}

/// The warpgroup expert kernel (Hopper's wgmma, stream-K) as the lone-expert kernel above: one token, a partly
/// filled and a full 128-token tile, both ring depths, grids that split every row block, some, or none (one block
/// for everything; one block per unit). Only on compute capability 9.0 (the emulator's too): wgmma is Hopper's.
#[test]
fn fp8_warpgroup_expert_gemm_matches_the_cpu_reference() {
    let Some(device) = hopper("fp8_warpgroup_expert_gemm") else { return };
    let launch = |stages, blocks| WarpgroupLaunch { stages, blocks };
    let (three, six) = (WarpgroupStages::Three, WarpgroupStages::Six);
    // 24 units: 1 block; 5 (every row block split); 6 (row blocks whole, four blocks each); 24 (one unit each).
    let grids = [launch(six, 1), launch(three, 5), launch(six, 6), launch(three, 24)];
    check_one_expert_kernel(&device, 13, &[1, 40, 128], &grids, 129, |gemm, expert, first, tokens, grid, out| {
        device.fp8_warpgroup_expert_gemm(gemm, expert, first, tokens, grid, out)
    });
}

/// A one-expert kernel (`run`: expert, first slot, tokens, grid) against the CPU's f64 reference on expert 1 of three
/// (3 row blocks of 128 rows x 8 chunks of 128 columns: 24 units), for each token count and grid, with scaled and raw
/// sums: the other experts' rows are left alone, and the same launch gives the same bits again (the partials are
/// added in a fixed order, and the arrival counters are back at zero after each launch). `too_many` tokens, an expert
/// past the last and slots past the end are refused before launching.
fn check_one_expert_kernel<G: Copy + std::fmt::Debug>(
    device: &CudaDevice,
    seed: u64,
    token_counts: &[usize],
    grids: &[G],
    too_many: usize,
    run: impl Fn(&GroupedGemm<'_, '_>, usize, usize, usize, G, &mut CudaViewMut<'_, f32>) -> Result<(), KernelError>,
) {
    let mut r = rng(seed);
    let (experts, n, k) = (3, 384, 1024);
    let codes = fp8_codes(&mut r, experts * n * k);
    let w_scale = positive_scales(&mut r, experts * n, 1.0 / 448.0);
    let (w_dev, w_scale_dev) = (device.upload(&codes).expect("upload"), device.upload(&w_scale).expect("upload"));
    let expert = 1;
    let weight = Fp8Weight { codes: &codes[n * k..2 * n * k], scales: &w_scale[n..2 * n], rows: n, cols: k };
    for &tokens in token_counts {
        // Expert 0 has 3 slots before expert 1's, expert 2 has 2 after.
        let counts = [3, tokens, 2];
        let routed: Vec<u32> = counts.iter().enumerate().flat_map(|(e, &c)| std::iter::repeat_n(e as u32, c)).collect();
        let plan = ExpertPlan::new(&routed, experts).expect("plan");
        let (first, slots) = (plan.offsets[expert] as usize, routed.len());
        let a_codes = fp8_codes(&mut r, slots * k);
        let a_scale = positive_scales(&mut r, slots, 1.0 / 448.0);
        let offsets = device.upload(&plan.offsets).expect("upload");
        let (a_dev, a_scale_dev) = (device.upload(&a_codes).expect("upload"), device.upload(&a_scale).expect("upload"));
        let mut a = vec![0.0; slots * k];
        dequantize_rows(&a_codes, k, &a_scale, &mut a);
        let x = &a[first * k..(first + tokens) * k];
        let mut want = vec![0.0; tokens * n];
        matmul_fp8_reference(x, tokens, weight, &mut want).expect("reference");
        let size = magnitude(x, tokens, &weight);
        for apply_scales in [true, false] {
            let gemm = GroupedGemm {
                a: &a_dev.as_view(),
                a_scale: &a_scale_dev.as_view(),
                offsets: &offsets.as_view(),
                w: &w_dev.as_view(),
                w_scale: &w_scale_dev.as_view(),
                n,
                k,
                apply_scales,
            };
            for &grid in grids {
                let launch = || {
                    let mut out = device.zeros::<f32>(slots * n).expect("alloc");
                    run(&gemm, expert, first, tokens, grid, &mut out.as_view_mut()).expect("one-expert gemm");
                    device.download(&out).expect("download")
                };
                let got = launch();
                let what = format!("{tokens} tokens, grid {grid:?}, scaled {apply_scales}");
                let rows = first * n..(first + tokens) * n;
                assert!(
                    got[..rows.start].iter().chain(&got[rows.end..]).all(|&v| v == 0.0),
                    "{what}: other experts' rows written"
                );
                let unscale = |i: usize| {
                    if apply_scales {
                        1.0
                    } else {
                        w_scale[n + i % n] * a_scale[first + i / n]
                    }
                };
                let scaled: Vec<f32> = got[rows].iter().enumerate().map(|(i, &v)| v * unscale(i)).collect();
                assert_within(&scaled, &want, |i| f64::from(size[i]) / 4096.0 + 1e-30, &what);
                assert_eq!(launch(), got, "{what}: a second launch gives other bits");
            }
            // What the kernel cannot take is refused before launching.
            let mut out = device.zeros::<f32>(slots * n).expect("alloc");
            let too_many_tokens = format!("tokens = {too_many}");
            let past_the_slots = format!("slots {}..{}", slots - 4, slots + 4);
            for (expert, first, tokens, what) in [
                (1, 0, too_many, too_many_tokens.as_str()),
                (3, 0, 8, "expert 3"),
                (1, slots - 4, 8, past_the_slots.as_str()),
            ] {
                let err = run(&gemm, expert, first, tokens, grids[0], &mut out.as_view_mut()).expect_err(what);
                assert!(err.to_string().contains(what), "{err}");
            }
        }
    }
}

/// One Hopper wgmma (hopper.cu's probe) against the CPU: the A register fragment, the D layout and the reading of
/// B's shared-memory descriptor that a wgmma kernel would rest on. Variant 0 is the descriptor as the PTX ISA is read
/// here (and as the emulator implements it); variant 1, its two offsets swapped, is printed too, so that a GPU that
/// disagrees says how. GPUs other than compute capability 9.0 have no wgmma: the test says so and passes.
#[test]
fn wgmma_layouts_match_the_reference() {
    let Some(device) = hopper("wgmma_layouts") else { return };
    let mut r = rng(12);
    let (a, b) = (fp8_codes(&mut r, 64 * 32), fp8_codes(&mut r, 128 * 32));
    let decode = |codes: &[u8]| -> Vec<f32> {
        let mut values = vec![0.0; codes.len()];
        dequantize_rows(codes, 32, &vec![1.0; codes.len() / 32], &mut values);
        values
    };
    let (a_values, b_values) = (decode(&a), decode(&b));
    let mut want = vec![0.0f32; 64 * 128];
    let mut size = vec![0.0f32; 64 * 128];
    for m in 0..64 {
        for n in 0..128 {
            let pairs = (0..32).map(|k| (a_values[m * 32 + k], b_values[n * 32 + k]));
            want[m * 128 + n] = pairs.clone().map(|(x, y)| f64::from(x) * f64::from(y)).sum::<f64>() as f32;
            size[m * 128 + n] = pairs.map(|(x, y)| (x * y).abs()).sum();
        }
    }
    let errors: Vec<(u32, usize)> = [0u32, 1]
        .into_iter()
        .map(|variant| {
            let got = device.wgmma_probe(&a, &b, variant).expect("wgmma probe");
            let wrong: Vec<usize> = (0..got.len())
                .filter(|&i| f64::from((got[i] - want[i]).abs()) > f64::from(size[i]) / 4096.0 + 1e-30)
                .collect();
            if let Some(&first) = wrong.first() {
                println!(
                    "wgmma variant {variant}: {} of 8192 outputs wrong; first [{}, {}]: got {}, want {}",
                    wrong.len(),
                    first / 128,
                    first % 128,
                    got[first],
                    want[first]
                );
                // Where the wrong values belong, if anywhere: tells a misread fragment layout from a misread
                // descriptor on a GPU that disagrees.
                for &i in wrong.iter().take(4) {
                    let matches: Vec<(usize, usize)> = (0..want.len())
                        .filter(|&j| f64::from((got[i] - want[j]).abs()) <= f64::from(size[j]) / 4096.0 + 1e-30)
                        .map(|j| (j / 128, j % 128))
                        .take(4)
                        .collect();
                    println!("  got [{}, {}] = {} matches want at {matches:?}", i / 128, i % 128, got[i]);
                }
            } else {
                println!("wgmma variant {variant}: all 8192 outputs right");
            }
            (variant, wrong.len())
        })
        .collect();
    assert_eq!(errors[0], (0, 0), "the descriptor as read here must be the GPU's: {errors:?}");
    assert!(errors[1].1 > 0, "the swapped descriptor must read other values");
    assert!(device.wgmma_probe(&a, &b[..100], 0).expect_err("short b").to_string().contains("b"));
}

/// The whole routed-expert layer on the GPU against the CPU path with per-token FP8 activations (what
/// `ExpertWeights::forward` does with `ActivationPrecision::Fp8PerToken`).
#[test]
fn expert_layer_matches_the_cpu_fp8_path() {
    let Some(device) = gpu("expert_layer") else { return };
    let mut r = rng(5);
    let (experts, hidden, inter) = (6, 512, 768);
    struct Owned {
        codes: [Vec<u8>; 3],
        scales: [Vec<f32>; 3],
    }
    let owned: Vec<Owned> = (0..experts)
        .map(|_| Owned {
            codes: [
                fp8_codes(&mut r, inter * hidden),
                fp8_codes(&mut r, inter * hidden),
                fp8_codes(&mut r, hidden * inter),
            ],
            scales: [
                positive_scales(&mut r, inter, 0.02 / 448.0),
                positive_scales(&mut r, inter, 0.02 / 448.0),
                positive_scales(&mut r, hidden, 0.02 / 448.0),
            ],
        })
        .collect();
    let weights: Vec<Fp8Expert<'_>> = owned
        .iter()
        .map(|o| Fp8Expert {
            gate: Fp8Weight { codes: &o.codes[0], scales: &o.scales[0], rows: inter, cols: hidden },
            up: Fp8Weight { codes: &o.codes[1], scales: &o.scales[1], rows: inter, cols: hidden },
            down: Fp8Weight { codes: &o.codes[2], scales: &o.scales[2], rows: hidden, cols: inter },
        })
        .collect();
    let layer = GpuExpertLayer::upload(&device, &weights).expect("upload");
    assert_eq!(layer.experts(), experts);
    // Expert 1 gets more tokens than the streaming threshold (cuBLASLt's bucket of 32, where the lone-expert kernel
    // competes); expert 5 more than the lone-expert kernel takes (the bucket of 64, where the warpgroup kernel
    // competes on Hopper); expert 4 none.
    let mut routed: Vec<u32> = std::iter::repeat_n(1, SMALL_M_MAX_TOKENS + 3).collect();
    routed.extend(std::iter::repeat_n(5, 40));
    routed.extend((0..40).map(|_| [0u32, 2, 3][r.random_range(0..3)]));
    for i in (1..routed.len()).rev() {
        routed.swap(i, r.random_range(0..=i));
    }
    let rows = routed.len();
    let inputs = uniform(&mut r, rows * hidden, 2.0);
    let got = layer.forward(&inputs, &routed).expect("gpu forward");

    let mut want = vec![0.0; rows * hidden];
    let mut bound = vec![0.0; rows * hidden];
    for (row, &expert) in routed.iter().enumerate() {
        let w = &weights[expert as usize];
        let mut x = inputs[row * hidden..(row + 1) * hidden].to_vec();
        fake_quantize_rows(&mut x, hidden);
        let (mut gate, mut up) = (vec![0.0; inter], vec![0.0; inter]);
        matmul_fp8(&x, 1, w.gate, &mut gate).expect("gate");
        matmul_fp8(&x, 1, w.up, &mut up).expect("up");
        let mut h = vec![0.0; inter];
        silu_mul(&gate, &up, &mut h).expect("silu");
        fake_quantize_rows(&mut h, inter);
        matmul_fp8(&h, 1, w.down, &mut want[row * hidden..(row + 1) * hidden]).expect("down");
        bound[row * hidden..(row + 1) * hidden].copy_from_slice(&magnitude(&h, 1, &w.down));
    }
    assert_within(&got, &want, |i| f64::from(bound[i]) / 8.0 + 1e-30, "expert layer (worst case)");
    let (mut error, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(&want) {
        error += (f64::from(g) - f64::from(w)).powi(2);
        norm += f64::from(w).powi(2);
    }
    let relative_rms = (error / norm).sqrt();
    println!("expert layer: relative RMS error {relative_rms:e} over {rows} rows");
    assert!(relative_rms <= 2e-2, "relative RMS error {relative_rms:e}");
    // With the warpgroup kernel forced (scripts/test.sh runs this test so), expert 5's GEMMs went through it.
    if std::env::var("SWITCHYARD_WGMMA_EXPERT_GEMM").as_deref() == Ok("force") && device.arch() == "compute_90" {
        let tunings = device.cublaslt_tunings().expect("tunings");
        for (n, k) in [(2 * inter, hidden), (hidden, inter)] {
            let Some(tuning) = tunings.iter().find(|t| (t.n, t.k, t.tokens) == (n, k, 64)) else {
                panic!("no tuning of {n} x {k} for 64 tokens: {tunings:?}")
            };
            assert!(tuning.tuned.starts_with("warpgroup kernel"), "{tuning:?}");
        }
    }
}

#[test]
fn rms_norm_matches_the_reference() {
    let Some(device) = gpu("rms_norm") else { return };
    let mut r = rng(6);
    let (rows, dim) = (7, 5120);
    let x = uniform(&mut r, rows * dim, 4.0);
    let weight = uniform(&mut r, dim, 2.0);
    let mut want = vec![0.0; rows * dim];
    rms_norm_reference(&x, &weight, 1e-5, &mut want).expect("reference");
    let (x_dev, w_dev) = (device.upload(&x).expect("upload"), device.upload(&weight).expect("upload"));
    let mut out = device.zeros::<f32>(rows * dim).expect("alloc");
    device.rms_norm(&x_dev.as_view(), Some(&w_dev.as_view()), dim, 1e-5, &mut out.as_view_mut()).expect("rms_norm");
    let got = device.download(&out).expect("download");
    assert_within(&got, &want, |i| (dim as f64 + 8.0) * U * f64::from(want[i].abs()), "rms_norm");
}

#[test]
fn rope_matches_the_cpu() {
    let Some(device) = gpu("rope") else { return };
    let mut r = rng(7);
    let (heads, head_dim) = (8, 128);
    let positions: Vec<usize> = vec![0, 1, 17, 8191, 8192, 131_071, 1_000_000];
    let inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| 500_000f32.powf(-(2.0 * i as f32) / head_dim as f32)).collect();
    let x = uniform(&mut r, positions.len() * heads * head_dim, 3.0);
    let mut want = x.clone();
    rope_interleaved_in_place(&mut want, &positions, heads, head_dim, &inv_freq).expect("cpu rope");
    let mut x_dev = device.upload(&x).expect("upload");
    let positions_u32: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let (p_dev, f_dev) = (device.upload(&positions_u32).expect("upload"), device.upload(&inv_freq).expect("upload"));
    device
        .rope_interleaved(&mut x_dev.as_view_mut(), &p_dev.as_view(), heads, head_dim, &f_dev.as_view())
        .expect("rope");
    let got = device.download(&x_dev).expect("download");
    assert_within(&got, &want, |i| 16.0 * U * f64::from(x[i & !1].abs() + x[i | 1].abs()), "rope");
}

/// A KV pool element as the host makes and reads it: f32 as is, bf16 as its bits rounded to nearest even.
trait HostKv: KvElement + cudarc::driver::DeviceRepr + PartialEq + std::fmt::Debug {
    fn encode(value: f32) -> Self;
    fn decode(self) -> f32;
}

impl HostKv for f32 {
    fn encode(value: f32) -> Self {
        value
    }
    fn decode(self) -> f32 {
        self
    }
}

impl HostKv for u16 {
    fn encode(value: f32) -> Self {
        f32_to_bf16_bits(value)
    }
    fn decode(self) -> f32 {
        bf16_bits_to_f32(self)
    }
}

/// `paged_decode_attention` on the GPU over `pool` (already there, f32 or bf16): `meta` is the block table, each
/// query's row of it, first blocks, lengths and positions; returns the outputs and log-sum-exps.
fn gpu_paged_attention<T: KvElement>(
    device: &CudaDevice,
    shape: &PagedDecode,
    q: &[f32],
    pool: &CudaSlice<T>,
    meta: [&[u32]; 5],
) -> (Vec<f32>, Vec<f32>) {
    let [table, table_row, first, len, pos] = meta.map(|v| device.upload(v).expect("upload"));
    let q_dev = device.upload(q).expect("upload");
    let mut out = device.zeros::<f32>(q.len()).expect("alloc");
    let mut lse = device.zeros::<f32>(shape.seqs * shape.q_heads).expect("alloc");
    device
        .paged_decode_attention(
            shape,
            &q_dev.as_view(),
            &pool.as_view(),
            &table.as_view(),
            &table_row.as_view(),
            &first.as_view(),
            &len.as_view(),
            &pos.as_view(),
            &mut out.as_view_mut(),
            &mut lse.as_view_mut(),
        )
        .expect("gpu paged attention");
    (device.download(&out).expect("download"), device.download(&lse).expect("download"))
}

#[test]
fn paged_decode_attention_matches_the_cpu() {
    let Some(device) = gpu("paged_decode_attention") else { return };
    check_paged_decode_attention::<f32>(&device);
}

/// Over a bf16 pool: the CPU reference reads the pool's values widened to f32 (exactly what the kernel reads), so the
/// f32 case's bounds hold (module docs).
#[test]
fn paged_decode_attention_over_a_bf16_pool_matches_the_cpu() {
    let Some(device) = gpu("paged_decode_attention bf16") else { return };
    check_paged_decode_attention::<u16>(&device);
}

/// `paged_decode_attention` over a pool of `T` against `attention::paged_attention` on the pool's values as f32: a
/// fresh sequence, long ones, released blocks, the chunked mask, the block table's rows named per query.
fn check_paged_decode_attention<T: HostKv>(device: &CudaDevice) {
    // The grouped kernel (head_dim 128) with 4 and with 5 query heads per KV head (Maverick's 5 leaves the fourth
    // warp two heads to finish), and one block per query head (head_dim 64).
    for (q_heads, kv_heads, head_dim) in [(8, 2, 128), (10, 2, 128), (8, 2, 64)] {
        check_paged_decode_shape::<T>(device, q_heads, kv_heads, head_dim);
    }
}

fn check_paged_decode_shape<T: HostKv>(device: &CudaDevice, q_heads: usize, kv_heads: usize, head_dim: usize) {
    let mut r = rng(8);
    let block_size = 16;
    let block_values = 2 * block_size * kv_heads * head_dim;
    let pool_blocks = 40;
    let stored: Vec<T> = uniform(&mut r, pool_blocks * block_values, 1.0).into_iter().map(T::encode).collect();
    // What the kernel reads: for bf16 the rounded values, widened.
    let pool: Vec<f32> = stored.iter().map(|&v| v.decode()).collect();
    // (first_block, len, position, chunk): a fresh sequence, a long one, one that released its first blocks, a chunked
    // layer whose query starts a new chunk.
    let sequences = [(0usize, 5usize, 4usize, 0u32), (0, 300, 299, 0), (3, 150, 149, 0), (0, 97, 96, 64)];
    let max_blocks = 20;
    let mut table = vec![0u32; sequences.len() * max_blocks];
    let mut used: Vec<u32> = (0..pool_blocks as u32).collect();
    for i in (1..used.len()).rev() {
        used.swap(i, r.random_range(0..=i));
    }
    let mut next = 0;
    for (s, &(first, len, _, _)) in sequences.iter().enumerate() {
        for i in 0..len.div_ceil(block_size) - first {
            table[s * max_blocks + i] = used[next % pool_blocks];
            next += 1;
        }
    }
    let q = uniform(&mut r, sequences.len() * q_heads * head_dim, 1.0);
    let scale = 1.0 / (head_dim as f32).sqrt();
    for chunk in [0u32, 64] {
        let relevant: Vec<usize> = (0..sequences.len()).filter(|&s| sequences[s].3 == chunk || chunk == 0).collect();
        let mut want = vec![0.0; sequences.len() * q_heads * head_dim];
        let mut want_lse = vec![0.0; sequences.len() * q_heads];
        for &s in &relevant {
            let (first, len, position, _) = sequences[s];
            let blocks: Vec<&[f32]> = (0..len.div_ceil(block_size) - first)
                .map(|i| {
                    let b = table[s * max_blocks + i] as usize;
                    &pool[b * block_values..(b + 1) * block_values]
                })
                .collect();
            let mask =
                if chunk == 0 { AttentionMask::Causal } else { AttentionMask::Chunked { chunk: chunk as usize } };
            let rows = s * q_heads * head_dim..(s + 1) * q_heads * head_dim;
            paged_attention(
                &q[rows.clone()],
                &[position],
                PagedKv { blocks: &blocks, first_block: first, block_size, len },
                AttentionShape { q_heads, kv_heads, head_dim },
                mask,
                scale,
                &mut want[rows],
                Some(&mut want_lse[s * q_heads..(s + 1) * q_heads]),
            )
            .expect("cpu paged attention");
        }
        let shape = PagedDecode {
            seqs: sequences.len(),
            q_heads,
            kv_heads,
            head_dim,
            block_size,
            table_rows: sequences.len(),
            max_blocks,
            pool_blocks,
            chunk,
            scale,
            splits: 0,
        };
        let column = |f: fn(&(usize, usize, usize, u32)) -> usize| -> Vec<u32> {
            sequences.iter().map(|s| f(s) as u32).collect()
        };
        let pool_dev = device.upload(&stored).expect("upload");
        // The table's rows stored in reverse, each query naming its own: the kernel must follow `table_row`.
        let reversed: Vec<u32> = table.chunks(max_blocks).rev().flatten().copied().collect();
        let rows_of: Vec<u32> = (0..sequences.len() as u32).rev().collect();
        // The keys of each query head in one block (the choice here), and split over 2, 3 and 7 blocks and merged
        // (7: some splits of the 5-key sequence see no key).
        for splits in [0, 2, 3, 7] {
            let (got, got_lse) = gpu_paged_attention(
                device,
                &PagedDecode { splits, ..shape },
                &q,
                &pool_dev,
                [&reversed, &rows_of, &column(|s| s.0), &column(|s| s.1), &column(|s| s.2)],
            );
            for &s in &relevant {
                let rows = s * q_heads * head_dim..(s + 1) * q_heads * head_dim;
                let what = format!(
                    "{} pool, {q_heads}/{kv_heads} heads of {head_dim}, {splits} splits, chunk {chunk} sequence {s} out",
                    T::DTYPE
                );
                assert_within(&got[rows.clone()], &want[rows], |_| 1e-4, &what);
                let heads = s * q_heads..(s + 1) * q_heads;
                let want_lse_s = &want_lse[heads.clone()];
                let bound = |i: usize| 1e-4 * (1.0 + f64::from(want_lse_s[i].abs()));
                assert_within(&got_lse[heads], want_lse_s, bound, &format!("{what} lse"));
            }
        }
    }
}

#[test]
fn shape_errors_name_the_buffer_instead_of_launching() {
    let Some(device) = gpu("shape errors") else { return };
    let x = device.upload(&[1.0f32; 10]).expect("upload");
    let mut q = device.zeros::<u8>(12).expect("alloc");
    let mut s = device.zeros::<f32>(3).expect("alloc");
    let err = device
        .quantize_rows(&x.as_view(), 3, 4, &mut q.as_view_mut(), &mut s.as_view_mut())
        .expect_err("10 values are not 3 x 4");
    assert!(matches!(err, KernelError::Shape { .. }) && err.to_string().contains("x has 10 values"), "{err}");
    let odd = [Fp8Expert {
        gate: Fp8Weight { codes: &[0; 8 * 24], scales: &[1.0; 8], rows: 8, cols: 24 },
        up: Fp8Weight { codes: &[0; 8 * 24], scales: &[1.0; 8], rows: 8, cols: 24 },
        down: Fp8Weight { codes: &[0; 24 * 8], scales: &[1.0; 24], rows: 24, cols: 8 },
    }];
    let err = GpuExpertLayer::upload(&device, &odd).expect_err("24 is not a multiple of 16");
    assert!(err.to_string().contains("multiples of 16"), "{err}");
}

/// Where the machine has no GPU, opening one must answer an error naming what is missing, never panic.
#[test]
fn opening_a_gpu_reports_instead_of_panicking() {
    match CudaDevice::new(0) {
        Ok(device) => println!("GPU 0: {} ({})", device.name(), device.arch()),
        Err(
            reason @ (KernelError::CudaUnavailable { .. }
            | KernelError::NoSuchGpu { .. }
            | KernelError::CudaIncludeNotFound { .. }),
        ) => println!("no GPU here: {reason}"),
        Err(other) => panic!("unexpected error: {other}"),
    }
    assert!(matches!(CudaDevice::new(4096), Err(KernelError::CudaUnavailable { .. } | KernelError::NoSuchGpu { .. })));
}

/// `sum_c |x[i, c] * w[o, c]|` for every output of an f32 product: the magnitude the summation error is relative to.
fn f32_magnitude(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let abs = |v: &[f32]| -> Vec<f32> { v.iter().map(|a| a.abs()).collect() };
    let mut out = vec![0.0; m * n];
    matmul_f32_reference(&abs(x), m, &abs(w), n, k, &mut out).expect("magnitude");
    out
}

fn round_to_bf16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| bf16_bits_to_f32(f32_to_bf16_bits(v))).collect()
}

/// Runs `linear` on `x` placed `offset` values into a larger buffer (so the pointer is only 4-byte aligned when the
/// offset is odd: cuBLASLt must get a plan for that alignment), from a starting `out` of `initial`.
#[allow(clippy::too_many_arguments)]
fn run_linear(
    device: &Arc<CudaDevice>,
    x: &[f32],
    m: usize,
    weight: &DenseWeight,
    offset: usize,
    initial: &[f32],
    accumulate: bool,
) -> Vec<f32> {
    let mut padded = vec![0.0f32; offset];
    padded.extend_from_slice(x);
    let x_dev = device.upload(&padded).expect("upload");
    let mut out_padded = vec![0.0f32; offset];
    out_padded.extend_from_slice(initial);
    let mut out = device.upload(&out_padded).expect("upload");
    device.linear(&x_dev.slice(offset..), m, weight, &mut out.slice_mut(offset..), accumulate).expect("linear");
    device.download(&out).expect("download")[offset..].to_vec()
}

#[test]
fn linear_f32_matches_the_cpu_reference() {
    let Some(device) = gpu("linear f32") else { return };
    let mut r = rng(9);
    // A decode step at Maverick's hidden size, an awkward shape, a prefill-sized one; odd offsets misalign x and out.
    for (m, n, k, offset) in [(1usize, 1024usize, 5120usize, 0usize), (37, 77, 300, 1), (130, 640, 1024, 3)] {
        let x = uniform(&mut r, m * k, 2.0);
        let w = uniform(&mut r, n * k, 0.5);
        let weight = DenseWeight::upload(&device, &w, n, k, DenseDtype::F32).expect("upload weight");
        assert_eq!((weight.n(), weight.k(), weight.dtype(), weight.bytes()), (n, k, DenseDtype::F32, 4 * n * k));
        let mut want = vec![0.0; m * n];
        matmul_f32_reference(&x, m, &w, n, k, &mut want).expect("reference");
        let size = f32_magnitude(&x, m, &w, n, k);
        let allowance = (k as f64 + 4.0) * U;
        let got = run_linear(&device, &x, m, &weight, offset, &vec![0.0; m * n], false);
        assert_within(&got, &want, |i| allowance * f64::from(size[i]) + 1e-30, &format!("linear f32 {m}x{n}x{k}"));
        // Accumulating into an existing output adds one more rounding, relative to |out| as well.
        let initial = uniform(&mut r, m * n, 3.0);
        let got = run_linear(&device, &x, m, &weight, offset, &initial, true);
        let want_sum: Vec<f32> = want.iter().zip(&initial).map(|(w, i)| w + i).collect();
        assert_within(
            &got,
            &want_sum,
            |i| (allowance + U) * f64::from(size[i] + initial[i].abs()) + 1e-30,
            &format!("linear f32 accumulate {m}x{n}x{k}"),
        );
    }
}

#[test]
fn linear_bf16_matches_the_rounded_reference() {
    let Some(device) = gpu("linear bf16") else { return };
    let mut r = rng(10);
    for (m, n, k, offset) in [(1usize, 1024usize, 5120usize, 0usize), (37, 77, 300, 1), (130, 640, 1024, 2)] {
        let x = uniform(&mut r, m * k, 2.0);
        let w = uniform(&mut r, n * k, 0.5);
        let weight = DenseWeight::upload(&device, &w, n, k, DenseDtype::Bf16).expect("upload weight");
        assert_eq!((weight.dtype(), weight.bytes()), (DenseDtype::Bf16, 2 * n * k));
        let (x_b, w_b) = (round_to_bf16(&x), round_to_bf16(&w));
        let mut want_rounded = vec![0.0; m * n];
        matmul_f32_reference(&x_b, m, &w_b, n, k, &mut want_rounded).expect("reference");
        let mut want = vec![0.0; m * n];
        matmul_f32_reference(&x, m, &w, n, k, &mut want).expect("reference");
        let size_rounded = f32_magnitude(&x_b, m, &w_b, n, k);
        let size = f32_magnitude(&x, m, &w, n, k);
        let summation = 2.0 * (k as f64 + 4.0) * U;
        let initial = uniform(&mut r, m * n, 3.0);
        for accumulate in [false, true] {
            let start = if accumulate { initial.clone() } else { vec![0.0; m * n] };
            let got = run_linear(&device, &x, m, &weight, offset, &start, accumulate);
            let shifted = |want: &[f32]| -> Vec<f32> { want.iter().zip(&start).map(|(w, s)| w + s).collect() };
            let what = format!("linear bf16 {m}x{n}x{k} accumulate {accumulate}");
            assert_within(
                &got,
                &shifted(&want_rounded),
                |i| (summation + U) * f64::from(size_rounded[i] + start[i].abs()) + 1e-30,
                &format!("{what} (vs the bf16-rounded operands)"),
            );
            assert_within(
                &got,
                &shifted(&want),
                |i| (1.0 / 128.0 + summation) * f64::from(size[i]) + 2.0 * U * f64::from(start[i].abs()) + 1e-30,
                &format!("{what} (vs f32 operands)"),
            );
        }
    }
}

#[test]
fn f32_to_bf16_matches_the_host_bit_for_bit() {
    let Some(device) = gpu("f32_to_bf16") else { return };
    let mut r = rng(11);
    let mut x: Vec<f32> = (0..100_000).map(|_| f32::from_bits(r.random::<u32>())).collect();
    x.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0e-40,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x7F7F_8000),
    ]);
    let want: Vec<u16> = x.iter().map(|&v| f32_to_bf16_bits(v)).collect();
    let x_dev = device.upload(&x).expect("upload");
    let mut out = device.zeros::<u16>(x.len()).expect("alloc");
    device.f32_to_bf16(&x_dev.as_view(), &mut out.as_view_mut()).expect("convert");
    let got = device.download(&out).expect("download");
    let first_difference = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(first_difference, None, "first value converted differently: {:?}", first_difference.map(|i| x[i]));
}

#[test]
fn embed_rows_copies_table_rows_and_zeros_bad_ids() {
    let Some(device) = gpu("embed_rows") else { return };
    let mut r = rng(12);
    let (vocab, hidden) = (1000, 320);
    let table = uniform(&mut r, vocab * hidden, 1.0);
    // First, last, repeated ids, and two out of range (the kernel writes zeros instead of reading past the table).
    let tokens: Vec<u32> = vec![0, 999, 17, 17, 1000, 523, u32::MAX];
    let tokens_dev = device.upload(&tokens).expect("upload");
    for dtype in [DenseDtype::F32, DenseDtype::Bf16] {
        let weight = DenseWeight::upload(&device, &table, vocab, hidden, dtype).expect("upload table");
        let stored = if dtype == DenseDtype::F32 { table.clone() } else { round_to_bf16(&table) };
        let mut out = device.upload(&vec![7.0f32; tokens.len() * hidden]).expect("upload");
        device.embed_rows(&weight, &tokens_dev.as_view(), &mut out.as_view_mut()).expect("embed_rows");
        let got = device.download(&out).expect("download");
        for (t, &token) in tokens.iter().enumerate() {
            let row = &got[t * hidden..(t + 1) * hidden];
            let token = token as usize;
            if token < vocab {
                assert_eq!(row, &stored[token * hidden..(token + 1) * hidden], "{dtype} token {token}");
            } else {
                assert!(row.iter().all(|&v| v == 0.0), "{dtype}: id {token} >= vocab must give zeros");
            }
        }
    }
}

#[test]
fn silu_mul_matches_the_cpu() {
    let Some(device) = gpu("silu_mul") else { return };
    let mut r = rng(13);
    let (rows, inter) = (7, 1000);
    let mut gate_up = uniform(&mut r, rows * 2 * inter, 6.0);
    // Extremes in the gate columns of row 0: exp overflowing either way, zero, and around the overflow threshold.
    for (i, g) in [0.0f32, -0.0, 100.0, -100.0, 88.0, -88.0, -88.7, -89.0, 1e-30, -1e-30].into_iter().enumerate() {
        gate_up[i] = g;
    }
    let mut want = vec![0.0; rows * inter];
    let mut want_reference = vec![0.0; rows * inter];
    for row in 0..rows {
        let (gate, up) = gate_up[row * 2 * inter..(row + 1) * 2 * inter].split_at(inter);
        silu_mul(gate, up, &mut want[row * inter..(row + 1) * inter]).expect("cpu silu_mul");
        silu_mul_reference(gate, up, &mut want_reference[row * inter..(row + 1) * inter]).expect("reference");
    }
    let input = device.upload(&gate_up).expect("upload");
    let mut out = device.zeros::<f32>(rows * inter).expect("alloc");
    device.silu_mul(&input.as_view(), inter, &mut out.as_view_mut()).expect("silu_mul");
    let got = device.download(&out).expect("download");
    assert_within(&got, &want, |i| 32.0 * U * f64::from(want[i].abs()) + 1e-30, "silu_mul vs the CPU kernel");
    assert_within(
        &got,
        &want_reference,
        |i| 32.0 * U * f64::from(want_reference[i].abs()) + 1e-30,
        "silu_mul vs the reference",
    );
}

#[test]
fn add_in_place_and_scale_rows_are_exact() {
    let Some(device) = gpu("add_in_place / scale_rows") else { return };
    let mut r = rng(14);
    let (rows, cols) = (13, 5120);
    let x = uniform(&mut r, rows * cols, 10.0);
    let y = uniform(&mut r, rows * cols, 10.0);
    let factors = uniform(&mut r, rows, 2.0);
    let mut x_dev = device.upload(&x).expect("upload");
    let y_dev = device.upload(&y).expect("upload");
    device.add_in_place(&mut x_dev.as_view_mut(), &y_dev.as_view()).expect("add");
    let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_eq!(device.download(&x_dev).expect("download"), sum, "x + y");
    let factors_dev = device.upload(&factors).expect("upload");
    device.scale_rows(&mut x_dev.as_view_mut(), cols, &factors_dev.as_view()).expect("scale_rows");
    let scaled: Vec<f32> = sum.iter().enumerate().map(|(i, v)| v * factors[i / cols]).collect();
    assert_eq!(device.download(&x_dev).expect("download"), scaled, "rows scaled");
}

/// kv_write puts each token where `attention::paged_attention` and the GPU's paged decode attention read it: the pool
/// matches a host copy written by the layout's definition, untouched slots (and an out-of-range slot) are left alone,
/// and attention over the written pool matches the CPU's.
#[test]
fn kv_write_fills_the_paged_layout() {
    let Some(device) = gpu("kv_write") else { return };
    check_kv_write::<f32>(&device);
}

/// The same into a bf16 pool: every written key and value is `f32_to_bf16_bits` of the f32 one, bit for bit, and the
/// attention over the written pool matches the CPU's over its values widened to f32.
#[test]
fn kv_write_rounds_into_a_bf16_pool() {
    let Some(device) = gpu("kv_write bf16") else { return };
    check_kv_write::<u16>(&device);
}

/// `kv_write` into a pool of `T` (see the tests above).
fn check_kv_write<T: HostKv>(device: &CudaDevice) {
    let mut r = rng(15);
    let (q_heads, kv_heads, head_dim, block_size, pool_blocks) = (8, 2, 64, 16, 10);
    let row = kv_heads * head_dim;
    let block_values = 2 * block_size * row;
    let shape = KvWrite { block_size, kv_heads, head_dim, pool_blocks };
    let pool: Vec<T> = uniform(&mut r, pool_blocks * block_values, 1.0).into_iter().map(T::encode).collect();
    // One sequence of 40 positions over blocks 7, 2, 5 (its block table), written by one call, plus a stray slot past
    // the pool that must be skipped.
    let table: Vec<u32> = vec![7, 2, 5];
    let len = 40;
    let mut slots: Vec<u32> =
        (0..len).map(|p| table[p / block_size] * block_size as u32 + (p % block_size) as u32).collect();
    slots.push((pool_blocks * block_size) as u32);
    let tokens = slots.len();
    let (k, v) = (uniform(&mut r, tokens * row, 1.0), uniform(&mut r, tokens * row, 1.0));
    let mut want = pool.clone();
    for (t, &slot) in slots.iter().enumerate().take(len) {
        let (block, offset) = (slot as usize / block_size, slot as usize % block_size);
        let key = block * block_values + offset * row;
        let value = block * block_values + (block_size + offset) * row;
        for c in 0..row {
            want[key + c] = T::encode(k[t * row + c]);
            want[value + c] = T::encode(v[t * row + c]);
        }
    }
    let mut pool_dev = device.upload(&pool).expect("upload");
    let (k_dev, v_dev, slots_dev) = (
        device.upload(&k).expect("upload"),
        device.upload(&v).expect("upload"),
        device.upload(&slots).expect("upload"),
    );
    device
        .kv_write(&shape, &mut pool_dev.as_view_mut(), &k_dev.as_view(), &v_dev.as_view(), &slots_dev.as_view())
        .expect("kv_write");
    assert_eq!(device.download(&pool_dev).expect("download"), want, "{} pool after kv_write", T::DTYPE);

    // The last position's query over the written keys: CPU paged attention on the host pool (as f32), GPU on the
    // device's.
    let q = uniform(&mut r, q_heads * head_dim, 1.0);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let want: Vec<f32> = want.into_iter().map(T::decode).collect();
    let blocks: Vec<&[f32]> =
        table.iter().map(|&b| &want[b as usize * block_values..(b as usize + 1) * block_values]).collect();
    let (mut want_out, mut want_lse) = (vec![0.0; q.len()], vec![0.0; q_heads]);
    paged_attention(
        &q,
        &[len - 1],
        PagedKv { blocks: &blocks, first_block: 0, block_size, len },
        AttentionShape { q_heads, kv_heads, head_dim },
        AttentionMask::Causal,
        scale,
        &mut want_out,
        Some(&mut want_lse),
    )
    .expect("cpu paged attention");
    let decode = PagedDecode {
        seqs: 1,
        table_rows: 1,
        q_heads,
        kv_heads,
        head_dim,
        block_size,
        max_blocks: table.len(),
        pool_blocks,
        chunk: 0,
        scale,
        splits: 0,
    };
    let (got, got_lse) =
        gpu_paged_attention(device, &decode, &q, &pool_dev, [&table, &[0], &[0], &[len as u32], &[len as u32 - 1]]);
    assert_within(&got, &want_out, |_| 1e-4, "attention over written keys");
    assert_within(&got_lse, &want_lse, |i| 1e-4 * (1.0 + f64::from(want_lse[i].abs())), "lse over written keys");
}

#[test]
fn dense_shape_errors_name_the_buffer_instead_of_launching() {
    let Some(device) = gpu("dense shape errors") else { return };
    let err = DenseWeight::upload(&device, &[0.0; 10], 3, 4, DenseDtype::Bf16).expect_err("10 values are not 3 x 4");
    assert!(matches!(err, KernelError::Shape { .. }) && err.to_string().contains("weight has 10 values"), "{err}");
    let weight = DenseWeight::upload(&device, &[0.5; 12], 3, 4, DenseDtype::F32).expect("upload");
    let x = device.upload(&[1.0f32; 9]).expect("upload");
    let mut out = device.zeros::<f32>(6).expect("alloc");
    let err = device.linear(&x.as_view(), 2, &weight, &mut out.as_view_mut(), false).expect_err("9 is not 2 x 4");
    assert!(err.to_string().contains("x has 9 values"), "{err}");
    let err = device.silu_mul(&x.as_view(), 2, &mut out.as_view_mut()).expect_err("9 is not a multiple of 4");
    assert!(err.to_string().contains("gate_up has 9 values"), "{err}");
    let shape = KvWrite { block_size: 4, kv_heads: 1, head_dim: 2, pool_blocks: 2 };
    let mut pool = device.zeros::<f32>(31).expect("alloc");
    let slots = device.upload(&[0u32]).expect("upload");
    let err = device
        .kv_write(&shape, &mut pool.as_view_mut(), &x.slice(..2), &x.slice(2..4), &slots.as_view())
        .expect_err("the pool holds 32 values");
    assert!(err.to_string().contains("pool has 31 values"), "{err}");
}

/// A bf16 pool of the wrong length is refused before launching, naming the pool and its element type, by both KV
/// kernels.
#[test]
fn bf16_kv_shape_errors_name_the_dtype() {
    let Some(device) = gpu("bf16 KV shape errors") else { return };
    let x = device.upload(&[1.0f32; 8]).expect("upload");
    let slots = device.upload(&[0u32]).expect("upload");
    let mut pool = device.zeros::<u16>(31).expect("alloc");
    let shape = KvWrite { block_size: 4, kv_heads: 1, head_dim: 2, pool_blocks: 2 };
    let err = device
        .kv_write(&shape, &mut pool.as_view_mut(), &x.slice(..2), &x.slice(2..4), &slots.as_view())
        .expect_err("the pool holds 32 values");
    let message = err.to_string();
    assert!(message.contains("pool has 31 values") && message.contains(&KvDtype::Bf16.to_string()), "{message}");
    let decode = PagedDecode {
        seqs: 1,
        q_heads: 1,
        kv_heads: 1,
        head_dim: 32,
        block_size: 4,
        table_rows: 1,
        max_blocks: 1,
        pool_blocks: 1,
        chunk: 0,
        scale: 1.0,
        splits: 0,
    };
    let q = device.zeros::<f32>(32).expect("alloc");
    let (mut out, mut lse) = (device.zeros::<f32>(32).expect("alloc"), device.zeros::<f32>(1).expect("alloc"));
    let err = device
        .paged_decode_attention(
            &decode,
            &q.as_view(),
            &pool.as_view(),
            &slots.as_view(),
            &slots.as_view(),
            &slots.as_view(),
            &slots.as_view(),
            &slots.as_view(),
            &mut out.as_view_mut(),
            &mut lse.as_view_mut(),
        )
        .expect_err("the pool holds 256 values");
    let message = err.to_string();
    assert!(message.contains("pool has 31 values") && message.contains("bf16"), "{message}");
}

/// `bench gpu`'s measurement end to end on small shapes (gpu-check's step 5 runs it at Maverick's): token counts on
/// both sides of `SMALL_M_MAX_TOKENS` (the streaming kernel and cuBLASLt), one expert and grouped, each timed.
#[test]
fn bench_measures_every_case_on_small_shapes() {
    if gpu("bench_measures_every_case_on_small_shapes").is_none() {
        return;
    }
    let config = GemmBenchConfig {
        shapes: vec![GemmShape { name: "gate_up", k: 256, n: 512 }],
        tokens: vec![8, SMALL_M_MAX_TOKENS + 32],
        experts: 3,
        iterations: 2,
        warmup: 1,
        copy_bytes: 1 << 20,
        mma_rate_rounds: 1,
        calls_per_sample: 1,
        attention_contexts: vec![1000],
        ..GemmBenchConfig::default()
    };
    let report = bench_expert_gemm(0, &config).expect("bench");
    assert!(report.copy_tb_per_s.is_finite() && report.copy_tb_per_s > 0.0, "{report:?}");
    assert!(report.mma_e4m3_tflops.is_finite() && report.mma_e4m3_tflops > 0.0, "{report:?}");
    let cases: Vec<(&str, usize)> = report.rows.iter().map(|r| (r.case, r.tokens)).collect();
    let tokens = SMALL_M_MAX_TOKENS + 32;
    assert_eq!(cases, [("one expert", 8), ("grouped", 8), ("one expert", tokens), ("grouped", tokens)]);
    for row in &report.rows {
        let timed = [row.ours_us, row.cublaslt_us, row.weight_tb_per_s, row.tflops];
        assert!(timed.iter().all(|v| v.is_finite() && *v > 0.0), "{row:?}");
        // The lone-expert kernel is timed on the one-expert case it takes (up to 32 tokens), and only there.
        let lone_case = row.case == "one expert" && row.tokens <= 32;
        assert_eq!(row.lone_us.is_some_and(|us| us.is_finite() && us > 0.0), lone_case, "{row:?}");
    }
    // Each one-expert case was tuned for its bucket, rotated over the experts; the lone-expert kernel competed where
    // it takes the bucket (up to 32 tokens), and the choice's time is the fastest.
    // The warpgroup kernel (Hopper only, unless SWITCHYARD_WGMMA_EXPERT_GEMM=0 leaves it out) where it takes the
    // bucket (33..=128 tokens).
    let device = gpu("bench_measures_every_case_on_small_shapes").expect("the GPU again");
    let hopper = device.arch() == "compute_90" && std::env::var("SWITCHYARD_WGMMA_EXPERT_GEMM").as_deref() != Ok("0");
    for (tokens, lone, warpgroup) in [(16, true, false), (64, false, hopper)] {
        let Some(row) = report.tuning.iter().find(|t| (t.n, t.k, t.tokens) == (512, 256, tokens)) else {
            panic!("no tuning of bucket {tokens}: {:?}", report.tuning)
        };
        assert!(row.cached || row.lone_us.is_some() == lone, "{row:?}");
        assert!(row.cached || row.warpgroup_us.is_some() == warpgroup, "{row:?}");
        for ours in [row.lone_us, row.warpgroup_us] {
            assert!(ours.is_none_or(|us| row.tuned_us.is_some_and(|tuned| tuned <= us)), "{row:?}");
        }
    }
    let weights = device.zeros::<u8>(2 * 512 * 256).expect("alloc");
    let error = device.tune_fp8_expert_gemm(512, 256, 40, &weights.as_view(), 3).expect_err("two experts' weights");
    assert!(error.to_string().contains("cannot hold 3 experts of 512 x 256"), "{error}");
    let [attention] = &report.attention[..] else { panic!("one attention case: {:?}", report.attention) };
    assert_eq!((attention.context, attention.anchor_us), (1000, None));
    let timed = [attention.split_us, attention.one_block_us, attention.kv_tb_per_s];
    assert!(timed.iter().all(|v| v.is_finite() && *v > 0.0) && attention.splits >= 1, "{attention:?}");
    let bad = GemmBenchConfig { copy_bytes: 0, ..config };
    assert!(bench_expert_gemm(0, &bad).is_err());
}
