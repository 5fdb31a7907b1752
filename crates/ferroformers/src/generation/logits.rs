//! Logits processors and warpers, as HF's `logits_process.py` (same order, same edge cases), the
//! sampler, and the seeded RNG.

use super::config::GenerationConfig;

/// Everything that reshapes one row's next-token scores, built once per `generate` call.
#[derive(Debug, Clone)]
pub struct LogitsProcessor {
    /// OpenAI's (ours): see [`GenerationConfig::logit_bias`].
    pub logit_bias: Vec<(u32, f32)>,
    pub repetition_penalty: f32,
    /// OpenAI's (ours): see [`GenerationConfig::frequency_penalty`].
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// TGI's (ours): see [`GenerationConfig::tgi_frequency_penalty`].
    pub tgi_frequency_penalty: f32,
    pub no_repeat_ngram_size: usize,
    pub min_length: usize,
    pub min_new_tokens: usize,
    pub eos: Vec<u32>,
    /// Encoder-decoder processors: forced first / last tokens and banned sequences.
    pub forced_bos: Option<u32>,
    pub forced_eos: Vec<u32>,
    pub bad_words: Vec<Vec<u32>>,
    pub suppress: Vec<u32>,
    /// Suppressed at the first new token.
    pub begin_suppress: Vec<u32>,
    /// Whisper's timestamp rules (`WhisperTimeStampLogitsProcessor`), after the suppression.
    pub timestamps: Option<TimestampRules>,
    /// `max_length`, and `max_new_tokens` that overrides it (for the forced eos position).
    pub max_length: usize,
    pub max_new_tokens: Option<usize>,
    /// Warpers, applied only when sampling.
    pub sampling: Option<Warpers>,
}

#[derive(Debug, Clone)]
pub struct Warpers {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: f32,
    pub min_p: Option<f32>,
    pub min_tokens_to_keep: usize,
}

impl LogitsProcessor {
    pub fn new(cfg: &GenerationConfig) -> Self {
        Self {
            logit_bias: cfg.logit_bias.clone(),
            repetition_penalty: cfg.repetition_penalty,
            frequency_penalty: cfg.frequency_penalty,
            tgi_frequency_penalty: cfg.tgi_frequency_penalty,
            presence_penalty: cfg.presence_penalty,
            no_repeat_ngram_size: cfg.no_repeat_ngram_size,
            min_length: cfg.min_length,
            min_new_tokens: cfg.min_new_tokens.unwrap_or(0),
            eos: cfg.eos_token_id.clone(),
            forced_bos: cfg.forced_bos_token_id,
            forced_eos: cfg.forced_eos_token_id.clone(),
            // HF drops single-token bad words that are an eos token.
            bad_words: cfg
                .bad_words_ids
                .iter()
                .filter(|w| !(w.len() == 1 && cfg.eos_token_id.contains(&w[0])))
                .cloned()
                .collect(),
            suppress: cfg.suppress_tokens.clone(),
            begin_suppress: cfg.begin_suppress_tokens.clone(),
            timestamps: cfg.timestamp_rules.clone(),
            max_length: cfg.max_length,
            max_new_tokens: cfg.max_new_tokens,
            sampling: cfg.do_sample.then(|| Warpers {
                temperature: cfg.temperature,
                top_k: cfg.top_k.filter(|k| *k > 0),
                top_p: cfg.top_p,
                min_p: cfg.min_p,
                min_tokens_to_keep: if cfg.num_beams > 1 {
                    cfg.eos_token_id.len().max(1) + 1
                } else {
                    1
                },
            }),
        }
    }

