//! The routed experts of one MoE layer on the GPU: FP8 weights resident on the device, and one call computing a
//! step (quantise -> permute -> gate_up -> SwiGLU -> down -> unpermute).
//!
//! The plan (counting sort by expert) is made on the host: the routed expert ids arrive from the host anyway, and the
//! host must know each expert's token count to choose, per expert, the streaming kernel (few tokens: bound by reading
//! the weights) or cuBLASLt (many tokens: bound by tensor-core FLOPs) and to size the cuBLASLt calls. The device
//! kernel `permute_plan` computes the same plan for callers whose ids are already on the device.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaSlice, CudaViewMut};

use super::gemm_tuning::{OwnKernel, TuningWeights};
use super::kernels::{GroupedGemm, MMA_CHUNK, MMA_MAX_TOKENS};
use super::{driver, CudaDevice};
use crate::device::plan::{
    ExpertDims, ExpertPlan, Fp8Expert, LONE_EXPERT_MAX_TOKENS, LONE_MAX_TOKENS, LONE_ROWS, SMALL_M_MAX_TOKENS,
};
use crate::error::{check_len, product, KernelError};

/// Whether `SWITCHYARD_SMALL_GEMM=simt` forces the CUDA-core streaming kernel instead of the tensor-core one (to
/// compare them, or to rule the MMA kernel out). Read once.
fn simt_forced() -> bool {
    static SIMT: OnceLock<bool> = OnceLock::new();
    *SIMT.get_or_init(|| std::env::var("SWITCHYARD_SMALL_GEMM").is_ok_and(|v| v.trim().eq_ignore_ascii_case("simt")))
}

/// A token count from the environment variable `variable` (at most `max`), else `default`: the expert path's tuning
/// knobs for `switchyard bench gpu` on a new GPU. A value out of range is an error of every GPU expert call, not a
/// silent default.
fn token_knob(variable: &str, default: usize, max: usize) -> Result<usize, String> {
    match std::env::var(variable) {
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(tokens) if tokens <= max => Ok(tokens),
            _ => Err(format!("{variable} = {value:?} must be a token count up to {max}")),
        },
        Err(_) => Ok(default),
    }
}

/// The most tokens of an expert the streaming kernel takes: `SWITCHYARD_SMALL_M_MAX_TOKENS` (0 sends every expert to
/// cuBLASLt; at most [`MMA_MAX_TOKENS`]), else [`SMALL_M_MAX_TOKENS`]. Read once.
pub fn small_m_max_tokens() -> Result<usize, KernelError> {
    static THRESHOLD: OnceLock<Result<usize, String>> = OnceLock::new();
    THRESHOLD
        .get_or_init(|| token_knob("SWITCHYARD_SMALL_M_MAX_TOKENS", SMALL_M_MAX_TOKENS, MMA_MAX_TOKENS))
        .clone()
        .map_err(|message| KernelError::invalid("streaming threshold", message))
}

/// The most tokens of an expert that runs alone over the whole GPU (`fp8_lone_expert_gemm`) instead of in cuBLASLt:
/// `SWITCHYARD_LONE_EXPERT_MAX_TOKENS` (0: none; at most [`LONE_MAX_TOKENS`]), else [`LONE_EXPERT_MAX_TOKENS`]. Read
/// once.
pub fn lone_expert_max_tokens() -> Result<usize, KernelError> {
    static THRESHOLD: OnceLock<Result<usize, String>> = OnceLock::new();
    THRESHOLD
        .get_or_init(|| token_knob("SWITCHYARD_LONE_EXPERT_MAX_TOKENS", LONE_EXPERT_MAX_TOKENS, LONE_MAX_TOKENS))
        .clone()
        .map_err(|message| KernelError::invalid("lone expert threshold", message))
}

