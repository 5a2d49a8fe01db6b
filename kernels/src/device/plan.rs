//! Host-side facts of the GPU expert path that need no GPU: the FP8 weights of one expert as handed to the device,
//! the counting sort of routed rows by expert (the plan the device executes), and the choice between the small-m
//! streaming kernel and cuBLASLt.

use crate::error::KernelError;
use crate::matmul::Fp8Weight;

/// Experts with at most this many tokens in a step run in the grouped weight-streaming kernel; above it, cuBLASLt's
/// FP8 GEMM (tensor cores). The default of the GPU path (`SWITCHYARD_SMALL_M_MAX_TOKENS` overrides it, up to the
/// tensor-core streaming kernel's 32). On an H200 (`switchyard bench gpu`, docs/cuda.md) experts of 17..=32 tokens
/// ran faster in cuBLASLt than in the 32-token kernel, at 128 and at 2048 Zipf-routed tokens.
pub const SMALL_M_MAX_TOKENS: usize = 16;

/// The streaming kernel runs only when at least this many experts are small; a lone small expert goes to cuBLASLt.
/// The kernel's parallelism is one block per 16 weight rows per expert, so one expert (320 blocks for Maverick's down
/// projection) leaves it latency-bound where cuBLASLt splits k itself: on an H200 a lone 16-token expert took 30.5 /
/// 21.5 us in the kernel and 24.6 / 14.9 us in cuBLASLt (gate_up / down), while 9 experts took 197 / 104 us in the
/// kernel and 213 / 142 us in cuBLASLt; on an H100 the lone expert took 38.0 / 24.2 us in the kernel and 34.8 / 19.5
/// in cuBLASLt. The crossover between one and nine experts is not measured; two is a guess.
pub const MIN_STREAMING_EXPERTS: usize = 2;

/// Experts that would go to cuBLASLt with at most this many tokens run in `fp8_lone_expert_gemm` instead (one expert
/// over the whole GPU, stream-K; [`LoneExpertGrid`]), whatever the cuBLASLt tuning found; 0 forces none. The default
/// of the GPU path (`SWITCHYARD_LONE_EXPERT_MAX_TOKENS` overrides it, up to [`LONE_MAX_TOKENS`]). Unforced, the kernel
/// still runs where the tuning timed it faster than cuBLASLt (buckets of up to 32 tokens). `switchyard bench gpu`'s
/// "lone us" column measures it next to cuBLASLt for every one-expert row it can take.
pub const LONE_EXPERT_MAX_TOKENS: usize = 0;

/// Experts that go to cuBLASLt with at most this many tokens run the algorithm timed fastest for their shape and token
/// bucket ([`cublaslt_token_bucket`]; the CUDA backend's `gemm_tuning`), not the heuristic's first choice. Above it
/// the GEMM is bound by its multiplications, where the heuristic's choice measured 1.00 of PyTorch's cuBLASLt.
pub const CUBLASLT_TUNED_MAX_TOKENS: usize = 512;

/// The smallest token bucket of the cuBLASLt tuning: fewer tokens are timed as this many (a lone decode expert).
pub const CUBLASLT_SMALLEST_BUCKET: usize = 16;

/// The bucket whose tuned cuBLASLt algorithm an expert of `tokens` tokens runs: the count rounded up to a power of
/// two, at least [`CUBLASLT_SMALLEST_BUCKET`]; `None` for 0 tokens or more than [`CUBLASLT_TUNED_MAX_TOKENS`] (the
/// heuristic's choice). An algorithm suits neighbouring token counts alike, and one bucket per power of two keeps
/// the timing at first use to a few calls per shape.
pub fn cublaslt_token_bucket(tokens: usize) -> Option<usize> {
    (1..=CUBLASLT_TUNED_MAX_TOKENS).contains(&tokens).then(|| tokens.next_power_of_two().max(CUBLASLT_SMALLEST_BUCKET))
}

