//! `token-classification` (alias `ner`), as HF's `TokenClassificationPipeline` (v4.57): a softmax
//! per token, then (with an `aggregation_strategy`) tokens fused into words and B-/I- entities.
//! With `stride`, long texts are cut into overlapping windows and overlapping entities merged.

use serde::Serialize;

use super::text_classification::softmax;
use super::{param, EncoderRunner, Input, Output, Params, PipelineOptions, Task};
use crate::error::{Error, Result};
use crate::models::Head;
use crate::tokenizer::Encoded;

/// One token (`aggregation_strategy` none: `entity` and `index`) or one grouped entity
/// (`entity_group`), serialized with HF's keys in HF's order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenEntity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_group: Option<String>,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub word: String,
    /// Character offsets into the input text.
    pub start: usize,
    pub end: usize,
}

/// `aggregation_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregationStrategy {
    None,
    Simple,
    First,
    Average,
    Max,
}

impl AggregationStrategy {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "simple" => Ok(Self::Simple),
            "first" => Ok(Self::First),
            "average" => Ok(Self::Average),
            "max" => Ok(Self::Max),
            _ => Err(Error::param(
                "aggregation_strategy",
                format!("`{s}` is not one of none, simple, first, average, max"),
            )),
        }
    }
}

/// One token before aggregation (HF's "pre-entity").
#[derive(Debug, Clone, PartialEq)]
pub struct PreEntity {
    /// The token string (`##ing`, `Ġthe`), or the original text for an unknown token.
    pub word: String,
    pub scores: Vec<f32>,
    pub start: usize,
    pub end: usize,
    pub index: usize,
    pub is_subword: bool,
}

/// A token or a word with its label, before B-/I- grouping.
#[derive(Debug, Clone, PartialEq)]
struct Tagged {
    entity: String,
    score: f32,
    index: Option<usize>,
    word: String,
    start: usize,
    end: usize,
}

/// `tokenizer.convert_tokens_to_string`.
pub type JoinTokens<'a> = &'a dyn Fn(&[String]) -> Result<String>;

/// Python's `s[a:b]` on characters.
fn slice_chars(s: &[char], a: usize, b: usize) -> String {
    let b = b.min(s.len());
    if a >= b {
        return String::new();
    }
    s[a..b].iter().collect()
}

/// numpy's `argmax`: the first of equal maxima.
fn argmax(xs: &[f32]) -> usize {
    crate::kernels::cpu::rowops::argmax(xs)
}

/// `np.nanmean` in f32.
fn nanmean(xs: impl Iterator<Item = f32>) -> f32 {
    let (mut sum, mut n) = (0f32, 0usize);
    for x in xs.filter(|x| !x.is_nan()) {
        sum += x;
        n += 1;
    }
    if n == 0 {
        f32::NAN
    } else {
        sum / n as f32
    }
}

fn label(labels: &[String], i: usize) -> String {
    labels
        .get(i)
        .cloned()
        .unwrap_or_else(|| format!("LABEL_{i}"))
}

/// HF's `gather_pre_entities`: skip special tokens, attach offsets, and tell subwords apart.
/// `tokens[i]` is the token string of `enc.ids[i]`; `scores[i]` its label probabilities.
/// `word_aware`: the tokenizer marks continuations (WordPiece `##`), so a token is a subword when
/// its string and its text differ in length; otherwise HF's fallback heuristic (no space before
/// the token) applies.
pub fn gather_pre_entities(
    sentence: &[char],
    enc: &Encoded,
    tokens: &[String],
    scores: Vec<Vec<f32>>,
    word_aware: bool,
    unk_id: Option<u32>,
) -> Vec<PreEntity> {
    let mut out = Vec::new();
    for (idx, token_scores) in scores.into_iter().enumerate() {
        if enc.special_tokens_mask.get(idx).copied().unwrap_or(1) != 0 {
            continue;
        }
        let (start, end) = enc.offsets.get(idx).copied().unwrap_or((0, 0));
        let word_ref = slice_chars(sentence, start, end);
        let mut word = tokens.get(idx).cloned().unwrap_or_default();
        let mut is_subword = if word_aware {
            word.chars().count() != word_ref.chars().count()
        } else {
            start > 0 && !slice_chars(sentence, start - 1, start + 1).contains(' ')
        };
        if unk_id.is_some() && enc.ids.get(idx).copied() == unk_id {
            word = word_ref;
            is_subword = false;
        }
        out.push(PreEntity {
            word,
            scores: token_scores,
            start,
            end,
            index: idx,
            is_subword,
        });
    }
    out
}

