//! `question-answering`, as HF's `QuestionAnsweringPipeline` (v4.57, fast-tokenizer path):
//! question + context windows (`truncation="only_second"`, `stride=doc_stride`), a span search
//! over start/end probabilities per window, answers mapped back to characters of the context.

use serde::Serialize;
use serde_json::{Map, Value};

use super::{param, EncoderRunner, Input, Output, Params, PipelineOptions, Task};
use crate::error::{Error, Result};
use crate::models::{self, Head};
use crate::tokenizer::Encoded;

/// One answer: `{score, start, end, answer}`; `start`/`end` are character offsets into the
/// context.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    pub score: f64,
    pub start: usize,
    pub end: usize,
    pub answer: String,
}

/// A candidate span in token positions of one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub score: f32,
}

/// Parse `{"question": .., "context": ..}`.
pub(crate) fn input_from_json(o: &Map<String, Value>, index: usize) -> Result<Input> {
    for k in o.keys() {
        if k != "question" && k != "context" {
            return Err(Error::input(
                index,
                format!("unexpected key `{k}` (expected `question` and `context`)"),
            ));
        }
    }
    let get = |key: &str| {
        match o.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(Error::input(
            index,
            format!("a question-answering input needs both `question` and `context`; `{key}` is missing"),
        )),
        Some(Value::Array(_)) => Err(Error::input(
            index,
            format!("`{key}` is a list: give one {{\"question\", \"context\"}} object per pair"),
        )),
        Some(v) => Err(Error::input(
            index,
            format!("`{key}` must be a string, got {v}"),
        )),
    }
    };
    Ok(Input::Question {
        question: get("question")?,
        context: get("context")?,
    })
}

