//! The one error type of the attention worker, and its single mapping to gRPC status codes.

use std::path::PathBuf;
use std::time::Duration;

use switchyard_coordinator::CoordinatorError;
use switchyard_model::ModelError;
use switchyard_transport::TransportError;
use tonic::{Code, Status};

/// One failed dispatch of a layer step to one expert worker.
///
/// [`crate::RemoteExperts`] returns it to the forward pass wrapped in [`ModelError::RoutedExperts`];
/// [`AttentionWorkerError::from_step`] unwraps it again, so the client sees the transport's code (`Unavailable` for a
/// lost worker) and the worker's id.
#[derive(Debug, thiserror::Error)]
#[error(
    "expert worker {worker} failed MoE layer {layer} (step {step_id}, micro-batch {micro_batch}): {source}{}",
    .recovery_waited.map(|w| format!("; no new placement within {}s", w.as_secs_f64())).unwrap_or_default()
)]
pub struct DispatchError {
    /// The expert worker's id in the placement.
    pub worker: String,
    /// Decoder layer index of the MoE layer.
    pub layer: usize,
    /// The dispatch's step id.
    pub step_id: u64,
    /// The micro-batch (ping-pong lane) it belonged to.
    pub micro_batch: u32,
    /// What the transport reported.
    #[source]
    pub source: TransportError,
    /// How long the step waited for the coordinator to re-place the failed experts before giving up (`None`: it did
    /// not wait, because recovery is off or the error is not one a new placement can fix).
    pub recovery_waited: Option<Duration>,
}

impl DispatchError {
    /// Wraps the error for the forward pass (see the type's docs).
    pub fn into_model_error(self) -> ModelError {
        ModelError::RoutedExperts { layer: self.layer, retryable: self.source.retryable(), source: Box::new(self) }
    }
}

/// Errors of the attention worker.
#[derive(Debug, thiserror::Error)]
pub enum AttentionWorkerError {
    /// A placement that cannot be used: unknown layer, expert out of range, duplicate or empty worker id, epochs that
    /// disagree.
    #[error("placement epoch {epoch}: {reason}")]
    Placement {
        /// The placement's epoch.
        epoch: u64,
        /// What is wrong, naming the worker, layer and expert.
        reason: String,
    },

    /// Some routed experts are held by no expert worker.
    #[error(
        "placement epoch {epoch} leaves {} of {total} routed experts on no expert worker: {}{}",
        missing.len(),
        missing.iter().take(16).map(|(l, e)| format!("layer {l} expert {e}")).collect::<Vec<_>>().join(", "),
        if missing.len() > 16 { ", ..." } else { "" }
    )]
    UncoveredExperts {
        /// The placement's epoch.
        epoch: u64,
        /// Every (decoder layer, expert) that no worker holds.
        missing: Vec<(usize, u32)>,
        /// Routed experts in the model (MoE layers x experts per layer).
        total: usize,
    },

    /// A layer step could not be computed by an expert worker.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),

    /// The forward pass failed for a reason other than a dispatch.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// A transport call outside a layer step failed.
    #[error(transparent)]
    Transport(#[from] TransportError),

    /// A request that cannot be served as given.
    #[error("invalid {field}: {reason}")]
    InvalidRequest {
        /// The request field at fault (`prompt.token_ids`, `max_new_tokens`, ...).
        field: String,
        /// Why, with the numbers and the limit.
        reason: String,
    },

    /// Admission refused: too many active and waiting requests.
    #[error("overloaded: {reason}")]
    Overloaded {
        /// The limits that were reached.
        reason: String,
    },

    /// The engine's scheduler thread is gone (the server is shutting down, or it failed).
    #[error("the generation engine has stopped")]
    EngineStopped,

    /// A peer needed at start-up (the coordinator, an expert worker's control service) did not answer.
    #[error("cannot reach {what} at {endpoint}: {reason}")]
    Unreachable {
        /// Which peer: "the coordinator", "expert worker ew-1".
        what: String,
        /// Its endpoint.
        endpoint: String,
        /// The last error seen.
        reason: String,
    },

    /// The tokenizer could not be loaded or used.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The gRPC server failed to start or stopped with an error.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),

    /// An engine or server option out of its range.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option (`max_batch`, `micro_batches`, ...).
        option: String,
        /// Why, with the accepted range.
        reason: String,
    },

    /// The forward pass panicked (a bug): the step's requests fail, the engine goes on.
    #[error("the forward pass panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },

    /// The cluster store refused or failed a call: registration (e.g. a checkpoint other than the cluster's), or a
    /// placement read.
    #[error(transparent)]
    Store(#[from] CoordinatorError),

    /// The coordinator published no placement in time.
    #[error(
        "cluster {cluster} has no expert placement after {:.1} s: is a coordinator running for it, and have enough \
         expert workers joined?",
        waited.as_secs_f64()
    )]
    NoPlacement {
        /// The cluster.
        cluster: String,
        /// How long the worker waited.
        waited: Duration,
    },

    /// A thread, a thread pool or a server part could not be started.
    #[error("cannot start {what}: {reason}")]
    Startup {
        /// The thread, pool or service.
        what: String,
        /// The operating system's reason.
        reason: String,
    },
}

