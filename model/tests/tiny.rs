//! The tiny-checkpoint generator, checked on real files: determinism, the tokenizer through the `tokenizers` crate,
//! the nested config, every tensor's name, dtype and shape in the safetensors headers, the FP8 experts against the
//! master weights, and routing that reaches every expert.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use serde_json::Value;
use switchyard_kernels::fp8::e4m3_to_f32;
use switchyard_model::tiny::{
    master_weight, preset_text_config, write_checkpoint, Preset, TinySpec, WrittenCheckpoint,
};

const PREFIX: &str = "language_model.";

fn write(spec: TinySpec) -> (tempfile::TempDir, WrittenCheckpoint) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut calls = Vec::new();
    let written =
        write_checkpoint(dir.path(), &spec, &mut |done, total| calls.push((done, total))).expect("write_checkpoint");
    let (last_done, total) = *calls.last().expect("progress was reported");
    assert_eq!(last_done, total, "progress ends at its total");
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "progress never goes back");
    (dir, written)
}

fn tiny(seed: u64, fp8: bool) -> TinySpec {
    TinySpec { preset: Preset::Tiny, seed, fp8 }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).expect("read json")).expect("parse json")
}

/// One tensor as stored: its shard, dtype, shape and bytes.
struct Tensor {
    file: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut tensors = BTreeMap::new();
    let mut shards: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    for shard in shards {
        let bytes = fs::read(&shard).expect("read shard");
        let st = SafeTensors::deserialize(&bytes).expect("parse shard");
        let file = shard.file_name().expect("file name").to_string_lossy().into_owned();
        for (name, view) in st.tensors() {
            let tensor = Tensor {
                file: file.clone(),
                dtype: view.dtype().to_string(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            assert!(tensors.insert(name.clone(), tensor).is_none(), "{name} is in two shards");
        }
    }
    tensors
}

fn bf16_values(tensor: &Tensor) -> Vec<f32> {
    assert_eq!(tensor.dtype, "BF16");
    tensor.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

fn f32_values(tensor: &Tensor) -> Vec<f32> {
    assert_eq!(tensor.dtype, "F32");
    tensor.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn text_config(dir: &Path) -> Value {
    read_json(&dir.join("config.json"))["text_config"].clone()
}

fn usize_of(config: &Value, key: &str) -> usize {
    config[key].as_u64().unwrap_or_else(|| panic!("{key} is not an integer: {}", config[key])) as usize
}

/// Every tensor the config implies, with its dtype and shape, derived from the config alone.
fn expected_tensors(config: &Value, fp8: bool) -> BTreeMap<String, (&'static str, Vec<usize>)> {
    let hidden = usize_of(config, "hidden_size");
    let vocab = usize_of(config, "vocab_size");
    let heads = usize_of(config, "num_attention_heads");
    let kv_heads = usize_of(config, "num_key_value_heads");
    let head_dim = usize_of(config, "head_dim");
    let experts = usize_of(config, "num_local_experts");
    let inter = usize_of(config, "intermediate_size");
    let inter_mlp = usize_of(config, "intermediate_size_mlp");
    let moe_layers: Vec<usize> = config["moe_layers"]
        .as_array()
        .expect("moe_layers")
        .iter()
        .map(|v| v.as_u64().expect("layer") as usize)
        .collect();
    let mut t = BTreeMap::new();
    let mut add = |name: String, dtype: &'static str, shape: Vec<usize>| {
        t.insert(format!("{PREFIX}{name}"), (dtype, shape));
    };
    add("model.embed_tokens.weight".into(), "BF16", vec![vocab, hidden]);
    add("model.norm.weight".into(), "BF16", vec![hidden]);
    add("lm_head.weight".into(), "BF16", vec![vocab, hidden]);
    for layer in 0..usize_of(config, "num_hidden_layers") {
        let l = format!("model.layers.{layer}");
        add(format!("{l}.input_layernorm.weight"), "BF16", vec![hidden]);
        add(format!("{l}.post_attention_layernorm.weight"), "BF16", vec![hidden]);
        add(format!("{l}.self_attn.q_proj.weight"), "BF16", vec![heads * head_dim, hidden]);
        add(format!("{l}.self_attn.k_proj.weight"), "BF16", vec![kv_heads * head_dim, hidden]);
        add(format!("{l}.self_attn.v_proj.weight"), "BF16", vec![kv_heads * head_dim, hidden]);
        add(format!("{l}.self_attn.o_proj.weight"), "BF16", vec![hidden, heads * head_dim]);
        let f = format!("{l}.feed_forward");
        if moe_layers.contains(&layer) {
            add(format!("{f}.router.weight"), "BF16", vec![experts, hidden]);
            add(format!("{f}.shared_expert.gate_proj.weight"), "BF16", vec![inter, hidden]);
            add(format!("{f}.shared_expert.up_proj.weight"), "BF16", vec![inter, hidden]);
            add(format!("{f}.shared_expert.down_proj.weight"), "BF16", vec![hidden, inter]);
            if fp8 {
                for e in 0..experts {
                    for (proj, out, input) in [("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]
                    {
                        add(format!("{f}.experts.{e}.{proj}_proj.weight"), "F8_E4M3", vec![out, input]);
                        add(format!("{f}.experts.{e}.{proj}_proj.weight_scale"), "F32", vec![out, 1]);
                    }
                }
            } else {
                add(format!("{f}.experts.gate_up_proj"), "BF16", vec![experts, hidden, 2 * inter]);
                add(format!("{f}.experts.down_proj"), "BF16", vec![experts, inter, hidden]);
            }
        } else {
            add(format!("{f}.gate_proj.weight"), "BF16", vec![inter_mlp, hidden]);
            add(format!("{f}.up_proj.weight"), "BF16", vec![inter_mlp, hidden]);
            add(format!("{f}.down_proj.weight"), "BF16", vec![hidden, inter_mlp]);
        }
    }
    t
}

#[test]
fn same_seed_gives_byte_identical_files() {
    for fp8 in [false, true] {
        let (a_dir, a) = write(tiny(7, fp8));
        let (b_dir, b) = write(tiny(7, fp8));
        let names = |w: &WrittenCheckpoint, root: &Path| -> Vec<PathBuf> {
            w.files.iter().map(|f| f.strip_prefix(root).expect("file inside dir").to_path_buf()).collect()
        };
        assert_eq!(names(&a, a_dir.path()), names(&b, b_dir.path()));
        assert_eq!(a.total_bytes, b.total_bytes);
        for (fa, fb) in a.files.iter().zip(&b.files) {
            assert!(
                fs::read(fa).expect("read a") == fs::read(fb).expect("read b"),
                "{} differs (fp8 {fp8})",
                fa.display()
            );
        }
        let on_disk: u64 = a.files.iter().map(|f| fs::metadata(f).expect("metadata").len()).sum();
        assert_eq!(a.total_bytes, on_disk);
        assert!(a.total_bytes < 8 << 20, "tiny is a few MB, got {}", a.total_bytes);
    }
}

#[test]
fn different_seeds_give_different_weights_and_the_same_tokenizer() {
    let (a_dir, _) = write(tiny(1, false));
    let (b_dir, _) = write(tiny(2, false));
    let (a, b) = (read_tensors(a_dir.path()), read_tensors(b_dir.path()));
    for name in a.keys() {
        assert_ne!(a[name].data, b[name].data, "{name} does not depend on the seed");
    }
    for file in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        assert_eq!(fs::read(a_dir.path().join(file)).ok(), fs::read(b_dir.path().join(file)).ok(), "{file}");
    }
}

#[test]
fn tokenizer_loads_round_trips_and_has_llama4_special_tokens() {
    let (dir, written) = write(tiny(0, false));
    let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).expect("tokenizer loads");
    assert_eq!(tokenizer.get_vocab_size(true), written.vocab_size);

    let text = "Hello, Switchyard! ünïcödé ✓";
    let encoding = tokenizer.encode(text, false).expect("encode");
    assert!(encoding.get_ids().len() < text.len(), "BPE merges something: {:?}", encoding.get_tokens());
    assert_eq!(tokenizer.decode(encoding.get_ids(), false).expect("decode"), text);

    let config = text_config(dir.path());
    let eos: Vec<u64> = config["eos_token_id"].as_array().expect("eos list").iter().filter_map(Value::as_u64).collect();
    let eot = tokenizer.encode("<|eot|>", false).expect("encode eot");
    assert_eq!(eot.get_ids().len(), 1, "<|eot|> is one token");
    let eot_id = u64::from(eot.get_ids()[0]);
    assert!(eos.contains(&eot_id), "eot {eot_id} is an eos of the config {eos:?}");
    for (token, key) in [("<|begin_of_text|>", "bos_token_id"), ("<|finetune_right_pad|>", "pad_token_id")] {
        assert_eq!(tokenizer.token_to_id(token).map(u64::from), config[key].as_u64(), "{token}");
    }
    let expected_eos = ["<|end_of_text|>", "<|eom|>", "<|eot|>"].map(|t| tokenizer.token_to_id(t).map(u64::from));
    assert_eq!(expected_eos.to_vec(), eos.iter().map(|&e| Some(e)).collect::<Vec<_>>());
    // Special tokens sit at the top of the vocabulary, above every BPE token.
    let vocab = written.vocab_size as u32;
    for token in ["<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|python_start|>"] {
        let id = tokenizer.token_to_id(token).expect("special token");
        assert!((vocab - 16..vocab).contains(&id), "{token} = {id}");
    }

    // As in Llama 4, encoding with special tokens prepends <|begin_of_text|>, and decoding can skip them.
    let with_bos = tokenizer.encode(text, true).expect("encode");
    assert_eq!(u64::from(with_bos.get_ids()[0]), config["bos_token_id"].as_u64().expect("bos"));
    assert_eq!(tokenizer.decode(with_bos.get_ids(), true).expect("decode"), text);

    let chat = "<|header_start|>user<|header_end|>\n\nHi<|eot|>";
    let ids = tokenizer.encode(chat, false).expect("encode chat").get_ids().to_vec();
    assert_eq!(ids[0], tokenizer.token_to_id("<|header_start|>").expect("header_start"));
    assert_eq!(*ids.last().expect("ids"), eot_id as u32);
    assert_eq!(tokenizer.decode(&ids, false).expect("decode chat"), chat);
}

#[test]
fn configs_are_nested_like_maverick() {
    let (dir, written) = write(tiny(0, false));
    let config = read_json(&dir.path().join("config.json"));
    assert_eq!(config["model_type"], "llama4");
    assert_eq!(config["architectures"], serde_json::json!(["Llama4ForConditionalGeneration"]));
    assert_eq!(config["tie_word_embeddings"], false);
    assert!(config.get("quantization_config").is_none(), "BF16 has no quantization_config");
    let text = &config["text_config"];
    assert_eq!(text, &preset_text_config(Preset::Tiny));
    assert_eq!(text["model_type"], "llama4_text");
    for (key, value) in [
        ("hidden_size", 128),
        ("num_hidden_layers", 4),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 32),
        ("num_local_experts", 8),
        ("num_experts_per_tok", 1),
        ("intermediate_size", 128),
        ("intermediate_size_mlp", 256),
        ("interleave_moe_layer_step", 2),
        ("attention_chunk_size", 32),
        ("floor_scale", 16),
        ("max_position_embeddings", 4096),
    ] {
        assert_eq!(text[key], value, "{key}");
    }
    assert_eq!(text["moe_layers"], serde_json::json!([1, 3]));
    assert_eq!(text["no_rope_layers"], serde_json::json!([1, 1, 1, 0]));
    assert_eq!(text["attn_temperature_tuning"], true);
    assert_eq!(text["attn_scale"], 0.1);
    assert_eq!(text["rope_theta"], 500000.0);
    assert!(text["rope_scaling"].is_null());
    assert_eq!(text["use_qk_norm"], false);
    assert_eq!(text["rms_norm_eps"], 1e-5);
    assert_eq!(text["vocab_size"], written.vocab_size);

    let tensors = read_tensors(dir.path());
    let embed = &tensors[&format!("{PREFIX}model.embed_tokens.weight")];
    assert_eq!(embed.shape[0], written.vocab_size, "vocab size = embedding rows");

    let generation = read_json(&dir.path().join("generation_config.json"));
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        assert_eq!(generation[key], text[key], "{key}");
    }
    let tokenizer_config = read_json(&dir.path().join("tokenizer_config.json"));
    assert_eq!(tokenizer_config["bos_token"], "<|begin_of_text|>");
    assert_eq!(tokenizer_config["eos_token"], "<|eot|>");
    assert_eq!(tokenizer_config["pad_token"], "<|finetune_right_pad|>");
    assert_eq!(tokenizer_config["add_bos_token"], true);
    assert_eq!(tokenizer_config["model_max_length"], 4096);
    assert_eq!(tokenizer_config["tokenizer_class"], "PreTrainedTokenizerFast");
    let template = tokenizer_config["chat_template"].as_str().expect("chat template");
    for part in
        ["bos_token", "'<|header_start|>' + role + '<|header_end|>\\n\\n'", "'<|eot|>'", "add_generation_prompt"]
    {
        assert!(template.contains(part), "chat template lacks {part}");
    }

    let small = preset_text_config(Preset::Small);
    for (key, value) in [
        ("hidden_size", 2048),
        ("num_hidden_layers", 8),
        ("num_attention_heads", 16),
        ("num_key_value_heads", 4),
        ("head_dim", 128),
        ("num_local_experts", 16),
        ("intermediate_size", 3072),
        ("intermediate_size_mlp", 6144),
        ("attention_chunk_size", 2048),
        ("max_position_embeddings", 262144),
        ("floor_scale", 8192),
    ] {
        assert_eq!(small[key], value, "small {key}");
    }
    assert_eq!(small["moe_layers"], serde_json::json!([1, 3, 5, 7]));
    assert_eq!(small["vocab_size"], written.vocab_size);
}

#[test]
fn every_tensor_matches_the_config_and_the_index() {
    for fp8 in [false, true] {
        let (dir, written) = write(tiny(3, fp8));
        let config = text_config(dir.path());
        let expected = expected_tensors(&config, fp8);
        let tensors = read_tensors(dir.path());
        let found: BTreeMap<String, (&str, Vec<usize>)> =
            tensors.iter().map(|(n, t)| (n.clone(), (t.dtype.as_str(), t.shape.clone()))).collect();
        assert_eq!(found.len(), expected.len(), "fp8 {fp8}: tensor count");
        for (name, (dtype, shape)) in &expected {
            assert_eq!(found.get(name), Some(&(*dtype, shape.clone())), "fp8 {fp8}: {name}");
        }

        let index = read_json(&dir.path().join("model.safetensors.index.json"));
        let weight_map = index["weight_map"].as_object().expect("weight_map");
        assert_eq!(weight_map.len(), tensors.len());
        for (name, tensor) in &tensors {
            assert_eq!(weight_map[name], tensor.file.as_str(), "{name}");
        }
        let total: usize = tensors.values().map(|t| t.data.len()).sum();
        assert_eq!(index["metadata"]["total_size"], total);

        let mut shards: Vec<&str> = tensors.values().map(|t| t.file.as_str()).collect();
        shards.sort();
        shards.dedup();
        assert_eq!(shards, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        for shard in shards {
            assert!(written.files.contains(&dir.path().join(shard)), "{shard} is listed");
        }
    }
}

#[test]
fn fp8_experts_decode_to_the_master_weights_of_the_bf16_checkpoint() {
    let seed = 11;
    let (fp8_dir, _) = write(tiny(seed, true));
    let (bf16_dir, _) = write(tiny(seed, false));
    let config = read_json(&fp8_dir.path().join("config.json"));
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(q["format"], "float-quantized");
    let group = &q["config_groups"]["group_0"];
    assert_eq!(group["targets"], serde_json::json!(["Linear"]));
    for (key, value) in [("num_bits", Value::from(8)), ("type", "float".into()), ("strategy", "channel".into())] {
        assert_eq!(group["weights"][key], value, "weights.{key}");
    }
    assert_eq!(group["weights"]["symmetric"], true);
    assert_eq!(group["weights"]["dynamic"], false);
    assert_eq!(group["input_activations"]["strategy"], "token");
    assert_eq!(group["input_activations"]["dynamic"], true);
    assert_eq!(group["input_activations"]["type"], "float");
    let ignore: Vec<&str> = q["ignore"].as_array().expect("ignore").iter().filter_map(Value::as_str).collect();
    for module in [
        "language_model.model.layers.0.self_attn.q_proj",
        "language_model.model.layers.0.feed_forward.down_proj",
        "language_model.model.layers.1.feed_forward.router",
        "language_model.model.layers.1.feed_forward.shared_expert.gate_proj",
        "language_model.lm_head",
    ] {
        assert!(ignore.contains(&module), "{module} is not ignored");
    }
    assert!(!ignore.iter().any(|m| m.contains(".experts.")), "routed experts are quantized");

    let spec = tiny(seed, true);
    let fp8 = read_tensors(fp8_dir.path());
    let bf16 = read_tensors(bf16_dir.path());
    let (hidden, inter, experts) = (128, 128, 8);
    for layer in [1, 3] {
        let base = format!("{PREFIX}model.layers.{layer}.feed_forward.experts");
        let gate_up = bf16_values(&bf16[&format!("{base}.gate_up_proj")]);
        let down = bf16_values(&bf16[&format!("{base}.down_proj")]);
        for expert in 0..experts {
            for proj in ["gate", "up", "down"] {
                let name = format!("{base}.{expert}.{proj}_proj.weight");
                let master = master_weight(&spec, &name).expect("master weight");
                let (out, input) = if proj == "down" { (hidden, inter) } else { (inter, hidden) };
                assert_eq!(master.shape, [out, input]);

                let codes = &fp8[&name];
                assert_eq!(codes.dtype, "F8_E4M3");
                let scales = &fp8[&format!("{name}_scale")];
                assert_eq!(scales.shape, [out, 1]);
                let scales = f32_values(scales);
                for o in 0..out {
                    let row = &master.values[o * input..(o + 1) * input];
                    let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    assert!((scales[o] - amax / 448.0).abs() <= 1e-7 * amax, "{name} scale {o}");
                    for i in 0..input {
                        let w = row[i];
                        let decoded = e4m3_to_f32(codes.data[o * input + i]) * scales[o];
                        // Three mantissa bits: at most 1/16 relative, or half a subnormal step near zero.
                        let bound = (w.abs() / 16.0).max(scales[o] / 1024.0) * 1.0001;
                        assert!((decoded - w).abs() <= bound, "{name}[{o},{i}]: {decoded} vs {w}");

                        // The fused BF16 tensors hold the same master, transposed to input-major.
                        let fused = match proj {
                            "gate" => gate_up[(expert * hidden + i) * 2 * inter + o],
                            "up" => gate_up[(expert * hidden + i) * 2 * inter + inter + o],
                            _ => down[(expert * inter + i) * hidden + o],
                        };
                        assert_eq!(fused, half::bf16::from_f32(w).to_f32(), "fused {name}[{o},{i}]");
                    }
                }
            }
        }
    }
    // Everything but the experts is the same tensor in both checkpoints.
    for (name, tensor) in &bf16 {
        if !name.contains(".experts.") {
            assert_eq!(tensor.data, fp8[name].data, "{name}");
        }
    }
    // Master weights of stored BF16 tensors round to what is stored.
    let name = format!("{PREFIX}model.layers.0.self_attn.o_proj.weight");
    let master = master_weight(&spec, &name).expect("master o_proj");
    let stored = bf16_values(&bf16[&name]);
    assert_eq!(master.shape, bf16[&name].shape);
    assert!(master.values.iter().zip(&stored).all(|(m, s)| half::bf16::from_f32(*m).to_f32() == *s));
    assert!(
        master_weight(&spec, "model.layers.0.feed_forward.experts.0.gate_proj.weight").is_err(),
        "layer 0 is dense"
    );
}

#[test]
fn weights_have_the_intended_scale_and_routing_reaches_every_expert() {
    let (dir, _) = write(tiny(5, false));
    let tensors = read_tensors(dir.path());
    let hidden = 128;
    let embed = bf16_values(&tensors[&format!("{PREFIX}model.embed_tokens.weight")]);
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!((rms(&embed) - 1.0).abs() < 0.05, "embedding rms {}", rms(&embed));
    let q = bf16_values(&tensors[&format!("{PREFIX}model.layers.0.self_attn.q_proj.weight")]);
    assert!((rms(&q) * (hidden as f32).sqrt() - 1.0).abs() < 0.05, "q_proj ~ N(0, 1/hidden)");
    let norm = bf16_values(&tensors[&format!("{PREFIX}model.layers.0.input_layernorm.weight")]);
    assert!(norm.iter().all(|w| (w - 1.0).abs() < 0.3), "norm weights near 1");
    assert!(norm.iter().any(|w| *w != 1.0), "norm weights carry noise");

    for layer in [1, 3] {
        let router = bf16_values(&tensors[&format!("{PREFIX}model.layers.{layer}.feed_forward.router.weight")]);
        let experts = router.len() / hidden;
        let mut chosen = vec![0usize; experts];
        for token in embed.chunks_exact(hidden) {
            let scale = 1.0 / rms(token);
            let logits: Vec<f32> = router
                .chunks_exact(hidden)
                .map(|row| row.iter().zip(token).map(|(w, x)| w * x * scale).sum())
                .collect();
            let best = (0..experts).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).expect("experts");
            chosen[best] += 1;
        }
        assert!(chosen.iter().all(|&n| n > 0), "layer {layer}: tokens per expert {chosen:?}");
    }
}

#[test]
fn presets_parse_by_name() {
    assert_eq!("tiny".parse::<Preset>().expect("tiny"), Preset::Tiny);
    assert_eq!("small".parse::<Preset>().expect("small"), Preset::Small);
    assert_eq!(Preset::Small.to_string(), "small");
    let err = "huge".parse::<Preset>().expect_err("unknown preset");
    assert!(err.to_string().contains("huge"), "{err}");
}

#[test]
fn the_checkpoint_loader_reads_both_layouts() {
    use switchyard_model::checkpoint::{Checkpoint, ExpertLayout};
    use switchyard_model::config::ModelConfig;
    use switchyard_model::linear::LinearWeight;

    let seed = 13;
    for fp8 in [false, true] {
        let (dir, _) = write(tiny(seed, fp8));
        let config = ModelConfig::from_file(dir.path().join("config.json")).expect("config parses");
        assert!(config.nested);
        assert_eq!(config.quantization.is_some(), fp8);
        let cfg = &config.text;
        let checkpoint = Checkpoint::open(dir.path()).expect("checkpoint opens");
        checkpoint.check_against(cfg).expect("tensors match the config");
        let layout = if fp8 { ExpertLayout::PerExpert } else { ExpertLayout::Fused };
        assert_eq!(checkpoint.expert_layout(), Some(layout));

        let spec = tiny(seed, fp8);
        let q = checkpoint.linear("model.layers.2.self_attn.q_proj.weight", 128, 128).expect("q_proj");
        let master = master_weight(&spec, "model.layers.2.self_attn.q_proj.weight").expect("master q_proj");
        match &q {
            LinearWeight::F32 { weight, .. } => {
                let rounded: Vec<f32> = master.values.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
                assert_eq!(weight, &rounded);
            }
            other => panic!("q_proj loads as {other:?}"),
        }

        let expert = checkpoint.expert(3, 5, cfg).expect("expert 5 of layer 3");
        for (proj, weight) in [("gate", &expert.gate), ("up", &expert.up), ("down", &expert.down)] {
            let name = format!("model.layers.3.feed_forward.experts.5.{proj}_proj.weight");
            let master = master_weight(&spec, &name).expect("master expert");
            assert_eq!([weight.out_features(), weight.in_features()], [master.shape[0], master.shape[1]]);
            let values: Vec<f32> = match weight {
                LinearWeight::F32 { weight, .. } => weight.clone(),
                LinearWeight::Fp8 { codes, scales, in_features, .. } => codes
                    .as_slice()
                    .iter()
                    .enumerate()
                    .map(|(i, code)| e4m3_to_f32(*code) * scales[i / in_features])
                    .collect(),
            };
            assert_eq!(weight.is_fp8(), fp8, "{name}");
            for (i, (got, want)) in values.iter().zip(&master.values).enumerate() {
                let bound = if fp8 { (want.abs() / 16.0).max(0.01 / 1024.0) } else { want.abs() / 256.0 };
                assert!((got - want).abs() <= bound * 1.001, "{name}[{i}]: {got} vs {want} (fp8 {fp8})");
            }
        }
    }
}

/// The benchmark preset, in release: `cargo test --release -p switchyard-model --test tiny -- --ignored`.
#[test]
#[ignore = "writes about 2.4 GB; run in release"]
fn small_fp8_preset_is_written_quickly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let start = std::time::Instant::now();
    let spec = TinySpec { preset: Preset::Small, seed: 0, fp8: true };
    let written = write_checkpoint(dir.path(), &spec, &mut |_, _| {}).expect("write small");
    let elapsed = start.elapsed();
    eprintln!("small fp8: {} bytes in {elapsed:?}, {} files", written.total_bytes, written.files.len());
    let index = read_json(&dir.path().join("model.safetensors.index.json"));
    for shard in written.files.iter().filter(|f| f.extension().is_some_and(|e| e == "safetensors")) {
        assert!(fs::metadata(shard).expect("shard").len() <= 1_000_100_000, "{} over 1 GB", shard.display());
    }
    assert!(index["metadata"]["total_size"].as_u64().expect("total") > 1_000_000_000);
}
