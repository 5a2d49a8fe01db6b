//! The simulator's errors.

use std::path::PathBuf;

use switchyard_coordinator::CoordinatorError;

/// Errors of the simulator crate.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A setting of [`crate::SimConfig`] (or a value parsed for one) is unusable.
    #[error("{field}: {reason}")]
    Config {
        /// The setting, as named in [`crate::SimConfig`].
        field: &'static str,
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// The coordinator's solver refused a placement problem the simulation built.
    #[error(transparent)]
    Placement(#[from] CoordinatorError),
    /// The plot could not be drawn or written.
    #[error("plot {}: {reason}", path.display())]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

pub(crate) fn config_error(field: &'static str, reason: impl Into<String>) -> SimError {
    SimError::Config { field, reason: reason.into() }
}
