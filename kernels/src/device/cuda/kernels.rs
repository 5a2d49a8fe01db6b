//! Typed wrappers of the kernels in `kernels/cuda/`: each checks the buffer lengths against the dimensions given
//! (a [`KernelError::Shape`] naming the buffer, never an out-of-bounds access on the GPU) and launches on the
//! device's stream. Buffers are cudarc views, so callers can pass parts of larger buffers.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::timing::random_codes;
use super::{driver, lock, CudaDevice};
use crate::device::plan::{
    LoneExpertGrid, WarpgroupExpertGrid, WarpgroupLaunch, LONE_THREADS, WARPGROUP_CHUNK, WARPGROUP_THREADS,
};
use crate::device::sources::{CudaSource, ATTENTION_CU, EXPERTS_CU, HOPPER_CU};
use crate::device::types::{KvDtype, KvElement, PagedDecode};
use crate::error::{check_len, product, KernelError};
use crate::fp8::E4M3_TO_F32;

/// Threads per block of the row kernels (a multiple of 32, at most 1024).
pub(super) const ROW_THREADS: u32 = 256;
/// Warps per block of `fp8_grouped_gemm_small` (its `WARPS_PER_BLOCK`).
const GEMM_WARPS: usize = 8;
/// Weight rows one warp streams in `fp8_grouped_gemm_small`.
const GEMM_ROWS_PER_WARP: usize = 2;
/// Warps per block of `fp8_grouped_gemm_mma_t*` (its `MMA_WARPS`): they split `k` for one block's 16 weight rows.
const MMA_WARPS: usize = 4;
/// What `k` must divide by for `fp8_grouped_gemm_mma_t*` (its `MMA_CHUNK`: the columns one step of a warp covers).
pub const MMA_CHUNK: usize = 128;
/// Most tokens per expert the tensor-core streaming kernel takes (`fp8_grouped_gemm_mma_t4`: 4 tiles of 8).
pub const MMA_MAX_TOKENS: usize = 32;
/// The largest head dimension `paged_decode_attention` takes (its `MAX_HEAD_DIM`).
const MAX_HEAD_DIM: usize = 256;
/// Threads of one `paged_decode_attention` block (its `ATTENTION_WARPS` warps).
const ATTENTION_THREADS: u32 = 4 * 32;

/// `value` as the `int` a kernel takes.
pub(super) fn int(op: &'static str, name: &str, value: usize) -> Result<i32, KernelError> {
    i32::try_from(value)
        .map_err(|_| KernelError::invalid(op, format!("{name} = {value} exceeds the kernels' i32 range")))
}

/// Grid size as u32.
pub(super) fn blocks(op: &'static str, count: usize) -> Result<u32, KernelError> {
    u32::try_from(count.max(1)).map_err(|_| KernelError::invalid(op, format!("{count} blocks exceed the grid limit")))
}

/// The operands of one grouped FP8 GEMM over the experts of a layer, `out[slot, o] = w_scale[e, o] * a_scale[slot]
/// * sum_c e4m3(a[slot, c]) * e4m3(w[e, o, c])` for the slots of each expert `e` (without the two scales when
/// `apply_scales` is false).
#[derive(Clone, Copy)]
pub struct GroupedGemm<'a, 'b> {
    /// `[slots, k]` E4M3 codes, in plan order (the slots of expert 0, then of expert 1, ...).
    pub a: &'a CudaView<'b, u8>,
    /// `[slots]` per-slot scales of `a`.
    pub a_scale: &'a CudaView<'b, f32>,
    /// `experts + 1` slot offsets on the device (the plan's).
    pub offsets: &'a CudaView<'b, u32>,
    /// `[experts, n, k]` E4M3 weights.
    pub w: &'a CudaView<'b, u8>,
    /// `[experts, n]` per-row scales of `w`.
    pub w_scale: &'a CudaView<'b, f32>,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Whether the output is scaled. `false` writes the raw sums and leaves `a_scale[slot] * w_scale[e, o]` to the
    /// kernel that reads them ([`ExpertScales`]): the expert layer's SwiGLU and combine read every value anyway, so
    /// the scales cost nothing there, while cuBLASLt (which has no row-wise scales on Hopper) would need an extra
    /// pass over the output.
    pub apply_scales: bool,
}

/// The row-wise scales of a grouped GEMM whose raw sums a later kernel reads (`apply_scales: false`): that kernel
/// multiplies value `[slot, o]` by `w_scale[e, o] * a_scale[slot]`, `e` the slot's expert under `offsets`.
#[derive(Clone, Copy)]
pub struct ExpertScales<'a, 'b> {
    /// `[slots]` per-slot activation scales.
    pub a_scale: &'a CudaView<'b, f32>,
    /// `[experts, n]` per-row weight scales.
    pub w_scale: &'a CudaView<'b, f32>,
    /// `experts + 1` slot offsets on the device (the plan's).
    pub offsets: &'a CudaView<'b, u32>,
}

impl ExpertScales<'_, '_> {
    /// Checks the lengths against `slots` rows of `n` values; returns the number of experts.
    fn check(&self, op: &'static str, slots: usize, n: usize) -> Result<usize, KernelError> {
        let experts = experts_of(op, self.offsets)?;
        check_len(op, "a_scale", self.a_scale.len(), slots, "slots")?;
        check_len(
            op,
            "w_scale",
            self.w_scale.len(),
            product(op, experts, n)?,
            format_args!("experts * n = {experts} * {n}"),
        )?;
        Ok(experts)
    }
}

