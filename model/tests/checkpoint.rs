//! Checkpoint loading against real safetensors files written into temp dirs: single-file and sharded checkpoints,
//! both name prefixes, all four dtypes, both expert layouts, the ledger proof of selective expert loading, and every
//! error naming its tensor and file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{serialize_to_file, Dtype};
use switchyard_kernels::fp8::{e4m3_to_f32, f32_to_e4m3};
use switchyard_model::checkpoint::{
    ByteRange, Checkpoint, DType, ExpertLayout, ExpertWeights, TensorBytes, INDEX_FILE, SINGLE_FILE,
};
use switchyard_model::config::{ModelConfig, TextConfig};
use switchyard_model::linear::LinearWeight;
use switchyard_model::ModelError;
use tempfile::TempDir;

const LAYERS: usize = 8;
const EXPERTS: usize = 20;
const HIDDEN: usize = 8;
const INTER: usize = 4;
const INTER_MLP: usize = 6;
const VOCAB: usize = 32;

fn config() -> TextConfig {
    let json = serde_json::json!({
        "model_type": "llama4_text",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "intermediate_size": INTER,
        "intermediate_size_mlp": INTER_MLP,
        "num_local_experts": EXPERTS,
        "moe_layers": [1, 2, 3, 4, 5, 6],
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    ModelConfig::from_json_str(&json.to_string(), "tiny/config.json").expect("tiny config").text
}

/// A deterministic hash of a tensor name and an element index.
fn hash(name: &str, i: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(i.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^ (h >> 29)
}

/// Values exact in BF16, F16 and F32 (multiples of 1/8 within ±3.75), different per tensor.
fn values(name: &str, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((hash(name, i) % 61) as f32 - 30.0) / 8.0).collect()
}

/// A finite E4M3 code (never NaN).
fn fp8_code(name: &str, i: usize) -> u8 {
    let h = hash(name, i);
    let magnitude = (h % 0x7F) as u8;
    magnitude | if h & 0x100 != 0 { 0x80 } else { 0 }
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::F8_E4M3 => values.iter().map(|&v| f32_to_e4m3(v)).collect(),
        other => panic!("no encoder for {other:?}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    Fused(Dtype),
    PerExpertFp8,
}

/// One routed expert projection in nn.Linear layout, as FP8 codes and power-of-two row scales, so that its
/// dequantised value is exact in BF16 and both layouts can hold the very same weights.
struct ExpertProjection {
    codes: Vec<u8>,
    scales: Vec<f32>,
    cols: usize,
}

impl ExpertProjection {
    fn new(layer: usize, expert: usize, which: &str, rows: usize, cols: usize) -> ExpertProjection {
        let name = format!("{layer}.{expert}.{which}");
        ExpertProjection {
            codes: (0..rows * cols).map(|i| fp8_code(&name, i)).collect(),
            scales: (0..rows).map(|r| 2f32.powi(-((r % 4) as i32))).collect(),
            cols,
        }
    }

    fn dequantised(&self) -> Vec<f32> {
        self.codes.iter().enumerate().map(|(i, &c)| e4m3_to_f32(c) * self.scales[i / self.cols]).collect()
    }
}

/// A tensor to write into a safetensors file.
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Every tensor of the tiny model under canonical names, and the values `tensor_f32` must give for each.
fn model_tensors(cfg: &TextConfig, layout: Layout) -> (Vec<Stored>, BTreeMap<String, Vec<f32>>) {
    let mut stored = Vec::new();
    let mut reference = BTreeMap::new();
    let dtypes = [Dtype::BF16, Dtype::F16, Dtype::F32];
    let mut plain = |name: String, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let vals = values(&name, n);
        let dtype = dtypes[(hash(&name, 0) % 3) as usize];
        stored.push(Stored { bytes: encode(dtype, &vals), name: name.clone(), dtype, shape });
        reference.insert(name, vals);
    };
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    plain("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]);
    plain("model.norm.weight".into(), vec![HIDDEN]);
    plain("lm_head.weight".into(), vec![VOCAB, HIDDEN]);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        plain(format!("{p}.input_layernorm.weight"), vec![HIDDEN]);
        plain(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]);
        plain(format!("{p}.self_attn.q_proj.weight"), vec![q, HIDDEN]);
        plain(format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]);
        plain(format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]);
        plain(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, q]);
        if cfg.is_moe_layer(l) {
            plain(format!("{p}.feed_forward.router.weight"), vec![EXPERTS, HIDDEN]);
            plain(format!("{p}.feed_forward.shared_expert.gate_proj.weight"), vec![INTER, HIDDEN]);
            plain(format!("{p}.feed_forward.shared_expert.up_proj.weight"), vec![INTER, HIDDEN]);
            plain(format!("{p}.feed_forward.shared_expert.down_proj.weight"), vec![HIDDEN, INTER]);
        } else {
            plain(format!("{p}.feed_forward.gate_proj.weight"), vec![INTER_MLP, HIDDEN]);
            plain(format!("{p}.feed_forward.up_proj.weight"), vec![INTER_MLP, HIDDEN]);
            plain(format!("{p}.feed_forward.down_proj.weight"), vec![HIDDEN, INTER_MLP]);
        }
    }
    for l in (0..LAYERS).filter(|&l| cfg.is_moe_layer(l)) {
        let p = format!("model.layers.{l}.feed_forward.experts");
        match layout {
            Layout::Fused(dtype) => {
                let mut gate_up = vec![0.0f32; EXPERTS * HIDDEN * 2 * INTER];
                let mut down = vec![0.0f32; EXPERTS * INTER * HIDDEN];
                for e in 0..EXPERTS {
                    let gate = ExpertProjection::new(l, e, "gate", INTER, HIDDEN).dequantised();
                    let up = ExpertProjection::new(l, e, "up", INTER, HIDDEN).dequantised();
                    let dn = ExpertProjection::new(l, e, "down", HIDDEN, INTER).dequantised();
                    for h in 0..HIDDEN {
                        for i in 0..INTER {
                            gate_up[(e * HIDDEN + h) * 2 * INTER + i] = gate[i * HIDDEN + h];
                            gate_up[(e * HIDDEN + h) * 2 * INTER + INTER + i] = up[i * HIDDEN + h];
                            down[(e * INTER + i) * HIDDEN + h] = dn[h * INTER + i];
                        }
                    }
                }
                for (name, shape, vals) in [
                    (format!("{p}.gate_up_proj"), vec![EXPERTS, HIDDEN, 2 * INTER], gate_up),
                    (format!("{p}.down_proj"), vec![EXPERTS, INTER, HIDDEN], down),
                ] {
                    stored.push(Stored { bytes: encode(dtype, &vals), name: name.clone(), dtype, shape });
                    reference.insert(name, vals);
                }
            }
            Layout::PerExpertFp8 => {
                for e in 0..EXPERTS {
                    for (which, rows, cols) in [("gate", INTER, HIDDEN), ("up", INTER, HIDDEN), ("down", HIDDEN, INTER)]
                    {
                        let proj = ExpertProjection::new(l, e, which, rows, cols);
                        let weight = format!("{p}.{e}.{which}_proj.weight");
                        let scale = format!("{weight}_scale");
                        // Scales alternate F32 and BF16 (both occur in compressed-tensors checkpoints).
                        let scale_dtype = if e % 2 == 0 { Dtype::F32 } else { Dtype::BF16 };
                        reference.insert(weight.clone(), proj.codes.iter().map(|&c| e4m3_to_f32(c)).collect());
                        reference.insert(scale.clone(), proj.scales.clone());
                        stored.push(Stored {
                            name: weight,
                            dtype: Dtype::F8_E4M3,
                            shape: vec![rows, cols],
                            bytes: proj.codes.clone(),
                        });
                        stored.push(Stored {
                            name: scale,
                            dtype: scale_dtype,
                            shape: vec![rows, 1],
                            bytes: encode(scale_dtype, &proj.scales),
                        });
                    }
                }
            }
        }
    }
    (stored, reference)
}

