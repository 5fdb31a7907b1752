//! Continuous batching for decoder-only models: requests generating at the same time share one
//! batched forward pass per token, and a new request joins the running batch between two
//! decoding steps instead of waiting for it to finish (TGI's and vLLM's scheduling, on our
//! left-padded KV cache).
//!
//! Each request keeps running its own search loop ([`generate`](super::generate): its logits
//! processors, sampling seed, stop strings, streaming and cancellation) on its own thread,
//! over a [`SharedSession`] instead of a private [`DecoderSession`]. The session hands its
//! next token to the [`Batcher`] and waits. When every sequence in the batch has handed in its
//! token, the thread that handed in the last one runs the step for all of them:
//! 1. rows whose request has gone (finished, failed, cancelled: its client left) are dropped,
//!    and with them their KV cache; padding that no remaining row needs is cut off the front
//!    once it is a quarter of the cache; a long prompt (2c) whose request was cancelled stops;
//! 2. waiting requests are admitted while the batch's token budget (`max_total_tokens`: each
//!    sequence counts its prompt plus the most tokens it may generate) allows, and when
//!    [`Admission`] (TGI's `--waiting-served-ratio` / `--max-waiting-tokens`) lets them;
//!    their prompts run first (a new request's first token need not wait for a decoding
//!    step), a few at a time as left-padded batches of at most
//!    [`Admission::max_prefill_tokens`] tokens; without prefill priority (3a), a prompt that
//!    continues a kept prefix (below) with one token left instead rides along in step 3 as one
//!    more row; a cancelled request
//!    waiting to join is dropped unrun; an empty batch's prompt pass that more requests join
//!    the queue during, early in it, stops between two layers and runs again with them (a
//!    burst of requests gets its first tokens from one pass); an empty batch's first prompt
//!    waits a little ([`Admission::arrival_wait`]) for requests a server has announced
//!    ([`Batcher::announce`]: it is reading, checking and tokenizing them) to reach the
//!    queue, so that they share its pass;
//!
//!    2c. a prompt longer than `max_prefill_tokens` runs one chunk of that many tokens per
//!    step (the oldest such prompt's), its keys and values kept between steps, so the running
//!    rows get a token per chunk instead of waiting for the whole prompt;
//! 3. one forward pass over the running rows, one new token each (positions and the attention
//!    bias from each row's own mask, as for any left-padded batch);
//!
//!    3a. with [`Admission::prefill_priority`], requests that join the queue while it runs
//!    have their prompts run between two of its layers (the pass's thread runs them, nested,
//!    through [`with_layer_hook`]; each gets its first logits at once), and join with step
//!    2's;
//! 4. the new prompts' KV caches join the running one (right-aligned, left-padded).
//!
//! A sequence that leaves keeps its keys and values for a while (the newest, up to 8192 tokens
//! and 256 MiB in all): a later prompt that starts with the same tokens (a shared system prompt, the next
//! turn of the same chat, the same request again) copies them and runs only the rest, as
//! llama.cpp's server and vLLM's prefix caching do.
//!
//! Every thread gets its row of logits as soon as the pass that made it is over (each new
//! prompt's after its group in step 2, the running rows' after step 3), and goes on.
//!
//! A sequence's logits in the batch equal its logits alone up to the f32 summation order of
//! products over more rows (the padding is masked to exact zeros).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::decoder::{check_position, forward_masked, left_pad, DecoderSession};
use super::search::{Cancel, StepModel};
use crate::error::{Error, Result};
use crate::kernels::cpu::threads::at_idle_priority;
use crate::models::causal_lm::{with_layer_hook, CausalLm, KvCache};

/// The shared batch of one model: its sequences, their KV caches joined, the waiting queue.
pub struct Batcher {
    state: Mutex<State>,
    /// A request has joined the queue since a running step last looked.
    arrived: AtomicBool,
    /// The work of the prompt passes stopped to run again with new arrivals since one last
    /// ran whole (see `run_prompts`).
    wasted: AtomicUsize,
    /// Requests announced ([`Batcher::announce`]) that have not reached the queue yet.
    coming: Arc<AtomicUsize>,
    /// Requests announced so far.
    announcements: AtomicU64,
    wake: Arc<Condvar>,
    max_total_tokens: usize,
    admission: Admission,
}

/// When waiting requests join a running batch, by TGI's rule (its router's scheduler): a
/// request that arrives while others decode needs a prompt pass, which holds up every running
/// sequence's next token. So the waiting requests that fit the budget join only when there
/// are at least `floor(running * waiting_served_ratio)` of them, or when none has joined for
/// `max_waiting_tokens` decoding steps. An empty batch takes them at once.
///
/// TGI's defaults are 20 steps and a ratio of 1.2 (on a GPU a prompt pass is cheap next to
/// a steady batch). Ours: 20 and 0, so a new request joins at the next step (its first token
/// within one step under load; a CPU prompt pass over a kept prefix is about one decoding
/// step). `--waiting-served-ratio 1.2` gives TGI's behaviour.
///
/// `max_prefill_tokens` (TGI's `--max-batch-prefill-tokens`) bounds the padded prompt tokens
/// one prompt pass runs: new prompts are run together in groups within it, and a longer prompt
/// runs in chunks of that many tokens, one chunk per decoding step (vLLM's and TGI's chunked
/// prefill), so the running sequences keep getting tokens while it runs, and a request whose
/// client has gone stops within one chunk.
///
/// `prefill_priority` (with a `waiting_served_ratio` of 0): a new request's prompt runs as
/// soon as it is in the queue, also while a decoding step runs: between two of the step's
/// layers (CPU Llama-family models; other models at the step's start), its first logits
/// out before the step goes on (vLLM's scheduler also runs prompts before decoding steps, but
/// only between steps). So a new request's first token waits for one prompt pass, not for
/// the rest of the running step and then a step with it in. A repeated prompt with one
/// token left then runs its own pass too, instead of riding along in the next decoding step
/// (cheaper, but its first token comes only with that step). Off: both wait for the step's
/// end, and repeated prompts ride along.
///
/// `prefix_cache_tokens`: the most tokens the kept prefixes (finished sequences' keys and
/// values, for later prompts that start the same way) hold together, and at most 256 MB; 0
/// keeps none. Default 8192 (~190 MB for SmolLM2's f16 cache, ~100 MB for Qwen2.5-0.5B's).
///
/// `arrival_wait`: how long the first waiting prompt of an empty batch may wait for the
/// requests a server has announced ([`Batcher::announce`]: it has begun to read, check and
/// tokenize them) to reach the queue, so that a burst of requests shares one prompt pass
/// instead of the first one's pass running alone while it slows the others' way in (on 2
/// cores it held a burst of 16 up by 1-2 ms at its slowest; BENCHMARKS.md, session 43). It
/// waits only while announced requests are still on their way, and for none when nothing was
/// announced (a lone request, the CLI, a library caller). Default 5 ms; zero never waits.
///
/// `idle_priority`: the batch's steps (its prompt passes and decoding steps) run at the idle
/// scheduling priority ([`at_idle_priority`]), so the requests' threads that pick and stream
/// tokens, and a server's network threads, take a core from them whenever they need one. Off
/// by default: other processes' work (in the same cgroup) then also comes first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub max_waiting_tokens: usize,
    pub waiting_served_ratio: f32,
    pub max_prefill_tokens: usize,
    pub prefix_cache_tokens: usize,
    pub prefill_priority: bool,
    pub idle_priority: bool,
    pub arrival_wait: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_waiting_tokens: 20,
            waiting_served_ratio: 0.0,
            max_prefill_tokens: 256,
            prefix_cache_tokens: PREFIX_TOKENS,
            prefill_priority: true,
            idle_priority: false,
            arrival_wait: ARRIVAL_WAIT,
        }
    }
}

impl Admission {
    /// Whether `idle_priority` can take effect here: a thread may go to the idle scheduling
    /// priority and come back ([`crate::kernels::cpu::threads::idle_priority_available`]).
    pub fn idle_priority_available() -> bool {
        crate::kernels::cpu::threads::idle_priority_available()
    }

    /// The fewest waiting requests that may join a batch of `running` sequences when none
    /// has joined for `idle_steps` steps (0: any number).
    pub fn min_joining(&self, running: usize, idle_steps: usize) -> usize {
        if running == 0 || idle_steps >= self.max_waiting_tokens {
            return 0;
        }
        (running as f32 * self.waiting_served_ratio.max(0.0)).floor() as usize
    }
}

