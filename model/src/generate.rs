//! Token selection and the single-sequence generation loop.
//!
//! The loop runs the prompt through the model once (prefill), then decodes one token at a time against the KV
//! cache. `decode_logits[i]` are the logits that chose generated token `i`, so `decode_logits[0]` comes from the last
//! prompt position.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::forward::{ForwardPass, LogitsFor};
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
    /// Min-p sampling: drop tokens whose probability is below `min_p` times the most likely token's (0 is off).
    pub min_p: f32,
    /// Seed of the sampler's random stream: the same seed gives the same output.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: None, min_p: 0.0, seed: 0 }
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
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad("min_p", format!("{} is not in [0, 1]", self.min_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k", "0 would exclude every token".into());
        }
        Ok(())
    }
}

/// Log-probabilities of a generated token: log-softmax of the raw logits (before temperature and the filters), as
/// OpenAI's and vLLM's default `logprobs` report them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// The `n` most likely tokens and their log-probabilities, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Chooses tokens from logits with a seeded random stream.
///
/// The order is vLLM's and Hugging Face's: the logits are divided by the temperature, then the top-k filter, then
/// top-p (nucleus) on what top-k kept, then min-p (relative to the most likely token, which renormalising does not
/// change), and one uniform draw picks from what is left. Greedy (temperature 0) takes the argmax and draws nothing.
/// Each sampler owns its random stream, so a sequence's tokens depend only on its seed and its logits, not on the
/// other sequences batched with it.
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
        if self.params.min_p > 0.0 {
            // Sorted descending, so the tokens at or above the threshold are a prefix; the first always stays.
            let threshold = self.params.min_p * probabilities[0];
            keep = probabilities[..keep].iter().take_while(|&&p| p >= threshold).count().max(1);
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

    /// The next token, and its log-probabilities with the `top_n` most likely tokens' when `top_n` is given.
    pub fn sample_with_logprobs(&mut self, logits: &[f32], top_n: Option<usize>) -> (u32, Option<TokenLogprobs>) {
        let token = self.sample(logits);
        (token, top_n.map(|n| token_logprobs(logits, token, n)))
    }
}

/// Log-probabilities of `token` and of the `top_n` most likely tokens under log-softmax of the raw `logits`.
///
/// Raw logits (not the temperature-scaled, filtered distribution the token was drawn from) are what OpenAI's API and
/// vLLM report by default, and they do not become -inf for tokens a filter removed.
pub fn token_logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: a vocabulary of 200k terms loses digits in f32.
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_total = f64::from(max) + sum.ln();
    let logprob_of = |l: f32| (f64::from(l) - log_total) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let n = top_n.min(order.len());
        if n < order.len() {
            order.select_nth_unstable_by(n - 1, by_logit);
            order.truncate(n);
        }
        order.sort_by(by_logit);
        top.extend(order.into_iter().map(|id| (id, logprob_of(logits[id as usize]))));
    }
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| logprob_of(l));
    TokenLogprobs { logprob, top }
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
    /// Keep each generated token's log-probabilities with the top-n (see [`token_logprobs`]).
    pub logprobs: Option<usize>,
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
    /// `logprobs[i]` belong to `tokens[i]`, when the request asked for them.
    pub logprobs: Vec<TokenLogprobs>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Generates for one sequence; `on_token` sees each token as it is chosen.
