//! [`ExpertWorker`]: the experts one worker holds, the batching executor over them, and the [`ExpertService`] that
//! transports call.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use rayon::prelude::*;
use switchyard_model::checkpoint::{Checkpoint, ExpertWeights};
use switchyard_model::config::{ModelConfig, TextConfig};
use switchyard_model::gpu_experts::UploadedLayer;
pub use switchyard_model::Device;
use switchyard_model::{ActivationPrecision, GpuExperts, LocalExperts, RoutedExperts};
use switchyard_transport::{BoxFuture, ExpertBatch, ExpertService, TransportError};
use tokio::sync::oneshot;

use crate::error::WorkerError;
use crate::executor::{self, Job, JobQueue};
use crate::spec::{check_experts, ExpertSpec, ExpertsByLayer};

/// How to start an [`ExpertWorker`].
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// This worker's id in the placement (`ew-<port>` from the CLI by default).
    pub worker_id: String,
    /// The experts to load at start.
    pub experts: ExpertSpec,
    /// The placement epoch dispatches must carry at start: the epoch window starts as `[placement_epoch,
    /// placement_epoch]` and moves with [`ExpertWorker::load_experts`] and [`ExpertWorker::unload_experts`].
    pub placement_epoch: u64,
    /// How activations meet FP8 expert weights. On a GPU, activations are always quantised per token to FP8.
    pub activation_precision: ActivationPrecision,
    /// Where the experts compute: the CPU kernels, or a CUDA GPU holding every held expert's FP8 weights (the
    /// checkpoint must be FP8).
    pub device: Device,
}

/// What the executor has done since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Dispatched batches answered with outputs.
    pub requests_served: u64,
    /// Token rows computed.
    pub tokens_computed: u64,
    /// Grouped computations run: each covers the batches of one or more requests for one layer.
    pub batches_computed: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub requests_served: AtomicU64,
    pub tokens_computed: AtomicU64,
    pub batches_computed: AtomicU64,
}

/// The experts held, by layer: one [`LocalExperts`] per MoE layer (it groups rows by expert and runs one matmul per
/// expert), and the ids for validation without touching the weights. On a GPU worker every held layer also has a
/// device copy, which is what computes; the host side stays the record of what is held (its FP8 codes are the
/// checkpoint's mapping, so keeping it costs no memory of its own).
#[derive(Default)]
pub(crate) struct Held {
    layers: BTreeMap<usize, LocalExperts>,
    ids: ExpertsByLayer,
    gpu: Option<GpuExperts>,
}

impl Held {
    /// The first expert of `experts` not held for `layer`.
    pub fn first_missing(&self, layer: u32, experts: &[u32]) -> Option<u32> {
        let held = self.ids.get(&(layer as usize));
        experts.iter().copied().find(|e| !held.is_some_and(|h| h.contains(e)))
    }

    /// What computes the experts of `layer`, if any is held.
    pub fn layer(&self, layer: usize) -> Option<&dyn RoutedExperts> {
        let host = self.layers.get(&layer)?;
        Some(match &self.gpu {
            Some(gpu) => gpu,
            None => host,
        })
    }

    fn insert(&mut self, precision: ActivationPrecision, layer: usize, expert: u32, weights: ExpertWeights) {
        self.layers.entry(layer).or_insert_with(|| LocalExperts::new(precision)).insert(layer, expert, weights);
        self.ids.entry(layer).or_default().insert(expert);
    }

    /// The host weights of `layer`'s experts, what its device copy is made from.
    fn weights(&self, layer: usize) -> Vec<(u32, &ExpertWeights)> {
        self.layers.get(&layer).map(|host| host.weights(layer).collect()).unwrap_or_default()
    }

    fn install(&mut self, uploads: GpuUploads) {
        if let Some(gpu) = &mut self.gpu {
            for (layer, uploaded) in uploads {
                gpu.install_layer(layer, uploaded);
            }
        }
    }

    fn weight_bytes(&self) -> u64 {
        self.layers.values().map(|experts| experts.weight_bytes() as u64).sum()
    }
}

/// Device copies of whole layers, ready to install.
type GpuUploads = Vec<(usize, UploadedLayer)>;

