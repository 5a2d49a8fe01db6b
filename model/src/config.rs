//! Llama 4 `config.json`: parsing with Hugging Face's defaults, validation, and the per-layer facts derived from it.
//!
//! Two shapes are accepted: the flat one `Llama4ForCausalLM.save_pretrained` writes (`"model_type": "llama4_text"`)
//! and the nested one of the published Maverick/Scout checkpoints (`"model_type": "llama4"`, text keys under
//! `text_config`). A key that is absent takes the default of transformers' `Llama4TextConfig`, including its quirks:
//! an EMPTY `no_rope_layers` list counts as absent, an empty `moe_layers` list does not, and an absent `head_dim`
//! is 128 while an explicit `null` is `hidden_size / num_attention_heads`.
//!
//! Keys are read one at a time from the JSON object so that every error names the key it is about (serde's derive
//! would only report a line and column). Unknown keys are ignored: the hub configs carry many training-only ones.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ModelError;

/// The attention pattern of one decoder layer (`layer_types` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Attention restricted to fixed absolute blocks of `attention_chunk_size` tokens (RoPE layers).
    ChunkedAttention,
    /// Causal attention over the whole context (NoPE layers).
    FullAttention,
}

impl LayerType {
    /// The string transformers uses for this layer type.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerType::ChunkedAttention => "chunked_attention",
            LayerType::FullAttention => "full_attention",
        }
    }
}

/// RoPE frequency scaling (`rope_scaling`). Only the Llama 3 scheme is used by Llama 4.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3 band scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp in between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// The validated text-model config. Field names are transformers' keys, so serialising this struct (see
/// [`TextConfig::to_config_json`]) gives a `config.json` this module parses back to an equal value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA: query head `h` uses kv head `h / (num_attention_heads / num_key_value_heads)`).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Hidden width of each routed expert and of the shared expert.
    pub intermediate_size: usize,
    /// Hidden width of the dense MLP layers.
    pub intermediate_size_mlp: usize,
    /// Routed experts per MoE layer.
    pub num_local_experts: usize,
    /// Experts each token is routed to (always 1 here: only top-1 routing is supported).
    pub num_experts_per_tok: usize,
    /// Every `interleave_moe_layer_step`-th layer is MoE when `moe_layers` is not given.
    pub interleave_moe_layer_step: usize,
    /// Indices of the MoE layers, ascending and unique.
    pub moe_layers: Vec<usize>,
    /// Every `no_rope_layer_interval`-th layer is NoPE when `no_rope_layers` is not given.
    pub no_rope_layer_interval: usize,
    /// One entry per layer: 1 means the layer USES RoPE, 0 means it is a NoPE layer (transformers' naming).
    pub no_rope_layers: Vec<u8>,
    /// One entry per layer: chunked or full attention.
    pub layer_types: Vec<LayerType>,
    /// Block size of chunked attention; `None` makes every layer attend to the full context.
    pub attention_chunk_size: Option<usize>,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Weightless RMS norm of q and k on RoPE layers (Scout: true, Maverick: false).
    pub use_qk_norm: bool,
    /// Position-dependent scaling of q on NoPE layers.
    pub attn_temperature_tuning: bool,
    /// Temperature tuning: positions are counted in units of `floor_scale`.
    pub floor_scale: f64,
    /// Temperature tuning strength.
    pub attn_scale: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rows of the embedding and of `lm_head`.
    pub vocab_size: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Begin-of-text token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (any of them ends generation).
    pub eos_token_id: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// MLP activation; only `"silu"` is supported.
    pub hidden_act: String,
    /// Biases on the attention projections; only `false` is supported.
    pub attention_bias: bool,
    /// The dtype the weights were saved in, as the config states it (e.g. `"bfloat16"`).
    pub torch_dtype: Option<String>,
}

/// The model's `quantization_config`, when it has one. Only compressed-tensors FP8 is recognised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizationConfig {
    /// `quant_method`; always `"compressed-tensors"` today.
    pub method: String,
    /// Weights are float 8-bit, symmetric, one static scale per output channel.
    pub weights_fp8_per_channel: bool,
    /// Input activations are float 8-bit, quantised dynamically with one scale per token.
    pub activations_fp8_dynamic_per_token: bool,
    /// Module names or `re:` patterns left unquantised, verbatim from the config.
    pub ignore: Vec<String>,
}

