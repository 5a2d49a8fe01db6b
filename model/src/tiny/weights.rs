//! The generated checkpoint's tensors: which tensors a preset has, how each one is drawn, how they are cut into
//! shards and written.
//!
//! A "master" weight is a logical f32 matrix drawn from the ChaCha8 stream of (seed, name). Stored tensors round it:
//! BF16 for everything outside the routed experts; for the experts either the fused BF16 `gate_up_proj` /
//! `down_proj` (input-major, built from the per-expert masters) or per-expert FP8 codes with per-row scales. Both
//! expert layouts derive from the same masters, named like the FP8 tensors, so the two checkpoints of a seed hold
//! the same model.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};
use serde_json::json;
use switchyard_kernels::fp8::{f32_to_e4m3, E4M3_MAX};

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

/// How one job's tensor(s) are drawn.
#[derive(Clone, Copy, Debug)]
enum Recipe {
    /// RMSNorm weight, `1 + noise`, BF16 `[len]`.
    Norm { len: usize },
    /// A BF16 matrix `[rows, cols]` of N(0, std^2) values.
    Gaussian { rows: usize, cols: usize, std: f32 },
    /// BF16 `[E, hidden, 2 * intermediate]`: expert e's `[gate^T | up^T]`.
    FusedGateUp { layer: usize },
    /// BF16 `[E, intermediate, hidden]`: expert e's `down^T`.
    FusedDown { layer: usize },
    /// FP8 `[out, in]` codes under the job's name, F32 `[out, 1]` scales under `{name}_scale`.
    Fp8Expert { layer: usize, expert: usize, proj: Proj },
}

/// One unit of generation: one tensor, or an FP8 weight with its scale (kept in the same shard).
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

fn expert_name(layer: usize, expert: usize, proj: Proj) -> String {
    format!(
        "{PREFIX}model.layers.{layer}.feed_forward.experts.{expert}.{}.weight",
        proj.name()
    )
}

/// `[out, in]` of an expert projection (nn.Linear layout).
fn expert_shape(d: &Dims, proj: Proj) -> [usize; 2] {
    match proj {
        Proj::Gate | Proj::Up => [d.intermediate, d.hidden],
        Proj::Down => [d.hidden, d.intermediate],
    }
}

impl Job {
    fn stored(&self, d: &Dims) -> Vec<Stored> {
        let one = |dtype, shape: Vec<usize>| {
            vec![Stored {
                name: self.name.clone(),
                dtype,
                shape,
            }]
        };
        match self.recipe {
            Recipe::Norm { len } => one(Dtype::BF16, vec![len]),
            Recipe::Gaussian { rows, cols, .. } => one(Dtype::BF16, vec![rows, cols]),
            Recipe::FusedGateUp { .. } => one(Dtype::BF16, vec![d.experts, d.hidden, 2 * d.intermediate]),
            Recipe::FusedDown { .. } => one(Dtype::BF16, vec![d.experts, d.intermediate, d.hidden]),
            Recipe::Fp8Expert { proj, .. } => {
                let [out, input] = expert_shape(d, proj);
                vec![
                    Stored {
                        name: self.name.clone(),
                        dtype: Dtype::F8_E4M3,
                        shape: vec![out, input],
                    },
                    Stored {
                        name: format!("{}_scale", self.name),
                        dtype: Dtype::F32,
                        shape: vec![out, 1],
                    },
                ]
            }
        }
    }

    fn bytes(&self, d: &Dims) -> u64 {
        self.stored(d).iter().map(Stored::bytes).sum()
    }

    /// Draws and encodes this job's tensors.
    fn generate(&self, seed: u64, d: &Dims) -> Vec<(String, OwnedTensor)> {
        let data: Vec<Vec<u8>> = match self.recipe {
            Recipe::Norm { .. } | Recipe::Gaussian { .. } => vec![encode(&self.master_values(seed, d), Encoding::Bf16)],
            Recipe::FusedGateUp { layer } => vec![fused_gate_up(seed, d, layer, Encoding::Bf16)],
            Recipe::FusedDown { layer } => vec![fused_down(seed, d, layer, Encoding::Bf16)],
            Recipe::Fp8Expert { proj, .. } => {
                let [_, input] = expert_shape(d, proj);
                let (codes, scales) = quantize_per_row(&self.master_values(seed, d), input);
                vec![codes, scales]
            }
        };
        // `stored` lists exactly the tensors each arm produces, in order.
        self.stored(d)
            .into_iter()
            .zip(data)
            .map(|(s, data)| {
                (
                    s.name,
                    OwnedTensor {
                        dtype: s.dtype,
                        shape: s.shape,
                        data,
                    },
                )
            })
            .collect()
    }

