//! A GPU attention worker as a context-parallel member: a `ShardHost` served by a `GpuModel` keeps its shards in the
//! device KV arena. Needs a GPU, or the CPU emulation of CUDA (`cuda-emulator/`, which `scripts/test.sh` puts on the
//! loader path); elsewhere it prints why it skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use switchyard_attention_worker::ShardHost;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::{
    DenseDtype, Device, GpuModel, GpuModelOptions, KvBlockPool, KvDtype, Llama4Model, LoadOptions, ModelError,
};
use switchyard_transport::context::{ContextService, PartialAttentionRequest};

/// A GPU worker's member side: a `ShardHost` served by a `GpuModel` (shards in its device arena) answers each
/// request as the CPU's `ShardHost` does, within the paged attention kernel's bounds (`1e-4` of the largest
/// |value|, `1e-4 * (1 + |lse|)`), and a release gives the arena its blocks back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_model_serves_its_shards_as_the_cpu_does() {
    // The path compiled in, or (this binary carried to the GPU machine by gpu-check, run from the repository root
    // there) the working directory's.
    let dir = [Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), PathBuf::from(".")]
        .into_iter()
        .map(|root| root.join("tests/golden/maverick-f32"))
        .find(|dir| dir.join("config.json").is_file())
        .expect("tests/golden/maverick-f32 (run from the repository root)");
    let config = ModelConfig::from_file(dir.join("config.json")).expect("config");
    let checkpoint = Checkpoint::open(&dir).expect("checkpoint");
    let model = Llama4Model::load(&checkpoint, &config, &LoadOptions::default(), &mut |_, _| {}).expect("model");
    let options =
        GpuModelOptions { dense_dtype: DenseDtype::F32, kv_blocks: 64, block_size: 4, kv_dtype: KvDtype::F32 };
    let gpu = match GpuModel::upload(&model, Device::Cuda(0), &options) {
        Ok(gpu) => Arc::new(gpu),
        Err(ModelError::Kernel(reason)) => {
            println!("SKIPPED a GPU model's shards: {reason}");
            return;
        }
        Err(other) => panic!("upload: {other}"),
    };
    let text = config.text;
    let cpu_host = ShardHost::new(text.clone(), KvBlockPool::new(&text, 4, 64).expect("host pool"));
    let arena = GpuModel::kv_pool(&gpu).clone();
    let gpu_host = ShardHost::served_by(gpu, arena.clone());
    let layer = (0..text.num_hidden_layers).find(|&l| !text.is_chunked_attention(l)).expect("a global layer");
    let fill = |n: usize, salt: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * 37 + salt * 11) % 101) as f32 / 50.0 - 1.0).collect()
    };
    for (step, positions) in [(0u64..12), (12..18), (18..19), (19..21)].into_iter().enumerate() {
        let query_positions: Vec<u64> = positions.collect();
        let kv_positions: Vec<u64> = query_positions.iter().copied().filter(|p| (8..20).contains(p)).collect();
        let request = PartialAttentionRequest {
            sequence_id: "aw-0.1".into(),
            owner: "aw-0".into(),
            range_start: 8,
            range_end: 20,
            layer: layer as u32,
            queries: fill(query_positions.len() * text.q_dim(), step),
            keys: fill(kv_positions.len() * text.kv_dim(), step + 1),
            values: fill(kv_positions.len() * text.kv_dim(), step + 2),
            query_positions,
            kv_positions,
        };
        let cpu = cpu_host.attend(request.clone()).await.expect("cpu member");
        let on_gpu = gpu_host.attend(request).await.expect("gpu member");
        let scale = cpu.out.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = cpu.out.iter().zip(&on_gpu.out).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(on_gpu.out.len() == cpu.out.len() && diff <= 1e-4 * scale, "step {step}: outputs differ by {diff}");
        assert_eq!(on_gpu.lse.len(), cpu.lse.len());
        for (g, c) in on_gpu.lse.iter().zip(&cpu.lse) {
            let close = if c.is_finite() { (g - c).abs() <= 1e-4 * (1.0 + c.abs()) } else { g == c };
            assert!(close, "step {step}: lse gpu {g}, cpu {c}");
        }
    }
    let held = arena.in_use();
    assert!(held > 0, "the shard lives in the arena");
    assert_eq!(gpu_host.release("aw-0.1").await.expect("release"), held as u64);
    assert_eq!(arena.in_use(), 0, "released shards give the arena its blocks back");
}
