//! Parsing Llama 4 `config.json`: the published Maverick (BF16 and FP8) and Scout configs, a flat `llama4_text`
//! config, transformers' defaults, and errors that name the key.

use std::path::{Path, PathBuf};

use serde_json::json;
use switchyard_model::config::{LayerType, ModelConfig, RopeScaling, TextConfig};
use switchyard_model::ModelError;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn parse(value: serde_json::Value) -> Result<ModelConfig, ModelError> {
    ModelConfig::from_json_str(&value.to_string(), "test/config.json")
}

/// Parses `value`, expecting a `Config` error whose reason mentions every one of `needles`.
fn config_error(value: serde_json::Value, needles: &[&str]) -> String {
    match parse(value) {
        Err(ModelError::Config { path, reason }) => {
            assert_eq!(path, Path::new("test/config.json"));
            for needle in needles {
                assert!(reason.contains(needle), "reason {reason:?} should mention {needle:?}");
            }
            reason
        }
        other => panic!("expected a Config error mentioning {needles:?}, got {other:?}"),
    }
}

fn small_flat() -> serde_json::Value {
    json!({
        "model_type": "llama4_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 32,
        "intermediate_size_mlp": 96,
        "num_local_experts": 4,
        "vocab_size": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

fn with(mut base: serde_json::Value, key: &str, value: serde_json::Value) -> serde_json::Value {
    base[key] = value;
    base
}

fn without(mut base: serde_json::Value, key: &str) -> serde_json::Value {
    base.as_object_mut().expect("object").remove(key);
    base
}

fn assert_maverick_text(t: &TextConfig) {
    assert_eq!(t.hidden_size, 5120);
    assert_eq!(t.num_hidden_layers, 48);
    assert_eq!(t.num_attention_heads, 40);
    assert_eq!(t.num_key_value_heads, 8);
    assert_eq!(t.head_dim, 128);
    assert_eq!(t.q_dim(), 5120);
    assert_eq!(t.kv_dim(), 1024);
    assert_eq!(t.gqa_group_size(), 5);
    assert_eq!(t.intermediate_size, 8192);
    assert_eq!(t.intermediate_size_mlp, 16384);
    assert_eq!(t.num_local_experts, 128);
    assert_eq!(t.num_experts_per_tok, 1);
    assert_eq!(t.interleave_moe_layer_step, 2);
    let odd: Vec<usize> = (1..48).step_by(2).collect();
    assert_eq!(t.moe_layers, odd);
    assert_eq!(t.num_moe_layers(), 24);
    for l in 0..48 {
        assert_eq!(t.is_moe_layer(l), l % 2 == 1, "layer {l}");
    }
    assert!(!t.is_moe_layer(48));

    // "no_rope_layers": [] in the file means transformers' default: every 4th layer is NoPE.
    assert_eq!(t.no_rope_layer_interval, 4);
    let nope: Vec<usize> = (0..48).filter(|&l| !t.uses_rope(l)).collect();
    assert_eq!(nope, (3..48).step_by(4).collect::<Vec<_>>());
    assert_eq!(nope.len(), 12);
    for l in 0..48 {
        let rope = (l + 1) % 4 != 0;
        assert_eq!(t.uses_rope(l), rope, "layer {l}");
        assert_eq!(t.is_chunked_attention(l), rope, "layer {l}");
        let expected = if rope { LayerType::ChunkedAttention } else { LayerType::FullAttention };
        assert_eq!(t.layer_types[l], expected, "layer {l}");
    }
    assert_eq!(t.attention_chunk_size, Some(8192));
    assert_eq!(t.rope_theta, 500000.0);
    assert_eq!(t.rope_scaling, None);
    assert!(!t.use_qk_norm);
    // Absent from the file: transformers' defaults.
    assert!(t.attn_temperature_tuning);
    assert_eq!(t.floor_scale, 8192.0);
    assert_eq!(t.attn_scale, 0.1);
    assert_eq!(t.rms_norm_eps, 1e-5);
    assert_eq!(t.vocab_size, 202048);
    assert_eq!(t.max_position_embeddings, 1048576);
    assert_eq!(t.bos_token_id, Some(200000));
    assert_eq!(t.eos_token_id, vec![200001, 200007, 200008]);
    assert_eq!(t.pad_token_id, Some(200018));
    assert!(!t.tie_word_embeddings);
    assert_eq!(t.hidden_act, "silu");
    assert!(!t.attention_bias);
    assert_eq!(t.torch_dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn maverick_instruct_config() {
    let config = ModelConfig::from_file(data("llama4-maverick-17b-128e-instruct.config.json")).expect("parses");
    assert_eq!(config.model_type, "llama4");
    assert!(config.nested);
    assert_eq!(config.quantization, None);
    assert_eq!(config.raw["vision_config"]["hidden_size"], 1408);
    assert_maverick_text(&config.text);
    config.text.validate().expect("valid");
}

#[test]
fn maverick_fp8_config_has_compressed_tensors_quantization() {
    let config = ModelConfig::from_file(data("llama4-maverick-17b-128e-instruct-fp8.config.json")).expect("parses");
    assert_maverick_text(&config.text);
    let q = config.quantization.expect("quantization_config");
    assert_eq!(q.method, "compressed-tensors");
    assert!(q.weights_fp8_per_channel);
    assert!(q.activations_fp8_dynamic_per_token);
    assert_eq!(q.ignore.len(), 9);
    assert!(q.ignore.iter().any(|i| i == "re:.*router"));
    assert!(q.ignore.iter().any(|i| i == "re:.*lm_head"));
}

#[test]
fn scout_instruct_config() {
    let config = ModelConfig::from_file(data("llama4-scout-17b-16e-instruct.config.json")).expect("parses");
    let t = &config.text;
    assert!(config.nested);
    assert_eq!(config.model_type, "llama4");
    assert_eq!(t.num_local_experts, 16);
    assert_eq!(t.interleave_moe_layer_step, 1);
    assert_eq!(t.moe_layers, (0..48).collect::<Vec<_>>());
    assert!(t.use_qk_norm);
    // The file stores the integer 4: truthy.
    assert!(t.attn_temperature_tuning);
    assert_eq!(t.floor_scale, 8192.0);
    assert_eq!(t.attn_scale, 0.1);
    assert_eq!(t.max_position_embeddings, 10485760);
    assert_eq!(
        t.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 16.0,
            low_freq_factor: 1.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 8192,
        })
    );
    assert_eq!(t.rope_theta, 500000.0);
    let nope: Vec<usize> = (0..48).filter(|&l| !t.uses_rope(l)).collect();
    assert_eq!(nope, (3..48).step_by(4).collect::<Vec<_>>());
    assert_eq!((t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim), (5120, 40, 8, 128));
    assert_eq!(t.pad_token_id, Some(200018));
    assert!(!t.tie_word_embeddings);
}

#[test]
fn flat_llama4_text_config_with_explicit_lists() {
    let value = json!({
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 48,
        "intermediate_size_mlp": 80,
        "num_local_experts": 20,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "moe_layers": [5, 0, 2, 2],
        "no_rope_layers": [1, 0, 1, 1, 0, 1],
        "layer_types": ["chunked_attention", "full_attention", "full_attention",
                        "chunked_attention", "full_attention", "chunked_attention"],
        "attention_chunk_size": null,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "use_qk_norm": true,
        "attn_temperature_tuning": false,
        "floor_scale": 16,
        "attn_scale": 0.25,
        "rms_norm_eps": 1e-6,
        "vocab_size": 300,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": null,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "attention_bias": false,
        "torch_dtype": "float32"
    });
    let config = parse(value).expect("parses");
    assert!(!config.nested);
    assert_eq!(config.model_type, "llama4_text");
    let t = &config.text;
    assert_eq!(t.moe_layers, vec![0, 2, 5], "sorted and deduplicated");
    assert_eq!(t.no_rope_layers, vec![1, 0, 1, 1, 0, 1]);
    assert!(t.uses_rope(0) && !t.uses_rope(1) && !t.uses_rope(4) && t.uses_rope(5));
    assert_eq!(t.layer_types[2], LayerType::FullAttention);
    assert_eq!(t.attention_chunk_size, None);
    // No chunk size: no layer is chunked, whatever layer_types says.
    assert!((0..6).all(|l| !t.is_chunked_attention(l)));
    assert_eq!(
        t.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        })
    );
    assert_eq!((t.kv_dim(), t.q_dim(), t.gqa_group_size()), (32, 128, 4));
    assert!(!t.attn_temperature_tuning);
    assert_eq!(t.floor_scale, 16.0);
    assert_eq!(t.attn_scale, 0.25);
    assert_eq!(t.eos_token_id, vec![2]);
    assert_eq!(t.pad_token_id, None);
    assert!(t.tie_word_embeddings);
    assert_eq!(t.torch_dtype.as_deref(), Some("float32"));
    assert_eq!(t.rms_norm_eps, 1e-6);
}

#[test]
fn missing_keys_take_transformers_defaults() {
    let config = parse(json!({"model_type": "llama4_text"})).expect("parses");
    let t = &config.text;
    assert_eq!(t.vocab_size, 202048);
    assert_eq!(t.hidden_size, 5120);
    assert_eq!(t.intermediate_size, 8192);
    assert_eq!(t.intermediate_size_mlp, 16384);
    assert_eq!(t.num_hidden_layers, 48);
    assert_eq!(t.num_attention_heads, 40);
    assert_eq!(t.num_key_value_heads, 8);
    assert_eq!(t.head_dim, 128);
    assert_eq!(t.max_position_embeddings, 131072);
    assert_eq!(t.rms_norm_eps, 1e-5);
    assert_eq!(t.bos_token_id, Some(1));
    assert_eq!(t.eos_token_id, vec![2]);
    assert_eq!(t.pad_token_id, None);
    assert!(!t.tie_word_embeddings);
    assert_eq!(t.num_experts_per_tok, 1);
    assert_eq!(t.num_local_experts, 16);
    assert_eq!(t.interleave_moe_layer_step, 1);
    assert_eq!(t.moe_layers, (0..48).collect::<Vec<_>>());
    assert!(t.use_qk_norm);
    assert_eq!(t.rope_theta, 500000.0);
    assert_eq!(t.rope_scaling, None);
    assert_eq!(t.no_rope_layer_interval, 4);
    assert_eq!(t.no_rope_layers.len(), 48);
    assert_eq!(t.attention_chunk_size, Some(8192));
    assert!(t.attn_temperature_tuning);
    assert_eq!(t.floor_scale, 8192.0);
    assert_eq!(t.attn_scale, 0.1);
    assert_eq!(t.hidden_act, "silu");
    assert!(!t.attention_bias);
    assert_eq!(t.torch_dtype, None);

    // An empty moe_layers list is NOT treated as absent (transformers checks `is not None`): a dense model.
    let dense = parse(with(small_flat(), "moe_layers", json!([]))).expect("parses");
    assert!(dense.text.moe_layers.is_empty());
    // Explicit nulls: head_dim -> hidden/heads, num_key_value_heads -> num_attention_heads.
    let nulls =
        parse(with(with(small_flat(), "head_dim", json!(null)), "num_key_value_heads", json!(null))).expect("parses");
    assert_eq!(nulls.text.head_dim, 16);
    assert_eq!(nulls.text.num_key_value_heads, 4);
    // The interval shapes the default no_rope_layers and, through it, layer_types.
    let every_other = parse(with(small_flat(), "no_rope_layer_interval", json!(2))).expect("parses");
    assert_eq!(every_other.text.no_rope_layers, vec![1, 0, 1, 0]);
    assert_eq!(every_other.text.layer_types[1], LayerType::FullAttention);
    // transformers 5 writes rope_parameters instead of rope_theta/rope_scaling.
    let v5 = parse(with(small_flat(), "rope_parameters", json!({"rope_type": "default", "rope_theta": 1234.0})))
        .expect("parses");
    assert_eq!((v5.text.rope_theta, v5.text.rope_scaling.clone()), (1234.0, None));
}

#[test]
fn text_config_serialises_to_a_config_that_parses_back_equal() {
    for name in ["llama4-maverick-17b-128e-instruct.config.json", "llama4-scout-17b-16e-instruct.config.json"] {
        let config = ModelConfig::from_file(data(name)).expect("parses");
        let written = config.text.to_config_json();
        assert_eq!(written["model_type"], "llama4_text");
        let back = parse(written).expect("parses back");
        assert_eq!(back.text, config.text, "{name}");
        assert!(!back.nested);
    }
}

#[test]
fn tie_word_embeddings_from_either_level_and_contradiction() {
    let nested = |top: Option<bool>, inner: Option<bool>| {
        let mut text = small_flat();
        text.as_object_mut().expect("object").remove("model_type");
        if let Some(v) = inner {
            text["tie_word_embeddings"] = json!(v);
        }
        let mut root = json!({"model_type": "llama4", "text_config": text});
        if let Some(v) = top {
            root["tie_word_embeddings"] = json!(v);
        }
        root
    };
    assert!(parse(nested(Some(true), None)).expect("parses").text.tie_word_embeddings);
    assert!(parse(nested(None, Some(true))).expect("parses").text.tie_word_embeddings);
    assert!(!parse(nested(None, None)).expect("parses").text.tie_word_embeddings);
    config_error(nested(Some(true), Some(false)), &["tie_word_embeddings", "text_config.tie_word_embeddings"]);
}

#[test]
fn bad_values_name_their_key() {
    config_error(with(small_flat(), "hidden_size", json!("big")), &["hidden_size", "invalid type"]);
    config_error(with(small_flat(), "num_key_value_heads", json!(3)), &["num_key_value_heads", "divisible"]);
    config_error(
        with(small_flat(), "num_experts_per_tok", json!(2)),
        &["num_experts_per_tok", "only top-1 routing is supported"],
    );
    config_error(with(small_flat(), "hidden_act", json!("gelu")), &["hidden_act", "gelu"]);
    config_error(with(small_flat(), "attention_bias", json!(true)), &["attention_bias"]);
    config_error(with(small_flat(), "no_rope_layers", json!([1, 0, 1])), &["no_rope_layers", "3 entries"]);
    config_error(with(small_flat(), "no_rope_layers", json!([1, 2, 1, 1])), &["no_rope_layers", "0 or 1"]);
    config_error(with(small_flat(), "layer_types", json!(["full_attention"])), &["layer_types", "1 entries"]);
    config_error(
        with(small_flat(), "layer_types", json!(vec!["sliding_attention"; 4])),
        &["layer_types", "sliding_attention"],
    );
    config_error(with(small_flat(), "moe_layers", json!([1, 4])), &["moe_layers", "layer 4"]);
    config_error(with(small_flat(), "attention_chunk_size", json!(0)), &["attention_chunk_size"]);
    config_error(with(small_flat(), "attn_temperature_tuning", json!("yes")), &["attn_temperature_tuning"]);
    config_error(with(small_flat(), "eos_token_id", json!([2, 999])), &["eos_token_id", "999", "vocab_size"]);
    config_error(
        with(without(small_flat(), "moe_layers"), "interleave_moe_layer_step", json!(0)),
        &["interleave_moe_layer_step"],
    );
    config_error(
        with(small_flat(), "rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})),
        &["rope_scaling.rope_type", "yarn"],
    );
    config_error(
        with(
            small_flat(),
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 64}),
        ),
        &["rope_scaling.high_freq_factor", "missing"],
    );
    config_error(with(small_flat(), "rope_scaling", json!({"factor": 2.0})), &["rope_scaling", "rope_type"]);
    config_error(with(small_flat(), "model_type", json!("llama")), &["model_type", "llama"]);
    config_error(json!({"model_type": "llama4"}), &["text_config"]);
    config_error(json!([1, 2]), &["object"]);
    match ModelConfig::from_json_str("{ not json", "x/config.json") {
        Err(ModelError::Config { path, reason }) => {
            assert_eq!(path, Path::new("x/config.json"));
            assert!(reason.contains("JSON"), "{reason}");
        }
        other => panic!("expected a Config error, got {other:?}"),
    }
    // Nested errors are prefixed with text_config.
    let nested = json!({"model_type": "llama4", "text_config": {"vocab_size": -5}});
    config_error(nested, &["text_config.vocab_size"]);
}

