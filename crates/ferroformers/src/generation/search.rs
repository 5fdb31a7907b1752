//! The search loop: greedy, sampling and beam search over any [`StepModel`] (a decoder-only
//! model with its KV cache, or an encoder-decoder's decoder), as HF's `generate` does them.

use super::config::{EarlyStopping, GenerationConfig};
use super::logits::{argmax, log_softmax, sample, LogitsProcessor, Rng};
use crate::error::{Error, Result};

/// One decoding step of a model over a set of rows (batch items, beams, samples).
pub trait StepModel {
    /// The first call (`None`) runs the prompts; later calls append one token per current row.
    /// Returns the next-token logits of every row, `[rows][vocab]`.
    fn step(&mut self, new_tokens: Option<&[u32]>) -> Result<Vec<Vec<f32>>>;

    /// Keep rows: row `i` afterwards is row `rows[i]` before (beam reordering, expanding a
    /// prompt into beams or samples, dropping finished rows).
    fn select_rows(&mut self, rows: &[usize]) -> Result<()>;
}

/// A request's cancellation, shared between threads: set once (a server's client has gone, or
/// its request timed out) and seen by the search loop after every step, and by a shared batch
/// ([`Batcher`](super::Batcher)) before a queued prompt runs and between the passes of a long
/// prompt, so that work for a request nobody waits for stops within one pass.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancel the request (every clone sees it).
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

thread_local! {
    /// [`abandoned_when`]'s check for the generations this thread runs.
    static ABANDONED: std::cell::RefCell<Option<std::rc::Rc<dyn Fn() -> bool>>> =
        const { std::cell::RefCell::new(None) };
}

/// Run `f` (a pipeline call) with every generation it runs on this thread stopping with an
/// error after its next step once `abandoned` says so: greedy search, sampling and beam
/// search, in every task (a server's batched summarization whose clients have all gone or
/// timed out stops instead of running to its `max_new_tokens`).
pub fn abandoned_when<T>(abandoned: impl Fn() -> bool + 'static, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<std::rc::Rc<dyn Fn() -> bool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            ABANDONED.with(|a| *a.borrow_mut() = before);
        }
    }
    let check: std::rc::Rc<dyn Fn() -> bool> = std::rc::Rc::new(abandoned);
    let _restore = Restore(ABANDONED.with(|a| a.borrow_mut().replace(check)));
    f()
}

/// The error of a generation [`abandoned_when`] stopped.
fn check_abandoned() -> Result<()> {
    let gone = ABANDONED.with(|a| a.borrow().as_ref().is_some_and(|f| f()));
    if gone {
        return Err(Error::param(
            "inputs",
            "the request was cancelled (its client has gone)",
        ));
    }
    Ok(())
}

/// `(input index, the most likely tokens with their log-probabilities)`.
pub type TopHook<'a> = &'a mut dyn FnMut(usize, Vec<(u32, f32)>);

/// `(input index, the log-probabilities of its best beam's tokens)`.
pub type BeamLogprobsHook<'a> = &'a mut dyn FnMut(usize, &[f32]);

/// Token ids -> text (for stop strings).
pub type DecodeFn<'a> = &'a dyn Fn(&[u32]) -> String;