    /// `tokens`: the row so far (prompt with its padding, then generated tokens), as HF's
    /// `input_ids`; `prompt_len`: the (padded) prompt length.
    pub fn process(&self, tokens: &[u32], prompt_len: usize, scores: &mut [f32]) {
        for &(t, b) in &self.logit_bias {
            if let Some(s) = scores.get_mut(t as usize) {
                *s += b;
            }
        }
        if self.repetition_penalty != 1.0 {
            repetition_penalty(tokens, scores, self.repetition_penalty);
        }
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            let generated = tokens.get(prompt_len..).unwrap_or_default();
            openai_penalties(
                generated,
                scores,
                self.frequency_penalty,
                self.presence_penalty,
            );
        }
        if self.tgi_frequency_penalty != 0.0 {
            // TGI: the whole row counts, each occurrence weighing 1 / the row's length.
            openai_penalties(
                tokens,
                scores,
                self.tgi_frequency_penalty / tokens.len().max(1) as f32,
                0.0,
            );
        }
        if self.no_repeat_ngram_size > 0 {
            for t in banned_ngram_tokens(tokens, self.no_repeat_ngram_size) {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        for word in &self.bad_words {
            if let Some((&last, prefix)) = word.split_last() {
                if tokens.ends_with(prefix) {
                    if let Some(s) = scores.get_mut(last as usize) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let suppress_eos = tokens.len() < self.min_length
            || tokens.len().saturating_sub(prompt_len) < self.min_new_tokens;
        if suppress_eos {
            for &e in &self.eos {
                if let Some(s) = scores.get_mut(e as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(bos) = self.forced_bos.filter(|_| tokens.len() == 1) {
            force(scores, &[bos]);
        }
        let max_length = match self.max_new_tokens {
            Some(n) => prompt_len + n,
            None => self.max_length,
        };
        if !self.forced_eos.is_empty() && tokens.len() + 1 == max_length {
            force(scores, &self.forced_eos);
        }
        // HF's `begin_index`: the prompt length, one more when a forced bos follows a
        // one-token prompt.
        let begin = prompt_len + usize::from(prompt_len == 1 && self.forced_bos.is_some());
        let begin_suppress = if tokens.len() == begin {
            self.begin_suppress.as_slice()
        } else {
            &[]
        };
        for &t in self.suppress.iter().chain(begin_suppress) {
            if let Some(s) = scores.get_mut(t as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
        if let Some(ts) = &self.timestamps {
            ts.apply(tokens, scores);
        }
        if let Some(w) = &self.sampling {
            if w.temperature != 1.0 {
                let before: Option<Vec<f32>> = (w.temperature < 1e-20).then(|| scores.to_vec());
                for s in scores.iter_mut() {
                    *s /= w.temperature;
                }
                // A temperature so small that a score over it overflows to infinity (1e-38 and
                // below) would make the softmax NaN: the scores are then taken relative to the
                // largest before dividing (the same distribution: all of it on the largest).
                if let Some(before) = before.filter(|_| scores.contains(&f32::INFINITY)) {
                    let top = before.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    for (s, b) in scores.iter_mut().zip(before) {
                        *s = (b - top) / w.temperature;
                    }
                }
            }
            if let Some(k) = w.top_k {
                top_k_filter(scores, k.max(w.min_tokens_to_keep));
            }
            if w.top_p < 1.0 {
                top_p_filter(scores, w.top_p, w.min_tokens_to_keep);
            }
            if let Some(m) = w.min_p {
                min_p_filter(scores, m, w.min_tokens_to_keep);
            }
        }
    }
}

/// OpenAI's frequency and presence penalties over the tokens generated so far (vLLM's
/// `apply_penalties`): `score -= frequency * count + presence * (count > 0)`.
pub fn openai_penalties(generated: &[u32], scores: &mut [f32], frequency: f32, presence: f32) {
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    for (t, n) in counts {
        if let Some(s) = scores.get_mut(t as usize) {
            *s -= frequency * n as f32 + presence;
        }
    }
}

/// `WhisperTimeStampLogitsProcessor`: timestamp tokens (`timestamp_begin` and above, one per
/// 0.02 s) come in pairs around text, never go back in time, open every segment, and win over
/// text when their total probability beats every single text token.
#[derive(Debug, Clone, PartialEq)]
pub struct TimestampRules {
    pub no_timestamps: u32,
    pub timestamp_begin: u32,
    pub eos: u32,
    /// The row length at the first generated token.
    pub begin_index: usize,
    pub max_initial_timestamp_index: Option<usize>,
}

impl TimestampRules {
    fn apply(&self, tokens: &[u32], scores: &mut [f32]) {
        let n = scores.len();
        let tb = (self.timestamp_begin as usize).min(n);
        let mask = |scores: &mut [f32], from: usize, to: usize| {
            for s in &mut scores[from.min(n)..to.min(n)] {
                *s = f32::NEG_INFINITY;
            }
        };
        if let Some(s) = scores.get_mut(self.no_timestamps as usize) {
            *s = f32::NEG_INFINITY;
        }
        let seq = tokens.get(self.begin_index..).unwrap_or(&[]);
        let is_ts = |t: u32| t >= self.timestamp_begin;
        let last_was = seq.last().is_some_and(|&t| is_ts(t));
        let penultimate_was = seq.len() < 2 || is_ts(seq[seq.len() - 2]);
        if last_was {
            if penultimate_was {
                mask(scores, tb, n);
            } else {
                mask(scores, 0, self.eos as usize);
            }
        }
        if let Some(&last) = seq.iter().rev().find(|&&t| is_ts(t)) {
            let upto = if last_was && !penultimate_was {
                last
            } else {
                last + 1
            };
            mask(scores, tb, upto as usize);
        }
        if tokens.len() == self.begin_index {
            mask(scores, 0, tb);
            if let Some(m) = self.max_initial_timestamp_index {
                mask(scores, tb + m + 1, n);
            }
        }
        // log-softmax is a shift of the scores: compare in score space, f64 sums as torch's
        // float32 logsumexp would be within rounding of.
        let max = crate::kernels::cpu::rowops::max_value(scores);
        if !max.is_finite() {
            return;
        }
        let lse = |xs: &[f32]| {
            let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if !m.is_finite() {
                return f64::NEG_INFINITY;
            }
            m as f64 + xs.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln()
        };
        let ts_mass = lse(&scores[tb..]);
        let best_text = scores[..tb]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        if ts_mass > best_text {
            mask(scores, 0, tb);
        }
    }
}

/// `ForcedBOSTokenLogitsProcessor` / `ForcedEOSTokenLogitsProcessor`: every score -inf but the
/// forced tokens', which are 0.
fn force(scores: &mut [f32], tokens: &[u32]) {
    for s in scores.iter_mut() {
        *s = f32::NEG_INFINITY;
    }
    for &t in tokens {
        if let Some(s) = scores.get_mut(t as usize) {
            *s = 0.0;
        }
    }
}

/// `RepetitionPenaltyLogitsProcessor`: every token already in the row (prompt included) has its
/// score divided by the penalty when positive, multiplied when negative.
pub fn repetition_penalty(tokens: &[u32], scores: &mut [f32], penalty: f32) {
    let mut seen = vec![false; scores.len()];
    for &t in tokens {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// `NoRepeatNGramLogitsProcessor`: tokens that would complete an n-gram already in the row.
pub fn banned_ngram_tokens(tokens: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || tokens.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &tokens[tokens.len() + 1 - n..];
    tokens
        .windows(n)
        .filter(|w| &w[..n - 1] == prefix)
        .map(|w| w[n - 1])
        .collect()
}

/// `TopKLogitsWarper`: keep scores >= the k-th largest.
///
/// The k-th largest value by selection (linear time) rather than a sort of the whole row: the
/// same value, as both order by `total_cmp`.
pub fn top_k_filter(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    let (_, &mut kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = crate::kernels::cpu::rowops::max_value(scores);
    if max == f32::NEG_INFINITY {
        return vec![0.0; scores.len()];
    }
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability is
/// <= 1 - top_p (the least likely), always keeping `min_keep` of the most likely.
///
/// Scores already at -inf (top-k's leftovers, suppressed tokens) sort first with probability
/// exactly 0, adding nothing to the sums: only the others are sorted and summed, in the order
/// and with the values the whole row would give.
pub fn top_p_filter(scores: &mut [f32], top_p: f32, min_keep: usize) {
    // -NaN sorts before -inf: such a row keeps every entry in the sort.
    let peel = !scores.iter().any(|s| s.is_nan() && s.is_sign_negative());
    top_p_over(scores, top_p, min_keep, peel);
}

/// [`top_p_filter`], sorting and summing only the scores above -inf when `peel`, else the
/// whole row.
fn top_p_over(scores: &mut [f32], top_p: f32, min_keep: usize, peel: bool) {
    let n = scores.len();
    let mut order: Vec<usize> = (0..n)
        .filter(|&i| !peel || scores[i] != f32::NEG_INFINITY)
        .collect();
    let skipped = n - order.len();
    // Stable ascending sort, as torch.sort(descending=False).
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let probs = softmax(&sorted);
    let mut cum = 0f32;
    let mut remove = Vec::new();
    for (pos, p) in probs.iter().enumerate() {
        cum += p;
        if cum <= 1.0 - top_p && skipped + pos < n.saturating_sub(min_keep) {
            remove.push(order[pos]);
        }
    }
    for i in remove {
        scores[i] = f32::NEG_INFINITY;
    }
}

/// `MinPLogitsWarper`: drop tokens whose probability is below `min_p` times the top one.
pub fn min_p_filter(scores: &mut [f32], min_p: f32, min_keep: usize) {
    let probs = softmax(scores);
    let top = probs.iter().cloned().fold(0f32, f32::max);
    let threshold = min_p * top;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Most likely first: the first `min_keep` are never removed.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    for (rank, &i) in order.iter().enumerate() {
        if rank >= min_keep && probs[i] < threshold {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// The first index of the maximum (as `torch.argmax`).
pub fn argmax(scores: &[f32]) -> u32 {
    crate::kernels::cpu::rowops::argmax(scores) as u32
}

/// `log_softmax` in f32.
pub fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = crate::kernels::cpu::rowops::max_value(scores);
    let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
    let lse = max + sum.ln();
    scores.iter().map(|s| s - lse).collect()
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same stream on every platform
/// and version (sampling with a seed is reproducible).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::new(t ^ (std::process::id() as u64).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Draw a token from softmax(scores) (filtered scores are -inf and never drawn).
///
/// Only the finite scores are exponentiated: a -inf score's probability is exactly 0 and adds
/// nothing to the sums, so the draw is the one the whole row's softmax gives.
pub fn sample(scores: &[f32], rng: &mut Rng) -> u32 {
    let live: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i] != f32::NEG_INFINITY)
        .collect();
    draw(scores, &live, rng)
}

/// The draw from softmax over `scores[idx]` (in `idx`'s order), returning a token of `idx`.
fn draw(scores: &[f32], idx: &[usize], rng: &mut Rng) -> u32 {
    let probs = softmax(&idx.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let total: f64 = probs.iter().map(|p| *p as f64).sum();
    let mut u = rng.next_f64() * total;
    let mut last = 0;
    for (&i, &p) in idx.iter().zip(&probs) {
        if p > 0.0 {
            last = i;
            u -= p as f64;
            if u < 0.0 {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    /// A temperature so small that scores over it overflow (1e-45, 1e-38) leaves the largest
    /// score finite and every other one -inf (no NaN in the softmax); a usual one divides as
    /// before, bit for bit.
    #[test]
    fn tiny_temperatures_keep_the_softmax_finite() {
        for t in [1e-45f32, 1e-38, 1e-37, 1e-30] {
            let scale = if t < 1e-37 { 100.0 } else { 1.0 };
            let mut cfg = GenerationConfig {
                do_sample: true,
                temperature: t,
                top_k: None,
                ..GenerationConfig::default()
            };
            cfg.suppress_tokens.clear();
            let p = LogitsProcessor::new(&cfg);
            let mut s: Vec<f32> = [1.0f32, 3.0, -2.5, NEG, 2.0]
                .iter()
                .map(|x| x * scale)
                .collect();
            p.process(&[], 0, &mut s);
            assert!(s.iter().all(|x| !x.is_nan()), "{t}: {s:?}");
            let best = s.iter().copied().fold(NEG, f32::max);
            assert!(best.is_finite() && s[1] == best, "{t}: {s:?}");
            let e: Vec<f32> = s.iter().map(|x| (x - best).exp()).collect();
            let sum: f32 = e.iter().sum();
            assert_eq!(e[1] / sum, 1.0, "{t}: all of it on the largest: {s:?}");
        }
        let cfg = GenerationConfig {
            do_sample: true,
            temperature: 0.7,
            top_k: None,
            ..GenerationConfig::default()
        };
        let mut s = vec![1.0f32, 3.0, -2.5];
        LogitsProcessor::new(&cfg).process(&[], 0, &mut s);
        assert_eq!(s, vec![1.0 / 0.7, 3.0 / 0.7, -2.5 / 0.7]);
    }

    #[test]
    fn top_k_keeps_k_best_and_ties() {
        let mut s = vec![1.0, 3.0, 2.0, 3.0, 0.5];
        top_k_filter(&mut s, 2);
        assert_eq!(s, vec![NEG, 3.0, NEG, 3.0, NEG]);
        let mut s = vec![1.0, 3.0, 2.0];
        top_k_filter(&mut s, 1);
        assert_eq!(s, vec![NEG, 3.0, NEG]);
    }

    #[test]
    fn top_p_matches_hf() {
        // probs 0.5, 0.25, 0.125, 0.125 (ln-space logits).
        let base: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        let mut s = base.clone();
        top_p_filter(&mut s, 0.7, 1);
        // ascending cumsum: .125, .25, .5, 1.0; remove where <= 0.3: the two 0.125s.
        assert_eq!(s[2], NEG);
        assert_eq!(s[3], NEG);
        assert_eq!(&s[..2], &base[..2]);
        let mut s = base.clone();
        top_p_filter(&mut s, 0.1, 1);
        assert_eq!(s.iter().filter(|x| x.is_finite()).count(), 1);
        assert!(s[0].is_finite());
        let mut s = base.clone();
        top_p_filter(&mut s, 0.1, 3);
        assert_eq!(s.iter().filter(|x| x.is_finite()).count(), 3);
    }

    #[test]
    fn min_p_scales_with_top_probability() {
        let base: Vec<f32> = [0.6f32, 0.3, 0.05, 0.05].iter().map(|p| p.ln()).collect();
        let mut s = base.clone();
        min_p_filter(&mut s, 0.2, 1); // threshold 0.12
        assert_eq!(s.iter().filter(|x| x.is_finite()).count(), 2);
        let mut s = base.clone();
        min_p_filter(&mut s, 0.9, 1);
        assert_eq!(s.iter().filter(|x| x.is_finite()).count(), 1);
        let mut s = base;
        min_p_filter(&mut s, 0.9, 3);
        assert_eq!(s.iter().filter(|x| x.is_finite()).count(), 3);
    }

    /// TGI's frequency penalty (`HeterogeneousFrequencyPenaltyLogitsProcessor`): counts over
    /// the whole row, prompt included, divided by the row's length.
    #[test]
    fn tgi_frequency_penalty_counts_the_whole_row() {
        let cfg = GenerationConfig {
            tgi_frequency_penalty: 2.0,
            ..Default::default()
        };
        let p = LogitsProcessor::new(&cfg);
        let mut s = vec![1.0; 4];
        // Row [1, 3, 3, 2] with a prompt of 2: token 3 twice, 1 and 2 once, of 4.
        p.process(&[1, 3, 3, 2], 2, &mut s);
        assert_eq!(s, vec![1.0, 0.5, 0.5, 0.0]);
        assert!(!cfg.argmax_only());
    }

    #[test]
    fn openai_penalties_count_generated_tokens_only() {
        // vLLM's numbers: score - frequency * count - presence * (count > 0).
        let mut s = vec![1.0, 1.0, 1.0, 1.0];
        openai_penalties(&[2, 2, 1], &mut s, 0.5, 0.25);
        assert_eq!(s, vec![1.0, 0.25, -0.25, 1.0]);
        let cfg = GenerationConfig {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            logit_bias: vec![(3, -2.0), (0, 1.5), (99, 5.0)],
            ..Default::default()
        };
        let p = LogitsProcessor::new(&cfg);
        // The prompt (tokens 1 and 3 before `prompt_len` 2) is not penalized; the bias is
        // added; an id past the vocabulary is ignored.
        let mut s = vec![0.0; 4];
        p.process(&[1, 3, 2, 2], 2, &mut s);
        assert_eq!(s, vec![1.5, 0.0, -1.25, -2.0]);
        assert!(!cfg.argmax_only());
    }

    #[test]
    fn repetition_and_ngrams() {
        let mut s = vec![2.0, -2.0, 1.0];
        repetition_penalty(&[0, 1, 1], &mut s, 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
        assert_eq!(banned_ngram_tokens(&[5, 6, 7, 5, 6], 3), vec![7]);
        assert_eq!(banned_ngram_tokens(&[5, 6, 7, 5], 2), vec![6]);
        assert!(banned_ngram_tokens(&[5], 3).is_empty());
    }

    #[test]
    fn rng_is_deterministic_and_sampling_respects_filters() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut rng = Rng::new(1);
        let s = vec![NEG, 0.0, NEG, 1.0];
        for _ in 0..100 {
            let t = sample(&s, &mut rng);
            assert!(t == 1 || t == 3);
        }
    }

    /// The whole-row sort and softmax the filters and the draw used before they skipped the
    /// -inf scores (top-k by a full sort, top-p and the draw over every entry): the reference
    /// for [`filters_and_draws_equal_the_whole_row_ones`].
    fn whole_row(scores: &mut [f32], k: usize, top_p: f32, min_keep: usize, seed: u64) -> u32 {
        if k > 0 && k < scores.len() {
            let mut sorted: Vec<f32> = scores.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            scores
                .iter_mut()
                .filter(|s| **s < kth)
                .for_each(|s| *s = NEG);
        }
        if top_p < 1.0 {
            top_p_over(scores, top_p, min_keep, false);
        }
        let all: Vec<usize> = (0..scores.len()).collect();
        draw(scores, &all, &mut Rng::new(seed))
    }

    /// Top-k by selection, top-p over the live scores and the draw over them give the bits
    /// and tokens of the whole-row versions: rows with ties, suppressed (-inf) tokens, rows
    /// where min_keep reaches into the -inf ones, an all -inf row.
    #[test]
    fn filters_and_draws_equal_the_whole_row_ones() {
        let mut rng = Rng::new(9);
        for case in 0..400u64 {
            let n = [1usize, 2, 7, 64, 1000][case as usize % 5];
            let mut row: Vec<f32> = (0..n)
                // Few distinct values: ties at the k-th place and in the sorted order.
                .map(|_| ((rng.next_f64() * 12.0).floor() as f32 - 6.0) * 0.75)
                .collect();
            for _ in 0..(case % 4) as usize * n / 8 {
                let i = (rng.next_f64() * n as f64) as usize;
                row[i] = NEG;
            }
            if case % 37 == 0 {
                row.iter_mut().for_each(|s| *s = NEG);
            }
            let k = [0usize, 1, 3, 50, n][(case / 5) as usize % 5];
            let top_p = [1.0f32, 0.95, 0.5, 0.1][(case / 25) as usize % 4];
            let min_keep = [1usize, 2, n][(case / 100) as usize % 3];
            let mut want = row.clone();
            let token = whole_row(&mut want, k, top_p, min_keep, case);
            let mut got = row.clone();
            top_k_filter(&mut got, k);
            if top_p < 1.0 {
                top_p_filter(&mut got, top_p, min_keep);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&want),
                "case {case}: n={n} k={k} p={top_p}"
            );
            assert_eq!(sample(&got, &mut Rng::new(case)), token, "case {case}");
        }
    }
}
