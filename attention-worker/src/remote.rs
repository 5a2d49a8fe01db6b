//! [`RemoteExperts`]: the forward pass's routed experts, computed by expert workers through a [`Transport`].
//!
//! One call is one MoE layer step of one micro-batch: its rows are grouped by the expert worker chosen for their
//! expert, every group is dispatched at once, and the outputs are scattered back to row order. The forward pass calls
//! it from a rayon thread while the shared expert runs beside it, so the network wait overlaps that compute.
//!
//! Over a point-to-point transport (gRPC, in-process) each group is its own [`Transport::dispatch`], with its own
//! deadline and latency, and a group whose worker fails is re-sent to another replica or waits for a new placement.
//! Over a collective transport ([`Transport::lockstep`]) the step is one [`Transport::dispatch_step`], made
//! exactly once per layer step by every attention rank, rows or not, and never re-sent.
//!
//! Besides its own counters (read by the cluster link), it records the dispatch metrics of `/metrics` (routed tokens
//! per expert, dispatch bytes and latency; see [`crate::http::metrics`]) as it dispatches, once the process has a
//! metrics recorder.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::future::join_all;
use switchyard_model::experts::check_routed_inputs;
use switchyard_model::{ModelError, RoutedExperts};
use switchyard_transport::{codec, ExpertBatch, Transport, TransportError, WireDtype, WireFormat};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::error::DispatchError;
use crate::http::metrics::DispatchMetrics;
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
///
/// Each layer step routes with the table current when it starts and holds it (an `Arc` clone) until it ends, so
/// [`wait_until_unused`] tells when no step routes with a replaced table any more. With a recovery timeout
/// ([`RemoteExperts::with_recovery_timeout`]), a step whose experts no reachable worker of its table holds waits for
/// the coordinator's next placement instead of failing.
pub struct RemoteExperts {
    /// The table new steps route with; a step waiting for a re-placement subscribes to it.
    routing: watch::Sender<Arc<RoutingTable>>,
    transport: Arc<dyn Transport>,
    runtime: Handle,
    attention_worker: String,
    timeout: Duration,
    recovery_timeout: Duration,
    /// Times a step waited for a newer placement.
    recovery_waits: AtomicU64,
    next_step: AtomicU64,
    /// Tokens routed to each expert since start, `[layer * experts_per_layer + expert]` (dense layers stay 0).
    expert_tokens: Vec<AtomicU64>,
    experts_per_layer: usize,
    /// The transport's wire format, which the dispatch byte metrics count in.
    wire: WireFormat,
    /// Set at the first step after the process's metrics recorder is installed.
    metrics: OnceLock<Arc<DispatchMetrics>>,
    /// Whether the transport's steps are exchanges every rank of a communicator makes together
    /// ([`Transport::lockstep`]). Each layer step is then exactly one [`Transport::dispatch_step`], also when this
    /// micro-batch routes no row (or cannot route one: the step is made empty, then fails), and a failed step fails
    /// at once: re-sending to another replica or after a new placement would be an exchange the other ranks do not
    /// make, and a communicator that failed stays failed. The transport's own step deadline bounds a step; the
    /// dispatch timeout is not applied, because abandoning a step would not stop its exchange.
    lockstep: bool,
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
        let lockstep = transport.lockstep();
        let expert_tokens = (0..routing.num_layers() * experts_per_layer).map(|_| AtomicU64::new(0)).collect();
        Self {
            routing: watch::Sender::new(routing),
            transport,
            runtime,
            attention_worker: attention_worker.into(),
            timeout: DEFAULT_DISPATCH_TIMEOUT,
            recovery_timeout: Duration::ZERO,
            recovery_waits: AtomicU64::new(0),
            next_step: AtomicU64::new(0),
            expert_tokens,
            experts_per_layer,
            wire: WireFormat::default(),
            metrics: OnceLock::new(),
            lockstep,
        }
    }

    /// Tells the wire format `transport` encodes with ([`WireFormat::default`] unless told), so that the dispatch
    /// byte metrics count the bytes it sends and receives. Only metrics depend on it: the transport owns the encoding.
    pub fn with_wire(mut self, wire: WireFormat) -> Self {
        self.wire = wire;
        self
    }

    /// Replaces the dispatch timeout ([`DEFAULT_DISPATCH_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a step waits for a newer placement when its own cannot complete it: every replica of an expert
    /// failed with a retryable error, or a worker answered that the step's epoch is stale or that it no longer holds
    /// the expert. Zero (the default, for a cluster without a coordinator) fails such a step at once.
    pub fn with_recovery_timeout(mut self, timeout: Duration) -> Self {
        self.recovery_timeout = timeout;
        self
    }

    /// The routing table in use.
    pub fn routing(&self) -> Arc<RoutingTable> {
        self.routing.borrow().clone()
    }

    /// Routes later steps with `routing` (a new placement epoch of the same model), and wakes the steps waiting for
    /// a newer placement. Steps already running keep their table; [`wait_until_unused`] tells when they are done.
    pub fn set_routing(&self, routing: Arc<RoutingTable>) {
        self.routing.send_replace(routing);
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

    /// Times a step waited for a newer placement because its own could not complete it (see
    /// [`RemoteExperts::with_recovery_timeout`]): for metrics.
    pub fn recovery_waits(&self) -> u64 {
        self.recovery_waits.load(Ordering::Relaxed)
    }

    /// Dispatches sent so far (each is one layer step of one micro-batch; its step id).
    pub fn steps_dispatched(&self) -> u64 {
        self.next_step.load(Ordering::Relaxed)
    }

    /// The dispatch metrics' handles; `None` while the process has no metrics recorder (then nothing is recorded).
    fn metrics(&self) -> Option<&Arc<DispatchMetrics>> {
        if let Some(metrics) = self.metrics.get() {
            return Some(metrics);
        }
        let metrics = DispatchMetrics::registered(self.experts_per_layer)?;
        Some(self.metrics.get_or_init(|| Arc::new(metrics)))
    }

    /// The batch of `rows` of one layer step (`step`: layer, step id, the step's inputs, experts and row width).
    fn batch(&self, routing: &RoutingTable, rows: &[usize], step: &LayerStep<'_>) -> ExpertBatch {
        let hidden = step.hidden;
        let mut inputs = Vec::with_capacity(rows.len() * hidden);
        for &row in rows {
            inputs.extend_from_slice(&step.inputs[row * hidden..(row + 1) * hidden]);
        }
        ExpertBatch {
            step_id: step.step_id,
            micro_batch: MICRO_BATCH.with(Cell::get),
            layer: step.layer as u32,
            placement_epoch: routing.epoch(),
            attention_worker: self.attention_worker.clone(),
            experts: rows.iter().map(|&r| step.experts[r]).collect(),
            inputs,
            hidden,
        }
    }

    /// The dispatch bytes of `rows` rows as the metrics count them: (sent, received).
    fn group_bytes(&self, rows: usize, hidden: usize) -> (u64, u64) {
        let values = rows * hidden;
        (wire_bytes(values, self.wire.dispatch), wire_bytes(values, self.wire.combine))
    }

    /// Sends `rows` of one layer step to `worker`, resolving to their outputs in row order.
    fn dispatch_group(
        &self,
        routing: &RoutingTable,
        worker: usize,
        rows: &[usize],
        step: &LayerStep<'_>,
    ) -> impl std::future::Future<Output = Result<Vec<f32>, DispatchError>> + Send + 'static {
        let (layer, step_id, hidden) = (step.layer, step.step_id, step.hidden);
        let micro_batch = MICRO_BATCH.with(Cell::get);
        let batch = self.batch(routing, rows, step);
        let id = routing.workers()[worker].id.clone();
        let expected = rows.len() * hidden;
        let bytes = self.group_bytes(rows.len(), hidden);
        let metrics = self.metrics().cloned();
        let dispatch = self.transport.dispatch(&id, batch);
        let timeout = self.timeout;
        async move {
            // From the first poll: the groups' futures are all made before any is polled, and a transport encodes
            // when polled.
            let started = Instant::now();
            let fail = |source: TransportError| DispatchError {
                worker: id.clone(),
                layer,
                step_id,
                micro_batch,
                source,
                recovery_waited: None,
            };
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
            check_outputs(&outputs, expected, hidden).map_err(fail)?;
            if let Some(metrics) = metrics {
                metrics.dispatched(&id, bytes.0, bytes.1, started.elapsed());
            }
            Ok(outputs)
        }
    }

    /// After `failure` left a step routed with `used` unable to complete: waits up to the recovery timeout for a
    /// routing table of a newer placement epoch (the coordinator re-placing the lost or moved experts) and returns
    /// it, or fails with `failure` saying how long it waited.
    fn await_newer_routing(
        &self,
        used: &RoutingTable,
        failure: DispatchError,
        layer: usize,
        step_id: u64,
    ) -> Result<Arc<RoutingTable>, ModelError> {
        if self.recovery_timeout.is_zero() {
            return Err(failure.into_model_error());
        }
        let epoch = used.epoch();
        self.recovery_waits.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            layer, step_id, epoch, worker = %failure.worker, error = %failure,
            "placement epoch {epoch} cannot complete the step; waiting up to {:.1} s for a new placement",
            self.recovery_timeout.as_secs_f64()
        );
        let started = Instant::now();
        let mut tables = self.routing.subscribe();
        let timeout = self.recovery_timeout;
        // The timer is made inside the runtime: this thread is outside it.
        let newer = self.runtime.block_on(async move {
            let newer = tables.wait_for(|table| table.epoch() > epoch);
            // `self` holds the sender, so the channel cannot close while this waits.
            tokio::time::timeout(timeout, newer).await.map(|table| table.ok().map(|table| table.clone()))
        });
        match newer {
            Ok(Some(table)) => {
                tracing::warn!(
                    layer,
                    step_id,
                    epoch = table.epoch(),
                    waited_ms = started.elapsed().as_millis() as u64,
                    "re-sending the step's remaining rows with the new placement"
                );
                Ok(table)
            }
            Ok(None) | Err(_) => {
                tracing::warn!(layer, step_id, epoch, "no new placement in time; failing the step");
                Err(DispatchError { recovery_waited: Some(self.recovery_timeout), ..failure }.into_model_error())
            }
        }
    }
}

