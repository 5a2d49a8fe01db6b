//! [`RemoteExperts`]: the forward pass's routed experts, computed by expert workers through a [`Transport`].
//!
//! One call is one MoE layer step of one micro-batch: its rows are grouped by the expert worker chosen for their
//! expert, every group is dispatched at once, and the outputs are scattered back to row order. The forward pass calls
//! it from a rayon thread while the shared expert runs beside it, so the network wait overlaps that compute.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::future::join_all;
use switchyard_model::{ModelError, RoutedExperts};
use switchyard_transport::{ExpertBatch, Transport, TransportError};
use tokio::runtime::Handle;

use crate::error::DispatchError;
use crate::placement::RoutingTable;
use crate::AttentionWorkerError;

thread_local! {
    /// The micro-batch (ping-pong lane) whose forward pass this thread works for; set once per thread of a lane's
    /// pool, because `RoutedExperts::compute` is called on whichever thread of that pool reaches the MoE block.
    static MICRO_BATCH: Cell<u32> = const { Cell::new(0) };
}

/// A rayon pool whose threads dispatch as micro-batch `micro_batch`: run a micro-batch's `forward_batch` inside its
/// `install` so that its dispatches carry that id.
pub fn micro_batch_pool(micro_batch: u32, threads: usize) -> Result<rayon::ThreadPool, AttentionWorkerError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("sy-mb{micro_batch}-{i}"))
        .start_handler(move |_| MICRO_BATCH.with(|m| m.set(micro_batch)))
        .build()
        .map_err(|e| AttentionWorkerError::Startup {
            what: format!("the thread pool of micro-batch {micro_batch}"),
            reason: e.to_string(),
        })
}

/// How long a dispatch may wait for its expert worker by default. A worker that dies is noticed at once (the stream
/// breaks); this bounds the wait on one that stopped answering without closing its connection.
pub const DEFAULT_DISPATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Routed experts on expert workers, reached through a [`Transport`].
///
/// `compute` blocks on `runtime` ([`Handle::block_on`]), so it must be called from a thread outside the runtime
/// (a rayon thread, a `spawn_blocking` thread, a plain `std::thread`), never from an async task. Run the forward pass
/// on a pool of its own ([`micro_batch_pool`], as the engine does): if the blocked threads were the global rayon
/// pool's, in-process expert services that compute on that pool could wait for them forever.
pub struct RemoteExperts {
    routing: RwLock<Arc<RoutingTable>>,
    transport: Arc<dyn Transport>,
    runtime: Handle,
    attention_worker: String,
    timeout: Duration,
    next_step: AtomicU64,
    /// Tokens routed to each expert since start, `[layer * experts_per_layer + expert]` (dense layers stay 0).
    expert_tokens: Vec<AtomicU64>,
    experts_per_layer: usize,
}

impl RemoteExperts {
    /// Routes with `routing`, sends through `transport` on `runtime`, and signs dispatches as `attention_worker`.
    pub fn new(
        routing: Arc<RoutingTable>,
        transport: Arc<dyn Transport>,
        runtime: Handle,
        attention_worker: impl Into<String>,
    ) -> Self {
        let experts_per_layer = routing.experts_per_layer();
        let expert_tokens = (0..routing.num_layers() * experts_per_layer).map(|_| AtomicU64::new(0)).collect();
        Self {
            routing: RwLock::new(routing),
            transport,
            runtime,
            attention_worker: attention_worker.into(),
            timeout: DEFAULT_DISPATCH_TIMEOUT,
            next_step: AtomicU64::new(0),
            expert_tokens,
            experts_per_layer,
        }
    }