/// What the batch has done so far (for tests, logs and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batched decoding steps run.
    pub steps: u64,
    /// Sum over those steps of the rows in them.
    pub rows: u64,
    /// The most rows one step has had.
    pub max_rows: usize,
    /// Prompts run (sequences admitted), and the forward passes that ran them (a pass runs a
    /// group of prompts together).
    pub prefills: u64,
    pub prefill_passes: u64,
    /// Sequences in the batch now, and waiting to join it.
    pub running: usize,
    pub waiting: usize,
    /// Prompts that started from a finished sequence's keys and values, and the prompt tokens
    /// that did not run again thanks to it.
    pub prefix_hits: u64,
    pub prefix_tokens: u64,
    /// Continued prompts with one token left whose token ran in a decoding step with the
    /// running rows (no pass of their own).
    pub riders: u64,
    /// Chunks run of prompts longer than [`Admission::max_prefill_tokens`] (one per step).
    pub prefill_chunks: u64,
    /// Requests cancelled (their [`Cancel`]) before their prompt had run whole: waiting, or
    /// between the chunks of a long prompt.
    pub cancelled_prompts: u64,
    /// Prompts run between the layers of a decoding step (they arrived while it ran).
    pub mid_step_joins: u64,
    /// Prompt passes of an empty batch stopped early to run again with requests that
    /// arrived meanwhile.
    pub restarted_passes: u64,
    /// Times an empty batch's first prompt waited for announced requests to arrive
    /// ([`Admission::arrival_wait`]).
    pub arrival_waits: u64,
    /// Requests announced ([`Batcher::announce`]) that have not arrived yet.
    pub announced: usize,
    /// Requests announced so far, arrived or not.
    pub announcements: u64,
}

#[derive(Default)]
struct State {
    cache: Option<KvCache>,
    /// Per row: 0/1 over its cached positions (left padding is 0).
    mask: Vec<Vec<u8>>,
    /// Per row: its sequence.
    rows: Vec<u64>,
    seqs: HashMap<u64, Seq>,
    waiting: VecDeque<u64>,
    /// A thread is running a step (the cache is out of the state meanwhile).
    busy: bool,
    /// Rows out of the state for the step that is running.
    in_flight: usize,
    /// Decoding steps since waiting requests last joined.
    idle_steps: usize,
    next_id: u64,
    stats: BatchStats,
    prefixes: Vec<Prefix>,
    /// Admitted prompts longer than one prompt pass, run a chunk per step, oldest first.
    partials: VecDeque<Partial>,
    /// A partial prompt is out of `partials` for its chunk.
    chunking: bool,
    /// Until when an empty batch's first prompt waits for announced requests.
    arrival_wait_until: Option<Instant>,
}

struct Seq {
    /// The prompt, until it has run.
    prompt: Option<Vec<u32>>,
    /// The token handed in for the next step.
    token: Option<u32>,
    /// Logits of the last step, until its thread takes them.
    result: Option<Result<Vec<f32>>>,
    /// Its request is over: drop the row at the next step.
    gone: bool,
    /// Prompt plus the most tokens it may generate (its share of the budget).
    reserve: usize,
    /// The tokens whose keys and values its row holds (prompt, then each stepped token).
    fed: Vec<u32>,
    /// Its request's cancellation.
    cancel: Option<Cancel>,
}

impl Seq {
    /// Its request is over or cancelled.
    fn dead(&self) -> bool {
        self.gone || self.cancel.as_ref().is_some_and(Cancel::is_cancelled)
    }

    /// Its request was cancelled before its prompt had run whole: its thread gets the error.
    fn end_cancelled(&mut self, stats: &mut BatchStats) {
        self.gone = true;
        self.result = Some(Err(cancelled()));
        stats.cancelled_prompts += 1;
    }
}

/// Admitted prompts that run whole: `(id, prompt)`.
type Fresh = Vec<(u64, Vec<u32>)>;

/// Admitted prompts that continue a kept prefix: `(id, prompt, its cache, tokens of it)`.
type Continued = Vec<(u64, Vec<u32>, Arc<KvCache>, usize)>;

impl State {
    /// Where admitted prompts start: prompts that start like a finished sequence continue
    /// from its cache's first n positions; prompts whose rest is longer than one pass
    /// (`chunk` tokens) go to `partials`, to run in chunks (2c).
    fn starts(&mut self, admitted: Vec<(u64, Vec<u32>)>, chunk: usize) -> (Fresh, Continued) {
        let mut continued: Continued = Vec::new();
        let mut fresh: Fresh = Vec::new();
        for (id, prompt) in admitted {
            let start = best_prefix(&self.prefixes, &prompt).map(|(i, n)| {
                let p = self.prefixes.remove(i);
                let c = Arc::clone(&p.cache);
                self.prefixes.insert(0, p);
                self.stats.prefix_hits += 1;
                self.stats.prefix_tokens += n as u64;
                let n = n.min(c.seq_len());
                (c, n)
            });
            let past = start.as_ref().map_or(0, |s| s.1);
            if prompt.len() - past > chunk {
                let room = self.seqs.get(&id).map_or(0, |s| s.reserve).min(MAX_ROOM);
                self.partials.push_back(Partial {
                    id,
                    prompt,
                    start,
                    cache: None,
                    done: past,
                    room,
                });
                continue;
            }
            match start {
                Some((c, n)) => continued.push((id, prompt, c, n)),
                None => fresh.push((id, prompt)),
            }
        }
        (fresh, continued)
    }

    /// The queue's first request that may run; those over or cancelled leave it on the way.
    fn front_waiting(&mut self) -> Option<u64> {
        while let Some(&id) = self.waiting.front() {
            if !self.leaves_unrun(id) {
                return Some(id);
            }
            self.waiting.pop_front();
        }
        None
    }

    /// The queue's first request joins `admitted` with its prompt (which its row will hold).
    fn admit_front(&mut self, admitted: &mut Vec<(u64, Vec<u32>)>) {
        let Some(id) = self.waiting.pop_front() else {
            return;
        };
        if let Some(s) = self.seqs.get_mut(&id) {
            let prompt = s.prompt.take().unwrap_or_default();
            s.fed = prompt.clone();
            admitted.push((id, prompt));
        }
    }

    /// Whether waiting request `id` leaves the queue unrun: it is over (removed), or
    /// cancelled (its thread gets the error).
    fn leaves_unrun(&mut self, id: u64) -> bool {
        let Some(s) = self.seqs.get_mut(&id) else {
            return true;
        };
        if s.prompt.is_some() && !s.dead() {
            return false;
        }
        if s.prompt.is_some() && !s.gone {
            s.end_cancelled(&mut self.stats);
        } else {
            self.seqs.remove(&id);
        }
        true
    }
}

/// An admitted prompt longer than one prompt pass ([`Admission::max_prefill_tokens`]), run a
/// chunk per step until it has run whole and its row joins the batch.
struct Partial {
    id: u64,
    prompt: Vec<u32>,
    /// Before its first chunk: the kept prefix it continues, and how many tokens of it.
    start: Option<(Arc<KvCache>, usize)>,
    /// After its first chunk: its keys and values and their 0/1 mask.
    cache: Option<(KvCache, Vec<u8>)>,
    /// The prompt's tokens whose keys and values are in `cache` (or the prefix's).
    done: usize,
    /// Positions to reserve when its cache is first laid out (see `room` in `step`).
    room: usize,
}

/// Run `p`'s next chunk of at most `chunk` tokens: the last position's logits once the prompt
/// has run whole.
fn run_chunk(model: &dyn CausalLm, p: &mut Partial, chunk: usize) -> Result<Option<Vec<f32>>> {
    let end = (p.done + chunk.max(1)).min(p.prompt.len());
    let logits = match (p.cache.take(), p.start.take()) {
        (Some((mut cache, mut mask)), _) => {
            mask.extend(std::iter::repeat_n(1u8, end - p.done));
            let ids = p.prompt[p.done..end].to_vec();
            let masks = [mask];
            let l = forward_masked(model, &mut cache, &masks, ids, end - p.done, true)?;
            let [mask] = masks;
            p.cache = Some((cache, mask));
            l.squeeze(1)?.to_vec2()?
        }
        (None, Some((c, n))) => {
            let start = vec![(c, n, p.prompt[..end].to_vec())];
            let (l, cache, mut mask) = continue_group(model, &start, p.room)?;
            p.cache = Some((cache, mask.pop().unwrap_or_default()));
            l
        }
        (None, None) => {
            let rows = vec![p.prompt[..end].to_vec()];
            let mut session = DecoderSession::new(model, rows, vec![vec![1u8; end]])?;
            let l = session.step(None)?;
            let (cache, mut mask) = session.into_parts();
            p.cache = Some((cache, mask.pop().unwrap_or_default()));
            l
        }
    };
    p.done = end;
    Ok((end == p.prompt.len()).then(|| logits.into_iter().next().unwrap_or_default()))
}

