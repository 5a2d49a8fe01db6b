//! The published facts the memory model must reproduce (issue 7, item 3), and the DIR path against a real checkpoint.

use switchyard_model::memory::{KvBytes, Precision, WeightBytes};
use switchyard_model::tiny::{write_checkpoint, Preset, TinySpec};
use switchyard_planner::vllm::{self, VllmSettings};
use switchyard_planner::{HardwareProfile, ModelSpec, PlanRequest, Target};

const GIB: f64 = (1u64 << 30) as f64;

fn maverick_fp8() -> ModelSpec {
    ModelSpec::resolve("maverick-fp8").expect("preset")
}

fn hardware(name: &str) -> HardwareProfile {
    HardwareProfile::named(name).expect("profile")
}

#[test]
fn maverick_fp8_weighs_about_400_gb_with_386_5_gb_of_routed_experts() {
    let w = maverick_fp8().stored_weights;
    let total_gb = w.total() as f64 / 1e9;
    assert!((total_gb - 400.0).abs() / 400.0 < 0.05, "total {total_gb:.1} GB");
    let experts_gb = w.routed_experts as f64 / 1e9;
    assert!((experts_gb - 386.5).abs() < 1.0, "routed experts {experts_gb:.2} GB");
    assert!((w.routed_expert_per_layer as f64 / 1e6 - 125.8).abs() < 0.5, "{}", w.routed_expert_per_layer);
    // BF16 doubles the experts; Scout is ~109B parameters.
    let bf16 = ModelSpec::resolve("maverick-bf16").expect("preset").stored_weights;
    assert!((bf16.routed_experts as f64 / w.routed_experts as f64 - 2.0).abs() < 0.01);
    let scout = ModelSpec::resolve("scout-bf16").expect("preset").stored_weights.total() as f64 / 2e9;
    assert!((scout - 108.0).abs() < 3.0, "scout {scout:.1}B parameters");
}

#[test]
fn maverick_fp8_fits_one_8xh100_host() {
    let model = maverick_fp8();
    let h100 = hardware("h100-80g");
    // Every weight fits in 8 GPUs' memory...
    assert!(model.stored_weights.total() < 8 * h100.memory_bytes);
    // ...and the planner's smallest cluster (attention workers plus expert workers) is at most one host.
    let plan = switchyard_planner::plan(&model, &h100, PlanRequest::default()).expect("a plan");
    assert!(plan.result.chosen.devices <= 8, "{} GPUs", plan.result.chosen.devices);
    let s = plan.result.chosen.shape;
    assert!((s.slots_per_expert_worker * s.expert_workers) as usize >= model.config.num_local_experts);
}

#[test]
fn kv_of_a_one_million_token_maverick_sequence_is_49_1_gib_in_bf16() {
    let model = maverick_fp8();
    let bf16 = KvBytes::of(&model.config, Precision::Bf16).sequence(1 << 20) as f64 / GIB;
    assert!((bf16 - 49.1).abs() < 0.05, "{bf16} GiB");
    let fp8 = KvBytes::of(&model.config, Precision::Fp8).sequence(1 << 20) as f64 / GIB;
    assert!((fp8 - 24.6).abs() < 0.05, "{fp8} GiB");
}

#[test]
fn vllm_tp8_context_on_h100_is_within_15_percent_of_430k() {
    let r = vllm::max_context(&maverick_fp8(), &hardware("h100-80g"), &VllmSettings::default());
    let error = r.max_context as f64 / 430_000.0 - 1.0;
    assert!(error.abs() < 0.15, "predicted {} tokens ({:+.1}%): {}", r.max_context, error * 100.0, r.describe());
    // vLLM's own log for this deployment says weights take 48.87 GiB per rank (vLLM issue 16152).
    assert!((r.weights_bytes / GIB - 48.87).abs() < 0.5, "{:.2} GiB", r.weights_bytes / GIB);
}

