//! Memory accounting: the one place that says how many bytes a model's weights and KV cache take.
//!
//! Everything that sizes memory (the capacity planner, the coordinator's expert slots, attention workers' KV budgets)
//! asks this module, so that "how big is an expert" or "how much KV does a 1M-token sequence need" has one answer.
//!
//! KV: a layer keeps `2 * num_key_value_heads * head_dim` values per token (keys and values). Global (NoPE,
//! full-attention) layers keep every token of a sequence; chunked-attention layers keep at most one chunk
//! (`attention_chunk_size` tokens), because no later query can see keys before its own chunk. For Maverick in bf16
//! that is 4 KiB per token per layer, and a 1M-token sequence needs 12 x 1M x 4 KiB + 36 x 8192 x 4 KiB = 49.1 GiB.
//!
//! Weights: the bytes of each component (embeddings, attention, norms, dense MLPs, shared experts, routers, routed
//! experts, lm_head), either computed from a [`TextConfig`] and a [`WeightPrecision`], or summed from a checkpoint's
//! safetensors headers ([`WeightBytes::from_checkpoint`]) without reading any tensor. FP8 matrices carry one f32
//! scale per output row, as Switchyard's FP8 checkpoints store them (compressed-tensors, per-channel).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::TextConfig;
use crate::ModelError;

/// Bytes of the per-output-row scale an FP8 matrix carries (an f32, as the FP8 checkpoints here store it).
pub const FP8_ROW_SCALE_BYTES: u64 = 4;

/// An element type for weights or KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE single precision (the CPU runtime keeps dense weights and KV in f32).
    F32,
    /// bfloat16.
    Bf16,
    /// FP8 E4M3; as a weight precision, each matrix row also carries an f32 scale.
    Fp8,
}

impl Precision {
    /// Bytes per element (without FP8 row scales).
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
            Precision::Fp8 => 1,
        }
    }

    /// The name [`FromStr`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }

    /// Bytes of an nn.Linear weight `[out, in]` stored in this precision, FP8 row scales included.
    pub fn matrix_bytes(self, out_features: u64, in_features: u64) -> u64 {
        let scales = if self == Precision::Fp8 { out_features * FP8_ROW_SCALE_BYTES } else { 0 };
        out_features * in_features * self.bytes() + scales
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "fp8" | "f8" | "fp8_e4m3" | "e4m3" => Ok(Precision::Fp8),
            _ => Err(ModelError::InvalidInput {
                what: "precision".to_string(),
                reason: format!("unknown precision {s:?}: expected \"f32\", \"bf16\" or \"fp8\""),
            }),
        }
    }
}

/// KV bytes of one token in one layer: keys and values of every KV head.
pub fn kv_bytes_per_token_per_layer(config: &TextConfig, dtype: Precision) -> u64 {
    2 * config.kv_dim() as u64 * dtype.bytes()
}

/// The KV footprint of a model: how many layers keep every token and how many keep one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvBytes {
    /// KV element type.
    pub dtype: Precision,
    /// Bytes of one token in one layer.
    pub per_token_per_layer: u64,
    /// Layers that keep every token (full attention, or chunked without a chunk size).
    pub global_layers: u64,
    /// Layers that keep at most `chunk_size` tokens.
    pub chunked_layers: u64,
    /// `attention_chunk_size`, when the model has chunked layers.
    pub chunk_size: Option<u64>,
}

impl KvBytes {
    /// The footprint of `config` with KV stored as `dtype`.
    pub fn of(config: &TextConfig, dtype: Precision) -> KvBytes {
        let layers = config.num_hidden_layers as u64;
        let chunked = (0..config.num_hidden_layers).filter(|&l| config.is_chunked_attention(l)).count() as u64;
        KvBytes {
            dtype,
            per_token_per_layer: kv_bytes_per_token_per_layer(config, dtype),
            global_layers: layers - chunked,
            chunked_layers: chunked,
            chunk_size: config.attention_chunk_size.filter(|_| chunked > 0).map(|c| c as u64),
        }
    }

