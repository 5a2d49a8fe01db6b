//! Client requests after validation: what the engine accepts.
//!
//! A `GenerateRequest` from the wire becomes a [`ValidGenerateRequest`] here or is refused with an
//! [`AttentionWorkerError::InvalidRequest`] naming the field and the limit, before the engine sees it.

use std::path::{Path, PathBuf};

use switchyard_model::config::TextConfig;
use switchyard_model::SamplingParams;
use switchyard_proto::v1::{generate_request, GenerateRequest};
use tokenizers::Tokenizer;

use crate::AttentionWorkerError;

/// The limits a request is checked against: the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    /// Every token id must be below it.
    pub vocab_size: usize,
    /// Prompt plus generated tokens may not exceed it.
    pub max_position_embeddings: usize,
}

impl RequestLimits {
    /// The limits of a model.
    pub fn of(config: &TextConfig) -> Self {
        Self { vocab_size: config.vocab_size, max_position_embeddings: config.max_position_embeddings }
    }
}

/// A generation request that passed validation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValidGenerateRequest {
    /// For tracing: the client's, or one the server made up.
    pub request_id: String,
    /// Prompt token ids: non-empty, each below the vocabulary size.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (0: only the prompt is processed, e.g. for its logits).
    pub max_new_tokens: usize,
    /// Token selection (validated ranges; top_p 0 already turned into 1).
    pub sampling: SamplingParams,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Send prompt logits and the logits that chose each token.
    pub return_logits: bool,
    /// Generation ends after any of these tokens (reason `Stop`, the token is sent), besides end-of-sequence tokens.
    pub stop_token_ids: Vec<u32>,
    /// Stop strings, matched on the decoded text: the first match ends generation (reason `Stop`) and the text is
    /// cut where the match starts.
    pub stop: Vec<String>,
    /// Send the top-n log-probabilities with each generated token (n <= [`MAX_LOGPROBS`]); `Some(0)` sends only the
    /// chosen token's.
    pub logprobs: Option<usize>,
}

/// Most top log-probabilities a request may ask for per token (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// Most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 8;

fn invalid(field: &str, reason: String) -> AttentionWorkerError {
    AttentionWorkerError::InvalidRequest { field: field.to_string(), reason }
}

impl ValidGenerateRequest {
    /// Validates a wire request. A text prompt is tokenized with `tokenizer` (special tokens added as its
    /// post-processor says); without one only token ids are accepted. `request_id` replaces an empty id.
    pub fn from_proto(
        request: GenerateRequest,
        tokenizer: Option<&Tokenizer>,
        limits: &RequestLimits,
        request_id: impl FnOnce() -> String,
    ) -> Result<Self, AttentionWorkerError> {
        let prompt = match request.prompt {
            Some(generate_request::Prompt::TokenIds(ids)) => ids.ids,
            Some(generate_request::Prompt::Text(text)) => {
                let tokenizer = tokenizer.ok_or_else(|| {
                    invalid("prompt.text", "this server has no tokenizer.json: send prompt.token_ids".into())
                })?;
                tokenizer
                    .encode(text.as_str(), true)
                    .map_err(|e| invalid("prompt.text", format!("cannot be tokenized: {e}")))?
                    .get_ids()
                    .to_vec()
            }
            None => return Err(invalid("prompt", "give prompt.text or prompt.token_ids".into())),
        };
        let sampling = SamplingParams {
            temperature: request.temperature,
            top_p: if request.top_p == 0.0 { 1.0 } else { request.top_p },
            top_k: (request.top_k != 0).then_some(request.top_k as usize),
            min_p: request.min_p,
            seed: request.seed,
        };
        let request_id = if request.request_id.is_empty() { request_id() } else { request.request_id };
        let valid = Self {
            request_id,
            prompt,
            max_new_tokens: request.max_new_tokens as usize,
            sampling,
            ignore_eos: request.ignore_eos,
            return_logits: request.return_logits,
            stop_token_ids: request.stop_token_ids,
            stop: request.stop,
            logprobs: (request.logprobs != 0).then_some(request.logprobs as usize),
        };
        valid.check(limits)?;
        if !valid.stop.is_empty() && tokenizer.is_none() {
            return Err(invalid("stop", "this server has no tokenizer.json to decode text: use stop_token_ids".into()));
        }
        Ok(valid)
    }

    /// Checks the request against `limits` and the sampling ranges, naming the field and the numbers.
    pub fn check(&self, limits: &RequestLimits) -> Result<(), AttentionWorkerError> {
        if self.prompt.is_empty() {
            return Err(invalid("prompt", "the prompt has no tokens".into()));
        }
        if let Some(&bad) = self.prompt.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return Err(invalid(
                "prompt.token_ids",
                format!("token id {bad} is outside the vocabulary (vocab_size {})", limits.vocab_size),
            ));
        }
        let max = limits.max_position_embeddings;
        if self.prompt.len() > max {
            return Err(invalid(
                "prompt",
                format!("the prompt has {} tokens, more than max_position_embeddings {max}", self.prompt.len()),
            ));
        }
        if self.prompt.len() + self.max_new_tokens > max {
            return Err(invalid(
                "max_new_tokens",
                format!(
                    "prompt of {} tokens + max_new_tokens {} = {} exceeds max_position_embeddings {max}",
                    self.prompt.len(),
                    self.max_new_tokens,
                    self.prompt.len() + self.max_new_tokens
                ),
            ));
        }
        if let Some(&bad) = self.stop_token_ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return Err(invalid(
                "stop_token_ids",
                format!("token id {bad} is outside the vocabulary (vocab_size {})", limits.vocab_size),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(invalid(
                "stop",
                format!("{} stop strings given, at most {MAX_STOP_STRINGS} are allowed", self.stop.len()),
            ));
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(invalid("stop", format!("stop string {i} is empty (it would match before any text)")));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(invalid("logprobs", format!("{n} top log-probabilities asked for, at most {MAX_LOGPROBS}")));
        }
        self.sampling.validate().map_err(|e| match e {
            switchyard_model::ModelError::InvalidInput { what, reason } => invalid(&what, reason),
            other => invalid("sampling", other.to_string()),
        })
    }
}

/// Byte offset in `text` where the earliest of `stop` starts, if any does: generation ends there and the text is cut
/// at it.
pub fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Loads `dir/tokenizer.json`; `Ok(None)` when the model has none (then only token-id prompts are served and no text
/// is decoded).
pub fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>, AttentionWorkerError> {
    let path: PathBuf = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    Tokenizer::from_file(&path).map(Some).map_err(|e| AttentionWorkerError::Tokenizer { path, reason: e.to_string() })
}
