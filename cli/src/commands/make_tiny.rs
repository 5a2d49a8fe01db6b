//! `switchyard make-tiny`: writes a deterministic random checkpoint in the real layout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use switchyard_model::tiny::{write_checkpoint, Preset, TinySpec};

use crate::model_dir::bytes_bar;

/// Flags of `make-tiny`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `tiny` (a few MB, for tests) or `small` (hidden 2048, 16 experts, for benchmarks).
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// Store routed experts as FP8 E4M3 per expert with per-channel scales (the Maverick FP8 layout).
    #[arg(long)]
    fp8: bool,
}

/// Runs `make-tiny`.
pub fn run(args: Args) -> Result<()> {
    let spec = TinySpec { preset: args.preset, seed: args.seed, fp8: args.fp8 };
    let bar = bytes_bar("writing");
    let written = write_checkpoint(&args.out, &spec, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("writing a {:?} checkpoint to {}", args.preset, args.out.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} files, {:.1} MB, vocab {})",
        written.dir.display(),
        written.files.len(),
        written.total_bytes as f64 / 1e6,
        written.vocab_size
    );
    Ok(())
}
