//! Cluster coordination for Switchyard.
//!
//! Owns where experts live: the placement (which expert worker holds which experts of each MoE layer, at which
//! epoch) and the `switchyard.v1.Coordinator` service that attention workers ask for it. Today the placement is
//! static: experts split evenly and contiguously across expert workers, the same split in every MoE layer. Membership
//! through etcd, replication of hot experts, live rebalancing and failure handling come with the coordinator issue and
//! build on these types.
//!
//! It must not depend on model math (`switchyard-model`) or kernels: it sees a model only as its MoE layer indices and
//! expert count.

pub mod error;
pub mod placement;
pub mod service;

pub use error::CoordinatorError;
pub use placement::{Placement, WorkerPlacement};