fn write_file(path: &Path, tensors: &[&Stored]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("view")))
        .collect();
    serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), None, path).expect("write safetensors");
}

struct Fixture {
    dir: TempDir,
    cfg: TextConfig,
    /// Canonical name -> the f32 values `tensor_f32` must return.
    reference: BTreeMap<String, Vec<f32>>,
}

impl Fixture {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn open(&self) -> Checkpoint {
        Checkpoint::open(self.path()).expect("open checkpoint")
    }
}

/// Writes the tiny model with `layout`, stored names prefixed by `prefix`, in `shards` files (1: `model.safetensors`,
/// more: `model-0000i-of-0000n.safetensors` plus the index). A `language_model.` checkpoint also carries vision
/// tensors (one in a dtype we do not read) that must be skipped.
fn build(layout: Layout, prefix: &str, shards: usize) -> Fixture {
    let cfg = config();
    let (mut stored, reference) = model_tensors(&cfg, layout);
    for t in &mut stored {
        t.name = format!("{prefix}{}", t.name);
    }
    if prefix == "language_model." {
        stored.push(Stored {
            name: "vision_model.patch_embedding.linear.weight".into(),
            dtype: Dtype::F32,
            shape: vec![2, 2],
            bytes: encode(Dtype::F32, &[1.0, 2.0, 3.0, 4.0]),
        });
        stored.push(Stored {
            name: "vision_model.class_embedding.position_ids".into(),
            dtype: Dtype::I64,
            shape: vec![2],
            bytes: vec![0; 16],
        });
        stored.push(Stored {
            name: "multi_modal_projector.linear_1.weight".into(),
            dtype: Dtype::BF16,
            shape: vec![2],
            bytes: encode(Dtype::BF16, &[1.0, 2.0]),
        });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    if shards == 1 {
        write_file(&dir.path().join(SINGLE_FILE), &stored.iter().collect::<Vec<_>>());
    } else {
        stored.sort_by(|a, b| a.name.cmp(&b.name));
        let mut weight_map = serde_json::Map::new();
        for s in 0..shards {
            let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
            let mine: Vec<&Stored> = stored.iter().skip(s).step_by(shards).collect();
            for t in &mine {
                weight_map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
            }
            write_file(&dir.path().join(&file), &mine);
        }
        let total: usize = stored.iter().map(|t| t.bytes.len()).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        fs::write(dir.path().join(INDEX_FILE), index.to_string()).expect("write index");
    }
    Fixture { dir, cfg, reference }
}

fn assert_message(err: &ModelError, needles: &[&str]) {
    let message = err.to_string();
    for needle in needles {
        assert!(message.contains(needle), "message {message:?} should contain {needle:?}");
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().expect("file name").to_string_lossy().into_owned()
}

fn dequantised(weight: &LinearWeight) -> Vec<f32> {
    match weight {
        LinearWeight::F32 { weight, .. } => weight.clone(),
        LinearWeight::Fp8 { codes, scales, in_features, .. } => {
            codes.as_slice().iter().enumerate().map(|(i, &c)| e4m3_to_f32(c) * scales[i / in_features]).collect()
        }
    }
}

fn expert_values(expert: &ExpertWeights) -> [Vec<f32>; 3] {
    [dequantised(&expert.gate), dequantised(&expert.up), dequantised(&expert.down)]
}

/// Every non-expert tensor, loaded the way the model loads it.
fn load_non_expert_tensors(ckpt: &Checkpoint, cfg: &TextConfig) {
    let hidden = cfg.hidden_size;
    ckpt.tensor_f32("model.embed_tokens.weight", &[cfg.vocab_size, hidden]).expect("embed");
    ckpt.tensor_f32("model.norm.weight", &[hidden]).expect("norm");
    ckpt.linear("lm_head.weight", cfg.vocab_size, hidden).expect("lm_head");
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        ckpt.tensor_f32(&format!("{p}.input_layernorm.weight"), &[hidden]).expect("norm");
        ckpt.tensor_f32(&format!("{p}.post_attention_layernorm.weight"), &[hidden]).expect("norm");
        ckpt.linear(&format!("{p}.self_attn.q_proj.weight"), cfg.q_dim(), hidden).expect("q");
        ckpt.linear(&format!("{p}.self_attn.k_proj.weight"), cfg.kv_dim(), hidden).expect("k");
        ckpt.linear(&format!("{p}.self_attn.v_proj.weight"), cfg.kv_dim(), hidden).expect("v");
        ckpt.linear(&format!("{p}.self_attn.o_proj.weight"), hidden, cfg.q_dim()).expect("o");
        let (mlp, inter) = if cfg.is_moe_layer(l) {
            let router = format!("{p}.feed_forward.router.weight");
            ckpt.linear(&router, cfg.num_local_experts, hidden).expect("router");
            (format!("{p}.feed_forward.shared_expert"), cfg.intermediate_size)
        } else {
            (format!("{p}.feed_forward"), cfg.intermediate_size_mlp)
        };
        ckpt.linear(&format!("{mlp}.gate_proj.weight"), inter, hidden).expect("gate");
        ckpt.linear(&format!("{mlp}.up_proj.weight"), inter, hidden).expect("up");
        ckpt.linear(&format!("{mlp}.down_proj.weight"), hidden, inter).expect("down");
    }
}

fn check_all_values(fixture: &Fixture, ckpt: &Checkpoint) {
    for (name, want) in &fixture.reference {
        let info = ckpt.tensor_info(name).expect("info");
        let got = ckpt.tensor_f32(name, &info.shape.clone()).expect("tensor_f32");
        assert_eq!(&got, want, "{name} ({})", info.dtype);
    }
}

#[test]
fn single_file_checkpoint_decodes_every_dtype() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 1);
    let ckpt = fixture.open();
    assert_eq!(ckpt.files(), &[fixture.path().join(SINGLE_FILE)]);
    assert_eq!(ckpt.source(), fixture.path().join(SINGLE_FILE));
    assert_eq!(ckpt.expert_layout(), Some(ExpertLayout::Fused));
    assert_eq!(ckpt.tensor_names().len(), fixture.reference.len());
    let dtypes: BTreeSet<String> = ckpt.tensors().map(|t| t.dtype.to_string()).collect();
    assert_eq!(dtypes, ["BF16", "F16", "F32"].map(String::from).into_iter().collect());
    check_all_values(&fixture, &ckpt);
    ckpt.check_against(&fixture.cfg).expect("config matches");

    // tensor_info reads nothing; tensor_bytes is zero-copy and recorded.
    ckpt.ledger().clear();
    let info = ckpt.tensor_info("model.embed_tokens.weight").expect("info").clone();
    assert_eq!(info.shape, vec![VOCAB, HIDDEN]);
    assert_eq!(info.file, fixture.path().join(SINGLE_FILE));
    assert_eq!(info.range.len(), VOCAB * HIDDEN * info.dtype.size());
    assert!(ckpt.ledger().is_empty());
    let bytes = ckpt.tensor_bytes("model.embed_tokens.weight", info.dtype, &[VOCAB, HIDDEN]).expect("bytes");
    let on_disk = fs::read(&info.file).expect("read file");
    assert_eq!(bytes.as_slice(), &on_disk[info.range.clone()]);
    assert_eq!(bytes.len(), info.range.len());
    assert_eq!(ckpt.ledger().ranges(), vec![info.byte_range()]);
    assert_eq!(ckpt.ledger().bytes_read(), info.range.len() as u64);

    // linear() of a BF16/F16/F32 weight is f32 in nn.Linear layout.
    let name = "model.layers.0.self_attn.o_proj.weight";
    match ckpt.linear(name, HIDDEN, fixture.cfg.q_dim()).expect("linear") {
        LinearWeight::F32 { weight, out_features, in_features } => {
            assert_eq!((out_features, in_features), (HIDDEN, fixture.cfg.q_dim()));
            assert_eq!(&weight, &fixture.reference[name]);
        }
        other => panic!("expected an f32 weight, got {other:?}"),
    }
}

