//! Dynamic batching for the encoder pipelines (TEI's idea): requests queue per model and a
//! worker thread merges what is waiting (same parameters, up to `max_batch_inputs` inputs and
//! `max_batch_tokens` tokens) into one pipeline call, whose length-sorted batches then hold inputs of several requests. Answers
//! are split back per request. A merged call that fails is redone request by request, so an
//! error reaches only the request that caused it. A request whose client has gone is dropped
//! before it runs, and a generation (summarization, translation, speech recognition) stops
//! after its next token once every request in its call has gone. Once the graceful-shutdown
//! timeout has passed, queued requests are refused (503) instead of run, and a generation
//! running stops the same way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use ferroformers::tokenizer::Tokenizer;
use ferroformers::{Input, Output, Params, Pipeline};
use tokio::sync::oneshot;

use super::ApiError;

type Answer = Result<Vec<Output>, ApiError>;
type Reply = oneshot::Sender<Answer>;

struct Job {
    inputs: Vec<Input>,
    params: Params,
    reply: Reply,
    /// Set once the request's handler is gone (its client hung up, or it timed out).
    gone: ferroformers::generation::Cancel,
    /// The inputs' tokens (counted by the worker when the job reaches it).
    tokens: usize,
    queued_at: std::time::Instant,
}

/// A batch's limits: inputs, and tokens (TEI's `--max-batch-requests`, `--max-batch-tokens`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub inputs: usize,
    pub tokens: usize,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct Stats {
    pub queued: AtomicU64,
    pub batches: AtomicU64,
    pub batched_requests: AtomicU64,
    pub batched_inputs: AtomicU64,
    pub largest_batch: AtomicU64,
    pub batched_tokens: AtomicU64,
    pub largest_batch_tokens: AtomicU64,
    pub dropped: AtomicU64,
    pub durations: std::sync::Mutex<Durations>,
}

/// Histograms (seconds): each request's wait in the queue, each batch's pipeline call.
#[derive(Default)]
pub(crate) struct Durations {
    pub queue: super::Histogram,
    pub inference: super::Histogram,
}

/// A model's queue and the worker thread that drains it.
pub(crate) struct Batcher {
    tx: Sender<Job>,
    pub stats: Arc<Stats>,
}

impl Batcher {
    /// `wait`: how long the first request of a batch waits for others (0: a batch is what is
    /// already queued when the worker is free, as TEI does). `tokenizer` counts the tokens of
    /// each request for `limits.tokens` (none: requests count no tokens). Once `aborting` is
    /// set, requests still queued are answered 503.
    pub fn start(
        pipe: Arc<Pipeline>,
        tokenizer: Option<Tokenizer>,
        limits: Limits,
        wait: std::time::Duration,
        aborting: Arc<AtomicBool>,
    ) -> Self {
        let (tx, rx) = channel();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        let limits = Limits {
            inputs: limits.inputs.max(1),
            tokens: limits.tokens.max(1),
        };
        std::thread::Builder::new()
            .name("ferroformers-batcher".into())
            .spawn(move || {
                let w = Worker {
                    pipe: &pipe,
                    tokenizer: tokenizer.as_ref(),
                    limits,
                    wait,
                    aborting: &aborting,
                    stats: &s,
                };
                w.serve(&rx)
            })
            .expect("spawning a batcher thread");
        Batcher { tx, stats }
    }

    /// Queue `inputs`; their outputs once their batch has run.
    pub async fn run(&self, inputs: Vec<Input>, params: Params) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let gone = ferroformers::generation::Cancel::new();
        // Cancels when dropped: with the request's future (its client gone, its timeout
        // passed) or once it has its answer.
        let _when_dropped = super::generate::ClientAlive(gone.clone());
        let job = Job {
            inputs,
            params,
            reply,
            gone,
            tokens: 0,
            queued_at: std::time::Instant::now(),
        };
        if self.tx.send(job).is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "the model's batch worker has stopped",
    )
}

/// A pipeline call as its requests' answer: a panic in it (a bug) answers 500 naming it, and
/// the worker goes on serving the model instead of stopping for every later request.
fn guarded(f: impl FnOnce() -> ferroformers::Result<Vec<Output>>) -> Answer {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(ApiError::from),
        Err(p) => {
            let what =
                ferroformers::error::panic_message(&*p).unwrap_or_else(|| "no message".into());
            tracing::error!("the pipeline panicked: {what}");
            Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "Backend",
                format!("the model failed on this request (a bug, please report it): {what}"),
            ))
        }
    }
}

/// The tokens of one input as the model sees it (special tokens included, truncated to the
/// model's limit): a text or pair; a similarity's source and sentences; a question with its
/// context; token ids themselves. Audio and chats count none.
fn tokens_of(tok: &Tokenizer, input: &Input) -> usize {
    let len = |t: &str, p: Option<&str>| tok.encode(t, p).map_or(0, |e| e.len());
    match input {
        Input::Text(t) => len(t, None),
        Input::TextPair { text, text_pair } => len(text, Some(text_pair)),
        Input::Question { question, context } => len(question, Some(context)),
        Input::Similarity {
            source_sentence,
            sentences,
        } => len(source_sentence, None) + sentences.iter().map(|s| len(s, None)).sum::<usize>(),
        Input::Tokens(ids) => ids.len(),
        Input::Chat(_) | Input::Audio { .. } | Input::AudioBytes(_) => 0,
    }
}