    /// The f32 values of a single-tensor job, in the stored layout.
    fn master_values(&self, seed: u64, d: &Dims) -> Vec<f32> {
        match self.recipe {
            Recipe::Norm { len } => {
                let mut values = gaussian(seed, &self.name, len, NORM_NOISE);
                values.iter_mut().for_each(|v| *v += 1.0);
                values
            }
            Recipe::Gaussian { rows, cols, std } => gaussian(seed, &self.name, rows * cols, std),
            Recipe::FusedGateUp { layer } => to_f32(&fused_gate_up(seed, d, layer, Encoding::F32)),
            Recipe::FusedDown { layer } => to_f32(&fused_down(seed, d, layer, Encoding::F32)),
            Recipe::Fp8Expert { layer, expert, proj } => {
                let [out, input] = expert_shape(d, proj);
                gaussian(seed, &expert_name(layer, expert, proj), out * input, fan_in_std(input))
            }
        }
    }
}

fn fan_in_std(fan_in: usize) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

/// Every job of a checkpoint, in checkpoint order (embedding, layers, final norm, lm_head).
fn jobs(d: &Dims, fp8: bool) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut push = |name: String, recipe| {
        jobs.push(Job {
            name: format!("{PREFIX}{name}"),
            recipe,
        })
    };
    let linear = |out: usize, input: usize| Recipe::Gaussian {
        rows: out,
        cols: input,
        std: fan_in_std(input),
    };
    let (q_dim, kv_dim) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);

    // An embedding row is what a one-hot input selects: fan-in 1, so rows of unit variance keep activations O(1).
    push(
        "model.embed_tokens.weight".into(),
        Recipe::Gaussian {
            rows: d.vocab,
            cols: d.hidden,
            std: 1.0,
        },
    );
    for layer in 0..d.layers {
        let base = format!("model.layers.{layer}");
        push(format!("{base}.input_layernorm.weight"), Recipe::Norm { len: d.hidden });
        push(format!("{base}.self_attn.q_proj.weight"), linear(q_dim, d.hidden));
        push(format!("{base}.self_attn.k_proj.weight"), linear(kv_dim, d.hidden));
        push(format!("{base}.self_attn.v_proj.weight"), linear(kv_dim, d.hidden));
        push(format!("{base}.self_attn.o_proj.weight"), linear(d.hidden, q_dim));
        push(
            format!("{base}.post_attention_layernorm.weight"),
            Recipe::Norm { len: d.hidden },
        );
        let ffn = format!("{base}.feed_forward");
        if d.is_moe(layer) {
            // Random router rows of equal scale spread tokens over all experts.
            push(format!("{ffn}.router.weight"), linear(d.experts, d.hidden));
            push(
                format!("{ffn}.shared_expert.gate_proj.weight"),
                linear(d.intermediate, d.hidden),
            );
            push(
                format!("{ffn}.shared_expert.up_proj.weight"),
                linear(d.intermediate, d.hidden),
            );
            push(
                format!("{ffn}.shared_expert.down_proj.weight"),
                linear(d.hidden, d.intermediate),
            );
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

/// Generates and writes every shard and the index; returns their paths.
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
        let tensors = generate_shard(&shard_jobs, spec.seed, d, &mut |bytes| {
            done += bytes;
            progress(done, total);
        });
        for (name, _) in &tensors {
            weight_map.insert(name.clone(), file_name.clone());
        }
        let path = dir.join(&file_name);
        write_safetensors(&path, tensors)?;
        files.push(path);
    }

    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    files.push(super::write_json(dir, "model.safetensors.index.json", &index)?);
    Ok(files)
}