#[test]
fn sharded_checkpoint_with_language_model_prefix() {
    let fixture = build(Layout::Fused(Dtype::F32), "language_model.", 3);
    let ckpt = fixture.open();
    assert_eq!(ckpt.files().len(), 3);
    assert_eq!(ckpt.source(), fixture.path().join(INDEX_FILE));
    let names = ckpt.tensor_names();
    assert_eq!(names.len(), fixture.reference.len(), "vision tensors are skipped");
    assert!(names.iter().all(|n| !n.starts_with("language_model.") && !n.starts_with("vision_model.")));
    assert!(!ckpt.contains("vision_model.class_embedding.position_ids"));
    let shards_used: BTreeSet<&Path> = ckpt.tensors().map(|t| t.file.as_path()).collect();
    assert_eq!(shards_used.len(), 3);
    check_all_values(&fixture, &ckpt);
    ckpt.check_against(&fixture.cfg).expect("config matches");
}

#[test]
fn per_expert_fp8_checkpoint_sharded_and_prefixed() {
    let fixture = build(Layout::PerExpertFp8, "language_model.", 3);
    let ckpt = fixture.open();
    assert_eq!(ckpt.expert_layout(), Some(ExpertLayout::PerExpert));
    // tensor_f32 of an F8_E4M3 tensor decodes the codes (no scale); of the scales, whatever their dtype.
    check_all_values(&fixture, &ckpt);
    ckpt.check_against(&fixture.cfg).expect("config matches");

    let name = "model.layers.2.feed_forward.experts.7.down_proj.weight";
    let info = ckpt.tensor_info(name).expect("info").clone();
    assert_eq!(info.dtype, DType::F8E4M3);
    match ckpt.linear(name, HIDDEN, INTER).expect("linear") {
        LinearWeight::Fp8 { codes, scales, out_features, in_features } => {
            assert_eq!((out_features, in_features), (HIDDEN, INTER));
            let proj = ExpertProjection::new(2, 7, "down", HIDDEN, INTER);
            assert_eq!(codes.as_slice(), &proj.codes[..]);
            assert_eq!(scales, proj.scales);
            // Zero-copy: exactly the bytes of the file at the tensor's range.
            assert_eq!(codes.file_range(), info.range);
            assert_eq!(codes.as_slice(), &fs::read(&info.file).expect("read")[info.range.clone()]);
        }
        other => panic!("expected FP8, got {other:?}"),
    }
}

