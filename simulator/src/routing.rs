//! From a placement to where tokens go: flat per-layer replica tables for the step loop, the load-blind
//! round-robin placement of the `static` policy, and its repair after a GPU is lost.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_coordinator::{Placement, WorkerPlacement};

use crate::error::{config_error, SimError};

/// The worker id of expert GPU `g` in placements.
pub(crate) fn gpu_id(g: usize) -> String {
    format!("ew-{g}")
}

/// The GPU index of a worker id made by [`gpu_id`].
pub(crate) fn gpu_index(id: &str) -> Option<usize> {
    id.strip_prefix("ew-")?.parse().ok()
}

/// Where each layer's routed tokens go under one placement, counting live GPUs only. An expert's tokens split evenly
/// over its live replicas, as routers spread them.
#[derive(Debug, Clone)]
pub(crate) struct Routing {
    pub experts: usize,
    /// Per layer: the GPU of each live replica.
    pub gpus: Vec<Vec<u32>>,
    /// Per layer: the expert of each live replica (parallel to `gpus`).
    pub owners: Vec<Vec<u32>>,
    /// `layer * experts + expert`: 1 / live replicas, 0 when none is left.
    pub inv_replicas: Vec<f64>,
    /// (layer, expert) pairs no live GPU holds: steps cannot run while any is left.
    pub missing: usize,
}

impl Routing {
    pub fn new(placement: &Placement, alive: &[bool], layers: usize, experts: usize) -> Self {
        let mut gpus = vec![Vec::new(); layers];
        let mut owners = vec![Vec::new(); layers];
        let mut replicas = vec![0u32; layers * experts];
        for worker in &placement.workers {
            let Some(g) = gpu_index(&worker.worker_id).filter(|&g| alive.get(g).copied().unwrap_or(false)) else {
                continue;
            };
            for (&layer, held) in &worker.experts {
                let layer = layer as usize;
                if layer >= layers {
                    continue;
                }
                for &e in held.iter().filter(|&&e| (e as usize) < experts) {
                    gpus[layer].push(g as u32);
                    owners[layer].push(e);
                    replicas[layer * experts + e as usize] += 1;
                }
            }
        }
        let missing = replicas.iter().filter(|&&r| r == 0).count();
        let inv_replicas = replicas.iter().map(|&r| if r == 0 { 0.0 } else { 1.0 / f64::from(r) }).collect();
        Self { experts, gpus, owners, inv_replicas, missing }
    }

    /// Mean over layers of max/mean expected load per live GPU when `loads[layer * experts + e]` tokens go to
    /// expert `e` (the coordinator's imbalance figure). 1 when there is no load.
    pub fn imbalance(&self, loads: &[f64], alive: &[bool], scratch: &mut Vec<f64>) -> f64 {
        let live = alive.iter().filter(|&&a| a).count().max(1) as f64;
        let mut sum = 0.0;
        for layer in 0..self.gpus.len() {
            scratch.clear();
            scratch.resize(alive.len(), 0.0);
            let base = layer * self.experts;
            for (&g, &e) in self.gpus[layer].iter().zip(&self.owners[layer]) {
                scratch[g as usize] += loads[base + e as usize] * self.inv_replicas[base + e as usize];
            }
            let total: f64 = scratch.iter().sum();
            let max = scratch.iter().copied().fold(0.0, f64::max);
            sum += if total > 0.0 { max / (total / live) } else { 1.0 };
        }
        sum / self.gpus.len().max(1) as f64
    }
}

/// Puts a replica of `expert` on the first GPU from `start` on (cyclically) with a free slot that does not hold it;
/// failing that, moves some other replica from a GPU lacking `expert` into a free slot and takes its place.
fn deal(held: &mut [Vec<u32>], usable: &[bool], slots: usize, expert: u32, start: usize) -> Option<usize> {
    let n = held.len();
    let order = (0..n).map(|i| (start + i) % n).filter(|&g| usable[g]);
    if let Some(g) = order.clone().find(|&g| held[g].len() < slots && !held[g].contains(&expert)) {
        held[g].push(expert);
        return Some(g);
    }
    for v in order.clone().filter(|&v| !held[v].contains(&expert)) {
        for i in 0..held[v].len() {
            let other = held[v][i];
            if let Some(w) = order.clone().find(|&w| held[w].len() < slots && !held[w].contains(&other)) {
                held[w].push(other);
                held[v][i] = expert;
                return Some(v);
            }
        }
    }
    None
}

fn placement_from(held_by_layer: Vec<Vec<Vec<u32>>>, usable: &[bool], epoch: u64) -> Placement {
    let workers = (0..usable.len())
        .filter(|&g| usable[g])
        .map(|g| WorkerPlacement {
            worker_id: gpu_id(g),
            endpoint: String::new(),
            experts: held_by_layer
                .iter()
                .enumerate()
                .map(|(layer, held)| {
                    let mut experts = held[g].clone();
                    experts.sort_unstable();
                    (layer as u32, experts)
                })
                .collect(),
        })
        .collect();
    Placement { epoch, workers }
}

