//! Plans for loads and SLOs, their JSON and Helm values, calibration, and clear errors for bad input.

use std::path::PathBuf;

use switchyard_model::memory::Precision;
use switchyard_planner::search::Pins;
use switchyard_planner::{calibrate, values, HardwareProfile, ModelSpec, PlanError, PlanRequest, Planner, Target};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn maverick() -> ModelSpec {
    ModelSpec::resolve("maverick-fp8").expect("preset")
}

fn h100() -> HardwareProfile {
    HardwareProfile::named("h100-80g").expect("profile")
}

#[test]
fn a_rate_with_slos_is_met_and_the_json_parses_back() {
    let request = PlanRequest {
        target: Target::Rate(20.0),
        slo_tpot_s: Some(0.05),
        slo_ttft_s: Some(2.0),
        ..PlanRequest::default()
    };
    let plan = switchyard_planner::plan(&maverick(), &h100(), request).expect("plan");
    let chosen = &plan.result.chosen;
    assert!(chosen.feasible);
    assert!(chosen.tpot_s <= 0.05 && chosen.ttft_s <= 2.0, "{} {}", chosen.tpot_s, chosen.ttft_s);
    assert!((chosen.requests_per_s - 20.0).abs() < 0.2, "{}", chosen.requests_per_s);
    assert!(plan.result.max_rate_requests_per_s >= 20.0);
    let json = serde_json::to_string(&plan).expect("serialise");
    let back: serde_json::Value = serde_json::from_str(&json).expect("the JSON parses");
    assert_eq!(back["result"]["chosen"]["shape"]["attention_workers"], chosen.shape.attention_workers);
    assert_eq!(back["model"]["kv_bytes_per_token_per_layer"], 4096);
    let roles: Vec<&str> = back["result"]["chosen"]["memory"]
        .as_array()
        .expect("memory list")
        .iter()
        .map(|w| w["role"].as_str().expect("role"))
        .collect();
    assert_eq!(roles, ["attention_worker", "expert_worker"]);
    let table = plan.to_table();
    for needle in ["attention workers", "expert workers", "KV cache", "bottleneck", "TPOT", "TTFT"] {
        assert!(table.contains(needle), "table lacks {needle}:\n{table}");
    }
}

#[test]
fn a_higher_rate_needs_at_least_as_many_gpus() {
    let plan = |rate| {
        let request = PlanRequest { target: Target::Rate(rate), slo_tpot_s: Some(0.1), ..PlanRequest::default() };
        switchyard_planner::plan(&maverick(), &h100(), request).expect("plan").result.chosen.devices
    };
    assert!(plan(200.0) >= plan(5.0));
}

#[test]
fn concurrency_beyond_the_kv_of_one_attention_worker_adds_attention_workers() {
    let request =
        PlanRequest { target: Target::Concurrency(1000), input_len: 8192, output_len: 1024, ..PlanRequest::default() };
    let plan = switchyard_planner::plan(&maverick(), &h100(), request).expect("plan");
    let e = &plan.result.chosen;
    assert!(e.shape.attention_workers > 1);
    assert!(e.kv_sequences_per_attention_worker * e.shape.attention_workers as u64 >= 1000);
}

#[test]
fn the_helm_values_carry_the_shape_and_the_budgets() {
    let plan = switchyard_planner::plan(&maverick(), &h100(), PlanRequest::default()).expect("plan");
    let yaml = values::render(&plan);
    let s = plan.result.chosen.shape;
    for needle in [
        format!("attentionWorker:\n  replicas: {}", s.attention_workers),
        format!("expertWorker:\n  replicas: {}", s.expert_workers),
        format!("  redundantSlots: {}", s.redundant_slots),
        format!("  microBatches: {}", s.micro_batches),
        "  kvMemory: \"".to_string(),
        "  memoryBudget: \"".to_string(),
        "etcd:\n".to_string(),
    ] {
        assert!(yaml.contains(&needle), "values lack {needle:?}:\n{yaml}");
    }
    // The budget an expert worker offers holds exactly its slots (the coordinator divides by the stored slot size).
    let line = yaml.lines().find(|l| l.starts_with("  memoryBudget:")).expect("budget line");
    let mib: u64 =
        line.split('"').nth(1).and_then(|v| v.strip_suffix("MiB")).and_then(|v| v.parse().ok()).expect("MiB");
    let slot = plan.model.stored_routed_expert_bytes_per_layer * plan.model.moe_layers as u64;
    assert_eq!((mib << 20) / slot, s.slots_per_expert_worker as u64);
}