impl CudaDevice {
    /// The grouped FP8 GEMM of one projection for all experts of a plan: experts with `1..=`[`small_m_max_tokens`]
    /// tokens in one launch of the streaming kernel (tensor cores when `n % 16 == 0` and `k % 128 == 0`, else CUDA
    /// cores) when there are at least `MIN_STREAMING_EXPERTS` of them; each other expert alone over the whole GPU
    /// (`fp8_lone_expert_gemm`) when it has at most [`lone_expert_max_tokens`] tokens and `n % 128 == 0`, else through
    /// cuBLASLt with the algorithm timed fastest for its shape and token bucket (`gemm_tuning`), or the lone-expert
    /// kernel where that timing found it faster (raw sums of up to 32 tokens). `a`:
    /// `[slots, k]` codes in plan order, `a_scale`: `[slots]`; `offsets`: the plan's offsets on the device; `w`:
    /// `[experts, n, k]`, `w_scale`: `[experts, n]`; `out`: `[slots, n]`, scaled or raw as `gemm.apply_scales` says
    /// (raw: cuBLASLt runs with unit scales and nothing else; scaled: row-wise scales fused in cuBLASLt where it
    /// supports them, else its epilogue kernel).
    pub fn fp8_grouped_gemm(
        &self,
        plan: &ExpertPlan,
        gemm: &GroupedGemm<'_, '_>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda fp8_grouped_gemm";
        let GroupedGemm { a_scale, offsets, n, k, .. } = *gemm;
        check_len(OP, "offsets", offsets.len(), plan.offsets.len(), "plan.offsets.len()")?;
        check_len(OP, "a_scale", a_scale.len(), plan.slot_row.len(), "slots")?;
        let threshold = plan.streaming_threshold(small_m_max_tokens()?);
        let small_max = plan.small_max_tokens(threshold);
        if small_max > 0 {
            if n % 16 == 0 && k % MMA_CHUNK == 0 && !simt_forced() {
                self.fp8_grouped_gemm_mma(gemm, small_max, out)?;
            } else {
                self.fp8_grouped_gemm_small(gemm, small_max, out)?;
            }
        }
        let lone_shape = n % LONE_ROWS == 0 && k % MMA_CHUNK == 0;
        let lone_max = if lone_shape { lone_expert_max_tokens()? } else { 0 };
        let weight = product(OP, n, k)?;
        let tuning = TuningWeights { weights: gemm.w, experts: gemm.w.len() / weight };
        for (expert, first, tokens) in plan.large_experts(threshold) {
            // The lone-expert kernel where the knob routes the count to it; else, for raw sums (the expert layer's
            // GEMM), whichever the tuning timed fastest for the count's bucket: a cuBLASLt algorithm or our kernel.
            let own = if tokens <= lone_max {
                Some(OwnKernel::Lone)
            } else if gemm.apply_scales {
                None
            } else {
                self.tuned_own_kernel(n, k, tokens, tuning)?
            };
            match own {
                Some(OwnKernel::Lone) => self.fp8_lone_expert_gemm(gemm, expert, first, tokens, None, out)?,
                Some(OwnKernel::Warpgroup(launch)) => {
                    self.fp8_warpgroup_expert_gemm(gemm, expert, first, tokens, launch, out)?
                }
                None => self.fp8_expert_gemm_cublaslt(gemm, expert, first, tokens, out)?,
            }
        }
        Ok(())
    }
}

/// The routed experts of one layer resident on a GPU: gate and up fused into one `[2 * intermediate, hidden]`
/// weight per expert (gate rows first), so a step runs one gate_up GEMM; FP8 codes and their per-row scales stay FP8
/// on the device.
pub struct GpuExpertLayer {
    device: Arc<CudaDevice>,
    dims: ExpertDims,
    experts: usize,
    gate_up: CudaSlice<u8>,
    gate_up_scales: CudaSlice<f32>,
    down: CudaSlice<u8>,
    down_scales: CudaSlice<f32>,
}

impl std::fmt::Debug for GpuExpertLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuExpertLayer({} experts, {:?}, {:?})", self.experts, self.dims, self.device)
    }
}