    /// Bytes one more token adds to a long sequence: only the global layers grow past one chunk.
    pub fn per_token_global(&self) -> u64 {
        self.per_token_per_layer * self.global_layers
    }

    /// Bytes one token takes when every layer keeps every token (no chunk cap).
    pub fn per_token_all_layers(&self) -> u64 {
        self.per_token_per_layer * (self.global_layers + self.chunked_layers)
    }

    /// Tokens a chunked layer holds at most for a sequence of `tokens`.
    fn chunked_tokens(&self, tokens: u64) -> u64 {
        match self.chunk_size {
            Some(chunk) => tokens.min(chunk),
            None => tokens,
        }
    }

    /// KV bytes of one sequence of `tokens` tokens: every token on global layers, at most one chunk on chunked ones.
    pub fn sequence(&self, tokens: u64) -> u64 {
        self.per_token_per_layer.saturating_mul(
            self.global_layers.saturating_mul(tokens) + self.chunked_layers * self.chunked_tokens(tokens),
        )
    }

    /// KV bytes of one sequence when every layer keeps every token (a runtime without the chunk cap).
    pub fn sequence_uncapped(&self, tokens: u64) -> u64 {
        self.per_token_all_layers().saturating_mul(tokens)
    }

    /// The longest sequence whose KV ([`KvBytes::sequence`]) fits in `bytes`.
    pub fn max_tokens_in(&self, bytes: u64) -> u64 {
        let all = self.per_token_all_layers();
        if all == 0 {
            return u64::MAX;
        }
        // Up to one chunk every layer grows with the sequence; past it only the global layers do.
        let short = bytes / all;
        match self.chunk_size {
            Some(chunk) if short >= chunk => {
                if self.global_layers == 0 {
                    // Past one chunk a sequence needs no more memory.
                    return u64::MAX;
                }
                let chunk_bytes = self.chunked_layers * chunk * self.per_token_per_layer;
                (bytes - chunk_bytes) / self.per_token_global()
            }
            _ => short,
        }
    }
}

/// The precision each kind of weight is held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WeightPrecision {
    /// Everything but the routed experts: embeddings, attention, norms, dense MLPs, shared experts, routers, lm_head.
    pub dense: Precision,
    /// The routed experts.
    pub routed_experts: Precision,
}

impl WeightPrecision {
    /// Every weight in `precision`.
    pub fn uniform(precision: Precision) -> Self {
        WeightPrecision { dense: precision, routed_experts: precision }
    }

    /// Maverick's FP8 checkpoint: routed experts in FP8, everything else bf16.
    pub fn fp8_experts() -> Self {
        WeightPrecision { dense: Precision::Bf16, routed_experts: Precision::Fp8 }
    }
}

/// Weight bytes per component of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct WeightBytes {
    /// `embed_tokens`.
    pub embeddings: u64,
    /// q, k, v, o projections of every layer.
    pub attention: u64,
    /// RMSNorm weights (two per layer and the final norm).
    pub norms: u64,
    /// The MLPs of the dense (non-MoE) layers.
    pub dense_mlp: u64,
    /// The shared expert of every MoE layer.
    pub shared_experts: u64,
    /// The router of every MoE layer.
    pub routers: u64,
    /// Every routed expert of every MoE layer.
    pub routed_experts: u64,
    /// One routed expert of one MoE layer (gate, up and down, with FP8 scales): the unit expert slots are sized in.
    pub routed_expert_per_layer: u64,
    /// `lm_head` (0 when tied to the embeddings).
    pub lm_head: u64,
    /// Tensors of a checkpoint that fit none of the above (0 when computed from a config).
    pub other: u64,
}

