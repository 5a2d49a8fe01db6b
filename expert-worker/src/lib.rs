//! Expert worker of Switchyard.
//!
//! Owns a subset of the routed experts of the model's MoE layers and computes the tokens that attention workers
//! dispatch to them: [`ExpertSpec`] says which experts (`all`, `0-3,8`, `1:0-3;3:4-7`); [`ExpertWorker`] reads
//! exactly those experts' bytes from the checkpoint into one [`switchyard_model::LocalExperts`] per layer and runs a
//! batching executor, one compute thread that groups every batch queued for a layer (from any number of attention
//! workers) into one grouped matmul per expert; it implements the transport's [`ExpertService`]. [`serve`] puts the
//! dispatch, control ([`ControlService`]), health and reflection services on one gRPC listener.
//!
//! In a coordinated cluster, [`join_cluster`] registers the worker as an expert member, and the coordinator moves
//! experts with `LoadExperts`/`UnloadExperts`. The worker accepts dispatches routed with any placement epoch of a
//! window `[min, max]`: a load for epoch E raises max to E (the coordinator loads before it publishes E), an unload
//! for epoch E raises min to E first (routers still on older epochs get `StaleEpoch`, not a missing expert).
//!
//! It must not know about attention, KV caches, tokens' positions or client requests, nor about the wire encoding
//! of activations (the transport decodes them before [`ExpertService`] sees them).
//!
//! [`ExpertService`]: switchyard_transport::ExpertService

mod control;
mod error;
mod executor;
mod membership;
mod server;
mod spec;
mod worker;

pub use control::{to_layer_experts, worker_status, ControlService};
pub use error::WorkerError;
pub use membership::{all_experts_bytes, join_cluster, JOIN_PATIENCE};
pub use server::{serve, MAX_MESSAGE_BYTES, SERVICE_NAMES, SHUTDOWN_GRACE};
pub use spec::{check_experts, ExpertSpec, ExpertsByLayer, SpecError, MAX_EXPERT_ID};
pub use worker::{ExpertWorker, WorkerCounters, WorkerOptions};
