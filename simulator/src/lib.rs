//! Discrete-event simulation of a Switchyard cluster far beyond one machine: attention workers and expert GPUs by
//! the thousand, Poisson request arrivals, skewed and drifting expert popularity, GPU failures, and the
//! coordinator's real placement solver rebalancing and recovering, to compare placement policies side by side.
//!
//! The model (docs/simulator.md has the whole story and its limits):
//! - **Events are steps, not tokens.** Each attention worker runs steps back to back while it has work; a step's
//!   end is one event. A step plans its batch like the real scheduler (admission by sequence slots and KV
//!   positions, decode tokens first, then prompt chunks within the token budget) and its duration is the attention
//!   side ([`StepCosts::attention_us`], spread evenly over the MoE layers) plus, per MoE layer, the expert side:
//!   dispatch, the slowest expert GPU's grouped computation, combine. With two micro-batches the two sides overlap
//!   as a two-stage pipeline.
//! - **The slowest GPU gates each layer.** Expert workers group what every attention worker queued for a layer, so
//!   the expert side of a layer is computed from all tokens in flight: every `expert_tick_s` the simulator draws
//!   how those tokens route (Poisson/normal counts per expert around the Zipf trace's shares), splits each expert's
//!   count evenly over its live replicas, sums per GPU (flat arrays, one pass per layer) and takes the maximum of
//!   [`StepCosts::expert_us`] over GPUs. That is where placement shows: an expert GPU holding hot experts without
//!   replicas sets the pace of every step.
//! - **Failures.** A dead GPU's replicas leave routing at once (routers fail over to other replicas). If some
//!   expert has no replica left, steps hold (nothing runs) until a placement covering it is published; the
//!   coordinator acts after `detect_s`, computes a placement and loads the new replicas (weights over
//!   `load_gbps`, the slowest GPU decides); held steps past `recovery_timeout_s` fail their requests.
//! - **Rebalancing** (`solver` policy): every `rebalance_interval_s` the coordinator compares the predicted
//!   max/mean GPU load of the placement in use under the routed load measured since the last check with
//!   `rebalance_threshold`, and above it runs [`switchyard_coordinator::Solver::solve`] from the current placement;
//!   routers switch once the added replicas are loaded (GPUs loading weights compute `load_slowdown` slower).
//!
//! Load is drawn from [`switchyard_coordinator::traces::ZipfTrace`], the generator `switchyard bench placement`
//! measures the solver with; every random stream follows from the seed, so a run is deterministic and every policy
//! sees the same arrivals, lengths and routing draws.
//!
//! It must not depend on model math or serving code: only on the coordinator's placement types and solver.

mod config;
mod costs;
mod error;
pub mod plot;
mod report;
mod routing;
mod sim;
mod stats;
mod workers;

pub use config::{Failure, FailureTarget, Lengths, Policy, SimConfig};
pub use costs::{AnchorCosts, AttentionBatch, StepCosts};
pub use error::SimError;
pub use report::{FailureRecord, Heat, Imbalance, PlacementChange, Point, Reason, Report, Requests};
pub use stats::Latency;

/// Runs the simulation of `config` under `policy`.
pub fn simulate<C: StepCosts>(config: &SimConfig, policy: Policy, costs: &C) -> Result<Report, SimError> {
    sim::Sim::new(config, policy, costs)?.run()
}

/// Runs every policy of `policies` on the same workload, one thread each, and returns the reports in that order.
pub fn simulate_policies<C: StepCosts>(
    config: &SimConfig,
    policies: &[Policy],
    costs: &C,
) -> Result<Vec<Report>, SimError> {
    config.validate()?;
    std::thread::scope(|scope| {
        let runs: Vec<_> =
            policies.iter().map(|&policy| scope.spawn(move || simulate(config, policy, costs))).collect();
        runs.into_iter().map(|run| run.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}