/// The number of experts a plan's `offsets` (experts + 1 values) describe: at least one.
fn experts_of(op: &'static str, offsets: &CudaView<'_, u32>) -> Result<usize, KernelError> {
    offsets
        .len()
        .checked_sub(1)
        .filter(|&e| e > 0)
        .ok_or_else(|| KernelError::invalid(op, "offsets must hold experts + 1 >= 2 values"))
}

impl<'a, 'b> GroupedGemm<'a, 'b> {
    /// The row-wise scales of this GEMM, for the kernel that reads its raw sums (`apply_scales: false`).
    pub fn scales(&self) -> ExpertScales<'a, 'b> {
        ExpertScales { a_scale: self.a_scale, w_scale: self.w_scale, offsets: self.offsets }
    }
}

/// What the stream-K expert kernels (`fp8_lone_expert_gemm`, `fp8_warpgroup_expert_gemm`) keep between launches: the
/// arrival counters of their row blocks (zero between launches: the last block at a row block resets its counter, so
/// no launch has to clear them) and the partial-sum workspace. Both grow to the largest launch seen; one stream runs
/// the launches one after another, so the two kernels share them.
#[derive(Default)]
pub(super) struct StreamKScratch {
    arrivals: Option<CudaSlice<u32>>,
    workspace: Option<CudaSlice<f32>>,
}

/// How a GPU's wgmma reads the two byte offsets of a shared-memory matrix descriptor (K-major, no swizzle), as
/// `wgmma_probe` found: as the PTX ISA is read in hopper.cu (the "leading" offset between core matrices adjacent in k,
/// the "stride" offset between those adjacent in n), or the two swapped. Kernels take the offsets as arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WgmmaReading {
    /// The hardware reads the leading offset as the one between core matrices adjacent in n.
    pub offsets_swapped: bool,
}

impl WgmmaReading {
    /// The descriptor's (leading, stride) fields for core matrices `k_adjacent` bytes apart in k and `n_adjacent` in n.
    pub(crate) fn offsets(self, k_adjacent: u32, n_adjacent: u32) -> (u32, u32) {
        if self.offsets_swapped {
            (n_adjacent, k_adjacent)
        } else {
            (k_adjacent, n_adjacent)
        }
    }
}

/// How a stream-K one-expert kernel is launched: its grid type's numbers.
struct StreamKLaunch {
    blocks: usize,
    threads: usize,
    shared_bytes: usize,
    row_blocks: usize,
    workspace_floats: usize,
}

/// One expert's operands of a grouped GEMM, as a one-expert kernel takes them: its slots' activations, scales and
/// output rows, its weights and weight scales, and the scalars.
struct OneExpert<'v> {
    a: CudaView<'v, u8>,
    a_scale: CudaView<'v, f32>,
    w: CudaView<'v, u8>,
    w_scale: CudaView<'v, f32>,
    out: CudaViewMut<'v, f32>,
    tokens: i32,
    n: i32,
    k: i32,
    apply_scales: i32,
}

impl<'v> OneExpert<'v> {
    /// Expert `expert`'s part of `gemm` (of `experts` experts, checked by `check_grouped`): its `tokens` slots from
    /// `first`.
    fn of(
        op: &'static str,
        gemm: &GroupedGemm<'v, '_>,
        experts: usize,
        expert: usize,
        first: usize,
        tokens: usize,
        out: &'v mut CudaViewMut<'_, f32>,
    ) -> Result<Self, KernelError> {
        let GroupedGemm { a, a_scale, w, w_scale, n, k, apply_scales, .. } = *gemm;
        if expert >= experts || first + tokens > a_scale.len() {
            return Err(KernelError::invalid(
                op,
                format!(
                    "expert {expert} with slots {first}..{} is outside {experts} experts and {} slots",
                    first + tokens,
                    a_scale.len()
                ),
            ));
        }
        let weight = n * k;
        Ok(OneExpert {
            a: a.slice(first * k..(first + tokens) * k),
            a_scale: a_scale.slice(first..first + tokens),
            w: w.slice(expert * weight..(expert + 1) * weight),
            w_scale: w_scale.slice(expert * n..(expert + 1) * n),
            out: out.slice_mut(first * n..(first + tokens) * n),
            tokens: int(op, "tokens", tokens)?,
            n: int(op, "n", n)?,
            k: int(op, "k", k)?,
            apply_scales: i32::from(apply_scales),
        })
    }
}

/// The shape checks of the grouped GEMMs; returns the number of experts. `k_multiple`: what `k` must divide by.
fn check_grouped(
    op: &'static str,
    gemm: &GroupedGemm<'_, '_>,
    k_multiple: usize,
    out: &CudaViewMut<'_, f32>,
) -> Result<usize, KernelError> {
    let GroupedGemm { a, a_scale, offsets, w, w_scale, n, k, .. } = *gemm;
    if k == 0 || k % k_multiple != 0 || n == 0 {
        return Err(KernelError::invalid(
            op,
            format!("k = {k} must be a positive multiple of {k_multiple} and n = {n} positive"),
        ));
    }
    let experts = experts_of(op, offsets)?;
    let slots = a_scale.len();
    check_len(op, "a", a.len(), product(op, slots, k)?, format_args!("slots * k = {slots} * {k}"))?;
    let weight_values = product(op, product(op, experts, n)?, k)?;
    check_len(op, "w", w.len(), weight_values, format_args!("experts * n * k = {experts} * {n} * {k}"))?;
    check_len(op, "w_scale", w_scale.len(), experts * n, format_args!("experts * n = {experts} * {n}"))?;
    check_len(op, "out", out.len(), product(op, slots, n)?, format_args!("slots * n = {slots} * {n}"))?;
    Ok(experts)
}

