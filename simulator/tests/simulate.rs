//! The simulator end to end: determinism, request conservation, the solver against static placement under skew,
//! recovery from a lost GPU, and a cluster of thousands of GPUs. Outcomes are simulated quantities, never wall time.

use switchyard_simulator::{
    plot, simulate, simulate_policies, AnchorCosts, Failure, Policy, Reason, SimConfig, SimError,
};

/// Four attention workers and eight expert GPUs (two nodes) serving 32 experts in 4 MoE layers.
fn small() -> SimConfig {
    SimConfig {
        attention_workers: 4,
        expert_gpus: 8,
        gpus_per_node: 4,
        slots_per_gpu: 5,
        redundant_slots: 8,
        experts: 32,
        moe_layers: 4,
        max_batch_tokens: 1024,
        max_seqs: 64,
        kv_tokens: 50_000,
        rate: 20.0,
        input_len: "128-512".parse().expect("lengths"),
        output_len: "16-64".parse().expect("lengths"),
        duration_s: 30.0,
        sample_interval_s: 0.5,
        ..SimConfig::default()
    }
}

fn failure(spec: &str) -> Failure {
    spec.parse().expect("failure spec")
}

#[test]
fn a_seed_determines_the_run() {
    let costs = AnchorCosts::h100_maverick();
    let config = small();
    let first = simulate(&config, Policy::Solver, &costs).expect("runs");
    let again = simulate(&config, Policy::Solver, &costs).expect("runs");
    assert_eq!(first, again);
    assert!(first.requests.completed > 0);
    let other = simulate(&SimConfig { seed: 7, ..config.clone() }, Policy::Solver, &costs).expect("runs");
    assert_ne!(first.requests, other.requests);

    // With failures too (the heatmaps hold NaN for dead GPUs, so compare everything else).
    let config = SimConfig { failures: vec![failure("10"), failure("12:attention:1")], ..config };
    let json = |policy| serde_json::to_string(&simulate(&config, policy, &costs).expect("runs")).expect("json");
    assert_eq!(json(Policy::Static), json(Policy::Static));
    // Every policy sees the same arrivals.
    let reports = simulate_policies(&config, &[Policy::Static, Policy::Solver], &costs).expect("runs");
    assert_eq!(reports[0].requests.arrived, reports[1].requests.arrived);
}

#[test]
fn every_request_completes_fails_is_refused_or_is_in_flight() {
    let costs = AnchorCosts::h100_maverick();
    // Overloaded (rejections), an attention worker lost (failures), and a GPU lost with a recovery timeout shorter
    // than detection (held steps fail).
    let config = SimConfig {
        rate: 200.0,
        max_waiting: 16,
        detect_s: 3.0,
        recovery_timeout_s: 1.0,
        failures: vec![failure("8:attention:0"), failure("15:gpu:2")],
        ..small()
    };
    for policy in [Policy::Static, Policy::SolverOnce, Policy::Solver] {
        let report = simulate(&config, policy, &costs).expect("runs");
        let r = report.requests;
        assert_eq!(r.arrived, r.completed + r.failed + r.rejected + r.in_flight, "{policy}: {r:?}");
        assert!(r.completed > 0 && r.failed > 0 && r.rejected > 0 && r.in_flight > 0, "{policy}: {r:?}");
        let attention = &report.failures[0];
        let gpu = &report.failures[1];
        assert!(attention.failed_requests > 0, "{policy}: {attention:?}");
        assert!(gpu.lost_experts > 0 && gpu.failed_requests > 0, "{policy}: {gpu:?}");
        assert_eq!(r.failed, attention.failed_requests + gpu.failed_requests, "{policy}");
        assert!(report.ttft.count >= r.completed && report.tpot.count <= r.completed, "{policy}");
    }
}

