//! Evaluation metrics as the HF example scripts compute them:
//! - entity-level precision, recall and F1 plus token accuracy, as `seqeval` (default mode,
//!   what `evaluate.load("seqeval")` reports as `overall_*`) for token classification;
//! - exact match and F1 as the SQuAD v1.1 evaluation script (what `evaluate.load("squad")`
//!   runs), and `run_qa`'s post-processing from window logits to an answer text.

use std::collections::{BTreeSet, HashMap};

use crate::tokenizer::Encoded;

/// seqeval's chunk boundaries: a tag's prefix (`B`, `I`, `E`, `S`, `O`, ...) and its type.
fn split_tag(tag: &str) -> (char, &str) {
    let mut chars = tag.chars();
    let prefix = chars.next().unwrap_or('O');
    let rest = chars.as_str();
    // Python: `chunk[1:].split('-', maxsplit=1)[-1] or '_'`.
    let ty = match rest.split_once('-') {
        Some((_, t)) => t,
        None => rest,
    };
    (prefix, if ty.is_empty() { "_" } else { ty })
}

fn end_of_chunk(prev_tag: char, tag: char, prev_type: &str, ty: &str) -> bool {
    matches!(prev_tag, 'E' | 'S')
        || (matches!(prev_tag, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev_tag != 'O' && prev_tag != '.' && prev_type != ty)
}

fn start_of_chunk(prev_tag: char, tag: char, prev_type: &str, ty: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev_tag, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_type != ty)
}

/// seqeval's `get_entities` over sentences (flattened with an `O` after each, as seqeval
/// does): `(type, first, last)` positions in the flattened sequence.
pub fn entities(sentences: &[Vec<String>]) -> Vec<(String, usize, usize)> {
    let flat: Vec<&str> = sentences
        .iter()
        .flat_map(|s| s.iter().map(String::as_str).chain(std::iter::once("O")))
        .chain(std::iter::once("O"))
        .collect();
    let (mut prev_tag, mut prev_type) = ('O', "");
    let mut begin = 0;
    let mut chunks = Vec::new();
    for (i, chunk) in flat.iter().enumerate() {
        let (tag, ty) = split_tag(chunk);
        if end_of_chunk(prev_tag, tag, prev_type, ty) {
            chunks.push((prev_type.to_string(), begin, i - 1));
        }
        if start_of_chunk(prev_tag, tag, prev_type, ty) {
            begin = i;
        }
        (prev_tag, prev_type) = (tag, ty);
    }
    chunks
}

/// Entity-level (micro) precision, recall, F1, and token accuracy, as seqeval's
/// `precision_score`, `recall_score`, `f1_score` and `accuracy_score` (0 where undefined).
pub fn seqeval(truth: &[Vec<String>], pred: &[Vec<String>]) -> (f64, f64, f64, f64) {
    let t: BTreeSet<_> = entities(truth).into_iter().collect();
    let p: BTreeSet<_> = entities(pred).into_iter().collect();
    let correct = t.intersection(&p).count() as f64;
    let precision = if p.is_empty() {
        0.0
    } else {
        correct / p.len() as f64
    };
    let recall = if t.is_empty() {
        0.0
    } else {
        correct / t.len() as f64
    };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    let (mut same, mut total) = (0usize, 0usize);
    for (a, b) in truth.iter().zip(pred) {
        for (x, y) in a.iter().zip(b) {
            same += (x == y) as usize;
            total += 1;
        }
    }
    let accuracy = if total == 0 {
        0.0
    } else {
        same as f64 / total as f64
    };
    (precision, recall, f1, accuracy)
}

