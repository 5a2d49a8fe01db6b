//! Shared by the expert worker's test targets: a tiny FP8 checkpoint in a temp dir and reference computations.

#![allow(dead_code)]

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_expert_worker::{ExpertSpec, ExpertWorker, WorkerOptions};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::{ModelConfig, TextConfig};
use switchyard_model::tiny::{write_checkpoint, Preset, TinySpec};
use switchyard_model::{ActivationPrecision, LocalExperts};
use switchyard_transport::ExpertBatch;

/// The tiny preset: 4 layers, MoE layers 1 and 3, 8 experts, hidden 128, FP8 per-expert experts.
pub fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_checkpoint(dir.path(), &TinySpec { preset: Preset::Tiny, seed: 1, fp8: true }, &mut |_, _| {})
        .expect("writing the tiny checkpoint");
    dir
}

pub fn text_config(dir: &Path) -> TextConfig {
    ModelConfig::from_file(dir.join("config.json")).expect("config").text
}

pub fn worker(dir: &Path, spec: &str, epoch: u64) -> ExpertWorker {
    worker_with(dir, spec, epoch, ActivationPrecision::F32)
}

pub fn worker_with(dir: &Path, spec: &str, epoch: u64, precision: ActivationPrecision) -> ExpertWorker {
    let options = WorkerOptions {
        worker_id: "ew-test".to_string(),
        experts: spec.parse::<ExpertSpec>().expect("spec"),
        placement_epoch: epoch,
        activation_precision: precision,
        device: switchyard_model::Device::Cpu,
    };
    ExpertWorker::load(dir, options).expect("loading the worker")
}

/// Every expert of every MoE layer in one [`LocalExperts`], from its own checkpoint handle: the reference.
pub fn all_experts(dir: &Path, precision: ActivationPrecision) -> LocalExperts {
    let text = text_config(dir);
    let checkpoint = Checkpoint::open(dir).expect("checkpoint");
    let mut experts = LocalExperts::new(precision);
    for &layer in &text.moe_layers {
        for e in 0..text.num_local_experts {
            experts.insert(layer, e as u32, checkpoint.expert(layer, e, &text).expect("expert"));
        }
    }
    experts
}

/// `tokens` rows for random experts drawn from `experts`, inputs in [-1, 1).
pub fn batch(seed: u64, layer: u32, experts: &[u32], tokens: usize, hidden: usize, epoch: u64) -> ExpertBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ExpertBatch {
        step_id: seed,
        micro_batch: 0,
        layer,
        placement_epoch: epoch,
        attention_worker: format!("aw-{seed}"),
        experts: (0..tokens).map(|_| experts[rng.random_range(0..experts.len())]).collect(),
        inputs: (0..tokens * hidden).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        hidden,
    }
}

/// Largest |a - b| / max(1, |b|).
pub fn max_relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max)
}