/// A parsed `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The validated text-model config.
    pub text: TextConfig,
    /// The top-level `model_type` (`"llama4"` or `"llama4_text"`; `"llama4_text"` when the file has none).
    pub model_type: String,
    /// Whether the text keys were nested under `text_config`.
    pub nested: bool,
    /// The top-level `quantization_config`, when present.
    pub quantization: Option<QuantizationConfig>,
    /// The whole file as JSON, for keys this struct does not model.
    pub raw: Value,
}

// transformers' `Llama4TextConfig` defaults.
const DEFAULT_VOCAB_SIZE: usize = 202_048;
const DEFAULT_HIDDEN_SIZE: usize = 5120;
const DEFAULT_INTERMEDIATE_SIZE: usize = 8192;
const DEFAULT_INTERMEDIATE_SIZE_MLP: usize = 16_384;
const DEFAULT_NUM_HIDDEN_LAYERS: usize = 48;
const DEFAULT_NUM_ATTENTION_HEADS: usize = 40;
const DEFAULT_NUM_KEY_VALUE_HEADS: usize = 8;
const DEFAULT_HEAD_DIM: usize = 128;
const DEFAULT_MAX_POSITION_EMBEDDINGS: usize = 4096 * 32;
const DEFAULT_RMS_NORM_EPS: f64 = 1e-5;
const DEFAULT_BOS_TOKEN_ID: u32 = 1;
const DEFAULT_EOS_TOKEN_ID: u32 = 2;
const DEFAULT_NUM_EXPERTS_PER_TOK: usize = 1;
const DEFAULT_NUM_LOCAL_EXPERTS: usize = 16;
const DEFAULT_INTERLEAVE_MOE_LAYER_STEP: usize = 1;
const DEFAULT_ROPE_THETA: f64 = 500_000.0;
const DEFAULT_NO_ROPE_LAYER_INTERVAL: usize = 4;
const DEFAULT_ATTENTION_CHUNK_SIZE: usize = 8192;
const DEFAULT_FLOOR_SCALE: f64 = 8192.0;
const DEFAULT_ATTN_SCALE: f64 = 0.1;

impl ModelConfig {
    /// Reads and parses `path` (a `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<ModelConfig, ModelError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        ModelConfig::from_json_str(&text, path)
    }

    /// Parses a `config.json` held in memory; `path_for_errors` only labels errors.
    pub fn from_json_str(s: &str, path_for_errors: impl AsRef<Path>) -> Result<ModelConfig, ModelError> {
        let path = path_for_errors.as_ref();
        let err = |reason: String| ModelError::Config { path: path.to_path_buf(), reason };
        let raw: Value = serde_json::from_str(s).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let root = raw.as_object().ok_or_else(|| err("the top level must be a JSON object".to_string()))?;
        let top = Fields::new(root, "", path);

        let model_type = top.opt_string("model_type")?;
        let text_config = match root.get("text_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(obj)) => Some(obj),
            Some(other) => return Err(err(format!("text_config: expected an object, found {other}"))),
        };
        match (model_type.as_deref(), text_config.is_some()) {
            (Some("llama4"), true) | (Some("llama4_text"), false) | (None, _) => {}
            (Some("llama4"), false) => {
                return Err(err("model_type is \"llama4\" but the file has no text_config object".to_string()))
            }
            (Some("llama4_text"), true) => {
                return Err(err(
                    "model_type is \"llama4_text\" (a flat config) but the file has a text_config".to_string()
                ))
            }
            (Some(other), _) => {
                return Err(err(format!(
                    "model_type: {other:?} is not a Llama 4 model (expected \"llama4\" or \"llama4_text\")"
                )))
            }
        }
        let nested = text_config.is_some();
        let fields = match text_config {
            Some(obj) => Fields::new(obj, "text_config.", path),
            None => top,
        };
        if nested {
            if let Some(inner) = fields.opt_string("model_type")? {
                if inner != "llama4_text" && inner != "llama4" {
                    return Err(err(format!(
                        "text_config.model_type: {inner:?} is not a Llama 4 text model (expected \"llama4_text\")"
                    )));
                }
            }
        }

        let mut text = parse_text_config(&fields)?;
        if nested {
            // Meta's nested configs put `tie_word_embeddings` at the top, transformers' text config has its own.
            let outer = top.opt::<bool>("tie_word_embeddings")?;
            let inner = fields.opt::<bool>("tie_word_embeddings")?;
            text.tie_word_embeddings = match (outer, inner) {
                (Some(a), Some(b)) if a != b => {
                    return Err(err(format!(
                        "tie_word_embeddings is {a} at the top level but text_config.tie_word_embeddings is {b}"
                    )))
                }
                (Some(v), _) | (None, Some(v)) => v,
                (None, None) => false,
            };
            if text.torch_dtype.is_none() {
                text.torch_dtype = match top.opt_string("torch_dtype")? {
                    Some(d) => Some(d),
                    None => top.opt_string("dtype")?,
                };
            }
        }
        text.check().map_err(err)?;

        let quantization = match root.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(q)) => Some(parse_quantization(q).map_err(err)?),
            Some(other) => return Err(err(format!("quantization_config: expected an object, found {other}"))),
        };

        Ok(ModelConfig {
            text,
            model_type: model_type.unwrap_or_else(|| "llama4_text".to_string()),
            nested,
            quantization,
            raw,
        })
    }
}

