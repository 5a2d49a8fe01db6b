//! The one error type of the planner.

use std::path::PathBuf;

/// What can go wrong while planning. Every message names the input at fault and what would be accepted.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--model` is neither a preset nor a model directory.
    #[error("unknown model {name:?}: expected one of {known} or a model directory with a config.json")]
    UnknownModel {
        /// What was asked for.
        name: String,
        /// The preset names.
        known: String,
    },

    /// `--gpu` names no hardware profile.
    #[error("unknown hardware profile {name:?}: expected one of {known}")]
    UnknownHardware {
        /// What was asked for.
        name: String,
        /// The profile names.
        known: String,
    },

    /// The model directory or its checkpoint could not be read.
    #[error("reading the model in {}", dir.display())]
    Model {
        /// The model directory.
        dir: PathBuf,
        /// What the model crate reported.
        #[source]
        source: Box<switchyard_model::ModelError>,
    },

    /// A calibration file could not be read or is not what `switchyard bench` writes.
    #[error("calibration file {}: {reason}", path.display())]
    Calibration {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A request parameter is out of range or contradicts another.
    #[error("invalid {what}: {reason}")]
    InvalidRequest {
        /// The flag or field at fault.
        what: String,
        /// Why, naming the limit.
        reason: String,
    },

    /// No cluster shape within the search limits meets the request.
    #[error("no cluster shape meets the request: {reason}")]
    Infeasible {
        /// The constraint that could not be met, with the numbers.
        reason: String,
    },

    /// The plot could not be drawn or written (the message names the file).
    #[error(transparent)]
    Plot(#[from] switchyard_simulator::SimError),

    /// The model or hardware cannot drive the simulator.
    #[error("cannot simulate {what}: {reason}")]
    Simulation {
        /// The model or profile at fault.
        what: String,
        /// Why, naming what would be accepted.
        reason: String,
    },

    /// A file could not be written.
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl PlanError {
    /// An [`PlanError::InvalidRequest`] about `what`.
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        PlanError::InvalidRequest { what: what.into(), reason: reason.into() }
    }
}