/// Copies each layer's experts to the GPU without touching what computes now: callers upload outside the write lock
/// (computing goes on meanwhile), then install.
fn upload_layers<'a>(
    gpu: &GpuExperts,
    layers: impl IntoIterator<Item = (usize, Vec<(u32, &'a ExpertWeights)>)>,
) -> Result<GpuUploads, WorkerError> {
    layers
        .into_iter()
        .map(|(layer, experts)| {
            let uploaded = gpu
                .upload_layer(layer, experts)
                .map_err(|source| WorkerError::Device { layer, source: Box::new(source) })?;
            Ok((layer, uploaded))
        })
        .collect()
}

/// State shared by the worker's callers and its compute thread.
pub(crate) struct Shared {
    pub worker_id: String,
    pub hidden: usize,
    pub queue: JobQueue,
    pub counters: Counters,
    held: RwLock<Held>,
}

impl Shared {
    pub fn read_held(&self) -> RwLockReadGuard<'_, Held> {
        // Writers only swap whole entries in; a panic mid-write cannot leave a half-built map behind.
        self.held.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An expert worker: the routed experts it was given, read from the checkpoint and nothing else, and one batching
/// executor computing every dispatched batch. Share it as `Arc<ExpertWorker>`; dropping the last handle stops the
/// executor (batches still queued are answered `Unavailable`).
pub struct ExpertWorker {
    shared: Arc<Shared>,
    text: TextConfig,
    precision: ActivationPrecision,
    /// The epoch window: dispatches routed with an epoch in `[min_epoch, max_epoch]` are accepted. Both ends only
    /// rise (except through [`ExpertWorker::set_placement_epoch`]), so two lock-free reads suffice for a check.
    min_epoch: AtomicU64,
    max_epoch: AtomicU64,
    checkpoint: Checkpoint,
    model_dir: PathBuf,
    /// Serialises loads and unloads; computing never waits for it.
    control: Mutex<()>,
    executor: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ExpertWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertWorker")
            .field("worker_id", &self.shared.worker_id)
            .field("model_dir", &self.model_dir)
            .field("held", &self.held())
            .finish()
    }
}

impl ExpertWorker {
    /// Opens the checkpoint in `model_dir`, loads exactly the experts of `options.experts` (reading only their
    /// bytes) and starts the batching executor.
    pub fn load(model_dir: &Path, options: WorkerOptions) -> Result<ExpertWorker, WorkerError> {
        let config_path = model_dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)
            .map_err(|source| WorkerError::Config { path: config_path.clone(), source: Box::new(source) })?;
        let text = config.text;
        let wanted = options.experts.resolve(&text)?;
        let checkpoint = Checkpoint::open(model_dir)
            .map_err(|source| WorkerError::Checkpoint { dir: model_dir.to_path_buf(), source: Box::new(source) })?;
        let loaded = read_experts(&checkpoint, &text, &wanted)?;
        // A GPU computes with per-token FP8 activations whatever was asked: say so instead of pretending.
        let precision = match options.device {
            Device::Cpu => options.activation_precision,
            Device::Cuda(_) => ActivationPrecision::Fp8PerToken,
        };
        let mut held = Held::default();
        for (layer, expert, weights) in loaded {
            held.insert(precision, layer, expert, weights);
        }
        if let Device::Cuda(_) = options.device {
            let gpu = GpuExperts::new(options.device).map_err(|source| WorkerError::OpenDevice {
                device: options.device.to_string(),
                source: Box::new(source),
            })?;
            let uploads = upload_layers(&gpu, held.layers.keys().map(|&layer| (layer, held.weights(layer))))?;
            held.gpu = Some(gpu);
            held.install(uploads);
        }
        let shared = Arc::new(Shared {
            worker_id: options.worker_id.clone(),
            hidden: text.hidden_size,
            queue: JobQueue::default(),
            counters: Counters::default(),
            held: RwLock::new(held),
        });
        let executor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("expert-executor".to_string())
                .spawn(move || executor::run(&shared))
                .map_err(WorkerError::Executor)?
        };
        let worker = ExpertWorker {
            shared,
            text,
            precision,
            min_epoch: AtomicU64::new(options.placement_epoch),
            max_epoch: AtomicU64::new(options.placement_epoch),
            checkpoint,
            model_dir: model_dir.to_path_buf(),
            control: Mutex::new(()),
            executor: Mutex::new(Some(executor)),
        };
        tracing::info!(
            worker_id = %options.worker_id,
            model = %model_dir.display(),
            spec = %options.experts,
            experts = wanted.values().map(BTreeSet::len).sum::<usize>(),
            checkpoint_bytes_read = worker.checkpoint.ledger().bytes_read(),
            expert_bytes = worker.expert_bytes(),
            ?precision,
            device = %options.device,
            "experts loaded"
        );
        Ok(worker)
    }

    /// This worker's id in the placement.
    pub fn worker_id(&self) -> &str {
        &self.shared.worker_id
    }

    /// The model's text config.
    pub fn text_config(&self) -> &TextConfig {
        &self.text
    }

    /// The opened checkpoint (its ledger records every byte read).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// How activations meet FP8 expert weights.
    pub fn activation_precision(&self) -> ActivationPrecision {
        self.precision
    }

    /// The newest placement epoch accepted: the upper end of the epoch window.
    pub fn placement_epoch(&self) -> u64 {
        self.max_epoch.load(Ordering::Acquire)
    }

    /// The oldest placement epoch accepted: the lower end of the epoch window.
    pub fn min_placement_epoch(&self) -> u64 {
        self.min_epoch.load(Ordering::Acquire)
    }

    /// The epoch window `(min, max)`: dispatches routed with an epoch in `min..=max` are accepted, others are
    /// refused as stale.
    pub fn epoch_window(&self) -> (u64, u64) {
        (self.min_placement_epoch(), self.placement_epoch())
    }

    /// Sets the epoch window to exactly `[epoch, epoch]` (also lowering it): for a worker driven without a
    /// coordinator, where one epoch is the whole truth.
    pub fn set_placement_epoch(&self, epoch: u64) {
        let _control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        // Two stores, not one step: a dispatch checked between them sees one old end and one new one. Fine for the
        // drivers this is for, which change the epoch while no dispatch of the old one is in flight.
        self.max_epoch.store(epoch, Ordering::Release);
        self.min_epoch.store(epoch, Ordering::Release);
        tracing::info!(worker_id = %self.worker_id(), epoch, "placement epoch set");
    }

    /// The experts held, by layer (layers holding none are absent).
    pub fn held(&self) -> ExpertsByLayer {
        self.shared
            .read_held()
            .ids
            .iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(l, ids)| (*l, ids.clone()))
            .collect()
    }

    /// Bytes of expert weights held (FP8 codes count once, resident or still only mapped).
    pub fn expert_bytes(&self) -> u64 {
        self.shared.read_held().weight_bytes()
    }

    /// What the executor has done since start.
    pub fn counters(&self) -> WorkerCounters {
        let c = &self.shared.counters;
        WorkerCounters {
            requests_served: c.requests_served.load(Ordering::Relaxed),
            tokens_computed: c.tokens_computed.load(Ordering::Relaxed),
            batches_computed: c.batches_computed.load(Ordering::Relaxed),
        }
    }

    /// Holds dispatched batches in the queue instead of computing them, until [`ExpertWorker::resume`]: for draining
    /// a worker, and for tests that build one grouped computation from several batches deterministically.
    pub fn pause(&self) {
        self.shared.queue.pause();
    }

    /// Computes queued batches again (all those queued meanwhile form one grouped computation per layer).
    pub fn resume(&self) {
        self.shared.queue.resume();
    }

    /// Batches waiting for the executor.
    pub fn queued_batches(&self) -> usize {
        self.shared.queue.queued()
    }

    /// Loads more experts while serving: the weights are read without holding any lock computing needs, then
    /// swapped in. Experts already held are skipped. Once they are in, dispatches routed with placement epochs up to
    /// `placement_epoch` are accepted (the window's upper end rises to it; 0 or an older epoch leaves it): the
    /// coordinator loads the experts of a placement before it publishes that placement. Returns the checkpoint bytes
    /// read.
    pub fn load_experts(&self, experts: &ExpertsByLayer, placement_epoch: u64) -> Result<u64, WorkerError> {
        let _control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        check_experts(&self.text, experts).map_err(|reason| WorkerError::InvalidExperts { reason })?;
        let missing: ExpertsByLayer = {
            let held = self.shared.read_held();
            experts
                .iter()
                .map(|(layer, ids)| {
                    let have = held.ids.get(layer);
                    (*layer, ids.iter().copied().filter(|e| !have.is_some_and(|h| h.contains(e))).collect())
                })
                .collect()
        };
        let before = self.checkpoint.ledger().bytes_read();
        let loaded = read_experts(&self.checkpoint, &self.text, &missing)?;
        let count = loaded.len();
        // On a GPU each changed layer is copied whole (what it holds plus what arrives) while computing goes on.
        let uploads = {
            let held = self.shared.read_held();
            match &held.gpu {
                None => GpuUploads::new(),
                Some(gpu) => {
                    let mut layers: BTreeMap<usize, Vec<(u32, &ExpertWeights)>> = BTreeMap::new();
                    for (layer, expert, weights) in &loaded {
                        layers.entry(*layer).or_insert_with(|| held.weights(*layer)).push((*expert, weights));
                    }
                    upload_layers(gpu, layers)?
                }
            }
        };
        {
            let mut held = self.shared.held.write().unwrap_or_else(PoisonError::into_inner);
            for (layer, expert, weights) in loaded {
                held.insert(self.precision, layer, expert, weights);
            }
            held.install(uploads);
        }
        let bytes_read = self.checkpoint.ledger().bytes_read() - before;
        self.max_epoch.fetch_max(placement_epoch, Ordering::AcqRel);
        tracing::info!(
            worker_id = %self.worker_id(),
            experts = count,
            min_epoch = self.min_placement_epoch(),
            max_epoch = self.placement_epoch(),
            checkpoint_bytes_read = bytes_read,
            expert_bytes = self.expert_bytes(),
            "experts loaded"
        );
        Ok(bytes_read)
    }

    /// Stops holding `experts` (those not held are ignored); dispatches to them fail with `ExpertNotHeld` from now
    /// on. Before anything is unloaded, dispatches routed with placement epochs older than `min_epoch` are refused
    /// as stale (the window's lower end rises to it; 0 or an older epoch leaves it), so a router still on the old
    /// placement learns that it must move on instead of seeing a missing expert. The lower end may pass the upper
    /// one: the window is then empty until a load raises it (a worker left out of the newest placement serves no
    /// epoch). Returns the bytes of expert weights freed.
    ///
    /// [`LocalExperts`] cannot drop one expert, so a layer that keeps some experts is rebuilt from the checkpoint
    /// (cheap for FP8 experts, whose codes stay in the mapping) outside any lock computing needs, then swapped in.
    pub fn unload_experts(&self, experts: &ExpertsByLayer, min_epoch: u64) -> Result<u64, WorkerError> {
        let _control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        check_experts(&self.text, experts).map_err(|reason| WorkerError::InvalidExperts { reason })?;
        let before_min = self.min_epoch.fetch_max(min_epoch, Ordering::AcqRel);
        if min_epoch > before_min {
            tracing::info!(
                worker_id = %self.worker_id(),
                min_epoch,
                max_epoch = self.placement_epoch(),
                "refusing dispatches of older placement epochs"
            );
        }
        let kept: ExpertsByLayer = {
            let held = self.shared.read_held();
            experts
                .iter()
                .filter_map(|(layer, drop)| {
                    let have = held.ids.get(layer)?;
                    have.iter().any(|e| drop.contains(e)).then(|| (*layer, have.difference(drop).copied().collect()))
                })
                .collect()
        };
        if kept.is_empty() {
            return Ok(0);
        }
        let before = self.expert_bytes();
        let mut rebuilt: BTreeMap<usize, Held> = BTreeMap::new();
        for (layer, expert, weights) in read_experts(&self.checkpoint, &self.text, &kept)? {
            rebuilt.entry(layer).or_default().insert(self.precision, layer, expert, weights);
        }
        let uploads = match &self.shared.read_held().gpu {
            None => GpuUploads::new(),
            Some(gpu) => upload_layers(gpu, rebuilt.iter().map(|(&layer, held)| (layer, held.weights(layer))))?,
        };
        {
            let mut held = self.shared.held.write().unwrap_or_else(PoisonError::into_inner);
            for layer in kept.keys() {
                held.layers.remove(layer);
                held.ids.remove(layer);
                if let Some(gpu) = &mut held.gpu {
                    gpu.remove_layer(*layer);
                }
                if let Some(mut layer_held) = rebuilt.remove(layer) {
                    if let Some(experts) = layer_held.layers.remove(layer) {
                        held.layers.insert(*layer, experts);
                    }
                    if let Some(ids) = layer_held.ids.remove(layer) {
                        held.ids.insert(*layer, ids);
                    }
                }
            }
            held.install(uploads);
        }
        let after = self.expert_bytes();
        let freed = before.saturating_sub(after);
        tracing::info!(worker_id = %self.worker_id(), bytes_freed = freed, expert_bytes = after, "experts unloaded");
        Ok(freed)
    }

    fn check(&self, batch: &ExpertBatch) -> Result<(), TransportError> {
        let layer = batch.layer as usize;
        if layer >= self.text.num_hidden_layers || !self.text.is_moe_layer(layer) {
            return Err(TransportError::UnknownLayer { layer: batch.layer });
        }
        if batch.hidden != self.text.hidden_size {
            return Err(TransportError::InvalidPayload {
                what: "hidden".to_string(),
                reason: format!("{} but the model's hidden size is {}", batch.hidden, self.text.hidden_size),
            });
        }
        if batch.tokens().checked_mul(batch.hidden) != Some(batch.inputs.len()) {
            return Err(TransportError::InvalidPayload {
                what: "inputs".to_string(),
                reason: format!(
                    "{} values for {} tokens of hidden size {}",
                    batch.inputs.len(),
                    batch.tokens(),
                    batch.hidden
                ),
            });
        }
        let (min, max) = self.epoch_window();
        if batch.placement_epoch < min {
            return Err(TransportError::StaleEpoch { sent: batch.placement_epoch, current: min });
        }
        if batch.placement_epoch > max {
            return Err(TransportError::StaleEpoch { sent: batch.placement_epoch, current: max });
        }
        // Each distinct id once: a batch is many rows over few experts.
        let distinct: BTreeSet<u32> = batch.experts.iter().copied().collect();
        let held = self.shared.read_held();
        match distinct.into_iter().find(|&e| held.first_missing(batch.layer, &[e]).is_some()) {
            Some(expert) => Err(TransportError::ExpertNotHeld { layer: batch.layer, expert }),
            None => Ok(()),
        }
    }
}