/// Draws a shard's tensors on the rayon pool while this thread reports progress as each job finishes.
fn generate_shard(jobs: &[&Job], seed: u64, d: &Dims, report: &mut dyn FnMut(u64)) -> Vec<(String, OwnedTensor)> {
    let (done_tx, done_rx) = mpsc::channel::<u64>();
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            jobs.par_iter()
                .map_with(done_tx, |done_tx, job| {
                    let tensors = job.generate(seed, d);
                    // The receiver lives until this scope ends; a failed send only loses a progress tick.
                    let _ = done_tx.send(job.bytes(d));
                    tensors
                })
                .flatten()
                .collect::<Vec<_>>()
        });
        for bytes in done_rx {
            report(bytes);
        }
        match worker.join() {
            Ok(tensors) => tensors,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn write_safetensors(path: &Path, tensors: Vec<(String, OwnedTensor)>) -> Result<(), ModelError> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    // safetensors writes a temporary file and renames it, so a shard under its real name is always complete.
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        source: match e {
            safetensors::SafeTensorError::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        },
    })?;
    // Its temporary file is private (0600); a checkpoint is read by servers that may run as another user.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// A tensor ready to be written.
struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
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

    fn put(self, value: f32, out: &mut [u8]) {
        match self {
            Encoding::Bf16 => out.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
            Encoding::F32 => out.copy_from_slice(&value.to_le_bytes()),
        }
    }
}

fn encode(values: &[f32], encoding: Encoding) -> Vec<u8> {
    let size = encoding.size();
    let mut out = vec![0u8; values.len() * size];
    for (value, slot) in values.iter().zip(out.chunks_exact_mut(size)) {
        encoding.put(*value, slot);
    }
    out
}

fn to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `[E, hidden, 2I]` with `out[e][h][j] = gate_e[j][h]` for `j < I` and `up_e[j - I][h]` after.
fn fused_gate_up(seed: u64, d: &Dims, layer: usize, encoding: Encoding) -> Vec<u8> {
    let (hidden, inter, size) = (d.hidden, d.intermediate, encoding.size());
    let mut out = vec![0u8; d.experts * hidden * 2 * inter * size];
    out.par_chunks_mut(hidden * 2 * inter * size)
        .enumerate()
        .for_each(|(expert, block)| {
            for (proj, column) in [(Proj::Gate, 0), (Proj::Up, inter)] {
                let master = gaussian(
                    seed,
                    &expert_name(layer, expert, proj),
                    inter * hidden,
                    fan_in_std(hidden),
                );
                for (j, row) in master.chunks_exact(hidden).enumerate() {
                    for (h, value) in row.iter().enumerate() {
                        let at = (h * 2 * inter + column + j) * size;
                        encoding.put(*value, &mut block[at..at + size]);
                    }
                }
            }
        });
    out
}

/// `[E, I, hidden]` with `out[e][i][h] = down_e[h][i]`.
fn fused_down(seed: u64, d: &Dims, layer: usize, encoding: Encoding) -> Vec<u8> {
    let (hidden, inter, size) = (d.hidden, d.intermediate, encoding.size());
    let mut out = vec![0u8; d.experts * inter * hidden * size];
    out.par_chunks_mut(inter * hidden * size)
        .enumerate()
        .for_each(|(expert, block)| {
            let master = gaussian(
                seed,
                &expert_name(layer, expert, Proj::Down),
                hidden * inter,
                fan_in_std(inter),
            );
            for (h, row) in master.chunks_exact(inter).enumerate() {
                for (i, value) in row.iter().enumerate() {
                    let at = (i * hidden + h) * size;
                    encoding.put(*value, &mut block[at..at + size]);
                }
            }
        });
    out
}

/// Per-output-channel FP8 as compressed-tensors stores it: `scale = amax|row| / 448`, `code = e4m3(w / scale)`.
/// Returns (codes, little-endian F32 scales).
fn quantize_per_row(values: &[f32], cols: usize) -> (Vec<u8>, Vec<u8>) {
    let mut codes = vec![0u8; values.len()];
    let mut scales = Vec::with_capacity(values.len() / cols * 4);
    for (row, row_codes) in values.chunks_exact(cols).zip(codes.chunks_exact_mut(cols)) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // An all-zero row would give scale 0 and NaN codes; any positive scale encodes zeros exactly.
        let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
        for (code, value) in row_codes.iter_mut().zip(row) {
            *code = f32_to_e4m3(value / scale);
        }
        scales.extend_from_slice(&scale.to_le_bytes());
    }
    (codes, scales)
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
    let shape = job.stored(d).remove(0).shape;
    Ok(MasterTensor {
        shape,
        values: job.master_values(seed, d),
    })
}