/// Most tokens `fp8_lone_expert_gemm` takes (`_t4`: four 8-token tiles).
pub const LONE_MAX_TOKENS: usize = 32;
/// Weight rows of one unit of `fp8_lone_expert_gemm` (its `LONE_ROWS`: 16 per warp, `LONE_WARPS` = 8 warps); `n`
/// must be a multiple.
pub const LONE_ROWS: usize = 128;
/// Columns of one unit (the MMA kernels' `MMA_CHUNK`); `k` must be a multiple.
pub const LONE_CHUNK: usize = 128;
/// Threads of one block (`LONE_WARPS` warps).
pub const LONE_THREADS: usize = 256;
/// Blocks per SM the grid aims at: the kernels' launch bounds (128 registers) let two blocks of 256 threads share
/// an SM.
const LONE_BLOCKS_PER_SM: usize = 2;
/// Shared memory of one staged token's chunk (its `LONE_TOKEN_BYTES`: 128 codes and 16 bytes of padding).
const LONE_TOKEN_BYTES: usize = 144;
/// Most shared memory a block stages: two blocks must fit an SM (an H100 has 228 KiB).
const LONE_SHARED_LIMIT: usize = 100 * 1024;

/// What the stream-K one-expert kernels ask of a GEMM: 1..=`max_tokens` tokens, `n` a positive multiple of `rows`
/// (a unit's weight rows) and `k` of `chunk` (its columns). Returns the row blocks and the chunks.
fn stream_k_units(
    op: &'static str,
    tokens: usize,
    max_tokens: usize,
    (n, rows): (usize, usize),
    (k, chunk): (usize, usize),
) -> Result<(usize, usize), KernelError> {
    if !(1..=max_tokens).contains(&tokens) {
        return Err(KernelError::invalid(op, format!("tokens = {tokens} must be in 1..={max_tokens}")));
    }
    if n == 0 || k == 0 || n % rows != 0 || k % chunk != 0 {
        return Err(KernelError::invalid(
            op,
            format!("n = {n} must be a positive multiple of {rows} and k = {k} of {chunk}"),
        ));
    }
    Ok((n / rows, k / chunk))
}

/// The stream-K kernels compute `units * block / blocks` in 32 bits.
fn check_stream_k_range(op: &'static str, units: usize, blocks: usize) -> Result<(), KernelError> {
    if units.checked_mul(blocks + 1).is_none_or(|v| v > i32::MAX as usize) {
        return Err(KernelError::invalid(
            op,
            format!("{units} units over {blocks} blocks exceed the kernel's i32 range"),
        ));
    }
    Ok(())
}

/// How `fp8_lone_expert_gemm` is launched for one expert's `tokens` x `n` x `k` GEMM on a GPU of `sms` SMs: the work
/// is `(n / 128) * (k / 128)` units of 128 weight rows x 128 columns, split evenly (to one unit) over the blocks, which
/// stage the activations of their units' chunks in shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoneExpertGrid {
    /// 8-token tiles of the kernel (1, 2 or 4: `fp8_lone_expert_gemm_t1/_t2/_t4`).
    pub tiles: usize,
    /// Units of work: row blocks times chunks.
    pub units: usize,
    /// Blocks of the launch (at most `units`).
    pub blocks: usize,
    /// Dynamic shared memory of a block, bytes.
    pub shared_bytes: usize,
    /// Floats of the partial-sum workspace: two partials of every warp of every block.
    pub workspace_floats: usize,
    /// Row blocks (`n / 128`): the arrival counters.
    pub row_blocks: usize,
}