/// What `generate` calls back: a streamed token, and a stop-string check over a row's new
/// tokens.
#[derive(Default)]
pub struct Hooks<'a> {
    /// `(input index, token, its log-probability)` for every token produced by greedy search or
    /// sampling with one sequence per input; the log-probability is the log-softmax of the
    /// processed scores it was chosen from (temperature, top-k/p and penalties applied).
    pub on_token: Option<&'a mut dyn FnMut(usize, u32, f32)>,
    /// Decodes new tokens to text, for `stop_strings`.
    pub decode: Option<DecodeFn<'a>>,
    /// Asked after every step of greedy search or sampling: `true` ends the generation there
    /// (a server's client has gone).
    pub stop: Option<&'a dyn Fn() -> bool>,
    /// Asked as `stop` is; a shared batch also asks it while the request waits to join and
    /// between the passes of its prompt.
    pub cancel: Option<Cancel>,
    /// How many alternatives `on_top` gets per token (OpenAI's `top_logprobs`, TGI's
    /// `top_n_tokens`); 0: none.
    pub top_logprobs: usize,
    /// Called just before `on_token` (same rows) with the `top_logprobs` most likely tokens of
    /// the distribution the token was chosen from, `(token, log-probability)`, best first.
    pub on_top: Option<TopHook<'a>>,
    /// `on_token`'s log-probability from the processed scores multiplied back by the sampling
    /// temperature (Whisper's `_retrieve_avg_logprobs`), instead of the tempered ones.
    pub unscaled_logprobs: bool,
    /// Beam search: per input, the log-probabilities of the best sequence's tokens, each from
    /// its step's processed scores softmaxed again (what Whisper's `_retrieve_avg_logprobs`
    /// reads from HF's `scores` along `beam_indices`).
    pub on_beam_logprobs: Option<BeamLogprobsHook<'a>>,
}

impl Hooks<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(Cancel::is_cancelled)
    }
}

/// Per input, its returned sequences (new tokens only, an eos kept at the end), best first for
/// beam search; `scores` are beam search's `sequences_scores`.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub sequences: Vec<Vec<Vec<u32>>>,
    pub scores: Option<Vec<Vec<f32>>>,
}

/// Generate from `prompts`: each input's prompt row as the model sees it (left padding
/// included, all the same length). `model` holds one row per input before its first step.
pub fn generate(
    model: &mut dyn StepModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    hooks: &mut Hooks,
) -> Result<Generated> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(Generated {
            sequences: Vec::new(),
            scores: None,
        });
    }
    let prompt_len = prompts[0].len();
    if prompts.iter().any(|p| p.len() != prompt_len) {
        return Err(Error::param(
            "input_ids",
            "prompt rows must be padded to one length",
        ));
    }
    let max_length = cfg.max_total_length(prompt_len);
    cfg.warn_unfeasible_lengths(prompt_len);
    if max_length <= prompt_len {
        return Err(Error::param(
            "max_length",
            format!(
                "the prompt is {prompt_len} tokens and max_length is {max_length}: nothing to \
                 generate (set max_new_tokens)"
            ),
        ));
    }
    if !cfg.stop_strings.is_empty() && hooks.decode.is_none() {
        return Err(Error::param(
            "stop_strings",
            "needs a tokenizer to decode tokens",
        ));
    }
    if cfg.num_beams > 1 {
        beam_search(model, prompts, cfg, max_length, hooks)
    } else {
        greedy_or_sample(model, prompts, cfg, max_length, hooks)
    }
}

/// The `k` largest scores with their tokens, best first; ties: the lower token first.
fn top_k_desc(scores: &[f32], k: usize) -> Vec<(f32, u32)> {
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (t, &v) in scores.iter().enumerate() {
        if top.len() == k && top.last().is_some_and(|&(m, _)| v.total_cmp(&m).is_le()) {
            continue;
        }
        // After every kept score that is >= v: equal scores keep their (lower) tokens first.
        let at = top.partition_point(|&(m, _)| m.total_cmp(&v).is_ge());
        top.insert(at, (v, t as u32));
        top.truncate(k);
    }
    top
}

/// `log(sum(exp(scores)))` (-inf when every score is).
fn log_sum_exp(scores: &[f32]) -> f32 {
    let max = crate::kernels::cpu::rowops::max_value(scores);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = scores.iter().map(|&s| ((s - max) as f64).exp()).sum();
    (max as f64 + sum.ln()) as f32
}

/// `log(softmax(scores)[tok])`, -inf where the token was masked out.
fn log_softmax_at(scores: &[f32], tok: u32) -> f32 {
    let max = crate::kernels::cpu::rowops::max_value(scores);
    if !max.is_finite() {
        return f32::NEG_INFINITY;
    }
    let sum = crate::kernels::cpu::rowops::exp_sum(scores, max);
    ((scores[tok as usize] - max) as f64 - sum.ln()) as f32
}

