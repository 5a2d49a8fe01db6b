//! Expert placement: which expert worker holds which experts of each MoE layer, at one epoch.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use switchyard_proto::v1;

use crate::CoordinatorError;

/// One expert worker's share of the placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPlacement {
    /// The worker's id (e.g. `ew-0`).
    pub worker_id: String,
    /// Its gRPC endpoint, once known (`http://IP:PORT`).
    #[serde(default)]
    pub endpoint: String,
    /// Experts held per MoE layer (decoder layer index -> expert ids).
    pub experts: BTreeMap<u32, Vec<u32>>,
}

/// The placement of every expert of every MoE layer at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Version of this placement; expert workers refuse dispatches routed with another.
    pub epoch: u64,
    /// Every expert worker and what it holds.
    pub workers: Vec<WorkerPlacement>,
}

impl Placement {
    /// Splits `experts` experts evenly and contiguously over `workers` workers (ids `ew-0`, `ew-1`, ...), the same
    /// split in every layer of `moe_layers`. Worker `i` holds experts `[i*E/N, (i+1)*E/N)`.
    pub fn contiguous(moe_layers: &[u32], experts: u32, workers: usize, epoch: u64) -> Result<Self, CoordinatorError> {
        if workers == 0 {
            return Err(CoordinatorError::Placement { reason: "at least one expert worker is needed".into() });
        }
        if workers as u64 > u64::from(experts) {
            return Err(CoordinatorError::Placement {
                reason: format!("{workers} expert workers for {experts} experts: each worker needs at least one"),
            });
        }
        let workers = (0..workers)
            .map(|i| {
                let start = (i as u64 * u64::from(experts) / workers as u64) as u32;
                let end = ((i as u64 + 1) * u64::from(experts) / workers as u64) as u32;
                WorkerPlacement {
                    worker_id: format!("ew-{i}"),
                    endpoint: String::new(),
                    experts: moe_layers.iter().map(|&l| (l, (start..end).collect())).collect(),
                }
            })
            .collect();
        Ok(Self { epoch, workers })
    }

