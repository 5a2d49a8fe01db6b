//! What the leader feeds the solver: worker slots from members' memory, the loads to place for, and the
//! arithmetic on expert sets the apply protocol needs. The placement itself is the solver's ([`crate::solver`]).

use std::collections::BTreeMap;

use super::control::ExpertsByLayer;
use super::ModelShape;
use crate::membership::Member;
use crate::{Placement, PlacementProblem, WorkerSlots};

const GIB: f64 = (1u64 << 30) as f64;

/// A placement problem for `workers` (expert members), or why their memory cannot hold every expert.
///
/// Slots per worker follow from its memory budget, capped at the expert count (a worker never holds two replicas of
/// one expert). Redundant slots that do not fit are dropped with a warning: replication is an optimisation, holding
/// every expert once is the requirement.
pub(crate) fn problem(
    model: &ModelShape,
    workers: &[&Member],
    loads: BTreeMap<u32, Vec<f64>>,
    redundant_slots: usize,
) -> Result<PlacementProblem, String> {
    let experts = model.experts as usize;
    let mut slots = Vec::with_capacity(workers.len());
    for member in workers {
        let node = (!member.node.is_empty()).then(|| member.node.clone());
        let mut worker = WorkerSlots::from_memory(
            member.worker_id.clone(),
            node,
            member.memory_budget_bytes,
            model.bytes_per_expert,
            model.moe_layers.len(),
        )
        .map_err(|e| e.to_string())?;
        worker.slots = worker.slots.min(experts);
        worker.endpoint = member.endpoint.clone();
        slots.push(worker);
    }
    let capacity: usize = slots.iter().map(|w| w.slots).sum();
    if capacity < experts {
        return Err(missing_memory(model, workers.len(), capacity));
    }
    let usable = slots.iter().filter(|w| w.slots > 0).count();
    let fits = (capacity - experts).min(experts * usable.saturating_sub(1));
    if redundant_slots > fits {
        tracing::warn!(
            requested = redundant_slots,
            placed = fits,
            "the expert workers have room for only {fits} of {redundant_slots} redundant replicas per layer"
        );
    }
    Ok(PlacementProblem { experts: model.experts, loads, workers: slots, redundant_slots: redundant_slots.min(fits) })
}

/// The `unplaceable` message: what every expert needs against what the workers' whole slots offer.
fn missing_memory(model: &ModelShape, workers: usize, capacity: usize) -> String {
    let per_replica = model.bytes_per_expert as f64 * model.moe_layers.len() as f64;
    let need = f64::from(model.experts) * per_replica;
    let offer = capacity as f64 * per_replica;
    format!(
        "the experts need {} GiB ({} experts x {} layers x {} bytes); the {workers} expert workers offer {} GiB: {} GiB \
         missing",
        gib(need),
        model.experts,
        model.moe_layers.len(),
        model.bytes_per_expert,
        gib(offer),
        gib(need - offer)
    )
}

/// Bytes in GiB with two decimals, or three significant digits below 0.1 GiB (small test models).
fn gib(bytes: f64) -> String {
    let gib = bytes / GIB;
    if gib >= 0.1 || gib <= 0.0 {
        return format!("{gib:.2}");
    }
    let decimals = (2 - gib.log10().floor() as i32).clamp(2, 12) as usize;
    format!("{gib:.decimals$}")
}

/// Whether `loads` can stand for one MoE layer of `model`: one finite, non-negative value per expert.
pub(crate) fn check_layer_loads(model: &ModelShape, layer: u32, loads: &[f64]) -> Result<(), String> {
    if !model.moe_layers.contains(&layer) {
        return Err(format!("layer {layer} is not an MoE layer (MoE layers: {:?})", model.moe_layers));
    }
    if loads.len() != model.experts as usize {
        return Err(format!("layer {layer} has loads for {} experts, the model has {}", loads.len(), model.experts));
    }
    if let Some((expert, load)) = loads.iter().enumerate().find(|(_, l)| !l.is_finite() || **l < 0.0) {
        return Err(format!("layer {layer} expert {expert} has load {load}: loads must be finite and not negative"));
    }
    Ok(())
}

/// The measured layers that can be used: right shape and some traffic.
pub(crate) fn usable_loads(model: &ModelShape, measured: BTreeMap<u32, Vec<f64>>) -> BTreeMap<u32, Vec<f64>> {
    measured
        .into_iter()
        .filter(|(layer, loads)| check_layer_loads(model, *layer, loads).is_ok() && loads.iter().sum::<f64>() > 0.0)
        .collect()
}

