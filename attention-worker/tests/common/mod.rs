//! Shared fixtures: one tiny FP8 checkpoint per test binary, the single-process reference model, and clusters of real
//! expert workers behind an in-process transport.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use switchyard_attention_worker::{RemoteExperts, RoutingTable};
use switchyard_expert_worker::{to_layer_experts, ExpertWorker, WorkerOptions};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::tiny::{write_checkpoint, Preset, TinySpec};
use switchyard_model::{
    generate, ActivationPrecision, ExpertSelection, Generation, GenerationRequest, Llama4Model, LoadOptions,
    SamplingParams,
};
use switchyard_proto::v1::{ExpertWorkerInfo, Placement};
use switchyard_transport::in_process::InProcessTransport;
use switchyard_transport::{Transport, WireFormat};
use tokio::runtime::Handle;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: ModelConfig,
    /// All experts in this process: the reference.
    pub reference: Llama4Model,
}

/// The tiny checkpoint (written once per test binary) and its reference model.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TinySpec { preset: Preset::Tiny, seed: 1, fp8: true };
        write_checkpoint(dir.path(), &spec, &mut |_, _| {}).expect("write tiny checkpoint");
        let config = ModelConfig::from_file(dir.path().join("config.json")).expect("config");
        let reference = load(dir.path(), &config, ExpertSelection::All);
        Fixture { dir, config, reference }
    })
}

pub fn load(dir: &Path, config: &ModelConfig, experts: ExpertSelection) -> Llama4Model {
    let checkpoint = Checkpoint::open(dir).expect("open checkpoint");
    let options = LoadOptions { experts, activation_precision: ActivationPrecision::F32 };
    Llama4Model::load(&checkpoint, config, &options, &mut |_, _| {}).expect("load model")
}

/// Expert workers holding `specs` (one `--experts` spec each), their placement, and a model without experts that
/// dispatches to them through `transport`.
pub struct Cluster {
    pub workers: Vec<Arc<ExpertWorker>>,
    pub placement: Placement,
    pub remote: Arc<RemoteExperts>,
    pub model: Arc<Llama4Model>,
}

pub fn expert_workers(specs: &[&str]) -> Vec<Arc<ExpertWorker>> {
    let fixture = fixture();
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let options = WorkerOptions {
                worker_id: format!("ew-{i}"),
                experts: spec.parse().expect("expert spec"),
                placement_epoch: 7,
                activation_precision: ActivationPrecision::F32,
                device: switchyard_model::Device::Cpu,
            };
            Arc::new(ExpertWorker::load(fixture.dir.path(), options).expect("load expert worker"))
        })
        .collect()
}

pub fn placement_of(workers: &[Arc<ExpertWorker>]) -> Placement {
    Placement {
        epoch: 7,
        workers: workers
            .iter()
            .map(|w| ExpertWorkerInfo {
                worker_id: w.worker_id().to_string(),
                endpoint: format!("in-process://{}", w.worker_id()),
                experts: to_layer_experts(&w.held()),
            })
            .collect(),
    }
}

pub fn in_process(workers: &[Arc<ExpertWorker>], wire: WireFormat) -> Arc<InProcessTransport> {
    let transport = Arc::new(InProcessTransport::new(wire));
    for w in workers {
        transport.add_worker(w.worker_id(), w.clone());
    }
    transport
}

/// A cluster over `transport` (by default the in-process transport to `workers`).
pub fn cluster_with(workers: Vec<Arc<ExpertWorker>>, transport: Arc<dyn Transport>, runtime: Handle) -> Cluster {
    let fixture = fixture();
    let placement = placement_of(&workers);
    let routing = Arc::new(RoutingTable::new(&placement, &fixture.config.text).expect("routing table"));
    let remote = Arc::new(RemoteExperts::new(routing, transport, runtime, "aw-test"));
    let mut model = load(fixture.dir.path(), &fixture.config, ExpertSelection::None);
    model.set_routed_experts(remote.clone());
    Cluster { workers, placement, remote, model: Arc::new(model) }
}

pub fn cluster(specs: &[&str], runtime: Handle) -> Cluster {
    let workers = expert_workers(specs);
    let transport = in_process(&workers, WireFormat::default());
    cluster_with(workers, transport, runtime)
}

/// A prompt of `len` token ids drawn from `seed` (below the tiny vocabulary).
pub fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let vocab = switchyard_model::tiny::VOCAB_SIZE as u64;
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % vocab) as u32
        })
        .collect()
}

/// Single-sequence generation keeping logits, ignoring EOS.
pub fn solo(model: &Llama4Model, prompt: &[u32], max_new_tokens: usize, sampling: SamplingParams) -> Generation {
    solo_with(model, prompt, max_new_tokens, sampling, &mut |_| {})
}

/// [`solo`], calling `on_token` with each generated token.
pub fn solo_with(
    model: &Llama4Model,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: SamplingParams,
    on_token: &mut dyn FnMut(u32),
) -> Generation {
    let request = GenerationRequest {
        prompt: prompt.to_vec(),
        max_new_tokens,
        sampling,
        stop_tokens: Vec::new(),
        keep_logits: true,
        logprobs: None,
    };
    generate(model, &request, on_token).expect("generate")
}

/// An expert worker served over gRPC on its own runtime, so that shutting the runtime down drops its sockets like a
/// kill. Returns the runtime and the worker's endpoint.
pub fn serve_expert_worker(worker: Arc<ExpertWorker>) -> (tokio::runtime::Runtime, String) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("local address"));
    runtime.spawn(switchyard_expert_worker::serve(worker, listener, std::future::pending()));
    (runtime, endpoint)
}

/// Largest absolute difference between two equally long rows.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "row lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