    /// Checks that every expert of every MoE layer is held by some worker, naming what is missing.
    pub fn check_covers(&self, moe_layers: &[u32], experts: u32) -> Result<(), CoordinatorError> {
        let mut missing = Vec::new();
        for &layer in moe_layers {
            for expert in 0..experts {
                let held = self.workers.iter().any(|w| w.experts.get(&layer).is_some_and(|e| e.contains(&expert)));
                if !held {
                    missing.push(format!("layer {layer} expert {expert}"));
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let shown: Vec<_> = missing.iter().take(8).cloned().collect();
        Err(CoordinatorError::Placement {
            reason: format!(
                "{} experts are held by no worker: {}{}",
                missing.len(),
                shown.join(", "),
                if missing.len() > shown.len() { ", ..." } else { "" }
            ),
        })
    }

    /// Reads a placement written by [`Placement::write`].
    pub fn read(path: &Path) -> Result<Self, CoordinatorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CoordinatorError::PlacementFile { path: path.to_path_buf(), reason: e.to_string() })?;
        serde_json::from_str(&text)
            .map_err(|e| CoordinatorError::PlacementFile { path: path.to_path_buf(), reason: e.to_string() })
    }

    /// Writes the placement as JSON.
    pub fn write(&self, path: &Path) -> Result<(), CoordinatorError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| CoordinatorError::PlacementFile { path: path.to_path_buf(), reason: e.to_string() })?;
        std::fs::write(path, text)
            .map_err(|e| CoordinatorError::PlacementFile { path: path.to_path_buf(), reason: e.to_string() })
    }

    /// Replicas this placement puts on a worker that did not hold them in `previous` (matched by worker id): the
    /// expert weights a change from `previous` to this placement has to move. Dropped replicas move nothing.
    pub fn added_replicas(&self, previous: &Placement) -> usize {
        let before: BTreeMap<&str, &WorkerPlacement> =
            previous.workers.iter().map(|w| (w.worker_id.as_str(), w)).collect();
        self.workers
            .iter()
            .map(|worker| {
                let held = before.get(worker.worker_id.as_str());
                worker
                    .experts
                    .iter()
                    .map(|(layer, experts)| {
                        let old = held.and_then(|w| w.experts.get(layer));
                        experts.iter().filter(|e| !old.is_some_and(|old| old.contains(e))).count()
                    })
                    .sum::<usize>()
            })
            .sum()
    }

    /// Load of each worker in `layer` (in [`Placement::workers`] order) when expert `e` receives `loads[e]` tokens
    /// split evenly over its replicas. Experts beyond `loads` and unplaced experts contribute nothing.
    pub fn worker_loads(&self, layer: u32, loads: &[f64]) -> Vec<f64> {
        let mut replicas = vec![0u32; loads.len()];
        for worker in &self.workers {
            for &e in worker.experts.get(&layer).into_iter().flatten() {
                if let Some(r) = replicas.get_mut(e as usize) {
                    *r += 1;
                }
            }
        }
        self.workers
            .iter()
            .map(|worker| {
                worker
                    .experts
                    .get(&layer)
                    .into_iter()
                    .flatten()
                    .filter_map(|&e| Some(loads.get(e as usize)? / f64::from(*replicas.get(e as usize)?)))
                    .sum()
            })
            .collect()
    }

    /// The placement a coordinator served (the inverse of [`Placement::to_proto`]).
    pub fn from_proto(placement: &v1::Placement) -> Self {
        Self {
            epoch: placement.epoch,
            workers: placement
                .workers
                .iter()
                .map(|w| WorkerPlacement {
                    worker_id: w.worker_id.clone(),
                    endpoint: w.endpoint.clone(),
                    experts: w.experts.iter().map(|l| (l.layer, l.experts.clone())).collect(),
                })
                .collect(),
        }
    }

    /// The wire form served to attention workers.
    pub fn to_proto(&self) -> v1::Placement {
        v1::Placement {
            epoch: self.epoch,
            workers: self
                .workers
                .iter()
                .map(|w| v1::ExpertWorkerInfo {
                    worker_id: w.worker_id.clone(),
                    endpoint: w.endpoint.clone(),
                    experts: w
                        .experts
                        .iter()
                        .map(|(&layer, experts)| v1::LayerExperts { layer, experts: experts.clone() })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_split_covers_every_expert_once() {
        let placement = Placement::contiguous(&[1, 3], 8, 3, 1).expect("placement");
        placement.check_covers(&[1, 3], 8).expect("covers");
        let sizes: Vec<usize> = placement.workers.iter().map(|w| w.experts[&1].len()).collect();
        assert_eq!(sizes, vec![2, 3, 3]);
        assert_eq!(placement.workers[0].experts[&3], vec![0, 1]);
        assert_eq!(placement.workers[2].experts[&1], vec![5, 6, 7]);
    }

    #[test]
    fn impossible_placements_are_refused_with_numbers() {
        let err = Placement::contiguous(&[1], 4, 5, 1).expect_err("too many workers");
        assert!(err.to_string().contains("5 expert workers for 4 experts"), "{err}");
        assert!(Placement::contiguous(&[1], 4, 0, 1).is_err());
        let mut placement = Placement::contiguous(&[1, 3], 4, 2, 1).expect("placement");
        placement.workers[1].experts.remove(&3);
        let err = placement.check_covers(&[1, 3], 4).expect_err("uncovered");
        assert!(err.to_string().contains("layer 3 expert 2"), "{err}");
    }

    #[test]
    fn added_replicas_count_only_new_holdings() {
        let before = Placement::contiguous(&[1, 3], 8, 2, 1).expect("placement");
        assert_eq!(before.added_replicas(&before), 0);
        let mut after = before.clone();
        // Expert 4 also on ew-0 in layer 1 (one move); expert 0 dropped from ew-0 in layer 3 (no move).
        after.workers[0].experts.get_mut(&1).expect("layer 1").push(4);
        after.workers[0].experts.get_mut(&3).expect("layer 3").retain(|&e| e != 0);
        assert_eq!(after.added_replicas(&before), 1);
        // A worker the previous placement did not have moves everything it holds.
        after.workers[1].worker_id = "ew-9".into();
        assert_eq!(after.added_replicas(&before), 9);
    }

    #[test]
    fn worker_loads_split_replicated_experts() {
        let mut placement = Placement::contiguous(&[1], 4, 2, 1).expect("placement");
        placement.workers[1].experts.get_mut(&1).expect("layer 1").push(0);
        // Expert 0 (8 tokens) on both workers: 4 each.
        assert_eq!(placement.worker_loads(1, &[8.0, 1.0, 2.0, 3.0]), vec![5.0, 9.0]);
        assert_eq!(placement.worker_loads(7, &[8.0, 1.0, 2.0, 3.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn proto_round_trip() {
        let placement = Placement::contiguous(&[1, 3], 8, 3, 4).expect("placement");
        assert_eq!(Placement::from_proto(&placement.to_proto()), placement);
    }

    #[test]
    fn placement_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("placement.json");
        let placement = Placement::contiguous(&[1, 3], 8, 2, 7).expect("placement");
        placement.write(&path).expect("write");
        assert_eq!(Placement::read(&path).expect("read"), placement);
        std::fs::write(&path, "{not json").expect("write garbage");
        let err = Placement::read(&path).expect_err("garbage");
        assert!(err.to_string().contains("placement.json"), "{err}");
    }
}
