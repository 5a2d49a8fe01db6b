//! Hardware profiles: the memory, compute, memory-bandwidth and link figures the step-time model divides by.
//!
//! Every figure is an ACHIEVED rate where one was measured (the H100 anchors of `shared/docs/performance.md`:
//! cuBLASLt GEMMs, SDPA decode, weight streaming), and the vendor's peak scaled by the H100's measured/peak ratio
//! where it was not (H200, B200). `--calibrate FILE` replaces the rates with what `switchyard bench` measured on the
//! machine at hand. Each profile lists its sources; `docs/planner.md` has the table.

use serde::Serialize;
use switchyard_model::memory::Precision;

use crate::PlanError;

/// Profile names, as `--gpu` takes them.
pub const HARDWARE_PROFILES: [&str; 4] = ["h100-80g", "h200-141g", "b200-180g", "cpu"];

const GIB: f64 = (1u64 << 30) as f64;

/// A link between workers: a fixed latency per message and a bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Link {
    /// Bytes per second one worker sends (or receives) at.
    pub bytes_per_s: f64,
    /// One-way latency of a message, seconds.
    pub latency_s: f64,
}

impl Link {
    /// Seconds to move `bytes` in one message.
    pub fn time(&self, bytes: f64) -> f64 {
        self.latency_s + bytes / self.bytes_per_s
    }
}

/// A measured throughput curve: FLOP/s of a GEMM against the number of rows (tokens) it multiplies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateCurve {
    /// `(tokens, flop_per_s)`, ascending in tokens.
    pub points: Vec<(f64, f64)>,
}

impl RateCurve {
    /// FLOP/s at `tokens`: log-log interpolation between the measured points, the end values beyond them.
    pub fn at(&self, tokens: f64) -> f64 {
        let points = &self.points;
        let Some(&(first_m, first_rate)) = points.first() else { return f64::NAN };
        if tokens <= first_m {
            return first_rate;
        }
        for pair in points.windows(2) {
            let ((m0, r0), (m1, r1)) = (pair[0], pair[1]);
            if tokens <= m1 {
                let t = (tokens.ln() - m0.ln()) / (m1.ln() - m0.ln());
                return (r0.ln() + t * (r1.ln() - r0.ln())).exp();
            }
        }
        points.last().map_or(f64::NAN, |p| p.1)
    }
}

