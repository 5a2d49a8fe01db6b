//! The FP8 expert GEMM benchmark behind `switchyard bench gpu` (performance.md's method): CUDA events around each
//! call after warm-up, the median of the repetitions, weights rotated over all experts (16 Maverick experts are 1.3
//! GB for gate_up, far beyond the 50 MB L2), and the peers measured in the same run: cuBLASLt alone on the same
//! problem and a device-to-device copy (the bandwidth ceiling).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::experts::{lone_expert_max_tokens, small_m_max_tokens};
use super::kernels::GroupedGemm;
use super::timing::{interleaved_medians_us, random_codes, Schedule, TimedPath};
use super::{driver, CudaDevice};
use crate::device::gpu_bench::{
    anchor_us, attention_anchor_us, splitmix64, zipf_routing, AttentionBenchRow, GemmBenchConfig, GemmBenchReport,
    GemmBenchRow, GemmShape, MAVERICK_ATTENTION,
};
use crate::device::plan::{ExpertPlan, LoneExpertGrid};
use crate::device::sources::EXPERTS_CU;
use crate::device::PagedDecode;
use crate::error::KernelError;

/// [`interleaved_medians_us`] with `config`'s schedule, for a fixed number of paths.
fn medians_us<const P: usize>(
    device: &CudaDevice,
    config: &GemmBenchConfig,
    paths: &mut [TimedPath<'_>; P],
) -> Result<[f64; P], KernelError> {
    let schedule =
        Schedule { warmup: config.warmup, iterations: config.iterations, calls_per_sample: config.calls_per_sample };
    let medians = interleaved_medians_us(device, schedule, paths)?;
    Ok(std::array::from_fn(|i| medians[i]))
}

/// Random scales in [0.5, 1.5) / 256, deterministic in `seed`.
fn random_scales(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len).map(|_| (0.5 + (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32) / 256.0).collect()
}

struct ShapeBuffers {
    weights: CudaSlice<u8>,
    w_scale: CudaSlice<f32>,
    a: CudaSlice<u8>,
    a_scale: CudaSlice<f32>,
    out: CudaSlice<f32>,
}

fn shape_buffers(
    device: &CudaDevice,
    shape: &GemmShape,
    experts: usize,
    max_tokens: usize,
    seed: u64,
) -> Result<ShapeBuffers, KernelError> {
    let (n, k) = (shape.n, shape.k);
    let mut weights = device.zeros::<u8>(experts * n * k)?;
    for e in 0..experts {
        let codes = random_codes(n * k, seed ^ ((e as u64 + 1) * 0x1000_0001));
        device
            .stream()
            .memcpy_htod(&codes, &mut weights.slice_mut(e * n * k..(e + 1) * n * k))
            .map_err(driver("weight upload"))?;
    }
    Ok(ShapeBuffers {
        weights,
        w_scale: device.upload(&random_scales(experts * n, seed ^ 0xABCD))?,
        a: device.upload(&random_codes(max_tokens * k, seed ^ 0x5151))?,
        a_scale: device.upload(&random_scales(max_tokens, seed ^ 0x7777))?,
        out: device.zeros::<f32>(max_tokens * n)?,
    })
}

/// What one case measured, microseconds.
struct Measured {
    ours: f64,
    cublaslt: f64,
    /// `fp8_lone_expert_gemm` on the plan's one expert, when asked for.
    lone: Option<f64>,
}

/// Times one case: our path for `plan` (rotating the weights over `rotate` experts), cuBLASLt alone for the same
/// expert token counts, and with `lone` the lone-expert kernel on the plan's single expert.
fn measure(
    device: &CudaDevice,
    config: &GemmBenchConfig,
    shape: &GemmShape,
    buffers: &mut ShapeBuffers,
    plan: &ExpertPlan,
    rotate: usize,
    lone: bool,
) -> Result<Measured, KernelError> {
    let (n, k) = (shape.n, shape.k);
    let experts = plan.offsets.len() - 1;
    let slots = plan.slot_row.len();
    let offsets = device.upload(&plan.offsets)?;
    let ShapeBuffers { weights, w_scale, a, a_scale, out } = buffers;
    // Both paths write the same output; only one call runs at a time.
    let out = std::cell::RefCell::new(out);
    // Call `i`'s GEMM: a one-expert plan reads expert (i mod rotate)'s weights (the view starts there); raw sums, as
    // the expert layer runs it (the row-wise scales applied by the SwiGLU and the combine).
    let with_gemm = |i: usize, run: &mut dyn FnMut(&GroupedGemm<'_, '_>) -> Result<(), KernelError>| {
        let first = (i % rotate) * n * k;
        let w = weights.slice(first..first + experts * n * k);
        let w_scale = w_scale.slice((i % rotate) * n..(i % rotate) * n + experts * n);
        run(&GroupedGemm {
            a: &a.slice(..slots * k),
            a_scale: &a_scale.slice(..slots),
            offsets: &offsets.as_view(),
            w: &w,
            w_scale: &w_scale,
            n,
            k,
            apply_scales: false,
        })
    };
    let mut ours = |i: usize| {
        with_gemm(i, &mut |gemm| device.fp8_grouped_gemm(plan, gemm, &mut out.borrow_mut().slice_mut(..slots * n)))
    };
    let mut cublaslt = |i: usize| {
        for e in 0..experts {
            let (first, tokens) = (plan.offsets[e] as usize, plan.tokens(e));
            if tokens == 0 {
                continue;
            }
            let expert = (e + i % rotate) % (rotate.max(experts));
            let w = weights.slice(expert * n * k..(expert + 1) * n * k);
            device.fp8_gemm_cublaslt(
                &a.slice(first * k..(first + tokens) * k),
                &w,
                tokens,
                n,
                k,
                &mut out.borrow_mut().slice_mut(first * n..(first + tokens) * n),
            )?;
        }
        Ok(())
    };
    if !lone {
        let [ours, cublaslt] = medians_us(device, config, &mut [&mut ours, &mut cublaslt])?;
        return Ok(Measured { ours, cublaslt, lone: None });
    }
    let mut lone = |i: usize| {
        with_gemm(i, &mut |gemm| {
            device.fp8_lone_expert_gemm(gemm, 0, 0, slots, None, &mut out.borrow_mut().slice_mut(..slots * n))
        })
    };
    let [ours, cublaslt, lone] = medians_us(device, config, &mut [&mut ours, &mut cublaslt, &mut lone])?;
    Ok(Measured { ours, cublaslt, lone: Some(lone) })
}

/// The rate of mma.sync m16n8k32 E4M3 (`mma_e4m3_rate`: two blocks of eight warps per SM, each warp running
/// `config.mma_rate_rounds` rounds of eight independent MMAs on registers), TFLOP/s.
fn mma_e4m3_rate(device: &CudaDevice, config: &GemmBenchConfig) -> Result<f64, KernelError> {
    const OP: &str = "bench gpu mma rate";
    const THREADS: usize = 256;
    let f = device.function(&EXPERTS_CU, "mma_e4m3_rate")?;
    let blocks = device.sms() * 2;
    let rounds = i32::try_from(config.mma_rate_rounds.max(1))
        .map_err(|_| KernelError::invalid(OP, format!("{} rounds", config.mma_rate_rounds)))?;
    let mut sums = device.zeros::<f32>(blocks * THREADS)?;
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(blocks).map_err(|_| KernelError::invalid(OP, "grid"))?, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let [us] = medians_us(
        device,
        config,
        &mut [&mut |_| {
            let mut launch = device.stream().launch_builder(&f);
            launch.arg(&rounds).arg(&mut sums);
            // SAFETY: signature matched (int, float*); `sums` holds one float per thread of the grid.
            unsafe { launch.launch(cfg) }.map(|_| ()).map_err(driver("launch mma_e4m3_rate"))
        }],
    )?;
    // Each MMA: 16 x 8 x 32 multiply-adds.
    let flops = (blocks * THREADS / 32) as f64 * f64::from(rounds) * 8.0 * (2 * 16 * 8 * 32) as f64;
    Ok(flops / (us * 1e-6) / 1e12)
}

/// Runs the benchmark on GPU `ordinal`.
pub fn bench_expert_gemm(ordinal: usize, config: &GemmBenchConfig) -> Result<GemmBenchReport, KernelError> {
    const OP: &str = "bench gpu";
    if config.experts == 0 || config.tokens.is_empty() || config.shapes.is_empty() || config.copy_bytes == 0 {
        return Err(KernelError::invalid(OP, "needs at least one expert, token count and shape, and a copy size"));
    }
    let device: Arc<CudaDevice> = CudaDevice::new(ordinal)?;
    let copy_tb_per_s = {
        let source = device.zeros::<u8>(config.copy_bytes)?;
        let mut target = device.zeros::<u8>(config.copy_bytes)?;
        let [us] = medians_us(
            &device,
            config,
            &mut [&mut |_| device.stream().memcpy_dtod(&source, &mut target).map_err(driver("device-to-device copy"))],
        )?;
        2.0 * config.copy_bytes as f64 / (us * 1e-6) / 1e12
    };
    let mma_e4m3_tflops = mma_e4m3_rate(&device, config)?;
    let max_tokens = config.tokens.iter().copied().max().unwrap_or(1);
    let mut rows = Vec::new();
    for shape in &config.shapes {
        let mut buffers = shape_buffers(&device, shape, config.experts, max_tokens, config.seed)?;
        let (n, k) = (shape.n, shape.k);
        for &tokens in &config.tokens {
            // The one-expert case's cuBLASLt calls see one expert's weights at a time: tuned here over all of them,
            // as a serving step reads them, so that the tuning's timing is not of weights L2 holds.
            device.tune_fp8_expert_gemm(n, k, tokens, &buffers.weights.as_view(), config.experts)?;
            // One expert: all tokens to expert 0 of a one-expert plan, its weights rotated over the layer's experts.
            let one = ExpertPlan::new(&vec![0; tokens], 1)?;
            let lone = LoneExpertGrid::new(tokens, n, k, device.sms(), None).is_ok();
            let measured = measure(&device, config, shape, &mut buffers, &one, config.experts, lone)?;
            rows.push(row(shape, "one expert", tokens, 1, tokens, &measured, n * k));
            // Grouped: Zipf-routed over all experts.
            let routed = zipf_routing(tokens, config.experts, config.zipf, config.seed ^ tokens as u64);
            let plan = ExpertPlan::new(&routed, config.experts)?;
            let busy = (0..config.experts).filter(|&e| plan.tokens(e) > 0).count();
            let max_per_expert = (0..config.experts).map(|e| plan.tokens(e)).max().unwrap_or(0);
            let measured = measure(&device, config, shape, &mut buffers, &plan, 1, false)?;
            rows.push(row(shape, "grouped", tokens, busy, max_per_expert, &measured, busy * n * k));
        }
    }
    let attention = config
        .attention_contexts
        .iter()
        .map(|&context| attention_case(&device, config, context))
        .collect::<Result<_, _>>()?;
    Ok(GemmBenchReport {
        device: format!("{} (cuda:{ordinal})", device.name()),
        copy_tb_per_s,
        mma_e4m3_tflops,
        small_m_max_tokens: small_m_max_tokens()?,
        lone_expert_max_tokens: lone_expert_max_tokens()?,
        calls_per_sample: config.calls_per_sample.max(1),
        rows,
        attention,
        tuning: device.cublaslt_tunings()?,
    })
}

/// Decode attention of one query over `context` keys ([`MAVERICK_ATTENTION`], a bf16 pool of zeros: the kernel's
/// time does not depend on the values; its blocks in a shuffled order, as a paged cache hands them out): as the
/// model runs it, and without splitting the keys (one block per KV head), interleaved. Fewer samples than the GEMMs: at 1M keys one call
/// reads 4 GiB.
fn attention_case(
    device: &CudaDevice,
    config: &GemmBenchConfig,
    context: usize,
) -> Result<AttentionBenchRow, KernelError> {
    const OP: &str = "bench gpu attention";
    let shape = MAVERICK_ATTENTION;
    if context == 0 || u32::try_from(context).is_err() {
        return Err(KernelError::invalid(OP, format!("a context of {context} keys")));
    }
    let blocks = context.div_ceil(shape.block_size);
    let pool = device.zeros::<u16>(blocks * 2 * shape.block_size * shape.kv_heads * shape.head_dim)?;
    let mut state = config.seed ^ context as u64;
    let mut order: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (splitmix64(&mut state) % (i as u64 + 1)) as usize);
    }
    let table = device.upload(&order)?;
    let [table_row, first_block, seq_len, position] =
        [0, 0, context as u32, context as u32 - 1].map(|v| device.upload(&[v]));
    let (table_row, first_block, seq_len, position) = (table_row?, first_block?, seq_len?, position?);
    let queries: Vec<f32> = (0..shape.q_heads * shape.head_dim)
        .map(|_| (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let q = device.upload(&queries)?;
    let out = std::cell::RefCell::new(device.zeros::<f32>(queries.len())?);
    let lse = std::cell::RefCell::new(device.zeros::<f32>(shape.q_heads)?);
    let decode = PagedDecode {
        seqs: 1,
        q_heads: shape.q_heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        block_size: shape.block_size,
        table_rows: 1,
        max_blocks: blocks,
        pool_blocks: blocks,
        chunk: 0,
        scale: 1.0 / (shape.head_dim as f32).sqrt(),
        splits: 0,
    };
    let run = |splits: usize| {
        device.paged_decode_attention(
            &PagedDecode { splits, ..decode },
            &q.as_view(),
            &pool.as_view(),
            &table.as_view(),
            &table_row.as_view(),
            &first_block.as_view(),
            &seq_len.as_view(),
            &position.as_view(),
            &mut out.borrow_mut().as_view_mut(),
            &mut lse.borrow_mut().as_view_mut(),
        )
    };
    let timing = GemmBenchConfig {
        iterations: config.iterations.min(8),
        warmup: 1,
        calls_per_sample: config.calls_per_sample.min(3),
        ..config.clone()
    };
    let [split_us, one_block_us] = medians_us(device, &timing, &mut [&mut |_| run(0), &mut |_| run(1)])?;
    let kv_bytes = (context * shape.kv_heads * shape.head_dim * 2 * 2) as f64;
    Ok(AttentionBenchRow {
        context,
        split_us,
        splits: decode.key_splits(device.sms()),
        one_block_us,
        kv_tb_per_s: kv_bytes / (split_us * 1e-6) / 1e12,
        anchor_us: attention_anchor_us(context),
    })
}

fn row(
    shape: &GemmShape,
    case: &'static str,
    tokens: usize,
    experts: usize,
    max_tokens_per_expert: usize,
    measured: &Measured,
    weight_bytes: usize,
) -> GemmBenchRow {
    let seconds = measured.ours * 1e-6;
    GemmBenchRow {
        shape: shape.name,
        case,
        tokens,
        experts,
        max_tokens_per_expert,
        ours_us: measured.ours,
        cublaslt_us: measured.cublaslt,
        lone_us: measured.lone,
        weight_tb_per_s: weight_bytes as f64 / seconds / 1e12,
        tflops: 2.0 * tokens as f64 * shape.k as f64 * shape.n as f64 / seconds / 1e12,
        anchor_us: anchor_us(shape, case, tokens),
    }
}