/// Softmax over all positions, in f32 as numpy does on float32 logits.
fn softmax_f32(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// HF's `decode_spans`: scores `start[i] * end[j]` for `i <= j < i + max_answer_len`, the best
/// `top_k` of all `(i, j)` pairs (others score 0), then only spans whose both ends are allowed.
/// Ties keep row-major order (numpy's `argmax`; its sorts leave ties unspecified). Position 0 is
/// always treated as allowed here: HF looks positions up in `mask.nonzero()` of a `[1, seq]`
/// mask, whose row indices (all 0) match position 0 too.
pub fn decode_spans(
    start: &[f32],
    end: &[f32],
    top_k: usize,
    max_answer_len: usize,
    allowed: &[bool],
) -> Vec<Span> {
    let n = start.len().min(end.len());
    let mut band = Vec::new();
    for (i, s) in start[..n].iter().enumerate() {
        let stop = n.min(i + max_answer_len);
        for (j, e) in end[..stop].iter().enumerate().skip(i) {
            band.push(Span {
                start: i,
                end: j,
                score: s * e,
            });
        }
    }
    let chosen: Vec<Span> = if top_k == 1 {
        let mut best: Option<Span> = None;
        for s in &band {
            if best.is_none_or(|b| s.score > b.score) {
                best = Some(*s);
            }
        }
        best.into_iter().collect()
    } else {
        band.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut chosen: Vec<Span> = band.into_iter().take(top_k).collect();
        // Fewer candidates than asked for: numpy goes on with the zero cells outside the band.
        if chosen.len() < top_k {
            let outside = (0..n)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .filter(|&(i, j)| j < i || j >= i + max_answer_len)
                .map(|(i, j)| Span {
                    start: i,
                    end: j,
                    score: 0.0,
                });
            let missing = top_k - chosen.len();
            chosen.extend(outside.take(missing));
        }
        chosen
    };
    let ok = |i: usize| i == 0 || allowed.get(i).copied().unwrap_or(false);
    chosen
        .into_iter()
        .filter(|s| ok(s.start) && ok(s.end))
        .collect()
}

/// HF's `select_starts_ends`: mask positions that cannot be in an answer, normalise start and end
/// logits, note the null (CLS) score for `handle_impossible_answer`, then `decode_spans`.
/// `allowed[i]`: position `i` may be part of an answer (context tokens and CLS). Returns the spans
/// and the updated minimum null score.
#[allow(clippy::too_many_arguments)]
pub fn select_starts_ends(
    start: &[f32],
    end: &[f32],
    allowed: &[bool],
    min_null_score: f64,
    top_k: usize,
    handle_impossible_answer: bool,
    max_answer_len: usize,
) -> (Vec<Span>, f64) {
    let mask = |xs: &[f32]| -> Vec<f32> {
        xs.iter()
            .enumerate()
            .map(|(i, x)| {
                if allowed.get(i).copied().unwrap_or(false) {
                    *x
                } else {
                    -10000.0
                }
            })
            .collect()
    };
    let mut start = softmax_f32(&mask(start));
    let mut end = softmax_f32(&mask(end));
    let mut min_null_score = min_null_score;
    if start.is_empty() || end.is_empty() {
        return (Vec::new(), min_null_score);
    }
    if handle_impossible_answer {
        min_null_score = min_null_score.min((start[0] * end[0]) as f64);
    }
    start[0] = 0.0;
    end[0] = 0.0;
    let spans = decode_spans(&start, &end, top_k, max_answer_len, allowed);
    (spans, min_null_score)
}

/// `Encoding.word_to_chars(word, sequence_index)` within one window.
fn word_to_chars(enc: &Encoded, word: u32, sequence: usize) -> Option<(usize, usize)> {
    let mut hits = (0..enc.len())
        .filter(|&t| enc.sequence_ids[t] == Some(sequence) && enc.word_ids[t] == Some(word));
    let first = hits.next()?;
    let last = hits.next_back().unwrap_or(first);
    Some((enc.offsets[first].0, enc.offsets[last].1))
}

/// HF's `get_indices`: the character span of tokens `s..=e`, widened to whole words of the
/// context when `align_to_words` (falling back to token offsets when a token has no word).
pub fn get_indices(enc: &Encoded, s: usize, e: usize, align_to_words: bool) -> (usize, usize) {
    let offsets = (enc.offsets[s].0, enc.offsets[e].1);
    if !align_to_words {
        return offsets;
    }
    let aligned = (|| {
        let start = word_to_chars(enc, enc.word_ids[s]?, 1)?.0;
        let end = word_to_chars(enc, enc.word_ids[e]?, 1)?.1;
        Some((start, end))
    })();
    aligned.unwrap_or(offsets)
}

/// Parameters of the span search and answer selection.
#[derive(Debug, Clone, Copy)]
pub struct AnswerParams {
    pub top_k: usize,
    pub max_answer_len: usize,
    pub handle_impossible_answer: bool,
    pub align_to_words: bool,
}

/// One window of the context: its encoding (question first) and the model's logits.
pub struct WindowLogits<'a> {
    pub enc: &'a Encoded,
    pub start: Vec<f32>,
    pub end: Vec<f32>,
}

/// HF's `p_mask` inverted: context tokens and CLS tokens may be in the answer.
pub fn allowed_positions(enc: &Encoded, cls_id: Option<u32>) -> Vec<bool> {
    (0..enc.len())
        .map(|i| enc.sequence_ids[i] == Some(1) || (cls_id.is_some() && Some(enc.ids[i]) == cls_id))
        .collect()
}

/// HF's `postprocess`: candidates from every window, equal answers (case-insensitive) merged by
/// adding their scores, the null answer when asked, sorted (stable) and cut to `top_k`.
pub fn postprocess(
    context: &str,
    windows: &[WindowLogits],
    cls_id: Option<u32>,
    p: AnswerParams,
) -> Vec<Answer> {
    let chars: Vec<char> = context.chars().collect();
    let slice = |a: usize, b: usize| -> String {
        let b = b.min(chars.len());
        if a >= b {
            String::new()
        } else {
            chars[a..b].iter().collect()
        }
    };
    // Some candidates are dropped or merged when aligned to words: HF asks for more.
    let pre_top_k = if p.align_to_words {
        p.top_k * 2 + 10
    } else {
        p.top_k
    };
    let mut min_null_score = 1_000_000f64;
    let mut answers: Vec<Answer> = Vec::new();
    for w in windows {
        let allowed = allowed_positions(w.enc, cls_id);
        let (spans, null) = select_starts_ends(
            &w.start,
            &w.end,
            &allowed,
            min_null_score,
            pre_top_k,
            p.handle_impossible_answer,
            p.max_answer_len,
        );
        min_null_score = null;
        for span in spans {
            let (start, end) = get_indices(w.enc, span.start, span.end, p.align_to_words);
            let text = slice(start, end);
            let lower = text.to_lowercase();
            match answers
                .iter_mut()
                .find(|a| a.answer.to_lowercase() == lower)
            {
                Some(a) => a.score += span.score as f64,
                None => answers.push(Answer {
                    score: span.score as f64,
                    start,
                    end,
                    answer: text,
                }),
            }
        }
    }
    if p.handle_impossible_answer {
        answers.push(Answer {
            score: min_null_score,
            start: 0,
            end: 0,
            answer: String::new(),
        });
    }
    answers.sort_by(|a, b| b.score.total_cmp(&a.score));
    answers.truncate(p.top_k);
    answers
}