/// One kind of GPU (or this CPU machine), as the step-time model sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareProfile {
    /// The `--gpu` name.
    pub name: String,
    /// One line for people.
    pub description: String,
    /// Memory one worker can use, bytes (a GPU's memory as CUDA reports it; the host's RAM for `cpu`).
    pub memory_bytes: u64,
    /// Devices per node (the NVLink domain); 1 for `cpu`.
    pub devices_per_node: u32,
    /// Dense GEMM FLOP/s of the attention worker's weights (bf16 on GPUs, f32 on the CPU) at large token counts.
    pub dense_flops: f64,
    /// FP8-weight GEMM FLOP/s of the routed experts at large token counts.
    pub fp8_flops: f64,
    /// Attention (QK^T and PV) FLOP/s in prefill.
    pub attention_flops: f64,
    /// Tokens at which a GEMM reaches half its peak rate when no measured curve is given (`rate = peak * m / (m +
    /// half)`): small on GPUs, whose small-m GEMMs are bound by weight streaming anyway, larger on CPUs.
    pub gemm_half_rate_tokens: f64,
    /// Measured dense GEMM rate against tokens (from `--calibrate`), replacing `dense_flops` and the curve.
    pub dense_curve: Option<RateCurve>,
    /// Measured FP8-weight GEMM rate against tokens (from `--calibrate`), replacing `fp8_flops` and the curve.
    pub fp8_curve: Option<RateCurve>,
    /// Bytes/s a GEMM streams one weight matrix at when few tokens make it memory-bound.
    pub weight_stream_bytes_per_s: f64,
    /// The share of a measured memory-read rate that dense weight streaming reaches: what `--calibrate` multiplies
    /// the kernels benchmark's read bandwidth by (its sgemm rows run on matrices that fit the CPU's L3 cache, so
    /// they cannot tell).
    pub dense_stream_share_of_read: f64,
    /// Bytes/s of weight streaming when many experts are computed in one grouped launch.
    pub grouped_stream_bytes_per_s: f64,
    /// Bytes/s attention reads the KV cache at in decode.
    pub kv_read_bytes_per_s: f64,
    /// Fixed cost of one attention launch over a batch (seconds).
    pub attention_launch_s: f64,
    /// Links between workers on one node (NVLink, or loopback for `cpu`).
    pub intra_node: Link,
    /// Links between nodes (InfiniBand/RoCE per GPU).
    pub inter_node: Link,
    /// Fixed cost of a step beyond its kernels: scheduling, launches, sampling (seconds).
    pub step_overhead_s: f64,
    /// Cost per sequence per step beyond the kernels: sampling, detokenising, streaming the token (seconds).
    pub per_sequence_overhead_s: f64,
    /// Memory each worker keeps for the runtime itself: CUDA context, cuBLAS/NCCL workspaces, allocator slack.
    pub workspace_bytes: u64,
    /// How the runtime holds dense weights on this hardware (bf16 on GPUs; f32 in the CPU runtime).
    pub dense_precision: Precision,
    /// The KV cache's element type on this hardware unless `--kv-dtype` says otherwise.
    pub kv_precision: Precision,
    /// Every worker shares one host's cores and memory (`switchyard up` on this machine): their work adds up
    /// instead of overlapping, and their memory comes out of one pool.
    pub shared_host: bool,
    /// Where each figure comes from.
    pub sources: Vec<String>,
}

impl HardwareProfile {
    /// A built-in profile by name (see [`HARDWARE_PROFILES`]).
    pub fn named(name: &str) -> Result<HardwareProfile, PlanError> {
        match name {
            "h100-80g" => Ok(h100()),
            "h200-141g" => Ok(h200()),
            "b200-180g" => Ok(b200()),
            "cpu" => Ok(cpu()),
            _ => Err(PlanError::UnknownHardware { name: name.to_string(), known: HARDWARE_PROFILES.join(", ") }),
        }
    }

    /// Dense GEMM FLOP/s at `tokens` rows.
    #[inline]
    pub fn dense_rate(&self, tokens: f64) -> f64 {
        match &self.dense_curve {
            Some(curve) => curve.at(tokens),
            None => self.dense_flops * tokens / (tokens + self.gemm_half_rate_tokens),
        }
    }

    /// FP8-weight GEMM FLOP/s at `tokens` rows.
    #[inline]
    pub fn fp8_rate(&self, tokens: f64) -> f64 {
        match &self.fp8_curve {
            Some(curve) => curve.at(tokens),
            None => self.fp8_flops * tokens / (tokens + self.gemm_half_rate_tokens),
        }
    }

    /// The link between workers when a deployment spans `devices` devices.
    pub fn link_for(&self, devices: u32) -> Link {
        if devices <= self.devices_per_node {
            self.intra_node
        } else {
            self.inter_node
        }
    }
}

