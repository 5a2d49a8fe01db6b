//! A request's engine events as text: incremental decoding, stop strings, logprobs and latency metrics.

use std::sync::Arc;
use std::time::Instant;

use switchyard_model::FinishReason;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::metrics;
use crate::engine::{GenerationEvent, TokenLogprobs};
use crate::request::{GeneratedText, TextDelta};
use crate::text::TextCodec;
use crate::AttentionWorkerError;

/// One generated token's log-probabilities, with the tokens as text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the client gets next.
#[derive(Debug)]
pub(crate) enum Piece {
    /// New text (possibly empty while a multi-byte character or a possible stop string is held back) and the
    /// logprobs of the tokens that made it.
    Text { text: String, logprobs: Vec<TokenLogprob> },
    /// The end: OpenAI's finish reason.
    Finished { reason: &'static str },
    /// The request failed after it was admitted.
    Failed(ApiError),
}

/// Turns a request's engine events into [`Piece`]s. Dropping it drops the engine's receiver, which cancels the
/// sequence (a client that went away).
pub(crate) struct Output {
    /// `None` once the request ended (or was cut by a stop string, which cancels the rest of it).
    events: Option<UnboundedReceiver<GenerationEvent>>,
    text: Option<Arc<TextCodec>>,
    generated: Vec<u32>,
    /// The text handed out so far, decoded and searched for stop strings as tokens arrive.
    stream: GeneratedText,
    /// A finish reason to hand out after the text that went before it.
    finish: Option<&'static str>,
    done: bool,
    arrived: Instant,
    last_token: Option<Instant>,
    /// Prompt tokens, for usage.
    pub prompt_tokens: usize,
}

impl Output {
    pub(crate) fn new(
        events: UnboundedReceiver<GenerationEvent>,
        text: Option<Arc<TextCodec>>,
        stop: Vec<String>,
        prompt_tokens: usize,
        arrived: Instant,
    ) -> Self {
        metrics::admitted(prompt_tokens);
        Self {
            events: Some(events),
            text,
            generated: Vec::new(),
            stream: GeneratedText::new(stop),
            finish: None,
            done: false,
            arrived,
            last_token: None,
            prompt_tokens,
        }
    }

    /// Tokens generated so far, for usage.
    pub(crate) fn completion_tokens(&self) -> usize {
        self.generated.len()
    }

    /// The next piece; `None` after `Finished` or `Failed`.
    pub(crate) async fn next(&mut self) -> Option<Piece> {
        if let Some(reason) = self.finish.take() {
            return self.end(Piece::Finished { reason });
        }
        if self.done {
            return None;
        }
        loop {
            let events = self.events.as_mut()?;
            let Some(event) = events.recv().await else {
                return self.end(Piece::Failed(ApiError::from_engine(&AttentionWorkerError::EngineStopped, "prompt")));
            };
            match event {
                GenerationEvent::Prefilled { .. } => continue,
                GenerationEvent::Token { id, logprob, .. } => return Some(self.token(id, logprob)),
                GenerationEvent::Finished { reason, .. } => {
                    let reason = match reason {
                        FinishReason::Length => "length",
                        FinishReason::Stop => "stop",
                    };
                    // The engine's reason stands: a stop string in the rest would have matched at its token.
                    let rest = self.advance(true).text;
                    if rest.is_empty() {
                        return self.end(Piece::Finished { reason });
                    }
                    self.events = None;
                    self.finish = Some(reason);
                    return Some(Piece::Text { text: rest, logprobs: Vec::new() });
                }
                GenerationEvent::Failed(error) => {
                    return self.end(Piece::Failed(ApiError::from_engine(&error, "prompt")));
                }
            }
        }
    }

    fn end(&mut self, piece: Piece) -> Option<Piece> {
        self.events = None;
        self.done = true;
        metrics::finished(self.arrived.elapsed());
        Some(piece)
    }

    /// The text the generated tokens added since the last call (the rest of it when `last`); empty without a
    /// tokenizer.
    fn advance(&mut self, last: bool) -> TextDelta {
        let Some(text) = &self.text else { return TextDelta::default() };
        let decode = |ids: &[u32]| text.decode(ids);
        let delta =
            if last { self.stream.finish(&self.generated, decode) } else { self.stream.push(&self.generated, decode) };
        delta.unwrap_or_else(|error| {
            tracing::warn!(%error, "decoding the output");
            TextDelta::default()
        })
    }

    fn token(&mut self, id: u32, logprob: Option<TokenLogprobs>) -> Piece {
        let now = Instant::now();
        metrics::token(self.last_token.is_none(), now - self.last_token.unwrap_or(self.arrived));
        self.last_token = Some(now);
        self.generated.push(id);
        let logprobs = logprob.map(|l| vec![self.token_logprob(id, &l)]).unwrap_or_default();
        // Incomplete characters and possible starts of a stop string are held back (see `GeneratedText`).
        let TextDelta { text, stopped } = self.advance(false);
        if stopped {
            self.events = None;
            self.finish = Some("stop");
        }
        Piece::Text { text, logprobs }
    }

    fn token_logprob(&self, id: u32, logprobs: &TokenLogprobs) -> TokenLogprob {
        let text = |id: u32| match &self.text {
            Some(text) => text.tokenizer.decode(&[id], false).unwrap_or_default(),
            None => id.to_string(),
        };
        TokenLogprob {
            token: text(id),
            logprob: logprobs.logprob,
            top: logprobs.top.iter().map(|&(id, logprob)| (text(id), logprob)).collect(),
        }
    }
}
