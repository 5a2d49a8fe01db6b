//! `switchyard generate`: runs the model in this process on one prompt.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use switchyard_attention_worker::request::{first_stop, RequestLimits, ValidGenerateRequest};
use switchyard_kernels::device::{check_device, Device};
use switchyard_model::kv::DEFAULT_BLOCK_SIZE;
use switchyard_model::{
    generate_until, ActivationPrecision, DenseDtype, ExpertSelection, FinishReason, ForwardPass, GenerationRequest,
    GpuModelOptions, KvCache, KvDtype, LoadOptions, SamplingParams, TokenLogprobs,
};
use tokenizers::Tokenizer;

use crate::commands::remote_generate::{self, RemoteOptions, RemoteRequest};
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
    /// Min-p sampling in [0, 1]: drop tokens less likely than MIN_P times the most likely one; 0 is off.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A stop string (repeatable, at most 8): generation ends at its first occurrence in the text, which is cut there.
    #[arg(long)]
    stop: Vec<String>,
    /// Comma-separated token ids that end generation (besides end-of-sequence tokens, even with --ignore-eos).
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// Report each generated token's log-probability and the N most likely tokens' in --output-json (N <= 20; 0 is
    /// off).
    #[arg(long)]
    logprobs: Option<u32>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Quantise expert activations to FP8 per token (as the FP8 checkpoint's config describes) instead of keeping f32.
    #[arg(long)]
    fp8_activations: bool,
    /// Where the model computes: `cpu`, or `cuda:N` for the whole forward pass on that GPU (routed experts need an
    /// FP8 checkpoint; their activations then go to FP8 per token).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: Device,
    /// Element type of the dense weights on the GPU (`f32` or `bf16`; default bf16). Only with `--device cuda:N`.
    #[arg(long)]
    dense_dtype: Option<DenseDtype>,
    /// Element type of the KV cache on the GPU (`bf16` or `f32`; default bf16). Only with `--device cuda:N` (the
    /// CPU's cache is f32).
    #[arg(long)]
    kv_dtype: Option<KvDtype>,
    /// Write prompt ids, prompt and decode logits, generated tokens and text as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
    /// Generate through a running cluster's client API (e.g. the endpoint `switchyard up` prints) instead of
    /// loading the model in this process.
    #[arg(long, env = "SWITCHYARD_ENDPOINT", conflicts_with_all = ["model", "fp8_activations", "dense_dtype", "kv_dtype"])]
    endpoint: Option<String>,
}

