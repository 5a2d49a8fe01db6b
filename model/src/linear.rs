//! A linear layer's weight in the form the forward pass computes with.
//!
//! Every checkpoint layout is normalised into this once, at load: nn.Linear orientation `[out_features,
//! in_features]`, either f32 (dense weights, and fused BF16/F16/F32 experts after transposition) or E4M3 codes that
//! stay in the memory-mapped file with one f32 scale per output row. FP8 weights are never expanded to f32: the
//! kernel dequantises them as it streams them.

use switchyard_kernels::matmul::{matmul_f32, matmul_fp8, Fp8Weight};

use crate::checkpoint::TensorBytes;
use crate::ModelError;

/// The weight of one linear projection (no bias: Llama 4 has none).
#[derive(Clone)]
pub enum LinearWeight {
    /// nn.Linear layout `[out_features, in_features]`, row-major f32.
    F32 {
        /// `out_features * in_features` values.
        weight: Vec<f32>,
        /// Rows of the weight.
        out_features: usize,
        /// Columns of the weight.
        in_features: usize,
    },
    /// E4M3 codes in nn.Linear layout, zero-copy from the checkpoint's mmap, one f32 scale per output row.
    Fp8 {
        /// `out_features * in_features` E4M3 codes.
        codes: TensorBytes,
        /// Per-output-channel scales.
        scales: Vec<f32>,
        /// Rows of the weight.
        out_features: usize,
        /// Columns of the weight.
        in_features: usize,
    },
}

impl std::fmt::Debug for LinearWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            LinearWeight::F32 { .. } => "f32",
            LinearWeight::Fp8 { .. } => "fp8-e4m3",
        };
        write!(f, "LinearWeight({kind}, {}x{})", self.out_features(), self.in_features())
    }
}

impl LinearWeight {
    /// Output features (rows of the weight).
    pub fn out_features(&self) -> usize {
        match self {
            LinearWeight::F32 { out_features, .. } | LinearWeight::Fp8 { out_features, .. } => *out_features,
        }
    }

    /// Input features (columns of the weight).
    pub fn in_features(&self) -> usize {
        match self {
            LinearWeight::F32 { in_features, .. } | LinearWeight::Fp8 { in_features, .. } => *in_features,
        }
    }

    /// Whether the weight is held as FP8 codes.
    pub fn is_fp8(&self) -> bool {
        matches!(self, LinearWeight::Fp8 { .. })
    }

    /// Bytes this weight occupies in memory (FP8 codes count once, whether resident or still only mapped).
    pub fn weight_bytes(&self) -> usize {
        match self {
            LinearWeight::F32 { weight, .. } => weight.len() * 4,
            LinearWeight::Fp8 { codes, scales, .. } => codes.len() + scales.len() * 4,
        }
    }

    /// `out[tokens, out_features] = x[tokens, in_features] · Wᵀ`.
    pub fn forward(&self, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<(), ModelError> {
        match self {
            LinearWeight::F32 { weight, out_features, in_features } => {
                matmul_f32(x, tokens, weight, *out_features, *in_features, out)?
            }
            LinearWeight::Fp8 { codes, scales, out_features, in_features } => matmul_fp8(
                x,
                tokens,
                Fp8Weight { codes: codes.as_slice(), scales, rows: *out_features, cols: *in_features },
                out,
            )?,
        }
        Ok(())
    }

    /// Like [`LinearWeight::forward`], allocating the output.
    pub fn apply(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>, ModelError> {
        let mut out = vec![0.0; tokens * self.out_features()];
        self.forward(x, tokens, &mut out)?;
        Ok(out)
    }
}
