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
//!
//! **Lockstep** ([`EngineOptions::lockstep`], for routed experts behind a collective transport such as NCCL): every
//! attention rank of a communicator must make the same sequence of MoE layer steps, whatever its traffic. The
//! scheduler then runs on ticks: each tick plans as above and runs exactly one forward pass per micro-batch, with no
//! tokens when a micro-batch has nothing (a forward pass of no tokens still makes one step per MoE layer), so every
//! tick is `micro_batches` x MoE layers steps on every rank. Busy, ticks follow each other at once; idle, at most one
//! per [`LockstepOptions::idle_interval`] (a rank that waits between ticks only makes the others wait in their next
//! exchange). The ranks end together: [`Engine::drain`] stops admission, lets this rank's sequences finish while
//! ticking, then ticks empty until every attention rank agreed on the last tick ([`LockstepLeave`]), and leaves.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_model::config::TextConfig;
use switchyard_model::generate::Sampler;
use switchyard_model::memory::{KvBytes, Precision};
pub use switchyard_model::TokenLogprobs;
use switchyard_model::{FinishReason, ForwardPass, KvBlockPool, KvCache, LogitsFor, ModelError, SequenceStep};
use switchyard_transport::TransportError;
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
    /// Set when the routed experts are behind a lockstep transport ([`switchyard_transport::Transport::lockstep`]):
    /// the scheduler runs on ticks of one forward pass per micro-batch, empty or not (see the module docs). Every
    /// attention rank of the communicator must run with the same `micro_batches`.
    pub lockstep: Option<LockstepOptions>,
}

/// How a lockstep engine ticks (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockstepOptions {
    /// The shortest time from one tick's start to the next while the engine has nothing to compute: an idle cluster
    /// keeps stepping together, at this rate, without spinning. Bounds the extra wait of a request that arrives at
    /// an idle cluster. Must be positive and well below the transport's step deadline.
    pub idle_interval: Duration,
}

impl Default for LockstepOptions {
    fn default() -> Self {
        Self { idle_interval: DEFAULT_IDLE_INTERVAL }
    }
}

/// [`LockstepOptions::idle_interval`] by default: 20 empty ticks a second.
pub const DEFAULT_IDLE_INTERVAL: Duration = Duration::from_millis(50);

/// How the attention ranks of lockstep engines end their steps together. Every tick is the same number of steps on
/// every rank (with the same `micro_batches`), so a tick count names the same exchange on every rank: the ranks agree
/// on the count after which all of them stop, then each leaves the communicator in one last exchange, the same one
/// everywhere ([`switchyard_transport::collective::CollectiveTransport::leave`]). A deployment agrees through the
/// exchanges themselves ([`crate::CollectiveLeave`]).
pub trait LockstepLeave: Send + Sync {
    /// Asked at every tick boundary once this rank has drained (it admits nothing more and has no sequence left),
    /// with the ticks it has made and the MoE layer steps each tick makes ([`EngineOptions::steps_per_tick`]): the
    /// tick count every attention rank stops at, once every rank asked. The answer must be the same on every rank and
    /// not below any rank's count when that rank first hears it. `None` while some rank still serves: this rank ticks
    /// on, empty, so that the others are not left waiting. An error when the ranks can no longer agree (their
    /// communicator failed): the engine ends with it, without leaving.
    fn last_tick(&self, ticks: u64, steps_per_tick: u64) -> Result<Option<u64>, TransportError>;

    /// The exchange that ends this rank's steps, made once it has made the last tick (blocking).
    fn leave(&self) -> Result<(), TransportError>;
}

impl EngineOptions {
    /// MoE layer steps (exchanges of a lockstep transport's dispatch and combine) one lockstep tick makes with the
    /// model of `config`: one forward pass per micro-batch, one step per MoE layer each. Every attention rank of a
    /// communicator must make the same number (see
    /// [`switchyard_transport::collective::CollectiveTransport::set_steps_per_tick`]).
    pub fn steps_per_tick(&self, config: &TextConfig) -> u64 {
        (self.micro_batches * config.num_moe_layers()) as u64
    }

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
            lockstep: None,
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
    ticks: AtomicU64,
    /// A drain began: admission is closed.
    draining: AtomicBool,
}

