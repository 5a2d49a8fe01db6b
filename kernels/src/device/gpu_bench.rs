//! What `switchyard bench gpu` asks of the CUDA backend and what it gets back: plain data, so the CLI formats it
//! without knowing CUDA. The measurement itself is `device::bench_expert_gemm` (CUDA events after warm-up, medians,
//! weights rotated over more than L2 holds).

/// One GEMM shape of a Maverick expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// `"gate_up"` or `"down"`.
    pub name: &'static str,
    /// Input features (the reduction).
    pub k: usize,
    /// Output features.
    pub n: usize,
}

/// Maverick's fused gate_up projection of one expert: K = 5120, N = 2 * 8192.
pub const GATE_UP: GemmShape = GemmShape { name: "gate_up", k: 5120, n: 16384 };
/// Maverick's down projection of one expert: K = 8192, N = 5120.
pub const DOWN: GemmShape = GemmShape { name: "down", k: 8192, n: 5120 };

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmBenchConfig {
    /// The shapes (default: [`GATE_UP`], [`DOWN`]).
    pub shapes: Vec<GemmShape>,
    /// Token counts (default: 16, 128, 2048, 8192).
    pub tokens: Vec<usize>,
    /// Local experts of the grouped runs (default 16).
    pub experts: usize,
    /// Zipf exponent of the routing skew (default 1.0: expert `i` gets weight `1 / (i + 1)`).
    pub zipf: f64,
    /// Timed repetitions per case; the median is reported (default 20).
    pub iterations: usize,
    /// Untimed repetitions first (default 3).
    pub warmup: usize,
    /// Calls queued back to back in one timed sample, which reports their mean (default 10). One call alone would
    /// also time the host's launch latency (the GPU idles from the start event until the launch arrives: ~10 us,
    /// a third of a one-expert decode GEMM), which a serving step hides by queueing its kernels ahead.
    pub calls_per_sample: usize,
    /// Seed of the routing and the random weights.
    pub seed: u64,
    /// Bytes of the device-to-device copy measured as the bandwidth ceiling (default 1 GiB: far beyond L2).
    pub copy_bytes: usize,
    /// Rounds of eight MMAs per warp of the mma.sync rate probe (default 8192: about a millisecond on an H100).
    pub mma_rate_rounds: usize,
    /// Context lengths of the decode-attention cases (default 8K, 64K, 256K, 1M: performance.md's anchors); empty
    /// for none.
    pub attention_contexts: Vec<usize>,
}

/// The decode-attention case of `bench gpu`: one query of Maverick's attention (40 query heads, 8 KV heads, head
/// dimension 128) over a bf16 paged KV cache of 16-position blocks, the anchors' shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Positions per KV block.
    pub block_size: usize,
}

/// Maverick's attention, as performance.md's decode anchors have it.
pub const MAVERICK_ATTENTION: AttentionShape =
    AttentionShape { q_heads: 40, kv_heads: 8, head_dim: 128, block_size: 16 };

/// One measured decode-attention case.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionBenchRow {
    /// Keys the query attends to.
    pub context: usize,
    /// Median of `paged_decode_attention` as the model runs it (its keys split over `splits` blocks per query head and
    /// merged), microseconds.
    pub split_us: f64,
    /// The splits it chose.
    pub splits: usize,
    /// Median without splitting the keys (one block per KV head), microseconds.
    pub one_block_us: f64,
    /// KV bytes read (keys and values of the context, bf16) / the split time, TB/s.
    pub kv_tb_per_s: f64,
    /// performance.md's anchor (bf16 SDPA through PyTorch on an H100), microseconds.
    pub anchor_us: Option<f64>,
}

/// The decode-attention anchor of performance.md for a context length, microseconds.
pub fn attention_anchor_us(context: usize) -> Option<f64> {
    match context {
        8192 => Some(27.0),
        65536 => Some(108.0),
        262_144 => Some(365.0),
        1_048_576 => Some(1392.0),
        _ => None,
    }
}

impl Default for GemmBenchConfig {
    fn default() -> Self {
        GemmBenchConfig {
            shapes: vec![GATE_UP, DOWN],
            tokens: vec![16, 128, 2048, 8192],
            experts: 16,
            zipf: 1.0,
            iterations: 20,
            warmup: 3,
            calls_per_sample: 10,
            seed: 6,
            copy_bytes: 1 << 30,
            mma_rate_rounds: 8192,
            attention_contexts: vec![8192, 65_536, 262_144, 1_048_576],
        }
    }
}

/// One measured case.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmBenchRow {
    /// The shape's name.
    pub shape: &'static str,
    /// `"one expert"` or `"grouped"`.
    pub case: &'static str,
    /// Tokens in the step (for grouped: over all experts).
    pub tokens: usize,
    /// Experts computed.
    pub experts: usize,
    /// Tokens of the busiest expert (the routing's skew).
    pub max_tokens_per_expert: usize,
    /// Median of our path (the streaming kernel and/or cuBLASLt + epilogue as the plan chooses), microseconds.
    pub ours_us: f64,
    /// Median of cuBLASLt FP8 alone on the same problem (unit scales, no epilogue, one call per expert), us.
    pub cublaslt_us: f64,
    /// Median of the lone-expert kernel (`fp8_lone_expert_gemm`, one expert over the whole GPU) on a one-expert case
    /// it can take (up to 32 tokens), whether or not the plan chooses it, us.
    pub lone_us: Option<f64>,
    /// Weight bytes read per call / our time, TB/s.
    pub weight_tb_per_s: f64,
    /// 2 * tokens * k * n / our time, TFLOP/s.
    pub tflops: f64,
    /// The H100 anchor of performance.md for this case (cuBLASLt through PyTorch), if it has one, us.
    pub anchor_us: Option<f64>,
}