impl LoneExpertGrid {
    /// The grid for `sms` SMs, or with `blocks` blocks when given (tests and tuning; at least 1, at most `units`).
    pub fn new(tokens: usize, n: usize, k: usize, sms: usize, blocks: Option<usize>) -> Result<Self, KernelError> {
        const OP: &str = "lone expert grid";
        let (row_blocks, chunks) = stream_k_units(OP, tokens, LONE_MAX_TOKENS, (n, LONE_ROWS), (k, LONE_CHUNK))?;
        let tiles = tokens.div_ceil(8).next_power_of_two();
        let units = row_blocks * chunks;
        let chunk_bytes = 8 * tiles * LONE_TOKEN_BYTES;
        // A block's range spans at most `LONE_SHARED_LIMIT / chunk_bytes` units, so that its staged chunks fit.
        let longest = LONE_SHARED_LIMIT / chunk_bytes;
        let blocks = match blocks {
            Some(0) => return Err(KernelError::invalid(OP, "a grid needs at least one block")),
            Some(blocks) => blocks.min(units),
            None => (sms.max(1) * LONE_BLOCKS_PER_SM).max(units.div_ceil(longest)).min(units),
        };
        check_stream_k_range(OP, units, blocks)?;
        let range = units.div_ceil(blocks);
        if range.min(chunks) * chunk_bytes > LONE_SHARED_LIMIT {
            return Err(KernelError::invalid(
                OP,
                format!("{blocks} blocks leave {range} units per block, more than shared memory stages"),
            ));
        }
        Ok(LoneExpertGrid {
            tiles,
            units,
            blocks,
            shared_bytes: range.min(chunks) * chunk_bytes,
            workspace_floats: blocks * 2 * (LONE_ROWS / 16) * tiles * 128,
            row_blocks,
        })
    }
}

/// Most tokens `fp8_warpgroup_expert_gemm` takes (the N of its `m64n128k32` wgmma).
pub const WARPGROUP_MAX_TOKENS: usize = 128;
/// Fewest tokens it is timed for: its buckets are the tuning's 64 and 128; fewer tokens belong to the lone-expert
/// kernel's mma.sync tiles, which do not multiply padding.
pub const WARPGROUP_MIN_TOKENS: usize = LONE_MAX_TOKENS + 1;
/// Weight rows of one unit of `fp8_warpgroup_expert_gemm` (its `WG_ROWS`: 64 per warpgroup, two warpgroups); `n`
/// must be a multiple.
pub const WARPGROUP_ROWS: usize = 128;
/// Columns of one unit (its `WG_CHUNK`); `k` must be a multiple.
pub const WARPGROUP_CHUNK: usize = 128;
/// Threads of one block (its `WG_THREADS`: two warpgroups).
pub const WARPGROUP_THREADS: usize = 256;
/// Shared memory of one ring slot (its `WG_STAGE_BYTES`: 128 tokens' chunk, then 128 weight rows of 144 bytes).
const WARPGROUP_STAGE_BYTES: usize = 128 * 128 + WARPGROUP_ROWS * 144;
/// Accumulators of one thread (64 weight rows x 128 tokens over a warpgroup's 128 threads).
const WARPGROUP_THREAD_SUMS: usize = 64;

/// The depth of `fp8_warpgroup_expert_gemm`'s ring: how many units' bytes a block keeps in flight, against how many
/// blocks share an SM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WarpgroupStages {
    /// `_s3`: three slots (102 KiB), two blocks an SM (launch bounds: 128 registers).
    Three,
    /// `_s6`: six slots (204 KiB), one block an SM.
    Six,
}

impl WarpgroupStages {
    /// Both, in the order the tuning lists them.
    pub const ALL: [WarpgroupStages; 2] = [WarpgroupStages::Three, WarpgroupStages::Six];

    /// Ring slots.
    pub fn slots(self) -> usize {
        match self {
            WarpgroupStages::Three => 3,
            WarpgroupStages::Six => 6,
        }
    }

    /// Blocks that share an SM.
    pub fn blocks_per_sm(self) -> usize {
        match self {
            WarpgroupStages::Three => 2,
            WarpgroupStages::Six => 1,
        }
    }

