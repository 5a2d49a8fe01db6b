//! Cluster coordination for Switchyard.
//!
//! Owns where experts live and who is in the cluster:
//! - [`placement`]: which expert worker holds which experts of each MoE layer, at which epoch; [`service`] hands it to
//!   attention workers (`switchyard.v1.Coordinator`) from the store.
//! - [`solver`]: placement with replication of hot experts into redundant slots, node-aware, moving as few expert
//!   weights as it can relative to the current placement; [`traces`] makes synthetic skewed, drifting routing loads
//!   to measure it.
//! - [`store`]: the cluster state (members, placement epochs, load statistics, adopted epochs) behind one `Store`
//!   trait with etcd, in-memory and remote (served over gRPC by a coordinator) implementations; [`membership`]
//!   (leases) and [`election`] (coordinator leader) build on it.
//! - [`controller`]: the leader loop of `switchyard coordinator`: places the experts once enough expert workers
//!   registered, rebalances them from measured loads or on request, re-places the experts of lost workers, and
//!   drives expert workers through load / publish / adopt / unload so no router ever meets a missing expert.
//!
//! - [`communicator`]: the bootstrap of collective (NCCL) communicators: rank 0 publishes a communicator's unique id
//!   through the coordinator (`switchyard.v1.Communicator`), the other ranks wait for it.
//! - [`context`]: context-parallel groups, the attention workers that share the global-layer KV of a sequence too long
//!   for one of them, and their token ranges, recorded in the store.
//!
//! It must not depend on model math (`switchyard-model`) or kernels: it sees a model only as its MoE layer indices and
//! expert count.

pub mod communicator;
pub mod context;
pub mod controller;
pub mod election;
pub mod error;
pub mod membership;
pub mod placement;
pub mod service;
pub mod solver;
pub mod store;
pub mod traces;

pub use controller::{Controller, ControllerOptions, ModelShape};
pub use error::CoordinatorError;
pub use placement::{Placement, WorkerPlacement};
pub use solver::{LayerStats, PlacementProblem, Solution, Solver, SolverOptions, WorkerSlots};
