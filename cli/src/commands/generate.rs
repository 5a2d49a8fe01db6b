//! `switchyard generate`: runs the model in this process on one prompt.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use switchyard_kernels::device::{check_device, Device};
use switchyard_model::{
    generate, ActivationPrecision, ExpertSelection, FinishReason, GenerationRequest, LoadOptions, SamplingParams,
};
use tokenizers::Tokenizer;

use crate::commands::remote_generate::{self, RemoteRequest};
use crate::model_dir;

/// Flags of `generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json). Default: the built-in tiny model.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Prompt text, tokenized with the model's tokenizer.json.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `1,2,3`.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Quantise expert activations to FP8 per token (as the FP8 checkpoint's config describes) instead of keeping f32.
    #[arg(long)]
    fp8_activations: bool,
    /// Where compute runs: `cpu` or `cuda:N`.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: Device,
    /// Write prompt ids, prompt and decode logits, generated tokens and text as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
    /// Generate through a running cluster's client API (e.g. the endpoint `switchyard up` prints) instead of
    /// loading the model in this process.
    #[arg(long, env = "SWITCHYARD_ENDPOINT", conflicts_with_all = ["model", "fp8_activations"])]
    endpoint: Option<String>,
}

/// Runs `generate`.
pub fn run(args: Args) -> Result<()> {
    if let Some(endpoint) = args.endpoint.clone() {
        return run_remote(&endpoint, args);
    }
    check_device(&args.device).with_context(|| format!("device {}", args.device))?;
    if args.device != Device::Cpu {
        bail!("device {}: the GPU forward pass is not available yet; use --device cpu", args.device);
    }
    let dir = model_dir::resolve(args.model.as_deref())?;
    let options = LoadOptions {
        experts: ExpertSelection::All,
        activation_precision: if args.fp8_activations {
            ActivationPrecision::Fp8PerToken
        } else {
            ActivationPrecision::F32
        },
    };
    let (config, model) = model_dir::load(&dir, &options)?;
    let tokenizer = load_tokenizer(&dir, args.prompt.is_some())?;
    let prompt_ids = match (&args.prompt, args.prompt_ids) {
        (_, Some(ids)) => ids,
        (Some(text), None) => {
            let tokenizer = tokenizer.as_ref().context("no tokenizer")?;
            tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let sampling = SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed };
    let request = GenerationRequest {
        prompt: prompt_ids.clone(),
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_tokens: if args.ignore_eos { Vec::new() } else { config.text.eos_token_id.clone() },
        keep_logits: args.output_json.is_some(),
    };
    let mut stdout = std::io::stdout().lock();
    let streaming = tokenizer.is_some() && args.output_json.is_none();
    let mut streamed = Vec::new();
    let mut printed = String::new();
    let generation = generate(&model, &request, &mut |token| {
        if !streaming {
            return;
        }
        // Decode the whole tail each time: byte-level BPE tokens can split a UTF-8 character.
        streamed.push(token);
        if let Some(text) = tokenizer.as_ref().and_then(|t| t.decode(&streamed, true).ok()) {
            if let Some(new) = text.strip_prefix(printed.as_str()) {
                let _ = write!(stdout, "{new}");
                let _ = stdout.flush();
                printed = text;
            }
        }
    })
    .context("generating")?;
    let text = match &tokenizer {
        Some(t) => t.decode(&generation.tokens, true).map_err(|e| anyhow::anyhow!("decoding the output: {e}"))?,
        None => String::new(),
    };
    if streaming {
        writeln!(stdout, "{}", text.strip_prefix(printed.as_str()).unwrap_or(""))?;
    } else if args.output_json.is_none() {
        writeln!(stdout, "{:?}", generation.tokens)?;
    }
    if let Some(path) = &args.output_json {
        let reason = match generation.finish_reason {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        };
        let output = Output {
            prompt_ids: &prompt_ids,
            prompt_logits: &generation.prompt_logits,
            decode_logits: &generation.decode_logits,
            tokens: &generation.tokens,
            text: &text,
            finish_reason: reason,
        };
        output.write(path)?;
        writeln!(stdout, "{text}")?;
    }
    Ok(())
}

/// `--output-json`, the same from one process and from a cluster.
struct Output<'a> {
    prompt_ids: &'a [u32],
    prompt_logits: &'a [Vec<f32>],
    decode_logits: &'a [Vec<f32>],
    tokens: &'a [u32],
    text: &'a str,
    finish_reason: &'a str,
}

impl Output<'_> {
    fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::json!({
            "prompt_ids": self.prompt_ids,
            "prompt_logits": self.prompt_logits,
            "decode_logits": self.decode_logits,
            "greedy_tokens": self.tokens,
            "text": self.text,
            "finish_reason": self.finish_reason,
        });
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), &json)
            .with_context(|| format!("writing {}", path.display()))
    }
}

fn run_remote(endpoint: &str, args: Args) -> Result<()> {
    let request = RemoteRequest {
        prompt: RemoteRequest::prompt_from(args.prompt.clone(), args.prompt_ids.clone())?,
        max_new_tokens: u32::try_from(args.max_new_tokens).context("--max-new-tokens is too large")?,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k.map(|k| u32::try_from(k).unwrap_or(u32::MAX)).unwrap_or(0),
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        return_logits: args.output_json.is_some(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let generation = runtime.block_on(remote_generate::generate(endpoint, request, &mut |_| {}))?;
    if let Some(path) = &args.output_json {
        Output {
            prompt_ids: &generation.prompt_ids,
            prompt_logits: &generation.prompt_logits,
            decode_logits: &generation.decode_logits,
            tokens: &generation.tokens,
            text: &generation.text,
            finish_reason: generation.finish_reason,
        }
        .write(path)?;
    }
    println!("{}", generation.text);
    Ok(())
}

/// The model's tokenizer: required when the prompt is text, optional (for decoding the output) otherwise.
fn load_tokenizer(dir: &Path, required: bool) -> Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        if required {
            bail!("{} is missing: give the prompt as --prompt-ids instead", path.display());
        }
        return Ok(None);
    }
    Tokenizer::from_file(&path).map(Some).map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))
}