impl AttentionWorkerError {
    /// The error of a failed forward step: a dispatch failure is unwrapped from the [`ModelError::RoutedExperts`] that carried it
    /// through the forward pass (see [`DispatchError`]); any other model error is kept as it is.
    pub fn from_step(error: ModelError) -> Self {
        match error {
            ModelError::RoutedExperts { layer, retryable, source } => match source.downcast::<DispatchError>() {
                Ok(dispatch) => AttentionWorkerError::Dispatch(*dispatch),
                Err(source) => AttentionWorkerError::Model(ModelError::RoutedExperts { layer, retryable, source }),
            },
            other => AttentionWorkerError::Model(other),
        }
    }

    /// Whether the same operation may succeed if repeated (a lost expert worker may be replaced, an overloaded server
    /// may drain). The match is exhaustive on purpose, so a new variant has to decide.
    pub fn retryable(&self) -> bool {
        match self {
            AttentionWorkerError::Dispatch(e) => e.source.retryable(),
            AttentionWorkerError::Transport(e) => e.retryable(),
            AttentionWorkerError::Model(e) => e.retryable(),
            AttentionWorkerError::Store(e) => e.retryable(),
            AttentionWorkerError::Overloaded { .. }
            | AttentionWorkerError::Unreachable { .. }
            | AttentionWorkerError::NoPlacement { .. } => true,
            AttentionWorkerError::Placement { .. }
            | AttentionWorkerError::UncoveredExperts { .. }
            | AttentionWorkerError::InvalidRequest { .. }
            | AttentionWorkerError::EngineStopped
            | AttentionWorkerError::Tokenizer { .. }
            | AttentionWorkerError::Serve(_)
            | AttentionWorkerError::InvalidOption { .. }
            | AttentionWorkerError::Panicked { .. }
            | AttentionWorkerError::Startup { .. } => false,
        }
    }

    /// The gRPC status a client sees: the one mapping of this crate's errors to codes.
    pub fn to_status(&self) -> Status {
        let code = match self {
            AttentionWorkerError::Dispatch(e) => e.source.to_status().code(),
            AttentionWorkerError::Transport(e) => return e.to_status(),
            AttentionWorkerError::Model(ModelError::InvalidInput { .. }) => Code::InvalidArgument,
            AttentionWorkerError::Model(ModelError::ContextMember { .. }) => Code::Unavailable,
            AttentionWorkerError::Model(ModelError::KvCacheFull { .. }) => Code::ResourceExhausted,
            AttentionWorkerError::Model(_) => Code::Internal,
            AttentionWorkerError::InvalidRequest { .. } => Code::InvalidArgument,
            AttentionWorkerError::Overloaded { .. } => Code::ResourceExhausted,
            AttentionWorkerError::EngineStopped
            | AttentionWorkerError::Unreachable { .. }
            | AttentionWorkerError::NoPlacement { .. } => Code::Unavailable,
            AttentionWorkerError::Store(CoordinatorError::StoreUnavailable { .. }) => Code::Unavailable,
            AttentionWorkerError::Store(CoordinatorError::CheckpointMismatch { .. }) => Code::FailedPrecondition,
            AttentionWorkerError::Store(CoordinatorError::ContextTooLong { .. }) => Code::InvalidArgument,
            AttentionWorkerError::Store(_) => Code::Internal,
            AttentionWorkerError::Placement { .. } | AttentionWorkerError::UncoveredExperts { .. } => {
                Code::FailedPrecondition
            }
            AttentionWorkerError::Tokenizer { .. }
            | AttentionWorkerError::Serve(_)
            | AttentionWorkerError::InvalidOption { .. }
            | AttentionWorkerError::Panicked { .. }
            | AttentionWorkerError::Startup { .. } => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

impl From<AttentionWorkerError> for Status {
    fn from(error: AttentionWorkerError) -> Self {
        error.to_status()
    }
}
