//! The one mapping between the store's types and the `switchyard.v1` store messages, errors included, shared by
//! [`super::service`] (server) and [`super::remote`] (client).
//!
//! An error crosses the wire as a status whose details hold an encoded `StoreError`, so the client rebuilds the
//! variant the store raised (a lease that lapsed must stay `LeaseNotFound`, not become a message to parse). A status
//! without those details was made by the transport, not by the store: the connection failed, so it is retryable.

use prost::Message;
use switchyard_proto::v1;
use switchyard_proto::v1::store_error::Kind;
use tonic::{Code, Status};

use super::{CasOutcome, Condition, KeyValue, LeaderKey, LeaseId, TxnOp, WatchEvent};
use crate::CoordinatorError;

/// Largest message either side sends or accepts: a listing of a large cluster's keys must fit.
pub(super) const MAX_MESSAGE_BYTES: usize = 256 << 20;

fn malformed(what: &str) -> CoordinatorError {
    CoordinatorError::StoreRequest { op: "decode", key: String::new(), reason: format!("malformed message: {what}") }
}

impl From<KeyValue> for v1::KeyValue {
    fn from(kv: KeyValue) -> Self {
        Self {
            key: kv.key,
            value: kv.value.into(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease.map(|l| l.0),
        }
    }
}

impl From<v1::KeyValue> for KeyValue {
    fn from(kv: v1::KeyValue) -> Self {
        Self {
            key: kv.key,
            value: kv.value.into(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease.map(LeaseId),
        }
    }
}

impl From<LeaderKey> for v1::LeaderKey {
    fn from(leader: LeaderKey) -> Self {
        Self {
            election: leader.election,
            key: leader.key,
            create_revision: leader.create_revision,
            lease: leader.lease.0,
        }
    }
}

impl From<v1::LeaderKey> for LeaderKey {
    fn from(leader: v1::LeaderKey) -> Self {
        Self {
            election: leader.election,
            key: leader.key,
            create_revision: leader.create_revision,
            lease: LeaseId(leader.lease),
        }
    }
}

impl From<WatchEvent> for v1::WatchEvent {
    fn from(event: WatchEvent) -> Self {
        use v1::watch_event::Event;
        let event = match event {
            WatchEvent::Put(kv) => Event::Put(kv.into()),
            WatchEvent::Delete { key, revision } => Event::Delete(v1::KeyDeleted { key, revision }),
        };
        Self { event: Some(event) }
    }
}

impl TryFrom<v1::WatchEvent> for WatchEvent {
    type Error = CoordinatorError;

    fn try_from(event: v1::WatchEvent) -> Result<Self, CoordinatorError> {
        use v1::watch_event::Event;
        match event.event.ok_or_else(|| malformed("a watch event that is neither put nor delete"))? {
            Event::Put(kv) => Ok(WatchEvent::Put(kv.into())),
            Event::Delete(deleted) => Ok(WatchEvent::Delete { key: deleted.key, revision: deleted.revision }),
        }
    }
}

impl From<Condition> for v1::TxnCondition {
    fn from(condition: Condition) -> Self {
        use v1::txn_condition::Condition as C;
        let condition = match condition {
            Condition::ModRevision { key, expected } => C::ModRevision(v1::ModRevisionCondition { key, expected }),
            Condition::PrefixEmpty { prefix } => C::PrefixEmpty(prefix),
        };
        Self { condition: Some(condition) }
    }
}

impl TryFrom<v1::TxnCondition> for Condition {
    type Error = CoordinatorError;

    fn try_from(condition: v1::TxnCondition) -> Result<Self, CoordinatorError> {
        use v1::txn_condition::Condition as C;
        match condition.condition.ok_or_else(|| malformed("a transaction condition without a kind"))? {
            C::ModRevision(c) => Ok(Condition::ModRevision { key: c.key, expected: c.expected }),
            C::PrefixEmpty(prefix) => Ok(Condition::PrefixEmpty { prefix }),
        }
    }
}

/// A put, alone or inside a transaction.
pub(super) fn put_request(key: String, value: Vec<u8>, lease: Option<LeaseId>) -> v1::PutRequest {
    v1::PutRequest { key, value: value.into(), lease: lease.map(|l| l.0) }
}

impl From<TxnOp> for v1::TxnOp {
    fn from(op: TxnOp) -> Self {
        use v1::txn_op::Op;
        let op = match op {
            TxnOp::Put { key, value, lease } => Op::Put(put_request(key, value, lease)),
            TxnOp::Delete { key } => Op::Delete(key),
        };
        Self { op: Some(op) }
    }
}

impl TryFrom<v1::TxnOp> for TxnOp {
    type Error = CoordinatorError;

    fn try_from(op: v1::TxnOp) -> Result<Self, CoordinatorError> {
        use v1::txn_op::Op;
        match op.op.ok_or_else(|| malformed("a transaction op that is neither put nor delete"))? {
            Op::Put(put) => Ok(TxnOp::Put { key: put.key, value: put.value.into(), lease: put.lease.map(LeaseId) }),
            Op::Delete(key) => Ok(TxnOp::Delete { key }),
        }
    }
}

impl From<CasOutcome> for v1::CompareAndSwapResponse {
    fn from(outcome: CasOutcome) -> Self {
        use v1::compare_and_swap_response::Outcome;
        let outcome = match outcome {
            CasOutcome::Swapped { revision } => Outcome::Swapped(revision),
            CasOutcome::Conflict { current } => Outcome::Conflict(v1::CasConflict { current: current.map(Into::into) }),
        };
        Self { outcome: Some(outcome) }
    }
}

impl TryFrom<v1::CompareAndSwapResponse> for CasOutcome {
    type Error = CoordinatorError;