impl WeightBytes {
    /// The bytes of `config`'s weights held in `precision`.
    pub fn of(config: &TextConfig, precision: WeightPrecision) -> WeightBytes {
        let h = config.hidden_size as u64;
        let dense = precision.dense;
        let layers = config.num_hidden_layers as u64;
        let moe_layers = config.num_moe_layers() as u64;
        let dense_layers = layers - moe_layers;
        let (q, kv) = (config.q_dim() as u64, config.kv_dim() as u64);
        let attention_per_layer = dense.matrix_bytes(q, h) + 2 * dense.matrix_bytes(kv, h) + dense.matrix_bytes(h, q);
        let mlp = |inter: u64, p: Precision| 2 * p.matrix_bytes(inter, h) + p.matrix_bytes(h, inter);
        let inter = config.intermediate_size as u64;
        let expert = mlp(inter, precision.routed_experts);
        let vocab = config.vocab_size as u64;
        WeightBytes {
            embeddings: dense.matrix_bytes(vocab, h),
            attention: layers * attention_per_layer,
            // Norm weights stay in the activation dtype whatever the matrices are quantised to.
            norms: (2 * layers + 1) * h * dense.bytes().max(Precision::Bf16.bytes()),
            dense_mlp: dense_layers * mlp(config.intermediate_size_mlp as u64, dense),
            shared_experts: moe_layers * mlp(inter, dense),
            routers: moe_layers * dense.matrix_bytes(config.num_local_experts as u64, h),
            routed_experts: moe_layers * config.num_local_experts as u64 * expert,
            routed_expert_per_layer: expert,
            lm_head: if config.tie_word_embeddings { 0 } else { dense.matrix_bytes(vocab, h) },
            other: 0,
        }
    }

    /// The bytes of a checkpoint's tensors as stored, by component, from the safetensors headers (reads no tensor
    /// data). Vision tower tensors are not part of a [`Checkpoint`] and are not counted.
    pub fn from_checkpoint(checkpoint: &Checkpoint, config: &TextConfig) -> WeightBytes {
        let mut w = WeightBytes::default();
        for tensor in checkpoint.tensors() {
            let bytes = tensor.range.len() as u64;
            let name = tensor.name.as_str();
            let slot = if name == "model.embed_tokens.weight" {
                &mut w.embeddings
            } else if name == "lm_head.weight" {
                &mut w.lm_head
            } else if name == "model.norm.weight" || name.ends_with("layernorm.weight") {
                &mut w.norms
            } else if name.contains(".self_attn.") {
                &mut w.attention
            } else if name.contains(".feed_forward.router.") {
                &mut w.routers
            } else if name.contains(".feed_forward.experts.") {
                &mut w.routed_experts
            } else if name.contains(".feed_forward.shared_expert.") {
                &mut w.shared_experts
            } else if name.contains(".feed_forward.") {
                &mut w.dense_mlp
            } else {
                &mut w.other
            };
            *slot += bytes;
        }
        let replicas = (config.num_moe_layers() * config.num_local_experts) as u64;
        w.routed_expert_per_layer = w.routed_experts.checked_div(replicas).unwrap_or(0);
        w
    }

    /// Every weight byte of the model.
    pub fn total(&self) -> u64 {
        self.non_expert() + self.routed_experts
    }

    /// Everything but the routed experts: what an attention worker holds.
    pub fn non_expert(&self) -> u64 {
        self.embeddings
            + self.attention
            + self.norms
            + self.dense_mlp
            + self.shared_experts
            + self.routers
            + self.lm_head
            + self.other
    }