/// Keep the prompt tokens a stopped long prompt has run, with their keys and values, as a
/// prefix for later prompts.
fn retire_partial(prefixes: &mut Vec<Prefix>, p: Partial, limit: usize) {
    if let Some((mut cache, mask)) = p.cache {
        let fed = p.prompt[..p.done].to_vec();
        retire(prefixes, &mut cache, 0, &mask, fed, limit);
    }
}

/// The error a cancelled request's thread gets.
fn cancelled() -> Error {
    Error::param("inputs", "the request was cancelled")
}

/// A finished sequence's tokens and its keys and values (one row), for later prompts that
/// start with the same tokens (a shared system prompt, the next turn of a chat).
struct Prefix {
    tokens: Vec<u32>,
    /// Shared, so that a prompt taking it needs no copy while the batch's lock is held: the
    /// prompt's group copies the positions it uses once, into the group's joined cache.
    cache: Arc<KvCache>,
    /// A scored prompt's scores ([`Batcher::keep_prefix`]), for later prompts to score that
    /// start the same way (lm-evaluation-harness' choices after one context).
    scored: Option<Arc<Scored>>,
}

/// A scored prompt's token scores, kept with its keys and values: `ids` the whole prompt,
/// `scores[i]` token i's ([`super::TextGenerator::prompt_logprobs`]), each with `top`
/// alternatives.
pub struct Scored {
    pub ids: Vec<u32>,
    pub top: usize,
    pub scores: Vec<Option<super::TokenScore>>,
}

/// Shortest shared start worth reusing, and the most tokens (by default: see
/// [`Admission::prefix_cache_tokens`]) and bytes the kept prefixes hold together (whichever
/// limit comes first: 8192 tokens of a 0.5B Qwen are ~200 MB in f32).
const MIN_PREFIX: usize = 8;
const PREFIX_TOKENS: usize = 8192;
const PREFIX_BYTES: usize = 256 << 20;

/// Keep row `r` (its mask `m`, tokens `fed`) as a prefix: newest first, dropping kept ones it
/// extends and the oldest beyond `limit` tokens or [`PREFIX_BYTES`] (a limit of 0 keeps
/// none). The row is leaving: its keys and values are moved out of `cache`, not copied.
fn retire(
    prefixes: &mut Vec<Prefix>,
    cache: &mut KvCache,
    r: usize,
    m: &[u8],
    fed: Vec<u32>,
    limit: usize,
) {
    if limit == 0 {
        prefixes.clear();
        return;
    }
    // Its real positions: left padding, and the gap a group of continued prompts leaves
    // between a prefix and its rest, are skipped.
    let positions: Vec<usize> = (0..m.len()).filter(|&p| m[p] != 0).collect();
    if fed.len() < MIN_PREFIX || positions.len() != fed.len() {
        return;
    }
    // Already kept (the same tokens, or more of them: a wave of equal greedy requests ends
    // together): no copy. Copying every row's keys and values held up the batch for ~19 ms
    // when 16 SmolLM2 chats of ~100 tokens ended in one step.
    if let Some(i) = prefixes.iter().position(|p| p.tokens.starts_with(&fed)) {
        let p = prefixes.remove(i);
        prefixes.insert(0, p);
        return;
    }
    let Ok(c) = cache.take_row(r, &positions) else {
        return;
    };
    // A scored prompt stays (its scores serve later prompts to score; a generation from it
    // extends it).
    prefixes.retain(|p| p.scored.is_some() || !fed.starts_with(&p.tokens));
    prefixes.insert(
        0,
        Prefix {
            tokens: fed,
            cache: Arc::new(c),
            scored: None,
        },
    );
    evict(prefixes, limit);
}

/// Drop the oldest kept prefixes beyond `limit` tokens or [`PREFIX_BYTES`].
fn evict(prefixes: &mut Vec<Prefix>, limit: usize) {
    let (mut tokens, mut bytes) = (0, 0);
    prefixes.retain(|p| {
        tokens += p.tokens.len();
        bytes += p.cache.bytes();
        tokens <= limit && bytes <= PREFIX_BYTES
    });
}

/// The kept prefix sharing the longest start with `prompt` (at least [`MIN_PREFIX`] tokens,
/// and one token short of the whole prompt, which must run to give logits): its index and the
/// shared length.
fn best_prefix(prefixes: &[Prefix], prompt: &[u32]) -> Option<(usize, usize)> {
    prefixes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            (i, n.min(prompt.len().saturating_sub(1)))
        })
        .filter(|&(_, n)| n >= MIN_PREFIX)
        .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
}

