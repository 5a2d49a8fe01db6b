//! Text in and out of the model: the `tokenizer.json` tokenizer and the chat template of `tokenizer_config.json`.
//!
//! The template is rendered with minijinja the way transformers' `apply_chat_template` renders it with Jinja2:
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception` in scope, Python string and
//! dict methods (`.strip()`, `.items()`, ...) through minijinja's pycompat, whitespace kept as written. The rendered
//! text already holds the special tokens it needs, so it is tokenized without the post-processor's (no second
//! `<|begin_of_text|>`). The built-in tiny model writes Llama 4's template and goes through exactly this path.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::request::load_tokenizer;
use crate::AttentionWorkerError;

/// The template's name inside its minijinja environment.
const TEMPLATE: &str = "chat_template";

/// A checkpoint's chat template, ready to render.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn config_error(path: &Path, reason: String) -> AttentionWorkerError {
    AttentionWorkerError::Tokenizer { path: path.to_path_buf(), reason }
}

/// A special token of `tokenizer_config.json`: a string, or an added-token object with `content`.
fn special_token(config: &Value, name: &str) -> String {
    match config.get(name) {
        Some(Value::String(token)) => token.clone(),
        Some(Value::Object(token)) => token.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of a parsed `tokenizer_config.json` (`path` names it in errors); `Ok(None)` when it has no
    /// `chat_template`. A list of named templates (newer transformers) yields the one named `default`.
    pub fn from_config(config: &Value, path: &Path) -> Result<Option<Self>, AttentionWorkerError> {
        let source = match config.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(source)) => source.clone(),
            Some(Value::Array(named)) => {
                let default = named.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                    Some(source) => source.to_string(),
                    None => return Err(config_error(path, "chat_template lists no template named \"default\"".into())),
                }
            }
            Some(other) => return Err(config_error(path, format!("chat_template is not a string: {other}"))),
        };
        let mut env = Environment::new();
        // Jinja2 as transformers configures it: trim_blocks and lstrip_blocks on, the final newline kept.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE, source)
            .map_err(|e| config_error(path, format!("the chat_template does not parse: {e:#}")))?;
        Ok(Some(Self {
            env,
            bos_token: special_token(config, "bos_token"),
            eos_token: special_token(config, "eos_token"),
        }))
    }

    /// Renders `messages` (OpenAI chat messages: `role`, and `content` as a string or a list of parts), ending with
    /// the assistant's header when `add_generation_prompt`. A template that rejects the conversation (its
    /// `raise_exception`, a missing field) is an invalid request naming why.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, AttentionWorkerError> {
        let invalid = |reason: String| AttentionWorkerError::InvalidRequest { field: "messages".into(), reason };
        let template = self.env.get_template(TEMPLATE).map_err(|e| invalid(format!("{e:#}")))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| invalid(format!("the chat template refused them: {e:#}")))
    }
}

/// What turns text into token ids and back for a model directory.
#[derive(Debug)]
pub struct TextCodec {
    /// The `tokenizer.json` tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, when `tokenizer_config.json` has one.
    pub chat_template: Option<ChatTemplate>,
}

impl TextCodec {
    /// Loads `dir/tokenizer.json` and the chat template of `dir/tokenizer_config.json`; `Ok(None)` when the model
    /// has no tokenizer (then only token-id prompts are served).
    pub fn load(dir: &Path) -> Result<Option<Self>, AttentionWorkerError> {
        let Some(tokenizer) = load_tokenizer(dir)? else { return Ok(None) };
        let path: PathBuf = dir.join("tokenizer_config.json");
        let chat_template = if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| config_error(&path, e.to_string()))?;
            let config: Value =
                serde_json::from_str(&text).map_err(|e| config_error(&path, format!("not JSON: {e}")))?;
            ChatTemplate::from_config(&config, &path)?
        } else {
            None
        };
        Ok(Some(Self { tokenizer, chat_template }))
    }

    /// Token ids of a rendered chat prompt: special tokens in the text are recognised, none are added.
    pub fn encode_chat(&self, messages: &[Value]) -> Result<Vec<u32>, AttentionWorkerError> {
        let template = self.chat_template.as_ref().ok_or_else(|| AttentionWorkerError::InvalidRequest {
            field: "messages".into(),
            reason: "this model's tokenizer_config.json has no chat_template: use /v1/completions".into(),
        })?;
        let text = template.render(messages, true)?;
        let encoding =
            self.tokenizer.encode(text.as_str(), false).map_err(|e| AttentionWorkerError::InvalidRequest {
                field: "messages".into(),
                reason: format!("the rendered conversation cannot be tokenized: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `ids` as text, special tokens left out. Undecodable bytes come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, AttentionWorkerError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| AttentionWorkerError::Tokenizer { path: "tokenizer.json".into(), reason: e.to_string() })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_hf_conventions() {
        let config = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}[{{ m.role.upper() }}] {{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %}>{% endif %}{{ eos_token }}"
        });
        let template = ChatTemplate::from_config(&config, Path::new("t.json")).unwrap().unwrap();
        let messages = vec![serde_json::json!({"role": "user", "content": "  hi  "})];
        assert_eq!(template.render(&messages, true).unwrap(), "<s>[USER] hi></s>");
        let bad = vec![serde_json::json!({"role": "bad", "content": "x"})];
        let error = template.render(&bad, true).unwrap_err().to_string();
        assert!(error.contains("no bad roles"), "{error}");
    }
}
