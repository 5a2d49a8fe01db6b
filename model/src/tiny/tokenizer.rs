//! The generated checkpoint's tokenizer: Llama 4's pipeline (O200K split regex, byte-level BPE, a post-processor
//! that prepends `<|begin_of_text|>`) with a 496-token BPE trained on a fixed corpus, and Llama 4's special tokens
//! at the top of a 512-token vocabulary.

use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior, TokenizerImpl};

use crate::ModelError;

/// BPE tokens: the 256 byte symbols and 240 merges.
const BPE_VOCAB: usize = 496;

/// The whole vocabulary, special tokens included.
pub(super) const VOCAB_SIZE: usize = BPE_VOCAB + SPECIAL_TOKENS.len();

/// Llama 4's special tokens in Llama 4's order (its reserved tokens left out), from id [`BPE_VOCAB`] up.
const SPECIAL_TOKENS: [&str; 16] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
];

const BOS: &str = "<|begin_of_text|>";
const EOT: &str = "<|eot|>";
const PAD: &str = "<|finetune_right_pad|>";
/// End of sequence for the model: end of text, end of message (before a tool call) and end of turn.
const EOS: [&str; 3] = ["<|end_of_text|>", "<|eom|>", "<|eot|>"];

/// The split regex of Meta's tiktoken model (OpenAI's o200k), as in Llama 4's `tokenizer.json`.
const O200K_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Renders `<|begin_of_text|><|header_start|>system<|header_end|>\n\n{sys}<|eot|><|header_start|>user<|header_end|>
/// \n\n{msg}<|eot|>` then, with `add_generation_prompt`, `<|header_start|>assistant<|header_end|>\n\n`, as Llama 4's
/// template does (system text trimmed, tool results under the `ipython` header, images as `<|image|>`).
const CHAT_TEMPLATE: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'tool' or message['role'] == 'ipython' %}
        {%- set role = 'ipython' %}
    {%- else %}
        {%- set role = message['role'] %}
    {%- endif %}
    {{- '<|header_start|>' + role + '<|header_end|>\n\n' }}
    {%- if message['content'] is string %}
        {%- if role == 'system' %}
            {{- message['content'] | trim }}
        {%- else %}
            {{- message['content'] }}
        {%- endif %}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}
                {{- part['text'] }}
            {%- elif part['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>\n\n' }}
{%- endif %}
"#;

/// The training text. Any text works as long as it yields at least 240 merges; this one mixes prose, chat turns,
/// code and numbers so that common words become single tokens.
const CORPUS: &str = r#"A switchyard sorts railway cars onto the right tracks. Trains arrive from many lines, the cars are uncoupled,
and each one rolls over the hump towards the track of its next destination. The yard master decides where every car
goes; the points and the retarders do the work. When the yard is busy, cars wait in the receiving tracks, and when a
track is full, the next car for it has to wait or go to an overflow track.
A mixture of experts model works the same way. Every token arrives at a layer, the router looks at it and sends it to
one expert, and the expert's answer is added back to the token's hidden state. The shared expert sees every token.
The attention layers read the keys and values of every earlier token, in chunks of a fixed size or over the whole
context, and the model predicts the next token from the last hidden state.
system: You are a helpful assistant. Answer the question, and say so when you do not know the answer.
user: Hello! What is the capital of France?
assistant: The capital of France is Paris.
user: How many experts does the model have, and how many does each token use?
assistant: The model has one hundred and twenty eight experts in each of its mixture of experts layers, and each token
uses one routed expert and the shared expert.
user: Can you write a function that adds two numbers?
assistant: Here is one in Python:
def add(a, b):
    return a + b