#[test]
fn fused_and_per_expert_fp8_layouts_give_the_same_experts() {
    let fused = build(Layout::Fused(Dtype::BF16), "", 1);
    let fused_f16 = build(Layout::Fused(Dtype::F16), "", 3);
    let per_expert = build(Layout::PerExpertFp8, "", 1);
    let (a, b, c) = (fused.open(), fused_f16.open(), per_expert.open());
    let cfg = &fused.cfg;
    for l in (0..LAYERS).filter(|&l| cfg.is_moe_layer(l)) {
        for e in [0, 3, 17, EXPERTS - 1] {
            let from_fused = a.expert(l, e, cfg).expect("fused expert");
            let from_f16 = b.expert(l, e, cfg).expect("fused f16 expert");
            let from_fp8 = c.expert(l, e, cfg).expect("fp8 expert");
            assert!(!from_fused.gate.is_fp8() && from_fp8.gate.is_fp8() && from_fp8.down.is_fp8());
            assert_eq!((from_fused.gate.out_features(), from_fused.gate.in_features()), (INTER, HIDDEN));
            assert_eq!((from_fused.up.out_features(), from_fused.up.in_features()), (INTER, HIDDEN));
            assert_eq!((from_fused.down.out_features(), from_fused.down.in_features()), (HIDDEN, INTER));
            assert_eq!((from_fp8.down.out_features(), from_fp8.down.in_features()), (HIDDEN, INTER));
            let want = [
                ExpertProjection::new(l, e, "gate", INTER, HIDDEN).dequantised(),
                ExpertProjection::new(l, e, "up", INTER, HIDDEN).dequantised(),
                ExpertProjection::new(l, e, "down", HIDDEN, INTER).dequantised(),
            ];
            assert_eq!(expert_values(&from_fused), want, "layer {l} expert {e} (fused BF16)");
            assert_eq!(expert_values(&from_f16), want, "layer {l} expert {e} (fused F16)");
            assert_eq!(expert_values(&from_fp8), want, "layer {l} expert {e} (per-expert FP8)");
        }
    }
}

