//! The generated checkpoint's tensors: which tensors a preset has, how each one is drawn, how they are cut into
//! shards and written.
//!
//! A "master" weight is a logical f32 matrix drawn from the stream of (seed, name). Stored tensors round it: BF16 for
//! everything outside the routed experts; for the experts either the fused BF16 `gate_up_proj` / `down_proj`
//! (input-major, built from the per-expert masters) or per-expert FP8 codes with per-row scales. Both expert layouts
//! derive from the same masters, named like the FP8 tensors, so the two checkpoints of a seed hold the same model.
//!
//! A shard's safetensors header is known before any weight is drawn, so each shard file is laid out first and the
//! workers write every piece at its offset as soon as it is drawn: no shard is ever held in memory, and each worker
//! reuses its buffers (fresh pages cost more than drawing the numbers on these machines).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde_json::json;
use switchyard_kernels::fp8::{f32_to_e4m3, E4M3_MAX};

use super::sampler::gaussian_into;
use super::{Dims, MasterTensor, Preset, TinySpec};
use crate::ModelError;

/// The prefix of every text weight in a `Llama4ForConditionalGeneration` checkpoint.
pub(super) const PREFIX: &str = "language_model.";

/// The most bytes of tensor data a `small` shard holds (a lone larger tensor would get a shard of its own).
const SMALL_SHARD_BYTES: u64 = 1_000_000_000;

/// Standard deviation of the noise around 1 in norm weights.
const NORM_NOISE: f32 = 0.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proj {
    Gate,
    Up,
    Down,
}

impl Proj {
    const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    fn name(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
}

/// How a job's tensor(s) are drawn.
#[derive(Clone, Copy, Debug)]
enum Recipe {
    /// RMSNorm weight, `1 + noise`, BF16 `[len]`.
    Norm { len: usize },
    /// A BF16 matrix `[rows, cols]` of N(0, std^2) values.
    Gaussian { rows: usize, cols: usize, std: f32 },
    /// BF16 `[E, hidden, 2 * intermediate]`: expert e's `[gate^T | up^T]`. Drawn one expert at a time.
    FusedGateUp { layer: usize },
    /// BF16 `[E, intermediate, hidden]`: expert e's `down^T`. Drawn one expert at a time.
    FusedDown { layer: usize },
    /// FP8 `[out, in]` codes under the job's name, F32 `[out, 1]` scales under `{name}_scale`.
    Fp8Expert { layer: usize, expert: usize, proj: Proj },
}

/// One stored tensor, or an FP8 weight with its scale (always in the same shard).
#[derive(Clone, Debug)]
struct Job {
    name: String,
    recipe: Recipe,
}

/// A stored tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl Stored {
    fn bytes(&self) -> u64 {
        let elements: usize = self.shape.iter().product();
        (elements * self.dtype.bitsize() / 8) as u64
    }
}

/// The buffers one worker reuses from piece to piece.
#[derive(Default)]
struct Scratch {
    master: Vec<f32>,
    bytes: Vec<u8>,
    scales: Vec<u8>,
}

/// Receives a drawn piece: (output index within the job, byte offset within that tensor, bytes).
type Sink<'a> = dyn FnMut(usize, usize, &[u8]) -> io::Result<()> + 'a;

fn expert_name(layer: usize, expert: usize, proj: Proj) -> String {
    format!("{PREFIX}model.layers.{layer}.feed_forward.experts.{expert}.{}.weight", proj.name())
}

/// `[out, in]` of an expert projection (nn.Linear layout).
fn expert_shape(d: &Dims, proj: Proj) -> [usize; 2] {
    match proj {
        Proj::Gate | Proj::Up => [d.intermediate, d.hidden],
        Proj::Down => [d.hidden, d.intermediate],
    }
}

fn fan_in_std(fan_in: usize) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