And here is one in Rust:
fn add(a: i64, b: i64) -> i64 {
    a + b
}
The weights are stored in safetensors files, in bfloat16 or in float8 with a scale for every output channel. The
loader reads the header of each file, checks the name, the shape and the dtype of each tensor, and maps the data into
memory. The experts of one layer can be placed on different workers; a worker that holds an expert computes it for
every token routed there and sends the results back to the attention worker that asked for them.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 16384 65536 202048 1048576 3.14159 2.71828
Dates and times: 2025-04-05 12:30:00, Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
Punctuation and symbols: (parentheses), [brackets], {braces}, "quotes", 'apostrophes', commas, full stops; colons:
semicolons; question marks? exclamation marks! hash #, at @, percent %, ampersand &, star *, plus +, equals =.
Other languages: Grüße aus München, ça va très bien, ¿dónde está la estación?, ünïcödé ✓, naïve café, smörgåsbord.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. How much wood would a woodchuck
chuck if a woodchuck could chuck wood? Peter Piper picked a peck of pickled peppers.
Requests come in through the front door, wait in the queue until there is room in the batch, and leave with their
tokens streamed back one at a time. When the queue is too long, new requests are refused quickly instead of waiting
forever. Every request has a prompt, a maximum number of new tokens, a temperature and a seed.
"#;

pub(super) fn token_id(token: &str) -> u32 {
    let index = SPECIAL_TOKENS.iter().position(|t| *t == token).unwrap_or(0);
    (BPE_VOCAB + index) as u32
}

pub(super) fn bos_id() -> u32 {
    token_id(BOS)
}

pub(super) fn pad_id() -> u32 {
    token_id(PAD)
}

pub(super) fn eos_ids() -> Vec<u32> {
    EOS.iter().map(|t| token_id(t)).collect()
}

type BpeTokenizer = TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// Trains the BPE and returns the `tokenizer.json` text. `path` only names the file in errors.
pub(super) fn build_tokenizer_json(path: &Path) -> Result<String, ModelError> {
    let fail = |reason: String| ModelError::Tokenizer { path: path.to_path_buf(), reason };

    let split = Split::new(SplitPattern::Regex(O200K_PATTERN.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| fail(format!("split regex: {e}")))?;
    // Llama 4 splits with the regex first, so ByteLevel only maps bytes to symbols and must not split again.
    let byte_level = ByteLevel::new(false, true, false);
    let pre_tokenizer =
        PreTokenizerSequence::new(vec![PreTokenizerWrapper::Split(split), PreTokenizerWrapper::ByteLevel(byte_level)]);

    let mut tokenizer = BpeTokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre_tokenizer)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

    // The whole byte alphabet as initial symbols, so that every string encodes; the trainer orders merges by count
    // then by pair, so the result is the same on every run.
    let mut trainer = BpeTrainer::builder()
        .vocab_size(BPE_VOCAB)
        .min_frequency(0)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tokenizer.train(&mut trainer, CORPUS.lines()).map_err(|e| fail(format!("training: {e}")))?;
    let trained = tokenizer.get_model().get_vocab_size();
    if trained != BPE_VOCAB {
        return Err(fail(format!("training gave {trained} BPE tokens, expected {BPE_VOCAB}: the corpus is too small")));
    }

    let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(specials).map_err(|e| fail(format!("adding special tokens: {e}")))?;
    for token in SPECIAL_TOKENS {
        let id = tokenizer.token_to_id(token);
        if id != Some(token_id(token)) {
            return Err(fail(format!("special token {token} got id {id:?}, expected {}", token_id(token))));
        }
    }

    let bos = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS}:0 $A:0 {BOS}:1 $B:1")))
        .map_err(|e| fail(format!("post-processor template: {e}")))?
        .special_tokens(vec![(BOS, bos_id())])
        .build()
        .map_err(|e| fail(format!("post-processor: {e}")))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Sequence(ProcessorSequence::new(vec![
        PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        PostProcessorWrapper::Template(bos),
    ]))));

    tokenizer.to_string(true).map_err(|e| fail(format!("serialising: {e}")))
}

/// `tokenizer_config.json` as transformers writes it for Llama 4 Instruct.
pub(super) fn tokenizer_config(model_max_length: usize) -> Value {
    let mut added = Map::new();
    for token in SPECIAL_TOKENS {
        added.insert(
            token_id(token).to_string(),
            json!({
                "content": token,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            }),
        );
    }
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

pub(super) fn special_tokens_map() -> Value {
    json!({ "bos_token": BOS, "eos_token": EOT, "pad_token": PAD })
}
