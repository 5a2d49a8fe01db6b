//! Rotary frequencies and attention-temperature factors derived from the config.
//!
//! Computed in f32 with the same operation order as transformers' Llama 4 (`inv_freq = 1 / theta^(2i/d)`, then
//! llama3 scaling for Scout), because the parity tests compare logits to 1e-4 and these values feed every RoPE layer.

use crate::config::{RopeScaling, TextConfig};

/// `inv_freq[i]` for the `head_dim / 2` rotated pairs, with the config's rope scaling applied.
pub fn inverse_frequencies(config: &TextConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let theta = config.rope_theta as f32;
    let base: Vec<f32> = (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32)).collect();
    match &config.rope_scaling {
        None => base,
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let factor = *factor as f32;
            let low = *low_freq_factor as f32;
            let high = *high_freq_factor as f32;
            let old_context = *original_max_position_embeddings as f32;
            let low_freq_wavelen = old_context / low;
            let high_freq_wavelen = old_context / high;
            base.into_iter()
                .map(|inv_freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
                    let scaled = if wavelen > low_freq_wavelen { inv_freq / factor } else { inv_freq };
                    // Written as transformers writes it (`~(w < high) * ~(w > low)`), so NaN behaves the same too.
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
                    if medium {
                        let smooth = (old_context / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// Attention temperature tuning of NoPE layers (arXiv 2501.19399): the factor that multiplies q at absolute position
/// `position`, exactly 1 while `position + 1 < floor_scale`.
pub fn temperature_factor(config: &TextConfig, position: usize) -> f32 {
    let floor_scale = config.floor_scale as f32;
    let attn_scale = config.attn_scale as f32;
    ((((position as f32) + 1.0) / floor_scale).floor() + 1.0).ln() * attn_scale + 1.0
}
