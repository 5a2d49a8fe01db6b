//! The one error type of the expert worker's own operations (loading, control, serving). Dispatch errors are
//! [`switchyard_transport::TransportError`]s: the transport owns their wire mapping.

use std::path::PathBuf;

use switchyard_coordinator::CoordinatorError;
use switchyard_model::ModelError;
use switchyard_transport::error::error_chain;
use tonic::{Code, Status};

use crate::spec::SpecError;

/// Errors of loading, controlling and serving an expert worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The model's `config.json` could not be read or is invalid.
    #[error("reading the model config {}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<ModelError>,
    },
    /// The checkpoint could not be opened.
    #[error("opening the checkpoint in {}", dir.display())]
    Checkpoint {
        /// The model directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Box<ModelError>,
    },
    /// The checkpoint's fingerprint (what cluster members must agree on) could not be computed.
    #[error("fingerprinting the checkpoint in {}", dir.display())]
    Fingerprint {
        /// The model directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Box<ModelError>,
    },
    /// Sizing the routed experts from the checkpoint's headers failed.
    #[error("sizing the routed experts of the checkpoint in {}", dir.display())]
    ExpertSizes {
        /// The model directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Box<ModelError>,
    },
    /// Joining the cluster failed: the cluster serves another checkpoint ([`CoordinatorError::CheckpointMismatch`],
    /// whose message names both hashes), the store is unreachable, or a name is invalid.
    #[error(transparent)]
    Cluster(#[from] CoordinatorError),
    /// The `--experts` spec does not parse or does not fit the model.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A load or unload request names experts the model does not have.
    #[error("invalid experts: {reason}")]
    InvalidExperts {
        /// What is wrong, naming the layer or expert.
        reason: String,
    },
    /// The device the experts were to compute on could not be opened.
    #[error("opening {device} for the experts")]
    OpenDevice {
        /// The device asked for, e.g. `cuda:0`.
        device: String,
        /// Why (the kernels' error names what is missing: the `cuda` feature, the driver, the GPU).
        #[source]
        source: Box<ModelError>,
    },
    /// A layer's experts could not be copied to the GPU.
    #[error("copying the experts of layer {layer} to the GPU")]
    Device {
        /// Decoder layer index.
        layer: usize,
        /// Why (the kernels' error names what is missing: the `cuda` feature, the driver, the GPU).
        #[source]
        source: Box<ModelError>,
    },
    /// Reading one expert's weights failed.
    #[error("loading expert {expert} of layer {layer}")]
    LoadExpert {
        /// Decoder layer index.
        layer: usize,
        /// Expert id.
        expert: u32,
        /// Why.
        #[source]
        source: Box<ModelError>,
    },
    /// The batching executor's thread could not be started.
    #[error("starting the expert executor thread")]
    Executor(#[source] std::io::Error),
    /// The gRPC reflection service could not be built from the descriptor set.
    #[error("building the gRPC reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
    /// A blocking task of a control request died.
    #[error("control task failed: {reason}")]
    Task {
        /// What happened to it.
        reason: String,
    },
}

impl WorkerError {
    /// The gRPC status a control request answers with: the caller's mistakes are `InvalidArgument`, the rest
    /// `Internal`. The message carries the whole chain of causes.
    pub fn to_status(&self) -> Status {
        let code = match self {
            WorkerError::Spec(_) | WorkerError::InvalidExperts { .. } => Code::InvalidArgument,
            _ => Code::Internal,
        };
        Status::new(code, error_chain(self))
    }
}
