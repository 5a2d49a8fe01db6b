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

/// What [`GeneratedText`] hands out after a token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextDelta {
    /// Text that follows what was handed out before: final (it will not change as tokens follow), and cut where a
    /// stop string starts. Possibly empty while an incomplete character or a possible stop string's start waits.
    pub text: String,
    /// A stop string matched: `text` ends where it starts, and the generation is over.
    pub stopped: bool,
}

/// A generation's text as its tokens arrive, searched for stop strings: one piece of code for the gRPC service (which
/// stops on them) and the HTTP API (which also streams the text).
///
/// Each token costs work in proportion to the text it adds, not to the whole text (decoding and searching the whole
/// text after each token is quadratic over a long generation):
/// - Decoding, as text-generation-inference and vLLM do: only a window of the last tokens is decoded, twice (without
///   and with the tokens not yet read), and the new text is what the second adds to the first. Starting both at the
///   same token keeps decoders that treat the first token specially (SentencePiece's leading space) consistent.
///   A decoded window that ends in U+FFFD is an incomplete UTF-8 sequence (byte-level tokens split characters) that
///   a later token may complete, so the window's text from there on is not handed out yet; the text before it is
///   final. What is handed out is the whole text's decode, piece by piece, for any tokenizer whose decode of the text
///   after a token does not depend on the tokens before that one (byte-level BPE, SentencePiece with byte fallback).
/// - Stop search: only the new text is searched, after the possible start of a stop string held back from the text
///   before. A match that started earlier would have left its start held back, so nothing else needs searching.
#[derive(Debug, Clone, Default)]
pub struct GeneratedText {
    stop: Vec<String>,
    /// First token of the decoded window.
    prefix_offset: usize,
    /// Tokens before it were read: the window's text up to them was handed on.
    read_offset: usize,
    /// Bytes of the window's text after the read tokens' text already handed on (the final part of a text that ends
    /// in an incomplete character).
    read_extra: usize,
    /// Final text not handed out because it may be the start of a stop string.
    held: String,
    /// Bytes handed out so far.
    handed_out: usize,
    stopped: bool,
}

impl GeneratedText {
    /// A text to be searched for `stop` (none: only decoded).
    pub fn new(stop: Vec<String>) -> Self {
        Self { stop, ..Self::default() }
    }

    /// Whether there are stop strings to search for.
    pub fn has_stop_strings(&self) -> bool {
        !self.stop.is_empty()
    }

    /// Bytes of text handed out so far; after a stop, where the stop string starts in the whole text.
    pub fn handed_out(&self) -> usize {
        self.handed_out
    }

    /// After `tokens` (every token generated so far) gained one or more tokens: the text they added, decoded with
    /// `decode` (special tokens skipped, as for the final text). Nothing follows a stop.
    pub fn push<E>(&mut self, tokens: &[u32], decode: impl Fn(&[u32]) -> Result<String, E>) -> Result<TextDelta, E> {
        self.advance(tokens, decode, false)
    }

    /// After the last token: the rest of the text, an incomplete character at its end (as U+FFFD) and a possible stop
    /// string's start included.
    pub fn finish<E>(&mut self, tokens: &[u32], decode: impl Fn(&[u32]) -> Result<String, E>) -> Result<TextDelta, E> {
        self.advance(tokens, decode, true)
    }

    fn advance<E>(
        &mut self,
        tokens: &[u32],
        decode: impl Fn(&[u32]) -> Result<String, E>,
        last: bool,
    ) -> Result<TextDelta, E> {
        if self.stopped {
            return Ok(TextDelta { text: String::new(), stopped: true });
        }
        let new = self.decode_new(tokens, decode, last)?;
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&new);
        if let Some(at) = first_stop(&text, &self.stop) {
            text.truncate(at);
            self.stopped = true;
        } else if !last {
            let held = possible_stop_start(&text, &self.stop);
            self.held = text.split_off(text.len() - held);
        }
        self.handed_out += text.len();
        Ok(TextDelta { text, stopped: self.stopped })
    }

    /// The final text `tokens` added since the last call (all of it when `last`).
    fn decode_new<E>(
        &mut self,
        tokens: &[u32],
        decode: impl Fn(&[u32]) -> Result<String, E>,
        last: bool,
    ) -> Result<String, E> {
        let (prefix, read) = (self.prefix_offset.min(tokens.len()), self.read_offset.min(tokens.len()));
        let read_text = if prefix == read { String::new() } else { decode(&tokens[prefix..read])? };
        let window = decode(&tokens[prefix..])?;
        let complete = if last { window.len() } else { window.trim_end_matches('\u{FFFD}').len() };
        // Where the new text starts; a decoder whose window text does not start with the read text (none known) gets
        // its new text from the next character on rather than a panic.
        let mut start = read_text.len() + self.read_extra;
        while start < window.len() && !window.is_char_boundary(start) {
            start += 1;
        }
        let new = window.get(start..complete).unwrap_or_default().to_string();
        if complete == window.len() {
            // Everything decoded is final: the next window starts at the tokens just read, as context.
            self.prefix_offset = read;
            self.read_offset = tokens.len();
            self.read_extra = 0;
        } else {
            self.read_extra = self.read_extra.max(complete.saturating_sub(read_text.len()));
        }
        Ok(new)
    }
}