/// `FERROFORMERS_BATCH_TRACE=1`: one line on stderr per phase of every step (milliseconds
/// since the first trace, the phase, its rows and how long it took), to see where a request's
/// first token waits.
fn trace(phase: &str, rows: usize, since: std::time::Instant) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var("FERROFORMERS_BATCH_TRACE").is_ok_and(|v| v == "1")) {
        let t0 = *T0.get_or_init(|| since);
        eprintln!(
            "batch {:10.3} {phase:>8} rows {rows:3} took {:8.3} ms",
            since.duration_since(t0).as_secs_f64() * 1e3,
            since.elapsed().as_secs_f64() * 1e3
        );
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error for every sequence of a step that failed (errors are not `Clone`).
fn shared_error(e: &Error) -> Error {
    Error::Tensor(candle_core::Error::Msg(format!(
        "batched generation step: {e}"
    )))
}

/// A prompt pass's outcome for its sequences: each gets its logits and the group's cache
/// waits in `joining` (true), or each gets the error and is marked gone (false).
fn settle(g: &mut State, ids: &[u64], r: Result<Prefilled>, joining: &mut Vec<Joining>) -> bool {
    match r {
        Ok((logits, c, m)) => {
            for (id, l) in ids.iter().zip(logits) {
                if let Some(s) = g.seqs.get_mut(id) {
                    s.result = Some(Ok(l));
                }
            }
            joining.push((ids.to_vec(), c, m));
            true
        }
        Err(e) => {
            for id in ids {
                if let Some(s) = g.seqs.get_mut(id) {
                    s.result = Some(Err(shared_error(&e)));
                    s.gone = true;
                }
            }
            false
        }
    }
}

impl Batcher {
    /// A batch whose sequences may reach `max_total_tokens` tokens together (each counting its
    /// prompt and its `max_new_tokens`); a sequence that needs more than that alone still runs,
    /// by itself.
    pub fn new(max_total_tokens: usize) -> Self {
        Self::with_admission(max_total_tokens, Admission::default())
    }

    /// [`Batcher::new`] with its rule for letting waiting requests join.
    pub fn with_admission(max_total_tokens: usize, admission: Admission) -> Self {
        Self {
            state: Mutex::new(State::default()),
            arrived: AtomicBool::new(false),
            wasted: AtomicUsize::new(0),
            coming: Arc::new(AtomicUsize::new(0)),
            announcements: AtomicU64::new(0),
            wake: Arc::new(Condvar::new()),
            max_total_tokens: max_total_tokens.max(1),
            admission,
        }
    }

    /// Keep the keys and values of `tokens` (one row, every position real), computed outside
    /// the batch, as a prefix for later prompts that start with them: a scored prompt
    /// ([`super::TextGenerator::prompt_logprobs`]) that is then generated from (OpenAI's
    /// `echo` with `max_tokens`) runs only its last token.
    ///
    /// With `scored`, its scores are kept too ([`Batcher::scored_start`]); it then replaces
    /// the kept prefixes it extends or that extend it.
    pub fn keep_prefix(&self, tokens: Vec<u32>, mut cache: KvCache, scored: Option<Scored>) {
        let limit = self.admission.prefix_cache_tokens;
        let mut g = lock(&self.state);
        match scored {
            None => {
                let mask = vec![1u8; tokens.len()];
                retire(&mut g.prefixes, &mut cache, 0, &mask, tokens, limit);
            }
            Some(_) if limit == 0 || tokens.len() < MIN_PREFIX => {}
            Some(sc) => {
                g.prefixes
                    .retain(|p| !(p.tokens.starts_with(&tokens) || tokens.starts_with(&p.tokens)));
                g.prefixes.insert(
                    0,
                    Prefix {
                        tokens,
                        cache: Arc::new(cache),
                        scored: Some(Arc::new(sc)),
                    },
                );
                evict(&mut g.prefixes, limit);
            }
        }
    }

    /// Where a prompt to score (`ids`, `top` alternatives per token) can start from a kept
    /// scored prompt that begins the same way: the first `n` positions' keys and values
    /// (copied) and the scores of tokens `0..=n` (position n - 1's logits scored token n);
    /// the rest must run from position `n`. `None` when no kept prompt shares at least
    /// [`MIN_PREFIX`] tokens, or none has as many alternatives.
    pub fn scored_start(
        &self,
        ids: &[u32],
        top: usize,
    ) -> Option<(usize, KvCache, Vec<Option<super::TokenScore>>)> {
        let (cache, scored, n) = {
            let mut g = lock(&self.state);
            let (i, c) = g
                .prefixes
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let s = p.scored.as_ref().filter(|s| s.top >= top)?;
                    let c = s.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
                    Some((i, c))
                })
                .max_by_key(|&(_, c)| c)?;
            let p = &g.prefixes[i];
            // Position n's logits are needed (they score token n + 1): it runs again.
            let n = c.saturating_sub(1).min(p.tokens.len()).min(ids.len() - 1);
            if n < MIN_PREFIX {
                return None;
            }
            let (cache, scored) = (Arc::clone(&p.cache), p.scored.clone()?);
            g.stats.prefix_hits += 1;
            g.stats.prefix_tokens += n as u64;
            (cache, scored, n)
        };
        let positions: Vec<usize> = (0..n).collect();
        let kv = cache.extract_row(0, &positions).ok()?;
        let scores = scored.scores[..=n]
            .iter()
            .map(|s| {
                s.clone().map(|mut s| {
                    s.top.truncate(top);
                    s
                })
            })
            .collect();
        Some((n, kv, scores))
    }

    pub fn stats(&self) -> BatchStats {
        let g = lock(&self.state);
        BatchStats {
            running: g.rows.len() + g.in_flight + g.partials.len() + usize::from(g.chunking),
            waiting: g.waiting.len(),
            announced: self.coming.load(Ordering::SeqCst),
            announcements: self.announcements.load(Ordering::Relaxed),
            ..g.stats
        }
    }

    /// A request for this batch is on its way: its caller (a server) has begun to read,
    /// check and tokenize it. Until the request's prompt joins the queue (the first
    /// generation that [`arriving`] runs with the returned [`Arrival`] on its thread), or the
    /// `Arrival` is dropped, an empty batch's first prompt waits for it (at most
    /// [`Admission::arrival_wait`]).
    pub fn announce(&self) -> Arrival {
        self.coming.fetch_add(1, Ordering::SeqCst);
        self.announcements.fetch_add(1, Ordering::Relaxed);
        Arrival(Some((Arc::clone(&self.coming), Arc::clone(&self.wake))))
    }

    /// How much longer the waiting prompts of an empty batch wait for announced requests
    /// (`None`: run them now); the wait's end is set when it begins.
    fn arrival_wait(&self, g: &mut State) -> Option<Duration> {
        let wait = self.admission.arrival_wait;
        if wait.is_zero()
            || !g.rows.is_empty()
            || !g.partials.is_empty()
            || self.coming.load(Ordering::SeqCst) == 0
        {
            return None;
        }
        let now = Instant::now();
        // (A wait past what an Instant can hold is no wait, not a panic.)
        let end = now.checked_add(wait)?;
        let until = *g.arrival_wait_until.get_or_insert_with(|| {
            g.stats.arrival_waits += 1;
            end
        });
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// A session for one prompt that may grow to `reserve` tokens, to pass to
    /// [`generate`](super::generate) with one prompt row; `cancel` stops it while it waits to
    /// join and between its prompt's chunks (the search loop asks it after every token).
    pub fn session<'a>(
        &'a self,
        model: &'a dyn CausalLm,
        prompt: Vec<u32>,
        reserve: usize,
        cancel: Option<Cancel>,
    ) -> SharedSession<'a> {
        trace("arrive", 1, std::time::Instant::now());
        let mut g = lock(&self.state);
        let id = g.next_id;
        g.next_id += 1;
        let len = prompt.len();
        g.seqs.insert(
            id,
            Seq {
                prompt: Some(prompt),
                token: None,
                result: None,
                gone: false,
                reserve: reserve.max(len),
                fed: Vec::new(),
                cancel,
            },
        );
        SharedSession {
            batcher: self,
            model,
            id,
            len,
            started: false,
        }
    }

    /// New prompts' passes (step 2): a few at a time as one left-padded batch (up to
    /// `max_prefill_tokens` padded tokens), or from a kept prefix; each group's threads get
    /// their first logits at once, and the groups' caches wait in `joining`.
    ///
    /// `restart`: a pass that more requests join the queue during, early enough in it (while
    /// it has done less than a one-token pass's work), stops there, and its prompts go back
    /// to the queue's front to run again with the new ones (for the waiting requests of an
    /// empty batch, which no running row waits for: a burst of requests then gets its first
    /// tokens from one pass, not from the first arrival's and then the rest's). The passes
    /// stopped in a row waste at most two one-token passes' work.
    fn run_prompts(
        &self,
        model: &dyn CausalLm,
        fresh: Fresh,
        continued: Continued,
        room: usize,
        joining: &mut Vec<Joining>,
        restart: bool,
    ) {
        let chunk = self.admission.max_prefill_tokens.max(1);
        let groups = prefill_groups(fresh, chunk, |(_, p)| p.len());
        // Continued prompts group the same way, by their rests' padded tokens.
        let cgroups = prefill_groups(continued, chunk, |(_, p, _, n)| p.len() - n);
        let jobs: Vec<Job> = cgroups
            .into_iter()
            .map(|gr| {
                let ids: Vec<u64> = gr.iter().map(|x| x.0).collect();
                let starts = gr.into_iter().map(|(_, p, c, n)| (c, n, p)).collect();
                (ids, Vec::new(), Some(starts))
            })
            .chain(groups.into_iter().map(|gr| {
                let (ids, prompts) = gr.into_iter().unzip();
                (ids, prompts, None)
            }))
            .collect();
        let mut jobs = jobs.into_iter();
        while let Some((ids, prompts, starts)) = jobs.next() {
            let t = std::time::Instant::now();
            let continued = starts.is_some();
            // How far into the pass a stop still pays: the layers whose work is less than a
            // one-token pass's, counting a pass's work as 3 + its padded tokens (a pass
            // streams the weights once; each token adds about a third of that).
            let tokens = match &starts {
                Some(st) => st.iter().map(|s| s.2.len() - kept_tokens(s)).max(),
                None => prompts.iter().map(Vec::len).max(),
            };
            let tokens = tokens.unwrap_or(0) * ids.len();
            let stop_before =
                model.num_layers() * RESTART_WORK / (RESTART_WORK - 1 + tokens).max(1);
            let mut layers = 0;
            let mut stopped = false;
            // The work of the passes stopped since one last ran whole, in layers times
            // tokens-plus-3, stays within two one-token passes' (a steady trickle of
            // arrivals cannot hold the first one back for long).
            let work = RESTART_WORK - 1 + tokens;
            let budget = model.num_layers() * RESTART_WORK * 2;
            let mut stop = || {
                layers += 1;
                // (A stop before the first layer wastes nothing, but counts one.)
                let waste = (layers - 1) * work + 1;
                stopped = layers <= stop_before.max(1)
                    && self.arrived.load(Ordering::Acquire)
                    && self.wasted.load(Ordering::Relaxed) + waste <= budget;
                if stopped {
                    self.wasted.fetch_add(waste, Ordering::Relaxed);
                }
                stopped
            };
            let pass = || {
                guarded(|| match &starts {
                    Some(starts) => continue_group(model, starts, room),
                    None => {
                        let (padded, m) = left_pad(&prompts, 0);
                        let mut session = DecoderSession::new(model, padded, m)?;
                        let logits = session.step(None)?;
                        let (c, m) = session.into_parts();
                        Ok((logits, c, m))
                    }
                })
            };
            let r = if restart {
                with_layer_hook(&mut stop, pass)
            } else {
                pass()
            };
            trace(if continued { "prefix" } else { "prompt" }, ids.len(), t);
            let mut g = lock(&self.state);
            if restart && stopped && r.is_err() {
                // Back to the queue's front in their order, with the passes not run yet.
                g.stats.restarted_passes += 1;
                let state = &mut *g;
                let back = std::iter::once((ids, prompts, starts)).chain(jobs);
                let back: Vec<(u64, Vec<u32>, Option<usize>)> = back
                    .flat_map(|(ids, prompts, starts)| match starts {
                        Some(starts) => ids
                            .into_iter()
                            .zip(starts)
                            .map(|(id, s)| {
                                let n = kept_tokens(&s);
                                (id, s.2, Some(n))
                            })
                            .collect::<Vec<_>>(),
                        None => ids
                            .into_iter()
                            .zip(prompts)
                            .map(|(id, p)| (id, p, None))
                            .collect(),
                    })
                    .collect();
                for (id, prompt, kept) in back.into_iter().rev() {
                    let Some(s) = state.seqs.get_mut(&id) else {
                        continue;
                    };
                    s.prompt = Some(prompt);
                    if let Some(n) = kept {
                        state.stats.prefix_hits -= 1;
                        state.stats.prefix_tokens -= n as u64;
                    }
                    state.waiting.push_front(id);
                }
                return;
            }
            if restart {
                self.wasted.store(0, Ordering::Relaxed);
            }
            g.stats.prefills += ids.len() as u64;
            g.stats.prefill_passes += 1;
            if settle(&mut g, &ids, r, joining) {
                g.in_flight += ids.len();
            }
            drop(g);
            self.wake.notify_all();
        }
    }

    /// Prefill priority is in effect (see [`Admission`]): new prompts run between a decoding
    /// step's layers, and none rides along in a step.
    fn prefill_first(&self) -> bool {
        self.admission.prefill_priority && self.admission.waiting_served_ratio <= 0.0
    }

    /// Requests that arrived while a decoding step runs, called between its layers: those
    /// at the queue's front that fit the budget (`used`) and run in one pass each (no
    /// chunks) run their prompts now, so their first tokens need not wait for the step's end;
    /// their caches join with the step's new rows. `room` grows to theirs.
    fn join_mid_step(
        &self,
        model: &dyn CausalLm,
        used: &mut usize,
        room: &mut usize,
        joining: &mut Vec<Joining>,
    ) {
        if !self.arrived.load(Ordering::Acquire) {
            return;
        }
        let chunk = self.admission.max_prefill_tokens.max(1);
        let mut g = lock(&self.state);
        self.arrived.store(false, Ordering::Release);
        let mut admitted: Vec<(u64, Vec<u32>)> = Vec::new();
        while let Some(s) = g.front_waiting().and_then(|id| g.seqs.get(&id)) {
            let prompt = s.prompt.as_deref().unwrap_or_default();
            let past = best_prefix(&g.prefixes, prompt)
                .map_or(0, |(i, n)| n.min(g.prefixes[i].cache.seq_len()));
            if *used + s.reserve > self.max_total_tokens || prompt.len() - past > chunk {
                break;
            }
            *used += s.reserve;
            *room = (*room).max(s.reserve.min(MAX_ROOM));
            g.admit_front(&mut admitted);
        }
        if admitted.is_empty() {
            return;
        }
        g.idle_steps = 0;
        g.stats.mid_step_joins += admitted.len() as u64;
        let (fresh, continued) = g.starts(admitted, chunk);
        drop(g);
        self.run_prompts(model, fresh, continued, *room, joining, false);
    }

    /// Every row's sequence has handed in its token (or is gone), and there is something to
    /// do: a row to step, a request waiting or a long prompt's next chunk.
    fn ready(g: &State) -> bool {
        let all_in = g
            .rows
            .iter()
            .all(|id| g.seqs.get(id).is_none_or(|s| s.dead() || s.token.is_some()));
        let waiting = g
            .waiting
            .iter()
            .any(|id| g.seqs.get(id).is_some_and(|s| s.prompt.is_some()));
        all_in && (waiting || !g.rows.is_empty() || !g.partials.is_empty())
    }

    /// Wait for sequence `id`'s next logits, running the batch's step when this thread is the
    /// last one it was waiting for.
    fn wait(&self, model: &dyn CausalLm, id: u64) -> Result<Vec<f32>> {
        let mut g = lock(&self.state);
        loop {
            match g.seqs.get_mut(&id) {
                Some(s) => {
                    if let Some(r) = s.result.take() {
                        return r;
                    }
                }
                None => return Err(Error::param("inputs", "the sequence left the batch")),
            }
            if !g.busy && Self::ready(&g) {
                if let Some(left) = self.arrival_wait(&mut g) {
                    // The last announced request to arrive runs the step itself (below);
                    // otherwise the wait ends here.
                    g = match self.wake.wait_timeout(g, left) {
                        Ok((g, _)) => g,
                        Err(e) => e.into_inner().0,
                    };
                    continue;
                }
                g.arrival_wait_until = None;
                g = if self.admission.idle_priority {
                    at_idle_priority(|| self.step(g, model))
                } else {
                    self.step(g, model)
                };
                self.wake.notify_all();
                continue;
            }
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// One step of the whole batch (see the module's description); the lock is let go while
    /// the model runs.
    fn step<'g>(
        &'g self,
        mut g: MutexGuard<'g, State>,
        model: &dyn CausalLm,
    ) -> MutexGuard<'g, State> {
        g.busy = true;
        let keep_tokens = self.admission.prefix_cache_tokens;
        let t_leave = std::time::Instant::now();
        // 1. Rows whose request is over leave, and the padding no row needs any more.
        let keep: Vec<usize> = (0..g.rows.len())
            .filter(|&r| g.seqs.get(&g.rows[r]).is_some_and(|s| !s.dead()))
            .collect();
        let mut cache = g.cache.take();
        let mut mask = std::mem::take(&mut g.mask);
        let mut rows = std::mem::take(&mut g.rows);
        for (r, id) in rows.iter().enumerate() {
            if !keep.contains(&r) {
                if let (Some(s), Some(c)) = (g.seqs.remove(id), cache.as_mut()) {
                    retire(&mut g.prefixes, c, r, &mask[r], s.fed, keep_tokens);
                }
            }
        }
        // The rows that stay keep their slots; the last rows move into the slots of those
        // that left (rows' keys and values are moved, not copied: copying the whole cache
        // again cost ~20 ms per leaving row on a 16-row SmolLM2 batch).
        let keep = {
            let n = keep.len();
            let mut movers = keep.iter().copied().filter(|&r| r >= n);
            let stays: Vec<bool> = (0..n).map(|i| keep.contains(&i)).collect();
            (0..n)
                .map(|i| {
                    if stays[i] {
                        i
                    } else {
                        movers.next().unwrap_or(i)
                    }
                })
                .collect::<Vec<usize>>()
        };
        let mut fail: Option<Error> = None;
        if keep.len() != rows.len() {
            rows = keep.iter().map(|&r| rows[r]).collect();
            mask = keep.iter().map(|&r| std::mem::take(&mut mask[r])).collect();
            if keep.is_empty() {
                cache = None;
            } else if let Some(c) = cache.as_mut() {
                let idx: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
                if let Err(e) = c.select_rows(&idx) {
                    fail = Some(e.into());
                }
            }
        }
        let lead = mask
            .iter()
            .map(|m| m.iter().take_while(|&&x| x == 0).count())
            .min()
            .unwrap_or(0);
        // Cutting the front moves every row's keys and values: only once the padding is a
        // good part of the cache. (A wave of equal chats ends with its first request one
        // token ahead of the rest; cutting that one position off 15 SmolLM2 rows held the
        // batch up for ~4.7 ms.)
        let len = mask.first().map_or(0, Vec::len);
        if lead > 0 && lead * DROP_FRONT_SHARE >= len && fail.is_none() {
            if let Some(c) = cache.as_mut() {
                match c.drop_front(lead) {
                    Ok(()) => mask.iter_mut().for_each(|m| {
                        m.drain(..lead);
                    }),
                    Err(e) => fail = Some(e.into()),
                }
            }
        }
        // Long prompts whose requests were cancelled between their chunks stop here; what
        // they ran is kept as a prefix (a client that gave up may well send it again).
        let partials = std::mem::take(&mut g.partials);
        for p in partials {
            let g = &mut *g;
            match g.seqs.get_mut(&p.id) {
                Some(s) if !s.dead() => g.partials.push_back(p),
                Some(s) => {
                    s.end_cancelled(&mut g.stats);
                    retire_partial(&mut g.prefixes, p, keep_tokens);
                }
                None => retire_partial(&mut g.prefixes, p, keep_tokens),
            }
        }
        // Waiting requests cancelled anywhere in the queue leave it now (not only once they
        // reach its front): their threads get the error and their places are free.
        let waiting = std::mem::take(&mut g.waiting);
        for id in waiting {
            if !g.leaves_unrun(id) {
                g.waiting.push_back(id);
            }
        }
        trace("leave", rows.len(), t_leave);
        let mut tokens: Vec<u32> = rows
            .iter()
            .map(|id| {
                g.seqs.get_mut(id).map_or(0, |s| {
                    let t = s.token.take().unwrap_or(0);
                    s.fed.push(t);
                    t
                })
            })
            .collect();
        // 2 (chosen now): the waiting requests the budget lets in, in arrival order; with an
        // empty batch the first always goes in. Fewer than the admission rule's minimum wait.
        let mut used: usize = rows
            .iter()
            .chain(g.partials.iter().map(|p| &p.id))
            .map(|id| g.seqs[id].reserve)
            .sum();
        let min_joining = self.admission.min_joining(rows.len(), g.idle_steps);
        let admit = min_joining == 0 || {
            let mut budget = used;
            let fits = g
                .waiting
                .iter()
                .filter_map(|id| g.seqs.get(id))
                .filter(|s| !s.dead() && s.prompt.is_some())
                .take_while(|s| {
                    budget += s.reserve;
                    budget <= self.max_total_tokens
                })
                .count();
            fits >= min_joining
        };
        let mut admitted: Vec<(u64, Vec<u32>)> = Vec::new();
        let no_partials = g.partials.is_empty();
        // (One cancelled since the queue was swept above leaves unrun too.)
        while let Some(s) = admit
            .then(|| g.front_waiting())
            .flatten()
            .and_then(|id| g.seqs.get(&id))
        {
            let alone = rows.is_empty() && admitted.is_empty() && no_partials;
            if !alone && used + s.reserve > self.max_total_tokens {
                break;
            }
            used += s.reserve;
            g.admit_front(&mut admitted);
        }
        if admit {
            // The queue has been looked at: what is left waits for room in the budget.
            self.arrived.store(false, Ordering::Release);
        }
        if admitted.is_empty() {
            if !rows.is_empty() {
                g.idle_steps += 1;
            }
        } else {
            g.idle_steps = 0;
        }
        // Room for the positions the new rows may still add (their prompts plus their most new
        // tokens; at most MAX_ROOM, beyond which rows grow by doubling), reserved when
        // their keys and values are copied into the batch: no later step re-lays them out.
        let mut room = admitted
            .iter()
            .filter_map(|(id, _)| g.seqs.get(id))
            .map(|s| s.reserve)
            .max()
            .unwrap_or(0)
            .min(MAX_ROOM);
        // Prompts that start like a finished sequence continue from its cache's first n
        // positions; prompts whose rest is longer than one pass run in chunks (2c).
        let chunk = self.admission.max_prefill_tokens.max(1);
        let (fresh, mut continued) = g.starts(admitted, chunk);
        // One long prompt's chunk runs in this step, the oldest's.
        let partial = g.partials.pop_front();
        g.chunking = partial.is_some();

        // Continued prompts with one token left, while rows run: that token rides along in
        // step 3 (the prefix's keys and values appended to the batch's cache as a new row)
        // instead of a pass of its own before it and a join after it.
        let mut riders: Continued = Vec::new();
        let in_place = cache.as_ref().is_some_and(KvCache::appends_in_place);
        if !self.prefill_first()
            && !rows.is_empty()
            && fail.is_none()
            && !continued.is_empty()
            && in_place
        {
            let len = cache.as_ref().map_or(0, KvCache::seq_len);
            let (ride, rest): (Vec<_>, Vec<_>) = continued.into_iter().partition(|(_, p, c, n)| {
                let n = (*n).min(c.seq_len());
                n >= 1 && n <= len && p.len() == n + 1
            });
            riders = ride;
            continued = rest;
            g.stats.prefills += riders.len() as u64;
        }

        g.in_flight = rows.len() + riders.len();
        drop(g);

        // 2. The admitted prompts, a few at a time as one left-padded batch (up to
        // `max_prefill_tokens` padded tokens), or from a kept prefix; each group's threads get their
        // first logits at once, and the groups' caches join the batch's after step 3.
        let mut joining: Vec<Joining> = Vec::new();
        let restart = rows.is_empty() && no_partials && self.prefill_first();
        // (Prompts put back in the queue keep their shares in `used`: with no rows running,
        // nothing below reads it.)
        self.run_prompts(model, fresh, continued, room, &mut joining, restart);

        // 2b. The riders join the running rows (only their prefixes are copied); one whose
        // prefix cannot be appended runs its own pass like the other continued prompts.
        if !riders.is_empty() {
            let t = std::time::Instant::now();
            let n_riders = riders.len();
            let mut alone = Vec::new();
            let appended = cache.as_mut().is_some_and(|c| {
                let len = c.seq_len();
                let parts: Vec<(&KvCache, usize)> =
                    riders.iter().map(|(_, _, pc, n)| (&**pc, *n)).collect();
                mask.iter().all(|m| m.len() == len) && c.append_rows(&parts, room)
            });
            if appended {
                lock(&self.state).stats.riders += riders.len() as u64;
                let len = mask.first().map_or(0, Vec::len);
                for (id, prompt, pc, n) in riders {
                    let n = n.min(pc.seq_len());
                    let mut m = vec![0u8; len - n];
                    m.extend(std::iter::repeat_n(1u8, n));
                    mask.push(m);
                    rows.push(id);
                    tokens.push(prompt[n]);
                }
            } else {
                alone = riders;
            }
            trace("ride", n_riders - alone.len(), t);
            for gr in prefill_groups(alone, chunk, |(_, p, _, n)| p.len() - n) {
                let ids: Vec<u64> = gr.iter().map(|x| x.0).collect();
                let starts: Vec<ContinuedStart> =
                    gr.into_iter().map(|(_, p, c, n)| (c, n, p)).collect();
                let r = guarded(|| continue_group(model, &starts, room));
                let mut g = lock(&self.state);
                g.stats.prefill_passes += 1;
                if !settle(&mut g, &ids, r, &mut joining) {
                    g.in_flight -= ids.len();
                }
                drop(g);
                self.wake.notify_all();
            }
        }

        // 2c. A long prompt's next chunk; once it has run whole, its thread gets its logits and
        // its row joins with the new prompts'.
        if let Some(mut p) = partial {
            let t = std::time::Instant::now();
            let r = guarded(|| run_chunk(model, &mut p, chunk));
            trace("chunk", 1, t);
            let mut g = lock(&self.state);
            g.stats.prefill_chunks += 1;
            g.chunking = false;
            match r {
                Ok(None) => g.partials.push_front(p),
                Ok(Some(logits)) => {
                    g.stats.prefills += 1;
                    g.stats.prefill_passes += 1;
                    let (c, m) = p.cache.take().unwrap_or_default();
                    if settle(
                        &mut g,
                        &[p.id],
                        Ok((vec![logits], c, vec![m])),
                        &mut joining,
                    ) {
                        g.in_flight += 1;
                    }
                }
                Err(e) => {
                    settle(&mut g, &[p.id], Err(e), &mut joining);
                }
            }
            drop(g);
            self.wake.notify_all();
        }

        // 3. One forward pass over the running rows (and the riders); each row's thread gets
        // its logits at once.
        if !rows.is_empty() {
            let stepped = match fail {
                Some(e) => Err(e),
                None => {
                    let c = cache.get_or_insert_with(|| KvCache::new(model.num_layers()));
                    let t = std::time::Instant::now();
                    let mut step = || guarded(|| decode_step(model, c, &mut mask, &tokens));
                    // 3a: new requests' prompts between the step's layers.
                    let r = if self.prefill_first() {
                        let mut hook = || {
                            self.join_mid_step(model, &mut used, &mut room, &mut joining);
                            false
                        };
                        with_layer_hook(&mut hook, step)
                    } else {
                        step()
                    };
                    trace("step", rows.len(), t);
                    r
                }
            };
            let mut g = lock(&self.state);
            g.stats.steps += 1;
            g.stats.rows += rows.len() as u64;
            g.stats.max_rows = g.stats.max_rows.max(rows.len());
            match stepped {
                Ok(logits) => {
                    for (id, l) in rows.iter().zip(logits) {
                        if let Some(s) = g.seqs.get_mut(id) {
                            s.result = Some(Ok(l));
                        }
                    }
                }
                Err(e) => {
                    // The cache's state is unknown after a failed step: every row fails.
                    for id in &rows {
                        if let Some(s) = g.seqs.get_mut(id) {
                            s.result = Some(Err(shared_error(&e)));
                            s.gone = true;
                        }
                    }
                    g.in_flight -= rows.len();
                    cache = None;
                    rows.clear();
                    mask.clear();
                }
            }
            drop(g);
            self.wake.notify_all();
        }

        // 4. The new rows join: their caches right-aligned with the batch's, masks
        // left-padded. Rows no longer than the batch go after its rows in place (only they
        // are copied); otherwise everything is copied once into a new cache.
        if !joining.is_empty() {
            let t = std::time::Instant::now();
            // Into an empty batch, one group's cache becomes the batch's as it is (no copy).
            if rows.is_empty() && joining.len() == 1 {
                cache = joining.first_mut().map(|(_, c, _)| std::mem::take(c));
            }
            let new: Vec<(&KvCache, usize)> = joining
                .iter()
                .filter(|(_, c, _)| !c.is_empty())
                .map(|(_, c, _)| (c, c.seq_len()))
                .collect();
            let appended =
                new.is_empty() || cache.as_mut().is_some_and(|c| c.append_rows(&new, room));
            let joined = if appended {
                Ok(cache.take().unwrap_or_default())
            } else {
                let mut parts: Vec<(&KvCache, usize)> = Vec::with_capacity(joining.len() + 1);
                if let Some(c) = cache.as_ref() {
                    parts.push((c, c.seq_len()));
                }
                parts.extend(new);
                KvCache::join(&parts, room)
            };
            trace("join", joining.len(), t);
            match joined {
                Ok(c) => {
                    cache = Some(c);
                    for (ids, _, m) in joining {
                        rows.extend(&ids);
                        mask.extend(m);
                    }
                }
                Err(e) => {
                    let e: Error = e.into();
                    let mut g = lock(&self.state);
                    for id in joining.iter().flat_map(|(ids, _, _)| ids) {
                        if let Some(s) = g.seqs.get_mut(id) {
                            // Their first logits are out; the failure comes with the next step.
                            s.gone = true;
                            s.result = Some(Err(shared_error(&e)));
                        }
                    }
                }
            }
        }
        let len = mask.iter().map(Vec::len).max().unwrap_or(0);
        for m in mask.iter_mut() {
            if m.len() < len {
                let mut padded = vec![0u8; len - m.len()];
                padded.append(m);
                *m = padded;
            }
        }

        let mut g = lock(&self.state);
        // Requests that ended while the step ran and have nothing left to collect.
        g.seqs
            .retain(|id, s| !(s.gone && s.result.is_none() && !rows.contains(id)));
        g.cache = cache;
        g.mask = mask;
        g.rows = rows;
        g.in_flight = 0;
        g.busy = false;
        g
    }
}