/// HF's `aggregate_word`: one label for the tokens of a word.
fn aggregate_word(
    entities: &[PreEntity],
    strategy: AggregationStrategy,
    labels: &[String],
    join: JoinTokens,
) -> Result<Tagged> {
    let words: Vec<String> = entities.iter().map(|e| e.word.clone()).collect();
    let word = join(&words)?;
    let (idx, score) = match strategy {
        AggregationStrategy::First => {
            let s = &entities[0].scores;
            let i = argmax(s);
            (i, s[i])
        }
        AggregationStrategy::Max => {
            // Python's max(): the first entity whose best score is the largest.
            let best_of = |e: &PreEntity| e.scores.get(argmax(&e.scores)).copied();
            let mut best = &entities[0];
            for e in &entities[1..] {
                if best_of(e) > best_of(best) {
                    best = e;
                }
            }
            let i = argmax(&best.scores);
            (i, best.scores[i])
        }
        AggregationStrategy::Average => {
            let n = entities[0].scores.len();
            let avg: Vec<f32> = (0..n)
                .map(|j| {
                    nanmean(
                        entities
                            .iter()
                            .map(|e| e.scores.get(j).copied().unwrap_or(0.0)),
                    )
                })
                .collect();
            let i = argmax(&avg);
            (i, avg[i])
        }
        AggregationStrategy::None | AggregationStrategy::Simple => {
            return Err(Error::param(
                "aggregation_strategy",
                "none and simple do not aggregate words",
            ))
        }
    };
    Ok(Tagged {
        entity: label(labels, idx),
        score,
        index: None,
        word,
        start: entities[0].start,
        end: entities[entities.len() - 1].end,
    })
}

/// HF's `aggregate_words`: a word is a token followed by its subwords.
fn aggregate_words(
    pre: &[PreEntity],
    strategy: AggregationStrategy,
    labels: &[String],
    join: JoinTokens,
) -> Result<Vec<Tagged>> {
    let mut out = Vec::new();
    let mut group_start = 0;
    for i in 1..=pre.len() {
        if i == pre.len() || !pre[i].is_subword {
            if group_start < i {
                out.push(aggregate_word(
                    &pre[group_start..i],
                    strategy,
                    labels,
                    join,
                )?);
            }
            group_start = i;
        }
    }
    Ok(out)
}

/// HF's `get_tag`: `B-X` / `I-X`, anything else counts as a continuation of itself.
fn get_tag(name: &str) -> (bool, &str) {
    if let Some(t) = name.strip_prefix("B-") {
        (true, t)
    } else if let Some(t) = name.strip_prefix("I-") {
        (false, t)
    } else {
        (false, name)
    }
}

/// HF's `group_sub_entities`.
fn group_sub_entities(entities: &[Tagged], join: JoinTokens) -> Result<TokenEntity> {
    let first = &entities[0].entity;
    let group = first.split_once('-').map_or(first.as_str(), |(_, t)| t);
    let words: Vec<String> = entities.iter().map(|e| e.word.clone()).collect();
    Ok(TokenEntity {
        entity: None,
        entity_group: Some(group.to_string()),
        score: nanmean(entities.iter().map(|e| e.score)) as f64,
        index: None,
        word: join(&words)?,
        start: entities[0].start,
        end: entities[entities.len() - 1].end,
    })
}

