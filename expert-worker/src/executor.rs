//! The batching executor: one dedicated compute thread that owns the queue of dispatched batches.
//!
//! Callers (the gRPC dispatch server, the in-process transport) enqueue a validated [`ExpertBatch`] with a oneshot
//! for its answer and await it; they never compute. The thread sleeps until work arrives, then drains EVERYTHING
//! queued, groups it by layer and runs one [`RoutedExperts::compute`] per layer over the rows of all the queued
//! batches of that layer: tokens that several attention workers sent for the same layer step become one grouped
//! matmul per expert, which is what makes streaming expert weights pay off. Outputs are split back per batch.
//!
//! While one grouped computation runs, new batches queue up and form the next group: the queue batches more
//! exactly when the worker is busiest.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use switchyard_transport::{ExpertBatch, TransportError};
use tokio::sync::oneshot;

use crate::worker::Shared;

/// The answer to one queued batch.
pub(crate) type Reply = oneshot::Sender<Result<Vec<f32>, TransportError>>;

/// One queued batch and where its answer goes.
pub(crate) struct Job {
    pub batch: ExpertBatch,
    pub reply: Reply,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// Queued jobs stay queued (an operator draining the worker, tests building a batch deterministically).
    paused: bool,
    stopping: bool,
}

/// The queue shared by the callers and the compute thread.
#[derive(Default)]
pub(crate) struct JobQueue {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl JobQueue {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is a Vec and two flags: a panic elsewhere cannot leave it half-updated.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`, or answers it at once when the executor is stopping.
    pub fn push(&self, job: Job, worker_id: &str) {
        let mut queue = self.lock();
        if queue.stopping {
            drop(queue);
            let _ = job.reply.send(Err(TransportError::Unavailable {
                peer: worker_id.to_string(),
                reason: "the expert worker is shutting down".to_string(),
            }));
            return;
        }
        queue.jobs.push(job);
        drop(queue);
        self.wake.notify_one();
    }

    /// Holds queued jobs until [`JobQueue::resume`].
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    /// Lets the executor take queued jobs again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.wake.notify_all();
    }

    /// Batches waiting for the executor.
    pub fn queued(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Stops the executor; jobs still queued are answered with `Unavailable` when dropped by [`run`].
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.wake.notify_all();
    }

    /// Blocks until there is work (everything queued, drained) or the executor is stopping (`None`).
    fn next(&self) -> Option<Vec<Job>> {
        let mut queue = self.lock();
        loop {
            if queue.stopping {
                return None;
            }
            if !queue.paused && !queue.jobs.is_empty() {
                return Some(std::mem::take(&mut queue.jobs));
            }
            queue = self.wake.wait(queue).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn take_all(&self) -> Vec<Job> {
        std::mem::take(&mut self.lock().jobs)
    }
}

/// The compute thread's body: runs until [`JobQueue::stop`].
pub(crate) fn run(shared: &Shared) {
    while let Some(jobs) = shared.queue.next() {
        compute_jobs(shared, jobs);
    }
    for job in shared.queue.take_all() {
        let _ = job.reply.send(Err(TransportError::Unavailable {
            peer: shared.worker_id.clone(),
            reason: "the expert worker stopped before computing the batch".to_string(),
        }));
    }
}

/// Groups the drained jobs by layer (arrival order within a layer) and computes each group.
fn compute_jobs(shared: &Shared, jobs: Vec<Job>) {
    let mut by_layer: BTreeMap<u32, Vec<Job>> = BTreeMap::new();
    for job in jobs {
        // The caller went away (client disconnected, request cancelled): nobody reads the answer.
        if job.reply.is_closed() {
            continue;
        }
        by_layer.entry(job.batch.layer).or_default().push(job);
    }
    for (layer, jobs) in by_layer {
        compute_layer(shared, layer, jobs);
    }
}

/// One grouped computation over all `jobs` of `layer`.
fn compute_layer(shared: &Shared, layer: u32, jobs: Vec<Job>) {
    let held = shared.read_held();
    // An unload may have landed between validation and now: refuse only the batches it affects.
    let mut ready = Vec::with_capacity(jobs.len());
    for job in jobs {
        match held.first_missing(layer, &job.batch.experts) {
            Some(expert) => {
                let _ = job.reply.send(Err(TransportError::ExpertNotHeld { layer, expert }));
            }
            None => ready.push(job),
        }
    }
    let Some(experts) = held.layer(layer as usize).filter(|_| !ready.is_empty()) else {
        return;
    };
    let hidden = shared.hidden;
    let tokens: usize = ready.iter().map(|job| job.batch.tokens()).sum();
    let span = tracing::debug_span!("grouped_compute", layer, requests = ready.len(), tokens);
    let _entered = span.enter();

    let computed = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if let [job] = ready.as_slice() {
            experts.compute(layer as usize, &job.batch.inputs, &job.batch.experts, hidden)
        } else {
            let mut ids = Vec::with_capacity(tokens);
            let mut inputs = Vec::with_capacity(tokens * hidden);
            for job in &ready {
                ids.extend_from_slice(&job.batch.experts);
                inputs.extend_from_slice(&job.batch.inputs);
            }
            experts.compute(layer as usize, &inputs, &ids, hidden)
        }
    }));
    drop(held);

    let outputs = match computed {
        Ok(Ok(outputs)) if outputs.len() == tokens * hidden => outputs,
        Ok(Ok(outputs)) => {
            let reason = format!("{} output values for {tokens} tokens of hidden size {hidden}", outputs.len());
            return fail_all(ready, layer, reason);
        }
        Ok(Err(error)) => return fail_all(ready, layer, error.to_string()),
        Err(_) => return fail_all(ready, layer, "the expert computation panicked".to_string()),
    };

    let counters = &shared.counters;
    counters.batches_computed.fetch_add(1, Ordering::Relaxed);
    counters.tokens_computed.fetch_add(tokens as u64, Ordering::Relaxed);
    counters.requests_served.fetch_add(ready.len() as u64, Ordering::Relaxed);
    if ready.len() == 1 {
        if let Some(job) = ready.pop() {
            let _ = job.reply.send(Ok(outputs));
        }
        return;
    }
    let mut offset = 0;
    for job in ready {
        let len = job.batch.tokens() * hidden;
        let _ = job.reply.send(Ok(outputs[offset..offset + len].to_vec()));
        offset += len;
    }
}

/// Answers every batch of a failed grouped computation with the same reason.
fn fail_all(jobs: Vec<Job>, layer: u32, reason: String) {
    tracing::error!(layer, requests = jobs.len(), %reason, "grouped expert computation failed");
    for job in jobs {
        let _ = job.reply.send(Err(TransportError::Compute { reason: reason.clone() }));
    }
}
