//! Deterministic random Llama 4 checkpoints for tests and benchmarks (`switchyard make-tiny`).
//!
//! A generated checkpoint has the layout of a real Maverick checkpoint, so it goes through exactly the loading path
//! of one: a nested `config.json` (`llama4` around a `llama4_text` `text_config`), safetensors shards whose names carry
//! the `language_model.` prefix with a `model.safetensors.index.json`, routed experts either fused in BF16 or per
//! expert in FP8 with per-channel scales and a compressed-tensors `quantization_config`, and a byte-level BPE
//! `tokenizer.json` with Llama 4's special tokens and chat template.
//!
//! Every logical weight is drawn from its own ChaCha8 stream keyed by (seed, tensor name), so the bytes depend on
//! neither the thread count nor the order of writing, and the FP8 checkpoint of a seed is exactly the quantised BF16
//! checkpoint of the same seed ([`master_weight`] gives the values before rounding).
//!
//! This module must not depend on the checkpoint loader: the loader is tested against what it writes.

mod sampler;
mod tokenizer;
mod weights;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{json, Value};

use crate::ModelError;

/// The size of every preset's vocabulary: the tokenizer's 496 byte-level BPE tokens plus 16 special tokens.
pub const VOCAB_SIZE: usize = tokenizer::VOCAB_SIZE;

/// A checkpoint size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// A few MB, 4 layers (2 MoE, 8 experts): for tests.
    Tiny,
    /// About 2.4 GB in FP8 (4 GB in BF16), 8 layers (4 MoE, 16 experts), Maverick's head shapes: for benchmarks.
    Small,
}

impl Preset {
    /// The name `FromStr` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            other => Err(ModelError::InvalidInput {
                what: "preset".to_string(),
                reason: format!("unknown preset {other:?}: expected \"tiny\" or \"small\""),
            }),
        }
    }
}

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TinySpec {
    /// The shapes.
    pub preset: Preset,
    /// Seeds every weight; the tokenizer does not depend on it.
    pub seed: u64,
    /// Store the routed experts per expert in FP8 (E4M3, per-output-channel F32 scales) as Maverick's FP8 checkpoint
    /// does, instead of fused BF16.
    pub fp8: bool,
}

/// What [`write_checkpoint`] wrote.
#[derive(Clone, Debug)]
pub struct WrittenCheckpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Every file written, shards first, then the index, configs and tokenizer files.
    pub files: Vec<PathBuf>,
    /// The size of all those files together.
    pub total_bytes: u64,
    /// The tokenizer's vocabulary size, equal to the config's `vocab_size` and the embedding's rows.
    pub vocab_size: usize,
}

/// The f32 values of one weight before it was rounded to its stored dtype, in its stored layout.
#[derive(Clone, Debug, PartialEq)]
pub struct MasterTensor {
    /// The stored shape (for a per-expert projection, the nn.Linear shape `[out, in]`).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The shapes of a preset, the one source for both `config.json` and the tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub intermediate: usize,
    pub intermediate_mlp: usize,
    pub moe_step: usize,
    pub chunk: usize,
    pub max_positions: usize,
    pub floor_scale: usize,
    pub vocab: usize,
}

impl Dims {
    pub fn of(preset: Preset) -> Dims {
        match preset {
            Preset::Tiny => Dims {
                hidden: 128,
                layers: 4,
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
                experts: 8,
                intermediate: 128,
                intermediate_mlp: 256,
                moe_step: 2,
                chunk: 32,
                max_positions: 4096,
                floor_scale: 16,
                vocab: VOCAB_SIZE,
            },
            Preset::Small => Dims {
                hidden: 2048,
                layers: 8,
                heads: 16,
                kv_heads: 4,
                head_dim: 128,
                experts: 16,
                // Sized so the FP8 checkpoint is ~1.8 GB: 4 MoE layers x 16 experts x 3 x 2048 x 3072 of codes.
                intermediate: 3072,
                intermediate_mlp: 6144,
                moe_step: 2,
                chunk: 2048,
                max_positions: 262_144,
                floor_scale: 8192,
                vocab: VOCAB_SIZE,
            },
        }
    }

    /// Hugging Face's `moe_layers` default: `range(step - 1, layers, step)`.
    pub fn is_moe(&self, layer: usize) -> bool {
        (layer + 1) % self.moe_step == 0
    }

    /// Hugging Face's `no_rope_layers` default: every fourth layer is NoPE (0), the others use RoPE (1).
    fn uses_rope(&self, layer: usize) -> bool {
        (layer + 1) % 4 != 0
    }
}

/// The `text_config` object of a preset's `config.json`, every key of the model written explicitly.
pub fn preset_text_config(preset: Preset) -> Value {
    let d = Dims::of(preset);
    let moe_layers: Vec<usize> = (0..d.layers).filter(|&l| d.is_moe(l)).collect();
    let no_rope_layers: Vec<u8> = (0..d.layers).map(|l| u8::from(d.uses_rope(l))).collect();
    json!({
        "model_type": "llama4_text",
        "hidden_size": d.hidden,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "intermediate_size": d.intermediate,
        "intermediate_size_mlp": d.intermediate_mlp,
        "num_local_experts": d.experts,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": d.moe_step,
        "moe_layers": moe_layers,
        "no_rope_layers": no_rope_layers,
        "attention_chunk_size": d.chunk,
        "rope_theta": 500000.0,
        "rope_scaling": null,
        "use_qk_norm": false,
        "attn_temperature_tuning": true,
        "floor_scale": d.floor_scale,
        "attn_scale": 0.1,
        "rms_norm_eps": 1e-5,
        "vocab_size": d.vocab,
        "max_position_embeddings": d.max_positions,
        "bos_token_id": tokenizer::bos_id(),
        "eos_token_id": tokenizer::eos_ids(),
        "pad_token_id": tokenizer::pad_id(),
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "use_cache": true,
    })
}