/// HF's `group_entities`: adjacent tokens/words with the same tag, unless the next one is `B-`.
fn group_entities(entities: &[Tagged], join: JoinTokens) -> Result<Vec<TokenEntity>> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..entities.len() {
        let (is_b, tag) = get_tag(&entities[i].entity);
        let (_, last_tag) = get_tag(&entities[i - 1].entity);
        if tag != last_tag || is_b {
            groups.push(group_sub_entities(&entities[start..i], join)?);
            start = i;
        }
    }
    if start < entities.len() {
        groups.push(group_sub_entities(&entities[start..], join)?);
    }
    Ok(groups)
}

/// HF's `aggregate`: label each token (none, simple) or word (first, average, max), then group
/// into entities unless the strategy is none.
pub fn aggregate(
    pre: &[PreEntity],
    strategy: AggregationStrategy,
    labels: &[String],
    join: JoinTokens,
) -> Result<Vec<TokenEntity>> {
    let tagged: Vec<Tagged> = match strategy {
        AggregationStrategy::None | AggregationStrategy::Simple => pre
            .iter()
            .map(|p| {
                let i = argmax(&p.scores);
                Tagged {
                    entity: label(labels, i),
                    score: p.scores.get(i).copied().unwrap_or(f32::NAN),
                    index: Some(p.index),
                    word: p.word.clone(),
                    start: p.start,
                    end: p.end,
                }
            })
            .collect(),
        _ => aggregate_words(pre, strategy, labels, join)?,
    };
    if strategy == AggregationStrategy::None {
        return Ok(tagged
            .into_iter()
            .map(|t| TokenEntity {
                entity: Some(t.entity),
                entity_group: None,
                score: t.score as f64,
                index: t.index,
                word: t.word,
                start: t.start,
                end: t.end,
            })
            .collect());
    }
    group_entities(&tagged, join)
}

/// Drop entities whose label (or group) is in `ignore_labels`.
pub fn filter_ignored(entities: Vec<TokenEntity>, ignore_labels: &[String]) -> Vec<TokenEntity> {
    entities
        .into_iter()
        .filter(|e| {
            let name = e.entity.as_ref().or(e.entity_group.as_ref());
            !name.is_some_and(|n| ignore_labels.contains(n))
        })
        .collect()
}

/// HF's `aggregate_overlapping_entities` (windows from `stride`): sorted by start, an entity that
/// starts inside the previous one replaces it when longer, or as long with a higher score.
/// Like HF, the first entity is also compared with itself, so a leading empty span is kept twice.
pub fn aggregate_overlapping_entities(mut entities: Vec<TokenEntity>) -> Vec<TokenEntity> {
    if entities.is_empty() {
        return entities;
    }
    entities.sort_by_key(|e| e.start);
    let mut out = Vec::new();
    let mut previous = entities[0].clone();
    for entity in entities {
        if previous.start <= entity.start && entity.start < previous.end {
            let current_length = entity.end as i64 - entity.start as i64;
            let previous_length = previous.end as i64 - previous.start as i64;
            if current_length > previous_length
                || (current_length == previous_length && entity.score > previous.score)
            {
                previous = entity;
            }
        } else {
            out.push(std::mem::replace(&mut previous, entity));
        }
    }
    out.push(previous);
    out
}

pub(crate) struct TokenClassification {
    runner: EncoderRunner,
    word_aware: bool,
}

impl TokenClassification {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        let runner = EncoderRunner::load(
            opts,
            model,
            Head::TokenClassification,
            "token-classification",
        )?;
        let word_aware = runner.tokenizer.has_subword_prefix();
        Ok(Self { runner, word_aware })
    }

    /// `aggregation_strategy` as given (`None` when absent), with HF's deprecated
    /// `grouped_entities` / `ignore_subwords` taking precedence as they do in HF.
    fn strategy(params: &Params) -> Result<Option<AggregationStrategy>> {
        let grouped = param::opt_bool(params, "grouped_entities")?;
        let ignore_subwords = param::opt_bool(params, "ignore_subwords")?;
        if grouped.is_some() || ignore_subwords.is_some() {
            let g = grouped.unwrap_or(false);
            return Ok(Some(match (g, ignore_subwords.unwrap_or(false)) {
                (true, true) => AggregationStrategy::First,
                (true, false) => AggregationStrategy::Simple,
                _ => AggregationStrategy::None,
            }));
        }
        param::opt_str(params, "aggregation_strategy")?
            .map(AggregationStrategy::parse)
            .transpose()
    }
}