impl TextConfig {
    /// Whether layer `layer` is a mixture-of-experts layer (router + routed experts + shared expert).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.binary_search(&layer).is_ok()
    }

    /// Whether layer `layer` rotates q and k (RoPE); the others are NoPE layers. False past the last layer.
    pub fn uses_rope(&self, layer: usize) -> bool {
        self.no_rope_layers.get(layer).is_some_and(|&v| v != 0)
    }

    /// Whether layer `layer` attends within fixed chunks: its type is chunked AND a chunk size is set.
    pub fn is_chunked_attention(&self, layer: usize) -> bool {
        self.attention_chunk_size.is_some() && self.layer_types.get(layer) == Some(&LayerType::ChunkedAttention)
    }

    /// Width of the query projection's output: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key (and value) projection's output: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads sharing one key/value head.
    pub fn gqa_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers.len()
    }

    /// Checks the config is self-consistent and within what this runtime supports. Errors name the key; an
    /// in-memory config has no file, so the path reads `<in-memory TextConfig>` (parsing reports the real file).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.check().map_err(|reason| ModelError::Config { path: PathBuf::from("<in-memory TextConfig>"), reason })
    }

    /// This config as a flat `llama4_text` `config.json` (what `Llama4ForCausalLM.save_pretrained` writes).
    pub fn to_config_json(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(obj) = &mut value {
            obj.insert("model_type".to_string(), Value::String("llama4_text".to_string()));
            obj.insert("architectures".to_string(), Value::Array(vec![Value::String("Llama4ForCausalLM".to_string())]));
        }
        value
    }

    fn check(&self) -> Result<(), String> {
        for (key, value) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("intermediate_size_mlp", self.intermediate_size_mlp),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ] {
            if value == 0 {
                return Err(format!("{key} must be positive, found 0"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) is not divisible by num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.num_experts_per_tok != 1 {
            return Err(format!(
                "num_experts_per_tok is {}: only top-1 routing is supported",
                self.num_experts_per_tok
            ));
        }
        if !self.moe_layers.is_empty() && self.num_local_experts == 0 {
            return Err("num_local_experts is 0 but moe_layers is not empty".to_string());
        }
        if let Some(&last) = self.moe_layers.last() {
            if last >= self.num_hidden_layers {
                return Err(format!(
                    "moe_layers names layer {last}, but num_hidden_layers is {}",
                    self.num_hidden_layers
                ));
            }
        }
        if self.moe_layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("moe_layers must be ascending and unique, found {:?}", self.moe_layers));
        }
        if self.no_rope_layers.len() != self.num_hidden_layers {
            return Err(format!(
                "no_rope_layers has {} entries, but num_hidden_layers is {}",
                self.no_rope_layers.len(),
                self.num_hidden_layers
            ));
        }
        if let Some(bad) = self.no_rope_layers.iter().find(|&&v| v > 1) {
            return Err(format!("no_rope_layers entries must be 0 or 1, found {bad}"));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(format!(
                "layer_types has {} entries, but num_hidden_layers is {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.attention_chunk_size == Some(0) {
            return Err("attention_chunk_size must be positive or null, found 0".to_string());
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?} is not supported (only \"silu\")", self.hidden_act));
        }
        if self.attention_bias {
            return Err("attention_bias is true: attention projections with biases are not supported".to_string());
        }
        for (key, value) in
            [("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta), ("floor_scale", self.floor_scale)]
        {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("{key} must be a positive number, found {value}"));
            }
        }
        if !self.attn_scale.is_finite() {
            return Err(format!("attn_scale must be finite, found {}", self.attn_scale));
        }
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = &self.rope_scaling
        {
            for (key, value) in [
                ("rope_scaling.factor", *factor),
                ("rope_scaling.low_freq_factor", *low_freq_factor),
                ("rope_scaling.high_freq_factor", *high_freq_factor),
            ] {
                if !(value.is_finite() && value > 0.0) {
                    return Err(format!("{key} must be a positive number, found {value}"));
                }
            }
            if high_freq_factor < low_freq_factor {
                return Err(format!(
                    "rope_scaling.high_freq_factor ({high_freq_factor}) is below rope_scaling.low_freq_factor \
                     ({low_freq_factor})"
                ));
            }
            if *original_max_position_embeddings == 0 {
                return Err("rope_scaling.original_max_position_embeddings must be positive, found 0".to_string());
            }
        }
        let vocab = self.vocab_size;
        let token_ids = self
            .bos_token_id
            .iter()
            .map(|&id| ("bos_token_id", id))
            .chain(self.eos_token_id.iter().map(|&id| ("eos_token_id", id)))
            .chain(self.pad_token_id.iter().map(|&id| ("pad_token_id", id)));
        for (key, id) in token_ids {
            if id as usize >= vocab {
                return Err(format!("{key} {id} is not below vocab_size {vocab}"));
            }
        }
        Ok(())
    }
}