/// One MoE layer step of one micro-batch, as the forward pass hands it over.
struct LayerStep<'a> {
    layer: usize,
    step_id: u64,
    inputs: &'a [f32],
    experts: &'a [u32],
    hidden: usize,
}

/// Checks that a worker answered `expected` values (`hidden` per row).
fn check_outputs(outputs: &[f32], expected: usize, hidden: usize) -> Result<(), TransportError> {
    if outputs.len() == expected {
        return Ok(());
    }
    Err(TransportError::InvalidPayload {
        what: "expert outputs".into(),
        reason: format!("{} values for {} tokens of hidden size {hidden}", outputs.len(), expected / hidden.max(1)),
    })
}

/// Bytes `values` activations take on the wire in `dtype`, as the dispatch metrics count them: FP8's per-row scales
/// and message headers are left out (a few bytes per row of thousands of values).
fn wire_bytes(values: usize, dtype: WireDtype) -> u64 {
    (values * codec::bytes_per_value(dtype)) as u64
}

/// Whether a newer placement can fix a dispatch that failed with `error` although its worker was reached: the
/// worker has moved past the step's epoch, or no longer holds the expert the step's table sent it.
fn needs_newer_placement(error: &TransportError) -> bool {
    matches!(error, TransportError::StaleEpoch { .. } | TransportError::ExpertNotHeld { .. })
}