/// Python's `string.punctuation`.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// Python's `\w` (Unicode): letters, digits, marks and the underscore.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The SQuAD script's `normalize_answer`: lower case, no punctuation, no articles
/// (`\b(a|an|the)\b`), single spaces.
pub fn normalize_answer(s: &str) -> String {
    let text: Vec<char> = s
        .to_lowercase()
        .chars()
        .filter(|c| !PUNCTUATION.contains(*c))
        .collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let at_start = i == 0 || !is_word(text[i - 1]);
        let article = at_start
            && ["the", "an", "a"]
                .iter()
                .find_map(|a| {
                    let n = a.chars().count();
                    let matches = text.len() >= i + n
                        && text[i..i + n].iter().copied().eq(a.chars())
                        && (i + n == text.len() || !is_word(text[i + n]));
                    matches.then_some(n)
                })
                .is_some_and(|n| {
                    i += n;
                    true
                });
        if article {
            out.push(' ');
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn squad_f1(prediction: &str, truth: &str) -> f64 {
    let p = normalize_answer(prediction);
    let t = normalize_answer(truth);
    let p: Vec<&str> = p.split_whitespace().collect();
    let t: Vec<&str> = t.split_whitespace().collect();
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for w in &p {
        counts.entry(w).or_default().0 += 1;
    }
    for w in &t {
        counts.entry(w).or_default().1 += 1;
    }
    let same: usize = counts.values().map(|(a, b)| *a.min(b)).sum();
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / t.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Exact match and F1 (both in percent) of predicted answers against each question's gold
/// answers (the best over them), as the SQuAD v1.1 script. Questions without gold answers
/// are skipped (the script has none).
pub fn squad(predictions: &[String], golds: &[Vec<String>]) -> (f64, f64) {
    let (mut em, mut f1, mut n) = (0.0, 0.0, 0usize);
    for (p, g) in predictions.iter().zip(golds) {
        if g.is_empty() {
            continue;
        }
        n += 1;
        let np = normalize_answer(p);
        em += g.iter().any(|t| normalize_answer(t) == np) as u8 as f64;
        f1 += g.iter().map(|t| squad_f1(p, t)).fold(0.0, f64::max);
    }
    let n = n.max(1) as f64;
    (100.0 * em / n, 100.0 * f1 / n)
}

/// Indices of the `n` largest values, largest first (numpy's `argsort()[-1:-n-1:-1]`).
fn top_indices(v: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    // Ties (unordered in numpy's default sort) go to the larger index.
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    idx.into_iter().rev().take(n).collect()
}

/// One window of a question-answering example: its encoding and each token's start and end
/// logits.
pub type Window<'a> = (&'a Encoded, Vec<f32>, Vec<f32>);

/// `run_qa`'s `postprocess_qa_predictions` (SQuAD v1: there is always an answer): over every
/// window of one example, the `n_best` best starts and ends, kept where both are context
/// tokens, in order and at most `max_answer_length` tokens apart; the best sum of start and
/// end logits gives the answer text. Logits are per window, `start[i]`/`end[i]` for token `i`.
pub fn best_answer(
    context: &str,
    windows: &[Window<'_>],
    n_best: usize,
    max_answer_length: usize,
) -> String {
    let mut best: Option<(f32, usize, usize)> = None;
    let mut candidates = 0usize;
    for (enc, start, end) in windows {
        let is_context = |i: usize| i < enc.len() && enc.sequence_ids[i] == Some(1);
        for s in top_indices(start, n_best) {
            for e in top_indices(end, n_best) {
                if !is_context(s) || !is_context(e) || e < s || e - s + 1 > max_answer_length {
                    continue;
                }
                let score = start[s] + end[e];
                candidates += 1;
                // Python's `sorted(reverse=True)` keeps the first of equal scores.
                if best.is_none_or(|(b, ..)| score > b) {
                    best = Some((score, enc.offsets[s].0, enc.offsets[e].1));
                }
            }
        }
    }
    match best {
        Some((_, a, b)) => {
            let text: String = context.chars().skip(a).take(b.saturating_sub(a)).collect();
            // `run_qa` answers "empty" when its only candidate has no text.
            if text.is_empty() && candidates == 1 {
                "empty".into()
            } else {
                text
            }
        }
        None => "empty".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(s: &[&str]) -> Vec<Vec<String>> {
        s.iter()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    }

    #[test]
    fn seqeval_chunks() {
        // seqeval's own docstring example.
        let e = entities(&seqs(&["B-PER I-PER O B-LOC"]));
        assert_eq!(
            e,
            vec![("PER".to_string(), 0, 1), ("LOC".to_string(), 3, 3)]
        );
        // I- after O starts a chunk; a type switch ends one.
        let e = entities(&seqs(&["O I-PER I-LOC"]));
        assert_eq!(e, vec![("PER".into(), 1, 1), ("LOC".into(), 2, 2)]);
        let (p, r, f, a) = seqeval(&seqs(&["B-PER I-PER O"]), &seqs(&["B-PER O O"]));
        assert_eq!((p, r, f), (0.0, 0.0, 0.0));
        assert!((a - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn squad_normalization() {
        assert_eq!(normalize_answer("The  Cat, a hat!"), "cat hat");
        assert_eq!(normalize_answer("theory an"), "theory");
        let (em, f1) = squad(
            &["the cat sat".into(), "dog".into()],
            &[vec!["A cat sat.".into()], vec!["a big dog".into()]],
        );
        assert_eq!(em, 50.0);
        assert!((f1 - 100.0 * (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-9);
    }
}
