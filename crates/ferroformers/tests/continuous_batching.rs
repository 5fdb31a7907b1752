//! Continuous batching (`generation::continuous`): requests generating at the same time on
//! their own threads share one batched step per token, join while others run and leave when
//! done, and each gets the tokens it would have got alone (greedy and seeded sampling, its own
//! parameters), on the decoder fixtures of both KV cache kinds (GPT-2's and BLOOM's tensors, the
//! Llama family's CPU buffers).

use std::time::{Duration, Instant};

mod common;

use common::decoder as load;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use ferroformers::generation::{
    arriving, Admission, Batcher, Cancel, GenerationConfig, Hooks, TextGenerator,
};
use ferroformers::models::causal_lm::{CausalLm, KvCache};

/// Request `i`'s parameters: its own length limit, sampling for the odd ones (own seed).
fn cfg(g: &TextGenerator, i: usize) -> GenerationConfig {
    let mut c = g.generation_config.clone();
    c.eos_token_id.clear();
    c.max_new_tokens = Some([6, 14, 9, 17, 4][i % 5]);
    c.do_sample = i % 2 == 1;
    c.seed = Some(100 + i as u64);
    c.temperature = 0.8;
    c.top_k = Some(20);
    c.repetition_penalty = if i == 2 { 1.3 } else { 1.0 };
    c
}

const PROMPTS: &[&str] = &[
    "Hello there",
    "The quick brown fox jumps over the lazy dog and then",
    "A",
    "Once upon a time, in a land far away, there lived",
    "Numbers: 1 2 3",
];

/// The [`PROMPTS`]' token ids, and each one's tokens generated alone with [`cfg`].
fn prompts_and_solo(g: &TextGenerator) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|t| g.encode(t, true).unwrap()).collect();
    let solo = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| solo_tokens(g, p, &cfg(g, i)))
        .collect();
    (prompts, solo)
}

