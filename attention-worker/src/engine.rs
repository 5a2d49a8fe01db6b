//! The generation engine: one scheduler thread that owns every sequence and batches them into model steps.
//!
//! Requests arrive through a channel and wait in a bounded queue (beyond `max_waiting` they are refused with
//! `Overloaded`, a resource-exhausted error). Every iteration the scheduler drops sequences whose client went away,
//! then plans one step within a token budget (`max_batch_tokens`): every running sequence gets its next token
//! (decode) or the next chunk of its prompt (chunked prefill, so a long prompt never stalls the others' decoding),
//! and waiting requests are admitted in arrival order while the KV blocks for their whole prompt are free. Each
//! scheduled sequence reserves the KV blocks of its step before it runs; when the pool is exhausted the newest running
//! sequence is preempted: its blocks are freed and it goes back to the queue, to be recomputed from its tokens later
//! (its sampler keeps its state, so the output is the same as without preemption). The step runs as one
//! `forward_batch` (or, with two micro-batches, one per half concurrently, so one half's attention overlaps the other's
//! expert dispatch); each sequence whose prompt is done samples with its own seeded sampler and gets its events. A
//! failed step fails the sequences in it, not the engine.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use switchyard_model::config::TextConfig;
use switchyard_model::generate::Sampler;
use switchyard_model::memory::{KvBytes, Precision};
pub use switchyard_model::TokenLogprobs;
use switchyard_model::{FinishReason, KvBlockPool, KvCache, Llama4Model, LogitsFor, ModelError, SequenceStep};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::context::ContextGroups;
use crate::remote::micro_batch_pool;
use crate::request::{RequestLimits, ValidGenerateRequest};
use crate::AttentionWorkerError;

/// Limits and shape of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Sequences in flight at most (prefilling or decoding).
    pub max_batch: usize,
    /// Requests waiting for admission at most (preempted sequences included); beyond it requests are refused
    /// (`Overloaded`).
    pub max_waiting: usize,
    /// Tokens one step computes at most: one per decoding sequence, the rest for prompt chunks. At least `max_batch`.
    pub max_batch_tokens: usize,
    /// Positions per KV block.
    pub kv_block_size: usize,
    /// KV blocks in the pool (one block holds `kv_block_size` positions of one layer); `None` sizes the pool for
    /// `max_batch` sequences at the model's full context, so nothing is ever preempted (memory is taken on use).
    pub kv_blocks: Option<usize>,
    /// 1, or 2 for ping-pong: the scheduled sequences are split into two micro-batches whose steps run concurrently.
    pub micro_batches: usize,
    /// Threads of each micro-batch's compute pool; 0 means one per available core.
    pub threads: usize,
}

impl EngineOptions {
    /// KV blocks the engine's pool holds for `config`: `kv_blocks`, or room for `max_batch` sequences at the model's
    /// full context.
    pub fn kv_blocks_for(&self, config: &TextConfig) -> usize {
        self.kv_blocks.unwrap_or_else(|| {
            KvCache::blocks_for_sequence(
                config,
                self.kv_block_size,
                config.max_position_embeddings,
                self.max_batch_tokens,
            )
            .saturating_mul(self.max_batch)
        })
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_waiting: 256,
            max_batch_tokens: 512,
            kv_block_size: switchyard_model::kv::DEFAULT_BLOCK_SIZE,
            kv_blocks: None,
            micro_batches: 1,
            threads: 0,
        }
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
    preemptions: AtomicU64,
}

/// A request handed to the scheduler.
struct Admission {
    request: ValidGenerateRequest,
    events: UnboundedSender<GenerationEvent>,
}

/// Handle to the scheduler thread. Dropping it stops admission; the thread finishes the sequences it has and exits.
pub struct Engine {
    requests: Sender<Admission>,
    shared: Arc<Shared>,
    pool: Arc<KvBlockPool>,
    config: TextConfig,
    limits: RequestLimits,
    options: EngineOptions,
    /// Whether sequences too long for the pool are spread over context-parallel groups.
    context_parallel: bool,
}

impl Engine {
    /// Starts the scheduler thread for `model` (whose routed experts are already installed).
    pub fn start(model: Arc<Llama4Model>, options: EngineOptions) -> Result<Self, AttentionWorkerError> {
        Self::start_with_context(model, options, None)
    }