/// Bytes at the end of `text` that may be the start of one of `stop` (a proper prefix of it): streamed text holds them
/// back until the next token tells.
fn possible_stop_start(text: &str, stop: &[String]) -> usize {
    let longest = stop.iter().map(String::len).max().unwrap_or(0);
    let mut from = text.len().saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from += 1;
    }
    text[from..]
        .char_indices()
        .map(|(at, _)| &text[from + at..])
        .find(|tail| stop.iter().any(|s| tail.len() < s.len() && s.starts_with(tail)))
        .map_or(0, str::len)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// A byte-level decoder: ids below 256 are bytes, 256 and up are special tokens (skipped).
    fn bytes(ids: &[u32]) -> Result<String, Infallible> {
        let bytes: Vec<u8> = ids.iter().filter(|&&id| id < 256).map(|&id| id as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A SentencePiece-like decoder: id `i` is the word `WORDS[i]` after a space, and the text's leading space goes.
    fn words(ids: &[u32]) -> Result<String, Infallible> {
        const WORDS: [&str; 6] = ["the", "stop", "é", "ab", "", "."];
        let text: String = ids.iter().map(|&id| format!(" {}", WORDS[id as usize % WORDS.len()])).collect();
        Ok(text.strip_prefix(' ').unwrap_or(&text).to_string())
    }

    /// Streams `ids` one token at a time: the pieces, and how many tokens were pushed when a stop string matched.
    fn stream(
        ids: &[u32],
        stop: &[&str],
        decode: fn(&[u32]) -> Result<String, Infallible>,
    ) -> (Vec<String>, Option<usize>) {
        let mut text = GeneratedText::new(stop.iter().map(|s| s.to_string()).collect());
        let mut pieces = Vec::new();
        for n in 1..=ids.len() {
            let delta = text.push(&ids[..n], decode).unwrap();
            pieces.push(delta.text);
            if delta.stopped {
                assert_eq!(text.handed_out(), pieces.concat().len());
                return (pieces, Some(n));
            }
        }
        pieces.push(text.finish(ids, decode).unwrap().text);
        (pieces, None)
    }

    /// What decoding everything after each token and searching it whole gives: the text cut at the first stop, and
    /// the token after which a stop string first shows (ignoring an incomplete character at the end).
    fn whole(ids: &[u32], stop: &[&str], decode: fn(&[u32]) -> Result<String, Infallible>) -> (String, Option<usize>) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        for n in 1..=ids.len() {
            let text = decode(&ids[..n]).unwrap();
            if let Some(at) = first_stop(&text, &stop) {
                return (text[..at].to_string(), Some(n));
            }
        }
        (decode(ids).unwrap(), None)
    }

    #[test]
    fn holds_back_incomplete_characters_and_possible_stop_starts() {
        // "é" is C3 A9: the first byte alone is held, and "ab" might start "abc".
        let ids: Vec<u32> = "xé ab!".bytes().map(u32::from).collect();
        let (pieces, stopped) = stream(&ids, &["abc"], bytes);
        assert_eq!(pieces, ["x", "", "é", " ", "", "", "ab!", ""]);
        assert_eq!(stopped, None);
        // A stop string split over tokens, after a character split over tokens: cut where it starts.
        let ids: Vec<u32> = "éabcd".bytes().map(u32::from).collect();
        let (pieces, stopped) = stream(&ids, &["zz", "bc"], bytes);
        assert_eq!((pieces.concat().as_str(), stopped), ("éa", Some(5)));
        // A token that ends a character and a stop string, then begins another character: the stop shows at once.
        let (pieces, stopped) = stream(&[0xC3, 0xA9, b'a' as u32, 0xC3], &["éa"], bytes);
        assert_eq!((pieces.concat().as_str(), stopped), ("", Some(3)));
        // At the end, an incomplete character comes out as U+FFFD, and held text is handed out.
        let (pieces, _) = stream(&[b'a' as u32, 0xC3], &["ab"], bytes);
        assert_eq!(pieces, ["", "", "a\u{FFFD}"]);
        // Special tokens add nothing.
        let (pieces, _) = stream(&[300, b'o' as u32, 301, b'k' as u32], &[], bytes);
        assert_eq!(pieces.concat(), "ok");
    }

    #[test]
    fn matches_decoding_and_searching_the_whole_text_after_every_token() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let stops: [&[&str]; 4] = [&[], &["ab"], &["é.", "stop the"], &["b", "aab", "\u{e9}ab"]];
        // Cases that stopped, and that held an undecodable byte: the test must see both often.
        let (mut stopped_cases, mut broken_cases) = (0, 0);
        for case in 0..2000 {
            let stop = stops[case % stops.len()];
            // Bytes drawn from a small alphabet with UTF-8 lead and continuation bytes and an invalid byte, so that
            // characters split, complete and break.
            let alphabet = [b'a', b'b', b'.', b' ', 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF];
            let len = 1 + next(24) as usize;
            let ids: Vec<u32> = (0..len).map(|_| u32::from(alphabet[next(alphabet.len() as u64) as usize])).collect();
            let (pieces, stopped) = stream(&ids, stop, bytes);
            assert_eq!((pieces.concat(), stopped), whole(&ids, stop, bytes), "bytes {ids:x?}, stop {stop:?}");
            stopped_cases += usize::from(stopped.is_some());
            broken_cases += usize::from(pieces.concat().contains('\u{FFFD}'));
            let ids: Vec<u32> = (0..len).map(|_| next(6) as u32).collect();
            let (pieces, stopped) = stream(&ids, stop, words);
            assert_eq!((pieces.concat(), stopped), whole(&ids, stop, words), "words {ids:?}, stop {stop:?}");
            stopped_cases += usize::from(stopped.is_some());
        }
        assert!(stopped_cases > 500 && broken_cases > 500, "{stopped_cases} stopped, {broken_cases} broken");
    }
}