#[test]
fn concurrent_requests_share_steps_and_get_their_solo_tokens() {
    for name in ["gpt2", "llama", "qwen2", "bloom"] {
        let mut g = load(name);
        let (prompts, solo) = prompts_and_solo(&g);
        g.batcher = Some(Batcher::new(100_000));
        let n = prompts.len();
        let g = &g;
        let batched: Vec<Vec<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    s.spawn(move || {
                        let mut first = true;
                        // After its first token, a request waits until every request has
                        // arrived, so the batch is known to hold them all at once.
                        let mut on_token = |_: usize, _: u32, _: f32| {
                            if std::mem::take(&mut first) {
                                let t = Instant::now();
                                while t.elapsed() < Duration::from_secs(20) {
                                    let st = g.batcher.as_ref().unwrap().stats();
                                    if st.running + st.waiting >= n {
                                        break;
                                    }
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                        };
                        let mut hooks = Hooks {
                            on_token: Some(&mut on_token),
                            ..Hooks::default()
                        };
                        g.generate_one(p, &cfg(g, i), &mut hooks).unwrap().sequences[0][0].clone()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            batched, solo,
            "{name}: batched tokens differ from solo ones"
        );
        let st = g.batcher.as_ref().unwrap().stats();
        assert_eq!(st.prefills, n as u64, "{name}: {st:?}");
        assert_eq!(st.max_rows, n, "{name}: all requests in one step: {st:?}");
        assert_eq!(
            (st.running, st.waiting),
            (0, 0),
            "{name}: batch left empty: {st:?}"
        );
        let longest = (0..n)
            .map(|i| cfg(g, i).max_new_tokens.unwrap())
            .max()
            .unwrap();
        assert!(
            st.steps
                < (0..n)
                    .map(|i| cfg(g, i).max_new_tokens.unwrap() as u64)
                    .sum::<u64>()
                && st.steps >= longest as u64 - 1,
            "{name}: steps were shared: {st:?}"
        );
    }
}

/// A request that stops early (its reader has gone) leaves the batch at the next step and the
/// others carry on to their own ends; a budget that fits one sequence at a time runs them one
/// after another, with the same tokens.
#[test]
fn cancelled_requests_leave_and_the_budget_queues_the_rest() {
    let mut g = load("llama");
    let (prompts, solo) = prompts_and_solo(&g);
    // Every sequence alone is over the budget: each runs by itself, the others queue.
    g.batcher = Some(Batcher::new(1));
    let g = &g;
    let out: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                s.spawn(move || {
                    let count = std::cell::Cell::new(0);
                    let mut on_token = |_: usize, _: u32, _: f32| count.set(count.get() + 1);
                    let stop = || i == 3 && count.get() >= 2;
                    let mut hooks = Hooks {
                        on_token: Some(&mut on_token),
                        stop: Some(&stop),
                        ..Hooks::default()
                    };
                    g.generate_one(p, &cfg(g, i), &mut hooks).unwrap().sequences[0][0].clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (got, want)) in out.iter().zip(&solo).enumerate() {
        if i == 3 {
            assert_eq!(got[..], want[..2], "the cancelled request's first tokens");
        } else {
            assert_eq!(got, want, "request {i}");
        }
    }
    let st = g.batcher.as_ref().unwrap().stats();
    assert_eq!(
        st.max_rows, 1,
        "the budget held one sequence at a time: {st:?}"
    );
    assert_eq!((st.running, st.waiting), (0, 0), "{st:?}");
}

/// A model, a first prompt, and greedy parameters without an end token.
fn prefix_setup(name: &str, new: usize) -> (TextGenerator, Vec<u32>, GenerationConfig) {
    let g = load(name);
    let first = g
        .encode(
            "The history of the lighthouse keepers on the northern coast",
            true,
        )
        .unwrap();
    let mut c = g.generation_config.clone();
    c.eos_token_id.clear();
    c.max_new_tokens = Some(new);
    (g, first, c)
}

/// One request's new tokens (through the batch when the generator has one).
/// Generate `p` through the batcher, holding the first token back (up to 20 s) until `n`
/// other requests wait, so that they join at the same step.
fn hold_first_token(g: &TextGenerator, p: &[u32], c: &GenerationConfig, n: usize) -> Vec<u32> {
    let mut first_token = true;
    let mut on_token = |_: usize, _: u32, _: f32| {
        if std::mem::take(&mut first_token) {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20)
                && g.batcher.as_ref().unwrap().stats().waiting < n
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let mut hooks = Hooks {
        on_token: Some(&mut on_token),
        ..Hooks::default()
    };
    g.generate_one(p, c, &mut hooks).unwrap().sequences[0][0].clone()
}

fn solo_tokens(g: &TextGenerator, p: &[u32], c: &GenerationConfig) -> Vec<u32> {
    g.generate_one(p, c, &mut Hooks::default())
        .unwrap()
        .sequences[0][0]
        .clone()
}

/// A finished sequence's keys and values serve later prompts that start the same way: the
/// next turn (its prompt and answer, then more), the same prompt again, a shared opening. The
/// tokens equal those generated from scratch.
#[test]
fn later_prompts_reuse_a_finished_sequences_prefix() {
    for name in ["gpt2", "llama", "qwen2", "bloom"] {
        let (mut g, first, c) = prefix_setup(name, 10);
        let solo = |g: &TextGenerator, p: &[u32]| solo_tokens(g, p, &c);
        let answer = solo(&g, &first);
        // The next turn: the first prompt, its answer, then a new question.
        let mut next = first.clone();
        next.extend_from_slice(&answer);
        next.extend(g.encode(" and what came after?", false).unwrap());
        let mut opening = first[..first.len() - 2].to_vec();
        opening.extend(g.encode(" of something else", false).unwrap());
        let prompts = [next.clone(), first.clone(), opening];
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| solo(&g, p)).collect();

        g.batcher = Some(Batcher::new(100_000));
        assert_eq!(solo(&g, &first), answer, "{name}: first request");
        let mut reused = 0;
        for (p, w) in prompts.iter().zip(&want) {
            assert_eq!(&solo(&g, p), w, "{name}: tokens after reusing a prefix");
            let st = g.batcher.as_ref().unwrap().stats();
            assert!(
                st.prefix_tokens > reused,
                "{name}: no prefix reused: {st:?}"
            );
            reused = st.prefix_tokens;
        }
        let st = g.batcher.as_ref().unwrap().stats();
        assert_eq!(st.prefix_hits, 3, "{name}: {st:?}");
        // The next turn reused the first prompt and all of its answer but the last token
        // (never fed back).
        let first_hit = (first.len() + answer.len() - 1) as u64;
        assert!(
            st.prefix_tokens >= first_hit + first.len() as u64 - 1,
            "{name}: {st:?}"
        );
    }
}

/// Prompts that arrive together and each continue from a kept prefix (different shares of
/// it, different rests) run as one pass, with a gap between each prefix and its rest in the
/// mask; each gets its solo tokens, and a finished one's prefix (gap left out) serves the next.
#[test]
fn continued_prompts_run_together_as_one_pass() {
    for name in ["gpt2", "llama", "bloom"] {
        let (mut g, first, c) = prefix_setup(name, 8);
        let solo = |g: &TextGenerator, p: &[u32]| solo_tokens(g, p, &c);
        let mut turn = first.clone();
        turn.extend(g.encode(" and the ships they saved", false).unwrap());
        let mut short = first[..first.len() - 3].to_vec();
        short.extend(g.encode(" south", false).unwrap());
        let prompts = [turn.clone(), first.clone(), short];
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| solo(&g, p)).collect();
        let other = g.encode("Completely different words here", true).unwrap();
        let want_other = solo(&g, &other);

        g.batcher = Some(Batcher::new(100_000));
        solo(&g, &first);
        let g = &g;
        let n = prompts.len();
        std::thread::scope(|s| {
            // A running request holds its next token back until the others all wait, so they
            // join at the same step.
            let holder = s.spawn(|| hold_first_token(g, &other, &c, n));
            while g.batcher.as_ref().unwrap().stats().running == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let hs: Vec<_> = prompts
                .iter()
                .map(|p| s.spawn(move || solo(g, p)))
                .collect();
            for (h, w) in hs.into_iter().zip(&want) {
                assert_eq!(&h.join().unwrap(), w, "{name}: a continued prompt's tokens");
            }
            assert_eq!(
                holder.join().unwrap(),
                want_other,
                "{name}: the holder's tokens"
            );
        });
        let st = g.batcher.as_ref().unwrap().stats();
        assert_eq!(st.prefix_hits, 3, "{name}: {st:?}");
        assert_eq!(
            (st.prefills, st.prefill_passes),
            (5, 3),
            "{name}: one pass for three: {st:?}"
        );
        // The finished continued sequences were kept (their gaps left out): the same prompt
        // again continues from one of them.
        assert_eq!(solo(g, &turn), want[0], "{name}");
        let after = g.batcher.as_ref().unwrap().stats();
        assert_eq!(after.prefix_hits, 4);
        // All of it but the last token: only the continued sequence's own entry holds that.
        assert_eq!(
            after.prefix_tokens - st.prefix_tokens,
            turn.len() as u64 - 1,
            "{name}: {after:?}"
        );
    }
}

/// TGI's admission rule: with `waiting_served_ratio` 2, a request that arrives while one
/// sequence decodes waits (it alone is fewer than 2 x 1) until `max_waiting_tokens` steps
/// have passed since anyone last joined; with the default rule it joins at the next step.
/// Both get their solo tokens.
#[test]
fn admission_rule_holds_a_lone_newcomer_for_max_waiting_tokens_steps() {
    let (mut g, first, mut c) = prefix_setup("llama", 24);
    let other = g.encode("Completely different words here", true).unwrap();
    let solo_first = solo_tokens(&g, &first, &c);
    c.max_new_tokens = Some(4);
    let solo_other = solo_tokens(&g, &other, &c);
    for (admission, held) in [
        (
            Admission {
                max_waiting_tokens: 6,
                waiting_served_ratio: 2.0,
                ..Admission::default()
            },
            true,
        ),
        (Admission::default(), false),
    ] {
        g.batcher = Some(Batcher::with_admission(100_000, admission));
        let g = &g;
        let (long_cfg, short_cfg) = (
            GenerationConfig {
                max_new_tokens: Some(24),
                ..c.clone()
            },
            c.clone(),
        );
        let steps = || g.batcher.as_ref().unwrap().stats().steps;
        let (long, (short, arrived, joined)) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                // Slow steps, so the newcomer arrives while this one decodes.
                let mut on_token =
                    |_: usize, _: u32, _: f32| std::thread::sleep(Duration::from_millis(5));
                let mut hooks = Hooks {
                    on_token: Some(&mut on_token),
                    ..Hooks::default()
                };
                g.generate_one(&first, &long_cfg, &mut hooks)
                    .unwrap()
                    .sequences[0][0]
                    .clone()
            });
            let b = s.spawn(|| {
                let t = Instant::now();
                while steps() < 2 && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let arrived = steps();
                let joined = std::cell::Cell::new(None);
                let mut on_token = |_: usize, _: u32, _: f32| {
                    if joined.get().is_none() {
                        joined.set(Some(steps()));
                    }
                };
                let mut hooks = Hooks {
                    on_token: Some(&mut on_token),
                    ..Hooks::default()
                };
                let out = g
                    .generate_one(&other, &short_cfg, &mut hooks)
                    .unwrap()
                    .sequences[0][0]
                    .clone();
                (out, arrived, joined.get().unwrap())
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(long, solo_first, "{admission:?}");
        assert_eq!(short, solo_other, "{admission:?}");
        let waited = joined - arrived;
        if held {
            // The long one joined at its prompt pass; 6 decoding steps later no one had.
            assert!(
                joined >= 6,
                "{admission:?}: arrived after {arrived} steps, joined after {joined}"
            );
        } else {
            assert!(waited <= 3, "{admission:?}: joined after {waited} steps");
        }
    }
}

/// A prompt seen before (the same request again) arrives while another request generates:
/// without prefill priority, with the Llama family's CPU cache its one remaining token runs inside the running rows'
/// decoding step (a rider: no pass of its own, no join after it; its prefix fits inside the
/// running rows' positions); with tensor caches it runs its own pass. Either way both get
/// their solo tokens.
#[test]
fn a_repeated_prompt_rides_along_the_running_step() {
    // Riding is for a batch without prefill priority (with it, a repeated prompt runs its own
    // pass at once: `new_prompts_run_between_a_running_steps_layers`), which TGI's admission
    // rule (a waiting-served ratio above 0) also turns off.
    let off = Admission {
        prefill_priority: false,
        ..Admission::default()
    };
    let tgi = Admission {
        waiting_served_ratio: 0.5,
        ..Admission::default()
    };
    for (name, rides, admission) in [
        ("llama", true, off),
        ("qwen2", true, off),
        ("gpt2", false, off),
        ("llama", true, tgi),
    ] {
        let (mut g, first, c) = prefix_setup(name, 8);
        let solo = |g: &TextGenerator, p: &[u32]| solo_tokens(g, p, &c);
        let want = solo(&g, &first);
        // Longer than `first`: a rider's prefix fits inside the running rows' positions.
        let other = g
            .encode(
                "Completely different words here, and then a good many more of them after",
                true,
            )
            .unwrap();
        assert!(other.len() > first.len(), "{name}");
        let mut long = c.clone();
        long.max_new_tokens = Some(20);
        let want_other = solo_tokens(&g, &other, &long);

        g.batcher = Some(Batcher::with_admission(100_000, admission));
        assert_eq!(solo(&g, &first), want, "{name}: first request");
        let before = g.batcher.as_ref().unwrap().stats();
        let g = &g;
        std::thread::scope(|s| {
            // The running request holds its first token back until the repeat waits.
            let holder = s.spawn(|| hold_first_token(g, &other, &long, 1));
            while g.batcher.as_ref().unwrap().stats().running == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let repeat = s.spawn(|| solo(g, &first));
            assert_eq!(repeat.join().unwrap(), want, "{name}: the repeated prompt");
            assert_eq!(holder.join().unwrap(), want_other, "{name}: the holder");
        });
        let st = g.batcher.as_ref().unwrap().stats();
        assert_eq!(st.prefix_hits - before.prefix_hits, 1, "{name}: {st:?}");
        assert_eq!(st.prefills - before.prefills, 2, "{name}: {st:?}");
        if rides {
            assert_eq!(st.riders, 1, "{name}: {st:?}");
            assert_eq!(
                st.prefill_passes - before.prefill_passes,
                1,
                "{name}: only the holder's prompt ran a pass: {st:?}"
            );
        } else {
            assert_eq!(st.riders, 0, "{name}: {st:?}");
            assert_eq!(
                st.prefill_passes - before.prefill_passes,
                2,
                "{name}: {st:?}"
            );
        }
        assert_eq!((st.running, st.waiting), (0, 0), "{name}: {st:?}");
    }
}

/// A batcher whose prompt passes run at most `chunk` tokens.
fn chunked(chunk: usize) -> Batcher {
    Batcher::with_admission(
        100_000,
        Admission {
            max_prefill_tokens: chunk,
            ..Admission::default()
        },
    )
}

/// Generate `p` with `c`, each token's callback sleeping `ms`: the batch's steps wait for
/// this request's tokens, so they are at least that long.
fn slow_tokens(g: &TextGenerator, p: &[u32], c: &GenerationConfig, ms: u64) -> Vec<u32> {
    let mut on_token = |_: usize, _: u32, _: f32| std::thread::sleep(Duration::from_millis(ms));
    let mut hooks = Hooks {
        on_token: Some(&mut on_token),
        ..Hooks::default()
    };
    g.generate_one(p, c, &mut hooks).unwrap().sequences[0][0].clone()
}

/// A prompt longer than `max_prefill_tokens` runs in chunks, one per step, while a running
/// request keeps decoding between them (it gets a token per chunk); from scratch and from a
/// kept prefix, both requests get their solo tokens.
#[test]
fn long_prompts_run_in_chunks_between_decoding_steps() {
    for name in ["gpt2", "llama", "qwen2", "bloom"] {
        let (mut g, first, c) = prefix_setup(name, 8);
        let other = g.encode("Completely different words here", true).unwrap();
        let mut long = c.clone();
        long.max_new_tokens = Some(40);
        let want_first = solo_tokens(&g, &first, &c);
        let want_other = solo_tokens(&g, &other, &long);
        let mut next = first.clone();
        next.extend_from_slice(&want_first);
        next.extend(
            g.encode(" and what came after that, and then", false)
                .unwrap(),
        );
        let want_next = solo_tokens(&g, &next, &c);

        let chunk = 3;
        g.batcher = Some(chunked(chunk));
        let g = &g;
        let stats = || g.batcher.as_ref().unwrap().stats();
        // Alone: the chunks follow one another.
        assert_eq!(solo_tokens(g, &first, &c), want_first, "{name}: alone");
        let chunks = first.len().div_ceil(chunk) as u64;
        assert_eq!(stats().prefill_chunks, chunks, "{name}: {:?}", stats());

        // While another request decodes, each chunk shares a step with its token.
        let before = stats().steps;
        let (a, (b, arrived, joined)) = std::thread::scope(|s| {
            let a = s.spawn(|| slow_tokens(g, &other, &long, 5));
            let b = s.spawn(|| {
                let t = Instant::now();
                while stats().steps < before + 2 && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let arrived = stats().steps;
                let joined = std::cell::Cell::new(None);
                let mut on_token = |_: usize, _: u32, _: f32| {
                    if joined.get().is_none() {
                        joined.set(Some(stats().steps));
                    }
                };
                let mut hooks = Hooks {
                    on_token: Some(&mut on_token),
                    ..Hooks::default()
                };
                let out = g.generate_one(&next, &c, &mut hooks).unwrap().sequences[0][0].clone();
                (out, arrived, joined.get().unwrap())
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a, want_other, "{name}: the running request");
        assert_eq!(
            b, want_next,
            "{name}: the chunked prompt after a kept prefix"
        );
        let st = stats();
        assert!(st.prefix_hits >= 1, "{name}: {st:?}");
        let rest = next.len() as u64 - 1 - (first.len() + want_first.len() - 1) as u64;
        assert!(
            st.prefill_chunks >= chunks + rest.div_ceil(chunk as u64).max(2),
            "{name}: the continued prompt ran in chunks: {st:?}"
        );
        // Its chunks ran over several steps, each with the running request's token.
        assert!(
            joined - arrived >= 2,
            "{name}: arrived after {arrived} steps, first token after {joined}: {st:?}"
        );
        assert_eq!((st.running, st.waiting), (0, 0), "{name}: {st:?}");
    }
}

/// The cancellation tests' setup: the Llama fixture, a short prompt (`first`, greedy `c`), a
/// running request's prompt (`other`, 30 tokens with `long`) and their solo tokens.
type Cancelling = (
    TextGenerator,
    Vec<u32>,
    GenerationConfig,
    Vec<u32>,
    GenerationConfig,
    Vec<u32>,
    Vec<u32>,
);

fn cancelling() -> Cancelling {
    let (g, first, c) = prefix_setup("llama", 8);
    let other = g.encode("Completely different words here", true).unwrap();
    let mut long = c.clone();
    long.max_new_tokens = Some(30);
    let want_other = solo_tokens(&g, &other, &long);
    let want_first = solo_tokens(&g, &first, &c);
    (g, first, c, other, long, want_other, want_first)
}

/// A cancelled request stops within one chunk of its long prompt (what ran is kept: the same
/// prompt again continues from it), and a cancelled request that waits to join never runs;
/// the running request gets its solo tokens.
#[test]
fn cancelled_prompts_stop_between_chunks_and_in_the_queue() {
    let (mut g, first, c, other, long, want_other, want_first) = cancelling();
    // Chunks of the long prompt that run before it is cancelled (enough to keep as a prefix).
    let ran = 9;
    assert!(first.len() > ran as usize + 2, "{}", first.len());
    for queued in [false, true] {
        // One token per chunk; queued: a budget that holds only the running request.
        let budget = if queued {
            long.max_total_length(other.len())
        } else {
            100_000
        };
        g.batcher = Some(Batcher::with_admission(
            budget,
            Admission {
                max_prefill_tokens: 1,
                ..Admission::default()
            },
        ));
        let g = &g;
        let stats = || g.batcher.as_ref().unwrap().stats();
        let cancel = Cancel::new();
        // The running request's own prompt runs a chunk per token too.
        let base = other.len() as u64;
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| slow_tokens(g, &other, &long, 10));
            let b = s.spawn(|| {
                while stats().steps < 2 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let mut hooks = Hooks {
                    cancel: Some(cancel.clone()),
                    ..Hooks::default()
                };
                g.generate_one(&first, &c, &mut hooks)
            });
            // Cancel once it has run `ran` chunks, or waits to join.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20) {
                let st = stats();
                if (!queued && st.prefill_chunks >= base + ran) || (queued && st.waiting == 1) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            cancel.cancel();
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a, want_other, "queued {queued}: the running request");
        let err = b.expect_err("the cancelled request fails").to_string();
        assert!(err.contains("cancelled"), "{err}");
        let st = stats();
        assert_eq!(st.cancelled_prompts, 1, "queued {queued}: {st:?}");
        if queued {
            assert_eq!(st.prefill_chunks, base, "its prompt never ran: {st:?}");
            assert_eq!(st.prefills, 1, "only the running request's: {st:?}");
        } else {
            // Cancelled after `ran` chunks: at most one more ran.
            assert!(
                (base + ran..=base + ran + 1).contains(&st.prefill_chunks),
                "stopped between chunks: {st:?}"
            );
            // The same prompt again continues from what ran, with the tokens it gets alone.
            assert_eq!(solo_tokens(g, &first, &c), want_first);
            let after = stats();
            assert!(
                after.prefix_hits == st.prefix_hits + 1 && after.prefix_tokens >= ran,
                "{after:?}"
            );
        }
        assert_eq!((st.running, st.waiting), (0, 0), "queued {queued}: {st:?}");
    }
}

/// A prompt much longer than the running rows joins them: the short rows' left padding
/// (whole blocks of 64 positions) is not stored, and later rows join and leave around it;
/// every request gets its solo tokens (Llama family's CPU cache, RoPE positions past the
/// fixture's 64).
#[test]
fn a_long_prompt_joining_short_rows_keeps_their_solo_tokens() {
    for name in ["llama", "qwen2"] {
        // The fixture with a context window of 512 (RoPE: the weights are the same).
        let src = common::fixtures().join("decoders/models").join(name);
        let dir = std::env::temp_dir().join(format!("ff-cb-wide-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let cfg = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v["max_position_embeddings"] = 512.into();
        std::fs::write(&cfg, v.to_string()).unwrap();
        let mut g = common::decoder_at(&dir);
        let first = g
            .encode("The history of the lighthouse keepers", true)
            .unwrap();
        let mut c = g.generation_config.clone();
        c.eos_token_id.clear();
        c.max_new_tokens = Some(6);
        let other = g.encode("Completely different words here", true).unwrap();
        let long_text = "the keeper climbed the stairs to light the lamp ".repeat(6);
        let long_prompt = g.encode(&long_text, true).unwrap();
        assert!(
            long_prompt.len() > 100 && long_prompt.len() < 400,
            "{}",
            long_prompt.len()
        );
        let mut slow = c.clone();
        slow.max_new_tokens = Some(24);
        let mut lc = c.clone();
        lc.max_new_tokens = Some(16);
        let want = [
            solo_tokens(&g, &other, &slow),
            solo_tokens(&g, &long_prompt, &lc),
            solo_tokens(&g, &first, &c),
        ];
        g.batcher = Some(Batcher::new(100_000));
        let g = &g;
        let stats = || g.batcher.as_ref().unwrap().stats();
        let (c, lc) = (&c, &lc);
        let (long_prompt, first) = (&long_prompt, &first);
        let got: Vec<Vec<u32>> = std::thread::scope(|s| {
            let a = s.spawn(|| slow_tokens(g, &other, &slow, 5));
            let wait_steps = |n: u64| {
                let t = Instant::now();
                while stats().steps < n && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            };
            let b = s.spawn(move || {
                wait_steps(2);
                solo_tokens(g, long_prompt, lc)
            });
            // A third joins while the long one runs (its row padded to the long width).
            let third = s.spawn(move || {
                wait_steps(6);
                solo_tokens(g, first, c)
            });
            vec![a.join().unwrap(), b.join().unwrap(), third.join().unwrap()]
        });
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{name}: request {i}");
        }
        let st = stats();
        assert!(st.max_rows >= 3, "{name}: {st:?}");
        assert_eq!((st.running, st.waiting), (0, 0), "{name}: {st:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A cancelled request behind another in the queue (one that does not fit the budget yet)
/// leaves the queue at the next step, not once it reaches the front; the one ahead of it
/// runs when there is room, with its solo tokens.
#[test]
fn a_cancelled_request_leaves_the_queue_from_anywhere_in_it() {
    let (mut g, first, c, other, long, want_other, want_first) = cancelling();
    // A budget that holds only the running request: the others queue.
    g.batcher = Some(Batcher::new(long.max_total_length(other.len())));
    let g = &g;
    let stats = || g.batcher.as_ref().unwrap().stats();
    let until = |f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !f() && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let cancel = Cancel::new();
    std::thread::scope(|s| {
        let a = s.spawn(|| slow_tokens(g, &other, &long, 10));
        until(&|| stats().steps >= 2);
        let ahead = s.spawn(|| solo_tokens(g, &first, &c));
        until(&|| stats().waiting == 1);
        let behind = s.spawn(|| {
            let mut hooks = Hooks {
                cancel: Some(cancel.clone()),
                ..Hooks::default()
            };
            g.generate_one(&first, &c, &mut hooks)
        });
        until(&|| stats().waiting == 2);
        cancel.cancel();
        // Gone from the queue within a step or two, while the running request still runs.
        until(&|| stats().waiting == 1);
        let st = stats();
        assert_eq!((st.waiting, st.cancelled_prompts), (1, 1), "{st:?}");
        assert!(
            st.running >= 1,
            "the running request is still running: {st:?}"
        );
        let err = behind.join().unwrap().expect_err("cancelled").to_string();
        assert!(err.contains("cancelled"), "{err}");
        assert_eq!(a.join().unwrap(), want_other);
        assert_eq!(ahead.join().unwrap(), want_first);
    });
    let st = stats();
    assert_eq!(st.prefills, 2, "the cancelled prompt never ran: {st:?}");
    assert_eq!((st.running, st.waiting), (0, 0), "{st:?}");
}

/// `Admission::prefix_cache_tokens` 0 (`serve --prefix-cache-tokens 0`) keeps no prefix: the
/// same prompt again runs whole and gives the same tokens; the default continues from it.
#[test]
fn a_prefix_budget_of_zero_keeps_none() {
    let (mut g, first, c) = prefix_setup("llama", 6);
    let want = solo_tokens(&g, &first, &c);
    for (budget, hits) in [(0, 0), (Admission::default().prefix_cache_tokens, 2)] {
        let admission = Admission {
            prefix_cache_tokens: budget,
            ..Admission::default()
        };
        g.batcher = Some(Batcher::with_admission(100_000, admission));
        for _ in 0..3 {
            assert_eq!(solo_tokens(&g, &first, &c), want, "budget {budget}");
        }
        let st = g.batcher.as_ref().unwrap().stats();
        assert_eq!(st.prefix_hits, hits, "budget {budget}: {st:?}");
    }
}

/// Prompts scored one after another that start the same way (lm-evaluation-harness' choices
/// after one context): the later ones start from the kept scored prompt's keys, values and
/// scores (the batch's prefix hits say so), and score as they do alone, with fewer alternatives
/// asked for too. A prompt that is a start of a kept one needs no pass at all.
#[test]
fn scored_prompts_reuse_a_shared_start() {
    for name in ["llama", "gpt2"] {
        let alone = load(name);
        let mut g = load(name);
        g.batcher = Some(Batcher::new(100_000));
        let context = g
            .encode("Once upon a time, in a land far away, there lived", true)
            .unwrap();
        let choices = [" a king", " three bears and a cat", " nobody"];
        for (k, choice) in choices.iter().enumerate() {
            let mut ids = context.clone();
            ids.extend(g.encode(choice, false).unwrap());
            let top = if k == 2 { 1 } else { 3 };
            let hits = g.batcher.as_ref().unwrap().stats().prefix_hits;
            let got = g.prompt_logprobs_chunked(&ids, top, None, 4).unwrap();
            let want = alone.prompt_logprobs(&ids, top, None).unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate().skip(1) {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                assert!(
                    (a.logprob - b.logprob).abs() < 1e-4,
                    "{name} {k}: token {i}"
                );
                assert_eq!(a.rank, b.rank, "{name} {k}: token {i}");
                let ids_of = |s: &ferroformers::generation::TokenScore| -> Vec<u32> {
                    s.top.iter().map(|t| t.0).collect()
                };
                assert_eq!(ids_of(a), ids_of(b), "{name} {k}: token {i}");
            }
            let reused = g.batcher.as_ref().unwrap().stats().prefix_hits - hits;
            assert_eq!(reused, u64::from(k > 0), "{name}: choice {k}");
            // A generation from the scored prompt (`echo` with `max_tokens`) leaves its scores
            // kept for the next choice.
            let mut c = g.generation_config.clone();
            c.max_new_tokens = Some(1);
            g.generate_one(&ids, &c, &mut Hooks::default()).unwrap();
        }
        // The context alone: a start of the kept prompts, scored from them whole.
        let got = g.prompt_logprobs(&context, 1, None).unwrap();
        let want = alone.prompt_logprobs(&context, 1, None).unwrap();
        for (a, b) in got.iter().zip(&want).skip(1) {
            assert!((a.as_ref().unwrap().logprob - b.as_ref().unwrap().logprob).abs() < 1e-4);
        }
    }
}

/// A model that holds one forward pass at its start while the test arranges what happens
/// during it: `phase` 1 = hold the next pass (the phase becomes 2) until the phase is 3;
/// with `until`, that pass then also waits at its end until `until` is set.
struct Held {
    inner: Box<dyn CausalLm>,
    phase: Arc<AtomicU8>,
    until: Option<Arc<AtomicBool>>,
}

/// Wait (up to 20 s) until `f` says so.
fn wait_until(f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl CausalLm for Held {
    fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> candle_core::Result<Tensor> {
        let held = self
            .phase
            .compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if held {
            wait_until(|| self.phase.load(Ordering::SeqCst) == 3);
        }
        let out = self
            .inner
            .forward(input_ids, position_ids, bias, cache, last_only);
        if let (true, Some(until)) = (held, &self.until) {
            wait_until(|| until.load(Ordering::SeqCst));
        }
        out
    }

    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }

    fn max_positions(&self) -> Option<usize> {
        self.inner.max_positions()
    }

    fn hard_position_limit(&self) -> bool {
        self.inner.hard_position_limit()
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn prepare_batched_steps(&self) {
        self.inner.prepare_batched_steps()
    }
}

/// Prefill priority: a request that arrives while a decoding step runs has its prompt run
/// between the step's layers (Llama-family CPU passes), and its first token comes out before
/// that step has ended; without it, or with a model whose pass has no layer hook (GPT-2), it
/// waits for the step. Both requests get their solo tokens either way.
#[test]
fn new_prompts_run_between_a_running_steps_layers() {
    for (name, priority, between) in [
        ("llama", true, true),
        ("qwen2", true, true),
        ("llama", false, false),
        ("gpt2", true, false),
    ] {
        let (mut g, first, c) = prefix_setup(name, 12);
        let other = g.encode("Completely different words", true).unwrap();
        let want_first = solo_tokens(&g, &first, &c);
        let want_other = solo_tokens(&g, &other, &c);
        let phase = Arc::new(AtomicU8::new(0));
        // Set at the newcomer's first token; where it can come while the step runs, the step
        // waits for it at its end (its thread may otherwise only look after the step).
        let seen = Arc::new(AtomicBool::new(false));
        g.model = Box::new(Held {
            inner: load(name).model,
            phase: phase.clone(),
            until: between.then(|| seen.clone()),
        });
        g.batcher = Some(Batcher::with_admission(
            100_000,
            Admission {
                prefill_priority: priority,
                ..Admission::default()
            },
        ));
        let (g, first, other, c) = (&g, &first, &other, &c);
        let stats = || g.batcher.as_ref().unwrap().stats();
        let wait_for = |what: &str, f: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !f() {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "{name}: no {what} in 20 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        std::thread::scope(|s| {
            let running = s.spawn(|| solo_tokens(g, first, c));
            // Its first decoding step has run: the next pass is a decoding step; hold it.
            wait_for("decoding step", &|| stats().steps >= 1);
            phase.store(1, Ordering::SeqCst);
            wait_for("held step", &|| phase.load(Ordering::SeqCst) == 2);
            let held_at = stats().steps;
            let newcomer = s.spawn(move || {
                // The batch's steps when this request's first token came.
                let mut first_at = None;
                let mut on_token = |_: usize, _: u32, _: f32| {
                    first_at.get_or_insert_with(|| stats().steps);
                    seen.store(true, Ordering::SeqCst);
                };
                let mut hooks = Hooks {
                    on_token: Some(&mut on_token),
                    ..Hooks::default()
                };
                let t = g.generate_one(other, c, &mut hooks).unwrap().sequences[0][0].clone();
                (t, first_at)
            });
            wait_for("waiting newcomer", &|| stats().waiting == 1);
            phase.store(3, Ordering::SeqCst);
            let (got, first_at) = newcomer.join().unwrap();
            assert_eq!(got, want_other, "{name}: the newcomer");
            assert_eq!(
                running.join().unwrap(),
                want_first,
                "{name}: the running request"
            );
            let st = stats();
            if between {
                assert_eq!(st.mid_step_joins, 1, "{name}: {st:?}");
                assert_eq!(
                    first_at,
                    Some(held_at),
                    "{name}: first token before the step ended"
                );
            } else {
                assert_eq!(st.mid_step_joins, 0, "{name}: {st:?}");
                assert!(first_at > Some(held_at), "{name}: {first_at:?} {held_at}");
            }
            assert_eq!((st.running, st.waiting), (0, 0), "{name}: {st:?}");
        });
    }
}

/// A burst at an empty batch: a request that joins the queue early in the first one's prompt
/// pass stops that pass (Llama-family CPU passes stop between layers), and both prompts run
/// again at once: in one pass when both are new, in two when the first continues a kept
/// prefix (counted once as a prefix hit); a model whose pass has no layer hook (GPT-2) runs
/// them one after the other. Each request gets its solo tokens either way.
#[test]
fn an_empty_batchs_prompt_pass_restarts_with_requests_that_arrive_during_it() {
    for (name, kept, restarts) in [
        ("llama", false, true),
        ("llama", true, true),
        ("qwen2", false, true),
        ("gpt2", false, false),
    ] {
        let (mut g, first, c) = prefix_setup(name, 6);
        let other = g.encode("Completely different words", true).unwrap();
        let want_first = solo_tokens(&g, &first, &c);
        let want_other = solo_tokens(&g, &other, &c);
        let phase = Arc::new(AtomicU8::new(0));
        g.model = Box::new(Held {
            inner: load(name).model,
            phase: phase.clone(),
            until: None,
        });
        g.batcher = Some(Batcher::with_admission(100_000, Admission::default()));
        let (g, first, other, c) = (&g, &first, &other, &c);
        let stats = || g.batcher.as_ref().unwrap().stats();
        if kept {
            // The first prompt's keys and values are kept: it continues from them.
            assert_eq!(solo_tokens(g, first, c), want_first, "{name}: kept");
        }
        let before = stats();
        // The first pass is held at its start until the second request waits.
        phase.store(1, Ordering::SeqCst);
        std::thread::scope(|s| {
            let a = s.spawn(|| solo_tokens(g, first, c));
            wait_until(|| phase.load(Ordering::SeqCst) == 2);
            let b = s.spawn(|| solo_tokens(g, other, c));
            wait_until(|| stats().waiting == 1);
            assert_eq!(
                stats().waiting,
                1,
                "{name}: the second request did not queue"
            );
            phase.store(3, Ordering::SeqCst);
            assert_eq!(a.join().unwrap(), want_first, "{name}: the first request");
            assert_eq!(b.join().unwrap(), want_other, "{name}: the second request");
        });
        let st = stats();
        let passes = st.prefill_passes - before.prefill_passes;
        let hits = st.prefix_hits - before.prefix_hits;
        assert_eq!(st.prefills - before.prefills, 2, "{name}: {st:?}");
        assert_eq!(hits, u64::from(kept), "{name} kept {kept}: {st:?}");
        let want = match (restarts, kept) {
            (true, false) => (1, 1),
            (true, true) => (1, 2),
            (false, _) => (0, 2),
        };
        assert_eq!(
            (st.restarted_passes, passes),
            want,
            "{name} kept {kept}: {st:?}"
        );
        assert_eq!((st.running, st.waiting), (0, 0), "{name}: {st:?}");
    }
}

/// `Admission::arrival_wait`: the first prompt of an idle batch waits in the queue while
/// announced requests are on their way, and the second one's arrival ends the wait: one
/// prompt pass for both, each with its solo tokens, long before the wait's end. An
/// announcement dropped, or whose generation returned without a prompt, leaves nothing to
/// wait for; one that never arrives holds the first prompt up to the wait's end, no longer;
/// one run by beam search (outside the batch) has arrived once it runs.
#[test]
fn an_idle_batch_waits_for_announced_requests() {
    let (mut g, first, c) = prefix_setup("llama", 6);
    let other = g.encode("Completely different words", true).unwrap();
    let want_first = solo_tokens(&g, &first, &c);
    let want_other = solo_tokens(&g, &other, &c);
    let waiting_for = |wait: Duration| {
        Batcher::with_admission(
            100_000,
            Admission {
                arrival_wait: wait,
                ..Admission::default()
            },
        )
    };
    g.batcher = Some(waiting_for(Duration::from_secs(20)));
    let (gr, first, other, c) = (&g, &first, &other, &c);
    let b = gr.batcher.as_ref().unwrap();
    let (a1, a2) = (b.announce(), b.announce());
    let t = Instant::now();
    std::thread::scope(|s| {
        let x = s.spawn(move || arriving(Some(a1), || solo_tokens(gr, first, c)));
        wait_until(|| b.stats().waiting == 1);
        std::thread::sleep(Duration::from_millis(100));
        let st = b.stats();
        assert_eq!(
            (st.waiting, st.prefill_passes, st.arrival_waits),
            (1, 0, 1),
            "the first prompt did not wait: {st:?}"
        );
        let y = s.spawn(move || arriving(Some(a2), || solo_tokens(gr, other, c)));
        assert_eq!(x.join().unwrap(), want_first);
        assert_eq!(y.join().unwrap(), want_other);
    });
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let st = b.stats();
    assert_eq!(
        (st.prefills, st.prefill_passes, st.restarted_passes),
        (2, 1, 0),
        "{st:?}"
    );
    drop(b.announce());
    arriving(Some(b.announce()), || ());
    assert_eq!(solo_tokens(gr, first, c), want_first);
    assert_eq!(b.stats().arrival_waits, 1, "{:?}", b.stats());

    g.batcher = Some(waiting_for(Duration::from_millis(300)));
    let b = g.batcher.as_ref().unwrap();
    let never = b.announce();
    let t = Instant::now();
    assert_eq!(solo_tokens(&g, other, c), want_other);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(b.stats().arrival_waits, 1);
    assert_eq!(b.stats().announced, 1);
    drop(never);
    assert_eq!(b.stats().announced, 0);
    // A wait no Instant can hold: the prompt runs at once.
    g.batcher = Some(waiting_for(Duration::MAX));
    let b = g.batcher.as_ref().unwrap();
    let pending = b.announce();
    assert_eq!(solo_tokens(&g, other, c), want_other);
    assert_eq!(b.stats().arrival_waits, 0);
    drop(pending);

    // A request announced and then run by beam search, outside the batch, has arrived while
    // it runs (its first forward pass is held here to look).
    let phase = Arc::new(AtomicU8::new(1));
    g.model = Box::new(Held {
        inner: load("llama").model,
        phase: phase.clone(),
        until: None,
    });
    let mut beams = c.clone();
    beams.num_beams = 2;
    let (gr, beams) = (&g, &beams);
    let b = gr.batcher.as_ref().unwrap();
    std::thread::scope(|s| {
        let a = b.announce();
        let x = s.spawn(move || arriving(Some(a), || solo_tokens(gr, other, beams)));
        wait_until(|| phase.load(Ordering::SeqCst) == 2);
        assert_eq!(b.stats().announced, 0, "{:?}", b.stats());
        phase.store(3, Ordering::SeqCst);
        assert_eq!(x.join().unwrap().len(), 6);
    });
}