    /// [`Engine::start`], spreading sequences too long for this engine's KV cache over the context-parallel groups
    /// `context` gives (without it they are refused).
    pub fn start_with_context(
        model: Arc<Llama4Model>,
        options: EngineOptions,
        context: Option<Arc<dyn ContextGroups>>,
    ) -> Result<Self, AttentionWorkerError> {
        let bad = |option: &str, reason: String| AttentionWorkerError::InvalidOption { option: option.into(), reason };
        if options.max_batch == 0 {
            return Err(bad("max_batch", "must be at least 1".into()));
        }
        if options.max_batch_tokens < options.max_batch {
            return Err(bad(
                "max_batch_tokens",
                format!(
                    "{} is below max_batch {}: every decoding sequence needs a token of each step",
                    options.max_batch_tokens, options.max_batch
                ),
            ));
        }
        if !(1..=2).contains(&options.micro_batches) {
            return Err(bad("micro_batches", format!("{} is not 1 or 2", options.micro_batches)));
        }
        let config = model.config().clone();
        let kv_blocks = options.kv_blocks_for(&config);
        let one_step = KvCache::blocks_for_sequence(&config, options.kv_block_size, 1, 1);
        if kv_blocks < one_step {
            return Err(bad(
                "kv_blocks",
                format!("{kv_blocks} KV blocks cannot hold even one token ({one_step} blocks, one per layer)"),
            ));
        }
        let pool = KvBlockPool::new(&config, options.kv_block_size, kv_blocks)
            .map_err(|e| bad("kv_block_size", e.to_string()))?;
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map(usize::from).unwrap_or(1)
        } else {
            options.threads
        };
        let pools =
            (0..options.micro_batches).map(|mb| micro_batch_pool(mb as u32, threads)).collect::<Result<Vec<_>, _>>()?;
        let (requests, receiver) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let limits = RequestLimits::of(&config);
        let scheduler = Scheduler {
            stop_tokens: config.eos_token_id.clone(),
            vocab: config.vocab_size,
            config: config.clone(),
            model,
            pools,
            shared: shared.clone(),
            pool: pool.clone(),
            max_batch: options.max_batch,
            max_batch_tokens: options.max_batch_tokens,
            next_arrival: 0,
            context: context.clone(),
        };
        std::thread::Builder::new().name("sy-scheduler".into()).spawn(move || scheduler.run(receiver)).map_err(
            |e| AttentionWorkerError::Startup { what: "the scheduler thread".into(), reason: e.to_string() },
        )?;
        Ok(Self { requests, shared, pool, config, limits, options, context_parallel: context.is_some() })
    }

    /// Queues `request`; its events arrive on the returned receiver. Dropping the receiver cancels the request (its
    /// sequence and KV blocks are dropped before the next step). Fails with `Overloaded` when the waiting queue is
    /// full, and with `InvalidRequest` when the request could never fit this engine's KV cache.
    pub fn submit(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<UnboundedReceiver<GenerationEvent>, AttentionWorkerError> {
        request.check(&self.limits)?;
        let tokens = request.prompt.len() + request.max_new_tokens;
        let needed = KvCache::blocks_for_sequence(
            &self.config,
            self.options.kv_block_size,
            tokens,
            self.options.max_batch_tokens,
        );
        if needed > self.pool.capacity() && !self.context_parallel {
            return Err(AttentionWorkerError::InvalidRequest {
                field: "max_new_tokens".into(),
                reason: format!(
                    "prompt of {} tokens + max_new_tokens {} = {tokens} tokens need {needed} KV blocks, more than the \
                     {} this worker's KV cache holds",
                    request.prompt.len(),
                    request.max_new_tokens,
                    self.pool.capacity()
                ),
            });
        }
        let max_waiting = self.options.max_waiting;
        // Counted before sending so the scheduler's decrement can never come first.
        if self
            .shared
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max_waiting).then_some(n + 1))
            .is_err()
        {
            return Err(AttentionWorkerError::Overloaded {
                reason: format!(
                    "{} requests are waiting (max_waiting {max_waiting}) behind {} active sequences (max_batch {}), \
                     {} of {} KV blocks in use",
                    self.waiting(),
                    self.active(),
                    self.options.max_batch,
                    self.kv_blocks_used(),
                    self.kv_blocks_total()
                ),
            });
        }
        let (events, receiver) = unbounded_channel();
        if self.requests.send(Admission { request, events }).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(AttentionWorkerError::EngineStopped);
        }
        Ok(receiver)
    }

    /// Sequences in flight.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Requests queued and not yet admitted (preempted sequences included).
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

    /// KV-cache blocks held by sequences now.
    pub fn kv_blocks_used(&self) -> usize {
        self.pool.in_use()
    }

    /// KV-cache blocks the engine may use in all.
    pub fn kv_blocks_total(&self) -> usize {
        self.pool.capacity()
    }

    /// The engine's KV block pool (context shards this worker holds for others draw from it too).
    pub fn kv_pool(&self) -> &Arc<KvBlockPool> {
        &self.pool
    }

    /// Sequences preempted (their KV freed, to be recomputed) so far because KV blocks ran out.
    pub fn preemptions(&self) -> u64 {
        self.shared.preemptions.load(Ordering::Relaxed)
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

/// One sequence, waiting or running.
struct Sequence {
    request_id: String,
    /// Admission order: older sequences are scheduled first and preempted last.
    arrival: u64,
    /// Every token known: the prompt, then the generated tokens. Those past `cache.len()` are computed next.
    tokens: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    generated: u32,
    max_new_tokens: usize,
    ignore_eos: bool,
    /// The request's own stop tokens, which end it even with `ignore_eos`.
    stop_token_ids: Vec<u32>,
    return_logits: bool,
    logprobs: Option<usize>,
    /// The whole prompt went through the model once (its `Prefilled` event was sent).
    prefilled: bool,
    /// Prompt logits gathered over the prefill chunks, when the request asked for them.
    prompt_logits: Vec<f32>,
    /// Tokens the step being planned computes for this sequence (0: not in it).
    scheduled: usize,
    /// Positions it may reach (prompt plus tokens to generate).
    max_tokens: usize,
    /// It does not fit this engine's KV pool: it needs a context-parallel group before it runs.
    needs_context: bool,
    events: UnboundedSender<GenerationEvent>,
    done: bool,
}

impl Sequence {
    fn new(
        admission: Admission,
        arrival: u64,
        pool: &Arc<KvBlockPool>,
        config: &TextConfig,
        step_tokens: usize,
    ) -> Self {
        let Admission { request, events } = admission;
        let max_tokens = request.prompt.len() + request.max_new_tokens;
        let needs_context =
            KvCache::blocks_for_sequence(config, pool.block_size(), max_tokens, step_tokens) > pool.capacity();
        Self {
            request_id: request.request_id,
            arrival,
            tokens: request.prompt,
            cache: KvCache::in_pool(config, pool.clone()),
            sampler: Sampler::new(request.sampling),
            generated: 0,
            max_new_tokens: request.max_new_tokens,
            ignore_eos: request.ignore_eos,
            stop_token_ids: request.stop_token_ids,
            return_logits: request.return_logits,
            logprobs: request.logprobs,
            prefilled: false,
            prompt_logits: Vec::new(),
            scheduled: 0,
            max_tokens,
            needs_context,
            events,
            done: false,
        }
    }

    /// Tokens not yet in the KV cache.
    fn remaining(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    fn logits_for(&self) -> LogitsFor {
        if !self.prefilled && self.return_logits {
            LogitsFor::All
        } else if self.scheduled == self.remaining() {
            LogitsFor::Last
        } else {
            LogitsFor::None
        }
    }

    /// Frees the KV cache; the sequence will be recomputed from its tokens. Prompt logits gathered so far are
    /// dropped with it: a prompt not yet done gathers them again.
    fn preempt(&mut self) {
        self.cache.clear();
        self.scheduled = 0;
        if !self.prefilled {
            self.prompt_logits.clear();
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

    /// Takes the logits of a successful step: once every known token is in the cache, samples the next token and
    /// tells the client. `stop_tokens` are the model's end-of-sequence tokens.
    fn advance(&mut self, logits: Vec<f32>, vocab: usize, stop_tokens: &[u32]) {
        self.scheduled = 0;
        if !self.prefilled && self.return_logits {
            self.prompt_logits.extend_from_slice(&logits);
        }
        if self.remaining() > 0 {
            return;
        }
        let last = logits[logits.len().saturating_sub(vocab)..].to_vec();
        if !self.prefilled {
            self.prefilled = true;
            let prompt_logits = self.return_logits.then(|| std::mem::take(&mut self.prompt_logits));
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
            self.tokens.push(token);
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
    pool: Arc<KvBlockPool>,
    max_batch: usize,
    max_batch_tokens: usize,
    next_arrival: u64,
    context: Option<Arc<dyn ContextGroups>>,
}

impl Scheduler {
    fn run(mut self, requests: Receiver<Admission>) {
        // Running sequences in arrival order, and the queue of those waiting for admission, also in arrival order.
        let mut running: Vec<Sequence> = Vec::new();
        let mut waiting: VecDeque<Sequence> = VecDeque::new();
        let mut open = true;
        loop {
            let gone = |s: &Sequence| {
                let gone = s.events.is_closed();
                if gone {
                    tracing::debug!(request_id = %s.request_id, "client went away; dropping the sequence");
                }
                !gone
            };
            running.retain(gone);
            let before = waiting.len();
            waiting.retain(gone);
            self.shared.waiting.fetch_sub(before - waiting.len(), Ordering::SeqCst);
            self.shared.active.store(running.len(), Ordering::SeqCst);
            while open {
                let next = if running.is_empty() && waiting.is_empty() {
                    // Nothing to compute: sleep until a request arrives (or the engine is dropped).
                    requests.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    requests.try_recv()
                };
                match next {
                    Ok(admission) => {
                        if admission.events.is_closed() {
                            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                            continue;
                        }
                        let arrival = self.next_arrival;
                        self.next_arrival += 1;
                        waiting.push_back(Sequence::new(
                            admission,
                            arrival,
                            &self.pool,
                            &self.config,
                            self.max_batch_tokens,
                        ));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if running.is_empty() && waiting.is_empty() {
                if open {
                    continue;
                }
                return;
            }
            self.plan(&mut running, &mut waiting);
            self.shared.active.store(running.len(), Ordering::SeqCst);
            let mut scheduled: Vec<&mut Sequence> = running.iter_mut().filter(|s| s.scheduled > 0).collect();
            if scheduled.is_empty() {
                continue;
            }
            self.step(&mut scheduled);
            running.retain(|s| !s.done);
            self.shared.active.store(running.len(), Ordering::SeqCst);
        }
    }

    /// Chooses this step's work: running sequences first (decodes and prompt chunks, preempting the newest when KV
    /// blocks run out), then waiting sequences in arrival order while slots, tokens and blocks last.
    fn plan(&self, running: &mut Vec<Sequence>, waiting: &mut VecDeque<Sequence>) {
        let mut budget = self.max_batch_tokens;
        let mut i = 0;
        while i < running.len() {
            let want = running[i].remaining().min(budget);
            if want == 0 {
                i += 1;
                continue;
            }
            match running[i].cache.reserve(want) {
                Ok(()) => {
                    running[i].scheduled = want;
                    budget -= want;
                    i += 1;
                }
                Err(ModelError::KvCacheFull { .. }) => {
                    // The newest running sequence gives its blocks back (possibly this one, when it is the newest).
                    let Some(victim) = running.pop() else { break };
                    self.preempt(victim, waiting);
                }
                Err(error) => {
                    running[i].fail(&Arc::new(AttentionWorkerError::Model(error)));
                    running.remove(i);
                }
            }
        }
        while budget > 0 && running.len() < self.max_batch {
            let Some(next) = waiting.front_mut() else { break };
            // A sequence is admitted only when its whole prompt fits in the free blocks: admitting one whose prefill
            // would run the pool dry only to preempt it again wastes the work.
            if next.needs_context && next.cache.context().is_none() {
                match self.join_group(next) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(error) => {
                        if let Some(mut lost) = waiting.pop_front() {
                            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                            lost.fail(&Arc::new(error));
                        }
                        continue;
                    }
                }
            }
            let prompt_blocks = if next.needs_context {
                // Its global layers' KV beyond this worker's range lives on the group's members.
                0
            } else {
                KvCache::blocks_for_sequence(
                    &self.config,
                    self.pool.block_size(),
                    next.remaining(),
                    self.max_batch_tokens,
                )
            };
            if prompt_blocks > self.pool.available() && !running.is_empty() {
                break;
            }
            let want = next.remaining().min(budget);
            if let Err(error) = next.cache.reserve(want) {
                if running.is_empty() {
                    // Nothing else holds blocks: this sequence cannot run at all.
                    if let Some(mut lost) = waiting.pop_front() {
                        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                        lost.fail(&Arc::new(AttentionWorkerError::Model(error)));
                    }
                    continue;
                }
                break;
            }
            next.scheduled = want;
            budget -= want;
            if let Some(admitted) = waiting.pop_front() {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                tracing::debug!(
                    request_id = %admitted.request_id,
                    tokens = admitted.tokens.len(),
                    recompute = admitted.generated > 0,
                    "admitted"
                );
                running.push(admitted);
            }
        }
    }

    /// Gets `sequence` a context-parallel group, with as much of its global layers' KV here as the free blocks allow
    /// after room for its chunked layers. `Ok(false)` when no block is free for it now (it waits).
    fn join_group(&self, sequence: &mut Sequence) -> Result<bool, AttentionWorkerError> {
        let context = self.context.as_ref().ok_or_else(|| AttentionWorkerError::InvalidRequest {
            field: "max_new_tokens".into(),
            reason: format!("{} tokens do not fit this worker's KV cache", sequence.max_tokens),
        })?;
        let block_size = self.pool.block_size();
        let global_layers = KvBytes::of(&self.config, Precision::F32).global_layers.max(1) as usize;
        let every_global = sequence.max_tokens.div_ceil(block_size) * global_layers;
        let all = KvCache::blocks_for_sequence(&self.config, block_size, sequence.max_tokens, self.max_batch_tokens);
        // The chunked layers' blocks stay here whatever the group; the global layers take what is left.
        let chunked_only = all.saturating_sub(every_global);
        let spare = self.pool.available().saturating_sub(chunked_only);
        if spare < global_layers && self.pool.in_use() > 0 {
            return Ok(false);
        }
        let local_tokens = spare / global_layers * block_size;
        let shards = context.assign(sequence.arrival, sequence.max_tokens, local_tokens)?;
        sequence.cache.set_context(shards).map_err(AttentionWorkerError::Model)?;
        Ok(true)
    }

    /// Frees `victim`'s KV blocks and puts it back in the queue at its arrival position.
    fn preempt(&self, mut victim: Sequence, waiting: &mut VecDeque<Sequence>) {
        tracing::info!(
            request_id = %victim.request_id,
            tokens = victim.tokens.len(),
            kv_blocks_free = self.pool.available(),
            "KV cache full: preempting the newest sequence, to be recomputed"
        );
        victim.preempt();
        self.shared.preemptions.fetch_add(1, Ordering::Relaxed);
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        let at = waiting.partition_point(|s| s.arrival < victim.arrival);
        waiting.insert(at, victim);
    }

    /// Runs one step over `scheduled` and advances (or fails) every sequence in it.
    fn step(&self, scheduled: &mut [&mut Sequence]) {
        self.shared.steps.fetch_add(1, Ordering::Relaxed);
        let lanes = if self.pools.len() == 2 && scheduled.len() >= 2 { 2 } else { 1 };
        if lanes == 1 {
            let result = self.forward(&self.pools[0], scheduled);
            self.apply(scheduled, result);
            return;
        }
        let (first, second) = scheduled.split_at_mut(scheduled.len().div_ceil(2));
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

    /// One `forward_batch` over the scheduled tokens of `sequences` on `pool`.
    fn forward(
        &self,
        pool: &rayon::ThreadPool,
        sequences: &mut [&mut Sequence],
    ) -> Result<Vec<Vec<f32>>, AttentionWorkerError> {
        let mut steps: Vec<SequenceStep<'_>> = sequences
            .iter_mut()
            .map(|s| {
                let logits = s.logits_for();
                let from = s.cache.len();
                SequenceStep { tokens: &s.tokens[from..from + s.scheduled], cache: &mut s.cache, logits }
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

    fn apply(&self, sequences: &mut [&mut Sequence], result: Result<Vec<Vec<f32>>, AttentionWorkerError>) {
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
