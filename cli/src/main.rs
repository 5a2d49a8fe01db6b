//! `switchyard`: one binary for every role and tool of a Switchyard deployment.
//!
//! Owns command-line parsing, logging set-up and turning library errors into messages for people (`anyhow` with
//! context). The work itself lives in the library crates; each subcommand is a thin layer over them.

mod collective;
mod commands;
mod model_dir;
mod report_format;
mod serving;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Switchyard: Llama 4 serving with disaggregated attention and expert workers.
#[derive(Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `switchyard_model=debug`.
    #[arg(long, env = "SWITCHYARD_LOG", default_value = "warn", global = true)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic random checkpoint in the real Llama 4 layout (config, safetensors, tokenizer).
    MakeTiny(commands::make_tiny::Args),
    /// Generate text with the model in this process.
    Generate(commands::generate::Args),
    /// Serve a subset of the routed experts of every MoE layer (dispatch, control, health).
    ExpertWorker(commands::expert_worker::Args),
    /// Serve generation: attention, dense layers, router and shared expert; routed experts on expert workers.
    AttentionWorker(commands::attention_worker::Args),
    /// Run a whole cluster on this machine (coordinator, attention and expert workers as processes on loopback).
    Up(commands::up::Args),
    /// Coordinate the cluster: place experts on registered expert workers, rebalance, recover; serve the placement
    /// (and the cluster store, without --store).
    Coordinator(commands::coordinator::Args),
    /// Run a benchmark and print ratios against limits measured in the same run.
    Bench(commands::bench::Args),
    /// Expert placement: solve offline, show the live one, or ask the coordinator to rebalance.
    Placement(commands::placement::Args),
    /// Size a cluster: attention and expert workers, memory per component, predicted throughput and latencies.
    Plan(commands::plan::Args),
    /// Simulate a cluster of up to thousands of GPUs: skewed, drifting expert load, failures, rebalancing; compare
    /// placement policies.
    Simulate(commands::simulate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result: Result<()> = match cli.command {
        Command::MakeTiny(args) => commands::make_tiny::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Placement(args) => commands::placement::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::Simulate(args) => commands::simulate::run(args),
        Command::Coordinator(args) => commands::coordinator::run(args),
        Command::Up(args) => commands::up::run(args),
        Command::ExpertWorker(args) => commands::expert_worker::run(args),
        Command::AttentionWorker(args) => commands::attention_worker::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line of causes, outermost first: what an operator reads in a log.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
