//! How the controller talks to expert workers: the [`ExpertControl`] trait and its gRPC implementation.
//!
//! The trait keeps the leader loop testable without real workers; [`GrpcExpertControl`] speaks
//! `switchyard.v1.ExpertControl`, caching one lazily connected channel per endpoint and retrying calls that failed
//! with `Unavailable` (the worker restarting, a connection reset). Loads and unloads are idempotent on the worker
//! (held experts are skipped, missing ones ignored), so retrying them is safe.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use switchyard_proto::v1::expert_control_client::ExpertControlClient;
use switchyard_proto::v1::{LayerExperts, LoadExpertsRequest, UnloadExpertsRequest, WorkerStatusRequest};
use tonic::transport::{Channel, Endpoint};

use crate::store::{Backoff, BoxFuture};

/// Experts per MoE layer (decoder layer index -> expert ids), as in [`crate::WorkerPlacement::experts`].
pub type ExpertsByLayer = BTreeMap<u32, Vec<u32>>;

/// A control call to an expert worker failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} on expert worker {endpoint}: {reason}")]
pub struct ControlError {
    /// The worker's endpoint.
    pub endpoint: String,
    /// The call (`load`, `unload`, `status`).
    pub op: &'static str,
    /// What went wrong.
    pub reason: String,
    /// Whether the worker may answer a later attempt (it was unreachable or busy, not refusing).
    pub retryable: bool,
}

/// What an expert worker holds and which placement epochs it accepts dispatches for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerHolding {
    /// Experts held per MoE layer.
    pub held: ExpertsByLayer,
    /// Dispatches routed with an older epoch are refused.
    pub min_epoch: u64,
    /// Dispatches routed with a newer epoch are refused.
    pub max_epoch: u64,
}

/// Loads, unloads and inspects the experts of expert workers (by endpoint).
pub trait ExpertControl: Send + Sync + 'static {
    /// Loads `experts` (those held already are skipped), then accepts dispatches up to placement `epoch`. Returns
    /// the checkpoint bytes read.
    fn load<'a>(
        &'a self,
        endpoint: &'a str,
        experts: &'a ExpertsByLayer,
        epoch: u64,
    ) -> BoxFuture<'a, Result<u64, ControlError>>;

    /// Refuses dispatches older than `min_epoch`, then stops holding `experts`. Returns the bytes freed.
    fn unload<'a>(
        &'a self,
        endpoint: &'a str,
        experts: &'a ExpertsByLayer,
        min_epoch: u64,
    ) -> BoxFuture<'a, Result<u64, ControlError>>;

    /// What the worker holds now and its epoch window.
    fn status<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<WorkerHolding, ControlError>>;
}

/// Timeouts and retries of [`GrpcExpertControl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcControlOptions {
    /// How long connecting to a worker may take.
    pub connect_timeout: Duration,
    /// Deadline of a `Status` call.
    pub status_timeout: Duration,
    /// Deadline of a load or unload: reading a worker's share of a large checkpoint takes a while.
    pub load_timeout: Duration,
    /// Attempts per call while the worker answers `Unavailable`.
    pub attempts: u32,
}

impl Default for GrpcControlOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            status_timeout: Duration::from_secs(5),
            load_timeout: Duration::from_secs(600),
            attempts: 3,
        }
    }
}

/// [`ExpertControl`] over gRPC (`switchyard.v1.ExpertControl`).
pub struct GrpcExpertControl {
    options: GrpcControlOptions,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Default for GrpcExpertControl {
    fn default() -> Self {
        Self::new(GrpcControlOptions::default())
    }
}

impl GrpcExpertControl {
    /// A client with these timeouts; channels are opened on first use.
    pub fn new(options: GrpcControlOptions) -> Self {
        Self { options, channels: Mutex::new(HashMap::new()) }
    }

    fn channel(&self, endpoint: &str, op: &'static str) -> Result<Channel, ControlError> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| ControlError {
                endpoint: endpoint.to_string(),
                op,
                reason: format!("not a valid endpoint: {e}"),
                retryable: false,
            })?
            .connect_timeout(self.options.connect_timeout)
            .connect_lazy();
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }

    /// Runs `call` until it succeeds, fails with something other than `Unavailable`, or runs out of attempts.
    async fn call<T, F, Fut>(
        &self,
        endpoint: &str,
        op: &'static str,
        timeout: Duration,
        call: F,
    ) -> Result<T, ControlError>
    where
        F: Fn(ExpertControlClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let client = ExpertControlClient::new(self.channel(endpoint, op)?);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let attempts = self.options.attempts.max(1);
        let mut attempt = 1;
        loop {
            let status = match tokio::time::timeout(timeout, call(client.clone(), timeout)).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(format!("no answer within {:.1} s", timeout.as_secs_f64())),
            };
            let retryable = matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded);
            if status.code() != tonic::Code::Unavailable || attempt >= attempts {
                return Err(ControlError {
                    endpoint: endpoint.to_string(),
                    op,
                    reason: format!("{:?}: {} (attempt {attempt} of {attempts})", status.code(), status.message()),
                    retryable,
                });
            }
            let delay = backoff.next_delay();
            tracing::debug!(endpoint, op, attempt, "expert worker unavailable ({}); retrying", status.message());
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// The map as the wire's per-layer lists.
pub(crate) fn to_wire(experts: &ExpertsByLayer) -> Vec<LayerExperts> {
    experts.iter().map(|(&layer, ids)| LayerExperts { layer, experts: ids.clone() }).collect()
}

/// The wire's per-layer lists as a sorted map (repeated layers merge).
pub(crate) fn from_wire(experts: Vec<LayerExperts>) -> ExpertsByLayer {
    let mut map = ExpertsByLayer::new();
    for entry in experts {
        map.entry(entry.layer).or_default().extend(entry.experts);
    }
    for ids in map.values_mut() {
        ids.sort_unstable();
        ids.dedup();
    }
    map
}

fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

impl ExpertControl for GrpcExpertControl {
    fn load<'a>(
        &'a self,
        endpoint: &'a str,
        experts: &'a ExpertsByLayer,
        epoch: u64,
    ) -> BoxFuture<'a, Result<u64, ControlError>> {
        Box::pin(self.call(endpoint, "load", self.options.load_timeout, move |mut client, timeout| async move {
            let request = LoadExpertsRequest { experts: to_wire(experts), placement_epoch: epoch };
            Ok(client.load_experts(with_deadline(request, timeout)).await?.into_inner().bytes_read)
        }))
    }

    fn unload<'a>(
        &'a self,
        endpoint: &'a str,
        experts: &'a ExpertsByLayer,
        min_epoch: u64,
    ) -> BoxFuture<'a, Result<u64, ControlError>> {
        Box::pin(self.call(endpoint, "unload", self.options.load_timeout, move |mut client, timeout| async move {
            let request = UnloadExpertsRequest { experts: to_wire(experts), min_epoch };
            Ok(client.unload_experts(with_deadline(request, timeout)).await?.into_inner().bytes_freed)
        }))
    }

    fn status<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<WorkerHolding, ControlError>> {
        Box::pin(self.call(endpoint, "status", self.options.status_timeout, |mut client, timeout| async move {
            let status = client.status(with_deadline(WorkerStatusRequest {}, timeout)).await?.into_inner();
            Ok(WorkerHolding {
                held: from_wire(status.held),
                min_epoch: status.min_placement_epoch,
                max_epoch: status.placement_epoch,
            })
        }))
    }
}
