//! `switchyard generate --endpoint`: the client side of the Generate API, writing the same output as the
//! single-process mode.

use anyhow::{bail, Context, Result};
use switchyard_model::TokenLogprobs;
use switchyard_proto::v1::generate_request::Prompt;
use switchyard_proto::v1::generate_response::Event;
use switchyard_proto::v1::generation_client::GenerationClient;
use switchyard_proto::v1::{FinishReason, GenerateRequest, TokenIds};

/// What a remote generation returned, in the shape `--output-json` writes.
pub struct RemoteGeneration {
    /// Prompt ids as the server tokenized them.
    pub prompt_ids: Vec<u32>,
    /// `[prompt_len][vocab]`, when logits were asked for.
    pub prompt_logits: Vec<Vec<f32>>,
    /// Logits that chose each generated token, when asked for.
    pub decode_logits: Vec<Vec<f32>>,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// `logprobs[i]` belong to `tokens[i]`, when asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// The decoded text.
    pub text: String,
    /// `length` or `stop`.
    pub finish_reason: &'static str,
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Generation parameters sent to the server.
pub struct RemoteRequest {
    /// Text prompt (tokenized by the server) or ids.
    pub prompt: Prompt,
    /// Tokens to generate at most.
    pub max_new_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus threshold.
    pub top_p: f32,
    /// 0 is off.
    pub top_k: u32,
    /// Sampler seed.
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Ask for prompt and decode logits.
    pub return_logits: bool,
}

/// The sampling controls beyond [`RemoteRequest`]'s (the defaults are off).
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    /// Min-p threshold; 0 is off.
    pub min_p: f32,
    /// Tokens that end generation besides end-of-sequence.
    pub stop_token_ids: Vec<u32>,
    /// Stop strings, cut from the text by the server.
    pub stop: Vec<String>,
    /// Top-n log-probabilities per token; 0 asks for none.
    pub logprobs: u32,
}

impl RemoteRequest {
    /// From ids or text.
    pub fn prompt_from(text: Option<String>, ids: Option<Vec<u32>>) -> Result<Prompt> {
        match (text, ids) {
            (_, Some(ids)) => Ok(Prompt::TokenIds(TokenIds { ids })),
            (Some(text), None) => Ok(Prompt::Text(text)),
            (None, None) => bail!("give --prompt or --prompt-ids"),
        }
    }
}

/// Runs one generation against `endpoint`, calling `on_token` as tokens stream in.
pub async fn generate(
    endpoint: &str,
    request: RemoteRequest,
    on_token: &mut dyn FnMut(u32),
) -> Result<RemoteGeneration> {
    generate_with(endpoint, request, RemoteOptions::default(), on_token).await
}

/// [`generate`] with the [`RemoteOptions`] sampling controls.
pub async fn generate_with(
    endpoint: &str,
    request: RemoteRequest,
    options: RemoteOptions,
    on_token: &mut dyn FnMut(u32),
) -> Result<RemoteGeneration> {
    let mut client = GenerationClient::connect(endpoint.to_string())
        .await
        .with_context(|| format!("connecting to {endpoint}"))?
        .max_decoding_message_size(256 << 20);
    let message = GenerateRequest {
        request_id: String::new(),
        prompt: Some(request.prompt),
        max_new_tokens: request.max_new_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        seed: request.seed,
        ignore_eos: request.ignore_eos,
        return_logits: request.return_logits,
        min_p: options.min_p,
        stop_token_ids: options.stop_token_ids,
        stop: options.stop,
        logprobs: options.logprobs,
    };
    let mut stream = client
        .generate(message)
        .await
        .map_err(|s| anyhow::anyhow!("{endpoint} refused the request ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    let mut result = RemoteGeneration {
        prompt_ids: Vec::new(),
        prompt_logits: Vec::new(),
        decode_logits: Vec::new(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        finish_reason: "length",
    };
    let mut vocab = 0usize;
    loop {
        let response = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("generation failed at {endpoint} ({:?}): {}", s.code(), s.message()))?;
        let Some(response) = response else { bail!("{endpoint} ended the stream before the generation finished") };
        match response.event {
            Some(Event::Prompt(prompt)) => {
                vocab = prompt.vocab_size as usize;
                result.prompt_ids = prompt.prompt_ids;
                if vocab > 0 {
                    result.prompt_logits =
                        floats(&prompt.prompt_logits).chunks_exact(vocab).map(<[f32]>::to_vec).collect();
                }
            }
            Some(Event::Token(token)) => {
                result.tokens.push(token.id);
                if options.logprobs > 0 {
                    let top = token.top_logprobs.iter().map(|t| (t.id, t.logprob)).collect();
                    result.logprobs.push(TokenLogprobs { logprob: token.logprob, top });
                }
                if !token.logits.is_empty() {
                    let logits = floats(&token.logits);
                    if logits.len() != vocab {
                        bail!("{endpoint} sent {} logits for token {}, expected {vocab}", logits.len(), token.index);
                    }
                    result.decode_logits.push(logits);
                }
                on_token(token.id);
            }
            Some(Event::Finished(finished)) => {
                result.text = finished.text;
                result.finish_reason = match FinishReason::try_from(finished.reason) {
                    Ok(FinishReason::Stop) => "stop",
                    _ => "length",
                };
                return Ok(result);
            }
            None => bail!("{endpoint} sent an empty response"),
        }
    }
}