/// The `static` policy's placement: every expert once, then `redundant` more replicas for experts 0, 1, 2, ...
/// (cyclically), each dealt to the next GPU round-robin; the same in every layer. Blind to load.
pub(crate) fn round_robin(
    layers: usize,
    experts: u32,
    gpus: usize,
    slots: usize,
    redundant: usize,
) -> Result<Placement, SimError> {
    let usable = vec![true; gpus];
    let mut held = vec![Vec::with_capacity(slots); gpus];
    let mut cursor = 0;
    for i in 0..experts as usize + redundant {
        let expert = (i % experts as usize) as u32;
        let g = deal(&mut held, &usable, slots, expert, cursor).ok_or_else(|| {
            config_error(
                "redundant_slots",
                format!("round-robin cannot place replica {i} (expert {expert}) on {gpus} GPUs of {slots} slots"),
            )
        })?;
        cursor = g + 1;
    }
    Ok(placement_from(vec![held; layers], &usable, 1))
}

/// The `static` policy after losing GPUs: survivors keep what they hold; every expert left without a replica is
/// dealt round-robin onto a live GPU with a free slot, or else replaces a redundant replica (of an expert with
/// others left). Lost redundant replicas are not restored.
pub(crate) fn repair_round_robin(
    current: &Placement,
    alive: &[bool],
    layers: usize,
    experts: u32,
    slots: usize,
) -> Result<Placement, SimError> {
    let gpus = alive.len();
    let live = alive.iter().filter(|&&a| a).count();
    if live * slots < experts as usize {
        return Err(config_error(
            "slots_per_gpu",
            format!("{live} live GPUs x {slots} slots cannot hold the {experts} experts of a layer once"),
        ));
    }
    let mut by_layer = vec![vec![Vec::new(); gpus]; layers];
    for worker in &current.workers {
        let Some(g) = gpu_index(&worker.worker_id).filter(|&g| g < gpus && alive[g]) else { continue };
        for (&layer, held) in &worker.experts {
            if let Some(layer) = by_layer.get_mut(layer as usize) {
                layer[g] = held.clone();
            }
        }
    }
    for (layer, held) in by_layer.iter_mut().enumerate() {
        let mut count = vec![0usize; experts as usize];
        for &e in held.iter().flatten() {
            count[e as usize] += 1;
        }
        for expert in 0..experts {
            if count[expert as usize] > 0 {
                continue;
            }
            let start = expert as usize % gpus;
            if deal(held, alive, slots, expert, start).is_some() {
                count[expert as usize] += 1;
                continue;
            }
            // Every live slot is taken: give up the first redundant replica found round-robin.
            let evict = (0..gpus)
                .map(|i| (start + i) % gpus)
                .filter(|&g| alive[g])
                .find_map(|g| held[g].iter().position(|&x| count[x as usize] > 1).map(|i| (g, i)));
            let Some((g, i)) = evict else {
                return Err(config_error(
                    "slots_per_gpu",
                    format!(
                        "layer {layer}: the live GPUs cannot hold expert {expert}: every slot holds the only \
                         replica of another expert"
                    ),
                ));
            };
            count[held[g][i] as usize] -= 1;
            held[g][i] = expert;
            count[expert as usize] += 1;
        }
    }
    Ok(placement_from(by_layer, alive, current.epoch + 1))
}

/// Per GPU, the replicas `new` puts on it that it did not hold in `old`: the expert weights it has to load.
pub(crate) fn added_per_gpu(new: &Placement, old: &Placement) -> BTreeMap<usize, usize> {
    let before: BTreeMap<&str, &WorkerPlacement> = old.workers.iter().map(|w| (w.worker_id.as_str(), w)).collect();
    let mut added = BTreeMap::new();
    for worker in &new.workers {
        let Some(g) = gpu_index(&worker.worker_id) else { continue };
        let held = before.get(worker.worker_id.as_str());
        let count: usize = worker
            .experts
            .iter()
            .map(|(layer, experts)| {
                let old: BTreeSet<u32> =
                    held.and_then(|w| w.experts.get(layer)).into_iter().flatten().copied().collect();
                experts.iter().filter(|e| !old.contains(e)).count()
            })
            .sum();
        if count > 0 {
            added.insert(g, count);
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_spreads_replicas_and_repair_restores_coverage() {
        let placement = round_robin(2, 8, 4, 3, 4).expect("places");
        let alive = vec![true; 4];
        let routing = Routing::new(&placement, &alive, 2, 8);
        assert_eq!(routing.missing, 0);
        // Experts 0..4 have two replicas, 4..8 one.
        assert_eq!(&routing.inv_replicas[..8], &[0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]);
        for worker in &placement.workers {
            assert_eq!(worker.experts[&0].len(), 3);
        }
        let alive = vec![true, false, true, true];
        let hurt = Routing::new(&placement, &alive, 2, 8);
        assert!(hurt.missing > 0, "GPU 1 held single replicas");
        let repaired = repair_round_robin(&placement, &alive, 2, 8, 3).expect("repairs");
        assert_eq!(Routing::new(&repaired, &alive, 2, 8).missing, 0);
        assert_eq!(repaired.workers.len(), 3);
        assert!(added_per_gpu(&repaired, &placement).values().sum::<usize>() >= hurt.missing);
    }

    #[test]
    fn imbalance_is_max_over_mean_per_live_gpu() {
        let placement = round_robin(1, 4, 2, 2, 0).expect("places");
        let routing = Routing::new(&placement, &[true, true], 1, 4);
        // GPU 0 holds experts 0 and 2, GPU 1 experts 1 and 3.
        let imbalance = routing.imbalance(&[3.0, 1.0, 1.0, 1.0], &[true, true], &mut Vec::new());
        assert!((imbalance - 4.0 / 3.0).abs() < 1e-12, "{imbalance}");
    }
}
