//! One attention worker's scheduler, at the granularity of whole steps: admission by sequence slots and KV
//! positions, decode tokens first, then prompt chunks within the step's token budget (chunked prefill), oldest
//! first. A decoding sequence is only touched when it joins and when it finishes: per step, the worker keeps counts
//! and sums, and finishing sequences come off a heap keyed by the step they end in.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use crate::config::SimConfig;
use crate::costs::AttentionBatch;
use crate::stats::Tally;

/// A client request as it arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub id: u64,
    pub arrival: f64,
    pub input: u32,
    pub output: u32,
}

#[derive(Debug)]
struct Prefilling {
    request: Request,
    done: u32,
}

/// A decoding sequence; ordered by the worker step it finishes in (then id, for determinism).
#[derive(Debug)]
struct Decoding {
    finish_step: u64,
    request: Request,
    first_token: f64,
}

impl PartialEq for Decoding {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Decoding {}
impl PartialOrd for Decoding {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Decoding {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.finish_step, self.request.id).cmp(&(other.finish_step, other.request.id))
    }
}

/// Where a worker is in its step cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No step in flight.
    Idle,
    /// A step is running; its end is an event.
    Stepping,
    /// Its step reached a layer whose experts no live GPU holds: it waits for a placement.
    Held,
}

#[derive(Debug)]
pub(crate) struct AttentionWorker {
    pub alive: bool,
    pub phase: Phase,
    waiting: VecDeque<Request>,
    prefilling: VecDeque<Prefilling>,
    decoding: BinaryHeap<Reverse<Decoding>>,
    decode_context: f64,
    kv_reserved: u64,
    steps: u64,
    /// Prompt chunks of the step in flight, for the first `chunks.len()` prefilling sequences.
    chunks: Vec<u32>,
    /// Decoding sequences in the step in flight.
    step_decoders: usize,
    /// Tokens of the step in flight (0 when none): what this worker sends the expert side.
    pub batch_tokens: f64,
}

impl AttentionWorker {
    pub fn new() -> Self {
        Self {
            alive: true,
            phase: Phase::Idle,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: BinaryHeap::new(),
            decode_context: 0.0,
            kv_reserved: 0,
            steps: 0,
            chunks: Vec::new(),
            step_decoders: 0,
            batch_tokens: 0.0,
        }
    }

    /// Requests it holds in any state: what the front end balances by.
    pub fn outstanding(&self) -> usize {
        self.waiting.len() + self.prefilling.len() + self.decoding.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.prefilling.len() + self.decoding.len()
    }

    pub fn has_work(&self) -> bool {
        self.outstanding() > 0
    }

    /// Queues a request; false when the waiting queue is full (the request is refused).
    pub fn enqueue(&mut self, request: Request, config: &SimConfig) -> bool {
        if self.waiting.len() >= config.max_waiting {
            return false;
        }
        self.waiting.push_back(request);
        true
    }

    /// Admits what fits and chooses the next step's work; `None` when there is nothing to do.
    pub fn plan(&mut self, config: &SimConfig) -> Option<AttentionBatch> {
        while let Some(front) = self.waiting.front() {
            let need = u64::from(front.input) + u64::from(front.output);
            if self.running() >= config.max_seqs as usize || self.kv_reserved + need > config.kv_tokens {
                break;
            }
            self.kv_reserved += need;
            if let Some(request) = self.waiting.pop_front() {
                self.prefilling.push_back(Prefilling { request, done: 0 });
            }
        }
        self.step_decoders = self.decoding.len();
        let mut budget = (config.max_batch_tokens as usize).saturating_sub(self.step_decoders) as u32;
        self.chunks.clear();
        let mut pairs = 0.0;
        for sequence in &self.prefilling {
            if budget == 0 {
                break;
            }
            let chunk = (sequence.request.input - sequence.done).min(budget);
            pairs += f64::from(chunk) * (f64::from(sequence.done) + f64::from(chunk) / 2.0);
            self.chunks.push(chunk);
            budget -= chunk;
        }
        let batch = AttentionBatch {
            decode_sequences: self.step_decoders as f64,
            prefill_tokens: self.chunks.iter().map(|&c| f64::from(c)).sum(),
            decode_context: self.decode_context,
            prefill_pairs: pairs,
        };
        if batch.tokens() == 0.0 {
            return None;
        }
        self.batch_tokens = batch.tokens();
        Some(batch)
    }