impl GpuExpertLayer {
    /// Uploads `experts` (local index `i` is `experts[i]`). All must share FP8 shapes whose sizes are multiples of
    /// 16 (see [`ExpertDims::of`]).
    pub fn upload(device: &Arc<CudaDevice>, experts: &[Fp8Expert<'_>]) -> Result<Self, KernelError> {
        let dims = ExpertDims::of(experts)?;
        let (hidden, inter) = (dims.hidden, dims.intermediate);
        let count = experts.len();
        let stream = device.stream();
        let alloc = |len: usize| -> Result<CudaSlice<u8>, KernelError> { device.zeros::<u8>(len) };
        let mut gate_up = alloc(count * 2 * inter * hidden)?;
        let mut down = alloc(count * hidden * inter)?;
        let mut gate_up_scales = Vec::with_capacity(count * 2 * inter);
        let mut down_scales = Vec::with_capacity(count * hidden);
        let per_gate = inter * hidden;
        for (e, expert) in experts.iter().enumerate() {
            let base = e * 2 * per_gate;
            stream
                .memcpy_htod(expert.gate.codes, &mut gate_up.slice_mut(base..base + per_gate))
                .map_err(driver("expert weight upload"))?;
            stream
                .memcpy_htod(expert.up.codes, &mut gate_up.slice_mut(base + per_gate..base + 2 * per_gate))
                .map_err(driver("expert weight upload"))?;
            stream
                .memcpy_htod(expert.down.codes, &mut down.slice_mut(e * per_gate..(e + 1) * per_gate))
                .map_err(driver("expert weight upload"))?;
            gate_up_scales.extend_from_slice(expert.gate.scales);
            gate_up_scales.extend_from_slice(expert.up.scales);
            down_scales.extend_from_slice(expert.down.scales);
        }
        let gate_up_scales = device.upload(&gate_up_scales)?;
        let down_scales = device.upload(&down_scales)?;
        device.synchronize()?;
        Ok(GpuExpertLayer { device: device.clone(), dims, experts: count, gate_up, gate_up_scales, down, down_scales })
    }

    /// Experts held.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// The layer's dimensions.
    pub fn dims(&self) -> ExpertDims {
        self.dims
    }

    /// Bytes of weights and scales on the device.
    pub fn weight_bytes(&self) -> usize {
        self.gate_up.len() + self.down.len() + 4 * (self.gate_up_scales.len() + self.down_scales.len())
    }

    /// Computes one step: `inputs` holds `routed.len()` rows of `hidden` values (already scaled by the router),
    /// row `i` going to local expert `routed[i]`; returns the expert outputs in row order. The same arithmetic as the
    /// CPU's `ExpertWeights::forward` with per-token FP8 activations: quantise, gate_up, SwiGLU, re-quantise, down.
    pub fn forward(&self, inputs: &[f32], routed: &[u32]) -> Result<Vec<f32>, KernelError> {
        const OP: &str = "gpu experts forward";
        let (hidden, inter) = (self.dims.hidden, self.dims.intermediate);
        let rows = routed.len();
        check_len(
            OP,
            "inputs",
            inputs.len(),
            product(OP, rows, hidden)?,
            format_args!("rows * hidden = {rows} * {hidden}"),
        )?;
        let plan = ExpertPlan::new(routed, self.experts)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let device = &self.device;
        let x = device.upload(inputs)?;
        let slot_row = device.upload(&plan.slot_row)?;
        let offsets = device.upload(&plan.offsets)?;
        // Every per-step buffer is written in full before it is read (the gather, the quantisation, both GEMMs, which
        // cover every slot of every expert with tokens, the SwiGLU, the scatter): none needs zeroing.
        let mut permuted = device.uninit::<f32>(rows * hidden)?;
        device.gather_rows(&x.as_view(), &slot_row.as_view(), hidden, &mut permuted.as_view_mut())?;
        let mut a = device.uninit::<u8>(rows * hidden)?;
        let mut a_scale = device.uninit::<f32>(rows)?;
        device.quantize_rows(&permuted.as_view(), rows, hidden, &mut a.as_view_mut(), &mut a_scale.as_view_mut())?;
        let mut gate_up = device.uninit::<f32>(rows * 2 * inter)?;
        let gate_up_gemm = GroupedGemm {
            a: &a.as_view(),
            a_scale: &a_scale.as_view(),
            offsets: &offsets.as_view(),
            w: &self.gate_up.as_view(),
            w_scale: &self.gate_up_scales.as_view(),
            n: 2 * inter,
            k: hidden,
            apply_scales: false,
        };
        // Both GEMMs write raw sums: their row-wise scales are applied by the SwiGLU and the combine below.
        device.fp8_grouped_gemm(&plan, &gate_up_gemm, &mut gate_up.as_view_mut())?;
        let mut h = device.uninit::<u8>(rows * inter)?;
        let mut h_scale = device.uninit::<f32>(rows)?;
        device.silu_mul_quantize(
            &gate_up.as_view(),
            rows,
            inter,
            Some(&gate_up_gemm.scales()),
            &mut h.as_view_mut(),
            &mut h_scale.as_view_mut(),
        )?;
        let mut y = device.uninit::<f32>(rows * hidden)?;
        let down_gemm = GroupedGemm {
            a: &h.as_view(),
            a_scale: &h_scale.as_view(),
            offsets: &offsets.as_view(),
            w: &self.down.as_view(),
            w_scale: &self.down_scales.as_view(),
            n: hidden,
            k: inter,
            apply_scales: false,
        };
        device.fp8_grouped_gemm(&plan, &down_gemm, &mut y.as_view_mut())?;
        // `permuted` is free again: the outputs in row order go there.
        device.scatter_rows(
            &y.as_view(),
            &slot_row.as_view(),
            hidden,
            &mut permuted.as_view_mut(),
            Some(&down_gemm.scales()),
        )?;
        device.download(&permuted)
    }
}