/// Loading experts {3, 17} of layer 5 touches exactly their bytes; loading everything else never touches any expert
/// byte of any layer.
fn selective_loading(fixture: &Fixture) {
    let ckpt = fixture.open();
    let cfg = &fixture.cfg;
    assert!(cfg.moe_layers.len() >= 6 && cfg.num_local_experts >= 18);
    assert!(ckpt.ledger().is_empty(), "open reads no tensor data");

    let wanted = [3usize, 17];
    for &e in &wanted {
        ckpt.expert(5, e, cfg).expect("expert");
    }
    let got: BTreeSet<ByteRange> = ckpt.ledger().ranges().into_iter().collect();

    // The expected ranges, computed from the headers alone.
    let mut expected = BTreeSet::new();
    for &e in &wanted {
        match ckpt.expert_layout().expect("layout") {
            ExpertLayout::Fused => {
                for which in ["gate_up_proj", "down_proj"] {
                    let info = ckpt.tensor_info(&format!("model.layers.5.feed_forward.experts.{which}")).expect("info");
                    let per_expert = info.range.len() / EXPERTS;
                    let start = info.range.start + e * per_expert;
                    expected.insert(ByteRange {
                        tensor: info.name.clone(),
                        file: info.file.clone(),
                        range: start..start + per_expert,
                    });
                }
            }
            ExpertLayout::PerExpert => {
                for which in ["gate_proj", "up_proj", "down_proj"] {
                    let weight = format!("model.layers.5.feed_forward.experts.{e}.{which}.weight");
                    for name in [weight.clone(), format!("{weight}_scale")] {
                        expected.insert(ckpt.tensor_info(&name).expect("info").byte_range());
                    }
                }
            }
        }
        let api: BTreeSet<ByteRange> = ckpt.expert_ranges(5, e, cfg).expect("ranges").into_iter().collect();
        assert!(api.is_subset(&expected), "expert_ranges agrees with the headers");
    }
    assert_eq!(got, expected, "the ledger holds exactly the bytes of experts 3 and 17");
    let expected_bytes: usize = expected.iter().map(ByteRange::len).sum();
    assert_eq!(ckpt.ledger().bytes_read(), expected_bytes as u64);
    let layer5_expert_bytes: usize = ckpt.expert_tensor_ranges(5).iter().map(ByteRange::len).sum();
    assert!(expected_bytes * 5 < layer5_expert_bytes, "2 of 20 experts: about a tenth of the layer's expert bytes");
    // Nothing of another expert or another layer.
    let all_expert_ranges: Vec<ByteRange> = (0..LAYERS).flat_map(|l| ckpt.expert_tensor_ranges(l)).collect();
    for range in &got {
        let owners: Vec<&ByteRange> = all_expert_ranges.iter().filter(|r| r.intersects(range)).collect();
        assert_eq!(owners.len(), 1, "{range:?} lies in exactly one expert tensor");
        assert!(owners[0].tensor.starts_with("model.layers.5.feed_forward.experts."));
    }

    ckpt.ledger().clear();
    load_non_expert_tensors(&ckpt, cfg);
    let read = ckpt.ledger().ranges();
    assert!(!read.is_empty());
    for range in &read {
        if let Some(hit) = all_expert_ranges.iter().find(|r| r.intersects(range)) {
            panic!("non-expert load of {} touched expert bytes of {}", range.tensor, hit.tensor);
        }
    }
    // And it did read every non-expert tensor.
    let tensors_read: BTreeSet<&str> = read.iter().map(|r| r.tensor.as_str()).collect();
    let non_expert: BTreeSet<&str> =
        ckpt.tensor_names().into_iter().filter(|n| !n.contains(".feed_forward.experts.")).collect();
    assert_eq!(tensors_read, non_expert);
}

#[test]
fn selective_loading_fused_layout() {
    selective_loading(&build(Layout::Fused(Dtype::BF16), "", 1));
}

#[test]
fn selective_loading_per_expert_fp8_layout_sharded() {
    selective_loading(&build(Layout::PerExpertFp8, "language_model.", 3));
}

#[test]
fn expert_ids_out_of_range_are_invalid_input() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 1);
    let ckpt = fixture.open();
    let err = ckpt.expert(5, EXPERTS, &fixture.cfg).expect_err("out of range");
    assert!(matches!(err, ModelError::InvalidInput { .. }), "{err:?}");
    assert_message(&err, &["expert 20", "layer 5", "num_local_experts"]);
    let err = ckpt.expert(0, 0, &fixture.cfg).expect_err("dense layer");
    assert!(matches!(err, ModelError::InvalidInput { .. }), "{err:?}");
    assert_message(&err, &["layer 0", "not an MoE layer"]);
    let err = ckpt.expert(LAYERS, 0, &fixture.cfg).expect_err("past the last layer");
    assert!(matches!(err, ModelError::InvalidInput { .. }), "{err:?}");
    assert!(ckpt.ledger().is_empty());
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 1);
    let ckpt = fixture.open();
    let err = ckpt.tensor_f32("model.layers.0.self_attn.qkv_proj.weight", &[4, 4]).expect_err("missing");
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_message(&err, &["model.layers.0.self_attn.qkv_proj.weight", SINGLE_FILE]);

    // Sharded: the error names the index.
    let sharded = build(Layout::Fused(Dtype::BF16), "", 3);
    let err = sharded.open().linear("lm_head.bias", 1, 1).expect_err("missing");
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_message(&err, &["lm_head.bias", INDEX_FILE]);
}