/// Padding no row needs is cut off the cache's front once it is at least `1 /
/// DROP_FRONT_SHARE` of its positions.
const DROP_FRONT_SHARE: usize = 4;

/// A restartable prompt pass (see [`Batcher::run_prompts`]) counts its work as `RESTART_WORK -
/// 1` plus its padded tokens, a one-token pass's as `RESTART_WORK`, and stops for new
/// arrivals only while it has done less than the latter.
const RESTART_WORK: usize = 4;

/// [`Admission::arrival_wait`]'s default.
const ARRIVAL_WAIT: Duration = Duration::from_millis(5);

/// A request on its way to a batch ([`Batcher::announce`]); it has arrived when the prompt
/// of a generation run by [`arriving`] with it joins a queue, or when it is dropped. The last
/// one to arrive wakes the batch's waiting threads (one that arrives without joining the
/// queue, a request that failed its checks, may miss a thread about to wait: that one waits
/// to the end of its [`Admission::arrival_wait`]).
#[derive(Debug)]
pub struct Arrival(Option<(Arc<AtomicUsize>, Arc<Condvar>)>);

impl Drop for Arrival {
    fn drop(&mut self) {
        if let Some((coming, wake)) = self.0.take() {
            if coming.fetch_sub(1, Ordering::SeqCst) == 1 {
                wake.notify_all();
            }
        }
    }
}