impl Task for TokenClassification {
    fn accepted_params(&self) -> &'static [&'static str] {
        &[
            "aggregation_strategy",
            "ignore_labels",
            "stride",
            "grouped_entities",
            "ignore_subwords",
        ]
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        let explicit = Self::strategy(params)?;
        let strategy = explicit.unwrap_or(AggregationStrategy::None);
        let ignore_labels =
            param::opt_str_list(params, "ignore_labels")?.unwrap_or_else(|| vec!["O".into()]);
        let tok = &self.runner.tokenizer;
        let stride = param::opt_usize(params, "stride")?.flatten();
        if let Some(stride) = stride {
            if stride >= tok.max_length {
                return Err(Error::param(
                    "stride",
                    format!(
                        "must be less than the model's maximum length ({}), minus its special tokens",
                        tok.max_length
                    ),
                ));
            }
            // HF refuses an explicit "none" with a stride, but not an absent strategy.
            if explicit == Some(AggregationStrategy::None) {
                return Err(Error::param(
                    "stride",
                    "`stride` needs an `aggregation_strategy` other than \"none\"",
                ));
            }
        }

        let mut texts = Vec::with_capacity(inputs.len());
        let mut encs = Vec::new();
        let mut owner = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let (text, pair) = input.text_and_pair(i)?;
            if pair.is_some() {
                return Err(Error::input(
                    i,
                    "token-classification takes a single text, not a text pair",
                ));
            }
            let windows = match stride {
                Some(s) => tok.encode_windows(text, None, tok.max_length, s, false)?,
                None => vec![tok.encode(text, None)?],
            };
            owner.extend(std::iter::repeat_n(i, windows.len()));
            encs.extend(windows);
            texts.push(text.chars().collect::<Vec<char>>());
        }

        let labels = &self.runner.config.id2label;
        let join = |tokens: &[String]| tok.convert_tokens_to_string(tokens);
        let mut entities: Vec<Vec<TokenEntity>> = vec![Vec::new(); inputs.len()];
        let mut windows = vec![0usize; inputs.len()];
        self.runner.run(&encs, batch_size, |k, logits| {
            let (enc, i) = (&encs[k], owner[k]);
            let rows: Vec<Vec<f32>> = logits.to_vec2()?;
            let scores = rows.iter().map(|r| softmax(r)).collect();
            let tokens: Vec<String> = enc
                .ids
                .iter()
                .map(|id| tok.id_to_token(*id).unwrap_or_default())
                .collect();
            let pre =
                gather_pre_entities(&texts[i], enc, &tokens, scores, self.word_aware, tok.unk_id);
            let grouped = aggregate(&pre, strategy, labels, &join)?;
            entities[i].extend(filter_ignored(grouped, &ignore_labels));
            windows[i] += 1;
            Ok(())
        })?;
        Ok(entities
            .into_iter()
            .zip(windows)
            .map(|(e, n)| {
                Output::Entities(if n > 1 {
                    aggregate_overlapping_entities(e)
                } else {
                    e
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// A WordPiece-like join: `##` glues, anything else gets a space.
    fn join(tokens: &[String]) -> Result<String> {
        let mut s = String::new();
        for (i, t) in tokens.iter().enumerate() {
            match t.strip_prefix("##") {
                Some(rest) if i > 0 => s.push_str(rest),
                _ => {
                    if i > 0 {
                        s.push(' ');
                    }
                    s.push_str(t);
                }
            }
        }
        Ok(s)
    }

    fn one_hot(label: usize, p: f32) -> Vec<f32> {
        let rest = (1.0 - p) / 4.0;
        (0..5).map(|i| if i == label { p } else { rest }).collect()
    }

    fn pre(word: &str, label: usize, p: f32, span: (usize, usize), index: usize) -> PreEntity {
        PreEntity {
            word: word.into(),
            scores: one_hot(label, p),
            start: span.0,
            end: span.1,
            index,
            is_subword: word.starts_with("##"),
        }
    }

    /// "John Smith lives in New York": John=B-PER, Sm=I-PER, ##ith=B-LOC, ..
    fn sample() -> Vec<PreEntity> {
        vec![
            pre("john", 1, 0.9, (0, 4), 1),
            pre("sm", 2, 0.8, (5, 7), 2),
            pre("##ith", 3, 0.6, (7, 10), 3),
            pre("lives", 0, 0.9, (11, 16), 4),
            pre("new", 3, 0.7, (20, 23), 5),
            pre("york", 4, 0.5, (24, 28), 6),
        ]
    }

    #[test]
    fn none_keeps_tokens() {
        let out = aggregate(&sample(), AggregationStrategy::None, &labels(), &join).unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(out[2].entity.as_deref(), Some("B-LOC"));
        assert_eq!(out[2].index, Some(3));
        assert_eq!(out[2].word, "##ith");
        let kept = filter_ignored(out, &["O".to_string()]);
        assert_eq!(kept.len(), 5);
        let json = serde_json::to_string(&kept[0]).unwrap();
        assert_eq!(
            json,
            r#"{"entity":"B-PER","score":0.8999999761581421,"index":1,"word":"john","start":0,"end":4}"#
        );
    }

    #[test]
    fn simple_groups_b_i() {
        let out = aggregate(&sample(), AggregationStrategy::Simple, &labels(), &join).unwrap();
        let got: Vec<_> = out
            .iter()
            .map(|e| {
                (
                    e.entity_group.clone().unwrap(),
                    e.word.as_str(),
                    e.start,
                    e.end,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("PER".to_string(), "john sm", 0, 7),
                ("LOC".to_string(), "##ith", 7, 10),
                ("O".to_string(), "lives", 11, 16),
                ("LOC".to_string(), "new york", 20, 28),
            ]
        );
        assert!((out[0].score - (0.9f32 + 0.8f32) as f64 / 2.0).abs() < 1e-6);
        let json = serde_json::to_string(&out[3]).unwrap();
        assert!(
            json.starts_with(r#"{"entity_group":"LOC","score":"#),
            "{json}"
        );
        assert!(!json.contains("index"));
    }

    #[test]
    fn word_strategies() {
        let labels = labels();
        let first = aggregate(&sample(), AggregationStrategy::First, &labels, &join).unwrap();
        // "smith" takes the label of "sm" (I-PER) and joins "john".
        assert_eq!(first[0].word, "john smith");
        assert_eq!((first[0].start, first[0].end), (0, 10));
        assert_eq!(first[0].entity_group.as_deref(), Some("PER"));

        let max = aggregate(&sample(), AggregationStrategy::Max, &labels, &join).unwrap();
        // max(0.8 I-PER, 0.6 B-LOC) -> I-PER, so the same grouping as first.
        assert_eq!(max[0].word, "john smith");

        // average of sm (I-PER .8) and ##ith (B-LOC .6): I-PER wins with (0.8 + 0.1) / 2.
        let avg = aggregate(&sample(), AggregationStrategy::Average, &labels, &join).unwrap();
        assert_eq!(avg[0].word, "john smith");
        let smith = (0.8f32 + 0.1f32) / 2.0;
        assert!((avg[0].score - ((0.9f32 + smith) / 2.0) as f64).abs() < 1e-6);
    }

    #[test]
    fn ties_take_the_first_label_and_entity() {
        let tie = PreEntity {
            word: "x".into(),
            scores: vec![0.1, 0.3, 0.3, 0.15, 0.15],
            start: 0,
            end: 1,
            index: 1,
            is_subword: false,
        };
        let out = aggregate(
            std::slice::from_ref(&tie),
            AggregationStrategy::None,
            &labels(),
            &join,
        )
        .unwrap();
        assert_eq!(out[0].entity.as_deref(), Some("B-PER"));
        // max strategy with equal maxima picks the first token of the word.
        let mut sub = tie.clone();
        sub.word = "##y".into();
        sub.is_subword = true;
        sub.scores = vec![0.1, 0.15, 0.15, 0.3, 0.3];
        let out = aggregate(&[tie, sub], AggregationStrategy::Max, &labels(), &join).unwrap();
        assert_eq!(out[0].entity_group.as_deref(), Some("PER"));
        assert_eq!(out[0].word, "xy");
    }

    #[test]
    fn empty_inputs_give_empty_outputs() {
        for s in [
            AggregationStrategy::None,
            AggregationStrategy::Simple,
            AggregationStrategy::First,
            AggregationStrategy::Average,
            AggregationStrategy::Max,
        ] {
            assert!(aggregate(&[], s, &labels(), &join).unwrap().is_empty());
        }
        assert!(aggregate_overlapping_entities(Vec::new()).is_empty());
        let all_o = aggregate(
            &sample()[3..4],
            AggregationStrategy::Simple,
            &labels(),
            &join,
        );
        assert!(filter_ignored(all_o.unwrap(), &["O".into()]).is_empty());
    }

    fn ent(start: usize, end: usize, score: f64) -> TokenEntity {
        TokenEntity {
            entity: None,
            entity_group: Some("PER".into()),
            score,
            index: None,
            word: format!("{start}-{end}"),
            start,
            end,
        }
    }

    #[test]
    fn overlapping_entities_keep_the_longest_then_best() {
        let out = aggregate_overlapping_entities(vec![
            ent(10, 14, 0.5),
            ent(0, 4, 0.5),
            ent(2, 8, 0.1),   // overlaps 0-4 and is longer
            ent(10, 14, 0.7), // same span, higher score
            ent(20, 22, 0.3),
        ]);
        let spans: Vec<_> = out.iter().map(|e| (e.start, e.end, e.score)).collect();
        assert_eq!(spans, [(2, 8, 0.1), (10, 14, 0.7), (20, 22, 0.3)]);
        // HF compares the first entity with itself: an empty first span is kept twice.
        let out = aggregate_overlapping_entities(vec![ent(3, 3, 0.2), ent(5, 6, 0.2)]);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn pre_entities_skip_specials_and_detect_subwords() {
        let sentence: Vec<char> = "Zürich ok".chars().collect();
        let enc = Encoded {
            ids: vec![101, 7, 8, 100, 102],
            type_ids: vec![0; 5],
            offsets: vec![(0, 0), (0, 3), (3, 6), (7, 9), (0, 0)],
            special_tokens_mask: vec![1, 0, 0, 0, 1],
            word_ids: vec![None, Some(0), Some(0), Some(1), None],
            sequence_ids: vec![None, Some(0), Some(0), Some(0), None],
            truncated: false,
        };
        let tokens: Vec<String> = ["[CLS]", "zur", "##ich", "[UNK]", "[SEP]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = vec![one_hot(0, 0.5); 5];
        let pre = gather_pre_entities(&sentence, &enc, &tokens, scores.clone(), true, Some(100));
        let got: Vec<_> = pre
            .iter()
            .map(|p| (p.word.as_str(), p.index, p.is_subword))
            .collect();
        assert_eq!(
            got,
            [("zur", 1, false), ("##ich", 2, true), ("ok", 3, false)]
        );
        // Without a subword prefix: a token is a subword when no space precedes it.
        let pre = gather_pre_entities(&sentence, &enc, &tokens, scores, false, None);
        let got: Vec<_> = pre.iter().map(|p| p.is_subword).collect();
        assert_eq!(got, [false, true, false]);
    }

    #[test]
    fn strategy_names() {
        assert_eq!(
            AggregationStrategy::parse("SIMPLE").unwrap(),
            AggregationStrategy::Simple
        );
        assert!(AggregationStrategy::parse("mean").is_err());
    }
}