#[test]
fn wrong_shape_names_tensor_file_and_shapes() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 3);
    let ckpt = fixture.open();
    let name = "model.layers.1.self_attn.q_proj.weight";
    let file = file_name(&ckpt.tensor_info(name).expect("info").file);
    let err = ckpt.tensor_f32(name, &[8, 9]).expect_err("shape");
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    assert_message(&err, &[name, &file, "[8, 9]", "[8, 8]"]);
    let err = ckpt.linear(name, 9, 8).expect_err("shape");
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    assert_message(&err, &[name, &file]);
    assert!(ckpt.ledger().is_empty(), "nothing is read when the check fails");
}

#[test]
fn wrong_dtype_names_tensor_and_file() {
    let fixture = build(Layout::PerExpertFp8, "", 1);
    let ckpt = fixture.open();
    let name = "model.layers.3.feed_forward.experts.0.gate_proj.weight";
    let err = ckpt.tensor_bytes(name, DType::BF16, &[INTER, HIDDEN]).expect_err("dtype");
    assert!(matches!(err, ModelError::DtypeMismatch { .. }), "{err:?}");
    assert_message(&err, &[name, SINGLE_FILE, "BF16", "F8_E4M3"]);
    let codes = ckpt.tensor_bytes(name, DType::F8E4M3, &[INTER, HIDDEN]).expect("right dtype");
    assert_eq!(codes.len(), INTER * HIDDEN);
}

#[test]
fn unsupported_dtype_names_tensor_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = Stored { name: "model.norm.weight".into(), dtype: Dtype::F32, shape: vec![2], bytes: vec![0; 8] };
    let ints = Stored { name: "model.rotary.cache".into(), dtype: Dtype::I32, shape: vec![2], bytes: vec![0; 8] };
    write_file(&dir.path().join(SINGLE_FILE), &[&good, &ints]);
    let ckpt = Checkpoint::open(dir.path()).expect("opens: unsupported tensors are refused only when asked for");
    assert!(ckpt.contains("model.rotary.cache"));
    let err = ckpt.tensor_f32("model.rotary.cache", &[2]).expect_err("unsupported");
    assert!(matches!(err, ModelError::UnsupportedDtype { .. }), "{err:?}");
    assert_message(&err, &["model.rotary.cache", SINGLE_FILE, "I32"]);
    let err = ckpt.check_against(&config()).expect_err("unsupported");
    assert!(matches!(err, ModelError::UnsupportedDtype { .. }), "{err:?}");
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 1);
    let path = fixture.path().join(SINGLE_FILE);
    let last = {
        let ckpt = fixture.open();
        let mut infos: Vec<_> = ckpt.tensors().cloned().collect();
        infos.sort_by_key(|t| t.range.end);
        infos.pop().expect("a tensor")
    };
    let bytes = fs::read(&path).expect("read");
    fs::write(&path, &bytes[..bytes.len() - 3]).expect("truncate");
    let err = Checkpoint::open(fixture.path()).expect_err("truncated");
    match &err {
        ModelError::Truncated { file, needed, actual, tensor } => {
            assert_eq!(file, &path);
            assert_eq!(*needed, bytes.len() as u64);
            assert_eq!(*actual, bytes.len() as u64 - 3);
            assert_eq!(tensor.as_deref(), Some(last.name.as_str()));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert_message(&err, &[&last.name, SINGLE_FILE]);

    // Cut inside the header, and shorter than the length prefix.
    fs::write(&path, &bytes[..20]).expect("truncate");
    let err = Checkpoint::open(fixture.path()).expect_err("truncated header");
    assert!(matches!(err, ModelError::Truncated { tensor: None, .. }), "{err:?}");
    assert_message(&err, &[SINGLE_FILE]);
    fs::write(&path, &bytes[..5]).expect("truncate");
    let err = Checkpoint::open(fixture.path()).expect_err("truncated prefix");
    assert!(matches!(err, ModelError::Truncated { needed: 8, actual: 5, .. }), "{err:?}");
}

#[test]
fn garbage_header_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SINGLE_FILE);
    fs::write(&path, b"this is not a safetensors file, just text").expect("write");
    let err = Checkpoint::open(dir.path()).expect_err("garbage");
    assert!(matches!(err, ModelError::BadHeader { .. }), "{err:?}");
    assert_message(&err, &[SINGLE_FILE]);

    // A plausible length followed by something that is not JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json at all");
    fs::write(&path, &bytes).expect("write");
    let err = Checkpoint::open(dir.path()).expect_err("not json");
    assert!(matches!(err, ModelError::BadHeader { .. }), "{err:?}");
    assert_message(&err, &[SINGLE_FILE, "JSON"]);

    // Valid JSON whose offsets disagree with the shape: the tensor is named.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 12]);
    fs::write(&path, &bytes).expect("write");
    let err = Checkpoint::open(dir.path()).expect_err("inconsistent");
    assert!(matches!(err, ModelError::BadHeader { .. }), "{err:?}");
    assert_message(&err, &[SINGLE_FILE, "model.norm.weight"]);
}