#[test]
fn quantization_config_errors_name_the_key() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data("llama4-maverick-17b-128e-instruct-fp8.config.json")).expect("read"),
    )
    .expect("json");
    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        f(&mut v);
        v
    };
    config_error(
        mutate(&|v| v["quantization_config"]["quant_method"] = json!("fp8")),
        &["quantization_config.quant_method", "fp8"],
    );
    config_error(
        mutate(&|v| v["quantization_config"]["quant_method"] = json!("awq")),
        &["quantization_config.quant_method", "awq"],
    );
    config_error(
        mutate(&|v| v["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = json!("block")),
        &["quantization_config.config_groups.group_0.weights.strategy", "block"],
    );
    config_error(
        mutate(&|v| v["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = json!("int")),
        &["group_0.weights.type"],
    );
    config_error(
        mutate(&|v| {
            v["quantization_config"]["config_groups"]["group_0"]["input_activations"]["strategy"] = json!("tensor")
        }),
        &["group_0.input_activations.strategy", "tensor"],
    );
    // Weight-only FP8 (no activation quantisation) is recognised.
    let weight_only =
        mutate(&|v| v["quantization_config"]["config_groups"]["group_0"]["input_activations"] = json!(null));
    let q = parse(weight_only).expect("parses").quantization.expect("quantization");
    assert!(q.weights_fp8_per_channel && !q.activations_fp8_dynamic_per_token);
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let path = data("no-such-config.json");
    match ModelConfig::from_file(&path) {
        Err(err @ ModelError::Io { .. }) => {
            assert!(err.to_string().contains("no-such-config.json"), "{err}");
            assert!(!err.retryable());
        }
        other => panic!("expected Io, got {other:?}"),
    }
}
