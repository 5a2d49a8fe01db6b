//! `switchyard bench e2e`: decode throughput of one process against `switchyard up` with expert workers, same run,
//! same model, same scheduler.
//!
//! Both sides run the attention worker's engine (continuous batching over `forward_batch`): in this process with every
//! expert local, and in the cluster with routed experts dispatched over gRPC to expert worker processes. Decode
//! tokens/s for a batch of B requests generating T tokens each is `B * (T - 1)` over the time from the moment every
//! request has its first token (prefill done) to the moment the last one has its last.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use switchyard_attention_worker::{Engine, EngineOptions, GenerationEvent, ValidGenerateRequest};
use switchyard_model::tiny::Preset;
use switchyard_model::{ExpertSelection, LoadOptions, SamplingParams};
use switchyard_proto::v1::generate_request::Prompt;
use switchyard_proto::v1::TokenIds;

use crate::commands::remote_generate::{self, RemoteRequest};
use crate::{model_dir, serving};

/// Flags of `bench e2e`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory. Default: the built-in `small` FP8 model (made on first use, ~1.8 GB).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch sizes (concurrent requests).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Expert worker processes of the cluster.
    #[arg(long, default_value_t = 4)]
    expert_workers: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// Prompt `i` of a batch: distinct ids so that requests route differently.
fn prompt(i: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|j| ((i * 131 + j * 17 + 7) % (vocab - 32)) as u32).collect()
}

/// Decode tokens/s from per-request (first token, last token) times.
fn decode_rate(times: &[(Instant, Instant)], tokens: usize) -> f64 {
    let Some(start) = times.iter().map(|t| t.0).max() else { return 0.0 };
    let Some(end) = times.iter().map(|t| t.1).max() else { return 0.0 };
    let seconds = end.saturating_duration_since(start).as_secs_f64();
    (times.len() * tokens.saturating_sub(1)) as f64 / seconds.max(1e-9)
}

async fn local_rate(engine: &Engine, batch: usize, args: &Args, vocab: usize) -> Result<f64> {
    let mut receivers = Vec::with_capacity(batch);
    for i in 0..batch {
        let request = ValidGenerateRequest {
            request_id: format!("bench-{i}"),
            prompt: prompt(i, args.prompt_tokens, vocab),
            max_new_tokens: args.tokens,
            sampling: SamplingParams::default(),
            ignore_eos: true,
            return_logits: false,
            ..Default::default()
        };
        receivers.push(engine.submit(request).context("submitting to the local engine")?);
    }
    // Every receiver is read concurrently, so a token's time is when it was produced, not when it was read.
    let reads = receivers.into_iter().map(|mut receiver| async move {
        let (mut first, mut last) = (None, None);
        while let Some(event) = receiver.recv().await {
            match event {
                GenerationEvent::Token { index, .. } => {
                    let now = Instant::now();
                    if index == 0 {
                        first = Some(now);
                    }
                    last = Some(now);
                }
                GenerationEvent::Failed(e) => bail!("local generation failed: {e}"),
                GenerationEvent::Finished { .. } => break,
                GenerationEvent::Prefilled { .. } => {}
            }
        }
        match (first, last) {
            (Some(f), Some(l)) => Ok((f, l)),
            _ => bail!("a local request produced no tokens"),
        }
    });
    let times = futures::future::try_join_all(reads).await?;
    Ok(decode_rate(&times, args.tokens))
}

async fn cluster_rate(endpoint: &str, batch: usize, args: &Args, vocab: usize) -> Result<f64> {
    let requests = (0..batch).map(|i| {
        let request = RemoteRequest {
            prompt: Prompt::TokenIds(TokenIds { ids: prompt(i, args.prompt_tokens, vocab) }),
            max_new_tokens: args.tokens as u32,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            ignore_eos: true,
            return_logits: false,
        };
        async move {
            let (mut first, mut last) = (None, None);
            remote_generate::generate(endpoint, request, &mut |_| {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
            })
            .await?;
            match (first, last) {
                (Some(f), Some(l)) => Ok((f, l)),
                _ => bail!("a cluster request produced no tokens"),
            }
        }
    });
    let times = futures::future::try_join_all(requests).await?;
    Ok(decode_rate(&times, args.tokens))
}

/// Runs `bench e2e`.
pub fn run(args: Args) -> Result<()> {
    if args.tokens < 2 {
        bail!("--tokens must be at least 2 to measure decoding");
    }
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => model_dir::builtin(Preset::Small)?,
    };
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);

    // One process: the engine with every expert local.
    let (config, model) = model_dir::load(&dir, &LoadOptions { experts: ExpertSelection::All, ..Default::default() })?;
    let vocab = config.text.vocab_size;
    let engine = Engine::start(Arc::new(model), EngineOptions { max_batch: max_batch.max(1), ..Default::default() })
        .context("starting the local engine")?;
    let runtime = serving::runtime(2)?;
    // Warm-up: the first steps fault in the memory-mapped expert weights and fill caches; measure after them.
    runtime.block_on(local_rate(&engine, max_batch, &args, vocab))?;
    let mut local = Vec::new();
    for &batch in &args.batch {
        local.push(runtime.block_on(local_rate(&engine, batch, &args, vocab))?);
    }
    drop(engine);

    // The cluster: `switchyard up` with expert worker processes.
    let cluster = runtime.block_on(async {
        let up_args = [
            "--model".to_string(),
            dir.to_string_lossy().into_owned(),
            "--expert-workers".into(),
            args.expert_workers.to_string(),
        ];
        let up = crate::commands::bench_serve::Cluster::start(&up_args, Duration::from_secs(300)).await?;
        // Warm-up at the largest batch, then one measurement per batch size.
        cluster_rate(&up.endpoint, max_batch, &args, vocab).await?;
        let mut rates = Vec::new();
        for &batch in &args.batch {
            rates.push(cluster_rate(&up.endpoint, batch, &args, vocab).await?);
        }
        up.stop().await;
        Ok::<_, anyhow::Error>(rates)
    })?;

    println!(
        "model {} ; {} tokens per request ; cluster: 1 attention worker, {} expert workers",
        dir.display(),
        args.tokens,
        args.expert_workers
    );
    println!("{:>6} {:>18} {:>18} {:>10}", "batch", "1 process tok/s", "cluster tok/s", "cost");
    let mut rows = Vec::new();
    for ((&batch, &single), &distributed) in args.batch.iter().zip(&local).zip(&cluster) {
        let cost = 1.0 - distributed / single;
        println!("{batch:>6} {single:>18.1} {distributed:>18.1} {:>9.1}%", cost * 100.0);
        rows.push(serde_json::json!({
            "batch": batch, "single_process_tokens_per_s": single, "cluster_tokens_per_s": distributed,
            "distribution_cost": cost,
        }));
    }
    println!("target: distribution cost <= 15% at batch 32");
    if let Some(path) = &args.output_json {
        let json = serde_json::json!({
            "benchmark": "e2e", "model": dir.display().to_string(), "tokens": args.tokens,
            "expert_workers": args.expert_workers, "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