/// `len` values N(0, std^2) from the stream of (seed, name).
///
/// Box-Muller on one ChaCha8 `u64` per pair of values, with our own logarithm, sine and cosine built from IEEE
/// basic operations only (never the platform's libm), so a seed gives the same bytes on every machine. The loop is
/// branch-free so that it vectorises: a sampler with rejection or libm calls would dominate writing `small`.
fn gaussian(seed: u64, name: &str, len: usize, std: f32) -> Vec<f32> {
    const BLOCK: usize = 4096;
    let mut rng = ChaCha8Rng::seed_from_u64(stream_key(seed, name));
    let mut out = vec![0.0f32; len.next_multiple_of(2)];
    let mut bits = [0u64; BLOCK];
    for chunk in out.chunks_mut(2 * BLOCK) {
        let bits = &mut bits[..chunk.len() / 2];
        bits.iter_mut().for_each(|b| *b = rng.next_u64());
        for (pair, &b) in chunk.chunks_exact_mut(2).zip(bits.iter()) {
            let (z0, z1) = box_muller(b);
            pair[0] = z0 * std;
            pair[1] = z1 * std;
        }
    }
    out.truncate(len);
    out
}

/// Two independent standard normal values from 64 random bits: 24 bits for the radius, 2 for the quadrant of the
/// angle and 22 for the angle within it.
#[inline(always)]
fn box_muller(bits: u64) -> (f32, f32) {
    use std::f32::consts::FRAC_PI_2;
    // u in (0, 1]: ln(u) is finite, and the radius tops out at sqrt(2 ln 2^24) = 5.77.
    let u = (((bits as u32) >> 8) + 1) as f32 * (1.0 / 16_777_216.0);
    let radius = (-2.0 * ln(u)).sqrt();
    let quadrant = (bits >> 62) as u32;
    let a = (((bits >> 40) & 0x3F_FFFF) as f32 + 0.5) * (FRAC_PI_2 / 4_194_304.0);
    let (sin_a, cos_a) = sin_cos_quarter(a);
    // Rotate (cos a, sin a) by quadrant * 90 degrees.
    let (x, y) = if quadrant & 1 == 1 {
        (sin_a, cos_a)
    } else {
        (cos_a, sin_a)
    };
    let cos = if (quadrant + 1) & 2 != 0 { -x } else { x };
    let sin = if quadrant & 2 != 0 { -y } else { y };
    (radius * cos, radius * sin)
}

/// Natural logarithm of a positive normal f32, to about 1e-7 relative.
#[inline(always)]
fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    // x = m * 2^e with m in [1, 2), then moved to [sqrt(1/2), sqrt(2)) where the series converges fast.
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    let high = m > std::f32::consts::SQRT_2;
    let m = if high { m * 0.5 } else { m };
    let e = ((bits >> 23) as i32 - 127 + i32::from(high)) as f32;
    // ln m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172.
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series = 2.0 + t2 * (2.0 / 3.0 + t2 * (2.0 / 5.0 + t2 * (2.0 / 7.0 + t2 * (2.0 / 9.0))));
    e * std::f32::consts::LN_2 + t * series
}

/// (sin a, cos a) for a in [0, pi/2], Taylor polynomials to about 1e-7.
#[inline(always)]
fn sin_cos_quarter(a: f32) -> (f32, f32) {
    let a2 = a * a;
    let sin = a
        * (1.0
            + a2 * (-1.0 / 6.0
                + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 + a2 * (1.0 / 362_880.0 + a2 * (-1.0 / 39_916_800.0))))));
    let cos = 1.0
        + a2 * (-0.5
            + a2 * (1.0 / 24.0
                + a2 * (-1.0 / 720.0
                    + a2 * (1.0 / 40_320.0 + a2 * (-1.0 / 3_628_800.0 + a2 * (1.0 / 479_001_600.0))))));
    (sin, cos)
}