#[test]
fn the_solver_beats_static_placement_under_skew() {
    let costs = AnchorCosts::h100_maverick();
    // Two slots per expert GPU and many tokens in flight: the GPU holding a hot expert is bound by its tokens, not
    // by streaming its weights, so where replicas go decides the expert side's time.
    let config = SimConfig {
        attention_workers: 16,
        expert_gpus: 24,
        gpus_per_node: 8,
        slots_per_gpu: 2,
        redundant_slots: 16,
        moe_layers: 8,
        max_batch_tokens: 2048,
        max_seqs: 256,
        zipf: 1.2,
        rate: 300.0,
        duration_s: 40.0,
        ..small()
    };
    let reports = simulate_policies(&config, &[Policy::Static, Policy::Solver], &costs).expect("runs");
    let (fixed, solved) = (&reports[0], &reports[1]);
    assert!(solved.imbalance.mean < 0.5 * fixed.imbalance.mean, "{:?} vs {:?}", solved.imbalance, fixed.imbalance);
    assert!(
        solved.mean_expert_ms < 0.8 * fixed.mean_expert_ms,
        "{} vs {}",
        solved.mean_expert_ms,
        fixed.mean_expert_ms
    );
    assert!(solved.output_tokens_per_s >= 0.99 * fixed.output_tokens_per_s);
    let p99 = |r: &switchyard_simulator::Report| r.tpot.p99_ms.expect("completed requests");
    assert!(p99(solved) < p99(fixed), "TPOT p99 {} vs {}", p99(solved), p99(fixed));
    // The coordinator's solver placed it; static never called it.
    assert_eq!(fixed.solver_runs, 0);
    assert!(solved.solver_runs >= 1);
}

