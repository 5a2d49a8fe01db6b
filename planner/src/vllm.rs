//! The vLLM tensor-parallel reference: how long a context vLLM fits when it serves a model with tensor parallelism,
//! modelled with this crate's memory accounting. It checks the memory model against published deployments (vLLM's
//! "Llama 4 in vLLM" post, v0.8.3: Maverick FP8 with ~430K context on 8xH100 and the full 1M on 8xH200, TP8).
//!
//! What is modelled (every term is in [`VllmBreakdown`]):
//! - The budget per GPU is `gpu_memory_utilization` (0.9, vLLM's default) x the memory CUDA reports.
//! - Weights are sharded evenly over the TP ranks: the text model as [`WeightBytes`] computes it, plus the vision
//!   tower and projector the multimodal checkpoint also loads (~0.87B parameters in bf16, counted from the vision
//!   config: 34 layers of width 1408 and MLP 5632, the pixel-shuffle adapter and the projector).
//! - The KV cache keeps EVERY token on EVERY layer: v0.8.3 allocated Llama 4's chunked-attention layers like full
//!   attention (the hybrid allocator that caps them at one chunk came with v0.10). bf16, as the post's commands set
//!   no `--kv-cache-dtype`. Each rank holds `num_key_value_heads / tp` heads.
//! - What vLLM's profiling run takes before sizing the KV cache: the warm-up of the sampler over `max_num_seqs`
//!   (1024 on H100/H200-class GPUs) dummy requests of the full vocabulary (bf16 gathered logits, their f32 copy, the
//!   int64 prompt-id tensor of the dummy metadata, the sort's f32 values and int64 indices, two masks, softmax,
//!   cumsum and the scattered result: 40 bytes per (request, vocabulary entry)); the forward activations at
//!   `max_num_batched_tokens` (8192 for the OpenAI server on these GPUs); and memory outside PyTorch, taken as 4 GiB
//!   per rank at TP8: the CUDA context (~0.6 GiB), two NCCL communicators over the node (torch.distributed's and
//!   vLLM's own PyNccl one), whose buffers with NVLink SHARP on an NVSwitch node take ~1.5 GiB each, and cuBLAS and
//!   custom all-reduce workspaces (~0.4 GiB). This last term is an estimate, not a measurement, and the least certain
//!   one: each GiB of it moves the H100 answer by ~44K tokens (2 GiB: 552K, 3 GiB: 509K, 4 GiB: 465K, 5 GiB: 421K).

use serde::Serialize;
use switchyard_model::memory::{KvBytes, Precision};

use crate::hardware::HardwareProfile;
use crate::model::ModelSpec;

const GIB: f64 = (1u64 << 30) as f64;

/// Parameters of Llama 4's vision tower, adapter and projector (34 x (4 x 1408^2 + 2 x 1408 x 5632), patch
/// embedding, the 5632 -> 4096 -> 4096 pixel-shuffle MLP, the 4096 -> 5120 projector).
pub const VISION_PARAMS: u64 =
    34 * (4 * 1408 * 1408 + 2 * 1408 * 5632) + 3 * 14 * 14 * 1408 + 5632 * 4096 + 4096 * 4096 + 4096 * 5120;

/// How the reference deployment is set up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VllmSettings {
    /// Tensor-parallel ranks (GPUs).
    pub tensor_parallel: u32,
    /// `--gpu-memory-utilization`.
    pub gpu_memory_utilization: f64,
    /// `--max-num-seqs`.
    pub max_num_seqs: u64,
    /// `--max-num-batched-tokens`.
    pub max_num_batched_tokens: u64,
    /// KV cache element type.
    pub kv_dtype: Precision,
    /// Memory outside PyTorch per rank (CUDA context, NCCL, cuBLAS), bytes.
    pub non_torch_bytes: u64,
    /// Whether the multimodal checkpoint's vision tower is loaded.
    pub vision_tower: bool,
}

impl Default for VllmSettings {
    fn default() -> Self {
        VllmSettings {
            tensor_parallel: 8,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 1024,
            max_num_batched_tokens: 8192,
            kv_dtype: Precision::Bf16,
            non_torch_bytes: 4 << 30,
            vision_tower: true,
        }
    }
}

/// The memory of one rank and the context it leaves room for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VllmBreakdown {
    /// `gpu_memory_utilization` x the GPU's memory.
    pub budget_bytes: f64,
    /// This rank's share of the weights.
    pub weights_bytes: f64,
    /// Sampler warm-up peak.
    pub sampler_bytes: f64,
    /// Forward activations at `max_num_batched_tokens`.
    pub activation_bytes: f64,
    /// Memory outside PyTorch.
    pub non_torch_bytes: f64,
    /// What is left for the KV cache.
    pub kv_bytes: f64,
    /// KV bytes of one token on this rank (every layer).
    pub kv_per_token: f64,
    /// Tokens the KV cache holds, capped at the model's `max_position_embeddings`.
    pub max_context: u64,
    /// The same without the cap.
    pub kv_tokens: u64,
}

/// The context vLLM fits for `model` on `tensor_parallel` GPUs of `hardware`.
pub fn max_context(model: &ModelSpec, hardware: &HardwareProfile, settings: &VllmSettings) -> VllmBreakdown {
    let c = &model.config;
    let tp = settings.tensor_parallel.max(1) as f64;
    let vision = if settings.vision_tower { VISION_PARAMS as f64 * 2.0 } else { 0.0 };
    let weights = (model.stored_weights.total() as f64 + vision) / tp;
    let budget = settings.gpu_memory_utilization * hardware.memory_bytes as f64;
    let sampler = 40.0 * settings.max_num_seqs as f64 * c.vocab_size as f64;
    // The largest live tensors of a forward pass on one rank: the residual stream and its normed copy, the
    // rank's q/k/v and MLP intermediate (bf16), and the all-reduce buffer.
    let tokens = settings.max_num_batched_tokens as f64;
    let per_token = 2.0
        * (4.0 * c.hidden_size as f64
            + (c.q_dim() + 2 * c.kv_dim()) as f64 / tp
            + 2.0 * c.intermediate_size_mlp.max(c.intermediate_size) as f64 / tp);
    let activations = tokens * per_token;
    let non_torch = settings.non_torch_bytes as f64;
    let kv_bytes = (budget - weights - sampler.max(0.0) - activations - non_torch).max(0.0);
    let kv = KvBytes::of(c, settings.kv_dtype);
    let kv_per_token = kv.per_token_all_layers() as f64 / tp;
    let kv_tokens = (kv_bytes / kv_per_token) as u64;
    VllmBreakdown {
        budget_bytes: budget,
        weights_bytes: weights,
        sampler_bytes: sampler,
        activation_bytes: activations,
        non_torch_bytes: non_torch,
        kv_bytes,
        kv_per_token,
        max_context: kv_tokens.min(c.max_position_embeddings as u64),
        kv_tokens,
    }
}

impl VllmBreakdown {
    /// One line per term, in GiB.
    pub fn describe(&self) -> String {
        format!(
            "budget {:.2} GiB - weights {:.2} - sampler warm-up {:.2} - activations {:.2} - non-torch {:.2} = KV \
             {:.2} GiB; {:.0} bytes per token -> {} tokens (context {})",
            self.budget_bytes / GIB,
            self.weights_bytes / GIB,
            self.sampler_bytes / GIB,
            self.activation_bytes / GIB,
            self.non_torch_bytes / GIB,
            self.kv_bytes / GIB,
            self.kv_per_token,
            self.kv_tokens,
            self.max_context
        )
    }
}