    /// The kernel's name.
    pub fn kernel(self) -> &'static str {
        match self {
            WarpgroupStages::Three => "fp8_warpgroup_expert_gemm_s3",
            WarpgroupStages::Six => "fp8_warpgroup_expert_gemm_s6",
        }
    }

    /// The ring depth with `slots` slots, if the kernel has one.
    pub fn with_slots(slots: usize) -> Option<Self> {
        WarpgroupStages::ALL.into_iter().find(|stages| stages.slots() == slots)
    }
}

/// How `fp8_warpgroup_expert_gemm` is launched: its ring depth and its blocks, which split the expert's units
/// (`(n / 128) * (k / 128)` of 128 weight rows x 128 columns) evenly, to one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WarpgroupLaunch {
    /// The ring depth (the kernel).
    pub stages: WarpgroupStages,
    /// Blocks of the launch.
    pub blocks: usize,
}

impl WarpgroupLaunch {
    /// The launches the tuning times for an `n` x `k` expert on `sms` SMs: for each ring depth, one block per place on
    /// the SMs, and the most whole splits of every row block that fit those places (no row block then shares a block
    /// with another, so fewer partial sums travel through L2: Maverick's gate_up on an H100 needs none at one block
    /// an SM). Without duplicates, in a fixed order.
    pub fn candidates(n: usize, k: usize, sms: usize) -> Vec<WarpgroupLaunch> {
        let (row_blocks, units) = (n / WARPGROUP_ROWS, (n / WARPGROUP_ROWS) * (k / WARPGROUP_CHUNK));
        let mut launches = Vec::new();
        for stages in WarpgroupStages::ALL {
            let places = sms.max(1) * stages.blocks_per_sm();
            let whole_splits = if row_blocks == 0 { 0 } else { row_blocks * (places / row_blocks) };
            for blocks in [places, whole_splits] {
                let launch = WarpgroupLaunch { stages, blocks: blocks.min(units) };
                if launch.blocks > 0 && !launches.contains(&launch) {
                    launches.push(launch);
                }
            }
        }
        launches
    }
}

/// What one launch of `fp8_warpgroup_expert_gemm` needs for one expert's `tokens` x `n` x `k` GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarpgroupExpertGrid {
    /// The launch (its blocks clamped to the units).
    pub launch: WarpgroupLaunch,
    /// Units of work: row blocks times chunks.
    pub units: usize,
    /// Dynamic shared memory of a block (the ring), bytes.
    pub shared_bytes: usize,
    /// Floats of the partial-sum workspace: two partials of every thread of every block.
    pub workspace_floats: usize,
    /// Row blocks (`n / 128`): the arrival counters.
    pub row_blocks: usize,
}

impl WarpgroupExpertGrid {
    /// The grid of `launch` (blocks above the units are clamped), or why the kernel cannot take the GEMM.
    pub fn new(tokens: usize, n: usize, k: usize, launch: WarpgroupLaunch) -> Result<Self, KernelError> {
        const OP: &str = "warpgroup expert grid";
        let (row_blocks, chunks) =
            stream_k_units(OP, tokens, WARPGROUP_MAX_TOKENS, (n, WARPGROUP_ROWS), (k, WARPGROUP_CHUNK))?;
        if launch.blocks == 0 {
            return Err(KernelError::invalid(OP, "a grid needs at least one block"));
        }
        let units = row_blocks * chunks;
        let blocks = launch.blocks.min(units);
        check_stream_k_range(OP, units, blocks)?;
        Ok(WarpgroupExpertGrid {
            launch: WarpgroupLaunch { blocks, ..launch },
            units,
            shared_bytes: launch.stages.slots() * WARPGROUP_STAGE_BYTES,
            workspace_floats: blocks * 2 * WARPGROUP_THREAD_SUMS * WARPGROUP_THREADS,
            row_blocks,
        })
    }
}

