//! Routed experts on a CUDA GPU: [`GpuExperts`] implements [`RoutedExperts`] with each layer's FP8 expert weights
//! resident on the device (codes and per-row scales stay FP8; gate and up fused into one GEMM), computing a step as
//! `switchyard_kernels::device::GpuExpertLayer` does: per-token FP8 activations, grouped FP8 GEMMs, SwiGLU.
//!
//! The arithmetic is that of [`crate::LocalExperts`] with [`ActivationPrecision::Fp8PerToken`], up to the order of
//! f32 additions (docs/cuda.md states the tolerance). Only FP8 checkpoints can be held: BF16/F32 expert weights are
//! refused with an error naming the expert, and so is a build without the `cuda` feature or a machine without a GPU
//! (the kernels crate's `NotCompiledWithCuda` / `CudaUnavailable`, through [`ModelError::Kernel`]).
//!
//! [`ActivationPrecision::Fp8PerToken`]: crate::ActivationPrecision::Fp8PerToken

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use switchyard_kernels::device::plan::Fp8Expert;
use switchyard_kernels::device::{CudaDevice, Device, GpuExpertLayer};
use switchyard_kernels::matmul::Fp8Weight;

use crate::checkpoint::ExpertWeights;
use crate::experts::{check_routed_inputs, RoutedExperts};
use crate::linear::LinearWeight;
use crate::ModelError;

/// One MoE layer's experts on the device, with the map from expert id to the device layer's local index.
struct HeldLayer {
    local: HashMap<u32, u32>,
    experts: GpuExpertLayer,
}

/// One layer's experts copied to the device by [`GpuExperts::upload_layer`], not yet in use.
pub struct UploadedLayer(HeldLayer);

/// Routed experts computed on one CUDA GPU.
pub struct GpuExperts {
    device: Arc<CudaDevice>,
    layers: BTreeMap<usize, HeldLayer>,
}

impl std::fmt::Debug for GpuExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuExperts({:?}, {} layers)", self.device, self.layers.len())
    }
}

/// The FP8 view of one linear weight, or an error naming it.
fn fp8_weight<'a>(
    weight: &'a LinearWeight,
    layer: usize,
    expert: u32,
    name: &str,
) -> Result<Fp8Weight<'a>, ModelError> {
    match weight {
        LinearWeight::Fp8 { codes, scales, out_features, in_features } => {
            Ok(Fp8Weight { codes: codes.as_slice(), scales, rows: *out_features, cols: *in_features })
        }
        LinearWeight::F32 { .. } => Err(ModelError::InvalidInput {
            what: "GPU expert weights".into(),
            reason: format!(
                "layer {layer} expert {expert} {name} is not FP8: the GPU expert path computes FP8 (E4M3) checkpoints \
                 only; use the CPU path (--device cpu) for this checkpoint"
            ),
        }),
    }
}

impl GpuExperts {
    /// Opens `device`, which must be `cuda:N`: `cpu` is refused (use [`crate::LocalExperts`]), and a build without the
    /// `cuda` feature or a machine without the GPU answers the kernels' error naming what is missing.
    pub fn new(device: Device) -> Result<Self, ModelError> {
        let Device::Cuda(ordinal) = device else {
            return Err(ModelError::InvalidInput {
                what: "device".into(),
                reason: "GPU experts need a CUDA device (cuda:N); for cpu use LocalExperts".into(),
            });
        };
        Ok(GpuExperts { device: CudaDevice::new(ordinal)?, layers: BTreeMap::new() })
    }

    /// Uploads (or replaces) the experts of MoE layer `layer`. Every expert must be FP8 with the same shapes.
    pub fn insert_layer<'a>(
        &mut self,
        layer: usize,
        experts: impl IntoIterator<Item = (u32, &'a ExpertWeights)>,
    ) -> Result<(), ModelError> {
        let uploaded = self.upload_layer(layer, experts)?;
        self.install_layer(layer, uploaded);
        Ok(())
    }

