//! The one error type of the transport crate and its single mapping to and from gRPC statuses.
//!
//! An error crosses the wire as a `tonic::Status` whose code follows the project convention (bad input ->
//! `InvalidArgument` naming the field, stale placement epoch -> `FailedPrecondition` with both epochs, lost peer ->
//! `Unavailable`) plus `switchyard-*` metadata, so that the receiving side rebuilds the same variant: an attention worker
//! must act on a stale epoch, not parse a message.

use std::borrow::Borrow;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Why a dispatch (or a context-parallel attention call) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached, its stream broke, or it died before answering. Retryable: an expert step is
    /// pure, so it can be re-sent (to a replica).
    #[error("peer {peer} unavailable: {reason}")]
    Unavailable {
        /// The worker id (or endpoint) that was not reached.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// Bytes, shape or dtype of a payload are wrong.
    #[error("invalid payload: {what}: {reason}")]
    InvalidPayload {
        /// The field, e.g. `activations.data`.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The sender routed with a placement epoch the expert worker no longer (or not yet) serves.
    #[error("stale placement epoch: request routed with epoch {sent}, expert worker is at epoch {current}")]
    StaleEpoch {
        /// The epoch in the request.
        sent: u64,
        /// The epoch of the expert worker.
        current: u64,
    },
    /// The peer answered with an error that has no more specific variant.
    #[error("peer {peer} rejected the request ({code:?}): {message}")]
    Rejected {
        /// The worker id that answered.
        peer: String,
        /// The gRPC code it answered with.
        code: Code,
        /// Its message.
        message: String,
    },
    /// The batch names an expert this worker does not hold.
    #[error("expert {expert} of layer {layer} is not held by this expert worker")]
    ExpertNotHeld {
        /// Decoder layer.
        layer: u32,
        /// Expert index within the layer.
        expert: u32,
    },
    /// The batch names a layer that is not an MoE layer of the model.
    #[error("layer {layer} is not an MoE layer of this model")]
    UnknownLayer {
        /// Decoder layer.
        layer: u32,
    },
    /// The expert computation itself failed.
    #[error("expert computation failed: {reason}")]
    Compute {
        /// What failed.
        reason: String,
    },
}

/// Metadata key naming the variant of a status produced by [`TransportError::to_status`].
const KIND: &str = "switchyard-error";
const FIELD: &str = "switchyard-field";
const EPOCH_SENT: &str = "switchyard-epoch-sent";
const EPOCH_CURRENT: &str = "switchyard-epoch-current";
const LAYER: &str = "switchyard-layer";
const EXPERT: &str = "switchyard-expert";

impl TransportError {
    /// Whether the same request may be sent again (to the same or another worker) and succeed.
    pub fn retryable(&self) -> bool {
        match self {
            TransportError::Unavailable { .. } => true,
            TransportError::InvalidPayload { .. }
            | TransportError::StaleEpoch { .. }
            | TransportError::Rejected { .. }
            | TransportError::ExpertNotHeld { .. }
            | TransportError::UnknownLayer { .. }
            | TransportError::Compute { .. } => false,
        }
    }

    /// The gRPC status a server answers with. The message is this error's `Display`; metadata carries the fields so
    /// that [`TransportError::from_status`] rebuilds the variant.
    pub fn to_status(&self) -> Status {
        let mut metadata = MetadataMap::new();
        let mut put = |key: &'static str, value: String| {
            // A value that is not a valid header (non-ASCII field name) is left out; the message still says it all.
            if let Ok(value) = MetadataValue::try_from(value) {
                metadata.insert(key, value);
            }
        };
        let code = match self {
            TransportError::InvalidPayload { what, .. } => {
                put(KIND, "invalid-payload".into());
                put(FIELD, what.clone());
                Code::InvalidArgument
            }
            TransportError::ExpertNotHeld { layer, expert } => {
                put(KIND, "expert-not-held".into());
                put(LAYER, layer.to_string());
                put(EXPERT, expert.to_string());
                Code::InvalidArgument
            }
            TransportError::UnknownLayer { layer } => {
                put(KIND, "unknown-layer".into());
                put(LAYER, layer.to_string());
                Code::InvalidArgument
            }
            TransportError::StaleEpoch { sent, current } => {
                put(KIND, "stale-epoch".into());
                put(EPOCH_SENT, sent.to_string());
                put(EPOCH_CURRENT, current.to_string());
                Code::FailedPrecondition
            }
            TransportError::Unavailable { .. } => Code::Unavailable,
            TransportError::Compute { .. } => {
                put(KIND, "compute".into());
                Code::Internal
            }
            TransportError::Rejected { code, .. } => *code,
        };
        let message = match self {
            // Relayed as the peer said it, so that relaying twice does not nest the text.
            TransportError::Rejected { message, .. } => message.clone(),
            _ => self.to_string(),
        };
        Status::with_metadata(code, message, metadata)
    }

    /// Rebuilds the error a peer (`peer`: its worker id) answered with. Statuses that mean the connection or the peer
    /// was lost (`Unavailable`, `Unknown`, `Cancelled`, `Aborted`, `DeadlineExceeded`, and `Internal` raised by the
    /// HTTP/2 layer rather than sent by the peer) become [`TransportError::Unavailable`]; statuses made by
    /// [`TransportError::to_status`] become their variant; anything else is [`TransportError::Rejected`].
    /// Takes the status by value or by reference.
    pub fn from_status(peer: impl Into<String>, status: impl Borrow<Status>) -> TransportError {
        let peer = peer.into();
        let status = status.borrow();
        let metadata = status.metadata();
        let text = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let number = |key: &str| text(key).and_then(|v| v.parse::<u64>().ok());
        let small = |key: &str| text(key).and_then(|v| v.parse::<u32>().ok());
        let message = status.message().to_owned();
        let rebuilt = match (status.code(), text(KIND).as_deref()) {
            (Code::InvalidArgument, Some("invalid-payload")) => text(FIELD).map(|what| {
                let prefix = format!("invalid payload: {what}: ");
                let reason = message.strip_prefix(&prefix).unwrap_or(&message).to_owned();
                TransportError::InvalidPayload { what, reason }
            }),
            (Code::InvalidArgument, Some("expert-not-held")) => {
                small(LAYER).zip(small(EXPERT)).map(|(layer, expert)| TransportError::ExpertNotHeld { layer, expert })
            }
            (Code::InvalidArgument, Some("unknown-layer")) => {
                small(LAYER).map(|layer| TransportError::UnknownLayer { layer })
            }
            (Code::FailedPrecondition, Some("stale-epoch")) => number(EPOCH_SENT)
                .zip(number(EPOCH_CURRENT))
                .map(|(sent, current)| TransportError::StaleEpoch { sent, current }),
            (Code::Internal, Some("compute")) => Some(TransportError::Compute {
                reason: message.strip_prefix("expert computation failed: ").unwrap_or(&message).to_owned(),
            }),
            _ => None,
        };
        if let Some(error) = rebuilt {
            return error;
        }
        // A status raised locally from an HTTP/2 or I/O failure carries its cause as `source`; one sent by the peer
        // does not.
        let lost = match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::DeadlineExceeded => true,
            Code::Internal => std::error::Error::source(status).is_some() || message.starts_with("h2 protocol error"),
            _ => false,
        };
        if lost {
            TransportError::Unavailable { peer, reason: format!("{:?}: {message}", status.code()) }
        } else {
            TransportError::Rejected { peer, code: status.code(), message }
        }
    }
}

