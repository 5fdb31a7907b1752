//! Dynamic batching for the encoder pipelines (TEI's idea): requests queue per model and a
//! worker thread merges what is waiting (same parameters, up to `max_batch_inputs` inputs) into
//! one pipeline call, whose length-sorted batches then hold inputs of several requests. Answers
//! are split back per request. A merged call that fails is redone request by request, so an
//! error reaches only the request that caused it. A request whose client has gone is dropped
//! before it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use ferroformers::{Input, Output, Params, Pipeline};
use tokio::sync::oneshot;

type Reply = oneshot::Sender<ferroformers::Result<Vec<Output>>>;

struct Job {
    inputs: Vec<Input>,
    params: Params,
    reply: Reply,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct Stats {
    pub queued: AtomicU64,
    pub batches: AtomicU64,
    pub batched_requests: AtomicU64,
    pub batched_inputs: AtomicU64,
    pub largest_batch: AtomicU64,
    pub dropped: AtomicU64,
}

/// A model's queue and the worker thread that drains it.
pub(crate) struct Batcher {
    tx: Sender<Job>,
    pub stats: Arc<Stats>,
}

impl Batcher {
    /// `wait`: how long the first request of a batch waits for others (0: a batch is what is
    /// already queued when the worker is free, as TEI does).
    pub fn start(pipe: Arc<Pipeline>, max_batch_inputs: usize, wait: std::time::Duration) -> Self {
        let (tx, rx) = channel();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("ferroformers-batcher".into())
            .spawn(move || worker(&pipe, &rx, max_batch_inputs.max(1), wait, &s))
            .expect("spawning a batcher thread");
        Batcher { tx, stats }
    }

    /// Queue `inputs`; their outputs once their batch has run.
    pub async fn run(
        &self,
        inputs: Vec<Input>,
        params: Params,
    ) -> ferroformers::Result<Vec<Output>> {
        let (reply, answer) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            inputs,
            params,
            reply,
        };
        if self.tx.send(job).is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> ferroformers::Error {
    ferroformers::Error::Tokenizer("the model's batch worker has stopped".into())
}

fn worker(
    pipe: &Pipeline,
    rx: &Receiver<Job>,
    max: usize,
    wait: std::time::Duration,
    stats: &Stats,
) {
    let mut waiting: Option<Job> = None;
    loop {
        let first = match waiting.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut jobs = vec![first];
        let mut n = jobs[0].inputs.len();
        let deadline = std::time::Instant::now() + wait;
        while n < max {
            let next = match deadline.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => rx.recv_timeout(left).ok(),
                _ => rx.try_recv().ok(),
            };
            match next.ok_or(()) {
                Ok(j) if j.params == jobs[0].params && n + j.inputs.len() <= max => {
                    n += j.inputs.len();
                    jobs.push(j);
                }
                Ok(j) => {
                    waiting = Some(j);
                    break;
                }
                Err(_) => break,
            }
        }
        stats.queued.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
        // Clients that have gone: their inputs are not run.
        let before = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        stats
            .dropped
            .fetch_add((before - jobs.len()) as u64, Ordering::Relaxed);
        if jobs.is_empty() {
            continue;
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .batched_requests
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let total: usize = jobs.iter().map(|j| j.inputs.len()).sum();
        stats
            .batched_inputs
            .fetch_add(total as u64, Ordering::Relaxed);
        stats
            .largest_batch
            .fetch_max(total as u64, Ordering::Relaxed);
        if jobs.len() == 1 {
            let j = jobs.pop().expect("one job");
            let _ = j.reply.send(pipe.run(&j.inputs, &j.params));
            continue;
        }
        let all: Vec<Input> = jobs.iter().flat_map(|j| j.inputs.clone()).collect();
        match pipe.run(&all, &jobs[0].params) {
            Ok(outs) => {
                let mut outs = outs.into_iter();
                for j in jobs {
                    let mine: Vec<Output> = outs.by_ref().take(j.inputs.len()).collect();
                    let _ = j.reply.send(Ok(mine));
                }
            }
            Err(_) => {
                for j in jobs {
                    let _ = j.reply.send(pipe.run(&j.inputs, &j.params));
                }
            }
        }
    }
}