impl CudaDevice {
    /// Per-row dynamic FP8 quantisation of `x` (`rows` x `cols`): bit for bit `fp8::quantize_rows`.
    pub fn quantize_rows(
        &self,
        x: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
        q: &mut CudaViewMut<'_, u8>,
        scales: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda quantize_rows";
        let values = product(OP, rows, cols)?;
        check_len(OP, "x", x.len(), values, format_args!("rows * cols = {rows} * {cols}"))?;
        check_len(OP, "q", q.len(), values, "x.len()")?;
        check_len(OP, "scales", scales.len(), rows, "rows")?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let f = self.function(&EXPERTS_CU, "quantize_rows_e4m3")?;
        let (rows_i, cols_i) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
        let cfg =
            LaunchConfig { grid_dim: (blocks(OP, rows)?, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(&rows_i).arg(&cols_i).arg(q).arg(scales);
        // SAFETY: the arguments match the kernel's signature and the lengths were checked above.
        unsafe { launch.launch(cfg) }.map_err(driver("launch quantize_rows_e4m3"))?;
        Ok(())
    }

    /// The stable counting sort of `rows` routed rows by expert on the device (see `plan::ExpertPlan`, which it
    /// matches): `offsets` gets `experts + 1` values, `slot_row` one per row. Expert ids must be `< experts`; the
    /// device cannot report a bad one, so callers check ids on the host (as `ExpertPlan::new` does).
    pub fn permute_plan(
        &self,
        routed: &CudaView<'_, u32>,
        experts: usize,
        offsets: &mut CudaViewMut<'_, u32>,
        slot_row: &mut CudaViewMut<'_, u32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda permute_plan";
        let rows = routed.len();
        check_len(OP, "offsets", offsets.len(), experts + 1, "experts + 1")?;
        check_len(OP, "slot_row", slot_row.len(), rows, "routed.len()")?;
        if experts == 0 || experts > 4096 {
            return Err(KernelError::invalid(OP, format!("experts = {experts} must be in 1..=4096")));
        }
        let f = self.function(&EXPERTS_CU, "permute_plan")?;
        let (rows_i, experts_i) = (int(OP, "rows", rows)?, int(OP, "experts", experts)?);
        let threads = 256u32;
        let shared = (2 * experts + threads as usize) * 4;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared as u32 };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(routed).arg(&rows_i).arg(&experts_i).arg(offsets).arg(slot_row);
        // SAFETY: signature matched; lengths checked; 2 * 4096 + 256 ints fit the default 48 KB of shared memory.
        unsafe { launch.launch(cfg) }.map_err(driver("launch permute_plan"))?;
        Ok(())
    }

    fn move_rows(
        &self,
        kernel: &'static str,
        src: &CudaView<'_, f32>,
        slot_row: &CudaView<'_, u32>,
        cols: usize,
        dst: &mut CudaViewMut<'_, f32>,
        scales: Option<&ExpertScales<'_, '_>>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda gather/scatter rows";
        let slots = slot_row.len();
        let values = product(OP, slots, cols)?;
        check_len(OP, "source", src.len(), values, format_args!("slots * cols = {slots} * {cols}"))?;
        check_len(OP, "destination", dst.len(), values, format_args!("slots * cols = {slots} * {cols}"))?;
        let experts = scales.map(|scales| scales.check(OP, slots, cols)).transpose()?;
        if slots == 0 || cols == 0 {
            return Ok(());
        }
        let f = self.function(&EXPERTS_CU, kernel)?;
        let (slots_i, cols_i) = (int(OP, "slots", slots)?, int(OP, "cols", cols)?);
        let experts_i = int(OP, "experts", experts.unwrap_or(0))?;
        let null: u64 = 0;
        let column_blocks = cols.div_ceil(ROW_THREADS as usize).min(8);
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, slots)?, column_blocks as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(src).arg(slot_row).arg(&slots_i).arg(&cols_i);
        if kernel == "scatter_rows" {
            match scales {
                Some(scales) => launch.arg(scales.a_scale).arg(scales.w_scale).arg(scales.offsets),
                None => launch.arg(&null).arg(&null).arg(&null),
            };
            launch.arg(&experts_i);
        }
        launch.arg(dst);
        // SAFETY: signature matched (scatter_rows takes the optional scales, null pointers for none); lengths
        // checked. Slot indices must be rows < slots (a permutation), and the offsets non-decreasing and ending at
        // `slots`, which the plan guarantees.
        unsafe { launch.launch(cfg) }.map_err(driver("launch gather/scatter rows"))?;
        Ok(())
    }

    /// `out[slot] = x[slot_row[slot]]` for rows of `cols` values (`slot_row` a permutation of `0..slots`).
    pub fn gather_rows(
        &self,
        x: &CudaView<'_, f32>,
        slot_row: &CudaView<'_, u32>,
        cols: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        self.move_rows("gather_rows", x, slot_row, cols, out, None)
    }

    /// The inverse of [`CudaDevice::gather_rows`]: `out[slot_row[slot]] = y[slot]`, with each value scaled by
    /// `scales` (the raw sums of a grouped GEMM's `[slots, cols]` output) when given.
    pub fn scatter_rows(
        &self,
        y: &CudaView<'_, f32>,
        slot_row: &CudaView<'_, u32>,
        cols: usize,
        out: &mut CudaViewMut<'_, f32>,
        scales: Option<&ExpertScales<'_, '_>>,
    ) -> Result<(), KernelError> {
        self.move_rows("scatter_rows", y, slot_row, cols, out, scales)
    }