/// NVIDIA H100 80GB HBM3 (SXM): the anchors measured with cuBLASLt/PyTorch in `shared/docs/performance.md`.
fn h100() -> HardwareProfile {
    HardwareProfile {
        name: "h100-80g".into(),
        description: "NVIDIA H100 80GB HBM3 (SXM), 8 per node with NVLink 4, 400 Gb/s InfiniBand per GPU".into(),
        memory_bytes: (79.19 * GIB) as u64,
        devices_per_node: 8,
        dense_flops: 709e12,
        fp8_flops: 1171e12,
        attention_flops: 630e12,
        gemm_half_rate_tokens: 16.0,
        dense_curve: None,
        fp8_curve: None,
        weight_stream_bytes_per_s: 1.8e12,
        dense_stream_share_of_read: 0.6,
        grouped_stream_bytes_per_s: 2.5e12,
        kv_read_bytes_per_s: 3.1e12,
        attention_launch_s: 15e-6,
        intra_node: Link { bytes_per_s: 150e9, latency_s: 25e-6 },
        inter_node: Link { bytes_per_s: 45e9, latency_s: 40e-6 },
        step_overhead_s: 300e-6,
        per_sequence_overhead_s: 2e-6,
        workspace_bytes: (2.0 * GIB) as u64,
        dense_precision: Precision::Bf16,
        kv_precision: Precision::Bf16,
        shared_host: false,
        sources: vec![
            "memory: 79.19 GiB as CUDA reports an H100 80GB HBM3".into(),
            "dense 709 TFLOP/s (bf16 GEMM 8192^3), FP8 1171 TFLOP/s (expert gate_up at 8192 tokens), attention 630 \
             TFLOP/s (prefill SDPA): shared/docs/performance.md"
                .into(),
            "weight streaming 1.8 TB/s (one expert or projection at 1-128 tokens), 2.5 TB/s grouped (16 experts), \
             KV read 3.1 TB/s + 15 us per launch (SDPA decode 27 us at 8K .. 1392 us at 1M): performance.md"
                .into(),
            "dense weight streaming is 0.6 of the 3.0 TB/s device copy (what --calibrate applies to a measured read \
             rate)"
                .into(),
            "NVLink dispatch 150 GB/s, InfiniBand 45 GB/s per GPU: DeepEP normal kernels on H800 (153 GB/s NVLink, \
             43-58 GB/s RDMA), performance.md; latencies 25/40 us: assumption from DeepEP low-latency kernels \
             (77 us dispatch of 128 tokens at EP8)"
                .into(),
            "step overhead 0.3 ms + 2 us per sequence, workspace 2 GiB per GPU: assumptions (CUDA graphs, sampling; \
             CUDA context + cuBLAS/NCCL buffers)"
                .into(),
        ],
    }
}

/// NVIDIA H200 141GB: the H100's die with HBM3e at 4.8 TB/s; bandwidths are the H100's measured ones scaled by
/// 4.8 / 3.35, compute unchanged.
fn h200() -> HardwareProfile {
    let mut p = h100();
    let scale = 4.8 / 3.35;
    p.name = "h200-141g".into();
    p.description = "NVIDIA H200 141GB HBM3e (SXM), 8 per node with NVLink 4, 400 Gb/s InfiniBand per GPU".into();
    p.memory_bytes = (139.8 * GIB) as u64;
    p.weight_stream_bytes_per_s *= scale;
    p.grouped_stream_bytes_per_s *= scale;
    p.kv_read_bytes_per_s *= scale;
    p.sources = vec![
        "memory: 139.8 GiB as CUDA reports an H200 (141 GB HBM3e); bandwidth 4.8 TB/s: NVIDIA H200 datasheet".into(),
        "compute as the H100 (same GH100 die, same clocks in the SXM part); every bandwidth is the H100's measured \
         figure x 4.8/3.35"
            .into(),
        "links, overheads and workspace as h100-80g".into(),
    ];
    p
}