/// A key's presence in a JSON object: absent, explicitly `null`, or a value.
enum Slot<T> {
    Absent,
    Null,
    Given(T),
}

/// Typed, key-naming access to one JSON object of the config.
#[derive(Clone, Copy)]
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'static str,
    path: &'a Path,
}

impl<'a> Fields<'a> {
    fn new(obj: &'a Map<String, Value>, prefix: &'static str, path: &'a Path) -> Fields<'a> {
        Fields { obj, prefix, path }
    }

    fn error(&self, key: &str, reason: impl std::fmt::Display) -> ModelError {
        ModelError::Config { path: self.path.to_path_buf(), reason: format!("{}{key}: {reason}", self.prefix) }
    }

    fn slot<T: DeserializeOwned>(&self, key: &str) -> Result<Slot<T>, ModelError> {
        match self.obj.get(key) {
            None => Ok(Slot::Absent),
            Some(Value::Null) => Ok(Slot::Null),
            Some(v) => T::deserialize(v).map(Slot::Given).map_err(|e| self.error(key, e)),
        }
    }

    /// The value, or `None` when absent or null.
    fn opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ModelError> {
        Ok(match self.slot(key)? {
            Slot::Given(v) => Some(v),
            Slot::Absent | Slot::Null => None,
        })
    }

    /// The value, or `default` when absent or null.
    fn get<T: DeserializeOwned>(&self, key: &str, default: T) -> Result<T, ModelError> {
        Ok(self.opt(key)?.unwrap_or(default))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>, ModelError> {
        self.opt::<String>(key)
    }

    /// A truthy flag that older configs store as an integer (`"attn_temperature_tuning": 4`).
    fn flag(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Ok(i != 0),
                (None, Some(f)) => Ok(f != 0.0),
                (None, None) => Err(self.error(key, format!("expected a boolean or an integer, found {n}"))),
            },
            Some(other) => Err(self.error(key, format!("expected a boolean or an integer, found {other}"))),
        }
    }

    /// A token id list given as one integer, a list, or null.
    fn token_ids(&self, key: &str, default: Vec<u32>) -> Result<Vec<u32>, ModelError> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(_)) => self.get::<Vec<u32>>(key, Vec::new()),
            Some(_) => Ok(vec![self.get::<u32>(key, 0)?]),
        }
    }

    /// A token id given as an integer, or null; absent takes `default`.
    fn token_id(&self, key: &str, default: Option<u32>) -> Result<Option<u32>, ModelError> {
        Ok(match self.slot::<u32>(key)? {
            Slot::Absent => default,
            Slot::Null => None,
            Slot::Given(v) => Some(v),
        })
    }
}