/// Runs `generate`.
pub fn run(args: Args) -> Result<()> {
    if let Some(endpoint) = args.endpoint.clone() {
        return run_remote(&endpoint, args);
    }
    check_device(&args.device).with_context(|| format!("device {}", args.device))?;
    if args.dense_dtype.is_some() && args.device == Device::Cpu {
        bail!("--dense-dtype chooses the GPU's dense weights: it needs --device cuda:N");
    }
    if args.kv_dtype.is_some() && args.device == Device::Cpu {
        bail!("--kv-dtype chooses the GPU's KV cache element type: it needs --device cuda:N (the CPU's cache is f32)");
    }
    let dir = model_dir::resolve(args.model.as_deref())?;
    let on_gpu = args.device != Device::Cpu;
    let options = LoadOptions {
        // On the GPU the routed experts are read straight from the checkpoint onto the device.
        experts: if on_gpu { ExpertSelection::None } else { ExpertSelection::All },
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
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        seed: args.seed,
    };
    // The server's validation, so both modes refuse the same requests with the same messages.
    let valid = ValidGenerateRequest {
        request_id: "generate".into(),
        prompt: prompt_ids.clone(),
        max_new_tokens: args.max_new_tokens,
        sampling,
        ignore_eos: args.ignore_eos,
        return_logits: args.output_json.is_some(),
        stop_token_ids: args.stop_token_ids.clone(),
        stop: args.stop.clone(),
        logprobs: args.logprobs.filter(|&n| n > 0).map(|n| n as usize),
    };
    valid.check(&RequestLimits::of(&config.text)).context("invalid request")?;
    if !valid.stop.is_empty() && tokenizer.is_none() {
        bail!("--stop needs the model's tokenizer.json to decode text: use --stop-token-ids");
    }
    let mut stop_tokens = if args.ignore_eos { Vec::new() } else { config.text.eos_token_id.clone() };
    stop_tokens.extend(&valid.stop_token_ids);
    let request = GenerationRequest {
        prompt: prompt_ids.clone(),
        max_new_tokens: valid.max_new_tokens,
        sampling: valid.sampling,
        stop_tokens,
        keep_logits: valid.return_logits,
        logprobs: valid.logprobs,
    };
    let forward: Box<dyn ForwardPass> = if on_gpu {
        // One sequence: the arena holds what it can need at most, computed as the serving engine admits sequences.
        let tokens = prompt_ids.len() + valid.max_new_tokens;
        let gpu_options = GpuModelOptions {
            dense_dtype: args.dense_dtype.unwrap_or_default(),
            kv_blocks: KvCache::blocks_for_sequence(&config.text, DEFAULT_BLOCK_SIZE, tokens, prompt_ids.len()),
            block_size: DEFAULT_BLOCK_SIZE,
            kv_dtype: args.kv_dtype.unwrap_or_default(),
        };
        let gpu = model_dir::gpu_model(&dir, &config, &model, args.device, &gpu_options)?;
        eprintln!(
            "the whole model on {} ({}): {} dense weights, {} MB of them, {} KV blocks of {} ({} MB)",
            args.device,
            gpu.device_name(),
            gpu_options.dense_dtype,
            gpu.weight_bytes() >> 20,
            gpu_options.kv_blocks,
            gpu_options.kv_dtype,
            gpu.kv_bytes() >> 20
        );
        // The host copy is no longer needed.
        drop(model);
        Box::new(gpu)
    } else {
        Box::new(model)
    };
    let mut stdout = std::io::stdout().lock();
    // With stop strings the text is printed once it is cut, so a stop string is never half printed.
    let streaming = tokenizer.is_some() && args.output_json.is_none() && args.stop.is_empty();
    let mut streamed = Vec::new();
    let mut printed = String::new();
    let generation = generate_until(forward.as_ref(), &request, &mut |token, _| {
        if !streaming && args.stop.is_empty() {
            return true;
        }
        // Decode the whole tail each time: byte-level BPE tokens can split a UTF-8 character.
        streamed.push(token);
        let Some(text) = tokenizer.as_ref().and_then(|t| t.decode(&streamed, true).ok()) else { return true };
        if first_stop(&text, &args.stop).is_some() {
            return false;
        }
        if streaming {
            if let Some(new) = text.strip_prefix(printed.as_str()) {
                let _ = write!(stdout, "{new}");
                let _ = stdout.flush();
                printed = text;
            }
        }
        true
    })
    .context("generating")?;
    let mut text = match &tokenizer {
        Some(t) => t.decode(&generation.tokens, true).map_err(|e| anyhow::anyhow!("decoding the output: {e}"))?,
        None => String::new(),
    };
    if let Some(at) = first_stop(&text, &args.stop) {
        text.truncate(at);
    }
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
            logprobs: valid.logprobs.is_some().then_some(generation.logprobs.as_slice()),
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
    /// Present when asked for: then the JSON has `logprobs`.
    logprobs: Option<&'a [TokenLogprobs]>,
    text: &'a str,
    finish_reason: &'a str,
}

impl Output<'_> {
    fn write(&self, path: &Path) -> Result<()> {
        let mut json = serde_json::json!({
            "prompt_ids": self.prompt_ids,
            "prompt_logits": self.prompt_logits,
            "decode_logits": self.decode_logits,
            "greedy_tokens": self.tokens,
            "text": self.text,
            "finish_reason": self.finish_reason,
        });
        if let Some(logprobs) = self.logprobs {
            let entry = |id: u32, logprob: f32| serde_json::json!({ "id": id, "logprob": logprob });
            json["logprobs"] = logprobs
                .iter()
                .zip(self.tokens)
                .map(|(l, &id)| {
                    let mut e = entry(id, l.logprob);
                    e["top"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect::<Vec<_>>().into();
                    e
                })
                .collect::<Vec<_>>()
                .into();
        }
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
    let options = RemoteOptions {
        min_p: args.min_p,
        stop_token_ids: args.stop_token_ids.clone(),
        stop: args.stop.clone(),
        logprobs: args.logprobs.unwrap_or(0),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let generation = runtime.block_on(remote_generate::generate_with(endpoint, request, options, &mut |_| {}))?;
    if let Some(path) = &args.output_json {
        Output {
            prompt_ids: &generation.prompt_ids,
            prompt_logits: &generation.prompt_logits,
            decode_logits: &generation.decode_logits,
            tokens: &generation.tokens,
            logprobs: args.logprobs.is_some_and(|n| n > 0).then_some(generation.logprobs.as_slice()),
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