    /// The components with their names, in a fixed order (for tables).
    pub fn components(&self) -> [(&'static str, u64); 9] {
        [
            ("embeddings", self.embeddings),
            ("attention", self.attention),
            ("norms", self.norms),
            ("dense_mlp", self.dense_mlp),
            ("shared_experts", self.shared_experts),
            ("routers", self.routers),
            ("routed_experts", self.routed_experts),
            ("lm_head", self.lm_head),
            ("other", self.other),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    const GIB: f64 = (1u64 << 30) as f64;

    /// Maverick's text config as the hub states it (everything else takes transformers' defaults).
    fn maverick() -> TextConfig {
        let json = r#"{"model_type": "llama4", "text_config": {"model_type": "llama4_text", "hidden_size": 5120,
            "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 128,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "attention_chunk_size": 8192,
            "use_qk_norm": false, "vocab_size": 202048, "max_position_embeddings": 1048576}}"#;
        ModelConfig::from_json_str(json, "maverick.json").expect("maverick config parses").text
    }

    #[test]
    fn maverick_kv_per_token_per_layer_is_4_kib_in_bf16() {
        let cfg = maverick();
        assert_eq!(kv_bytes_per_token_per_layer(&cfg, Precision::Bf16), 4096);
        assert_eq!(kv_bytes_per_token_per_layer(&cfg, Precision::Fp8), 2048);
        assert_eq!(kv_bytes_per_token_per_layer(&cfg, Precision::F32), 8192);
        let kv = KvBytes::of(&cfg, Precision::Bf16);
        assert_eq!((kv.global_layers, kv.chunked_layers, kv.chunk_size), (12, 36, Some(8192)));
    }

    #[test]
    fn maverick_one_million_tokens_is_49_1_gib_bf16_and_24_6_fp8() {
        let cfg = maverick();
        let tokens = 1 << 20;
        let bf16 = KvBytes::of(&cfg, Precision::Bf16).sequence(tokens) as f64 / GIB;
        assert!((bf16 - 49.125).abs() < 1e-9, "bf16: {bf16} GiB");
        let fp8 = KvBytes::of(&cfg, Precision::Fp8).sequence(tokens) as f64 / GIB;
        assert!((fp8 - 24.5625).abs() < 1e-9, "fp8: {fp8} GiB");
        // Below one chunk every layer grows; the uncapped form keeps every token on every layer.
        let kv = KvBytes::of(&cfg, Precision::Bf16);
        assert_eq!(kv.sequence(100), 100 * 48 * 4096);
        assert_eq!(kv.sequence_uncapped(tokens), tokens * 48 * 4096);
    }

    #[test]
    fn max_tokens_inverts_sequence_bytes() {
        let kv = KvBytes::of(&maverick(), Precision::Bf16);
        for tokens in [1u64, 100, 8191, 8192, 8193, 100_000, 1 << 20] {
            let bytes = kv.sequence(tokens);
            assert_eq!(kv.max_tokens_in(bytes), tokens, "{tokens} tokens");
            assert_eq!(kv.max_tokens_in(bytes - 1), tokens - 1, "{tokens} tokens less one byte");
        }
    }

    #[test]
    fn maverick_fp8_routed_experts_are_386_5_gb() {
        let w = WeightBytes::of(&maverick(), WeightPrecision::fp8_experts());
        // 24 layers x 128 experts x 3 x 5120 x 8192 codes, plus one f32 scale per output row.
        let codes = 24 * 128 * 3 * 5120 * 8192u64;
        let scales = 24 * 128 * (8192 + 8192 + 5120) * FP8_ROW_SCALE_BYTES;
        assert_eq!(w.routed_experts, codes + scales);
        assert!((codes as f64 / 1e9 - 386.5).abs() < 0.1);
        assert!((w.routed_expert_per_layer as f64 / 1e6 - 125.9).abs() < 0.2, "{}", w.routed_expert_per_layer);
        // About 400 GB in all; the rest is bf16 (embeddings, attention, dense MLPs, shared experts, lm_head).
        let total = w.total() as f64 / 1e9;
        assert!((total - 400.0).abs() / 400.0 < 0.05, "total {total} GB");
        assert_eq!(w.embeddings, 202048 * 5120 * 2);
        assert_eq!(w.lm_head, w.embeddings);
        assert_eq!(w.attention, 48 * (2 * 5120 * 5120 + 2 * 1024 * 5120) * 2);
        assert_eq!(w.dense_mlp, 24 * 3 * 5120 * 16384 * 2);
        assert_eq!(w.shared_experts, 24 * 3 * 5120 * 8192 * 2);
        assert_eq!(w.routers, 24 * 128 * 5120 * 2);
    }

    #[test]
    fn precision_parses_and_refuses_clearly() {
        assert_eq!("BF16".parse::<Precision>().expect("bf16"), Precision::Bf16);
        assert_eq!("fp8".parse::<Precision>().expect("fp8"), Precision::Fp8);
        let err = "int4".parse::<Precision>().expect_err("int4 is not supported").to_string();
        assert!(err.contains("int4"), "{err}");
    }
}
