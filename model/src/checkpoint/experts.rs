//! Routed experts: the two checkpoint layouts, normalised to nn.Linear weights, read one expert at a time.
//!
//! - Fused (HF BF16): `model.layers.{L}.feed_forward.experts.gate_up_proj` `[E, hidden, 2*inter]` and
//!   `experts.down_proj` `[E, inter, hidden]`, input-major. Only expert `e`'s slice of the first dimension is read;
//!   it is transposed into f32 nn.Linear layout (gate = columns `..inter`, up = columns `inter..`).
//! - Per expert (compressed-tensors FP8): `model.layers.{L}.feed_forward.experts.{E}.{gate,up,down}_proj.weight`
//!   `F8_E4M3` plus `.weight_scale`, already nn.Linear layout; the codes stay in the mapping.
//!
//! The layout is detected once, at open; a checkpoint mixing both is refused.

use std::collections::HashMap;
use std::ops::Range;

use crate::config::TextConfig;
use crate::error::ModelError;
use crate::linear::LinearWeight;

use super::{check_shape, decode_f32, scale_name, ByteRange, Checkpoint, DType, TensorInfo};

/// How a checkpoint stores its routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertLayout {
    /// `experts.gate_up_proj` `[E, hidden, 2*inter]` and `experts.down_proj` `[E, inter, hidden]` (BF16/F16/F32).
    Fused,
    /// `experts.{e}.{gate,up,down}_proj.weight` (usually F8_E4M3 with `.weight_scale`).
    PerExpert,
}

/// One routed expert's weights, nn.Linear layout: `gate`, `up` `[intermediate, hidden]`, `down` `[hidden,
/// intermediate]`. `out = down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// Gate projection `[intermediate, hidden]`.
    pub gate: LinearWeight,
    /// Up projection `[intermediate, hidden]`.
    pub up: LinearWeight,
    /// Down projection `[hidden, intermediate]`.
    pub down: LinearWeight,
}

/// The prefix of every routed-expert tensor of `layer`.
pub(crate) fn experts_prefix(layer: usize) -> String {
    format!("model.layers.{layer}.feed_forward.experts.")
}

/// Name of a fused expert tensor (`gate_up_proj` or `down_proj`; no `.weight` suffix).
pub(crate) fn fused_name(layer: usize, which: &str) -> String {
    format!("model.layers.{layer}.feed_forward.experts.{which}")
}

/// Name of a per-expert weight (`gate_proj`, `up_proj` or `down_proj`).
pub(crate) fn per_expert_name(layer: usize, expert: usize, which: &str) -> String {
    format!("model.layers.{layer}.feed_forward.experts.{expert}.{which}.weight")
}

/// The layout of `tensors`' routed experts, `None` when there are none.
pub(super) fn detect_layout(tensors: &HashMap<String, TensorInfo>) -> Result<Option<ExpertLayout>, ModelError> {
    let mut fused: Option<&TensorInfo> = None;
    let mut per_expert: Option<&TensorInfo> = None;
    for info in tensors.values() {
        let Some((_, rest)) = info.name.split_once(".feed_forward.experts.") else {
            continue;
        };
        let first = rest.split('.').next().unwrap_or("");
        if first.parse::<usize>().is_ok() {
            per_expert = per_expert.or(Some(info));
        } else {
            fused = fused.or(Some(info));
        }
    }
    match (fused, per_expert) {
        (Some(f), Some(p)) => Err(ModelError::BadHeader {
            file: p.file.clone(),
            reason: format!(
                "the checkpoint mixes fused experts ({} in {}) and per-expert tensors ({})",
                f.name,
                f.file.display(),
                p.name
            ),
        }),
        (Some(_), None) => Ok(Some(ExpertLayout::Fused)),
        (None, Some(_)) => Ok(Some(ExpertLayout::PerExpert)),
        (None, None) => Ok(None),
    }
}

/// The bytes one expert occupies, tensor by tensor, and how to turn them into weights.
enum ExpertPlan<'a> {
    Fused {
        gate_up: &'a TensorInfo,
        gate_up_bytes: Range<usize>,
        down: &'a TensorInfo,
        down_bytes: Range<usize>,
    },
    PerExpert {
        /// (weight name, out_features, in_features) of gate, up, down.
        weights: [(String, usize, usize); 3],
    },
}

impl Checkpoint {
    /// How this checkpoint stores its routed experts (`None`: it has none).
    pub fn expert_layout(&self) -> Option<ExpertLayout> {
        self.expert_layout
    }

    /// Routed expert `expert` of MoE layer `layer`, reading only that expert's bytes.
    pub fn expert(&self, layer: usize, expert: usize, cfg: &TextConfig) -> Result<ExpertWeights, ModelError> {
        match self.expert_plan(layer, expert, cfg)? {
            ExpertPlan::Fused { gate_up, gate_up_bytes, down, down_bytes } => {
                let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
                let gu = decode_f32(gate_up.dtype, self.view(gate_up, gate_up_bytes).as_slice());
                let dn = decode_f32(down.dtype, self.view(down, down_bytes).as_slice());
                // gate_up[e] is [hidden, 2*inter] (x @ W): nn.Linear wants the transpose of each column half.
                let gate = transpose_columns(&gu, hidden, 2 * inter, 0..inter);
                let up = transpose_columns(&gu, hidden, 2 * inter, inter..2 * inter);
                let down_t = transpose_columns(&dn, inter, hidden, 0..hidden);
                let f32_linear =
                    |weight, out_features, in_features| LinearWeight::F32 { weight, out_features, in_features };
                Ok(ExpertWeights {
                    gate: f32_linear(gate, inter, hidden),
                    up: f32_linear(up, inter, hidden),
                    down: f32_linear(down_t, hidden, inter),
                })
            }
            ExpertPlan::PerExpert { weights } => {
                let [(g, go, gi), (u, uo, ui), (d, do_, di)] = &weights;
                Ok(ExpertWeights {
                    gate: self.linear(g, *go, *gi)?,
                    up: self.linear(u, *uo, *ui)?,
                    down: self.linear(d, *do_, *di)?,
                })
            }
        }
    }