/// An error and its causes on one line, `error: cause: cause`, as an operator reads it in a log (tonic's transport
/// errors say only "transport error" at the top).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn through_status(error: TransportError) -> TransportError {
        TransportError::from_status("w0", error.to_status())
    }

    #[test]
    fn codes_follow_the_convention() {
        let invalid = TransportError::InvalidPayload { what: "activations.data".into(), reason: "too short".into() };
        assert_eq!(invalid.to_status().code(), Code::InvalidArgument);
        assert!(invalid.to_status().message().contains("activations.data"));
        assert_eq!(TransportError::ExpertNotHeld { layer: 1, expert: 2 }.to_status().code(), Code::InvalidArgument);
        assert_eq!(TransportError::UnknownLayer { layer: 1 }.to_status().code(), Code::InvalidArgument);
        let stale = TransportError::StaleEpoch { sent: 3, current: 5 }.to_status();
        assert_eq!(stale.code(), Code::FailedPrecondition);
        assert!(stale.message().contains('3') && stale.message().contains('5'));
        let lost = TransportError::Unavailable { peer: "w0".into(), reason: "gone".into() };
        assert_eq!(lost.to_status().code(), Code::Unavailable);
        assert_eq!(TransportError::Compute { reason: "oom".into() }.to_status().code(), Code::Internal);
        let rejected =
            TransportError::Rejected { peer: "w".into(), code: Code::ResourceExhausted, message: "busy".into() };
        assert_eq!(rejected.to_status().code(), Code::ResourceExhausted);
    }

    #[test]
    fn variants_survive_the_wire() {
        for error in [
            TransportError::InvalidPayload { what: "expert_ids".into(), reason: "8 bytes for 3 tokens".into() },
            TransportError::StaleEpoch { sent: 3, current: 5 },
            TransportError::ExpertNotHeld { layer: 1, expert: 7 },
            TransportError::UnknownLayer { layer: 9 },
            TransportError::Compute { reason: "shape".into() },
            TransportError::Rejected { peer: "w0".into(), code: Code::ResourceExhausted, message: "busy".into() },
        ] {
            assert_eq!(through_status(error.clone()), error);
        }
        let lost = through_status(TransportError::Unavailable { peer: "elsewhere".into(), reason: "gone".into() });
        assert!(matches!(&lost, TransportError::Unavailable { peer, .. } if peer == "w0"), "{lost:?}");
    }

    #[test]
    fn lost_connections_are_retryable() {
        for code in [Code::Unavailable, Code::Unknown, Code::Cancelled, Code::DeadlineExceeded] {
            let error = TransportError::from_status("w0", Status::new(code, "broken"));
            assert!(error.retryable(), "{code:?} -> {error:?}");
        }
        let plain = TransportError::from_status("w0", Status::invalid_argument("bad"));
        assert!(matches!(plain, TransportError::Rejected { code: Code::InvalidArgument, .. }));
        assert!(!plain.retryable());
    }
}
