//! The generation engine: one scheduler thread that owns every active sequence and batches them into model steps.
//!
//! Requests arrive through a bounded channel (the waiting queue). Each iteration the scheduler drops sequences whose
//! client went away, admits waiting requests up to `max_batch` (their prompts are prefilled in the same step as the
//! other sequences' decode tokens), runs one `forward_batch` over all active sequences (or, with two micro-batches,
//! one per half, concurrently, so one half's attention overlaps the other's expert dispatch), samples each sequence
//! with its own seeded sampler and sends it its events. A failed step fails the sequences in it, not the engine.
//!
//! Paged KV, chunked prefill and preemption come with the serving issue and extend this loop.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use switchyard_model::config::TextConfig;
use switchyard_model::generate::Sampler;
pub use switchyard_model::TokenLogprobs;
use switchyard_model::{FinishReason, KvCache, Llama4Model, LogitsFor, ModelError, SequenceStep};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::remote::micro_batch_pool;
use crate::request::{RequestLimits, ValidGenerateRequest};
use crate::AttentionWorkerError;

/// Limits and shape of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Sequences in flight at most (prefilling or decoding).
    pub max_batch: usize,
    /// Requests waiting for a slot at most; beyond it requests are refused (`ResourceExhausted`).
    pub max_waiting: usize,
    /// 1, or 2 for ping-pong: the active sequences are split into two micro-batches whose steps run concurrently.
    pub micro_batches: usize,
    /// Threads of each micro-batch's compute pool; 0 means one per available core.
    pub threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { max_batch: 64, max_waiting: 256, micro_batches: 1, threads: 0 }
    }
}

/// What the engine tells a request, in this order: `Prefilled`, then one `Token` per generated token, then `Finished`;
/// or `Failed` at any point, after which nothing follows.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// The prompt went through the model.
    Prefilled {
        /// `[prompt_len, vocab]` logits when the request asked for logits.
        prompt_logits: Option<Vec<f32>>,
    },
    /// A generated token.
    Token {
        /// The token id.
        id: u32,
        /// Its index in the generated sequence.
        index: u32,
        /// The `[vocab]` logits that chose it, when the request asked for logits.
        logits: Option<Vec<f32>>,
        /// Its log-probability and the top-n, when the request asked for logprobs.
        logprob: Option<TokenLogprobs>,
    },
    /// Generation ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Tokens generated.
        generated_tokens: u32,
    },
    /// The request failed (its step failed, e.g. an expert worker was lost).
    Failed(Arc<AttentionWorkerError>),
}

/// Counters shared between the engine handle and its scheduler thread.
#[derive(Debug, Default)]
struct Shared {
    active: AtomicUsize,
    waiting: AtomicUsize,
    steps: AtomicU64,
    failed_steps: AtomicU64,
}

/// A request handed to the scheduler.
struct Admission {
    request: ValidGenerateRequest,
    events: UnboundedSender<GenerationEvent>,
}

/// Handle to the scheduler thread. Dropping it stops admission; the thread finishes the active sequences and exits.
pub struct Engine {
    requests: SyncSender<Admission>,
    shared: Arc<Shared>,
    limits: RequestLimits,
    options: EngineOptions,
}