    /// The exact byte ranges [`Checkpoint::expert`] reads for this expert, without reading them.
    pub fn expert_ranges(&self, layer: usize, expert: usize, cfg: &TextConfig) -> Result<Vec<ByteRange>, ModelError> {
        let absolute = |info: &TensorInfo, sub: Range<usize>| ByteRange {
            tensor: info.name.clone(),
            file: info.file.clone(),
            range: info.range.start + sub.start..info.range.start + sub.end,
        };
        match self.expert_plan(layer, expert, cfg)? {
            ExpertPlan::Fused { gate_up, gate_up_bytes, down, down_bytes } => {
                Ok(vec![absolute(gate_up, gate_up_bytes), absolute(down, down_bytes)])
            }
            ExpertPlan::PerExpert { weights } => {
                let mut out = Vec::with_capacity(6);
                for (name, _, _) in &weights {
                    let info = self.tensor_info(name)?;
                    out.push(info.byte_range());
                    if info.dtype == DType::F8E4M3 {
                        out.push(self.tensor_info(&scale_name(name))?.byte_range());
                    }
                }
                Ok(out)
            }
        }
    }

    /// Full byte ranges of every routed-expert tensor of `layer` (fused tensors whole, or every per-expert weight
    /// and scale), sorted: the bytes that only expert loading may touch.
    pub fn expert_tensor_ranges(&self, layer: usize) -> Vec<ByteRange> {
        let prefix = experts_prefix(layer);
        let mut ranges: Vec<ByteRange> =
            self.tensors.values().filter(|t| t.name.starts_with(&prefix)).map(TensorInfo::byte_range).collect();
        ranges.sort();
        ranges
    }

    fn expert_plan(&self, layer: usize, expert: usize, cfg: &TextConfig) -> Result<ExpertPlan<'_>, ModelError> {
        if layer >= cfg.num_hidden_layers || !cfg.is_moe_layer(layer) {
            return Err(ModelError::InvalidInput {
                what: "layer".to_string(),
                reason: format!(
                    "layer {layer} is not an MoE layer (num_hidden_layers {}, moe_layers {:?})",
                    cfg.num_hidden_layers, cfg.moe_layers
                ),
            });
        }
        if expert >= cfg.num_local_experts {
            return Err(ModelError::InvalidInput {
                what: "expert".to_string(),
                reason: format!(
                    "expert {expert} of layer {layer} is out of range: num_local_experts is {}",
                    cfg.num_local_experts
                ),
            });
        }
        let (hidden, inter, experts) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts);
        match self.expert_layout {
            None => Err(self.missing(&fused_name(layer, "gate_up_proj"))),
            Some(ExpertLayout::Fused) => {
                let gate_up = self.fused_info(&fused_name(layer, "gate_up_proj"), &[experts, hidden, 2 * inter])?;
                let down = self.fused_info(&fused_name(layer, "down_proj"), &[experts, inter, hidden])?;
                let gate_up_len = gate_up.range.len() / experts;
                let down_len = down.range.len() / experts;
                Ok(ExpertPlan::Fused {
                    gate_up,
                    gate_up_bytes: expert * gate_up_len..(expert + 1) * gate_up_len,
                    down,
                    down_bytes: expert * down_len..(expert + 1) * down_len,
                })
            }
            Some(ExpertLayout::PerExpert) => Ok(ExpertPlan::PerExpert {
                weights: [
                    (per_expert_name(layer, expert, "gate_proj"), inter, hidden),
                    (per_expert_name(layer, expert, "up_proj"), inter, hidden),
                    (per_expert_name(layer, expert, "down_proj"), hidden, inter),
                ],
            }),
        }
    }

    fn fused_info(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo, ModelError> {
        let info = self.tensor_info(name)?;
        if !matches!(info.dtype, DType::BF16 | DType::F16 | DType::F32) {
            return Err(ModelError::DtypeMismatch {
                name: name.to_string(),
                file: info.file.clone(),
                expected: "BF16, F16 or F32 (fused experts)".to_string(),
                found: info.dtype.to_string(),
            });
        }
        check_shape(info, shape)?;
        Ok(info)
    }
}

/// `src` is `[rows, cols]` row-major; returns columns `cols_taken` transposed: `[cols_taken.len(), rows]`.
fn transpose_columns(src: &[f32], rows: usize, cols: usize, cols_taken: Range<usize>) -> Vec<f32> {
    const BLOCK: usize = 32;
    let width = cols_taken.len();
    let mut out = vec![0.0f32; width * rows];
    // Blocked so both the reads and the writes stay within a few cache lines per tile.
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..width).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                let row = &src[r * cols + cols_taken.start..r * cols + cols_taken.end];
                for c in c0..(c0 + BLOCK).min(width) {
                    out[c * rows + r] = row[c];
                }
            }
        }
    }
    out
}
