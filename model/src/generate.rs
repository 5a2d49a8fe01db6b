//! Token selection and the single-sequence generation loop.
//!
//! The loop runs the prompt through the model once (prefill), then decodes one token at a time against the KV
//! cache. `decode_logits[i]` are the logits that chose generated token `i`, so `decode_logits[0]` comes from the last
//! prompt position.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::forward::{Llama4Model, LogitsFor};
use crate::ModelError;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax, first index on ties, like torch.argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1.0 keeps all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (None keeps all).
    pub top_k: Option<usize>,
    /// Seed of the sampler's random stream: the same seed gives the same output.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: None, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks the ranges, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: &str, reason: String| Err(ModelError::InvalidInput { what: what.into(), reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", format!("{} is not a finite number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k", "0 would exclude every token".into());
        }
        Ok(())
    }
}

/// Chooses tokens from logits with a seeded random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for validated `params`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The next token for `logits` (one row of vocab size).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inverse_t = 1.0 / self.params.temperature;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut probabilities: Vec<f32> = candidates.iter().map(|&(_, l)| ((l - max) * inverse_t).exp()).collect();
        let total: f32 = probabilities.iter().sum();
        probabilities.iter_mut().for_each(|p| *p /= total);
        let mut keep = probabilities.len();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, p) in probabilities.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f32 = probabilities[..keep].iter().sum();
        let mut draw = self.rng.random::<f32>() * kept_total;
        for (i, p) in probabilities[..keep].iter().enumerate() {
            if draw < *p {
                return candidates[i].0;
            }
            draw -= p;
        }
        candidates[keep - 1].0
    }
}

/// Index of the largest value, the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Token selection.
    pub sampling: SamplingParams,
    /// Generation ends after any of these tokens (it is included in the output).
    pub stop_tokens: Vec<u32>,
    /// Keep the prompt and decode logits in the result (for `--output-json` and parity tests).
    pub keep_logits: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// A stop token was generated.
    Stop,
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Logits at every prompt position (`[prompt_len][vocab]`), if kept.
    pub prompt_logits: Vec<Vec<f32>>,
    /// `decode_logits[i]` chose `tokens[i]`, if kept.
    pub decode_logits: Vec<Vec<f32>>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Generates for one sequence; `on_token` sees each token as it is chosen.
pub fn generate(
    model: &Llama4Model,
    request: &GenerationRequest,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation, ModelError> {
    request.sampling.validate()?;
    if request.prompt.is_empty() {
        return Err(ModelError::InvalidInput { what: "prompt".into(), reason: "the prompt has no tokens".into() });
    }
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(request.sampling.clone());
    let mode = if request.keep_logits { LogitsFor::All } else { LogitsFor::Last };
    let logits = model.forward(&request.prompt, &mut cache, mode)?;
    let prompt_logits: Vec<Vec<f32>> =
        if request.keep_logits { logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect() } else { Vec::new() };
    let mut last = logits[logits.len() - vocab..].to_vec();
    let mut generation =
        Generation { tokens: Vec::new(), prompt_logits, decode_logits: Vec::new(), finish_reason: FinishReason::Length };
    for step in 0..request.max_new_tokens {
        let token = sampler.sample(&last);
        generation.tokens.push(token);
        on_token(token);
        if request.keep_logits {
            generation.decode_logits.push(std::mem::take(&mut last));
        }
        if request.stop_tokens.contains(&token) {
            generation.finish_reason = FinishReason::Stop;
            break;
        }
        if step + 1 == request.max_new_tokens {
            break;
        }
        last = model.forward(&[token], &mut cache, LogitsFor::Last)?;
    }
    Ok(generation)
}