/// One expert's FP8 weights in nn.Linear layout, borrowed from the host (the model's checkpoint mmap).
#[derive(Debug, Clone, Copy)]
pub struct Fp8Expert<'a> {
    /// Gate projection `[intermediate, hidden]`.
    pub gate: Fp8Weight<'a>,
    /// Up projection `[intermediate, hidden]`.
    pub up: Fp8Weight<'a>,
    /// Down projection `[hidden, intermediate]`.
    pub down: Fp8Weight<'a>,
}

/// The dimensions shared by all experts of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertDims {
    /// Model hidden size (gate/up input, down output).
    pub hidden: usize,
    /// Expert intermediate size (gate/up output, down input).
    pub intermediate: usize,
}

impl ExpertDims {
    /// Checks that every expert has the same, consistent FP8 shapes, that the scales and codes have the lengths the
    /// shapes say, and that both sizes are multiples of 16 (the kernels load 16 codes at a time; cuBLASLt FP8 needs
    /// 16-aligned leading dimensions). Maverick's 5120 and 8192 are.
    pub fn of(experts: &[Fp8Expert<'_>]) -> Result<Self, KernelError> {
        const OP: &str = "gpu expert upload";
        let first = experts.first().ok_or_else(|| KernelError::invalid(OP, "no experts"))?;
        let dims = ExpertDims { hidden: first.gate.cols, intermediate: first.gate.rows };
        if dims.hidden == 0 || dims.intermediate == 0 || dims.hidden % 16 != 0 || dims.intermediate % 16 != 0 {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "hidden = {} and intermediate = {} must be positive multiples of 16",
                    dims.hidden, dims.intermediate
                ),
            ));
        }
        for (index, expert) in experts.iter().enumerate() {
            for (name, weight, rows, cols) in [
                ("gate", &expert.gate, dims.intermediate, dims.hidden),
                ("up", &expert.up, dims.intermediate, dims.hidden),
                ("down", &expert.down, dims.hidden, dims.intermediate),
            ] {
                if weight.rows != rows || weight.cols != cols {
                    return Err(KernelError::shape(
                        OP,
                        format!("expert {index} {name} is {}x{}, expected {rows}x{cols}", weight.rows, weight.cols),
                    ));
                }
                if weight.codes.len() != rows * cols || weight.scales.len() != rows {
                    return Err(KernelError::shape(
                        OP,
                        format!(
                            "expert {index} {name} has {} codes and {} scales, expected {} and {rows}",
                            weight.codes.len(),
                            weight.scales.len(),
                            rows * cols
                        ),
                    ));
                }
            }
        }
        Ok(dims)
    }
}

/// The rows of one MoE step sorted by expert (a stable counting sort): what the device gathers, computes per expert
/// and scatters back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlan {
    /// `offsets[e]..offsets[e + 1]` are the slots of expert `e`; `offsets.len() == experts + 1`.
    pub offsets: Vec<u32>,
    /// `slot_row[slot]` is the input row computed in `slot`; rows of one expert keep their input order.
    pub slot_row: Vec<u32>,
}

impl ExpertPlan {
    /// Sorts `routed` (the local expert index of each row) for a layer of `experts` experts.
    pub fn new(routed: &[u32], experts: usize) -> Result<Self, KernelError> {
        const OP: &str = "expert plan";
        if u32::try_from(routed.len()).is_err() {
            return Err(KernelError::invalid(OP, format!("{} rows do not fit u32 slots", routed.len())));
        }
        let mut counts = vec![0u32; experts];
        for (row, &expert) in routed.iter().enumerate() {
            let count = counts.get_mut(expert as usize).ok_or_else(|| {
                KernelError::invalid(
                    OP,
                    format!("row {row} is routed to expert {expert}, but the layer holds {experts}"),
                )
            })?;
            *count += 1;
        }
        let mut offsets = Vec::with_capacity(experts + 1);
        let mut running = 0u32;
        offsets.push(0);
        for &count in &counts {
            running += count;
            offsets.push(running);
        }
        let mut cursor = offsets.clone();
        let mut slot_row = vec![0u32; routed.len()];
        for (row, &expert) in routed.iter().enumerate() {
            let slot = &mut cursor[expert as usize];
            slot_row[*slot as usize] = row as u32;
            *slot += 1;
        }
        Ok(ExpertPlan { offsets, slot_row })
    }

