//! The coordinator's errors.

use std::path::PathBuf;

/// Errors of the coordinator crate.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The requested placement cannot be built.
    #[error("cannot place experts: {reason}")]
    Placement {
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// A placement file could not be read or parsed.
    #[error("placement file {}: {reason}", path.display())]
    PlacementFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl CoordinatorError {
    /// Whether retrying the same call may succeed (never, for these).
    pub fn retryable(&self) -> bool {
        match self {
            CoordinatorError::Placement { .. } | CoordinatorError::PlacementFile { .. } => false,
        }
    }
}