/// Writes the checkpoint of `spec` into `dir` (created if missing; files of the same names are replaced).
///
/// `progress(done, total)` counts tensor bytes (the index's `total_size`): it is called as pieces of tensors reach
/// their shard file, and a last time with `done == total` once every file is on disk. Shards are streamed to disk
/// piece by piece on the rayon pool, so memory stays at a few reused buffers per thread whatever the preset, and a
/// shard file appears under its name only once complete.
pub fn write_checkpoint(
    dir: &Path,
    spec: &TinySpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WrittenCheckpoint, ModelError> {
    fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let dims = Dims::of(spec.preset);

    // The tokenizer first: it is cheap, and a vocabulary that does not match the config must stop us before the
    // expensive part.
    let tokenizer_json = tokenizer::build_tokenizer_json(&dir.join("tokenizer.json"))?;

    let mut files = weights::write_shards(dir, spec, &dims, progress)?;
    files.push(write_json(dir, "config.json", &config_json(spec))?);
    files.push(write_json(dir, "generation_config.json", &generation_config_json())?);
    files.push(write_file(dir, "tokenizer.json", tokenizer_json.as_bytes())?);
    files.push(write_json(dir, "tokenizer_config.json", &tokenizer::tokenizer_config(dims.max_positions))?);
    files.push(write_json(dir, "special_tokens_map.json", &tokenizer::special_tokens_map())?);

    let mut total_bytes = 0;
    for file in &files {
        let meta = fs::metadata(file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
        total_bytes += meta.len();
    }
    let total = weights::total_tensor_bytes(spec, &dims);
    progress(total, total);
    Ok(WrittenCheckpoint { dir: dir.to_path_buf(), files, total_bytes, vocab_size: dims.vocab })
}

/// The f32 values behind a tensor of `spec`'s checkpoint, before rounding to BF16 or FP8, in the stored layout.
///
/// `name` is a stored tensor name (with or without the `language_model.` prefix), or a per-expert projection
/// `model.layers.{L}.feed_forward.experts.{E}.{gate,up,down}_proj.weight` of a MoE layer: those are the values both
/// the FP8 tensors and the fused BF16 ones derive from, whatever `spec.fp8` says. Scales have no master values.
pub fn master_weight(spec: &TinySpec, name: &str) -> Result<MasterTensor, ModelError> {
    weights::master_weight(spec.seed, &Dims::of(spec.preset), name)
}

fn config_json(spec: &TinySpec) -> Value {
    let mut config = json!({
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": preset_text_config(spec.preset),
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
    });
    if spec.fp8 {
        config["quantization_config"] = quantization_config(&Dims::of(spec.preset));
    }
    config
}

/// compressed-tensors "float-quantized" as in Maverick's FP8 checkpoint: static per-channel FP8 weights, dynamic
/// per-token FP8 activations, for every Linear except the modules listed in `ignore` (all but the routed experts).
fn quantization_config(d: &Dims) -> Value {
    let mut ignore = Vec::new();
    for layer in 0..d.layers {
        let base = format!("{}model.layers.{layer}", weights::PREFIX);
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            ignore.push(format!("{base}.self_attn.{proj}"));
        }
        if d.is_moe(layer) {
            ignore.push(format!("{base}.feed_forward.router"));
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                ignore.push(format!("{base}.feed_forward.shared_expert.{proj}"));
            }
        } else {
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                ignore.push(format!("{base}.feed_forward.{proj}"));
            }
        }
    }
    ignore.push(format!("{}lm_head", weights::PREFIX));
    json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": null,
        "kv_cache_scheme": null,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "channel",
                    "symmetric": true,
                    "dynamic": false,
                    "group_size": null,
                    "block_structure": null,
                    "actorder": null,
                    "observer": "minmax",
                    "observer_kwargs": {},
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "token",
                    "symmetric": true,
                    "dynamic": true,
                    "group_size": null,
                    "block_structure": null,
                    "actorder": null,
                    "observer": null,
                    "observer_kwargs": {},
                },
                "output_activations": null,
            }
        },
        "ignore": ignore,
    })
}

fn generation_config_json() -> Value {
    json!({
        "bos_token_id": tokenizer::bos_id(),
        "eos_token_id": tokenizer::eos_ids(),
        "pad_token_id": tokenizer::pad_id(),
        "do_sample": true,
        "temperature": 0.6,
        "top_p": 0.9,
    })
}

fn write_json(dir: &Path, name: &str, value: &Value) -> Result<PathBuf, ModelError> {
    let path = dir.join(name);
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| ModelError::InvalidInput { what: name.to_string(), reason: format!("cannot serialise: {e}") })?;
    text.push('\n');
    write_file(dir, name, text.as_bytes())?;
    Ok(path)
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, ModelError> {
    let path = dir.join(name);
    fs::write(&path, bytes).map_err(|source| ModelError::Io { path: path.clone(), source })?;
    Ok(path)
}