    /// Tokens of expert `e`.
    pub fn tokens(&self, expert: usize) -> usize {
        (self.offsets[expert + 1] - self.offsets[expert]) as usize
    }

    /// The experts computed by cuBLASLt (more than `threshold` tokens, e.g. [`SMALL_M_MAX_TOKENS`]), with their
    /// first slot and token count; the others with tokens go to the streaming kernel.
    pub fn large_experts(&self, threshold: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.offsets.len() - 1)
            .map(|e| (e, self.offsets[e] as usize, self.tokens(e)))
            .filter(move |&(_, _, tokens)| tokens > threshold)
    }

    /// The threshold a step actually uses: `threshold` when at least [`MIN_STREAMING_EXPERTS`] experts have
    /// `1..=threshold` tokens, else 0 (every expert with tokens goes to cuBLASLt).
    pub fn streaming_threshold(&self, threshold: usize) -> usize {
        let small = (0..self.offsets.len() - 1).filter(|&e| (1..=threshold).contains(&self.tokens(e))).count();
        if small >= MIN_STREAMING_EXPERTS {
            threshold
        } else {
            0
        }
    }

    /// The most tokens of an expert that goes to the streaming kernel (`1..=threshold` tokens); 0 when none does.
    pub fn small_max_tokens(&self, threshold: usize) -> usize {
        (0..self.offsets.len() - 1).map(|e| self.tokens(e)).filter(|&t| t <= threshold).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_a_stable_counting_sort() {
        let plan = ExpertPlan::new(&[2, 0, 2, 1, 0, 2], 4).expect("plan");
        assert_eq!(plan.offsets, vec![0, 2, 3, 6, 6]);
        assert_eq!(plan.slot_row, vec![1, 4, 3, 0, 2, 5]);
        assert_eq!(plan.tokens(3), 0);
        assert_eq!(plan.small_max_tokens(SMALL_M_MAX_TOKENS), 3);
        assert_eq!(plan.small_max_tokens(2), 2);
        assert_eq!(plan.small_max_tokens(1), 1);
        assert_eq!(plan.large_experts(SMALL_M_MAX_TOKENS).count(), 0);
        assert_eq!(plan.large_experts(2).collect::<Vec<_>>(), vec![(2, 3, 3)]);
    }

    #[test]
    fn plan_refuses_an_expert_out_of_range() {
        let err = ExpertPlan::new(&[0, 5], 4).expect_err("out of range");
        assert!(err.to_string().contains("expert 5"), "{err}");
    }

    #[test]
    fn expert_dims_check_shapes_lengths_and_alignment() {
        let (codes, scales) = (vec![0u8; 32 * 16], vec![1.0f32; 32]);
        let weight =
            |rows: usize, cols: usize| Fp8Weight { codes: &codes[..rows * cols], scales: &scales[..rows], rows, cols };
        let good = Fp8Expert { gate: weight(32, 16), up: weight(32, 16), down: weight(16, 32) };
        assert_eq!(ExpertDims::of(&[good, good]), Ok(ExpertDims { hidden: 16, intermediate: 32 }));
        assert!(ExpertDims::of(&[]).is_err());
        let swapped = Fp8Expert { down: weight(32, 16), ..good };
        let err = ExpertDims::of(&[good, swapped]).expect_err("down is 32x16");
        assert!(err.to_string().contains("expert 1 down is 32x16, expected 16x32"), "{err}");
        let short = Fp8Expert { up: Fp8Weight { scales: &scales[..3], ..weight(32, 16) }, ..good };
        let err = ExpertDims::of(&[short]).expect_err("3 scales");
        assert!(err.to_string().contains("expert 0 up has 512 codes and 3 scales"), "{err}");
        let odd = Fp8Expert { gate: weight(24, 16), up: weight(24, 16), down: weight(16, 24) };
        assert!(ExpertDims::of(&[odd]).expect_err("24").to_string().contains("multiples of 16"));
    }

    #[test]
    fn lone_expert_grid_spreads_units_evenly_within_shared_memory() {
        // Maverick's down projection, 16 tokens, an H100: 40 row blocks x 64 chunks over 264 blocks.
        let down = LoneExpertGrid::new(16, 5120, 8192, 132, None).expect("grid");
        assert_eq!((down.tiles, down.units, down.blocks, down.row_blocks), (2, 2560, 264, 40));
        assert_eq!(down.shared_bytes, 10 * 16 * 144);
        assert_eq!(down.workspace_floats, 264 * 2 * 8 * 2 * 128);
        // gate_up at 32 tokens: 20 units per block, 20 chunks of 32 tokens staged (90 KiB).
        let gate_up = LoneExpertGrid::new(32, 16384, 5120, 132, None).expect("grid");
        assert_eq!((gate_up.tiles, gate_up.blocks, gate_up.shared_bytes), (4, 264, 20 * 32 * 144));
        // Few SMs: more blocks than two per SM, so that a block's chunks still fit.
        let small_gpu = LoneExpertGrid::new(32, 16384, 5120, 8, None).expect("grid");
        assert!(small_gpu.blocks > 16 && small_gpu.shared_bytes <= LONE_SHARED_LIMIT, "{small_gpu:?}");
        // A range longer than k stages every chunk once.
        let tiny = LoneExpertGrid::new(3, 256, 256, 132, Some(1)).expect("grid");
        assert_eq!((tiny.tiles, tiny.units, tiny.blocks, tiny.shared_bytes), (1, 4, 1, 2 * 8 * 144));
        // More blocks than units are clamped; 17..=32 tokens take four tiles.
        assert_eq!(LoneExpertGrid::new(17, 256, 256, 132, Some(99)).expect("grid").blocks, 4);
        assert_eq!(LoneExpertGrid::new(17, 256, 256, 132, None).expect("grid").tiles, 4);
    }

    #[test]
    fn warpgroup_launches_fill_the_sms_and_split_row_blocks_whole() {
        // An H100: gate_up has 128 row blocks, down 40.
        let launch = |stages, blocks| WarpgroupLaunch { stages, blocks };
        let (three, six) = (WarpgroupStages::Three, WarpgroupStages::Six);
        assert_eq!(
            WarpgroupLaunch::candidates(16384, 5120, 132),
            [launch(three, 264), launch(three, 256), launch(six, 132), launch(six, 128)]
        );
        assert_eq!(
            WarpgroupLaunch::candidates(5120, 8192, 132),
            [launch(three, 264), launch(three, 240), launch(six, 132), launch(six, 120)]
        );
        // More row blocks than places: no whole splits; few units: clamped and deduplicated.
        assert_eq!(WarpgroupLaunch::candidates(1280, 128, 4), [launch(three, 8), launch(six, 4)]);
        assert_eq!(WarpgroupLaunch::candidates(128, 256, 132), [launch(three, 2), launch(six, 2)]);
        assert_eq!(WarpgroupStages::with_slots(6), Some(six));
        assert_eq!(WarpgroupStages::with_slots(4), None);
    }

    #[test]
    fn warpgroup_grid_sizes_its_ring_and_workspace() {
        let down =
            WarpgroupExpertGrid::new(128, 5120, 8192, WarpgroupLaunch { stages: WarpgroupStages::Six, blocks: 120 })
                .expect("grid");
        assert_eq!((down.units, down.row_blocks, down.launch.blocks), (2560, 40, 120));
        assert_eq!(down.shared_bytes, 6 * (16384 + 128 * 144));
        assert!(down.shared_bytes <= 227 * 1024, "an H100 block holds 227 KiB");
        assert_eq!(down.workspace_floats, 120 * 2 * 64 * 256);
        let three = WarpgroupLaunch { stages: WarpgroupStages::Three, blocks: 999 };
        let small = WarpgroupExpertGrid::new(40, 256, 256, three).expect("grid");
        assert_eq!((small.launch.blocks, small.shared_bytes), (4, 3 * (16384 + 128 * 144)));
        assert!(2 * small.shared_bytes <= 227 * 1024, "two blocks share an SM");
        for (tokens, n, k, blocks, what) in [
            (0, 256, 256, 1, "tokens = 0"),
            (129, 256, 256, 1, "tokens = 129"),
            (64, 192, 256, 1, "n = 192"),
            (64, 256, 192, 1, "k = 192"),
            (64, 256, 256, 0, "at least one block"),
        ] {
            let err = WarpgroupExpertGrid::new(tokens, n, k, WarpgroupLaunch { blocks, ..three }).expect_err(what);
            assert!(err.to_string().contains(what), "{err}");
        }
    }

    #[test]
    fn lone_expert_grid_refuses_what_the_kernel_cannot_take() {
        for (tokens, n, k, what) in [
            (0, 256, 256, "tokens = 0"),
            (33, 256, 256, "tokens = 33"),
            (8, 272, 256, "n = 272"),
            (8, 256, 200, "k = 200"),
            (8, 0, 256, "n = 0"),
        ] {
            let err = LoneExpertGrid::new(tokens, n, k, 132, None).expect_err(what);
            assert!(err.to_string().contains(what), "{err}");
        }
        assert!(LoneExpertGrid::new(8, 256, 256, 132, Some(0)).is_err());
    }

    #[test]
    fn large_experts_cross_the_threshold() {
        let mut routed = vec![1u32; SMALL_M_MAX_TOKENS + 1];
        routed.push(0);
        let plan = ExpertPlan::new(&routed, 2).expect("plan");
        assert_eq!(plan.large_experts(SMALL_M_MAX_TOKENS).collect::<Vec<_>>(), vec![(1, 1, SMALL_M_MAX_TOKENS + 1)]);
        assert_eq!(plan.small_max_tokens(SMALL_M_MAX_TOKENS), 1);
        assert_eq!(plan.small_max_tokens(0), 0);
        // One small expert alone goes to cuBLASLt; two or more to the streaming kernel.
        assert_eq!(plan.streaming_threshold(SMALL_M_MAX_TOKENS), 0);
        let two = ExpertPlan::new(&[0, 1, 1, 2], 3).expect("plan");
        assert_eq!(two.streaming_threshold(SMALL_M_MAX_TOKENS), SMALL_M_MAX_TOKENS);
        assert_eq!(two.streaming_threshold(1), 1);
        let lone = ExpertPlan::new(&[0, 1, 1], 2).expect("plan");
        assert_eq!(lone.streaming_threshold(1), 0);
    }

    #[test]
    fn cublaslt_token_buckets_round_up_to_powers_of_two_from_sixteen() {
        assert_eq!(cublaslt_token_bucket(0), None);
        assert_eq!(cublaslt_token_bucket(1), Some(16));
        assert_eq!(cublaslt_token_bucket(16), Some(16));
        assert_eq!(cublaslt_token_bucket(17), Some(32));
        assert_eq!(cublaslt_token_bucket(100), Some(128));
        assert_eq!(cublaslt_token_bucket(128), Some(128));
        assert_eq!(cublaslt_token_bucket(512), Some(512));
        assert_eq!(cublaslt_token_bucket(513), None);
    }
}