    /// SwiGLU on the fused gate_up output (`rows` x `2 * inter`: gate then up) and per-row FP8 re-quantisation:
    /// `q`, `scales` as [`CudaDevice::quantize_rows`] of `silu(gate) * up`. With `gemm_scales`, `gate_up` holds a
    /// grouped GEMM's raw sums, scaled here first.
    #[allow(clippy::too_many_arguments)]
    pub fn silu_mul_quantize(
        &self,
        gate_up: &CudaView<'_, f32>,
        rows: usize,
        inter: usize,
        gemm_scales: Option<&ExpertScales<'_, '_>>,
        q: &mut CudaViewMut<'_, u8>,
        scales: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda silu_mul_quantize";
        let values = product(OP, rows, inter)?;
        check_len(OP, "gate_up", gate_up.len(), 2 * values, format_args!("rows * 2 * inter = {rows} * 2 * {inter}"))?;
        check_len(OP, "q", q.len(), values, format_args!("rows * inter = {rows} * {inter}"))?;
        check_len(OP, "scales", scales.len(), rows, "rows")?;
        let experts = gemm_scales.map(|s| s.check(OP, rows, product(OP, 2, inter)?)).transpose()?;
        // The row of activations is staged in dynamic shared memory (8192 floats for Maverick) next to block_amax's
        // 32 static floats, all within the 48 KB a launch gets without opting in.
        const MAX_INTER: usize = (48 * 1024 - 32 * 4) / 4;
        if inter > MAX_INTER {
            return Err(KernelError::invalid(OP, format!("inter = {inter} exceeds the {MAX_INTER} the kernel stages")));
        }
        if rows == 0 {
            return Ok(());
        }
        let f = self.function(&EXPERTS_CU, "silu_mul_quantize_e4m3")?;
        let (rows_i, inter_i) = (int(OP, "rows", rows)?, int(OP, "inter", inter)?);
        let experts_i = int(OP, "experts", experts.unwrap_or(0))?;
        let null: u64 = 0;
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, rows)?, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (inter * 4) as u32,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(gate_up).arg(&rows_i).arg(&inter_i);
        match gemm_scales {
            Some(s) => launch.arg(s.a_scale).arg(s.w_scale).arg(s.offsets),
            None => launch.arg(&null).arg(&null).arg(&null),
        };
        launch.arg(&experts_i).arg(q).arg(scales).arg(&null);
        // SAFETY: signature matched (null scale pointers: none to apply; the last pointer null: no f32 copy wanted);
        // lengths checked; the offsets, when given, are a plan's (non-decreasing, ending at `rows`).
        unsafe { launch.launch(cfg) }.map_err(driver("launch silu_mul_quantize_e4m3"))?;
        Ok(())
    }

    /// The grouped weight-streaming FP8 GEMM ([`GroupedGemm`]) for every expert with `1..=max_tokens` tokens, on the
    /// CUDA cores; `k` must be a multiple of 16. Rows of experts with more tokens are left untouched (cuBLASLt
    /// computes them).
    pub fn fp8_grouped_gemm_small(
        &self,
        gemm: &GroupedGemm<'_, '_>,
        max_tokens: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda fp8_grouped_gemm_small";
        let experts = check_grouped(OP, gemm, 16, out)?;
        let GroupedGemm { a, a_scale, offsets, w, w_scale, n, k, apply_scales } = *gemm;
        let f = self.function(&EXPERTS_CU, "fp8_grouped_gemm_small")?;
        let (n_i, k_i) = (int(OP, "n", n)?, int(OP, "k", k)?);
        let max_i = int(OP, "max_tokens", max_tokens)?;
        let rows_per_warp = GEMM_ROWS_PER_WARP as i32;
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, n.div_ceil(GEMM_WARPS * GEMM_ROWS_PER_WARP))?, blocks(OP, experts)?, 1),
            block_dim: ((GEMM_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(a).arg(a_scale).arg(offsets).arg(w).arg(w_scale).arg(&n_i).arg(&k_i).arg(&max_i);
        let apply_i = i32::from(apply_scales);
        launch.arg(&rows_per_warp).arg(&apply_i).arg(out);
        // SAFETY: signature matched; lengths checked; the offsets must be non-decreasing and end at most at `slots`
        // (ExpertPlan's are).
        unsafe { launch.launch(cfg) }.map_err(driver("launch fp8_grouped_gemm_small"))?;
        Ok(())
    }

    /// [`CudaDevice::fp8_grouped_gemm_small`] on the tensor cores (mma.sync m16n8k32 E4M3, f32 accumulation): the same
    /// contract, with `n` a multiple of 16, `k` of [`MMA_CHUNK`] and `max_tokens` at most [`MMA_MAX_TOKENS`] (one pass
    /// over the weights). The kernel is the one with the fewest 8-token tiles covering `max_tokens`. Needs sm_89 or
    /// later.
    pub fn fp8_grouped_gemm_mma(
        &self,
        gemm: &GroupedGemm<'_, '_>,
        max_tokens: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda fp8_grouped_gemm_mma";
        let GroupedGemm { a, a_scale, offsets, w, w_scale, n, k, apply_scales } = *gemm;
        if n % 16 != 0 || max_tokens > MMA_MAX_TOKENS {
            return Err(KernelError::invalid(
                OP,
                format!("n = {n} must be a multiple of 16 and max_tokens = {max_tokens} at most {MMA_MAX_TOKENS}"),
            ));
        }
        let experts = check_grouped(OP, gemm, MMA_CHUNK, out)?;
        let kernel = match max_tokens {
            0..=8 => "fp8_grouped_gemm_mma_t1",
            9..=16 => "fp8_grouped_gemm_mma_t2",
            _ => "fp8_grouped_gemm_mma_t4",
        };
        let f = self.function(&EXPERTS_CU, kernel)?;
        let (n_i, k_i) = (int(OP, "n", n)?, int(OP, "k", k)?);
        let max_i = int(OP, "max_tokens", max_tokens)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, n / 16)?, blocks(OP, experts)?, 1),
            block_dim: ((MMA_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let apply_i = i32::from(apply_scales);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(a).arg(a_scale).arg(offsets).arg(w).arg(w_scale).arg(&n_i).arg(&k_i).arg(&max_i);
        launch.arg(&apply_i).arg(out);
        // SAFETY: signature matched; lengths and divisibility checked; offsets as for the CUDA-core kernel.
        unsafe { launch.launch(cfg) }.map_err(driver(kernel))?;
        Ok(())
    }

    /// The buffer in `slot`, replaced by a zeroed one of `len` values when missing or shorter.
    fn grown<'s, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        slot: &'s mut Option<CudaSlice<T>>,
        len: usize,
    ) -> Result<&'s mut CudaSlice<T>, KernelError> {
        if slot.as_ref().is_some_and(|buffer| buffer.len() < len) {
            *slot = None;
        }
        match slot {
            Some(buffer) => Ok(buffer),
            None => Ok(slot.insert(self.zeros::<T>(len)?)),
        }
    }

    /// One expert's part of a grouped GEMM ([`GroupedGemm`]: expert `expert`, whose `tokens` slots start at `first`)
    /// on the whole GPU: `fp8_lone_expert_gemm`, stream-K over every SM with the activations staged in shared memory
    /// ([`LoneExpertGrid`]; `grid_blocks` overrides its block count, for tests and tuning). `tokens` in
    /// `1..=`[`crate::device::plan::LONE_MAX_TOKENS`], `n` a multiple of 128, `k` of [`MMA_CHUNK`]; sm_89 or later.
    /// Only that expert's rows of `out` are written.
    pub fn fp8_lone_expert_gemm(
        &self,
        gemm: &GroupedGemm<'_, '_>,
        expert: usize,
        first: usize,
        tokens: usize,
        grid_blocks: Option<usize>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda fp8_lone_expert_gemm";
        let experts = check_grouped(OP, gemm, MMA_CHUNK, out)?;
        let grid = LoneExpertGrid::new(tokens, gemm.n, gemm.k, self.sms, grid_blocks)?;
        let part = OneExpert::of(OP, gemm, experts, expert, first, tokens, out)?;
        let kernel = match grid.tiles {
            1 => "fp8_lone_expert_gemm_t1",
            2 => "fp8_lone_expert_gemm_t2",
            _ => "fp8_lone_expert_gemm_t4",
        };
        let grid = StreamKLaunch {
            blocks: grid.blocks,
            threads: LONE_THREADS,
            shared_bytes: grid.shared_bytes,
            row_blocks: grid.row_blocks,
            workspace_floats: grid.workspace_floats,
        };
        self.launch_stream_k(OP, &EXPERTS_CU, kernel, grid, part, None)
    }

    /// One expert's part of a grouped GEMM (as [`CudaDevice::fp8_lone_expert_gemm`]) on Hopper's warpgroup MMA:
    /// `fp8_warpgroup_expert_gemm` (hopper.cu), stream-K with `launch`'s ring depth and blocks
    /// ([`WarpgroupExpertGrid`]). `tokens` in `1..=`[`crate::device::plan::WARPGROUP_MAX_TOKENS`], `n` a multiple of
    /// 128, `k` of [`WARPGROUP_CHUNK`]; compute capability 9.0 only, and only once `wgmma_probe` has confirmed how
    /// the GPU reads the descriptors ([`CudaDevice::wgmma_reading`]). Only that expert's rows of `out` are written.
    pub fn fp8_warpgroup_expert_gemm(
        &self,
        gemm: &GroupedGemm<'_, '_>,
        expert: usize,
        first: usize,
        tokens: usize,
        launch: WarpgroupLaunch,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda fp8_warpgroup_expert_gemm";
        let experts = check_grouped(OP, gemm, WARPGROUP_CHUNK, out)?;
        let grid = WarpgroupExpertGrid::new(tokens, gemm.n, gemm.k, launch)?;
        let part = OneExpert::of(OP, gemm, experts, expert, first, tokens, out)?;
        let descriptor = self.wgmma_reading()?.offsets(2048, 128);
        let kernel = grid.launch.stages.kernel();
        let launch = StreamKLaunch {
            blocks: grid.launch.blocks,
            threads: WARPGROUP_THREADS,
            shared_bytes: grid.shared_bytes,
            row_blocks: grid.row_blocks,
            workspace_floats: grid.workspace_floats,
        };
        self.launch_stream_k(OP, &HOPPER_CU, kernel, launch, part, Some(descriptor))
    }

    /// Launches a stream-K one-expert kernel (`kernel` of `source`) on `part`'s operands, with the scratch grown to
    /// `launch`'s workspace and counters; `descriptor`: the (leading, stride) descriptor offsets a wgmma kernel takes
    /// after the scalars.
    fn launch_stream_k(
        &self,
        op: &'static str,
        source: &CudaSource,
        kernel: &'static str,
        launch: StreamKLaunch,
        part: OneExpert<'_>,
        descriptor: Option<(u32, u32)>,
    ) -> Result<(), KernelError> {
        let f = self.function(source, kernel)?;
        let shared = self.allow_dynamic_shared(op, &f, kernel, launch.shared_bytes)?;
        let mut scratch = lock(&self.stream_k_scratch);
        let StreamKScratch { arrivals, workspace } = &mut *scratch;
        let arrivals = self.grown(arrivals, launch.row_blocks)?;
        let workspace = self.grown(workspace, launch.workspace_floats)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(op, launch.blocks)?, 1, 1),
            block_dim: (launch.threads as u32, 1, 1),
            shared_mem_bytes: shared,
        };
        let OneExpert { a, a_scale, w, w_scale, mut out, tokens, n, k, apply_scales } = part;
        let mut builder = self.stream.launch_builder(&f);
        builder.arg(&a).arg(&a_scale).arg(&w).arg(&w_scale).arg(&tokens).arg(&n).arg(&k).arg(&apply_scales);
        let (leading, stride) = descriptor.unwrap_or_default();
        if descriptor.is_some() {
            builder.arg(&leading).arg(&stride);
        }
        builder.arg(workspace).arg(arrivals).arg(&mut out);
        // SAFETY: the kernel's signature is matched (the descriptor offsets only for the wgmma kernel); lengths checked
        // (check_grouped, OneExpert::of); the grid is the kernel's grid type's, whose workspace and counters the
        // scratch holds (the counters zero between launches, one stream); the descriptor offsets are those the probe
        // confirmed on this GPU.
        unsafe { builder.launch(cfg) }.map_err(driver(kernel))?;
        Ok(())
    }

    /// Lets `f` take `bytes` of dynamic shared memory (above 48 KiB a kernel must ask); the size as a launch takes it.
    fn allow_dynamic_shared(
        &self,
        op: &'static str,
        f: &cudarc::driver::CudaFunction,
        kernel: &'static str,
        bytes: usize,
    ) -> Result<u32, KernelError> {
        let shared =
            i32::try_from(bytes).map_err(|_| KernelError::invalid(op, format!("{bytes} bytes of shared memory")))?;
        if bytes > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared,
            )
            .map_err(driver(kernel))?;
        }
        Ok(shared as u32)
    }

    /// One Hopper warpgroup MMA (`wgmma_probe` of hopper.cu: m64n128k32, E4M3 in, f32 out) of `a` (`[64, 32]`
    /// codes, A in registers) by `b` (`[128, 32]` codes, B in shared memory), with B's descriptor built as `variant`
    /// 0 (its leading byte offset between core matrices adjacent in k, as the PTX ISA reads) or 1 (the two offsets
    /// swapped); returns `a b^T` (`[64, 128]`) as this GPU computed it. Compute capability 9.0 only: where the
    /// layouts a wgmma kernel would rely on are checked.
    pub fn wgmma_probe(&self, a: &[u8], b: &[u8], variant: u32) -> Result<Vec<f32>, KernelError> {
        const OP: &str = "cuda wgmma_probe";
        check_len(OP, "a", a.len(), 64 * 32, "64 * 32")?;
        check_len(OP, "b", b.len(), 128 * 32, "128 * 32")?;
        if variant > 1 {
            return Err(KernelError::invalid(OP, format!("variant {variant} is neither 0 nor 1")));
        }
        let f = self.function(&HOPPER_CU, "wgmma_probe")?;
        let (a, b) = (self.upload(a)?, self.upload(b)?);
        let mut out = self.zeros::<f32>(64 * 128)?;
        let variant_i = variant as i32;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 32 * 1024 };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&a).arg(&b).arg(&variant_i).arg(&mut out);
        // SAFETY: signature matched; a and b have the lengths the kernel reads, out the length it writes.
        unsafe { launch.launch(cfg) }.map_err(driver("launch wgmma_probe"))?;
        self.download(&out)
    }

    /// How this GPU's wgmma reads a shared-memory descriptor, as `wgmma_probe` found on known operands the first time
    /// it is asked (then remembered): the reading under which every output matches the CPU's product. An error (kept
    /// too) when the GPU has no wgmma or neither reading matches: then no wgmma kernel runs here.
    pub(crate) fn wgmma_reading(&self) -> Result<WgmmaReading, KernelError> {
        const OP: &str = "wgmma layouts";
        self.wgmma_reading
            .get_or_init(|| {
                let (a, b) = (random_codes(64 * 32, 0x0077_676d_6d61), random_codes(128 * 32, 0x0070_726f_6265));
                let value = |code: u8| f64::from(E4M3_TO_F32[code as usize]);
                let mut wrong = [0usize; 2];
                for (variant, wrong) in (0..2u32).zip(&mut wrong) {
                    let got = self.wgmma_probe(&a, &b, variant).map_err(|e| e.to_string())?;
                    *wrong = (0..64 * 128)
                        .filter(|&i| {
                            let (m, n) = (i / 128, i % 128);
                            let products = (0..32).map(|c| value(a[m * 32 + c]) * value(b[n * 32 + c]));
                            let (want, size) = products.fold((0.0, 0.0), |(sum, size), p| (sum + p, size + p.abs()));
                            (f64::from(got[i]) - want).abs() > size / 4096.0 + 1e-30
                        })
                        .count();
                }
                match wrong {
                    [0, _] => Ok(WgmmaReading { offsets_swapped: false }),
                    [_, 0] => Ok(WgmmaReading { offsets_swapped: true }),
                    [first, second] => Err(format!(
                        "wgmma_probe matched the CPU under neither descriptor reading ({first} and {second} of 8192 \
                         outputs wrong)"
                    )),
                }
            })
            .clone()
            .map_err(|message| KernelError::Cuda { op: OP, message })
    }

    /// The epilogue after a unit-scale FP8 GEMM: `out[i, j] *= a_scale[i] * w_scale[j]` over `m` x `n`.
    pub fn scale_rows_cols(
        &self,
        out: &mut CudaViewMut<'_, f32>,
        a_scale: &CudaView<'_, f32>,
        w_scale: &CudaView<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda scale_rows_cols";
        let (m, n) = (a_scale.len(), w_scale.len());
        check_len(OP, "out", out.len(), product(OP, m, n)?, format_args!("m * n = {m} * {n}"))?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let f = self.function(&EXPERTS_CU, "scale_rows_cols")?;
        let (m_i, n_i) = (int(OP, "m", m)?, int(OP, "n", n)?);
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, (m * n).div_ceil(4 * ROW_THREADS as usize).min(65_535))?, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(a_scale).arg(w_scale).arg(&m_i).arg(&n_i);
        // SAFETY: signature matched; lengths checked.
        unsafe { launch.launch(cfg) }.map_err(driver("launch scale_rows_cols"))?;
        Ok(())
    }

    /// RMS norm per row of `dim` values: `out = x / sqrt(mean(x^2) + eps) * weight` (`weight` `None`: unweighted).
    pub fn rms_norm(
        &self,
        x: &CudaView<'_, f32>,
        weight: Option<&CudaView<'_, f32>>,
        dim: usize,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda rms_norm";
        if dim == 0 || x.len() % dim != 0 {
            return Err(KernelError::shape(OP, format!("x has {} values, not a multiple of dim = {dim}", x.len())));
        }
        if let Some(weight) = weight {
            check_len(OP, "weight", weight.len(), dim, "dim")?;
        }
        check_len(OP, "out", out.len(), x.len(), "x.len()")?;
        let rows = x.len() / dim;
        if rows == 0 {
            return Ok(());
        }
        let f = self.function(&ATTENTION_CU, "rms_norm")?;
        let (rows_i, dim_i) = (int(OP, "rows", rows)?, int(OP, "dim", dim)?);
        let null: u64 = 0;
        let cfg =
            LaunchConfig { grid_dim: (blocks(OP, rows)?, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x);
        match weight {
            Some(weight) => launch.arg(weight),
            None => launch.arg(&null),
        };
        launch.arg(&rows_i).arg(&dim_i).arg(&eps).arg(out);
        // SAFETY: signature matched (a null weight means unweighted); lengths checked.
        unsafe { launch.launch(cfg) }.map_err(driver("launch rms_norm"))?;
        Ok(())
    }

    /// Interleaved RoPE in place on `x` (`[positions.len(), heads, head_dim]`), as `rope::rope_interleaved_in_place`.
    pub fn rope_interleaved(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        positions: &CudaView<'_, u32>,
        heads: usize,
        head_dim: usize,
        inv_freq: &CudaView<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda rope_interleaved";
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(KernelError::invalid(OP, format!("head_dim must be even and positive, got {head_dim}")));
        }
        check_len(OP, "inv_freq", inv_freq.len(), head_dim / 2, "head_dim / 2")?;
        let tokens = positions.len();
        let values = product(OP, product(OP, tokens, heads)?, head_dim)?;
        check_len(
            OP,
            "x",
            x.len(),
            values,
            format_args!("tokens * heads * head_dim = {tokens} * {heads} * {head_dim}"),
        )?;
        if values == 0 {
            return Ok(());
        }
        let f = self.function(&ATTENTION_CU, "rope_interleaved")?;
        let (tokens_i, heads_i, dim_i) =
            (int(OP, "tokens", tokens)?, int(OP, "heads", heads)?, int(OP, "head_dim", head_dim)?);
        let cfg =
            LaunchConfig { grid_dim: (blocks(OP, tokens)?, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(positions).arg(&tokens_i).arg(&heads_i).arg(&dim_i).arg(inv_freq);
        // SAFETY: signature matched; lengths checked.
        unsafe { launch.launch(cfg) }.map_err(driver("launch rope_interleaved"))?;
        Ok(())
    }

    /// Decode attention of one query per sequence over a paged KV cache (`attention::paged_attention`'s layout and
    /// arithmetic, online softmax). `pool`: `pool_blocks` blocks of `[2, block_size, kv_heads, head_dim]`, f32 or
    /// bf16 bits ([`KvElement`]: bf16 keys and values are widened to f32 as read, the arithmetic is f32 either way);
    /// `block_table`: `[table_rows, max_blocks]`; `table_row`: each query's row of it (the queries of one sequence's
    /// prefill share one, so the table is not repeated per query); `first_block`, `seq_len`, `positions`: one per
    /// query; `out`:
    /// `[seqs, q_heads, head_dim]`; `lse`: `[seqs, q_heads]`. Block ids and the visible ranges are checked on the host
    /// by the caller that owns the block table (the kernel trusts them). With head_dim 128 and at most 8 query heads
    /// per KV head ([`PagedDecode::grouped`]), one block serves all query heads of a KV head, reading each key once;
    /// else one block per query head. A long context's keys are split over [`PagedDecode::key_splits`] blocks and
    /// merged by `paged_decode_merge` when there are few heads for the GPU's SMs.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention<T: KvElement>(
        &self,
        shape: &PagedDecode,
        q: &CudaView<'_, f32>,
        pool: &CudaView<'_, T>,
        block_table: &CudaView<'_, u32>,
        table_row: &CudaView<'_, u32>,
        first_block: &CudaView<'_, u32>,
        seq_len: &CudaView<'_, u32>,
        positions: &CudaView<'_, u32>,
        out: &mut CudaViewMut<'_, f32>,
        lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda paged_decode_attention";
        let s = shape;
        if s.q_heads == 0 || s.kv_heads == 0 || s.q_heads % s.kv_heads != 0 {
            return Err(KernelError::invalid(
                OP,
                format!("q_heads = {} must be a positive multiple of kv_heads = {}", s.q_heads, s.kv_heads),
            ));
        }
        if s.head_dim == 0 || s.head_dim % 32 != 0 || s.head_dim > MAX_HEAD_DIM {
            return Err(KernelError::invalid(
                OP,
                format!("head_dim = {} must be a multiple of 32 up to {MAX_HEAD_DIM}", s.head_dim),
            ));
        }
        if s.block_size == 0 {
            return Err(KernelError::invalid(OP, "block_size is 0"));
        }
        let q_values = product(OP, product(OP, s.seqs, s.q_heads)?, s.head_dim)?;
        check_len(OP, "q", q.len(), q_values, "seqs * q_heads * head_dim")?;
        check_len(OP, "out", out.len(), q_values, "q.len()")?;
        check_len(OP, "lse", lse.len(), s.seqs * s.q_heads, "seqs * q_heads")?;
        let block_values = product(OP, product(OP, 2 * s.block_size, s.kv_heads)?, s.head_dim)?;
        check_len(
            OP,
            "pool",
            pool.len(),
            product(OP, s.pool_blocks, block_values)?,
            format_args!("pool_blocks * 2 * block_size * kv_heads * head_dim {} values", T::DTYPE),
        )?;
        check_len(
            OP,
            "block_table",
            block_table.len(),
            product(OP, s.table_rows, s.max_blocks)?,
            "table_rows * max_blocks",
        )?;
        for (name, buffer) in
            [("table_row", table_row), ("first_block", first_block), ("seq_len", seq_len), ("positions", positions)]
        {
            check_len(OP, name, buffer.len(), s.seqs, "seqs")?;
        }
        if s.seqs == 0 {
            return Ok(());
        }
        let grouped = s.grouped();
        let kernel = match (T::DTYPE, grouped) {
            (KvDtype::F32, false) => "paged_decode_attention",
            (KvDtype::Bf16, false) => "paged_decode_attention_bf16",
            (KvDtype::F32, true) => "paged_decode_attention_grouped",
            (KvDtype::Bf16, true) => "paged_decode_attention_grouped_bf16",
        };
        let f = self.function(&ATTENTION_CU, kernel)?;
        let q_heads = int(OP, "q_heads", s.q_heads)?;
        let kv_heads = int(OP, "kv_heads", s.kv_heads)?;
        let head_dim = int(OP, "head_dim", s.head_dim)?;
        let block_size = int(OP, "block_size", s.block_size)?;
        let max_blocks = int(OP, "max_blocks", s.max_blocks)?;
        let table_rows = int(OP, "table_rows", s.table_rows)?;
        let splits = s.key_splits(self.sms);
        // Each split's max, sum and weighted values, for the merge (none with one split: the kernel writes out).
        let partial_len = if splits > 1 { product(OP, q_values / s.head_dim * splits, s.head_dim + 2)? } else { 0 };
        let mut partial = self.uninit::<f32>(partial_len)?;
        let cfg = LaunchConfig {
            grid_dim: (
                blocks(OP, s.seqs)?,
                blocks(OP, if grouped { s.kv_heads } else { s.q_heads })?,
                blocks(OP, splits)?,
            ),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(q).arg(pool).arg(block_table).arg(table_row).arg(&table_rows).arg(first_block).arg(seq_len);
        launch.arg(positions);
        launch.arg(&q_heads).arg(&kv_heads).arg(&head_dim).arg(&block_size).arg(&max_blocks);
        launch.arg(&s.chunk).arg(&s.scale).arg(&mut *out).arg(&mut *lse).arg(&mut partial);
        // SAFETY: signature matched (the pool's element type picks the kernel); lengths checked, `partial` holds
        // seqs * q_heads * splits * (head_dim + 2) floats where splits > 1; block ids and ranges are the caller's
        // (documented above).
        unsafe { launch.launch(cfg) }.map_err(driver("launch paged_decode_attention"))?;
        if splits > 1 {
            let merge = self.function(&ATTENTION_CU, "paged_decode_merge")?;
            let (seqs_i, splits_i) = (int(OP, "seqs", s.seqs)?, int(OP, "splits", splits)?);
            let cfg = LaunchConfig {
                grid_dim: (blocks(OP, s.seqs)?, blocks(OP, s.q_heads)?, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = self.stream.launch_builder(&merge);
            launch.arg(&partial).arg(&seqs_i).arg(&q_heads).arg(&head_dim).arg(&splits_i).arg(out).arg(lse);
            // SAFETY: signature matched; `partial` was just written for this grid; out and lse checked above.
            unsafe { launch.launch(cfg) }.map_err(driver("launch paged_decode_merge"))?;
        }
        Ok(())
    }
}