impl Engine {
    /// Starts the scheduler thread for `model` (whose routed experts are already installed).
    pub fn start(model: Arc<Llama4Model>, options: EngineOptions) -> Result<Self, AttentionWorkerError> {
        let bad = |option: &str, reason: String| AttentionWorkerError::InvalidOption { option: option.into(), reason };
        if options.max_batch == 0 {
            return Err(bad("max_batch", "must be at least 1".into()));
        }
        if !(1..=2).contains(&options.micro_batches) {
            return Err(bad("micro_batches", format!("{} is not 1 or 2", options.micro_batches)));
        }
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map(usize::from).unwrap_or(1)
        } else {
            options.threads
        };
        let pools =
            (0..options.micro_batches).map(|mb| micro_batch_pool(mb as u32, threads)).collect::<Result<Vec<_>, _>>()?;
        // A zero-capacity sync channel would make every submit wait for the scheduler: keep at least one slot.
        let (requests, receiver) = mpsc::sync_channel(options.max_waiting.max(1));
        let shared = Arc::new(Shared::default());
        let config = model.config().clone();
        let limits = RequestLimits::of(&config);
        let scheduler = Scheduler {
            stop_tokens: config.eos_token_id.clone(),
            vocab: config.vocab_size,
            config,
            model,
            pools,
            shared: shared.clone(),
            max_batch: options.max_batch,
        };
        std::thread::Builder::new().name("sy-scheduler".into()).spawn(move || scheduler.run(receiver)).map_err(
            |e| AttentionWorkerError::Startup { what: "the scheduler thread".into(), reason: e.to_string() },
        )?;
        Ok(Self { requests, shared, limits, options })
    }

    /// Queues `request`; its events arrive on the returned receiver. Dropping the receiver cancels the request (its
    /// sequence and KV cache are dropped before the next step). Fails with `Overloaded` when the waiting queue is full.
    pub fn submit(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<UnboundedReceiver<GenerationEvent>, AttentionWorkerError> {
        request.check(&self.limits)?;
        let (events, receiver) = unbounded_channel();
        // Counted before sending so the scheduler's decrement can never come first.
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        match self.requests.try_send(Admission { request, events }) {
            Ok(()) => Ok(receiver),
            Err(refused) => {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match refused {
                    TrySendError::Full(_) => AttentionWorkerError::Overloaded {
                        reason: format!(
                            "{} requests are waiting (max_waiting {}) behind {} active sequences (max_batch {})",
                            self.waiting(),
                            self.options.max_waiting,
                            self.active(),
                            self.options.max_batch
                        ),
                    },
                    TrySendError::Disconnected(_) => AttentionWorkerError::EngineStopped,
                })
            }
        }
    }

    /// Sequences in flight.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Requests queued and not yet admitted.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Model steps run so far (a ping-pong step of two micro-batches counts once).
    pub fn steps(&self) -> u64 {
        self.shared.steps.load(Ordering::Relaxed)
    }

    /// Steps that failed so far.
    pub fn failed_steps(&self) -> u64 {
        self.shared.failed_steps.load(Ordering::Relaxed)
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    /// The options the engine runs with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }
}

/// One active sequence.
struct Sequence {
    request_id: String,
    /// Tokens of the next step: the prompt, then the last sampled token.
    pending: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    generated: u32,
    max_new_tokens: usize,
    ignore_eos: bool,
    /// The request's own stop tokens, which end it even with `ignore_eos`.
    stop_token_ids: Vec<u32>,
    return_logits: bool,
    logprobs: Option<usize>,
    prefilled: bool,
    events: UnboundedSender<GenerationEvent>,
    done: bool,
}

impl Sequence {
    fn new(admission: Admission, config: &TextConfig) -> Self {
        let Admission { request, events } = admission;
        Self {
            request_id: request.request_id,
            pending: request.prompt,
            cache: KvCache::new(config),
            sampler: Sampler::new(request.sampling),
            generated: 0,
            max_new_tokens: request.max_new_tokens,
            ignore_eos: request.ignore_eos,
            stop_token_ids: request.stop_token_ids,
            return_logits: request.return_logits,
            logprobs: request.logprobs,
            prefilled: false,
            events,
            done: false,
        }
    }

    fn logits_for(&self) -> LogitsFor {
        if !self.prefilled && self.return_logits {
            LogitsFor::All
        } else {
            LogitsFor::Last
        }
    }

    /// Sends `event`; a client that went away ends the sequence.
    fn send(&mut self, event: GenerationEvent) -> bool {
        if self.events.send(event).is_err() {
            tracing::debug!(request_id = %self.request_id, "client went away; dropping the sequence");
            self.done = true;
        }
        !self.done
    }

    fn finish(&mut self, reason: FinishReason) {
        let generated_tokens = self.generated;
        self.send(GenerationEvent::Finished { reason, generated_tokens });
        tracing::debug!(request_id = %self.request_id, generated_tokens, ?reason, "finished");
        self.done = true;
    }

    /// Takes the logits of a successful step: samples the next token and tells the client. `stop_tokens` are the
    /// model's end-of-sequence tokens.
    fn advance(&mut self, logits: Vec<f32>, vocab: usize, stop_tokens: &[u32]) {
        let last = logits[logits.len().saturating_sub(vocab)..].to_vec();
        if !self.prefilled {
            self.prefilled = true;
            let prompt_logits = self.return_logits.then_some(logits);
            if !self.send(GenerationEvent::Prefilled { prompt_logits }) {
                return;
            }
            if self.max_new_tokens == 0 {
                self.finish(FinishReason::Length);
                return;
            }
        }
        let (token, logprob) = self.sampler.sample_with_logprobs(&last, self.logprobs);
        let index = self.generated;
        self.generated += 1;
        let logits = self.return_logits.then_some(last);
        if !self.send(GenerationEvent::Token { id: token, index, logits, logprob }) {
            return;
        }
        if (!self.ignore_eos && stop_tokens.contains(&token)) || self.stop_token_ids.contains(&token) {
            self.finish(FinishReason::Stop);
        } else if self.generated as usize >= self.max_new_tokens {
            self.finish(FinishReason::Length);
        } else {
            self.pending.clear();
            self.pending.push(token);
        }
    }