    /// Replaces the dispatch timeout ([`DEFAULT_DISPATCH_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The routing table in use.
    pub fn routing(&self) -> Arc<RoutingTable> {
        self.routing.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Routes later steps with `routing` (a new placement epoch of the same model).
    pub fn set_routing(&self, routing: Arc<RoutingTable>) {
        *self.routing.write().unwrap_or_else(PoisonError::into_inner) = routing;
    }

    /// Tokens routed per decoder layer since start (0 for dense layers): for metrics.
    pub fn routed_tokens(&self) -> Vec<u64> {
        self.expert_tokens
            .chunks(self.experts_per_layer.max(1))
            .map(|layer| layer.iter().map(|c| c.load(Ordering::Relaxed)).sum())
            .collect()
    }

    /// Tokens routed to each expert of `layer` since start (empty for a layer out of range): what load balancing and
    /// hot-expert replication will read.
    pub fn expert_tokens(&self, layer: usize) -> Vec<u64> {
        let start = layer * self.experts_per_layer;
        self.expert_tokens
            .get(start..start + self.experts_per_layer)
            .map(|counters| counters.iter().map(|c| c.load(Ordering::Relaxed)).collect())
            .unwrap_or_default()
    }

    /// Dispatches sent so far (each is one layer step of one micro-batch; its step id).
    pub fn steps_dispatched(&self) -> u64 {
        self.next_step.load(Ordering::Relaxed)
    }

    /// Sends `rows` of one layer step to `worker`, resolving to their outputs in row order.
    #[allow(clippy::too_many_arguments)]
    fn dispatch_group(
        &self,
        routing: &RoutingTable,
        worker: usize,
        rows: &[usize],
        layer: usize,
        step_id: u64,
        inputs: &[f32],
        experts: &[u32],
        hidden: usize,
    ) -> impl std::future::Future<Output = Result<Vec<f32>, DispatchError>> + Send + 'static {
        let micro_batch = MICRO_BATCH.with(Cell::get);
        let mut batch_inputs = Vec::with_capacity(rows.len() * hidden);
        for &row in rows {
            batch_inputs.extend_from_slice(&inputs[row * hidden..(row + 1) * hidden]);
        }
        let batch = ExpertBatch {
            step_id,
            micro_batch,
            layer: layer as u32,
            placement_epoch: routing.epoch(),
            attention_worker: self.attention_worker.clone(),
            experts: rows.iter().map(|&r| experts[r]).collect(),
            inputs: batch_inputs,
            hidden,
        };
        let id = routing.workers()[worker].id.clone();
        let expected = rows.len() * hidden;
        let dispatch = self.transport.dispatch(&id, batch);
        let timeout = self.timeout;
        async move {
            let fail = |source: TransportError| DispatchError { worker: id.clone(), layer, step_id, micro_batch, source };
            let outputs = match tokio::time::timeout(timeout, dispatch).await {
                Ok(Ok(outputs)) => outputs,
                Ok(Err(source)) => return Err(fail(source)),
                Err(_) => {
                    return Err(fail(TransportError::Unavailable {
                        peer: id.clone(),
                        reason: format!("no answer within {timeout:?}"),
                    }))
                }
            };
            if outputs.len() != expected {
                return Err(fail(TransportError::InvalidPayload {
                    what: "expert outputs".into(),
                    reason: format!("{} values for {} tokens of hidden size {hidden}", outputs.len(), expected / hidden),
                }));
            }
            Ok(outputs)
        }
    }
}

impl RoutedExperts for RemoteExperts {
    fn compute(&self, layer: usize, inputs: &[f32], experts: &[u32], hidden: usize) -> Result<Vec<f32>, ModelError> {
        if inputs.len() != experts.len() * hidden {
            return Err(ModelError::InvalidInput {
                what: "routed expert inputs".into(),
                reason: format!("{} values for {} tokens of hidden size {hidden}", inputs.len(), experts.len()),
            });
        }
        if experts.is_empty() {
            return Ok(Vec::new());
        }
        let routing = self.routing();
        let step_id = self.next_step.fetch_add(1, Ordering::Relaxed);
        let micro_batch = MICRO_BATCH.with(Cell::get);
        let span = tracing::debug_span!("dispatch", layer, step_id, micro_batch, tokens = experts.len());
        let _entered = span.enter();

        let mut outputs = vec![0.0; inputs.len()];
        let mut remaining: Vec<usize> = (0..experts.len()).collect();
        // Workers that failed this step with a retryable error: their rows go to other replicas. A step is pure, so
        // re-sending it gives the same outputs; only when no replica is left does the step fail.
        let mut failed: Vec<usize> = Vec::new();
        let mut last_failure: Option<DispatchError> = None;
        while !remaining.is_empty() {
            // One replica per (layer, expert) per attempt: all of an expert's rows go to the same worker, so it
            // computes them as one group; the next step takes the next replica.
            let mut chosen: BTreeMap<u32, usize> = BTreeMap::new();
            let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for &row in &remaining {
                let expert = experts[row];
                let worker = match chosen.get(&expert) {
                    Some(&w) => w,
                    None => match routing.choose_index_excluding(layer, expert, &failed) {
                        Some(w) => {
                            chosen.insert(expert, w);
                            w
                        }
                        None => {
                            return Err(match last_failure {
                                Some(failure) => failure.into_model_error(),
                                None => ModelError::InvalidInput {
                                    what: "routed expert".into(),
                                    reason: format!(
                                        "expert {expert} of layer {layer} is held by no expert worker in placement \
                                         epoch {}",
                                        routing.epoch()
                                    ),
                                },
                            })
                        }
                    },
                };
                groups.entry(worker).or_default().push(row);
            }
            let pending: Vec<_> = groups
                .iter()
                .map(|(&worker, rows)| self.dispatch_group(&routing, worker, rows, layer, step_id, inputs, experts, hidden))
                .collect();
            remaining.clear();
            for (answer, (worker, rows)) in self.runtime.block_on(join_all(pending)).into_iter().zip(groups) {
                match answer {
                    Ok(computed) => {
                        for (i, &row) in rows.iter().enumerate() {
                            outputs[row * hidden..(row + 1) * hidden]
                                .copy_from_slice(&computed[i * hidden..(i + 1) * hidden]);
                        }
                    }
                    Err(failure) if failure.source.retryable() => {
                        tracing::warn!(worker = %failure.worker, error = %failure, "re-sending to other replicas");
                        failed.push(worker);
                        remaining.extend(rows);
                        last_failure = Some(failure);
                    }
                    Err(failure) => return Err(failure.into_model_error()),
                }
            }
        }
        for &expert in experts {
            if let Some(counter) = self.expert_tokens.get(layer * self.experts_per_layer + expert as usize) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(outputs)
    }
}