/// Resolves once no layer step routes with `old` any more, returning how long that took.
///
/// Call it after [`RemoteExperts::set_routing`] replaced `old`, holding no other clone of it: each step holds its
/// table for its duration, so the count of clones falls to this one when the last step of the old epoch is done.
/// Steps end within the dispatch timeout (plus the recovery timeout), so this does not wait forever.
pub async fn wait_until_unused(old: Arc<RoutingTable>) -> Duration {
    // Polled: a table has no drop hook, and steps are short next to the interval.
    const POLL: Duration = Duration::from_millis(2);
    let started = Instant::now();
    while Arc::strong_count(&old) > 1 {
        tokio::time::sleep(POLL).await;
    }
    started.elapsed()
}

impl RemoteExperts {
    /// Counts the step's routed tokens once its outputs are in.
    fn count_routed(&self, layer: usize, experts: &[u32]) {
        for &expert in experts {
            if let Some(counter) = self.expert_tokens.get(layer * self.experts_per_layer + expert as usize) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(metrics) = self.metrics() {
            metrics.routed(experts);
        }
    }

    /// One layer step over a collective transport (see [`Transport::lockstep`]): every row's expert goes to
    /// the first worker of the table holding it, the whole step is one [`Transport::dispatch_step`] (made even when
    /// there is nothing to send, or nothing that can be sent), and any failure fails the step.
    fn compute_in_lockstep(
        &self,
        layer: usize,
        inputs: &[f32],
        experts: &[u32],
        hidden: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let routing = self.routing();
        let step_id = self.next_step.fetch_add(1, Ordering::Relaxed);
        let micro_batch = MICRO_BATCH.with(Cell::get);
        let span = tracing::debug_span!("dispatch_step", layer, step_id, micro_batch, tokens = experts.len());
        let _entered = span.enter();
        let step = LayerStep { layer, step_id, inputs, experts, hidden };
        let (groups, refused) = match check_routed_inputs(inputs, experts, hidden) {
            Ok(()) => match lockstep_groups(&routing, layer, experts) {
                Ok(groups) => (groups, None),
                Err(expert) => (BTreeMap::new(), Some(unheld_expert(&routing, layer, expert))),
            },
            Err(error) => (BTreeMap::new(), Some(error)),
        };
        let batches: Vec<(String, ExpertBatch)> = groups
            .iter()
            .map(|(&worker, rows)| (routing.workers()[worker].id.clone(), self.batch(&routing, rows, &step)))
            .collect();
        let started = Instant::now();
        let answers = self.runtime.block_on(self.transport.dispatch_step(batches));
        let took = started.elapsed();
        if let Some(error) = refused {
            return Err(error);
        }
        if answers.len() != groups.len() {
            let error = TransportError::Compute {
                reason: format!("the transport answered {} of the step's {} batches", answers.len(), groups.len()),
            };
            let worker = routing.workers().first().map(|w| w.id.clone()).unwrap_or_default();
            return Err(DispatchError { worker, layer, step_id, micro_batch, source: error, recovery_waited: None }
                .into_model_error());
        }
        let metrics = self.metrics().cloned();
        let mut outputs = vec![0.0; inputs.len()];
        for (answer, (worker, rows)) in answers.into_iter().zip(groups) {
            let id = &routing.workers()[worker].id;
            let fail = |source: TransportError| {
                DispatchError { worker: id.clone(), layer, step_id, micro_batch, source, recovery_waited: None }
                    .into_model_error()
            };
            let computed = answer.map_err(fail)?;
            check_outputs(&computed, rows.len() * hidden, hidden).map_err(fail)?;
            for (i, &row) in rows.iter().enumerate() {
                outputs[row * hidden..(row + 1) * hidden].copy_from_slice(&computed[i * hidden..(i + 1) * hidden]);
            }
            if let Some(metrics) = &metrics {
                // One exchange carries every group: each worker's latency is the step's.
                let (sent, received) = self.group_bytes(rows.len(), hidden);
                metrics.dispatched(id, sent, received, took);
            }
        }
        self.count_routed(layer, experts);
        Ok(outputs)
    }
}

/// The rows of a lockstep step by worker (the first worker of `routing` holding each row's expert), or the first
/// expert no worker holds.
fn lockstep_groups(routing: &RoutingTable, layer: usize, experts: &[u32]) -> Result<BTreeMap<usize, Vec<usize>>, u32> {
    let mut chosen: BTreeMap<u32, usize> = BTreeMap::new();
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (row, &expert) in experts.iter().enumerate() {
        let worker = match chosen.get(&expert) {
            Some(&worker) => worker,
            None => {
                let worker = routing.choose_index_excluding(layer, expert, &[]).ok_or(expert)?;
                chosen.insert(expert, worker);
                worker
            }
        };
        groups.entry(worker).or_default().push(row);
    }
    Ok(groups)
}

/// The error of a step with an expert that no worker of `routing` holds.
fn unheld_expert(routing: &RoutingTable, layer: usize, expert: u32) -> ModelError {
    ModelError::InvalidInput {
        what: "routed expert".into(),
        reason: format!(
            "expert {expert} of layer {layer} is held by no expert worker in placement epoch {}",
            routing.epoch()
        ),
    }
}

impl RoutedExperts for RemoteExperts {
    fn compute(&self, layer: usize, inputs: &[f32], experts: &[u32], hidden: usize) -> Result<Vec<f32>, ModelError> {
        if self.lockstep {
            return self.compute_in_lockstep(layer, inputs, experts, hidden);
        }
        check_routed_inputs(inputs, experts, hidden)?;
        if experts.is_empty() {
            return Ok(Vec::new());
        }
        let mut routing = self.routing();
        let step_id = self.next_step.fetch_add(1, Ordering::Relaxed);
        let micro_batch = MICRO_BATCH.with(Cell::get);
        let span = tracing::debug_span!("dispatch", layer, step_id, micro_batch, tokens = experts.len());
        let _entered = span.enter();
        let step = LayerStep { layer, step_id, inputs, experts, hidden };

        let mut outputs = vec![0.0; inputs.len()];
        let mut remaining: Vec<usize> = (0..experts.len()).collect();
        // Workers of `routing` that failed this step with a retryable error: their rows go to other replicas. A step
        // is pure, so re-sending it gives the same outputs. The list is per table: a new placement starts afresh.
        let mut failed: Vec<usize> = Vec::new();
        let mut last_failure: Option<DispatchError> = None;
        while !remaining.is_empty() {
            // One replica per (layer, expert) per attempt: all of an expert's rows go to the same worker, so it
            // computes them as one group; the next step takes the next replica.
            let mut chosen: BTreeMap<u32, usize> = BTreeMap::new();
            let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            let mut stranded = None;
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
                            stranded = Some(expert);
                            break;
                        }
                    },
                };
                groups.entry(worker).or_default().push(row);
            }
            if let Some(expert) = stranded {
                // Every replica of `expert` failed in this step: only a new placement can complete it.
                let Some(failure) = last_failure.take() else {
                    return Err(unheld_expert(&routing, layer, expert));
                };
                routing = self.await_newer_routing(&routing, failure, layer, step_id)?;
                failed.clear();
                continue;
            }
            let pending: Vec<_> =
                groups.iter().map(|(&worker, rows)| self.dispatch_group(&routing, worker, rows, &step)).collect();
            remaining.clear();
            let mut outdated: Option<DispatchError> = None;
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
                    Err(failure) if !self.recovery_timeout.is_zero() && needs_newer_placement(&failure.source) => {
                        remaining.extend(rows);
                        outdated = Some(failure);
                    }
                    Err(failure) => return Err(failure.into_model_error()),
                }
            }
            // Row order within an expert's group is what makes remote outputs equal the single-process model's.
            remaining.sort_unstable();
            if let Some(failure) = outdated {
                routing = self.await_newer_routing(&routing, failure, layer, step_id)?;
                failed.clear();
                last_failure = None;
            }
        }
        self.count_routed(layer, experts);
        Ok(outputs)
    }
}