impl Job {
    fn stored(&self, d: &Dims) -> Vec<Stored> {
        let one = |dtype, shape: Vec<usize>| vec![Stored { name: self.name.clone(), dtype, shape }];
        match self.recipe {
            Recipe::Norm { len } => one(Dtype::BF16, vec![len]),
            Recipe::Gaussian { rows, cols, .. } => one(Dtype::BF16, vec![rows, cols]),
            Recipe::FusedGateUp { .. } => one(Dtype::BF16, vec![d.experts, d.hidden, 2 * d.intermediate]),
            Recipe::FusedDown { .. } => one(Dtype::BF16, vec![d.experts, d.intermediate, d.hidden]),
            Recipe::Fp8Expert { proj, .. } => {
                let [out, input] = expert_shape(d, proj);
                vec![
                    Stored { name: self.name.clone(), dtype: Dtype::F8_E4M3, shape: vec![out, input] },
                    Stored { name: format!("{}_scale", self.name), dtype: Dtype::F32, shape: vec![out, 1] },
                ]
            }
        }
    }

    fn bytes(&self, d: &Dims) -> u64 {
        self.stored(d).iter().map(Stored::bytes).sum()
    }

    /// How many pieces are drawn independently: one per expert for the fused tensors, else one.
    fn parts(&self, d: &Dims) -> usize {
        match self.recipe {
            Recipe::FusedGateUp { .. } | Recipe::FusedDown { .. } => d.experts,
            _ => 1,
        }
    }

    /// Draws piece `part` and hands its bytes to `sink`.
    fn draw(&self, part: usize, seed: u64, d: &Dims, scratch: &mut Scratch, sink: &mut Sink<'_>) -> io::Result<()> {
        let Scratch { master, bytes, scales } = scratch;
        match self.recipe {
            Recipe::Norm { .. } | Recipe::Gaussian { .. } => {
                self.master_into(seed, d, master);
                encode_into(master, Encoding::Bf16, bytes);
                sink(0, 0, bytes)
            }
            Recipe::FusedGateUp { layer } => {
                gate_up_block(seed, d, layer, part, Encoding::Bf16, master, bytes);
                sink(0, part * bytes.len(), bytes)
            }
            Recipe::FusedDown { layer } => {
                down_block(seed, d, layer, part, Encoding::Bf16, master, bytes);
                sink(0, part * bytes.len(), bytes)
            }
            Recipe::Fp8Expert { proj, .. } => {
                self.master_into(seed, d, master);
                quantize_per_row(master, expert_shape(d, proj)[1], bytes, scales);
                sink(0, 0, bytes)?;
                sink(1, 0, scales)
            }
        }
    }

    /// The f32 values of the job's (first) tensor, in the stored layout.
    fn master_into(&self, seed: u64, d: &Dims, out: &mut Vec<f32>) {
        match self.recipe {
            Recipe::Norm { len } => {
                gaussian_into(seed, &self.name, len, NORM_NOISE, out);
                out.iter_mut().for_each(|v| *v += 1.0);
            }
            Recipe::Gaussian { rows, cols, std } => gaussian_into(seed, &self.name, rows * cols, std, out),
            Recipe::FusedGateUp { layer } | Recipe::FusedDown { layer } => {
                let fused_gate_up = matches!(self.recipe, Recipe::FusedGateUp { .. });
                let (mut master, mut block) = (Vec::new(), Vec::new());
                let mut all = Vec::new();
                for expert in 0..d.experts {
                    if fused_gate_up {
                        gate_up_block(seed, d, layer, expert, Encoding::F32, &mut master, &mut block);
                    } else {
                        down_block(seed, d, layer, expert, Encoding::F32, &mut master, &mut block);
                    }
                    all.extend_from_slice(&block);
                }
                out.clear();
                out.extend(all.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            Recipe::Fp8Expert { layer, expert, proj } => {
                let [out_features, input] = expert_shape(d, proj);
                gaussian_into(seed, &expert_name(layer, expert, proj), out_features * input, fan_in_std(input), out);
            }
        }
    }
}

/// Every job of a checkpoint, in checkpoint order (embedding, layers, final norm, lm_head).
fn jobs(d: &Dims, fp8: bool) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut push = |name: String, recipe| jobs.push(Job { name: format!("{PREFIX}{name}"), recipe });
    let linear = |out: usize, input: usize| Recipe::Gaussian { rows: out, cols: input, std: fan_in_std(input) };
    let (q_dim, kv_dim) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);