    fn fail(&mut self, error: &Arc<AttentionWorkerError>) {
        self.send(GenerationEvent::Failed(error.clone()));
        self.done = true;
    }
}

/// The scheduler thread's state.
struct Scheduler {
    model: Arc<Llama4Model>,
    config: TextConfig,
    vocab: usize,
    stop_tokens: Vec<u32>,
    /// One compute pool per micro-batch.
    pools: Vec<rayon::ThreadPool>,
    shared: Arc<Shared>,
    max_batch: usize,
}

impl Scheduler {
    fn run(self, requests: Receiver<Admission>) {
        let mut active: Vec<Sequence> = Vec::new();
        let mut open = true;
        loop {
            active.retain(|s| {
                let gone = s.events.is_closed();
                if gone {
                    tracing::debug!(request_id = %s.request_id, "client went away; dropping the sequence");
                }
                !gone
            });
            // Published before the admission loop may block on an empty queue.
            self.shared.active.store(active.len(), Ordering::SeqCst);
            while open && active.len() < self.max_batch {
                let next = if active.is_empty() {
                    // Nothing to compute: sleep until a request arrives (or the engine is dropped).
                    requests.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    requests.try_recv()
                };
                match next {
                    Ok(admission) => {
                        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                        if admission.events.is_closed() {
                            continue;
                        }
                        tracing::debug!(
                            request_id = %admission.request.request_id,
                            prompt_tokens = admission.request.prompt.len(),
                            "admitted"
                        );
                        active.push(Sequence::new(admission, &self.config));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.shared.active.store(active.len(), Ordering::SeqCst);
            if active.is_empty() {
                if open {
                    continue;
                }
                return;
            }
            self.step(&mut active);
            active.retain(|s| !s.done);
            self.shared.active.store(active.len(), Ordering::SeqCst);
        }
    }

    /// Runs one step over `active` and advances (or fails) every sequence in it.
    fn step(&self, active: &mut [Sequence]) {
        self.shared.steps.fetch_add(1, Ordering::Relaxed);
        let lanes = if self.pools.len() == 2 && active.len() >= 2 { 2 } else { 1 };
        if lanes == 1 {
            let result = self.forward(&self.pools[0], active);
            self.apply(active, result);
            return;
        }
        let (first, second) = active.split_at_mut(active.len().div_ceil(2));
        let (first_result, second_result) = std::thread::scope(|scope| {
            let second_lane = std::thread::Builder::new()
                .name("sy-mb1".into())
                .spawn_scoped(scope, || self.forward(&self.pools[1], &mut *second));
            let first_result = self.forward(&self.pools[0], &mut *first);
            let second_result = match second_lane {
                Ok(handle) => handle.join().unwrap_or_else(|panic| Err(panicked(panic))),
                Err(e) => Err(AttentionWorkerError::Startup { what: "micro-batch 1".into(), reason: e.to_string() }),
            };
            (first_result, second_result)
        });
        self.apply(first, first_result);
        self.apply(second, second_result);
    }

    /// One `forward_batch` over `sequences` on `pool`.
    fn forward(
        &self,
        pool: &rayon::ThreadPool,
        sequences: &mut [Sequence],
    ) -> Result<Vec<Vec<f32>>, AttentionWorkerError> {
        let mut steps: Vec<SequenceStep<'_>> = sequences
            .iter_mut()
            .map(|s| {
                let logits = s.logits_for();
                SequenceStep { tokens: &s.pending, cache: &mut s.cache, logits }
            })
            .collect();
        let model = &self.model;
        // A panic in the forward pass must fail this step's requests, not take the scheduler down with every other.
        let result: Result<Result<Vec<Vec<f32>>, ModelError>, _> =
            pool.install(|| catch_unwind(AssertUnwindSafe(|| model.forward_batch(&mut steps))));
        match result {
            Ok(Ok(logits)) => Ok(logits),
            Ok(Err(error)) => Err(AttentionWorkerError::from_step(error)),
            Err(panic) => Err(panicked(panic)),
        }
    }

    fn apply(&self, sequences: &mut [Sequence], result: Result<Vec<Vec<f32>>, AttentionWorkerError>) {
        match result {
            Ok(logits) => {
                for (sequence, logits) in sequences.iter_mut().zip(logits) {
                    sequence.advance(logits, self.vocab, &self.stop_tokens);
                }
            }
            Err(error) => {
                self.shared.failed_steps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, sequences = sequences.len(), "step failed; failing its requests");
                let error = Arc::new(error);
                for sequence in sequences.iter_mut() {
                    sequence.fail(&error);
                }
            }
        }
    }
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> AttentionWorkerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    AttentionWorkerError::Panicked { message }
}