/// A 64-bit key for the stream of (seed, name): FNV-1a over the name, mixed with the seed by SplitMix64's finaliser.
fn stream_key(seed: u64, name: &str) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut z = seed ^ hash.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_and_sin_cos_match_std() {
        for x in [6e-8f32, 1e-6, 0.001, 0.1, 0.5, 0.707, 0.7072, 0.9, 0.999_999, 1.0] {
            let expected = (x as f64).ln();
            assert!(
                (ln(x) as f64 - expected).abs() <= 2e-7 * expected.abs().max(1.0),
                "ln({x}) = {}",
                ln(x)
            );
        }
        for i in 0..=100 {
            let a = i as f32 / 100.0 * std::f32::consts::FRAC_PI_2;
            let (sin, cos) = sin_cos_quarter(a);
            assert!((sin as f64 - (a as f64).sin()).abs() < 2e-7, "sin({a})");
            assert!((cos as f64 - (a as f64).cos()).abs() < 2e-7, "cos({a})");
        }
    }

    #[test]
    fn box_muller_covers_all_four_quadrants() {
        // u = 2^23 / 2^24 = 1/2 in the radius bits, so the radius is sqrt(2 ln 2).
        let radius_bits = 0x7F_FFFFu64 << 8;
        let radius = (2.0f64 * 2.0f64.ln()).sqrt();
        for quadrant in 0..4u64 {
            let (z0, z1) = box_muller(quadrant << 62 | radius_bits);
            let angle = (quadrant as f64 + 0.5 / 4_194_304.0) * std::f64::consts::FRAC_PI_2;
            assert!(
                (z0 as f64 - radius * angle.cos()).abs() < 1e-6,
                "quadrant {quadrant}: {z0}"
            );
            assert!(
                (z1 as f64 - radius * angle.sin()).abs() < 1e-6,
                "quadrant {quadrant}: {z1}"
            );
        }
    }

    #[test]
    fn gaussian_has_the_requested_moments() {
        let values = gaussian(7, "some.weight", 200_000, 0.5);
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
        // Odd lengths take the first of a pair: the prefix of a longer draw.
        assert_eq!(gaussian(7, "some.weight", 5, 0.5), values[..5]);
    }

    #[test]
    fn streams_differ_by_seed_and_name() {
        let a = gaussian(1, "a.weight", 8, 1.0);
        assert_ne!(a, gaussian(2, "a.weight", 8, 1.0));
        assert_ne!(a, gaussian(1, "b.weight", 8, 1.0));
    }

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
}

#[cfg(test)]
mod zz_timing {
    use super::*;
    #[test]
    #[ignore]
    fn zz_timing() {
        let n = 8 << 20;
        let t = std::time::Instant::now();
        let v = gaussian(1, "x", n, 0.1);
        eprintln!(
            "gaussian {:?} per value {:.2} ns",
            t.elapsed(),
            t.elapsed().as_nanos() as f64 / n as f64
        );
        let t = std::time::Instant::now();
        let (c, _s) = quantize_per_row(&v, 2048);
        eprintln!(
            "quantize {:?} per value {:.2} ns",
            t.elapsed(),
            t.elapsed().as_nanos() as f64 / n as f64
        );
        let t = std::time::Instant::now();
        let b = encode(&v, Encoding::Bf16);
        eprintln!(
            "bf16 {:?} per value {:.2} ns",
            t.elapsed(),
            t.elapsed().as_nanos() as f64 / n as f64
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let t = std::time::Instant::now();
        let mut acc = 0u64;
        for _ in 0..n / 2 {
            acc ^= rng.next_u64();
        }
        eprintln!(
            "chacha u64 {:?} per value {:.2} ns {acc}",
            t.elapsed(),
            t.elapsed().as_nanos() as f64 / n as f64
        );
        let data = vec![1u8; 1 << 30];
        let t = std::time::Instant::now();
        std::fs::write("/tmp/zz_write_test", &data).unwrap();
        eprintln!("write 1GB {:?}", t.elapsed());
        std::fs::remove_file("/tmp/zz_write_test").unwrap();
        eprintln!("{} {}", c.len(), b.len());
    }
}
