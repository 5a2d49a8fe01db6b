//! `--emit-values FILE`: the plan as a values file for the Helm chart (`helm/switchyard`), written by hand from a
//! small struct (no YAML crate: serde_yaml is deprecated and the file is flat). Keys and the flags they become are
//! documented in `docs/helm-values.md`.

use std::fmt::Write as _;

use crate::Plan;

/// A quoted YAML string (JSON string syntax is valid YAML).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A byte count the CLI's byte-size parser takes: whole MiB.
fn mib(bytes: u64) -> String {
    format!("{}MiB", bytes >> 20)
}

/// The values file for `plan`: chart defaults for what the plan does not decide, the plan's numbers for the rest.
pub fn render(plan: &Plan) -> String {
    let e = &plan.result.chosen;
    let s = &e.shape;
    let slot_bytes = plan.model.stored_routed_expert_bytes_per_layer * plan.model.moe_layers as u64;
    // Exactly `slots` replicas fit in the budget the coordinator divides (half a slot of slack against rounding).
    let expert_budget = s.slots_per_expert_worker as u64 * slot_bytes + slot_bytes / 2;
    let gpu = !plan.hardware.shared_host;
    let mut y = String::new();
    let w = &mut y;
    // `write!` into a String cannot fail.
    let _ = writeln!(w, "# Helm values for the switchyard chart, written by `switchyard plan`.");
    let _ = writeln!(w, "# model {} on {}; keys and flags: docs/helm-values.md", plan.model.name, plan.hardware.name);
    let _ = writeln!(
        w,
        "image:\n  repository: switchyard\n  tag: {}\n  pullPolicy: IfNotPresent",
        quoted(env!("CARGO_PKG_VERSION"))
    );
    let _ = writeln!(w, "  variant: {}", if gpu { "cuda" } else { "cpu" });
    let _ = writeln!(w, "model:\n  name: {}", quoted(&plan.model.name));
    let _ = writeln!(w, "  # Where the checkpoint directory comes from: pvc, hostPath or initContainer.");
    let _ = writeln!(w, "  source: pvc\n  path: /models/model");
    let _ = writeln!(w, "  pvc:\n    claimName: switchyard-model");
    let _ = writeln!(w, "  hostPath:\n    path: \"\"");
    let _ = writeln!(w, "  initContainer:\n    image: \"\"\n    command: []");
    let _ = writeln!(w, "cluster:\n  name: default");
    let _ = writeln!(w, "coordinator:\n  replicas: 2");
    let _ = writeln!(w, "  redundantSlots: {}", s.redundant_slots);
    let _ = writeln!(w, "  rebalanceThreshold: 1.25\n  rebalanceIntervalMs: 30000\n  leaseTtlMs: 2000");
    let _ = writeln!(w, "etcd:\n  # bundled: a StatefulSet in the release; false: externalEndpoints.");
    let _ = writeln!(w, "  bundled: true\n  replicas: 3\n  externalEndpoints: []");
    let _ = writeln!(w, "attentionWorker:\n  replicas: {}", s.attention_workers);
    let _ = writeln!(w, "  gpus: {}", u32::from(gpu));
    let _ = writeln!(w, "  kvMemory: {}", quoted(&mib(e.kv_budget_bytes)));
    let _ = writeln!(w, "  maxBatch: {}", plan.max_batch);
    let _ = writeln!(w, "  maxBatchTokens: {}", plan.max_batch_tokens);
    let _ = writeln!(w, "  microBatches: {}", s.micro_batches);
    let _ = writeln!(w, "  wire: {}\n  combine: {}", s.dispatch, s.combine);
    let _ = writeln!(w, "  contextParallel: {}", e.context_parallel);
    let _ = writeln!(w, "  grpcPort: 50051\n  http:\n    enabled: true\n    port: 8000");
    let _ = writeln!(w, "expertWorker:\n  replicas: {}", s.expert_workers);
    let _ = writeln!(w, "  gpus: {}", u32::from(gpu));
    let _ = writeln!(w, "  memoryBudget: {}", quoted(&mib(expert_budget)));
    let _ = writeln!(w, "  slotsPerWorker: {}", s.slots_per_expert_worker);
    let _ = writeln!(w, "  fp8Activations: {}", plan.model.fp8_experts);
    let _ = writeln!(w, "  grpcPort: 50052");
    let _ = writeln!(w, "plan:\n  hardware: {}", quoted(&plan.hardware.name));
    let _ = writeln!(w, "  outputTokensPerSecond: {:.1}", e.output_tokens_per_s);
    let _ = writeln!(w, "  tpotMs: {:.2}\n  ttftMs: {:.1}", e.tpot_s * 1e3, e.ttft_s * 1e3);
    let _ = writeln!(w, "  bottleneck: {}", quoted(&e.bottleneck));
    y
}