fn parse_text_config(f: &Fields<'_>) -> Result<TextConfig, ModelError> {
    let hidden_size = f.get("hidden_size", DEFAULT_HIDDEN_SIZE)?;
    let num_hidden_layers = f.get("num_hidden_layers", DEFAULT_NUM_HIDDEN_LAYERS)?;
    let num_attention_heads = f.get("num_attention_heads", DEFAULT_NUM_ATTENTION_HEADS)?;
    if num_attention_heads == 0 {
        return Err(f.error("num_attention_heads", "must be positive, found 0"));
    }
    // transformers: an explicit null means "same as the query heads" / "hidden_size / heads"; absent is the default.
    let num_key_value_heads = match f.slot::<usize>("num_key_value_heads")? {
        Slot::Absent => DEFAULT_NUM_KEY_VALUE_HEADS,
        Slot::Null => num_attention_heads,
        Slot::Given(v) => v,
    };
    let head_dim = match f.slot::<usize>("head_dim")? {
        Slot::Absent => DEFAULT_HEAD_DIM,
        Slot::Null => hidden_size / num_attention_heads,
        Slot::Given(v) => v,
    };

    let interleave_moe_layer_step = f.get("interleave_moe_layer_step", DEFAULT_INTERLEAVE_MOE_LAYER_STEP)?;
    let moe_layers = match f.opt::<Vec<usize>>("moe_layers")? {
        Some(mut layers) => {
            layers.sort_unstable();
            layers.dedup();
            layers
        }
        None => {
            if interleave_moe_layer_step == 0 {
                return Err(
                    f.error("interleave_moe_layer_step", "must be positive when moe_layers is not given, found 0")
                );
            }
            (interleave_moe_layer_step - 1..num_hidden_layers).step_by(interleave_moe_layer_step).collect()
        }
    };

    let no_rope_layer_interval = f.get("no_rope_layer_interval", DEFAULT_NO_ROPE_LAYER_INTERVAL)?;
    let given_no_rope = match f.obj.get("no_rope_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Bool(b) => Ok(u8::from(*b)),
                Value::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                    Ok(u8::from(n.as_u64() == Some(1)))
                }
                other => Err(f.error("no_rope_layers", format!("entries must be 0 or 1, found {other}"))),
            })
            .collect::<Result<Vec<u8>, _>>()?,
        Some(other) => return Err(f.error("no_rope_layers", format!("expected a list of 0/1, found {other}"))),
    };
    // transformers treats an EMPTY list like an absent one (`no_rope_layers if no_rope_layers else default`).
    let no_rope_layers = if given_no_rope.is_empty() {
        if no_rope_layer_interval == 0 {
            return Err(f.error("no_rope_layer_interval", "must be positive when no_rope_layers is not given, found 0"));
        }
        (0..num_hidden_layers).map(|i| u8::from((i + 1) % no_rope_layer_interval != 0)).collect()
    } else {
        given_no_rope
    };

    let layer_types = match f.opt::<Vec<String>>("layer_types")? {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                "chunked_attention" => Ok(LayerType::ChunkedAttention),
                "full_attention" => Ok(LayerType::FullAttention),
                other => Err(f.error(
                    "layer_types",
                    format!("{other:?} is not supported (expected \"chunked_attention\" or \"full_attention\")"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => no_rope_layers
            .iter()
            .map(|&rope| if rope != 0 { LayerType::ChunkedAttention } else { LayerType::FullAttention })
            .collect(),
    };

    let attention_chunk_size = match f.slot::<usize>("attention_chunk_size")? {
        Slot::Absent => Some(DEFAULT_ATTENTION_CHUNK_SIZE),
        Slot::Null => None,
        Slot::Given(v) => Some(v),
    };

    let (rope_theta, rope_scaling) = parse_rope(f)?;

    let hidden_act = f.get("hidden_act", "silu".to_string())?;
    let attention_bias = f.get("attention_bias", false)?;
    let torch_dtype = match f.opt_string("torch_dtype")? {
        Some(d) => Some(d),
        None => f.opt_string("dtype")?,
    };

    Ok(TextConfig {
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        intermediate_size: f.get("intermediate_size", DEFAULT_INTERMEDIATE_SIZE)?,
        intermediate_size_mlp: f.get("intermediate_size_mlp", DEFAULT_INTERMEDIATE_SIZE_MLP)?,
        num_local_experts: f.get("num_local_experts", DEFAULT_NUM_LOCAL_EXPERTS)?,
        num_experts_per_tok: f.get("num_experts_per_tok", DEFAULT_NUM_EXPERTS_PER_TOK)?,
        interleave_moe_layer_step,
        moe_layers,
        no_rope_layer_interval,
        no_rope_layers,
        layer_types,
        attention_chunk_size,
        rope_theta,
        rope_scaling,
        use_qk_norm: f.get("use_qk_norm", true)?,
        attn_temperature_tuning: f.flag("attn_temperature_tuning", true)?,
        floor_scale: f.get("floor_scale", DEFAULT_FLOOR_SCALE)?,
        attn_scale: f.get("attn_scale", DEFAULT_ATTN_SCALE)?,
        rms_norm_eps: f.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)?,
        vocab_size: f.get("vocab_size", DEFAULT_VOCAB_SIZE)?,
        max_position_embeddings: f.get("max_position_embeddings", DEFAULT_MAX_POSITION_EMBEDDINGS)?,
        bos_token_id: f.token_id("bos_token_id", Some(DEFAULT_BOS_TOKEN_ID))?,
        eos_token_id: f.token_ids("eos_token_id", vec![DEFAULT_EOS_TOKEN_ID])?,
        pad_token_id: f.token_id("pad_token_id", None)?,
        tie_word_embeddings: f.get("tie_word_embeddings", false)?,
        hidden_act,
        attention_bias,
        torch_dtype,
    })
}

/// `rope_theta` + `rope_scaling` (transformers 4.x), or `rope_parameters` (transformers 5), which wins when present.
fn parse_rope(f: &Fields<'_>) -> Result<(f64, Option<RopeScaling>), ModelError> {
    match f.obj.get("rope_parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(params)) => {
            let fields = Fields::new(params, "", f.path);
            let theta = fields.opt::<f64>("rope_theta").map_err(|e| prefix_error(e, f.prefix, "rope_parameters."))?;
            let theta = match theta {
                Some(t) => t,
                None => f.get("rope_theta", DEFAULT_ROPE_THETA)?,
            };
            let scaling = parse_rope_scaling(params, f, "rope_parameters")?;
            return Ok((theta, scaling));
        }
        Some(other) => return Err(f.error("rope_parameters", format!("expected an object, found {other}"))),
    }
    let theta = f.get("rope_theta", DEFAULT_ROPE_THETA)?;
    let scaling = match f.obj.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(obj)) => parse_rope_scaling(obj, f, "rope_scaling")?,
        Some(other) => return Err(f.error("rope_scaling", format!("expected an object or null, found {other}"))),
    };
    Ok((theta, scaling))
}