/// A request handed to the scheduler.
struct Admission {
    request: ValidGenerateRequest,
    events: UnboundedSender<GenerationEvent>,
}

/// What the engine handle tells its scheduler thread.
enum Command {
    Admit(Admission),
    /// Stop admitting; end once every sequence is done (lockstep: once the ranks left together with `leave`), then
    /// say how it went on `done`.
    Drain {
        leave: Option<Arc<dyn LockstepLeave>>,
        done: Sender<Result<(), AttentionWorkerError>>,
    },
}

/// Handle to the scheduler thread. Dropping it stops admission; the thread finishes the sequences it has and exits.
pub struct Engine {
    requests: Sender<Command>,
    shared: Arc<Shared>,
    pool: Arc<KvBlockPool>,
    config: TextConfig,
    limits: RequestLimits,
    options: EngineOptions,
    /// Whether sequences too long for the pool are spread over context-parallel groups.
    context_parallel: bool,
}

impl Engine {
    /// Starts the scheduler thread for `model` (whose routed experts are already installed): a `Llama4Model` on the
    /// CPU or a `GpuModel`, whose KV pool the engine then uses ([`ForwardPass::kv_pool`]).
    pub fn start(model: Arc<dyn ForwardPass>, options: EngineOptions) -> Result<Self, AttentionWorkerError> {
        Self::start_with_context(model, options, None)
    }