/// NVIDIA B200 (DGX B200: 8 x 180 GB): vendor peaks scaled by the H100's measured/peak ratios.
fn b200() -> HardwareProfile {
    let h = h100();
    // The H100 SXM's vendor peaks (dense, no sparsity): 989 TFLOP/s bf16, 1979 FP8, 3.35 TB/s.
    let (bf16_eff, fp8_eff, bw_scale) = (h.dense_flops / 989e12, h.fp8_flops / 1979e12, 8.0 / 3.35);
    HardwareProfile {
        name: "b200-180g".into(),
        description: "NVIDIA B200 180GB HBM3e (DGX B200), 8 per node with NVLink 5, 400 Gb/s network per GPU".into(),
        memory_bytes: 180_000_000_000,
        dense_flops: 2.25e15 * bf16_eff,
        fp8_flops: 4.5e15 * fp8_eff,
        attention_flops: 2.25e15 * (h.attention_flops / 989e12),
        weight_stream_bytes_per_s: h.weight_stream_bytes_per_s * bw_scale,
        grouped_stream_bytes_per_s: h.grouped_stream_bytes_per_s * bw_scale,
        kv_read_bytes_per_s: h.kv_read_bytes_per_s * bw_scale,
        intra_node: Link { bytes_per_s: h.intra_node.bytes_per_s * 2.0, latency_s: h.intra_node.latency_s },
        sources: vec![
            "memory 180 GB, 8 TB/s, 2.25 PFLOP/s dense bf16, 4.5 PFLOP/s dense FP8, NVLink 5 1.8 TB/s: NVIDIA DGX \
             B200 datasheet"
                .into(),
            "achieved rates: vendor peak x the H100's measured/peak ratio (bf16 709/989, FP8 1171/1979, bandwidths \
             x 8/3.35, NVLink dispatch x 2)"
                .into(),
            "inter-node link, overheads and workspace as h100-80g".into(),
        ],
        ..h
    }
}

/// This machine's CPU: every worker a process on one host (`switchyard up`). Rates from the CPU table of
/// `shared/docs/performance.md` until `--calibrate` replaces them; memory and cores from the running system.
fn cpu() -> HardwareProfile {
    let memory_bytes = host_memory_bytes().unwrap_or(8 << 30);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    HardwareProfile {
        name: "cpu".into(),
        description: format!("this machine's CPU ({cores} cores): every worker a process on one host, on loopback"),
        memory_bytes,
        devices_per_node: 1,
        dense_flops: 166e9,
        fp8_flops: 166e9,
        attention_flops: 60e9,
        gemm_half_rate_tokens: 32.0,
        dense_curve: None,
        fp8_curve: None,
        weight_stream_bytes_per_s: 0.7 * 11e9,
        dense_stream_share_of_read: 0.7,
        grouped_stream_bytes_per_s: 11e9,
        kv_read_bytes_per_s: 11e9,
        attention_launch_s: 5e-6,
        intra_node: Link { bytes_per_s: 4.2e9, latency_s: 55e-6 },
        inter_node: Link { bytes_per_s: 4.2e9, latency_s: 55e-6 },
        step_overhead_s: 1e-3,
        per_sequence_overhead_s: 30e-6,
        workspace_bytes: 0,
        dense_precision: Precision::F32,
        kv_precision: Precision::F32,
        shared_host: true,
        sources: vec![
            "memory: MemTotal of /proc/meminfo; cores: the available parallelism".into(),
            "f32 GEMM 166 GFLOP/s, memory read 11 GB/s, TCP loopback 4.2 GB/s: shared/docs/performance.md (CPU \
             machines); FP8-weight GEMM taken equal to f32 (the kernels bench measures 0.96-1.00 of sgemm)"
                .into(),
            "dense f32 weight streaming at 0.7 of memory read: the `gemm` crate's m = 1 path over 1.16 GB of distinct \
             f32 matrices of the small preset's shapes streamed at 0.67-0.73 of the same run's memory-read rate (4 \
             rounds, docs/planner.md)"
                .into(),
            "loopback latency 55 us one way: half the ~110 us raw TCP round trip of docs/benchmarks.md".into(),
            "attention 60 GFLOP/s, step overhead 1 ms + 30 us per sequence: assumptions".into(),
            "the CPU runtime holds dense weights and KV in f32 and streams FP8 expert codes".into(),
        ],
    }
}

/// The host's RAM from `/proc/meminfo` (Linux); `None` elsewhere.
fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