#[test]
fn rebalancing_follows_drifting_load() {
    let costs = AnchorCosts::h100_maverick();
    // Strong drift and a short rebalance interval: the once-placed solution decays, the rebalanced one does not.
    let config = SimConfig {
        zipf: 1.2,
        drift_swaps: 12,
        drift_interval_s: 2.0,
        rebalance_interval_s: 5.0,
        rebalance_threshold: 1.1,
        duration_s: 60.0,
        ..small()
    };
    let reports = simulate_policies(&config, &[Policy::SolverOnce, Policy::Solver], &costs).expect("runs");
    let (once, rebalanced) = (&reports[0], &reports[1]);
    let rebalances = rebalanced.placements.iter().filter(|p| p.reason == Reason::Rebalance).count();
    assert!(rebalances >= 2, "{:?}", rebalanced.placements);
    assert!(rebalanced.moved_gb() > 0.0);
    for change in rebalanced.placements.iter().filter(|p| p.reason == Reason::Rebalance) {
        let before = change.imbalance_before.expect("a rebalance replaces a placement");
        assert!(change.imbalance_after < before, "{change:?}");
        assert!(change.ready_s >= change.decided_s);
    }
    let late = |r: &switchyard_simulator::Report| {
        let tail: Vec<f64> = r.series.iter().filter(|p| p.t_s > 30.0).filter_map(|p| p.imbalance).collect();
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    assert!(late(rebalanced) < late(once), "{} vs {}", late(rebalanced), late(once));
}

#[test]
fn a_lost_gpu_is_re_placed_and_throughput_returns() {
    let costs = AnchorCosts::h100_maverick();
    let config = SimConfig { duration_s: 60.0, detect_s: 2.0, failures: vec![failure("25:gpu:3")], ..small() };
    for policy in [Policy::Static, Policy::Solver] {
        let report = simulate(&config, policy, &costs).expect("runs");
        let lost = &report.failures[0];
        assert!(lost.lost_experts > 0, "{policy}: GPU 3 held the only replica of some expert: {lost:?}");
        let recovered = lost.recovered_s.expect("re-placed");
        // Detection, the solve and the weight loads; steps held meanwhile, nothing failed.
        assert!((27.0..28.0).contains(&recovered), "{policy}: {recovered}");
        assert!(report.stalled_s >= 2.0 && report.stalled_s < 3.0, "{policy}: {}", report.stalled_s);
        assert_eq!(lost.failed_requests, 0);
        assert!(report.placements.iter().any(|p| p.reason == Reason::Recovery && p.added_replicas > 0));
        let stalled: Vec<_> = report.series.iter().filter(|p| p.t_s > 25.5 && p.t_s <= 27.0).collect();
        assert!(stalled.iter().all(|p| p.output_tokens_per_s == 0.0), "{policy}: tokens while held");
        let before = report.throughput_between(10.0, 25.0).expect("points");
        let after = report.throughput_between(recovered + 10.0, 60.0).expect("points");
        assert!(after > 0.8 * before, "{policy}: {after:.0} tokens/s after vs {before:.0} before");
        assert!(report.heat.gpu_load.last().expect("points")[3].is_nan(), "dead GPU drawn as dead");
    }
}

#[test]
fn losing_more_than_the_slots_can_hold_is_reported_not_fatal() {
    let costs = AnchorCosts::h100_maverick();
    // Node 0 holds 4 of 8 GPUs: 20 slots are left for 32 experts.
    let config = SimConfig { recovery_timeout_s: 5.0, failures: vec![failure("10:node:0")], ..small() };
    for policy in [Policy::Static, Policy::Solver] {
        let report = simulate(&config, policy, &costs).expect("runs");
        assert_eq!(report.failures[0].recovered_s, None);
        assert_eq!(report.notes.len(), 1, "{policy}: {:?}", report.notes);
        assert!(report.notes[0].contains("cannot"), "{}", report.notes[0]);
        assert!(report.failures[0].failed_requests > 0);
        assert!(report.stalled_s > 15.0);
    }
}

#[test]
fn thousands_of_gpus_simulate_quickly() {
    let costs = AnchorCosts::h100_maverick();
    // 1000 attention workers + 2000 expert GPUs (one slot each: 1872 redundant replicas per layer), Maverick's 128
    // experts in 24 MoE layers, for five simulated seconds at 4000 requests/s, losing a node.
    let config = SimConfig {
        attention_workers: 1000,
        expert_gpus: 2000,
        slots_per_gpu: 1,
        redundant_slots: 1872,
        rate: 4000.0,
        input_len: "256-1024".parse().expect("lengths"),
        output_len: "64-256".parse().expect("lengths"),
        duration_s: 5.0,
        detect_s: 0.5,
        sample_interval_s: 0.25,
        failures: vec![failure("1:node:7")],
        ..SimConfig::default()
    };
    let reports = simulate_policies(&config, &[Policy::Static, Policy::Solver], &costs).expect("runs");
    for report in &reports {
        assert!(report.output_tokens > 0 && report.steps > 1000, "{}: {} steps", report.policy, report.steps);
        let r = report.requests;
        assert_eq!(r.arrived, r.completed + r.failed + r.rejected + r.in_flight);
        assert_eq!(report.heat.gpu_load[0].len(), 2000);
    }
    assert!(reports[1].imbalance.mean < reports[0].imbalance.mean);
}

#[test]
fn the_plot_is_an_svg_with_every_panel() {
    let costs = AnchorCosts::h100_maverick();
    let config = SimConfig { failures: vec![failure("10:gpu:1")], duration_s: 20.0, ..small() };
    let reports = simulate_policies(&config, &[Policy::Static, Policy::Solver], &costs).expect("runs");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.svg");
    plot::write_svg(&path, &reports, 0).expect("draws");
    let svg = std::fs::read_to_string(&path).expect("written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    for text in ["output tokens/s", "expert load of MoE layer 0", "static: routed tokens", "solver: routed tokens"] {
        assert!(svg.contains(text), "missing {text:?}");
    }
    let missing = dir.path().join("no/such/dir/sim.svg");
    let err = plot::write_svg(&missing, &reports, 0).expect_err("unwritable");
    assert!(matches!(err, SimError::Plot { .. }), "{err}");
    assert!(plot::write_svg(&path, &[], 0).is_err());
}

#[test]
fn bad_settings_are_refused_with_the_setting_named() {
    let costs = AnchorCosts::h100_maverick();
    let err = simulate(&SimConfig { rate: 0.0, ..small() }, Policy::Solver, &costs).expect_err("refused");
    assert!(err.to_string().starts_with("rate:"), "{err}");
    let err = simulate(&SimConfig { failures: vec![failure("99")], ..small() }, Policy::Static, &costs)
        .expect_err("after the end");
    assert!(err.to_string().contains("after the end"), "{err}");
}