pub fn generate(
    model: &dyn ForwardPass,
    request: &GenerationRequest,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation, ModelError> {
    generate_until(model, request, &mut |token, _| {
        on_token(token);
        true
    })
}

/// [`generate`] whose `on_token` also sees the token's log-probabilities (when asked for) and may end generation
/// early by returning `false` (finish reason `Stop`; the token is kept), e.g. on a stop string in the decoded text.
pub fn generate_until(
    model: &dyn ForwardPass,
    request: &GenerationRequest,
    on_token: &mut dyn FnMut(u32, Option<&TokenLogprobs>) -> bool,
) -> Result<Generation, ModelError> {
    request.sampling.validate()?;
    if request.prompt.is_empty() {
        return Err(ModelError::InvalidInput { what: "prompt".into(), reason: "the prompt has no tokens".into() });
    }
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache()?;
    let mut sampler = Sampler::new(request.sampling.clone());
    let mode = if request.keep_logits { LogitsFor::All } else { LogitsFor::Last };
    let logits = model.forward(&request.prompt, &mut cache, mode)?;
    let prompt_logits: Vec<Vec<f32>> =
        if request.keep_logits { logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect() } else { Vec::new() };
    let mut last = logits[logits.len() - vocab..].to_vec();
    let mut generation = Generation {
        tokens: Vec::new(),
        prompt_logits,
        decode_logits: Vec::new(),
        logprobs: Vec::new(),
        finish_reason: FinishReason::Length,
    };
    for step in 0..request.max_new_tokens {
        let (token, logprobs) = sampler.sample_with_logprobs(&last, request.logprobs);
        generation.tokens.push(token);
        let go_on = on_token(token, logprobs.as_ref());
        generation.logprobs.extend(logprobs);
        if request.keep_logits {
            generation.decode_logits.push(std::mem::take(&mut last));
        }
        if !go_on || request.stop_tokens.contains(&token) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p: 1.0, top_k, min_p, seed }
    }

    #[test]
    fn min_p_drops_tokens_below_its_share_of_the_most_likely() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let seen = |min_p: f32| {
            let mut sampler = Sampler::new(params(1.0, None, min_p, 3));
            let mut seen = [false; 4];
            (0..2000).for_each(|_| seen[sampler.sample(&logits) as usize] = true);
            seen
        };
        // 0.25 * 0.5 = 0.125: keeps 0.5, 0.3 and 0.15.
        assert_eq!(seen(0.25), [true, true, true, false]);
        // 0.5 * 0.5 = 0.25: keeps 0.5 and 0.3.
        assert_eq!(seen(0.5), [true, true, false, false]);
        assert_eq!(seen(1.0), [true, false, false, false]);
        assert_eq!(seen(0.0), [true; 4]);
        // Applied after top-k, to what top-k kept.
        let mut sampler = Sampler::new(params(1.0, Some(1), 0.9, 3));
        assert!((0..100).all(|_| sampler.sample(&logits) == 0));
    }

    #[test]
    fn min_p_out_of_range_names_the_field() {
        for bad in [-0.1, 1.5, f32::NAN] {
            let err = params(1.0, None, bad, 0).validate().expect_err("bad min_p");
            assert!(err.to_string().contains("min_p"), "{err}");
        }
    }

    #[test]
    fn logprobs_are_log_softmax_of_the_raw_logits_most_likely_first() {
        let logits = vec![1.0f32, 3.0, -2.0, 3.0, 0.5];
        let l = token_logprobs(&logits, 4, 3);
        let total: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((l.logprob - (0.5f32.exp() / total).ln()).abs() < 1e-6);
        // Ties broken by the lower id.
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        assert!(l.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let full = token_logprobs(&logits, 0, logits.len() + 5);
        assert_eq!(full.top.len(), logits.len());
        let sum: f32 = full.top.iter().map(|t| t.1.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        // Temperature does not change them: they describe the model, not the sampler.
        let (token, at_t) = Sampler::new(params(0.3, None, 0.0, 1)).sample_with_logprobs(&logits, Some(2));
        assert_eq!(at_t, Some(token_logprobs(&logits, token, 2)));
        let (greedy, l) = Sampler::new(params(0.0, None, 0.0, 1)).sample_with_logprobs(&logits, Some(1));
        assert_eq!(l.expect("asked for").top[0].0, greedy);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let rows: Vec<Vec<f32>> =
            (0..32).map(|i| (0..50).map(|j| ((i * 7 + j * 13) % 17) as f32 / 4.0).collect()).collect();
        let run = |seed: u64| {
            let mut sampler =
                Sampler::new(SamplingParams { temperature: 0.9, top_p: 0.95, top_k: Some(20), min_p: 0.05, seed });
            rows.iter().map(|r| sampler.sample(r)).collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }
}