impl ExpertService for ExpertWorker {
    fn validate(&self, batch: &ExpertBatch) -> Result<(), TransportError> {
        self.check(batch)
    }

    fn compute(&self, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        // Checked again here: `compute` is public, and a caller that skipped `validate` must not poison a group.
        if let Err(error) = self.check(&batch) {
            return Box::pin(std::future::ready(Err(error)));
        }
        if batch.tokens() == 0 {
            self.shared.counters.requests_served.fetch_add(1, Ordering::Relaxed);
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        // Queued now, not at the first poll: batches submitted together are computed together.
        let (reply, answer) = oneshot::channel();
        self.shared.queue.push(Job { batch, reply }, self.worker_id());
        let worker_id = self.worker_id().to_string();
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                Err(TransportError::Unavailable {
                    peer: worker_id,
                    reason: "the expert executor stopped before answering".to_string(),
                })
            })
        })
    }
}

impl Drop for ExpertWorker {
    fn drop(&mut self) {
        self.shared.queue.stop();
        let handle = self.executor.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// Reads `experts` from the checkpoint, in parallel (fused BF16 experts are decoded and transposed on load).
fn read_experts(
    checkpoint: &Checkpoint,
    text: &TextConfig,
    experts: &ExpertsByLayer,
) -> Result<Vec<(usize, u32, ExpertWeights)>, WorkerError> {
    let wanted: Vec<(usize, u32)> =
        experts.iter().flat_map(|(&layer, ids)| ids.iter().map(move |&e| (layer, e))).collect();
    wanted
        .into_par_iter()
        .map(|(layer, expert)| {
            checkpoint
                .expert(layer, expert as usize, text)
                .map(|weights| (layer, expert, weights))
                .map_err(|source| WorkerError::LoadExpert { layer, expert, source: Box::new(source) })
        })
        .collect()
}