    /// Uploads the experts of MoE layer `layer` without installing them, so that a worker can copy a layer to the
    /// device while it goes on computing with what it holds ([`GpuExperts::install_layer`] swaps it in).
    pub fn upload_layer<'a>(
        &self,
        layer: usize,
        experts: impl IntoIterator<Item = (u32, &'a ExpertWeights)>,
    ) -> Result<UploadedLayer, ModelError> {
        let mut local = HashMap::new();
        let mut weights = Vec::new();
        for (expert, w) in experts {
            if local.insert(expert, weights.len() as u32).is_some() {
                return Err(ModelError::InvalidInput {
                    what: "GPU expert weights".into(),
                    reason: format!("layer {layer} expert {expert} given twice"),
                });
            }
            weights.push(Fp8Expert {
                gate: fp8_weight(&w.gate, layer, expert, "gate")?,
                up: fp8_weight(&w.up, layer, expert, "up")?,
                down: fp8_weight(&w.down, layer, expert, "down")?,
            });
        }
        let experts = GpuExpertLayer::upload(&self.device, &weights)?;
        Ok(UploadedLayer(HeldLayer { local, experts }))
    }

    /// Puts an uploaded layer in place of whatever `layer` held.
    pub fn install_layer(&mut self, layer: usize, uploaded: UploadedLayer) {
        self.layers.insert(layer, uploaded.0);
    }

    /// Drops layer `layer`'s experts from the device; whether it was held.
    pub fn remove_layer(&mut self, layer: usize) -> bool {
        self.layers.remove(&layer).is_some()
    }

    /// The experts held for `layer`, in id order.
    pub fn held(&self, layer: usize) -> Vec<u32> {
        let mut ids: Vec<u32> = self.layers.get(&layer).map(|l| l.local.keys().copied().collect()).unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Bytes of expert weights and scales on the device.
    pub fn weight_bytes(&self) -> usize {
        self.layers.values().map(|l| l.experts.weight_bytes()).sum()
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        self.device.name()
    }
}

impl RoutedExperts for GpuExperts {
    fn compute(&self, layer: usize, inputs: &[f32], experts: &[u32], hidden: usize) -> Result<Vec<f32>, ModelError> {
        check_routed_inputs(inputs, experts, hidden)?;
        let held = self.layers.get(&layer).ok_or_else(|| ModelError::InvalidInput {
            what: "routed expert".into(),
            reason: format!("no expert of layer {layer} is held on the GPU"),
        })?;
        if held.experts.dims().hidden != hidden {
            return Err(ModelError::InvalidInput {
                what: "routed expert inputs".into(),
                reason: format!(
                    "hidden size {hidden}, but layer {layer}'s experts take {}",
                    held.experts.dims().hidden
                ),
            });
        }
        let routed = experts
            .iter()
            .map(|expert| {
                held.local.get(expert).copied().ok_or_else(|| ModelError::InvalidInput {
                    what: "routed expert".into(),
                    reason: format!("expert {expert} of layer {layer} is not held here"),
                })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(held.experts.forward(inputs, &routed)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the `cuda` feature, or on a machine without a GPU, opening the GPU path answers an error naming what
    /// is missing; `cpu` is refused outright.
    #[test]
    fn refuses_cpu_and_reports_a_missing_gpu() {
        let err = GpuExperts::new(Device::Cpu).expect_err("cpu");
        assert!(err.to_string().contains("CUDA device"), "{err}");
        match GpuExperts::new(Device::Cuda(0)) {
            Ok(experts) => println!("GPU present: {}", experts.device_name()),
            Err(ModelError::Kernel(kernel)) => println!("no GPU path here: {kernel}"),
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn refuses_non_fp8_weights_naming_the_expert() {
        let weight = LinearWeight::F32 { weight: vec![0.0; 32 * 16], out_features: 32, in_features: 16 };
        let err = fp8_weight(&weight, 3, 7, "up").expect_err("f32");
        let text = err.to_string();
        assert!(text.contains("layer 3 expert 7 up is not FP8"), "{text}");
    }
}
