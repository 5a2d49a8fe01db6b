//! Routed experts: the seam between the attention side of an MoE layer and wherever its experts live.
//!
//! The forward pass hands the tokens routed in one MoE layer step to a [`RoutedExperts`]: [`LocalExperts`] computes
//! them in this process; the distributed data plane supplies an implementation that dispatches them to expert
//! workers. Either way the result for a token is `expert(score * x)`, Llama 4's routing (the router score scales the
//! expert's INPUT).

use std::collections::BTreeMap;

use switchyard_kernels::{activation::silu_mul, fp8::fake_quantize_rows};

use crate::checkpoint::ExpertWeights;
use crate::ModelError;

/// Computes routed experts for the tokens of one MoE layer step.
pub trait RoutedExperts: Send + Sync {
    /// `inputs` holds `experts.len()` rows of `hidden` values, each already multiplied by its router score; row `i`
    /// goes to expert `experts[i]` of MoE layer `layer` (the decoder layer index). Returns the expert outputs in the
    /// same row order.
    fn compute(&self, layer: usize, inputs: &[f32], experts: &[u32], hidden: usize) -> Result<Vec<f32>, ModelError>;
}

/// Checks the one shape every [`RoutedExperts::compute`] relies on: `experts.len()` rows of `hidden` values.
pub fn check_routed_inputs(inputs: &[f32], experts: &[u32], hidden: usize) -> Result<(), ModelError> {
    if inputs.len() != experts.len() * hidden {
        return Err(ModelError::InvalidInput {
            what: "routed expert inputs".into(),
            reason: format!("{} values for {} tokens of hidden size {hidden}", inputs.len(), experts.len()),
        });
    }
    Ok(())
}

/// How expert activations are fed to FP8 expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationPrecision {
    /// Activations stay f32 (the default; the reference for parity).
    #[default]
    F32,
    /// Per-token dynamic FP8 (E4M3) quantisation of the expert input and of the SwiGLU output, as a
    /// compressed-tensors FP8 checkpoint describes (`input_activations: {dynamic, strategy: token}`).
    Fp8PerToken,
}

impl ExpertWeights {
    /// One expert's SwiGLU FFN on `tokens` rows: `down(silu(gate(x)) * up(x))`.
    pub fn forward(&self, x: &[f32], tokens: usize, precision: ActivationPrecision) -> Result<Vec<f32>, ModelError> {
        let quantise = precision == ActivationPrecision::Fp8PerToken;
        let hidden = self.gate.in_features();
        let quantised_input;
        let x = if quantise && self.gate.is_fp8() {
            let mut copy = x.to_vec();
            fake_quantize_rows(&mut copy, hidden);
            quantised_input = copy;
            &quantised_input[..]
        } else {
            x
        };
        let gate = self.gate.apply(x, tokens)?;
        let up = self.up.apply(x, tokens)?;
        let mut activated = vec![0.0; gate.len()];
        silu_mul(&gate, &up, &mut activated)?;
        if quantise && self.down.is_fp8() {
            fake_quantize_rows(&mut activated, self.down.in_features());
        }
        self.down.apply(&activated, tokens)
    }
}

/// Experts held in this process, by MoE layer and expert id.
#[derive(Default)]
pub struct LocalExperts {
    layers: BTreeMap<usize, BTreeMap<u32, ExpertWeights>>,
    precision: ActivationPrecision,
}

impl LocalExperts {
    /// An empty set computing with `precision`.
    pub fn new(precision: ActivationPrecision) -> Self {
        Self { layers: BTreeMap::new(), precision }
    }

    /// Adds (or replaces) expert `expert` of layer `layer`.
    pub fn insert(&mut self, layer: usize, expert: u32, weights: ExpertWeights) {
        self.layers.entry(layer).or_default().insert(expert, weights);
    }

    /// Removes expert `expert` of layer `layer`, returning its weights if it was held.
    pub fn remove(&mut self, layer: usize, expert: u32) -> Option<ExpertWeights> {
        let experts = self.layers.get_mut(&layer)?;
        let removed = experts.remove(&expert);
        if experts.is_empty() {
            self.layers.remove(&layer);
        }
        removed
    }

    /// The experts held for `layer`.
    pub fn held(&self, layer: usize) -> impl Iterator<Item = u32> + '_ {
        self.layers.get(&layer).into_iter().flat_map(|experts| experts.keys().copied())
    }

    /// The experts held for `layer` with their weights, in id order (what a device copy is made from).
    pub fn weights(&self, layer: usize) -> impl Iterator<Item = (u32, &ExpertWeights)> + '_ {
        self.layers.get(&layer).into_iter().flat_map(|experts| experts.iter().map(|(id, w)| (*id, w)))
    }

    /// Bytes of expert weights held.
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .values()
            .flat_map(|experts| experts.values())
            .map(|e| e.gate.weight_bytes() + e.up.weight_bytes() + e.down.weight_bytes())
            .sum()
    }

    /// The activation precision experts compute with.
    pub fn precision(&self) -> ActivationPrecision {
        self.precision
    }
}

impl RoutedExperts for LocalExperts {
    fn compute(&self, layer: usize, inputs: &[f32], experts: &[u32], hidden: usize) -> Result<Vec<f32>, ModelError> {
        check_routed_inputs(inputs, experts, hidden)?;
        let held = self.layers.get(&layer);
        let mut outputs = vec![0.0; inputs.len()];
        // Group tokens by expert so each expert runs one GEMM over all of its tokens (what makes FP8 weight
        // streaming pay off), then scatter the rows back to token order.
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (row, &expert) in experts.iter().enumerate() {
            groups.entry(expert).or_default().push(row);
        }
        for (expert, rows) in groups {
            let weights = held.and_then(|h| h.get(&expert)).ok_or_else(|| ModelError::InvalidInput {
                what: "routed expert".into(),
                reason: format!("expert {expert} of layer {layer} is not held here"),
            })?;
            let mut gathered = Vec::with_capacity(rows.len() * hidden);
            for &row in &rows {
                gathered.extend_from_slice(&inputs[row * hidden..(row + 1) * hidden]);
            }
            let computed = weights.forward(&gathered, rows.len(), self.precision)?;
            for (i, &row) in rows.iter().enumerate() {
                outputs[row * hidden..(row + 1) * hidden].copy_from_slice(&computed[i * hidden..(i + 1) * hidden]);
            }
        }
        Ok(outputs)
    }
}