#[test]
fn vllm_tp8_fits_the_full_1m_context_on_h200() {
    let model = maverick_fp8();
    let r = vllm::max_context(&model, &hardware("h200-141g"), &VllmSettings::default());
    assert_eq!(r.max_context, model.config.max_position_embeddings as u64, "{}", r.describe());
    assert!(r.kv_tokens >= 1 << 20);
}

#[test]
fn the_same_reference_puts_scout_on_8xh200_within_15_percent_of_3_6m() {
    // An independent point of the same post: Scout BF16 at 3.6M tokens on 8xH200 (and "up to 1M" on 8xH100).
    let scout = ModelSpec::resolve("scout-bf16").expect("preset");
    let h200 = vllm::max_context(&scout, &hardware("h200-141g"), &VllmSettings::default());
    let error = h200.max_context as f64 / 3_600_000.0 - 1.0;
    assert!(error.abs() < 0.15, "{:+.1}%: {}", error * 100.0, h200.describe());
    let h100 = vllm::max_context(&scout, &hardware("h100-80g"), &VllmSettings::default());
    assert!(h100.max_context >= 1_000_000, "{}", h100.describe());
}

#[test]
fn switchyard_needs_context_parallelism_for_1m_on_h100_but_not_on_h200() {
    let model = maverick_fp8();
    let request = PlanRequest { context: Some(1 << 20), ..PlanRequest::default() };
    let h100 = switchyard_planner::plan(&model, &hardware("h100-80g"), request.clone()).expect("plan");
    assert_eq!(h100.result.chosen.context_parallel, 2, "49.1 GiB of KV does not fit one H100 attention worker");
    assert!(h100.result.chosen.shape.attention_workers >= 2);
    let h200 = switchyard_planner::plan(&model, &hardware("h200-141g"), request).expect("plan");
    assert_eq!(h200.result.chosen.context_parallel, 1);
}

#[test]
fn a_model_directory_is_sized_from_its_safetensors_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = TinySpec { preset: Preset::Tiny, seed: 7, fp8: true };
    write_checkpoint(dir.path(), &spec, &mut |_, _| {}).expect("tiny checkpoint");
    let from_dir = ModelSpec::resolve(dir.path().to_str().expect("utf-8 path")).expect("model dir");
    let preset = ModelSpec::resolve("tiny").expect("preset");
    assert_eq!(from_dir.config, preset.config);
    assert_eq!(from_dir.stored_precision, preset.stored_precision);
    // The checkpoint's bytes by component are the config's arithmetic, FP8 scales included.
    let computed = WeightBytes::of(&from_dir.config, from_dir.stored_precision);
    let stored = from_dir.stored_weights;
    assert_eq!(stored.routed_experts, computed.routed_experts);
    assert_eq!(stored.routed_expert_per_layer, computed.routed_expert_per_layer);
    assert_eq!(stored.attention, computed.attention);
    assert_eq!(stored.dense_mlp, computed.dense_mlp);
    assert_eq!(stored.shared_experts, computed.shared_experts);
    assert_eq!(stored.embeddings, computed.embeddings);
    assert_eq!(stored.other, 0);
}

#[test]
fn more_expert_workers_shorten_the_expert_side_and_micro_batches_overlap_it() {
    let model = maverick_fp8();
    let h100 = hardware("h100-80g");
    let request = PlanRequest { target: Target::Concurrency(256), expert_skew: 0.0, ..PlanRequest::default() };
    let planner = switchyard_planner::Planner::new(&model, &h100, request).expect("planner");
    let few = planner.evaluate(planner.shape(2, 8, 0, 1).expect("shape"));
    let many = planner.evaluate(planner.shape(2, 32, 0, 1).expect("shape"));
    assert!(many.step.experts_s < few.step.experts_s / 2.0, "{} vs {}", many.step.experts_s, few.step.experts_s);
    assert!(many.tpot_s < few.tpot_s);
    // Ping-pong costs a second pass over the attention worker's weights but hides the expert side.
    let ping_pong = planner.evaluate(planner.shape(2, 8, 0, 2).expect("shape"));
    assert!(ping_pong.step.dense_gemm_s > few.step.dense_gemm_s);
}