/// The `n` most likely tokens of `softmax(scores)` with their log-probabilities, best first
/// (ties: lower id first); tokens masked to -inf are left out.
pub fn top_logprobs(scores: &[f32], n: usize) -> Vec<(u32, f32)> {
    let max = crate::kernels::cpu::rowops::max_value(scores);
    if !max.is_finite() || n == 0 {
        return Vec::new();
    }
    let lse = crate::kernels::cpu::rowops::exp_sum(scores, max).ln();
    top_with(scores, n, max, lse)
}

/// A token scored at one position ([`score_row`]): its log-probability, its rank (1 for the
/// most likely token; 1 + how many tokens are more likely, as vLLM counts it), and the most
/// likely tokens there with theirs, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    pub logprob: f32,
    pub rank: usize,
    pub top: Vec<(u32, f32)>,
}

/// `tok`'s log-probability under `softmax(scores)`, its rank, and the `n` most likely tokens
/// with theirs ([`top_logprobs`]), the row's maximum and normaliser computed once.
pub fn score_row(scores: &[f32], tok: u32, n: usize) -> TokenScore {
    let max = crate::kernels::cpu::rowops::max_value(scores);
    let own = scores[tok as usize];
    let rank = 1 + scores.iter().filter(|&&x| x > own).count();
    if !max.is_finite() {
        return TokenScore {
            logprob: f32::NEG_INFINITY,
            rank,
            top: Vec::new(),
        };
    }
    let lse = crate::kernels::cpu::rowops::exp_sum(scores, max).ln();
    let top = if n == 0 {
        Vec::new()
    } else {
        top_with(scores, n, max, lse)
    };
    TokenScore {
        logprob: ((own - max) as f64 - lse) as f32,
        rank,
        top,
    }
}

/// [`top_logprobs`] given the row's maximum and `ln(sum(exp(scores - max)))`. A few (the
/// usual 1 to 20) are picked in one pass over the row; more by a partial sort of every id.
fn top_with(scores: &[f32], n: usize, max: f32, lse: f64) -> Vec<(u32, f32)> {
    let lp = |i: u32| ((scores[i as usize] - max) as f64 - lse) as f32;
    if n <= 64 {
        return top_k_desc(scores, n)
            .into_iter()
            .filter(|&(v, _)| v > f32::NEG_INFINITY)
            .map(|(_, i)| (i, lp(i)))
            .collect();
    }
    let mut idx: Vec<u32> = (0..scores.len() as u32)
        .filter(|&i| scores[i as usize] > f32::NEG_INFINITY)
        .collect();
    let by = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let n = n.min(idx.len());
    if n < idx.len() {
        idx.select_nth_unstable_by(n, by);
        idx.truncate(n);
    }
    idx.sort_by(by);
    idx.into_iter().map(|i| (i, lp(i))).collect()
}

fn hits_stop_string(cfg: &GenerationConfig, hooks: &Hooks, new: &[u32]) -> bool {
    let Some(decode) = hooks.decode else {
        return false;
    };
    if cfg.stop_strings.is_empty() || new.is_empty() {
        return false;
    }
    let now = decode(new);
    let before = decode(&new[..new.len() - 1]);
    cfg.stop_strings
        .iter()
        .any(|s| now.contains(s.as_str()) && !before.contains(s.as_str()))
}