/// What the cuBLASLt tuning of one FP8 expert GEMM shape and token bucket found (`CudaDevice::cublaslt_tunings`).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmTuningRow {
    /// Output features (weight rows).
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The token bucket: the count timed, used for every count that rounds up to it.
    pub tokens: usize,
    /// The pointer alignment tuned for, bytes.
    pub alignment: u32,
    /// Candidates timed: those that passed cuBLASLt's check and ran (1: nothing to choose, nothing timed; 0: the
    /// tuning failed, `tuned` says why, and the heuristic's choice runs).
    pub candidates: usize,
    /// Median of the heuristic's first choice, us (`None`: not timed).
    pub heuristic_us: Option<f64>,
    /// Median of the fastest candidate, us.
    pub tuned_us: Option<f64>,
    /// Median of the lone-expert kernel, us, where it competed (at most 32 tokens, `n` and `k` multiples of 128).
    pub lone_us: Option<f64>,
    /// Median of the warpgroup expert kernel (`fp8_warpgroup_expert_gemm`), us, its fastest launch, where it competed
    /// (buckets of 64 and 128 tokens, `n` and `k` multiples of 128, a Hopper GPU whose wgmma layouts the probe
    /// confirmed).
    pub warpgroup_us: Option<f64>,
    /// The heuristic's first choice, in cuBLASLt's configuration numbers.
    pub heuristic: String,
    /// The candidate chosen.
    pub tuned: String,
    /// Read from the tuning cache (an earlier process on this kind of GPU timed it: the times are its), not timed
    /// in this process.
    pub cached: bool,
    /// The next fastest candidates after the chosen one, fastest first, with their medians (us): what else cuBLASLt
    /// offers for the shape. Empty when read from the cache or nothing was timed.
    pub runners_up: Vec<(String, f64)>,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmBenchReport {
    /// The GPU's name and ordinal.
    pub device: String,
    /// Device-to-device copy bandwidth measured in the same run (read + write), TB/s: the streaming ceiling.
    pub copy_tb_per_s: f64,
    /// mma.sync m16n8k32 E4M3 on registers alone, TFLOP/s: the tensor-core rate the streaming kernels have (Hopper's
    /// wgmma, which cuBLASLt uses, can go further).
    pub mma_e4m3_tflops: f64,
    /// Experts with up to this many tokens ran in the streaming kernel, larger ones in cuBLASLt.
    pub small_m_max_tokens: usize,
    /// Experts left to cuBLASLt with up to this many tokens ran in the lone-expert kernel instead (0: none).
    pub lone_expert_max_tokens: usize,
    /// Calls per timed sample (the config's).
    pub calls_per_sample: usize,
    /// The cases.
    pub rows: Vec<GemmBenchRow>,
    /// The decode-attention cases.
    pub attention: Vec<AttentionBenchRow>,
    /// What the expert path's cuBLASLt tuning chose during the run, by shape and token bucket.
    pub tuning: Vec<GemmTuningRow>,
}

/// The anchor of performance.md (H100, cuBLASLt FP8 rowwise through PyTorch 2.11) for a case, microseconds.
pub fn anchor_us(shape: &GemmShape, case: &str, tokens: usize) -> Option<f64> {
    match (shape.name, case, tokens) {
        ("gate_up", "one expert", 16..=128) => Some(45.5),
        ("gate_up", "one expert", 2048) => Some(289.0),
        ("gate_up", "one expert", 8192) => Some(1174.0),
        ("down", "one expert", 16..=128) => Some(34.0),
        ("down", "one expert", 2048) => Some(142.0),
        ("gate_up", "grouped", 128) => Some(534.0),
        ("gate_up", "grouped", 8192) => Some(1756.0),
        _ => None,
    }
}

/// Zipf-skewed routing of `tokens` rows over `experts` experts, deterministic in `seed`: expert `i` is drawn with
/// probability proportional to `1 / (i + 1)^s`. Returns the expert of each row.
pub fn zipf_routing(tokens: usize, experts: usize, s: f64, seed: u64) -> Vec<u32> {
    let weights: Vec<f64> = (0..experts).map(|i| 1.0 / ((i + 1) as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(experts);
    let mut running = 0.0;
    for w in &weights {
        running += w / total;
        cumulative.push(running);
    }
    let mut state = seed;
    (0..tokens)
        .map(|_| {
            let u = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            cumulative.iter().position(|&c| u < c).unwrap_or(experts.saturating_sub(1)) as u32
        })
        .collect()
}

/// SplitMix64: a small, well-mixed deterministic generator (no `rand` in this crate's dependencies).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_routing_is_skewed_and_deterministic() {
        let routed = zipf_routing(10_000, 16, 1.0, 1);
        assert_eq!(routed, zipf_routing(10_000, 16, 1.0, 1));
        let mut counts = [0usize; 16];
        routed.iter().for_each(|&e| counts[e as usize] += 1);
        // Expert 0 has weight 1 / H(16) ~ 0.296 of the rows, expert 15 ~ 0.0185.
        assert!(counts[0] > 2_500 && counts[0] < 3_400, "{counts:?}");
        assert!(counts[15] > 100 && counts[15] < 300, "{counts:?}");
    }

    #[test]
    fn anchors_cover_the_issue_cases() {
        assert_eq!(anchor_us(&GATE_UP, "one expert", 2048), Some(289.0));
        assert_eq!(anchor_us(&DOWN, "grouped", 16), None);
    }
}