/// The batcher thread's view: its model, how it counts tokens, its limits and counters.
struct Worker<'a> {
    pipe: &'a Pipeline,
    tokenizer: Option<&'a Tokenizer>,
    limits: Limits,
    wait: std::time::Duration,
    aborting: &'a Arc<AtomicBool>,
    stats: &'a Stats,
}

impl Worker<'_> {
    /// A job as it reaches the worker, its tokens counted.
    fn counted(&self, mut j: Job) -> Job {
        if let Some(tok) = self.tokenizer {
            j.tokens = j.inputs.iter().map(|i| tokens_of(tok, i)).sum();
        }
        j
    }

    /// Take batches off the queue and run them until every sender has gone.
    fn serve(&self, rx: &Receiver<Job>) {
        let mut waiting: Option<Job> = None;
        loop {
            let first = match waiting.take() {
                Some(j) => j,
                None => match rx.recv() {
                    Ok(j) => self.counted(j),
                    Err(_) => return,
                },
            };
            let jobs = self.gather(first, rx, &mut waiting);
            self.stats
                .queued
                .fetch_sub(jobs.len() as u64, Ordering::Relaxed);
            self.run(jobs);
        }
    }

    /// `first` and the jobs queued behind it that share its parameters and fit the limits
    /// with it (waiting up to `wait` for them); the first job that does not fit is kept in
    /// `waiting`. A job over a limit by itself runs alone.
    fn gather(&self, first: Job, rx: &Receiver<Job>, waiting: &mut Option<Job>) -> Vec<Job> {
        let mut jobs = vec![first];
        let (mut n, mut tokens) = (jobs[0].inputs.len(), jobs[0].tokens);
        let deadline = std::time::Instant::now() + self.wait;
        while n < self.limits.inputs && tokens < self.limits.tokens {
            let next = match deadline.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => rx.recv_timeout(left).ok(),
                _ => rx.try_recv().ok(),
            };
            let Some(j) = next.map(|j| self.counted(j)) else {
                break;
            };
            if j.params == jobs[0].params
                && n + j.inputs.len() <= self.limits.inputs
                && tokens + j.tokens <= self.limits.tokens
            {
                n += j.inputs.len();
                tokens += j.tokens;
                jobs.push(j);
            } else {
                *waiting = Some(j);
                break;
            }
        }
        jobs
    }

    /// Run one batch and answer its requests: those whose client has gone are dropped unrun,
    /// and after the shutdown timeout every one is refused.
    fn run(&self, mut jobs: Vec<Job>) {
        let stats = self.stats;
        let before = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        stats
            .dropped
            .fetch_add((before - jobs.len()) as u64, Ordering::Relaxed);
        if self.aborting.load(Ordering::SeqCst) {
            for j in jobs {
                let _ = j.reply.send(Err(super::shut_down()));
            }
            return;
        }
        if jobs.is_empty() {
            return;
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .batched_requests
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let count = |total: &AtomicU64, largest: &AtomicU64, n: usize| {
            total.fetch_add(n as u64, Ordering::Relaxed);
            largest.fetch_max(n as u64, Ordering::Relaxed);
        };
        let inputs = jobs.iter().map(|j| j.inputs.len()).sum();
        count(&stats.batched_inputs, &stats.largest_batch, inputs);
        let tokens = jobs.iter().map(|j| j.tokens).sum();
        count(&stats.batched_tokens, &stats.largest_batch_tokens, tokens);
        let start = std::time::Instant::now();
        if let Ok(mut d) = stats.durations.lock() {
            for j in &jobs {
                d.queue.observe((start - j.queued_at).as_secs_f64());
            }
        }
        let timed = |r| {
            if let Ok(mut d) = stats.durations.lock() {
                d.inference.observe(start.elapsed().as_secs_f64());
            }
            r
        };
        let pipe = self.pipe;
        // A generation in the call stops once every request in it is gone, or once the
        // graceful shutdown's time is up.
        let all_gone = |jobs: &[Job]| {
            let gone: Vec<_> = jobs.iter().map(|j| j.gone.clone()).collect();
            let aborting = self.aborting.clone();
            move || gone.iter().all(|g| g.is_cancelled()) || aborting.load(Ordering::SeqCst)
        };
        let run = |jobs: &[Job], inputs: &[Input], params: &Params| {
            ferroformers::generation::abandoned_when(all_gone(jobs), || {
                guarded(|| pipe.run(inputs, params))
            })
        };
        if jobs.len() == 1 {
            let j = jobs.pop().expect("one job");
            let r = timed(run(std::slice::from_ref(&j), &j.inputs, &j.params));
            let _ = j.reply.send(r);
            return;
        }
        let all: Vec<Input> = jobs.iter().flat_map(|j| j.inputs.clone()).collect();
        match timed(run(&jobs, &all, &jobs[0].params)) {
            Ok(outs) => {
                let mut outs = outs.into_iter();
                for j in jobs {
                    let mine: Vec<Output> = outs.by_ref().take(j.inputs.len()).collect();
                    let _ = j.reply.send(Ok(mine));
                }
            }
            Err(_) => {
                for j in jobs {
                    let r = run(std::slice::from_ref(&j), &j.inputs, &j.params);
                    let _ = j.reply.send(r);
                }
            }
        }
    }
}
