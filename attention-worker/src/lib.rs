//! Attention worker of Switchyard.
//!
//! Owns the serving front (the `switchyard.v1.Generation` gRPC service and the OpenAI-compatible HTTP API in [`http`],
//! with the tokenizer and chat template in [`text`]), the scheduler ([`Engine`]: one thread that
//! batches every active sequence into model steps), and the attention/dense/router/shared-expert half of each MoE
//! step, whose routed experts it dispatches to expert workers through a [`switchyard_transport::Transport`]
//! ([`RemoteExperts`], routed by a [`RoutingTable`] built from the coordinator's placement). In a cluster with a
//! coordinator, [`ClusterLink`] registers the worker in the cluster store, follows the placement the coordinator
//! publishes there (a lost expert worker's steps wait for its re-placement instead of failing) and reports the
//! routed-token load the coordinator balances by.
//!
//! It must not hold routed experts' weights (the model is loaded with `ExpertSelection::None`), and must not know how
//! activations are encoded on the wire (the transport crate owns that).
//!
//! The engine keeps each sequence's KV in a paged cache with chunked prefill and preemption by recompute; a sequence
//! too long for this worker's KV is spread over a context-parallel group of attention workers ([`context`]), and this
//! worker holds shards of other workers' long sequences in turn.
//!
//! # Feature flags
//! None.

pub mod cluster;
pub mod context;
pub mod engine;
pub mod error;
pub mod http;
pub mod leave;
pub mod placement;
pub mod remote;
pub mod request;
pub mod service;
pub mod text;

pub use cluster::{ClusterLink, ClusterOptions, ConnectWorker, LOAD_ALPHA};
pub use context::{ContextGroups, RemoteContext, ShardHost, StoreContextGroups};
pub use engine::{Engine, EngineOptions, GenerationEvent, LockstepLeave, LockstepOptions};
pub use error::{AttentionWorkerError, DispatchError};
pub use leave::CollectiveLeave;
pub use placement::{placement_from_expert_workers, ExpertWorkerRoute, RoutingTable};
pub use remote::{micro_batch_pool, wait_until_unused, RemoteExperts, DEFAULT_DISPATCH_TIMEOUT};
pub use request::{load_tokenizer, RequestLimits, ValidGenerateRequest};
pub use service::{serve, GenerationService, MAX_MESSAGE_BYTES};
pub use {
    http::{router as http_router, serve_http, HttpOptions},
    text::{ChatTemplate, TextCodec},
};