thread_local! {
    /// The announced request whose generation runs on this thread ([`arriving`]).
    static ARRIVING: std::cell::RefCell<Option<Arrival>> = const { std::cell::RefCell::new(None) };
}

/// The announced request whose generation runs on this thread ([`arriving`]) has arrived:
/// its prompt has joined a queue, or it runs outside the batch (beam search).
pub(super) fn arrived_here() {
    drop(ARRIVING.with(|a| a.borrow_mut().take()));
}

/// The announced request whose generation runs on this thread ([`arriving`]), taken off it: a
/// pipeline call that runs its prompts on other threads hands it on to one of them.
pub(crate) fn take_arriving() -> Option<Arrival> {
    ARRIVING.with(|a| a.borrow_mut().take())
}

/// Run `f` (a generation, or a pipeline call that runs one) with `arrival` arriving when the
/// first prompt `f` puts in a batch's queue gets there, or when `f` returns.
pub fn arriving<T>(arrival: Option<Arrival>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arrival>);
    impl Drop for Restore {
        fn drop(&mut self) {
            // What is still there did not arrive: it ends now.
            let before = self.0.take();
            drop(ARRIVING.with(|a| std::mem::replace(&mut *a.borrow_mut(), before)));
        }
    }
    let _restore = Restore(ARRIVING.with(|a| std::mem::replace(&mut *a.borrow_mut(), arrival)));
    f()
}

