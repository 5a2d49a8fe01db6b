//! Finding a model directory: the one given, or the built-in tiny model made on first use into a cache directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::config::ModelConfig;
use switchyard_model::tiny::{write_checkpoint, Preset, TinySpec};
use switchyard_model::{Device, GpuExperts, GpuModel, GpuModelOptions, Llama4Model, LoadOptions};

/// Seed of the built-in models; changing it (or the generator) needs new cache names below.
const BUILTIN_SEED: u64 = 0;

/// Where the built-in model is cached: `$SWITCHYARD_CACHE_DIR`, else `$XDG_CACHE_HOME/switchyard`, else
/// `~/.cache/switchyard`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHYARD_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("switchyard");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("switchyard"),
        None => std::env::temp_dir().join("switchyard-cache"),
    }
}

/// The model directory to use: `model` if given, else the built-in tiny FP8 model, written on first use.
pub fn resolve(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_path_buf()),
        None => builtin(Preset::Tiny),
    }
}

/// The built-in FP8 model of `preset` in the cache directory, written on first use.
pub fn builtin(preset: Preset) -> Result<PathBuf> {
    let name = format!("builtin-{}-fp8-v1", preset.name());
    let dir = cache_dir().join(&name);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    // Write into a private directory and rename, so a concurrent or interrupted first use never leaves a half
    // written model behind.
    let parent = cache_dir();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating the cache directory {}", parent.display()))?;
    let staging = parent.join(format!(".{name}.{}", std::process::id()));
    let spec = TinySpec { preset, seed: BUILTIN_SEED, fp8: true };
    let bar = bytes_bar("writing the built-in model");
    write_checkpoint(&staging, &spec, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("writing the built-in {preset} model to {}", staging.display()))?;
    bar.finish_and_clear();
    match std::fs::rename(&staging, &dir) {
        Ok(()) => {}
        // Another process won the race: its copy is identical (deterministic), use it.
        Err(_) if dir.join("config.json").is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
        }
        Err(e) => return Err(e).with_context(|| format!("moving the built-in model into {}", dir.display())),
    }
    Ok(dir)
}

/// A progress bar counting bytes, drawn only on a terminal.
pub fn bytes_bar(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

/// Opens and loads the model in `dir`, showing a progress bar over its tensors.
pub fn load(dir: &Path, options: &LoadOptions) -> Result<(ModelConfig, Llama4Model)> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)
        .with_context(|| format!("reading the model config {}", config_path.display()))?;
    let checkpoint = Checkpoint::open(dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:40}] {pos}/{len} parts ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(dir.display().to_string());
    let model = Llama4Model::load(&checkpoint, &config, options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("loading the model in {}", dir.display()))?;
    bar.finish_and_clear();
    tracing::info!(bytes_read = checkpoint.ledger().bytes_read(), "model loaded");
    Ok((config, model))
}

/// Every routed expert of the checkpoint in `dir` copied to the GPU `device`, to compute a model's MoE layers there
/// (FP8 checkpoints only; the error names what is missing on a machine without the GPU).
pub fn gpu_experts(dir: &Path, config: &ModelConfig, device: Device) -> Result<GpuExperts> {
    let checkpoint = Checkpoint::open(dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    let text = &config.text;
    let mut gpu = GpuExperts::new(device).with_context(|| format!("opening {device} for the routed experts"))?;
    for layer in (0..text.num_hidden_layers).filter(|&layer| text.is_moe_layer(layer)) {
        let experts = (0..text.num_local_experts)
            .map(|expert| checkpoint.expert(layer, expert, text).map(|weights| (expert as u32, weights)))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading the experts of layer {layer}"))?;
        gpu.insert_layer(layer, experts.iter().map(|(expert, weights)| (*expert, weights)))
            .with_context(|| format!("copying the experts of layer {layer} to {device}"))?;
    }
    Ok(gpu)
}

/// `model` on the GPU `device` as a whole: its dense weights and KV cache as `options` says, and every routed expert
/// of the checkpoint in `dir` next to them ([`gpu_experts`]). The errors name what is missing on a machine without
/// the GPU, and the layer and expert of a checkpoint whose experts are not FP8.
pub fn gpu_model(
    dir: &Path,
    config: &ModelConfig,
    model: &Llama4Model,
    device: Device,
    options: &GpuModelOptions,
) -> Result<GpuModel> {
    let mut gpu = GpuModel::upload(model, device, options)
        .with_context(|| format!("copying the model in {} to {device}", dir.display()))?;
    gpu.set_routed_experts(std::sync::Arc::new(gpu_experts(dir, config, device)?));
    Ok(gpu)
}