    fn try_from(response: v1::CompareAndSwapResponse) -> Result<Self, CoordinatorError> {
        use v1::compare_and_swap_response::Outcome;
        match response.outcome.ok_or_else(|| malformed("a compare-and-swap answer without an outcome"))? {
            Outcome::Swapped(revision) => Ok(CasOutcome::Swapped { revision }),
            Outcome::Conflict(conflict) => Ok(CasOutcome::Conflict { current: conflict.current.map(Into::into) }),
        }
    }
}

/// The status the server answers `error` with; [`from_status`] rebuilds it.
pub(super) fn to_status(error: CoordinatorError) -> Status {
    use CoordinatorError as E;
    let (kind, code, key, reason, lease) = match &error {
        E::StoreUnavailable { key, reason, .. } => {
            (Kind::Unavailable, Code::Unavailable, key.clone(), reason.clone(), 0)
        }
        E::StoreRequest { key, reason, .. } => {
            (Kind::Refused, Code::FailedPrecondition, key.clone(), reason.clone(), 0)
        }
        E::LeaseNotFound { lease } => (Kind::LeaseNotFound, Code::NotFound, String::new(), String::new(), *lease),
        E::WatchLost { prefix, reason } => (Kind::WatchLost, Code::OutOfRange, prefix.clone(), reason.clone(), 0),
        E::CorruptRecord { key, reason } => (Kind::CorruptRecord, Code::DataLoss, key.clone(), reason.clone(), 0),
        E::StoreUnreachable { endpoints, .. } => {
            (Kind::Unavailable, Code::Unavailable, endpoints.clone(), error.to_string(), 0)
        }
        other => (Kind::Refused, Code::FailedPrecondition, String::new(), other.to_string(), 0),
    };
    let details = v1::StoreError { kind: kind.into(), key, reason, lease };
    Status::with_details(code, error.to_string(), details.encode_to_vec().into())
}

/// Rebuilds the error of a call `op` about `key` to `store` (its description) from the status it failed with.
pub(super) fn from_status(op: &'static str, key: &str, status: &Status, store: &str) -> CoordinatorError {
    use CoordinatorError as E;
    let details = v1::StoreError::decode(status.details()).ok().filter(|d| d.kind() != Kind::Unspecified);
    if let Some(details) = details {
        let key = if details.key.is_empty() { key.to_string() } else { details.key.clone() };
        let reason = details.reason.clone();
        return match details.kind() {
            Kind::Unavailable => E::StoreUnavailable { op, key, reason },
            Kind::LeaseNotFound => E::LeaseNotFound { lease: details.lease },
            Kind::WatchLost => E::WatchLost { prefix: key, reason },
            Kind::CorruptRecord => E::CorruptRecord { key, reason },
            Kind::Refused | Kind::Unspecified => E::StoreRequest { op, key, reason },
        };
    }
    let key = key.to_string();
    let reason = format!("{store}: {:?}: {}", status.code(), root_cause(status));
    match status.code() {
        Code::Unimplemented => E::StoreRequest {
            op,
            key,
            reason: format!(
                "{reason}; it does not serve switchyard.v1.Store: is this the URL of a coordinator's store?"
            ),
        },
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unknown
        | Code::Internal
        | Code::ResourceExhausted => E::StoreUnavailable { op, key, reason },
        _ => E::StoreRequest { op, key, reason },
    }
}

/// The status's message and, for a transport failure, its root cause (tonic says only "transport error").
fn root_cause(status: &Status) -> String {
    let mut root = std::error::Error::source(status);
    while let Some(next) = root.and_then(|e| e.source()) {
        root = Some(next);
    }
    match root {
        Some(root) => format!("{}: {root}", status.message()),
        None => status.message().to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_survive_the_wire() {
        let through = |e: CoordinatorError| from_status("put", "/k", &to_status(e), "test store");
        let unavailable =
            through(CoordinatorError::StoreUnavailable { op: "put", key: "/k".into(), reason: "x".into() });
        assert!(matches!(&unavailable, CoordinatorError::StoreUnavailable { reason, .. } if reason == "x"));
        assert!(unavailable.retryable());
        assert!(matches!(
            through(CoordinatorError::LeaseNotFound { lease: 42 }),
            CoordinatorError::LeaseNotFound { lease: 42 }
        ));
        let lost = through(CoordinatorError::WatchLost { prefix: "/p/".into(), reason: "compacted".into() });
        assert!(matches!(&lost, CoordinatorError::WatchLost { prefix, .. } if prefix == "/p/"), "{lost:?}");
        let refused = through(CoordinatorError::StoreRequest { op: "txn", key: "/é".into(), reason: "twice".into() });
        assert!(
            matches!(&refused, CoordinatorError::StoreRequest { key, reason, .. } if key == "/é" && reason == "twice")
        );
        assert!(!refused.retryable());
    }

    #[test]
    fn transport_failures_are_retryable() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled, Code::Unknown] {
            let error = from_status("get", "/k", &Status::new(code, "broken"), "test store");
            assert!(error.retryable(), "{code:?} -> {error:?}");
        }
        let wrong_service = from_status("get", "/k", &Status::unimplemented("no such service"), "test store");
        assert!(wrong_service.to_string().contains("switchyard.v1.Store"), "{wrong_service}");
        assert!(!wrong_service.retryable());
    }
}