fn greedy_or_sample(
    model: &mut dyn StepModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    max_length: usize,
    hooks: &mut Hooks,
) -> Result<Generated> {
    let n_inputs = prompts.len();
    let n_ret = cfg.num_return_sequences;
    let processor = LogitsProcessor::new(cfg);
    let mut rng = match cfg.seed {
        Some(s) => Rng::new(s),
        None => Rng::from_entropy(),
    };
    let prompt_len = prompts[0].len();
    // Rows: input i's sample j is row i * n_ret + j (HF's expand order).
    let mut rows: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), n_ret))
        .collect();
    let mut live: Vec<usize> = (0..rows.len()).collect();
    let mut logits = model.step(None)?;
    if n_ret > 1 {
        let expand: Vec<usize> = (0..n_inputs)
            .flat_map(|i| std::iter::repeat_n(i, n_ret))
            .collect();
        logits = expand.iter().map(|&i| logits[i].clone()).collect();
        model.select_rows(&expand)?;
    }
    loop {
        let mut next = Vec::with_capacity(live.len());
        let mut keep = Vec::with_capacity(live.len());
        for (slot, &r) in live.iter().enumerate() {
            let scores = &mut logits[slot];
            processor.process(&rows[r], prompt_len, scores);
            let tok = if cfg.do_sample {
                sample(scores, &mut rng)
            } else {
                argmax(scores)
            };
            rows[r].push(tok);
            if n_ret == 1 && hooks.top_logprobs > 0 {
                if let Some(f) = hooks.on_top.as_deref_mut() {
                    f(r, top_logprobs(scores, hooks.top_logprobs));
                }
            }
            if n_ret == 1 {
                if let Some(f) = hooks.on_token.as_deref_mut() {
                    let lp = if hooks.unscaled_logprobs && cfg.do_sample && cfg.temperature != 1.0 {
                        let t = cfg.temperature;
                        let unscaled: Vec<f32> = scores.iter().map(|s| s * t).collect();
                        log_softmax_at(&unscaled, tok)
                    } else {
                        log_softmax_at(scores, tok)
                    };
                    f(r, tok, lp);
                }
            }
            let done = cfg.eos_token_id.contains(&tok)
                || rows[r].len() >= max_length
                || hits_stop_string(cfg, hooks, &rows[r][prompt_len..]);
            if !done {
                next.push(tok);
                keep.push(slot);
            }
        }
        if keep.is_empty() || hooks.stop.is_some_and(|f| f()) || hooks.cancelled() {
            break;
        }
        check_abandoned()?;
        if keep.len() != live.len() {
            model.select_rows(&keep)?;
            live = keep.iter().map(|&s| live[s]).collect();
        }
        logits = model.step(Some(&next))?;
    }
    let sequences = rows
        .chunks(n_ret)
        .map(|c| c.iter().map(|r| r[prompt_len..].to_vec()).collect())
        .collect();
    Ok(Generated {
        sequences,
        scores: None,
    })
}

#[derive(Debug, Clone)]
struct Beam {
    tokens: Vec<u32>,
    score: f32,
    /// Each new token's log-probability in its step's renormalised processed scores (only
    /// with `Hooks::on_beam_logprobs`).
    lps: Vec<f32>,
}

/// One input's beam search state, as HF's vectorised `_beam_search` (4.5x).
struct BeamState {
    running: Vec<Beam>,
    /// Finished hypotheses, best first, at most `num_beams`.
    finished: Vec<Beam>,
    /// HF's `is_early_stop_heuristic_unsatisfied`; `false` freezes the input.
    open: bool,
}