fn prefix_error(e: ModelError, outer: &str, inner: &str) -> ModelError {
    match e {
        ModelError::Config { path, reason } => ModelError::Config { path, reason: format!("{outer}{inner}{reason}") },
        other => other,
    }
}

fn parse_rope_scaling(
    obj: &Map<String, Value>,
    f: &Fields<'_>,
    key: &'static str,
) -> Result<Option<RopeScaling>, ModelError> {
    // `rope_type` is current; `type` is the legacy spelling.
    let rope_type = match (obj.get("rope_type"), obj.get("type")) {
        (Some(Value::String(t)), _) | (None, Some(Value::String(t))) => t.clone(),
        (None, None) => return Err(f.error(key, "has no rope_type (or legacy type) key")),
        (Some(other), _) | (None, Some(other)) => {
            return Err(f.error(&format!("{key}.rope_type"), format!("expected a string, found {other}")))
        }
    };
    match rope_type.as_str() {
        "default" => Ok(None),
        "llama3" => {
            let number = |name: &str| -> Result<f64, ModelError> {
                match obj.get(name) {
                    Some(v) => v
                        .as_f64()
                        .ok_or_else(|| f.error(&format!("{key}.{name}"), format!("expected a number, found {v}"))),
                    None => Err(f.error(&format!("{key}.{name}"), "missing (required by llama3 scaling)")),
                }
            };
            let original = match obj.get("original_max_position_embeddings") {
                Some(v) => v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                    f.error(
                        &format!("{key}.original_max_position_embeddings"),
                        format!("expected a positive integer, found {v}"),
                    )
                })?,
                None => {
                    return Err(f.error(
                        &format!("{key}.original_max_position_embeddings"),
                        "missing (required by llama3 scaling)",
                    ))
                }
            };
            Ok(Some(RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: original,
            }))
        }
        other => Err(f.error(
            &format!("{key}.rope_type"),
            format!("{other:?} is not supported (only \"llama3\" scaling or none)"),
        )),
    }
}