    // An embedding row is what a one-hot input selects: fan-in 1, so rows of unit variance keep activations O(1).
    push("model.embed_tokens.weight".into(), Recipe::Gaussian { rows: d.vocab, cols: d.hidden, std: 1.0 });
    for layer in 0..d.layers {
        let base = format!("model.layers.{layer}");
        push(format!("{base}.input_layernorm.weight"), Recipe::Norm { len: d.hidden });
        push(format!("{base}.self_attn.q_proj.weight"), linear(q_dim, d.hidden));
        push(format!("{base}.self_attn.k_proj.weight"), linear(kv_dim, d.hidden));
        push(format!("{base}.self_attn.v_proj.weight"), linear(kv_dim, d.hidden));
        push(format!("{base}.self_attn.o_proj.weight"), linear(d.hidden, q_dim));
        push(format!("{base}.post_attention_layernorm.weight"), Recipe::Norm { len: d.hidden });
        let ffn = format!("{base}.feed_forward");
        if d.is_moe(layer) {
            // Random router rows of equal scale spread tokens over all experts.
            push(format!("{ffn}.router.weight"), linear(d.experts, d.hidden));
            push(format!("{ffn}.shared_expert.gate_proj.weight"), linear(d.intermediate, d.hidden));
            push(format!("{ffn}.shared_expert.up_proj.weight"), linear(d.intermediate, d.hidden));
            push(format!("{ffn}.shared_expert.down_proj.weight"), linear(d.hidden, d.intermediate));
            if fp8 {
                for expert in 0..d.experts {
                    for proj in Proj::ALL {
                        let name = format!("{ffn}.experts.{expert}.{}.weight", proj.name());
                        push(name, Recipe::Fp8Expert { layer, expert, proj });
                    }
                }
            } else {
                push(format!("{ffn}.experts.gate_up_proj"), Recipe::FusedGateUp { layer });
                push(format!("{ffn}.experts.down_proj"), Recipe::FusedDown { layer });
            }
        } else {
            push(format!("{ffn}.gate_proj.weight"), linear(d.intermediate_mlp, d.hidden));
            push(format!("{ffn}.up_proj.weight"), linear(d.intermediate_mlp, d.hidden));
            push(format!("{ffn}.down_proj.weight"), linear(d.hidden, d.intermediate_mlp));
        }
    }
    push("model.norm.weight".into(), Recipe::Norm { len: d.hidden });
    push("lm_head.weight".into(), linear(d.vocab, d.hidden));
    jobs
}

/// The index's `total_size`: bytes of tensor data in all shards.
pub(super) fn total_tensor_bytes(spec: &TinySpec, d: &Dims) -> u64 {
    jobs(d, spec.fp8).iter().map(|j| j.bytes(d)).sum()
}

/// Cuts the jobs into shards, keeping checkpoint order: `tiny` in two halves (so the loader always meets more than
/// one shard), `small` greedily into shards of at most [`SMALL_SHARD_BYTES`].
fn plan_shards(jobs: &[Job], d: &Dims, preset: Preset) -> Vec<Vec<usize>> {
    let sizes: Vec<u64> = jobs.iter().map(|j| j.bytes(d)).collect();
    let total: u64 = sizes.iter().sum();
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut start = 0u64;
    let mut in_current = 0u64;
    for (index, &size) in sizes.iter().enumerate() {
        let new_shard = match preset {
            // A job goes to the second half once it starts past the middle.
            Preset::Tiny => shards.len() == 1 && start * 2 >= total,
            Preset::Small => in_current > 0 && in_current + size > SMALL_SHARD_BYTES,
        };
        if shards.is_empty() || new_shard {
            shards.push(Vec::new());
            in_current = 0;
        }
        if let Some(shard) = shards.last_mut() {
            shard.push(index);
        }
        start += size;
        in_current += size;
    }
    shards
}

