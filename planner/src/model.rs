//! The models a plan is for: built-in presets (their config facts written as the `config.json` Hugging Face
//! publishes, parsed by the model crate's own parser) or a checkpoint directory (its `config.json`, and the sizes of
//! its tensors from the safetensors headers).

use std::path::Path;

use serde::Serialize;
use switchyard_model::checkpoint::{Checkpoint, DType, ExpertLayout};
use switchyard_model::config::{ModelConfig, TextConfig};
use switchyard_model::memory::{Precision, WeightBytes, WeightPrecision};
use switchyard_model::tiny::{preset_text_config, Preset};

use crate::PlanError;

/// Preset names, as `--model` takes them.
pub const MODEL_PRESETS: [&str; 5] = ["maverick-fp8", "maverick-bf16", "scout-bf16", "small", "tiny"];

/// Maverick's text config (Llama-4-Maverick-17B-128E-Instruct `config.json`, text part).
const MAVERICK_TEXT: &str = r#"{
    "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_local_experts": 128, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "no_rope_layers": [],
    "attention_chunk_size": 8192, "rope_theta": 500000.0, "rope_scaling": null, "use_qk_norm": false,
    "attn_temperature_tuning": true, "floor_scale": 8192, "attn_scale": 0.1, "rms_norm_eps": 1e-05,
    "vocab_size": 202048, "max_position_embeddings": 1048576, "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018, "hidden_act": "silu",
    "attention_bias": false, "torch_dtype": "bfloat16"
}"#;

/// Scout's text config (Llama-4-Scout-17B-16E-Instruct): 16 experts, every layer MoE, qk-norm, llama3 RoPE scaling.
const SCOUT_TEXT: &str = r#"{
    "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "no_rope_layers": [],
    "attention_chunk_size": 8192, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192},
    "use_qk_norm": true, "attn_temperature_tuning": true, "floor_scale": 8192, "attn_scale": 0.1,
    "rms_norm_eps": 1e-05, "vocab_size": 202048, "max_position_embeddings": 10485760, "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018, "hidden_act": "silu",
    "attention_bias": false, "torch_dtype": "bfloat16"
}"#;

/// The compressed-tensors block of the FP8 checkpoint: routed experts FP8 per channel, activations FP8 per token.
const FP8_QUANTIZATION: &str = r#"{
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, "dynamic": false},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": true,
                              "dynamic": true}}},
    "ignore": ["re:.*self_attn.*", "re:.*shared_expert.*", "re:.*router.*", "re:.*feed_forward\\.(gate|up|down)_proj",
               "lm_head", "re:vision_model.*", "re:multi_modal_projector.*"]
}"#;

/// A model to plan for.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSpec {
    /// The preset name or the directory.
    pub name: String,
    /// The text config.
    #[serde(skip)]
    pub config: TextConfig,
    /// The precision the checkpoint stores each kind of weight in.
    pub stored_precision: WeightPrecision,
    /// Weight bytes as stored: from the safetensors headers for a directory, computed for a preset.
    pub stored_weights: WeightBytes,
}

impl ModelSpec {
    /// A preset by name (see [`MODEL_PRESETS`]), or a model directory.
    pub fn resolve(name: &str) -> Result<ModelSpec, PlanError> {
        match name {
            "maverick-fp8" => Self::from_text_json(name, MAVERICK_TEXT, Some(FP8_QUANTIZATION)),
            "maverick-bf16" => Self::from_text_json(name, MAVERICK_TEXT, None),
            "scout-bf16" => Self::from_text_json(name, SCOUT_TEXT, None),
            "small" | "tiny" => {
                let preset = if name == "small" { Preset::Small } else { Preset::Tiny };
                // The built-in checkpoints (`switchyard up` and `bench` make them) store the experts in FP8.
                let text = preset_text_config(preset).to_string();
                Self::from_text_json(name, &text, Some(FP8_QUANTIZATION))
            }
            _ if Path::new(name).join("config.json").is_file() => Self::from_dir(Path::new(name)),
            _ => Err(PlanError::UnknownModel { name: name.to_string(), known: MODEL_PRESETS.join(", ") }),
        }
    }

    /// A preset: a nested `llama4` config.json around `text` (and `quantization` when the experts are FP8).
    fn from_text_json(name: &str, text: &str, quantization: Option<&str>) -> Result<ModelSpec, PlanError> {
        let json = format!(
            r#"{{"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
                "text_config": {text}{}}}"#,
            quantization.map(|q| format!(r#", "quantization_config": {q}"#)).unwrap_or_default()
        );
        let parsed = ModelConfig::from_json_str(&json, format!("<preset {name}>"))
            .map_err(|source| PlanError::Model { dir: name.into(), source: Box::new(source) })?;
        let stored_precision = if parsed.quantization.is_some() {
            WeightPrecision::fp8_experts()
        } else {
            WeightPrecision::uniform(Precision::Bf16)
        };
        let stored_weights = WeightBytes::of(&parsed.text, stored_precision);
        Ok(ModelSpec { name: name.to_string(), config: parsed.text, stored_precision, stored_weights })
    }

    /// A checkpoint directory: its config.json and the stored size of every tensor (headers only).
    pub fn from_dir(dir: &Path) -> Result<ModelSpec, PlanError> {
        let model_error = |source| PlanError::Model { dir: dir.to_path_buf(), source: Box::new(source) };
        let parsed = ModelConfig::from_file(dir.join("config.json")).map_err(model_error)?;
        let checkpoint = Checkpoint::open(dir).map_err(model_error)?;
        let stored_weights = WeightBytes::from_checkpoint(&checkpoint, &parsed.text);
        let fp8_experts = checkpoint.expert_layout() == Some(ExpertLayout::PerExpert)
            && checkpoint.tensors().any(|t| t.dtype == DType::F8E4M3 && t.name.contains(".feed_forward.experts."));
        let dense = match parsed.text.torch_dtype.as_deref() {
            Some("float32") => Precision::F32,
            _ => Precision::Bf16,
        };
        let stored_precision =
            WeightPrecision { dense, routed_experts: if fp8_experts { Precision::Fp8 } else { dense } };
        Ok(ModelSpec { name: dir.display().to_string(), config: parsed.text, stored_precision, stored_weights })
    }

    /// The weights as a runtime holds them: dense weights in `dense`; FP8 experts stay FP8 (the kernels stream the
    /// codes), other experts are held like the dense weights.
    pub fn runtime_weights(&self, dense: Precision) -> WeightBytes {
        let routed_experts =
            if self.stored_precision.routed_experts == Precision::Fp8 { Precision::Fp8 } else { dense };
        let mut w = WeightBytes::of(&self.config, WeightPrecision { dense, routed_experts });
        if routed_experts == self.stored_precision.routed_experts && self.stored_weights.routed_experts > 0 {
            // Stored experts are used as they are: keep the checkpoint's exact size (its scale dtype, padding).
            w.routed_experts = self.stored_weights.routed_experts;
            w.routed_expert_per_layer = self.stored_weights.routed_expert_per_layer;
        }
        w
    }

    /// Parameters of one routed expert (gate, up, down).
    pub fn expert_params(&self) -> u64 {
        3 * (self.config.hidden_size * self.config.intermediate_size) as u64
    }
}