/// Loads for every MoE layer: `given` where it has the layer, uniform elsewhere (spreads experts evenly).
pub(crate) fn fill_loads(model: &ModelShape, given: &BTreeMap<u32, Vec<f64>>) -> BTreeMap<u32, Vec<f64>> {
    model
        .moe_layers
        .iter()
        .map(|&layer| {
            let loads = given.get(&layer).cloned().unwrap_or_else(|| vec![1.0; model.experts as usize]);
            (layer, loads)
        })
        .collect()
}

/// Max over mean worker load under `placement`, averaged over the layers of `loads` with traffic (1: balanced or no
/// traffic).
pub(crate) fn imbalance(placement: &Placement, loads: &BTreeMap<u32, Vec<f64>>) -> f64 {
    let ratios: Vec<f64> = loads
        .iter()
        .filter_map(|(&layer, loads)| {
            let per_worker = placement.worker_loads(layer, loads);
            let total: f64 = per_worker.iter().sum();
            if per_worker.is_empty() || total <= 0.0 {
                return None;
            }
            let max = per_worker.iter().copied().fold(0.0, f64::max);
            Some(max / (total / per_worker.len() as f64))
        })
        .collect();
    if ratios.is_empty() {
        1.0
    } else {
        ratios.iter().sum::<f64>() / ratios.len() as f64
    }
}

/// Experts of `a` that `b` lacks, per layer; layers left empty are left out.
pub(crate) fn difference(a: &ExpertsByLayer, b: &ExpertsByLayer) -> ExpertsByLayer {
    a.iter()
        .filter_map(|(layer, experts)| {
            let other = b.get(layer);
            let only: Vec<u32> = experts.iter().copied().filter(|e| !other.is_some_and(|o| o.contains(e))).collect();
            (!only.is_empty()).then_some((*layer, only))
        })
        .collect()
}

/// Adds `b`'s experts to `a`, keeping each layer sorted and without repeats.
pub(crate) fn union_into(a: &mut ExpertsByLayer, b: &ExpertsByLayer) {
    for (layer, experts) in b {
        let ids = a.entry(*layer).or_default();
        ids.extend(experts.iter().copied());
        ids.sort_unstable();
        ids.dedup();
    }
}

/// Expert replicas in `experts`.
pub(crate) fn count(experts: &ExpertsByLayer) -> usize {
    experts.values().map(Vec::len).sum()
}

/// Whether two placements put the same experts on the same workers at the same endpoints (epochs aside).
pub(crate) fn same_layout(a: &Placement, b: &Placement) -> bool {
    a.workers == b.workers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberRole;

    fn member(id: &str, budget: u64) -> Member {
        Member {
            worker_id: id.into(),
            role: MemberRole::Expert,
            endpoint: format!("http://{id}"),
            node: String::new(),
            device: "cpu".into(),
            memory_budget_bytes: budget,
            checkpoint_hash: "sha256:x".into(),
            kv_dtype: None,
        }
    }

    fn model() -> ModelShape {
        ModelShape { moe_layers: vec![1, 3], experts: 4, bytes_per_expert: 1 << 30 }
    }

    #[test]
    fn too_little_memory_names_the_missing_gib() {
        let (a, b) = (member("a", 3 << 30), member("b", 3 << 30));
        let err = problem(&model(), &[&a, &b], fill_loads(&model(), &BTreeMap::new()), 0).expect_err("too small");
        assert_eq!(
            err,
            "the experts need 8.00 GiB (4 experts x 2 layers x 1073741824 bytes); the 2 expert workers offer 4.00 GiB: \
             4.00 GiB missing"
        );
    }

    #[test]
    fn small_amounts_keep_three_significant_digits() {
        assert_eq!(gib(811_008.0), "0.000755");
        assert_eq!(gib(0.05 * GIB), "0.0500");
        assert_eq!(gib(12.0 * GIB), "12.00");
        assert_eq!(gib(0.0), "0.00");
    }

    #[test]
    fn slots_are_capped_at_the_expert_count_and_redundancy_at_what_fits() {
        let (a, b) = (member("a", 100 << 30), member("b", 2 << 30));
        let problem = problem(&model(), &[&a, &b], fill_loads(&model(), &BTreeMap::new()), 9).expect("fits");
        assert_eq!(problem.workers.iter().map(|w| w.slots).collect::<Vec<_>>(), vec![4, 1]);
        assert_eq!(problem.redundant_slots, 1);
    }

    #[test]
    fn set_arithmetic() {
        let a: ExpertsByLayer = [(1, vec![0, 1, 2]), (3, vec![4])].into();
        let b: ExpertsByLayer = [(1, vec![1])].into();
        assert_eq!(difference(&a, &b), [(1, vec![0, 2]), (3, vec![4])].into());
        let mut c = b.clone();
        union_into(&mut c, &a);
        assert_eq!(c, a);
        assert_eq!(count(&a), 4);
    }
}