    /// Applies the step planned last, ending at `now`: one token per decoding sequence, the chunks' prompt positions,
    /// first tokens of completed prompts, finished sequences.
    pub fn finish(&mut self, now: f64, tally: &mut Tally) {
        self.steps += 1;
        let step = self.steps;
        let decoded = self.step_decoders as u64;
        tally.output_tokens += decoded;
        tally.point_output_tokens += decoded;
        self.decode_context += decoded as f64;
        while self.decoding.peek().is_some_and(|Reverse(d)| d.finish_step <= step) {
            let Some(Reverse(done)) = self.decoding.pop() else { break };
            let request = done.request;
            self.decode_context -= f64::from(request.input) + f64::from(request.output);
            self.release(&request);
            tally.completed += 1;
            tally.tpot.record((now - done.first_token) * 1e3 / f64::from(request.output - 1));
            tally.e2e.record((now - request.arrival) * 1e3);
        }
        for (sequence, &chunk) in self.prefilling.iter_mut().zip(&self.chunks) {
            sequence.done += chunk;
            tally.prefill_tokens += u64::from(chunk);
        }
        self.chunks.clear();
        self.step_decoders = 0;
        self.batch_tokens = 0.0;
        while self.prefilling.front().is_some_and(|p| p.done >= p.request.input) {
            let Some(Prefilling { request, .. }) = self.prefilling.pop_front() else { break };
            tally.output_tokens += 1;
            tally.point_output_tokens += 1;
            let ttft_ms = (now - request.arrival) * 1e3;
            tally.ttft.record(ttft_ms);
            tally.point_ttft.record(ttft_ms);
            if request.output <= 1 {
                self.release(&request);
                tally.completed += 1;
                tally.e2e.record(ttft_ms);
            } else {
                self.decode_context += f64::from(request.input) + 1.0;
                self.decoding.push(Reverse(Decoding {
                    finish_step: step + u64::from(request.output) - 1,
                    request,
                    first_token: now,
                }));
            }
        }
    }

    fn release(&mut self, request: &Request) {
        self.kv_reserved -= u64::from(request.input) + u64::from(request.output);
    }

    /// Fails every admitted request (its step failed); waiting ones stay queued. Returns how many failed.
    pub fn fail_running(&mut self, tally: &mut Tally) -> u64 {
        let failed = self.running() as u64;
        self.prefilling.clear();
        self.decoding.clear();
        self.decode_context = 0.0;
        self.kv_reserved = 0;
        self.chunks.clear();
        self.step_decoders = 0;
        self.batch_tokens = 0.0;
        tally.failed += failed;
        failed
    }

    /// The worker died: everything it holds fails and it takes no more requests.
    pub fn die(&mut self, tally: &mut Tally) {
        self.fail_running(tally);
        tally.failed += self.waiting.len() as u64;
        self.waiting.clear();
        self.alive = false;
        self.phase = Phase::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_prefills_in_chunks_then_decodes_to_completion() {
        let config = SimConfig { max_batch_tokens: 64, max_seqs: 4, ..SimConfig::default() };
        let mut worker = AttentionWorker::new();
        let mut tally = Tally::default();
        assert!(worker.enqueue(Request { id: 0, arrival: 0.0, input: 100, output: 3 }, &config));
        let mut now = 0.0;
        let mut steps = 0;
        while worker.has_work() {
            let batch = worker.plan(&config).expect("work");
            assert!(batch.tokens() <= 64.0);
            now += 0.01;
            worker.finish(now, &mut tally);
            steps += 1;
        }
        // Two prefill steps (64 + 36 tokens, the second yields the first token), then two decode steps.
        assert_eq!(steps, 4);
        assert_eq!(tally.completed, 1);
        assert_eq!(tally.output_tokens, 3);
        assert_eq!(tally.prefill_tokens, 100);
        assert_eq!(worker.decode_context, 0.0);
        assert_eq!(worker.kv_reserved, 0);
        let ttft = tally.ttft.quantile(0.5).expect("one");
        assert!((ttft / 20.0 - 1.0).abs() < 0.011, "{ttft}");
    }

    #[test]
    fn admission_respects_slots_kv_and_the_queue() {
        let config = SimConfig { max_seqs: 2, kv_tokens: 300, max_waiting: 1, ..SimConfig::default() };
        let mut worker = AttentionWorker::new();
        let request = |id| Request { id, arrival: 0.0, input: 100, output: 50 };
        assert!(worker.enqueue(request(0), &config));
        assert!(!worker.enqueue(request(1), &config), "the queue holds one");
        worker.plan(&config).expect("work");
        assert!(worker.enqueue(request(1), &config));
        worker.plan(&config).expect("work");
        assert!(worker.enqueue(request(2), &config));
        worker.plan(&config).expect("work");
        // 150 positions each: two fit 300, the third waits.
        assert_eq!((worker.running(), worker.waiting()), (2, 1));
        let mut tally = Tally::default();
        worker.die(&mut tally);
        assert_eq!(tally.failed, 3);
        assert!(!worker.has_work());
    }
}