fn beam_search(
    model: &mut dyn StepModel,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    max_length: usize,
    hooks: &mut Hooks,
) -> Result<Generated> {
    let nb = cfg.num_beams;
    let lp = cfg.length_penalty;
    let processor = LogitsProcessor::new(cfg);
    let prompt_len = prompts[0].len();
    let beams_to_keep = 2usize.max(1 + cfg.eos_token_id.len()) * nb;
    let mut states: Vec<BeamState> = prompts
        .iter()
        .map(|p| BeamState {
            running: (0..nb)
                .map(|j| Beam {
                    tokens: p.clone(),
                    score: if j == 0 { 0.0 } else { -1e9 },
                    lps: Vec::new(),
                })
                .collect(),
            finished: Vec::new(),
            open: true,
        })
        .collect();
    // Model rows: the running beams of the open inputs, in order.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let mut logits = model.step(None)?;
    let expand: Vec<usize> = (0..prompts.len())
        .flat_map(|i| std::iter::repeat_n(i, nb))
        .collect();
    logits = expand.iter().map(|&i| logits[i].clone()).collect();
    model.select_rows(&expand)?;
    let mut cur_len = prompt_len;
    let track = hooks.on_beam_logprobs.is_some();
    loop {
        let mut next_rows = Vec::new();
        let mut next_tokens = Vec::new();
        let mut still_active = Vec::new();
        for (a, &i) in active.iter().enumerate() {
            let st = &mut states[i];
            // Candidates over all beams: accumulated log-probabilities. The best
            // `beams_to_keep` overall are among each beam's best `beams_to_keep` (in the same
            // order: score, then lower token), so only those are kept per beam.
            // (accumulated score, beam, token, with tracking the token's log-probability
            // renormalised over its beam's processed scores).
            let mut cand: Vec<(f32, usize, u32, f32)> = Vec::with_capacity(nb * beams_to_keep);
            for (j, beam) in st.running.iter().enumerate() {
                let mut lps = log_softmax(&logits[a * nb + j]);
                processor.process(&beam.tokens, prompt_len, &mut lps);
                let lse = if track { log_sum_exp(&lps) } else { 0.0 };
                for (v, t) in top_k_desc(&lps, beams_to_keep) {
                    cand.push((v + beam.score, j, t, v - lse));
                }
            }
            // torch.topk: largest first; ties by lower index (beam-major order).
            let k = beams_to_keep.min(cand.len());
            cand.select_nth_unstable_by(k - 1, |x, y| y.0.total_cmp(&x.0));
            cand.truncate(k);
            cand.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
            let hits: Vec<bool> = cand
                .iter()
                .map(|&(_, j, t, _)| {
                    let mut toks = st.running[j].tokens.clone();
                    toks.push(t);
                    cfg.eos_token_id.contains(&t)
                        || cur_len + 1 >= max_length
                        || hits_stop_string(cfg, hooks, &toks[prompt_len..])
                })
                .collect();
            // Finished hypotheses: among the top `num_beams` candidates, those that stop.
            let all_finished = st.finished.len() == nb;
            let full = all_finished && cfg.early_stopping == EarlyStopping::True;
            if st.open && !full {
                let gen_len = (cur_len + 1 - prompt_len) as f32;
                for (c, &(score, j, t, r)) in cand.iter().enumerate().take(nb) {
                    if hits[c] {
                        let mut tokens = st.running[j].tokens.clone();
                        tokens.push(t);
                        let mut lps = st.running[j].lps.clone();
                        if track {
                            lps.push(r);
                        }
                        st.finished.push(Beam {
                            tokens,
                            score: score / gen_len.powf(lp),
                            lps,
                        });
                    }
                }
                // Stable: earlier (already finished) hypotheses win ties.
                st.finished.sort_by(|x, y| y.score.total_cmp(&x.score));
                st.finished.truncate(nb);
            }
            // Running beams: the best candidates that do not stop.
            let mut order: Vec<usize> = (0..cand.len()).collect();
            let penalised = |c: usize| cand[c].0 + if hits[c] { -1e9 } else { 0.0 };
            order.sort_by(|&x, &y| penalised(y).total_cmp(&penalised(x)));
            let prev = std::mem::take(&mut st.running);
            for &c in order.iter().take(nb) {
                let (_, j, t, r) = cand[c];
                let mut tokens = prev[j].tokens.clone();
                tokens.push(t);
                let mut lps = prev[j].lps.clone();
                if track {
                    lps.push(r);
                }
                st.running.push(Beam {
                    tokens,
                    score: penalised(c),
                    lps,
                });
                next_rows.push(a * nb + j);
                next_tokens.push(t);
            }
            // The early-stop heuristic, after the step (HF's `_check_early_stop_heuristic`).
            let new_len = cur_len + 1;
            let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
                max_length - prompt_len
            } else {
                new_len - prompt_len
            } as f32;
            let best_possible = st.running[0].score / best_len.powf(lp);
            let all_finished = st.finished.len() == nb;
            if all_finished {
                let worst = st
                    .finished
                    .iter()
                    .map(|b| b.score)
                    .fold(f32::INFINITY, f32::min);
                if best_possible <= worst {
                    st.open = false;
                }
            }
            let frozen = !st.open || (all_finished && cfg.early_stopping == EarlyStopping::True);
            let any_continues = hits.iter().any(|h| !h);
            if frozen || !any_continues || new_len >= max_length {
                st.open = false;
                // Drop this input's rows from the next step.
                let n = next_rows.len();
                next_rows.truncate(n - nb);
                next_tokens.truncate(n - nb);
            } else {
                still_active.push(i);
            }
        }
        cur_len += 1;
        if still_active.is_empty() {
            break;
        }
        check_abandoned()?;
        model.select_rows(&next_rows)?;
        active = still_active;
        logits = model.step(Some(&next_tokens))?;
    }
    let n_ret = cfg.num_return_sequences;
    let mut sequences = Vec::with_capacity(states.len());
    let mut scores = Vec::with_capacity(states.len());
    for (i, st) in states.into_iter().enumerate() {
        let mut best = st.finished;
        // Never finished (cannot happen with a length limit): fall back to running beams.
        if best.len() < n_ret {
            best.extend(st.running.into_iter().take(n_ret - best.len()));
        }
        best.truncate(n_ret);
        if let (Some(f), Some(b)) = (hooks.on_beam_logprobs.as_deref_mut(), best.first()) {
            f(i, &b.lps);
        }
        scores.push(best.iter().map(|b| b.score).collect());
        sequences.push(
            best.into_iter()
                .map(|b| b.tokens[prompt_len..].to_vec())
                .collect(),
        );
    }
    Ok(Generated {
        sequences,
        scores: Some(scores),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The best tokens by score (ties to the lower id), masked ones left out, log-probabilities
    /// of the full softmax.
    #[test]
    fn top_logprobs_are_the_best_tokens_of_the_softmax() {
        let scores = [1.0, 3.0, 2.0, f32::NEG_INFINITY, 3.0];
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln();
        let got = top_logprobs(&scores, 3);
        let ids: Vec<u32> = got.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 4, 2]);
        for (id, lp) in got {
            assert!((lp as f64 - (scores[id as usize] as f64 - lse)).abs() < 1e-6);
        }
        assert_eq!(top_logprobs(&scores, 10).len(), 4);
        assert!(top_logprobs(&[f32::NEG_INFINITY; 3], 2).is_empty());
        assert!(top_logprobs(&scores, 0).is_empty());
    }

    /// The one-pass pick of a few best tokens equals the partial sort's, ties included, and
    /// `score_row` gives the token's log-probability as `log_softmax_at` does.
    #[test]
    fn few_best_tokens_in_one_pass_equal_the_sorted_ones() {
        // 5000 scores with many ties (only 50 distinct values) and some masked.
        let scores: Vec<f32> = (0..5000u32)
            .map(|i| match i.wrapping_mul(2654435761) % 53 {
                0 => f32::NEG_INFINITY,
                v => (v % 50) as f32 * 0.25,
            })
            .collect();
        let sorted = top_logprobs(&scores, 200);
        for n in [1, 5, 20, 64] {
            assert_eq!(top_logprobs(&scores, n), sorted[..n].to_vec(), "n = {n}");
        }
        for tok in [0, 7, 4999] {
            let got = score_row(&scores, tok, 3);
            assert_eq!(got.logprob, log_softmax_at(&scores, tok));
            assert_eq!(got.top, sorted[..3].to_vec());
            let better = scores.iter().filter(|&&x| x > scores[tok as usize]).count();
            assert_eq!(got.rank, better + 1);
        }
    }
}