    /// [`Engine::start`], spreading sequences too long for this engine's KV cache over the context-parallel groups
    /// `context` gives (without it they are refused).
    pub fn start_with_context(
        model: Arc<dyn ForwardPass>,
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
        if options.lockstep.as_ref().is_some_and(|l| l.idle_interval.is_zero()) {
            return Err(bad(
                "lockstep.idle_interval",
                "must be positive: an idle engine would tick without pause".into(),
            ));
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
        let pool = model.kv_pool(options.kv_block_size, kv_blocks).map_err(|e| bad("kv_blocks", e.to_string()))?;
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
            lockstep: options.lockstep.clone(),
            steps_per_tick: options.steps_per_tick(&config),
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
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(AttentionWorkerError::EngineStopped);
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
        if self.requests.send(Command::Admit(Admission { request, events })).is_err() {
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

    /// Lockstep ticks made so far, empty ones included (0 for an engine not in lockstep).
    pub fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::SeqCst)
    }

    /// Stops admission (later requests fail with `EngineStopped`), lets every admitted sequence finish, and waits for
    /// the scheduler thread to end (blocking: call it outside async tasks). A lockstep engine ticks on, empty, until
    /// `leave` says where every attention rank stops, then leaves the communicator with it: the result is the
    /// leave's. Without `leave` a lockstep engine just stops stepping, which fails the other ranks' next step.
    pub fn drain(&self, leave: Option<Arc<dyn LockstepLeave>>) -> Result<(), AttentionWorkerError> {
        let (done, finished) = mpsc::channel();
        self.shared.draining.store(true, Ordering::SeqCst);
        if self.requests.send(Command::Drain { leave, done }).is_err() {
            return Err(AttentionWorkerError::EngineStopped);
        }
        // A scheduler that ended without answering (a panic) drops the sender.
        finished.recv().unwrap_or(Err(AttentionWorkerError::EngineStopped))
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
    model: Arc<dyn ForwardPass>,
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
    lockstep: Option<LockstepOptions>,
    /// MoE layer steps per lockstep tick.
    steps_per_tick: u64,
}

impl Scheduler {
    fn run(mut self, commands: Receiver<Command>) {
        // Running sequences in arrival order, and the queue of those waiting for admission, also in arrival order.
        let mut running: Vec<Sequence> = Vec::new();
        let mut waiting: VecDeque<Sequence> = VecDeque::new();
        let mut open = true;
        let mut drains: Vec<Sender<Result<(), AttentionWorkerError>>> = Vec::new();
        let mut leave: Option<Arc<dyn LockstepLeave>> = None;
        // Lockstep: when the next empty tick is due, whether the last tick failed (said once, not every tick), and
        // whether any did. (An empty tick on a failed communicator does not fail: it had no request to fail.)
        let mut next_tick = Instant::now();
        let mut failing = false;
        let mut failed_before = false;
        // The tick count every attention rank stops at, once agreed.
        let mut agreed: Option<u64> = None;
        let result = loop {
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
            loop {
                let idle = running.is_empty() && waiting.is_empty();
                let next = match &self.lockstep {
                    _ if !idle => commands.try_recv(),
                    None if !open => commands.try_recv(),
                    // Nothing to compute: sleep until a request arrives (or the engine is dropped).
                    None => commands.recv().map_err(|_| TryRecvError::Disconnected),
                    // ... or until the next empty tick is due (also while draining: late requests are refused).
                    Some(_) => {
                        let wait = next_tick.saturating_duration_since(Instant::now());
                        match commands.recv_timeout(wait) {
                            Ok(command) => Ok(command),
                            Err(mpsc::RecvTimeoutError::Timeout) => Err(TryRecvError::Empty),
                            Err(mpsc::RecvTimeoutError::Disconnected) => {
                                // No handle left to wake this one: wait out the tick's pace all the same.
                                std::thread::sleep(wait);
                                Err(TryRecvError::Disconnected)
                            }
                        }
                    }
                };
                match next {
                    Ok(Command::Admit(admission)) => {
                        if admission.events.is_closed() || !open {
                            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                            // Refused after a drain began; a closed receiver needs no telling.
                            let _ = admission
                                .events
                                .send(GenerationEvent::Failed(Arc::new(AttentionWorkerError::EngineStopped)));
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
                    Ok(Command::Drain { leave: how, done }) => {
                        tracing::info!(
                            running = running.len(),
                            waiting = waiting.len(),
                            "draining: admitting nothing more, finishing the sequences"
                        );
                        open = false;
                        leave = leave.or(how);
                        drains.push(done);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let idle = running.is_empty() && waiting.is_empty();
            let Some(lockstep) = self.lockstep.clone() else {
                if idle {
                    if open {
                        continue;
                    }
                    break Ok(());
                }
                self.plan(&mut running, &mut waiting);
                self.shared.active.store(running.len(), Ordering::SeqCst);
                let mut scheduled: Vec<&mut Sequence> = running.iter_mut().filter(|s| s.scheduled > 0).collect();
                if scheduled.is_empty() {
                    continue;
                }
                let lanes = if self.pools.len() == 2 && scheduled.len() >= 2 { 2 } else { 1 };
                // A failed step already failed its sequences (and said so); the engine goes on.
                let _ = self.step(&mut scheduled, lanes);
                running.retain(|s| !s.done);
                self.shared.active.store(running.len(), Ordering::SeqCst);
                continue;
            };
            if idle && !open {
                let ticks = self.shared.ticks.load(Ordering::SeqCst);
                let Some(leave) = &leave else {
                    tracing::warn!(ticks, "lockstep engine stopped without leaving: the other ranks' next step fails");
                    break Ok(());
                };
                agreed = match leave.last_tick(ticks, self.steps_per_tick) {
                    Ok(agreed) => agreed,
                    Err(error) => break Err(failed_before_leaving(ticks, &error.to_string())),
                };
                match agreed {
                    Some(last) if last == ticks => {
                        tracing::info!(ticks, "every attention rank drained; leaving the communicator");
                        break leave
                            .leave()
                            .map_err(|error| after_agreement(last, ticks, &error.to_string(), failed_before));
                    }
                    Some(last) if last < ticks => {
                        break Err(AttentionWorkerError::Transport(TransportError::Unavailable {
                            peer: "the other attention ranks".into(),
                            reason: format!(
                                "the ranks agreed to stop after tick {last}, but this rank has made {ticks} ticks: \
                                 they do not make the same steps per tick (is --micro-batches the same on every \
                                 rank?)"
                            ),
                        }));
                    }
                    _ => {}
                }
            }
            if idle && Instant::now() < next_tick {
                continue;
            }
            let started = Instant::now();
            if !idle {
                self.plan(&mut running, &mut waiting);
                self.shared.active.store(running.len(), Ordering::SeqCst);
            }
            let mut scheduled: Vec<&mut Sequence> = running.iter_mut().filter(|s| s.scheduled > 0).collect();
            let stepped = self.step(&mut scheduled, self.pools.len());
            let ticks = self.shared.ticks.fetch_add(1, Ordering::SeqCst) + 1;
            if let (Err(error), Some(last)) = (&stepped, agreed) {
                // Every rank has drained: nothing is left to fail but the ticks themselves (or the communicator had
                // failed before).
                break Err(after_agreement(last, ticks, error, failed_before));
            }
            if stepped.is_err() && !failing {
                tracing::warn!(ticks, "a lockstep tick failed; ticking on (a failed communicator fails every step)");
            }
            failing = stepped.is_err();
            failed_before |= failing;
            // A tick that computed nothing (idle, or every sequence blocked) paces the next; busy ticks follow at once.
            next_tick = if scheduled.is_empty() { started + lockstep.idle_interval } else { started };
            drop(scheduled);
            running.retain(|s| !s.done);
            self.shared.active.store(running.len(), Ordering::SeqCst);
        };
        if let Err(error) = &result {
            tracing::warn!(%error, "the engine ended with an error");
        }
        // A drain caller that went away needs no answer; callers after the first hear the error as text.
        let mut drains = drains.into_iter();
        let later = result.as_ref().map(|_| ()).map_err(|e| TransportError::Compute { reason: e.to_string() });
        if let Some(first) = drains.next() {
            let _ = first.send(result);
        }
        for done in drains {
            let _ = done.send(later.clone().map_err(AttentionWorkerError::Transport));
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

    /// Runs one step over `scheduled` as `lanes` micro-batches (1 or 2; a lane may be empty: lockstep ticks run every
    /// micro-batch's forward pass) and advances (or fails) every sequence in it. The first lane's error, if one failed.
    fn step(&self, scheduled: &mut [&mut Sequence], lanes: usize) -> Result<(), String> {
        if !scheduled.is_empty() {
            self.shared.steps.fetch_add(1, Ordering::Relaxed);
        }
        if lanes == 1 {
            let result = self.forward(&self.pools[0], scheduled);
            return self.apply(scheduled, result);
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
        let first_result = self.apply(first, first_result);
        let second_result = self.apply(second, second_result);
        first_result.and(second_result)
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

    /// Advances `sequences` with a step's logits, or fails them with its error (returned as text).
    fn apply(
        &self,
        sequences: &mut [&mut Sequence],
        result: Result<Vec<Vec<f32>>, AttentionWorkerError>,
    ) -> Result<(), String> {
        match result {
            Ok(logits) => {
                for (sequence, logits) in sequences.iter_mut().zip(logits) {
                    sequence.advance(logits, self.vocab, &self.stop_tokens);
                }
                Ok(())
            }
            Err(error) if sequences.is_empty() => {
                // An empty lockstep step: nobody to tell; the tick loop reports failing ticks.
                tracing::debug!(%error, "empty lockstep step failed");
                Err(error.to_string())
            }
            Err(error) => {
                self.shared.failed_steps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, sequences = sequences.len(), "step failed; failing its requests");
                let error = Arc::new(error);
                for sequence in sequences.iter_mut() {
                    sequence.fail(&error);
                }
                Err(error.to_string())
            }
        }
    }
}

/// The error of a lockstep engine whose step or leave failed after every attention rank agreed to stop after tick
/// `last` (this rank at tick `ticks`). Unless a step had `failed` before, every rank had drained and
/// stepped well until then: the likely cause is ranks making different numbers of steps per tick, whose ticks name
/// different exchanges.
fn after_agreement(last: u64, ticks: u64, error: &str, failed: bool) -> AttentionWorkerError {
    if failed {
        return failed_before_leaving(ticks, error);
    }
    AttentionWorkerError::Transport(TransportError::Unavailable {
        peer: "the other attention ranks".into(),
        reason: format!(
            "the communicator failed after every attention rank drained and agreed to stop after tick {last} (this \
             rank at tick {ticks}); ranks with different --micro-batches make different steps per tick and leave in \
             different exchanges, which fails it: {error}"
        ),
    })
}

/// The error of a lockstep engine that could not leave at tick `ticks` because its communicator had failed.
fn failed_before_leaving(ticks: u64, error: &str) -> AttentionWorkerError {
    AttentionWorkerError::Transport(TransportError::Unavailable {
        peer: "the other attention ranks".into(),
        reason: format!("the communicator had failed before this rank could leave (at tick {ticks}): {error}"),
    })
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> AttentionWorkerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    AttentionWorkerError::Panicked { message }
}