#[test]
fn index_naming_a_missing_shard() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 3);
    let shard = fixture.path().join("model-00002-of-00003.safetensors");
    fs::remove_file(&shard).expect("remove shard");
    let err = Checkpoint::open(fixture.path()).expect_err("missing shard");
    match &err {
        ModelError::MissingShard { index_file, shard: missing, tensor } => {
            assert_eq!(index_file, &fixture.path().join(INDEX_FILE));
            assert_eq!(missing, &shard);
            assert!(fixture.reference.contains_key(tensor), "{tensor}");
        }
        other => panic!("expected MissingShard, got {other:?}"),
    }
    assert_message(&err, &["model-00002-of-00003.safetensors", INDEX_FILE]);
}

#[test]
fn index_mapping_a_tensor_to_the_wrong_shard() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 3);
    let index_path = fixture.path().join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index_path).expect("read")).expect("json");
    let name = "model.norm.weight";
    let current = index["weight_map"][name].as_str().expect("mapped").to_string();
    let other = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
        .into_iter()
        .find(|f| *f != current)
        .expect("another shard");
    index["weight_map"][name] = serde_json::Value::String(other.to_string());
    fs::write(&index_path, index.to_string()).expect("write");
    let err = Checkpoint::open(fixture.path()).expect_err("wrong shard");
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_message(&err, &[name, other]);
}

#[test]
fn directory_without_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Checkpoint::open(dir.path()).expect_err("empty dir");
    assert!(matches!(err, ModelError::NoCheckpoint { .. }), "{err:?}");
    assert_message(&err, &[&dir.path().display().to_string(), SINGLE_FILE, INDEX_FILE]);
}

#[test]
fn fp8_weight_without_scale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weight = Stored {
        name: "model.layers.1.feed_forward.experts.0.gate_proj.weight".into(),
        dtype: Dtype::F8_E4M3,
        shape: vec![2, 2],
        bytes: vec![0x38; 4],
    };
    write_file(&dir.path().join(SINGLE_FILE), &[&weight]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    let err = ckpt.linear(&weight.name, 2, 2).expect_err("no scale");
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_message(&err, &["model.layers.1.feed_forward.experts.0.gate_proj.weight_scale", SINGLE_FILE]);
}

#[test]
fn mixed_expert_layouts_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fused = Stored {
        name: "model.layers.1.feed_forward.experts.gate_up_proj".into(),
        dtype: Dtype::F32,
        shape: vec![1],
        bytes: vec![0; 4],
    };
    let per_expert = Stored {
        name: "model.layers.3.feed_forward.experts.0.up_proj.weight".into(),
        dtype: Dtype::F32,
        shape: vec![1],
        bytes: vec![0; 4],
    };
    write_file(&dir.path().join(SINGLE_FILE), &[&fused, &per_expert]);
    let err = Checkpoint::open(dir.path()).expect_err("mixed");
    assert!(matches!(err, ModelError::BadHeader { .. }), "{err:?}");
    assert_message(&err, &[SINGLE_FILE, "gate_up_proj", "up_proj.weight"]);
}

/// `cfg` altered by `edit` (through its JSON form, so it stays a config the parser accepts).
fn edited(edit: impl Fn(&mut serde_json::Value)) -> TextConfig {
    let mut json = config().to_config_json();
    edit(&mut json);
    ModelConfig::from_json_str(&json.to_string(), "edited/config.json").expect("valid config").text
}

fn contradiction(ckpt: &Checkpoint, cfg: &TextConfig, tensor: &str, file: &str, also: &[&str]) {
    let err = ckpt.check_against(cfg).expect_err("contradiction");
    match &err {
        ModelError::ConfigContradictsTensors { name, .. } => assert_eq!(name, tensor),
        other => panic!("expected ConfigContradictsTensors about {tensor}, got {other:?}"),
    }
    let mut needles = vec![tensor, file];
    needles.extend_from_slice(also);
    assert_message(&err, &needles);
    assert!(!err.retryable());
}