/// One prompt pass of [`Batcher::run_prompts`]: its sequences, and their prompts (fresh) or
/// kept prefixes and prompts (continued).
type Job = (Vec<u64>, Vec<Vec<u32>>, Option<Vec<ContinuedStart>>);

/// A prompt that continues a kept prefix: its cache, the tokens of it to take, the prompt.
type ContinuedStart = (Arc<KvCache>, usize, Vec<u32>);

/// The kept prefix's tokens a continued prompt takes (at most what its cache holds).
fn kept_tokens((c, n, _): &ContinuedStart) -> usize {
    (*n).min(c.seq_len())
}

/// Most positions reserved ahead for a row joining the batch (see `room` in `step`).
const MAX_ROOM: usize = 512;

/// `items` in arrival order, cut into groups whose padded size (most tokens to run, by `len`,
/// times the group's size) stays within `budget` (a longer one alone).
fn prefill_groups<T>(items: Vec<T>, budget: usize, len: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    for a in items {
        let fits = groups.last().is_some_and(|gr| {
            let longest = gr.iter().map(&len).max().unwrap_or(0);
            longest.max(len(&a)) * (gr.len() + 1) <= budget
        });
        match groups.last_mut() {
            Some(gr) if fits => gr.push(a),
            _ => groups.push(vec![a]),
        }
    }
    groups
}

/// Run `f`, turning a panic into an error so that the batch's other threads are not left
/// waiting forever.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = crate::error::panic_message(&*p).unwrap_or_else(|| "a panic".into());
        Err(Error::Tensor(candle_core::Error::Msg(format!(
            "the model failed: {what}"
        ))))
    })
}