/// Draws and writes every shard and the index; returns their paths.
pub(super) fn write_shards(
    dir: &Path,
    spec: &TinySpec,
    d: &Dims,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>, ModelError> {
    let jobs = jobs(d, spec.fp8);
    let shards = plan_shards(&jobs, d, spec.preset);
    let total: u64 = jobs.iter().map(|j| j.bytes(d)).sum();
    let mut done = 0u64;
    progress(done, total);

    let mut weight_map = BTreeMap::new();
    let mut files = Vec::with_capacity(shards.len() + 1);
    for (number, shard) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{:05}.safetensors", number + 1, shards.len());
        let shard_jobs: Vec<&Job> = shard.iter().map(|&i| &jobs[i]).collect();
        for job in &shard_jobs {
            for stored in job.stored(d) {
                weight_map.insert(stored.name, file_name.clone());
            }
        }
        let path = dir.join(&file_name);
        write_shard(&path, &shard_jobs, spec.seed, d, &mut |bytes| {
            done += bytes;
            progress(done, total);
        })?;
        files.push(path);
    }

    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    files.push(super::write_json(dir, "model.safetensors.index.json", &index)?);
    Ok(files)
}

/// Lays out one shard file, draws its jobs on the rayon pool writing each piece at its offset, and reports the
/// bytes of each piece from this thread. The file appears under its name only once complete.
fn write_shard(path: &Path, jobs: &[&Job], seed: u64, d: &Dims, report: &mut dyn FnMut(u64)) -> Result<(), ModelError> {
    let partial = path.with_extension("safetensors.partial");
    let io_error = |source| ModelError::Io { path: partial.clone(), source };

    // safetensors' own order (descending dtype alignment, then name) keeps every tensor aligned to its element.
    let mut entries: Vec<(usize, usize, Stored)> = Vec::new();
    for (job, j) in jobs.iter().enumerate() {
        entries.extend(j.stored(d).into_iter().enumerate().map(|(output, stored)| (job, output, stored)));
    }
    entries.sort_by(|a, b| b.2.dtype.cmp(&a.2.dtype).then_with(|| a.2.name.cmp(&b.2.name)));
    let mut infos = Vec::with_capacity(entries.len());
    let mut offset = 0usize;
    let mut tensor_offsets: Vec<Vec<usize>> = jobs.iter().map(|j| vec![0; j.stored(d).len()]).collect();
    for (job, output, stored) in &entries {
        let bytes = stored.bytes() as usize;
        tensor_offsets[*job][*output] = offset;
        let info =
            TensorInfo { dtype: stored.dtype, shape: stored.shape.clone(), data_offsets: (offset, offset + bytes) };
        infos.push((stored.name.clone(), info));
        offset += bytes;
    }
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header_error = |reason: String| ModelError::BadHeader { file: partial.clone(), reason };
    let metadata = Metadata::new(Some(format), infos).map_err(|e| header_error(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| header_error(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let data_start = 8 + header.len();

    let mut file = File::create(&partial).map_err(io_error)?;
    file.write_all(&(header.len() as u64).to_le_bytes()).map_err(io_error)?;
    file.write_all(&header).map_err(io_error)?;
    file.set_len((data_start + offset) as u64).map_err(io_error)?;
    let file = Mutex::new(file);

    let units: Vec<(usize, usize)> =
        jobs.iter().enumerate().flat_map(|(job, j)| (0..j.parts(d)).map(move |part| (job, part))).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let write_piece = |job: usize, output: usize, at: usize, bytes: &[u8]| -> io::Result<()> {
        // A poisoned lock means another worker panicked; that panic is re-raised below.
        let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        file.seek(SeekFrom::Start((data_start + tensor_offsets[job][output] + at) as u64))?;
        file.write_all(bytes)
    };

    let (done_tx, done_rx) = mpsc::channel::<u64>();
    let drawn: io::Result<()> = std::thread::scope(|scope| {
        let workers = scope.spawn(move || {
            // One worker per thread pulling units from a shared counter: each keeps its scratch buffers for good.
            let threads = rayon::current_num_threads().clamp(1, units.len().max(1));
            (0..threads).into_par_iter().try_for_each(|_| {
                let mut scratch = Scratch::default();
                while !failed.load(Ordering::Relaxed) {
                    let Some(&(job, part)) = units.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let result = jobs[job].draw(part, seed, d, &mut scratch, &mut |output, at, bytes| {
                        write_piece(job, output, at, bytes)?;
                        // The receiver outlives the workers; a failed send only loses a progress tick.
                        let _ = done_tx.send(bytes.len() as u64);
                        Ok(())
                    });
                    if let Err(e) = result {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(())
            })
        });
        for bytes in done_rx {
            report(bytes);
        }
        match workers.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    drop(file);
    if let Err(e) = drawn {
        // Best effort: the write error is what the caller needs to see.
        let _ = fs::remove_file(&partial);
        return Err(io_error(e));
    }
    fs::rename(&partial, path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}

/// How f32 values become stored bytes (little-endian).
#[derive(Clone, Copy, Debug)]
enum Encoding {
    Bf16,
    F32,
}

impl Encoding {
    fn size(self) -> usize {
        match self {
            Encoding::Bf16 => 2,
            Encoding::F32 => 4,
        }
    }

    #[inline(always)]
    fn put(self, value: f32, out: &mut [u8]) {
        match self {
            Encoding::Bf16 => out.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
            Encoding::F32 => out.copy_from_slice(&value.to_le_bytes()),
        }
    }
}

fn encode_into(values: &[f32], encoding: Encoding, out: &mut Vec<u8>) {
    let size = encoding.size();
    out.clear();
    out.resize(values.len() * size, 0);
    for (value, slot) in values.iter().zip(out.chunks_exact_mut(size)) {
        encoding.put(*value, slot);
    }
}

/// Writes the transpose of the row-major `[rows, cols]` matrix `m` into `out`, whose rows are `out_stride` elements
/// long, starting at column `column`. Tiled, because the strided writes of a plain loop miss the cache every time.
fn put_transposed(
    m: &[f32],
    rows: usize,
    cols: usize,
    encoding: Encoding,
    out: &mut [u8],
    out_stride: usize,
    column: usize,
) {
    const TILE: usize = 32;
    let size = encoding.size();
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                for r in r0..(r0 + TILE).min(rows) {
                    let at = (c * out_stride + column + r) * size;
                    encoding.put(m[r * cols + c], &mut out[at..at + size]);
                }
            }
        }
    }
}

/// Expert `expert`'s `[hidden, 2I]` block of the fused `gate_up_proj`: `gate^T` in columns `..I`, `up^T` after.
fn gate_up_block(
    seed: u64,
    d: &Dims,
    layer: usize,
    expert: usize,
    encoding: Encoding,
    master: &mut Vec<f32>,
    out: &mut Vec<u8>,
) {
    let (hidden, inter) = (d.hidden, d.intermediate);
    out.clear();
    out.resize(hidden * 2 * inter * encoding.size(), 0);
    for (proj, column) in [(Proj::Gate, 0), (Proj::Up, inter)] {
        gaussian_into(seed, &expert_name(layer, expert, proj), inter * hidden, fan_in_std(hidden), master);
        put_transposed(master, inter, hidden, encoding, out, 2 * inter, column);
    }
}

/// Expert `expert`'s `[I, hidden]` block of the fused `down_proj`: `down^T`.
fn down_block(
    seed: u64,
    d: &Dims,
    layer: usize,
    expert: usize,
    encoding: Encoding,
    master: &mut Vec<f32>,
    out: &mut Vec<u8>,
) {
    let (hidden, inter) = (d.hidden, d.intermediate);
    out.clear();
    out.resize(inter * hidden * encoding.size(), 0);
    gaussian_into(seed, &expert_name(layer, expert, Proj::Down), hidden * inter, fan_in_std(inter), master);
    put_transposed(master, hidden, inter, encoding, out, hidden, 0);
}

/// Per-output-channel FP8 as compressed-tensors stores it: `scale = amax|row| / 448`, `code = e4m3(w / scale)`.
/// Fills `codes` and `scales` (little-endian F32).
fn quantize_per_row(values: &[f32], cols: usize, codes: &mut Vec<u8>, scales: &mut Vec<u8>) {
    codes.clear();
    codes.resize(values.len(), 0);
    scales.clear();
    for (row, row_codes) in values.chunks_exact(cols).zip(codes.chunks_exact_mut(cols)) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // An all-zero row would give scale 0 and NaN codes; any positive scale encodes zeros exactly.
        let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
        for (code, value) in row_codes.iter_mut().zip(row) {
            *code = f32_to_e4m3(value / scale);
        }
        scales.extend_from_slice(&scale.to_le_bytes());
    }
}

/// The master values of `name` (see [`super::master_weight`]).
pub(super) fn master_weight(seed: u64, d: &Dims, name: &str) -> Result<MasterTensor, ModelError> {
    let canonical = name.strip_prefix(PREFIX).unwrap_or(name);
    let full = format!("{PREFIX}{canonical}");
    // The per-expert names exist in both layouts; the FP8 job list has them, the BF16 one has everything else.
    let job = jobs(d, true)
        .into_iter()
        .find(|j| matches!(j.recipe, Recipe::Fp8Expert { .. }) && j.name == full)
        .or_else(|| jobs(d, false).into_iter().find(|j| j.name == full));
    let Some(job) = job else {
        return Err(ModelError::InvalidInput {
            what: "tensor name".to_string(),
            reason: format!("{name} is not a weight of the generated checkpoint"),
        });
    };
    let shape = job.stored(d).swap_remove(0).shape;
    let mut values = Vec::new();
    job.master_into(seed, d, &mut values);
    Ok(MasterTensor { shape, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_shards_stay_under_the_limit_and_tiny_has_two() {
        for fp8 in [false, true] {
            let d = Dims::of(Preset::Small);
            let jobs = jobs(&d, fp8);
            let shards = plan_shards(&jobs, &d, Preset::Small);
            assert!(shards.len() > 1);
            for shard in &shards {
                let bytes: u64 = shard.iter().map(|&i| jobs[i].bytes(&d)).sum();
                assert!(bytes <= SMALL_SHARD_BYTES, "fp8 {fp8}: shard of {bytes} bytes");
            }
            let d = Dims::of(Preset::Tiny);
            let jobs = super::jobs(&d, fp8);
            assert_eq!(plan_shards(&jobs, &d, Preset::Tiny).len(), 2);
        }
    }

    #[test]
    fn shards_are_what_the_safetensors_serializer_writes() {
        // Our streamed layout must be byte for byte the library's, so any safetensors reader takes it.
        let d = Dims::of(Preset::Tiny);
        let (fp8_jobs, bf16_jobs) = (jobs(&d, true), jobs(&d, false));
        let layer_1 = |j: &&Job| j.name.contains("layers.1.");
        let fused = |j: &&Job| j.name.ends_with("gate_up_proj") || j.name.ends_with("experts.down_proj");
        let picked: Vec<&Job> =
            fp8_jobs.iter().filter(layer_1).take(12).chain(bf16_jobs.iter().filter(layer_1).filter(fused)).collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("shard.safetensors");
        write_shard(&path, &picked, 3, &d, &mut |_| {}).expect("write shard");
        let ours = fs::read(&path).expect("read shard");

        struct Owned(Stored, Vec<u8>);
        impl safetensors::View for Owned {
            fn dtype(&self) -> Dtype {
                self.0.dtype
            }
            fn shape(&self) -> &[usize] {
                &self.0.shape
            }
            fn data(&self) -> std::borrow::Cow<'_, [u8]> {
                std::borrow::Cow::Borrowed(&self.1)
            }
            fn data_len(&self) -> usize {
                self.1.len()
            }
        }
        let mut tensors = Vec::new();
        for job in &picked {
            let mut outputs: Vec<Vec<u8>> = job.stored(&d).iter().map(|s| vec![0; s.bytes() as usize]).collect();
            for part in 0..job.parts(&d) {
                job.draw(part, 3, &d, &mut Scratch::default(), &mut |output, at, bytes| {
                    outputs[output][at..at + bytes.len()].copy_from_slice(bytes);
                    Ok(())
                })
                .expect("draw");
            }
            for (stored, data) in job.stored(&d).into_iter().zip(outputs) {
                tensors.push((stored.name.clone(), Owned(stored, data)));
            }
        }
        let format = HashMap::from([("format".to_string(), "pt".to_string())]);
        let theirs = safetensors::serialize(tensors, Some(format)).expect("serialize");
        assert!(ours == theirs, "streamed shard differs from safetensors::serialize");
    }
}