#[test]
fn calibration_replaces_rates_with_the_benchmark_json() {
    let mut cpu = HardwareProfile::named("cpu").expect("profile");
    let kernels = calibrate::apply_file(&mut cpu, &repo_file("docs/bench/kernels.json")).expect("kernels JSON");
    assert_eq!(kernels.benchmark, "kernels");
    assert!((cpu.grouped_stream_bytes_per_s / 1e9 - 31.0).abs() < 0.1, "{}", cpu.grouped_stream_bytes_per_s);
    assert!(
        (cpu.weight_stream_bytes_per_s / cpu.grouped_stream_bytes_per_s - cpu.dense_stream_share_of_read).abs() < 1e-9
    );
    let curve = cpu.fp8_curve.clone().expect("fp8 curve");
    assert_eq!(curve.points.len(), 4);
    // Between measured token counts the curve interpolates; at them it is the geometric mean of the two shapes.
    assert!((curve.at(1.0) / 1e9 - (54.51 * 55.26f64).sqrt()).abs() < 0.1);
    assert!(curve.at(64.0) > curve.at(16.0) && curve.at(64.0) < curve.at(256.0));
    let transport = calibrate::apply_file(&mut cpu, &repo_file("docs/bench/transport.json")).expect("transport JSON");
    assert_eq!(transport.benchmark, "transport");
    assert!(cpu.intra_node.bytes_per_s > 1e9 && cpu.intra_node.bytes_per_s < 5e9, "{:?}", cpu.intra_node);
    assert!(cpu.sources.iter().any(|s| s.contains("calibrated from")));
}

#[test]
fn the_e2e_benchmark_is_a_check_not_a_calibration() {
    let mut cpu = HardwareProfile::named("cpu").expect("profile");
    let err = calibrate::apply_file(&mut cpu, &repo_file("docs/bench/e2e.json")).expect_err("e2e is no calibration");
    assert!(err.to_string().contains("--check-against"), "{err}");
    let model = ModelSpec::resolve("small").expect("preset");
    let request = PlanRequest { input_len: 16, output_len: 16, ..PlanRequest::default() };
    let planner = Planner::new(&model, &cpu, request).expect("planner");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("docs/bench/e2e.json")).expect("read")).expect("json");
    let rows = switchyard_planner::check_against(&planner, &json).expect("rows");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.predicted_tokens_per_s > 0.0 && r.measured_tokens_per_s > 0.0));
    assert!(rows[1].predicted_tokens_per_s > rows[0].predicted_tokens_per_s, "batching raises throughput");
}

#[test]
fn bad_input_gets_an_error_naming_it() {
    let err = |e: PlanError| e.to_string();
    assert!(err(ModelSpec::resolve("llama-70b").expect_err("unknown")).contains("maverick-fp8"));
    assert!(err(HardwareProfile::named("a100").expect_err("unknown")).contains("h100-80g"));
    let model = maverick();
    let hw = h100();
    let planner =
        |request: PlanRequest| Planner::new(&model, &hw, request).map(|_| ()).expect_err("refused").to_string();
    assert!(planner(PlanRequest { target: Target::Rate(-1.0), ..PlanRequest::default() }).contains("--rate"));
    let zero = PlanRequest { target: Target::Concurrency(0), ..PlanRequest::default() };
    assert!(planner(zero).contains("--concurrency"));
    assert!(planner(PlanRequest { output_len: 0, ..PlanRequest::default() }).contains("--output-len"));
    assert!(planner(PlanRequest { slo_tpot_s: Some(0.0), ..PlanRequest::default() }).contains("--slo-tpot"));
    let pins = Pins { micro_batches: Some(3), ..Pins::default() };
    assert!(planner(PlanRequest { pins, ..PlanRequest::default() }).contains("--micro-batches"));
    assert!(planner(PlanRequest { combine: Some(Precision::Fp8), ..PlanRequest::default() }).contains("--combine"));
    // A load no cluster within the limits carries names the constraint.
    let request = PlanRequest { target: Target::Rate(1e6), max_devices: 16, ..PlanRequest::default() };
    let e = switchyard_planner::plan(&model, &hw, request).expect_err("infeasible").to_string();
    assert!(e.contains("no cluster shape meets the request"), "{e}");
    let mut cpu = HardwareProfile::named("cpu").expect("profile");
    let missing = calibrate::apply_file(&mut cpu, &repo_file("docs/bench/no-such.json")).expect_err("missing");
    assert!(missing.to_string().contains("no-such.json"), "{missing}");
}