/// One new token per row: masks grow by one, positions count each row's own tokens.
fn decode_step(
    model: &dyn CausalLm,
    cache: &mut KvCache,
    mask: &mut [Vec<u8>],
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>> {
    mask.iter_mut().for_each(|m| m.push(1));
    let logits = forward_masked(model, cache, mask, tokens.to_vec(), 1, true)?;
    Ok(logits.squeeze(1)?.to_vec2()?)
}

/// A prompt pass's last logits per row, its cache and its rows' masks.
type Prefilled = (Vec<Vec<f32>>, KvCache, Vec<Vec<u8>>);

/// A prompt pass's sequences, their cache and masks, waiting to join the running batch.
type Joining = (Vec<u64>, KvCache, Vec<Vec<u8>>);

/// Prompts that continue from kept prefixes, run as one pass: the first `n` positions of each
/// one-row `cache` hold its prompt's first tokens; they are joined right-aligned (left
/// padding), and the rests follow left-padded, so a row's mask reads `0.. 1.. (prefix) 0..
/// 1.. (rest)`; positions count only its real tokens, and the bias hides the gaps. Each
/// prompt's last logits, the joined cache and the masks.
fn continue_group(
    model: &dyn CausalLm,
    group: &[ContinuedStart],
    room: usize,
) -> Result<Prefilled> {
    if group.is_empty() {
        return Err(Error::param("inputs", "no prompt to continue"));
    }
    let parts: Vec<(&KvCache, usize)> = group.iter().map(|(c, n, _)| (&**c, *n)).collect();
    let mut cache = KvCache::join(&parts, room)?;
    let past: Vec<usize> = group.iter().map(kept_tokens).collect();
    let rests: Vec<Vec<u32>> = group
        .iter()
        .zip(&past)
        .map(|((_, _, prompt), &n)| prompt[n..].to_vec())
        .collect();
    let lc = past.iter().copied().max().unwrap_or(0);
    let (rows, masks) = left_pad(&rests, 0);
    let r = rows.first().map_or(0, Vec::len);
    let mask: Vec<Vec<u8>> = past
        .iter()
        .zip(masks)
        .map(|(&n, m)| {
            let mut full = vec![0u8; lc - n];
            full.extend(std::iter::repeat_n(1u8, n));
            full.extend(m);
            full
        })
        .collect();
    let logits = forward_masked(model, &mut cache, &mask, rows.concat(), r, true)?;
    Ok((logits.squeeze(1)?.to_vec2()?, cache, mask))
}

/// One request's view of the shared batch: a [`StepModel`] with one row.
pub struct SharedSession<'a> {
    batcher: &'a Batcher,
    model: &'a dyn CausalLm,
    id: u64,
    /// Tokens of the sequence so far (prompt and generated).
    len: usize,
    started: bool,
}

impl StepModel for SharedSession<'_> {
    fn step(&mut self, new_tokens: Option<&[u32]>) -> Result<Vec<Vec<f32>>> {
        {
            let mut g = lock(&self.batcher.state);
            match new_tokens {
                None => {
                    if self.started {
                        return Err(Error::param("inputs", "the prompt was already run"));
                    }
                    self.started = true;
                    g.waiting.push_back(self.id);
                    arrived_here();
                    self.batcher.arrived.store(true, Ordering::Release);
                }
                Some(t) => {
                    if !self.started || t.len() != 1 {
                        return Err(Error::param(
                            "inputs",
                            "a shared batch takes one new token per request, after its prompt",
                        ));
                    }
                    check_position(self.model, self.len)?;
                    if let Some(s) = g.seqs.get_mut(&self.id) {
                        s.token = Some(t[0]);
                    }
                    self.len += 1;
                }
            }
        }
        // No one to wake: if this token (or prompt) was the last the batch waited for, this
        // thread runs the step itself in `wait`; otherwise the last one to come will. (Waking
        // every waiting thread on every hand-in cost n^2 wake-ups per step.)
        Ok(vec![self.batcher.wait(self.model, self.id)?])
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows == [0] {
            return Ok(());
        }
        Err(Error::param(
            "num_return_sequences",
            "a shared batch runs one sequence per request",
        ))
    }
}

impl Drop for SharedSession<'_> {
    fn drop(&mut self) {
        let keep_tokens = self.batcher.admission.prefix_cache_tokens;
        let mut g = lock(&self.batcher.state);
        let in_batch = g.rows.contains(&self.id);
        if let Some(s) = g.seqs.get_mut(&self.id) {
            s.gone = true;
            s.result = None;
        }
        if !g.busy {
            if !in_batch {
                g.seqs.remove(&self.id);
                g.waiting.retain(|&id| id != self.id);
                if let Some(i) = g.partials.iter().position(|p| p.id == self.id) {
                    if let Some(p) = g.partials.remove(i) {
                        retire_partial(&mut g.prefixes, p, keep_tokens);
                    }
                }
            }
            // The last request out frees the batch's memory now, not at the next request.
            let all_gone = g
                .rows
                .iter()
                .all(|id| g.seqs.get(id).is_none_or(|s| s.gone));
            if all_gone && g.waiting.is_empty() && g.partials.is_empty() {
                let rows = std::mem::take(&mut g.rows);
                let mut cache = g.cache.take();
                let mask = std::mem::take(&mut g.mask);
                for (r, id) in rows.into_iter().enumerate() {
                    if let (Some(s), Some(c)) = (g.seqs.remove(&id), cache.as_mut()) {
                        retire(&mut g.prefixes, c, r, &mask[r], s.fed, keep_tokens);
                    }
                }
            }
        }
        drop(g);
        // The rows left may all be waiting for this one.
        self.batcher.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-row cache of `n` positions (one layer, one head of 8).
    fn cache_of(n: usize) -> KvCache {
        let mut c = KvCache::new(1);
        let b = &mut c.buffers(1, 1, 8, false).unwrap()[0];
        b.reserve(n);
        b.set_len(n);
        c
    }

    /// Kept prefixes: newest first, one that a newer sequence extends is dropped, padding and
    /// gaps are left out, too short or mismatched rows are not kept, and the oldest go once
    /// the token limit is passed; the longest shared start wins, one token short of the prompt.
    #[test]
    fn prefixes_are_kept_newest_first_within_limits() {
        let mut kept = Vec::new();
        let toks = |a: u32, n: usize| (a..a + n as u32).collect::<Vec<u32>>();
        retire(
            &mut kept,
            &mut cache_of(12),
            0,
            &[1; 12],
            toks(0, 12),
            PREFIX_TOKENS,
        );
        assert_eq!(kept.len(), 1);
        // It extends the first: the first goes. Padding and a gap are left out.
        let mut m = vec![0u8; 3];
        m.extend([1; 10]);
        m.extend([0; 2]);
        m.extend([1; 10]);
        retire(
            &mut kept,
            &mut cache_of(m.len()),
            0,
            &m,
            toks(0, 20),
            PREFIX_TOKENS,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].cache.seq_len(), 20);
        // The same tokens again, or fewer of them: nothing new to keep (no copy; a cache of
        // another length shows it was not taken).
        retire(
            &mut kept,
            &mut cache_of(20),
            0,
            &[1; 20],
            toks(0, 20),
            PREFIX_TOKENS,
        );
        retire(
            &mut kept,
            &mut cache_of(16),
            0,
            &[1; 16],
            toks(0, 16),
            PREFIX_TOKENS,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].cache.seq_len(), 20);
        // Too short, or a mask that does not match the tokens: not kept.
        retire(
            &mut kept,
            &mut cache_of(4),
            0,
            &[1; 4],
            toks(100, 4),
            PREFIX_TOKENS,
        );
        retire(
            &mut kept,
            &mut cache_of(12),
            0,
            &[1; 12],
            toks(100, 11),
            PREFIX_TOKENS,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(best_prefix(&kept, &toks(0, 30)), Some((0, 20)));
        assert_eq!(best_prefix(&kept, &toks(0, 15)), Some((0, 14)));
        assert_eq!(best_prefix(&kept, &toks(0, 5)), None);
        assert_eq!(best_prefix(&kept, &toks(1, 30)), None);
        // Past the token limit the oldest go.
        for i in 0..(PREFIX_TOKENS / 1000 + 2) as u32 {
            retire(
                &mut kept,
                &mut cache_of(1000),
                0,
                &[1; 1000],
                toks(10_000 * (i + 1), 1000),
                PREFIX_TOKENS,
            );
        }
        let total: usize = kept.iter().map(|p| p.tokens.len()).sum();
        assert!(total <= PREFIX_TOKENS, "{total}");
        assert_eq!(
            kept[0].tokens[0],
            10_000 * (PREFIX_TOKENS as u32 / 1000 + 2)
        );
        assert!(
            best_prefix(&kept, &toks(0, 30)).is_none(),
            "the oldest went first"
        );
    }
}