#[test]
fn config_contradicting_tensors() {
    let fixture = build(Layout::Fused(Dtype::BF16), "", 3);
    let ckpt = fixture.open();
    let file_of = |name: &str| file_name(&ckpt.tensor_info(name).expect("info").file);
    ckpt.check_against(&fixture.cfg).expect("the true config matches");

    let embed = "model.embed_tokens.weight";
    contradiction(&ckpt, &edited(|c| c["vocab_size"] = 40.into()), embed, &file_of(embed), &["vocab_size", "[40, 8]"]);
    let hidden = edited(|c| {
        c["hidden_size"] = 16.into();
    });
    contradiction(&ckpt, &hidden, embed, &file_of(embed), &["hidden_size"]);
    let gate_up = "model.layers.1.feed_forward.experts.gate_up_proj";
    let fewer_experts = edited(|c| c["num_local_experts"] = 16.into());
    // The router of the first MoE layer is checked before its experts.
    let router1 = "model.layers.1.feed_forward.router.weight";
    contradiction(&ckpt, &fewer_experts, router1, &file_of(router1), &["num_local_experts"]);
    assert!(ckpt.tensor_info(gate_up).is_ok());
    let heads = edited(|c| c["head_dim"] = 2.into());
    let q0 = "model.layers.0.self_attn.q_proj.weight";
    contradiction(&ckpt, &heads, q0, &file_of(q0), &["head_dim"]);
    // Layer 0 is dense in the checkpoint: a config calling it MoE finds no router (named with the index file).
    let moe0 = edited(|c| c["moe_layers"] = serde_json::json!([0, 1, 2, 3, 4, 5, 6]));
    contradiction(&ckpt, &moe0, "model.layers.0.feed_forward.router.weight", INDEX_FILE, &["moe_layers"]);
    // Layer 6 is MoE in the checkpoint: a config calling it dense contradicts its router.
    let dense6 = edited(|c| c["moe_layers"] = serde_json::json!([1, 2, 3, 4, 5]));
    let router6 = "model.layers.6.feed_forward.router.weight";
    contradiction(&ckpt, &dense6, router6, &file_of(router6), &["dense"]);
    // A config with fewer layers than the checkpoint.
    let seven = edited(|c| {
        c["num_hidden_layers"] = 7.into();
        let obj = c.as_object_mut().expect("object");
        obj.remove("no_rope_layers");
        obj.remove("layer_types");
    });
    let extra = ckpt.tensor_names().into_iter().find(|n| n.starts_with("model.layers.7.")).expect("layer 7");
    contradiction(&ckpt, &seven, extra, &file_of(extra), &["num_hidden_layers"]);
    let mlp = edited(|c| c["intermediate_size_mlp"] = 12.into());
    let gate0 = "model.layers.0.feed_forward.gate_proj.weight";
    contradiction(&ckpt, &mlp, gate0, &file_of(gate0), &["intermediate_size_mlp"]);

    // Per-expert layout: more experts in the checkpoint than the config knows.
    let per_expert = build(Layout::PerExpertFp8, "", 1);
    let ckpt = per_expert.open();
    let cfg = edited(|c| c["num_local_experts"] = 18.into());
    // The routers already disagree (per_expert_count_beyond_config_is_named makes only the experts disagree).
    let err = ckpt.check_against(&cfg).expect_err("contradiction");
    assert!(matches!(err, ModelError::ConfigContradictsTensors { .. }), "{err:?}");
    let router = "model.layers.1.feed_forward.router.weight";
    assert_message(&err, &[router, SINGLE_FILE, "num_local_experts"]);
    // A checkpoint missing lm_head for an untied config.
    let dir = tempfile::tempdir().expect("tempdir");
    let dir2 = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let (stored, _) = model_tensors(&cfg, Layout::PerExpertFp8);
    let kept: Vec<&Stored> = stored.iter().filter(|t| t.name != "lm_head.weight").collect();
    write_file(&dir.path().join(SINGLE_FILE), &kept);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    contradiction(&ckpt, &cfg, "lm_head.weight", SINGLE_FILE, &["missing"]);
    let tied = edited(|c| c["tie_word_embeddings"] = true.into());
    ckpt.check_against(&tied).expect("a tied config needs no lm_head");
    let scale = "model.layers.4.feed_forward.experts.19.down_proj.weight_scale";
    let kept: Vec<&Stored> = stored.iter().filter(|t| t.name != scale).collect();
    write_file(&dir2.path().join(SINGLE_FILE), &kept);
    let ckpt = Checkpoint::open(dir2.path()).expect("open");
    contradiction(&ckpt, &cfg, scale, SINGLE_FILE, &["F8_E4M3"]);
}

#[test]
fn per_expert_count_beyond_config_is_named() {
    // Same routers and shapes, but the checkpoint has 20 experts where the config says 18: only the expert tensors
    // can tell.
    let cfg = edited(|c| c["num_local_experts"] = 18.into());
    let (mut stored, _) = model_tensors(&config(), Layout::PerExpertFp8);
    for t in &mut stored {
        if t.name.ends_with("router.weight") {
            t.shape = vec![18, HIDDEN];
            t.bytes.truncate(18 * HIDDEN * encode(t.dtype, &[0.0]).len());
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(&dir.path().join(SINGLE_FILE), &stored.iter().collect::<Vec<_>>());
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    contradiction(
        &ckpt,
        &cfg,
        "model.layers.1.feed_forward.experts.18.down_proj.weight",
        SINGLE_FILE,
        &["expert 18", "num_local_experts is 18"],
    );
}

#[test]
fn tensor_bytes_from_owned_bytes() {
    let bytes = TensorBytes::from_bytes(&[1, 2, 3]).expect("anonymous mapping");
    assert_eq!(bytes.as_slice(), &[1, 2, 3]);
    let empty = TensorBytes::from_bytes(&[]).expect("empty");
    assert!(empty.is_empty());
    assert_eq!(empty.as_slice(), &[] as &[u8]);
}

#[test]
fn checkpoint_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<TensorBytes>();
}