/// Parses compressed-tensors' `quantization_config`; every error names the key under `quantization_config`.
fn parse_quantization(q: &Map<String, Value>) -> Result<QuantizationConfig, String> {
    let method = match q.get("quant_method") {
        Some(Value::String(m)) => m.clone(),
        Some(other) => return Err(format!("quantization_config.quant_method: expected a string, found {other}")),
        None => return Err("quantization_config.quant_method is missing".to_string()),
    };
    if method != "compressed-tensors" {
        return Err(format!(
            "quantization_config.quant_method: {method:?} is not supported (only \"compressed-tensors\" with FP8 \
             per-channel weights)"
        ));
    }
    if let Some(format) = q.get("format") {
        if format.as_str() != Some("float-quantized") {
            return Err(format!("quantization_config.format: {format} is not supported (only \"float-quantized\")"));
        }
    }
    if let Some(kv) = q.get("kv_cache_scheme") {
        if !kv.is_null() {
            return Err("quantization_config.kv_cache_scheme: a quantised KV cache is not supported".to_string());
        }
    }
    let groups = match q.get("config_groups") {
        Some(Value::Object(groups)) if !groups.is_empty() => groups,
        Some(other) => {
            return Err(format!("quantization_config.config_groups: expected a non-empty object, found {other}"))
        }
        None => return Err("quantization_config.config_groups is missing".to_string()),
    };
    let mut activations: Option<bool> = None;
    for (name, group) in groups {
        let key = format!("quantization_config.config_groups.{name}");
        let group = group.as_object().ok_or_else(|| format!("{key}: expected an object, found {group}"))?;
        match group.get("weights") {
            Some(Value::Object(w)) => check_scheme(w, &format!("{key}.weights"), false, "channel")?,
            Some(other) => return Err(format!("{key}.weights: expected an object, found {other}")),
            None => return Err(format!("{key}.weights is missing")),
        }
        let group_activations = match group.get("input_activations") {
            None | Some(Value::Null) => false,
            Some(Value::Object(a)) => {
                check_scheme(a, &format!("{key}.input_activations"), true, "token")?;
                true
            }
            Some(other) => return Err(format!("{key}.input_activations: expected an object, found {other}")),
        };
        if let Some(out) = group.get("output_activations") {
            if !out.is_null() {
                return Err(format!("{key}.output_activations: quantised outputs are not supported"));
            }
        }
        match activations {
            Some(previous) if previous != group_activations => {
                return Err(format!("{key}.input_activations: groups disagree on whether activations are quantised"))
            }
            _ => activations = Some(group_activations),
        }
    }
    let ignore = match q.get("ignore") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("quantization_config.ignore: entries must be strings, found {item}"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(format!("quantization_config.ignore: expected a list, found {other}")),
    };
    Ok(QuantizationConfig {
        method,
        weights_fp8_per_channel: true,
        activations_fp8_dynamic_per_token: activations.unwrap_or(false),
        ignore,
    })
}

/// Checks one compressed-tensors `QuantizationArgs` is float 8-bit, symmetric, with the given dynamism and strategy.
fn check_scheme(args: &Map<String, Value>, key: &str, dynamic: bool, strategy: &str) -> Result<(), String> {
    let expect = |field: &str, wanted: Value, default: Option<Value>| -> Result<(), String> {
        match args.get(field).cloned().or(default) {
            Some(v) if v == wanted => Ok(()),
            Some(v) => Err(format!("{key}.{field}: {v} is not supported (expected {wanted})")),
            None => Err(format!("{key}.{field} is missing (expected {wanted})")),
        }
    };
    expect("num_bits", Value::from(8), None)?;
    expect("type", Value::from("float"), None)?;
    expect("strategy", Value::from(strategy), None)?;
    expect("symmetric", Value::from(true), Some(Value::from(true)))?;
    expect("dynamic", Value::from(dynamic), Some(Value::from(false)))?;
    Ok(())
}