/// HF returns a dict for exactly one answer, else a list.
pub fn to_output(mut answers: Vec<Answer>) -> Output {
    if answers.len() == 1 {
        Output::Answer(answers.remove(0))
    } else {
        Output::Answers(answers)
    }
}

pub(crate) struct QuestionAnswering {
    runner: EncoderRunner,
    /// The longest input the model's positions allow.
    model_limit: usize,
}

impl QuestionAnswering {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        let runner =
            EncoderRunner::load(opts, model, Head::QuestionAnswering, "question-answering")?;
        let model_limit =
            models::max_positions(&runner.config).unwrap_or(runner.tokenizer.max_length);
        Ok(Self {
            runner,
            model_limit,
        })
    }
}

fn positive(params: &Params, name: &str) -> Result<Option<usize>> {
    match param::opt_usize(params, name)?.flatten() {
        Some(0) => Err(Error::param(name, "must be >= 1 (got 0)")),
        v => Ok(v),
    }
}

impl Task for QuestionAnswering {
    fn accepted_params(&self) -> &'static [&'static str] {
        &[
            "top_k",
            "topk",
            "doc_stride",
            "max_answer_len",
            "max_seq_len",
            "max_question_len",
            "handle_impossible_answer",
            "align_to_words",
        ]
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        let top_k = match positive(params, "top_k")? {
            Some(k) => k,
            None => positive(params, "topk")?.unwrap_or(1),
        };
        let answer = AnswerParams {
            top_k,
            max_answer_len: positive(params, "max_answer_len")?.unwrap_or(15),
            handle_impossible_answer: param::opt_bool(params, "handle_impossible_answer")?
                .unwrap_or(false),
            align_to_words: param::opt_bool(params, "align_to_words")?.unwrap_or(true),
        };
        // HF's fast-tokenizer path reads but never applies `max_question_len`.
        param::opt_usize(params, "max_question_len")?;
        let tok = &self.runner.tokenizer;
        let max_seq_len =
            positive(params, "max_seq_len")?.unwrap_or_else(|| tok.max_length.min(384));
        if max_seq_len > self.model_limit {
            return Err(Error::param(
                "max_seq_len",
                format!(
                    "{max_seq_len} is longer than the model's {} positions",
                    self.model_limit
                ),
            ));
        }
        let doc_stride = param::opt_usize(params, "doc_stride")?
            .flatten()
            .unwrap_or((max_seq_len / 2).min(128));
        if doc_stride > max_seq_len {
            return Err(Error::param(
                "doc_stride",
                format!("`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})"),
            ));
        }

        let mut contexts = Vec::with_capacity(inputs.len());
        let mut encs = Vec::new();
        let mut owner = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let Input::Question { question, context } = input else {
                return Err(Error::input(
                    i,
                    "question-answering needs a `{\"question\": .., \"context\": ..}` input",
                ));
            };
            if question.is_empty() {
                return Err(Error::input(i, "`question` cannot be empty"));
            }
            if context.trim().is_empty() {
                return Err(Error::input(i, "`context` cannot be empty"));
            }
            let windows =
                tok.encode_windows(question, Some(context), max_seq_len, doc_stride, true)?;
            owner.extend(std::iter::repeat_n(i, windows.len()));
            encs.extend(windows);
            contexts.push(context.as_str());
        }

        let mut logits: Vec<(Vec<f32>, Vec<f32>)> = Vec::with_capacity(encs.len());
        self.runner.run(&encs, batch_size, |_, out| {
            let rows: Vec<Vec<f32>> = out.to_vec2()?;
            let start = rows
                .iter()
                .map(|r| r.first().copied().unwrap_or(0.0))
                .collect();
            let end = rows
                .iter()
                .map(|r| r.get(1).copied().unwrap_or(0.0))
                .collect();
            logits.push((start, end));
            Ok(())
        })?;
        let mut windows: Vec<Vec<WindowLogits>> = (0..inputs.len()).map(|_| Vec::new()).collect();
        for ((enc, (start, end)), i) in encs.iter().zip(logits).zip(owner) {
            windows[i].push(WindowLogits { enc, start, end });
        }
        Ok(windows
            .iter()
            .zip(contexts)
            .map(|(w, context)| to_output(postprocess(context, w, tok.cls_id, answer)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[CLS] q q [SEP] c0 c1 c2 c3 [SEP]` over the context "aa bb cc" (c1 c2 = "b", "##b").
    fn window() -> Encoded {
        Encoded {
            ids: vec![1, 50, 51, 2, 60, 61, 62, 63, 2],
            type_ids: vec![0, 0, 0, 0, 1, 1, 1, 1, 1],
            offsets: vec![
                (0, 0),
                (0, 2),
                (3, 5),
                (0, 0),
                (0, 2),
                (3, 4),
                (4, 5),
                (6, 8),
                (0, 0),
            ],
            special_tokens_mask: vec![1, 0, 0, 1, 0, 0, 0, 0, 1],
            word_ids: vec![
                None,
                Some(0),
                Some(1),
                None,
                Some(0),
                Some(1),
                Some(1),
                Some(2),
                None,
            ],
            sequence_ids: vec![
                None,
                Some(0),
                Some(0),
                None,
                Some(1),
                Some(1),
                Some(1),
                Some(1),
                None,
            ],
            truncated: false,
        }
    }

    fn params(top_k: usize) -> AnswerParams {
        AnswerParams {
            top_k,
            max_answer_len: 15,
            handle_impossible_answer: false,
            align_to_words: true,
        }
    }

    #[test]
    fn best_span_is_mapped_to_words() {
        let enc = window();
        // Start on "##b" (inside "bb"), end on "cc": aligned to words gives "bb cc".
        let mut start = vec![0.0; 9];
        let mut end = vec![0.0; 9];
        start[6] = 10.0;
        end[7] = 10.0;
        let w = [WindowLogits {
            enc: &enc,
            start: start.clone(),
            end: end.clone(),
        }];
        let out = postprocess("aa bb cc", &w, Some(1), params(1));
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].start, out[0].end, out[0].answer.as_str()),
            (3, 8, "bb cc")
        );
        let mut p = params(1);
        p.align_to_words = false;
        let out = postprocess("aa bb cc", &w, Some(1), p);
        assert_eq!(
            (out[0].start, out[0].end, out[0].answer.as_str()),
            (4, 8, "b cc")
        );
        // Question tokens never answer, however large their logits.
        start[1] = 100.0;
        end[2] = 100.0;
        let w = [WindowLogits {
            enc: &enc,
            start,
            end,
        }];
        let out = postprocess("aa bb cc", &w, Some(1), params(1));
        assert_eq!(out[0].answer, "bb cc");
    }

    #[test]
    fn spans_respect_order_and_max_len() {
        let allowed = vec![true; 4];
        let start = [0.0, 0.1, 0.3, 0.6];
        let end = [0.0, 0.6, 0.3, 0.1];
        // Best unconstrained would be start 3 / end 1 (end before start): excluded.
        let spans = decode_spans(&start, &end, 1, 15, &allowed);
        assert_eq!((spans[0].start, spans[0].end), (2, 2));
        // max_answer_len 1: single tokens only; the tie (1,1) = (3,3) keeps row-major order.
        let spans = decode_spans(&start, &end, 3, 1, &allowed);
        let got: Vec<_> = spans.iter().map(|s| (s.start, s.end)).collect();
        assert_eq!(got, [(2, 2), (1, 1), (3, 3)]);
    }

    #[test]
    fn ties_keep_row_major_order() {
        let allowed = vec![true; 3];
        let p = [0.0, 0.5, 0.5];
        let spans = decode_spans(&p, &p, 1, 15, &allowed);
        assert_eq!((spans[0].start, spans[0].end), (1, 1));
        let spans = decode_spans(&p, &p, 3, 15, &allowed);
        let got: Vec<_> = spans.iter().map(|s| (s.start, s.end)).collect();
        assert_eq!(got, [(1, 1), (1, 2), (2, 2)]);
    }

    #[test]
    fn equal_answers_merge_and_null_answer_is_added() {
        let enc = window();
        // "b" and "##b" both align to the word "bb": their spans' scores add up.
        let mut start = vec![0.0; 9];
        let mut end = vec![0.0; 9];
        start[5] = 5.0;
        start[6] = 5.0;
        end[5] = 5.0;
        end[6] = 5.0;
        let w = [WindowLogits {
            enc: &enc,
            start: start.clone(),
            end: end.clone(),
        }];
        let out = postprocess("aa bb cc", &w, Some(1), params(3));
        let allowed = allowed_positions(&enc, Some(1));
        let masked = |xs: &[f32]| -> Vec<f32> {
            xs.iter()
                .zip(&allowed)
                .map(|(x, a)| if *a { *x } else { -10000.0 })
                .collect()
        };
        let (s, e) = (softmax_f32(&masked(&start)), softmax_f32(&masked(&end)));
        let bb = (s[5] * e[5]) as f64 + (s[5] * e[6]) as f64 + (s[6] * e[6]) as f64;
        assert_eq!(out[0].answer, "bb");
        assert!((out[0].score - bb).abs() < 1e-6, "{out:?}");
        assert_eq!(out.len(), 3);

        // Single-token answers: "bb", then "aa", "cc" and the null answer, all equal (ties keep
        // the null answer last, as Python's stable sort does).
        let mut p = params(4);
        p.handle_impossible_answer = true;
        p.max_answer_len = 1;
        let out = postprocess("aa bb cc", &w, Some(1), p);
        let got: Vec<_> = out.iter().map(|a| a.answer.as_str()).collect();
        assert_eq!(got, ["bb", "aa", "cc", ""]);
        let null = &out[3];
        assert_eq!((null.start, null.end), (0, 0));
        assert!((null.score - (s[0] * e[0]) as f64).abs() < 1e-9);
    }

    #[test]
    fn impossible_answer_wins_with_cls() {
        let enc = window();
        let mut start = vec![0.0; 9];
        let mut end = vec![0.0; 9];
        start[0] = 20.0;
        end[0] = 20.0;
        let w = [WindowLogits {
            enc: &enc,
            start,
            end,
        }];
        let mut p = params(1);
        p.handle_impossible_answer = true;
        let out = postprocess("aa bb cc", &w, Some(1), p);
        assert_eq!(out[0].answer, "");
        assert_eq!((out[0].start, out[0].end), (0, 0));
        assert!(out[0].score > 0.99);
    }

    #[test]
    fn empty_window_list_gives_no_answer() {
        assert!(postprocess("x", &[], Some(1), params(1)).is_empty());
        assert_eq!(to_output(Vec::new()), Output::Answers(Vec::new()));
        let (spans, null) = select_starts_ends(&[], &[], &[], 7.0, 1, true, 15);
        assert!(spans.is_empty());
        assert_eq!(null, 7.0);
    }

    #[test]
    fn json_inputs() {
        let o = serde_json::json!({"question": "q", "context": "c"});
        let Value::Object(o) = o else { unreachable!() };
        assert_eq!(input_from_json(&o, 0).unwrap(), Input::question("q", "c"));
        for bad in [
            serde_json::json!({"question": "q"}),
            serde_json::json!({"context": "c"}),
            serde_json::json!({"question": "q", "context": ["a", "b"]}),
            serde_json::json!({"question": "q", "context": "c", "x": 1}),
        ] {
            let Value::Object(o) = bad else {
                unreachable!()
            };
            assert!(input_from_json(&o, 3).is_err());
        }
    }
}
