//! Training data, with HF datasets' column names (overridable), every problem reported with the
//! file and line before training starts:
//! - text classification: JSON Lines (or a JSON array) and CSV/TSV files, `text`, optional
//!   `text_pair`, `label` as a string, an integer, a float (regression) or a list (multi-label);
//! - token classification: JSON Lines / array, `tokens` (words) and `ner_tags` (a tag per word,
//!   strings or integers);
//! - question answering: JSON Lines / array (`id`, `question`, `context`,
//!   `answers: {text: [..], answer_start: [..]}`) or SQuAD's nested JSON (`data` / `paragraphs`
//!   / `qas`).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// What a model is trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    TextClassification,
    TokenClassification,
    QuestionAnswering,
}

impl Task {
    /// A pipeline task name (or alias) as the CLI takes it.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "text-classification" | "sentiment-analysis" => Task::TextClassification,
            "token-classification" | "ner" => Task::TokenClassification,
            "question-answering" => Task::QuestionAnswering,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::TextClassification => "text-classification",
            Task::TokenClassification => "token-classification",
            Task::QuestionAnswering => "question-answering",
        }
    }
}

/// Which columns hold what. Token classification reads words from `text` and tags from
/// `label`; question answering the question from `text`, the context from `text_pair` and
/// the answers from `label` (see [`Columns::for_task`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            text: "text".into(),
            text_pair: None,
            label: "label".into(),
        }
    }
}

impl Columns {
    /// HF's column names for a task: `text`/`label`; `tokens`/`ner_tags` (`run_ner`);
    /// `question`/`context`/`answers` (`run_qa`).
    pub fn for_task(task: Task) -> Self {
        match task {
            Task::TextClassification => Columns::default(),
            Task::TokenClassification => Columns {
                text: "tokens".into(),
                text_pair: None,
                label: "ner_tags".into(),
            },
            Task::QuestionAnswering => Columns {
                text: "question".into(),
                text_pair: Some("context".into()),
                label: "answers".into(),
            },
        }
    }
}

/// A label as the file gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawLabel {
    Name(String),
    Int(i64),
    Float(f64),
    List(Vec<String>),
}

/// One example and where it came from (1-based line; CSV: the record's first line).
#[derive(Debug, Clone)]
pub struct Example {
    pub text: String,
    pub pair: Option<String>,
    pub label: RawLabel,
    pub line: usize,
}

/// What the labels make of the task (HF's `problem_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    SingleLabel,
    MultiLabel,
    Regression,
}

impl Problem {
    pub fn name(self) -> &'static str {
        match self {
            Problem::SingleLabel => "single_label_classification",
            Problem::MultiLabel => "multi_label_classification",
            Problem::Regression => "regression",
        }
    }
}

/// The label set fixed by the training file.
#[derive(Debug, Clone)]
pub struct LabelSet {
    pub problem: Problem,
    /// Names by id (regression: one unnamed output, `LABEL_0`).
    pub names: Vec<String>,
}

/// A label as the loss takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Class(u32),
    Value(f32),
    Multi(Vec<f32>),
    /// A class per token, -100 where no loss is taken (special tokens, later sub-tokens).
    Tags(Vec<i64>),
    /// The answer's first and last token (the CLS token when the window lacks it).
    Span(u32, u32),
}

/// One token-classification example: words and a tag per word.
#[derive(Debug, Clone)]
pub struct TokenExample {
    pub words: Vec<String>,
    pub tags: Vec<RawLabel>,
    pub line: usize,
}

/// One question-answering example; answers as (text, start in characters of `context`).
#[derive(Debug, Clone)]
pub struct QaExample {
    pub id: String,
    pub question: String,
    pub context: String,
    pub answers: Vec<(String, usize)>,
    pub line: usize,
}

fn err(path: &Path, line: usize, detail: impl std::fmt::Display) -> Error {
    Error::invalid_file(path, format!("line {line}: {detail}"))
}

/// Read every example of `path` (`.csv`/`.tsv` as delimited text with a header, anything else
/// as JSON Lines or one JSON array of objects).
pub fn read_examples(path: &Path, cols: &Columns) -> Result<Vec<Example>> {
    read_rows(path)?
        .into_iter()
        .map(|(line, row)| example(path, line, &row, cols))
        .collect()
}

/// A data file's text: a UTF-8 byte-order mark at its start is skipped (as HF datasets'
/// readers skip it); UTF-16 or bytes that are not UTF-8 are an error naming the line.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = match bytes.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) => rest.to_vec(),
        None => bytes,
    };
    if bytes.starts_with(b"\xff\xfe") || bytes.starts_with(b"\xfe\xff") {
        return Err(Error::invalid_file(
            path,
            "UTF-16 text (it starts with a UTF-16 byte-order mark): training data must be UTF-8",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
        err(
            path,
            line,
            format!(
                "not UTF-8 text (an invalid byte at column {column}): training data must be UTF-8"
            ),
        )
    })
}

/// The rows of a data file with their line numbers; an empty file is an error.
fn read_rows(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = read_text(path)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let rows: Vec<(usize, Value)> = match ext.as_str() {
        "csv" => read_delimited(path, &text, b',')?,
        "tsv" => read_delimited(path, &text, b'\t')?,
        _ => read_json_rows(path, &text)?,
    };
    if rows.is_empty() {
        return Err(Error::invalid_file(path, "no examples (the file is empty)"));
    }
    Ok(rows)
}

fn object<'a>(
    path: &Path,
    line: usize,
    row: &'a Value,
) -> Result<&'a serde_json::Map<String, Value>> {
    row.as_object()
        .ok_or_else(|| err(path, line, "not an object with named columns"))
}

fn column<'a>(
    path: &Path,
    line: usize,
    obj: &'a serde_json::Map<String, Value>,
    col: &str,
) -> Result<&'a Value> {
    obj.get(col).ok_or_else(|| {
        let names = obj.keys().cloned().collect::<Vec<_>>().join(", ");
        err(path, line, format!("no `{col}` column (columns: {names})"))
    })
}

fn string_column(
    path: &Path,
    line: usize,
    obj: &serde_json::Map<String, Value>,
    col: &str,
) -> Result<String> {
    match column(path, line, obj, col)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(err(
            path,
            line,
            format!("column `{col}` is not a string: {other}"),
        )),
    }
}

/// Token-classification examples (`run_ner`'s layout): a list of words and a tag per word.
pub fn read_token_examples(path: &Path, cols: &Columns) -> Result<Vec<TokenExample>> {
    read_rows(path)?
        .into_iter()
        .map(|(line, row)| {
            let obj = object(path, line, &row)?;
            let words = match column(path, line, obj, &cols.text)? {
                Value::Array(w) => w
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>(),
                _ => None,
            }
            .ok_or_else(|| {
                err(
                    path,
                    line,
                    format!("column `{}` is not a list of words", cols.text),
                )
            })?;
            let tags = match column(path, line, obj, &cols.label)? {
                Value::Array(t) => t
                    .iter()
                    .map(|x| match raw_label(x, false) {
                        Some(l @ (RawLabel::Name(_) | RawLabel::Int(_))) => Some(l),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>(),
                _ => None,
            }
            .ok_or_else(|| {
                err(
                    path,
                    line,
                    format!(
                        "column `{}` is not a list of tags (strings or integers)",
                        cols.label
                    ),
                )
            })?;
            if words.len() != tags.len() {
                return Err(err(
                    path,
                    line,
                    format!(
                        "{} words but {} tags: every word needs one tag",
                        words.len(),
                        tags.len()
                    ),
                ));
            }
            if words.iter().any(|w| w.is_empty()) {
                return Err(err(path, line, "an empty word"));
            }
            Ok(TokenExample { words, tags, line })
        })
        .collect()
}

/// Question-answering examples: SQuAD's nested JSON (`{"data": [{"paragraphs": [{"context",
/// "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}`), or one row per
/// question in HF datasets' layout (`answers: {"text": [..], "answer_start": [..]}`). Answer
/// starts count characters; an answer that is not the context's text at its start is an error.
pub fn read_qa_examples(path: &Path, cols: &Columns) -> Result<Vec<QaExample>> {
    let text = read_text(path)?;
    let context_col = cols.text_pair.as_deref().unwrap_or("context");
    let mut out = Vec::new();
    if text.trim_start().starts_with('{') {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            if let Some(data) = v.get("data").and_then(Value::as_array) {
                // The line of each question: where its id first appears (serde_json keeps no
                // positions).
                let line_of = |id: &str| {
                    let needle = serde_json::to_string(id).unwrap_or_default();
                    text.find(&needle)
                        .map_or(1, |at| text[..at].matches('\n').count() + 1)
                };
                for article in data {
                    let paragraphs = article.get("paragraphs").and_then(Value::as_array);
                    for par in paragraphs.into_iter().flatten() {
                        let context = par.get("context").and_then(Value::as_str).unwrap_or("");
                        for qa in par
                            .get("qas")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            let id = match qa.get("id") {
                                Some(Value::String(s)) => s.clone(),
                                Some(v) => v.to_string(),
                                None => String::new(),
                            };
                            let line = line_of(&id);
                            let mut row = serde_json::Map::new();
                            row.insert("id".into(), json!(id));
                            row.insert(
                                cols.text.clone(),
                                qa.get("question").cloned().unwrap_or(Value::Null),
                            );
                            row.insert(context_col.into(), json!(context));
                            let answers = qa.get("answers").and_then(Value::as_array);
                            let (mut texts, mut starts) = (Vec::new(), Vec::new());
                            for a in answers.into_iter().flatten() {
                                texts.push(a.get("text").cloned().unwrap_or(Value::Null));
                                starts.push(a.get("answer_start").cloned().unwrap_or(Value::Null));
                            }
                            row.insert(
                                cols.label.clone(),
                                json!({"text": texts, "answer_start": starts}),
                            );
                            out.push(qa_example(path, line, &Value::Object(row), cols)?);
                        }
                    }
                }
                if out.is_empty() {
                    return Err(Error::invalid_file(path, "no questions in `data`"));
                }
                return Ok(out);
            }
        }
    }
    read_rows(path)?
        .into_iter()
        .map(|(line, row)| qa_example(path, line, &row, cols))
        .collect()
}

fn qa_example(path: &Path, line: usize, row: &Value, cols: &Columns) -> Result<QaExample> {
    let obj = object(path, line, row)?;
    let context_col = cols.text_pair.as_deref().unwrap_or("context");
    let question = string_column(path, line, obj, &cols.text)?;
    let context = string_column(path, line, obj, context_col)?;
    if question.trim().is_empty() || context.trim().is_empty() {
        return Err(err(path, line, "an empty question or context"));
    }
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(v) if !v.is_null() => v.to_string(),
        _ => line.to_string(),
    };
    let answers = column(path, line, obj, &cols.label)?;
    let bad = |d: &str| err(path, line, format!("column `{}`: {d}", cols.label));
    let texts = answers
        .get("text")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `text` list"))?;
    let starts = answers
        .get("answer_start")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `answer_start` list"))?;
    if texts.len() != starts.len() {
        return Err(bad("`text` and `answer_start` differ in length"));
    }
    let chars: Vec<char> = context.chars().collect();
    let mut out = Vec::new();
    for (t, s) in texts.iter().zip(starts) {
        let t = t
            .as_str()
            .ok_or_else(|| bad("an answer text is not a string"))?;
        let s = s
            .as_u64()
            .ok_or_else(|| bad("an answer_start is not a whole number"))? as usize;
        let n = t.chars().count();
        if t.is_empty() || s + n > chars.len() {
            return Err(err(
                path,
                line,
                format!(
                    "answer `{t}` at character {s} is outside the context ({} characters)",
                    chars.len()
                ),
            ));
        }
        let found: String = chars[s..s + n].iter().collect();
        if found != t {
            return Err(err(
                path,
                line,
                format!("answer `{t}` is not the context's text at character {s} (`{found}`)"),
            ));
        }
        out.push((t.to_string(), s));
    }
    Ok(QaExample {
        id,
        question,
        context,
        answers: out,
        line,
    })
}

fn read_json_rows(path: &Path, text: &str) -> Result<Vec<(usize, Value)>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| err(path, e.line(), format!("not JSON ({e})")))?;
        // A JSON array: one example per element; "line" is the element's number.
        return Ok(v
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect());
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| err(path, i + 1, format!("not JSON ({e})")))?;
        rows.push((i + 1, v));
    }
    Ok(rows)
}

/// RFC 4180 records: quoted fields may hold the delimiter, quotes (doubled) and newlines.
fn read_delimited(path: &Path, text: &str, delim: u8) -> Result<Vec<(usize, Value)>> {
    let mut records: Vec<(usize, Vec<String>)> = Vec::new();
    let (mut field, mut record) = (String::new(), Vec::new());
    let (mut quoted, mut line, mut start) = (false, 1usize, 1usize);
    let mut chars = text.chars().peekable();
    let d = delim as char;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            c if c == d => record.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                if !(record.len() == 1 && record[0].is_empty()) {
                    records.push((start, std::mem::take(&mut record)));
                }
                record.clear();
                line += 1;
                start = line;
                any = false;
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(err(path, start, "a quoted field is not closed"));
    }
    if any {
        record.push(field);
        if !(record.len() == 1 && record[0].is_empty()) {
            records.push((start, record));
        }
    }
    let mut it = records.into_iter();
    let Some((_, header)) = it.next() else {
        return Ok(Vec::new());
    };
    it.map(|(line, rec)| {
        if rec.len() != header.len() {
            return Err(err(
                path,
                line,
                format!("{} fields, the header has {}", rec.len(), header.len()),
            ));
        }
        let obj: serde_json::Map<String, Value> = header
            .iter()
            .zip(rec)
            .map(|(h, v)| (h.clone(), Value::String(v)))
            .collect();
        Ok((line, Value::Object(obj)))
    })
    .collect()
}

fn example(path: &Path, line: usize, row: &Value, cols: &Columns) -> Result<Example> {
    let obj = object(path, line, row)?;
    let text = string_column(path, line, obj, &cols.text)?;
    let pair = match &cols.text_pair {
        Some(c) => Some(string_column(path, line, obj, c)?),
        None => None,
    };
    let v = column(path, line, obj, &cols.label)?;
    let label = raw_label(
        v,
        path.extension().is_some_and(|e| e == "csv" || e == "tsv"),
    )
    .ok_or_else(|| {
        err(
            path,
            line,
            format!(
                "label {v} is not a string, a number or a list of labels (`{}`)",
                cols.label
            ),
        )
    })?;
    Ok(Example {
        text,
        pair,
        label,
        line,
    })
}

/// A JSON label (or a CSV cell, which is text: numbers are read as numbers).
fn raw_label(v: &Value, from_text: bool) -> Option<RawLabel> {
    match v {
        Value::String(s) if from_text => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                Some(RawLabel::Int(i))
            } else if let Ok(f) = t.parse::<f64>() {
                f.is_finite().then_some(RawLabel::Float(f))
            } else {
                (!t.is_empty()).then(|| RawLabel::Name(t.to_string()))
            }
        }
        Value::String(s) => (!s.is_empty()).then(|| RawLabel::Name(s.clone())),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(RawLabel::Int(i))
            } else {
                n.as_f64().filter(|f| f.is_finite()).map(RawLabel::Float)
            }
        }
        Value::Array(items) => items
            .iter()
            .map(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => n.as_i64().map(|i| i.to_string()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(RawLabel::List),
        _ => None,
    }
}

/// The label names a raw label holds (an integer as its digits; none for a float).
fn label_names(l: &RawLabel) -> Vec<String> {
    match l {
        RawLabel::Name(n) => vec![n.clone()],
        RawLabel::Int(i) => vec![i.to_string()],
        RawLabel::Float(_) => Vec::new(),
        RawLabel::List(v) => v.clone(),
    }
}

/// A label as the file wrote it, as JSON (`"positive"`, `7`, `["a","b"]`).
pub fn label_json(l: &RawLabel) -> String {
    match l {
        RawLabel::Name(n) => Value::String(n.clone()).to_string(),
        RawLabel::Int(i) => i.to_string(),
        RawLabel::Float(f) => json!(f).to_string(),
        RawLabel::List(v) => json!(v).to_string(),
    }
}

/// The error for training labels that do not fit the base model's classifier (`rows`
/// classes, named `model_names` when the config names one per row): the labels the model
/// lacks, each with the line it first appears on (or the model's labels the data lacks), both
/// label sets, and the way out (`--ignore-mismatched-sizes`).
pub fn head_mismatch_error(
    path: &Path,
    ex: &[(usize, &RawLabel)],
    set: &LabelSet,
    model_names: &[String],
    rows: usize,
) -> Error {
    let model_names: Vec<String> = if model_names.len() == rows {
        model_names.to_vec()
    } else {
        (0..rows).map(|i| format!("LABEL_{i}")).collect()
    };
    let ints = ex.iter().any(|(_, l)| matches!(l, RawLabel::Int(_)));
    let has = |n: &str| {
        if ints {
            n.parse::<usize>().is_ok_and(|i| i < rows)
        } else {
            model_names.iter().any(|m| m == n)
        }
    };
    let mut missing: Vec<(String, usize)> = Vec::new();
    for &(line, l) in ex {
        for n in label_names(l) {
            if !has(&n) && !missing.iter().any(|(m, _)| *m == n) {
                missing.push((n, line));
            }
        }
    }
    let model = if ints {
        let named: Vec<String> = model_names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i} {n}"))
            .collect();
        format!("{rows} classes (ids {})", named.join(", "))
    } else {
        format!("{rows} labels ({})", model_names.join(", "))
    };
    let data = if ints {
        format!(
            "{} classes (ids 0-{})",
            set.names.len(),
            set.names.len() - 1
        )
    } else {
        format!("{} labels ({})", set.names.len(), set.names.join(", "))
    };
    let fix = "--ignore-mismatched-sizes trains a fresh head for the data's labels";
    match missing.split_first() {
        Some(((first, line), rest)) => {
            let also = if rest.is_empty() {
                String::new()
            } else {
                let more: Vec<String> = rest
                    .iter()
                    .take(5)
                    .map(|(n, l)| format!("`{n}` on line {l}"))
                    .collect();
                let etc = if rest.len() > 5 { ", ..." } else { "" };
                format!(" (also {}{etc})", more.join(", "))
            };
            err(
                path,
                *line,
                format!(
                    "label `{first}`{also} is not one of the model's labels: the model's \
                     classifier has {model}, the data has {data}; {fix}"
                ),
            )
        }
        None => {
            let absent: Vec<&str> = model_names
                .iter()
                .filter(|m| !set.names.contains(m))
                .map(String::as_str)
                .collect();
            Error::invalid_file(
                path,
                format!(
                    "the data has {data}, the model's classifier has {model} (never in the \
                     data: {}); {fix}",
                    absent.join(", ")
                ),
            )
        }
    }
}

impl LabelSet {
    /// The labels of the training examples: names sorted (as HF's `run_classification` and
    /// `run_ner`; the base model's order when it has exactly these names, so its head goes on
    /// meaning what it meant), integers as ids (names from `base_names` when it has one per id,
    /// else `LABEL_i`), floats as regression, lists as multi-label. Mixed kinds are an error
    /// naming the line.
    /// Fewer than two distinct labels is an error, as in `run_classification` ("You need more
    /// than one label to do classification").
    pub fn from_examples(path: &Path, ex: &[Example], base_names: &[String]) -> Result<Self> {
        let labels: Vec<(usize, &RawLabel)> = ex.iter().map(|e| (e.line, &e.label)).collect();
        let set = Self::from_labels(path, &labels, base_names)?;
        if set.problem != Problem::Regression {
            let distinct: BTreeSet<String> =
                labels.iter().flat_map(|(_, l)| label_names(l)).collect();
            if distinct.len() < 2 {
                let only = distinct
                    .iter()
                    .next()
                    .map_or("no label".to_string(), |l| format!("the label `{l}`"));
                return Err(err(
                    path,
                    ex[0].line,
                    format!(
                        "every example has {only}: classification needs at least two \
                         distinct labels"
                    ),
                ));
            }
        }
        Ok(set)
    }

    /// The tag set of token-classification examples (as [`LabelSet::from_examples`]).
    pub fn from_tags(path: &Path, ex: &[TokenExample], base_names: &[String]) -> Result<Self> {
        let labels: Vec<(usize, &RawLabel)> = ex
            .iter()
            .flat_map(|e| e.tags.iter().map(move |t| (e.line, t)))
            .collect();
        if labels.is_empty() {
            return Err(Error::invalid_file(path, "no tags: every example is empty"));
        }
        Self::from_labels(path, &labels, base_names)
    }

    fn from_labels(path: &Path, ex: &[(usize, &RawLabel)], base_names: &[String]) -> Result<Self> {
        let (first_line, first) = ex[0];
        let kind = |l: &RawLabel| match l {
            RawLabel::Name(_) => 0,
            RawLabel::Int(_) | RawLabel::Float(_) => 1,
            RawLabel::List(_) => 2,
        };
        for &(line, label) in ex {
            if kind(label) != kind(first) {
                return Err(err(
                    path,
                    line,
                    format!(
                        "label {} is of another kind than line {first_line}'s {}",
                        label_json(label),
                        label_json(first)
                    ),
                ));
            }
        }
        let base_is_named = !base_names.is_empty()
            && base_names
                .iter()
                .enumerate()
                .any(|(i, n)| *n != format!("LABEL_{i}"));
        match first {
            RawLabel::Name(_) => {
                let set: BTreeSet<&str> = ex
                    .iter()
                    .filter_map(|(_, l)| match l {
                        RawLabel::Name(n) => Some(n.as_str()),
                        _ => None,
                    })
                    .collect();
                let base: BTreeSet<&str> = base_names.iter().map(String::as_str).collect();
                let names = if base_is_named && base == set && base.len() == base_names.len() {
                    base_names.to_vec()
                } else {
                    set.into_iter().map(str::to_string).collect()
                };
                Ok(LabelSet {
                    problem: Problem::SingleLabel,
                    names,
                })
            }
            RawLabel::List(_) => {
                let set: BTreeSet<&str> = ex
                    .iter()
                    .flat_map(|(_, l)| match l {
                        RawLabel::List(l) => l.iter().map(String::as_str).collect(),
                        _ => Vec::new(),
                    })
                    .collect();
                if set.is_empty() {
                    return Err(err(path, first_line, "every label list is empty"));
                }
                Ok(LabelSet {
                    problem: Problem::MultiLabel,
                    names: set.into_iter().map(str::to_string).collect(),
                })
            }
            _ => {
                if ex.iter().any(|(_, l)| matches!(l, RawLabel::Float(_))) {
                    return Ok(LabelSet {
                        problem: Problem::Regression,
                        names: vec!["LABEL_0".into()],
                    });
                }
                let mut max = 0i64;
                for &(line, l) in ex {
                    if let RawLabel::Int(i) = *l {
                        if i < 0 {
                            return Err(err(
                                path,
                                line,
                                format!("label {i}: class ids start at 0"),
                            ));
                        }
                        max = max.max(i);
                    }
                }
                let n = max as usize + 1;
                let names = if base_names.len() == n {
                    base_names.to_vec()
                } else {
                    (0..n).map(|i| format!("LABEL_{i}")).collect()
                };
                Ok(LabelSet {
                    problem: Problem::SingleLabel,
                    names,
                })
            }
        }
    }

    /// The warning HF's `run_glue`/`run_ner` print when the base model names its labels and
    /// they are not the data's: both label sets, and what training does with the model's
    /// head (`fresh_head`: a new one; else its rows now stand for the data's labels).
    pub fn base_mismatch_warning(&self, base_names: &[String], fresh_head: bool) -> Option<String> {
        let base_is_named = base_names
            .iter()
            .enumerate()
            .any(|(i, n)| *n != format!("LABEL_{i}"));
        if self.problem == Problem::Regression || !base_is_named || self.names == base_names {
            return None;
        }
        let done = if fresh_head {
            "a fresh classifier head is trained for the data's labels".to_string()
        } else {
            let rows: Vec<String> = self
                .names
                .iter()
                .zip(base_names)
                .enumerate()
                .map(|(i, (n, b))| format!("{i} {b} -> {n}"))
                .collect();
            format!(
                "the classifier's {} rows are trained as the data's labels, in sorted order \
                 ({}), and saved with those names",
                self.names.len(),
                rows.join(", ")
            )
        };
        Some(format!(
            "the model's labels ({}) don't match the data's ({}): the model's labels are \
             ignored; {done}",
            base_names.join(", "),
            self.names.join(", ")
        ))
    }

    /// The target of one example of `path` (training or evaluation file): a label the
    /// training file did not have is an error naming the line.
    pub fn target(&self, path: &Path, e: &Example) -> Result<Target> {
        self.label_target(path, e.line, &e.label)
    }

    /// The class id of one tag of a token-classification example.
    pub fn tag_id(&self, path: &Path, line: usize, tag: &RawLabel) -> Result<u32> {
        match self.label_target(path, line, tag)? {
            Target::Class(c) => Ok(c),
            _ => Err(err(
                path,
                line,
                format!("tag {} is not a class", label_json(tag)),
            )),
        }
    }

    fn label_target(&self, path: &Path, line: usize, label: &RawLabel) -> Result<Target> {
        let unseen = |l: &str| {
            err(
                path,
                line,
                format!(
                    "label `{l}` is not among the training labels ({})",
                    self.names.join(", ")
                ),
            )
        };
        let id = |n: &str| -> Result<usize> {
            self.names
                .iter()
                .position(|x| x == n)
                .ok_or_else(|| unseen(n))
        };
        match (self.problem, label) {
            (Problem::SingleLabel, RawLabel::Name(n)) => Ok(Target::Class(id(n)? as u32)),
            (Problem::SingleLabel, RawLabel::Int(i)) => {
                if *i >= 0 && (*i as usize) < self.names.len() {
                    Ok(Target::Class(*i as u32))
                } else {
                    Err(unseen(&i.to_string()))
                }
            }
            (Problem::Regression, RawLabel::Float(f)) => Ok(Target::Value(*f as f32)),
            (Problem::Regression, RawLabel::Int(i)) => Ok(Target::Value(*i as f32)),
            (Problem::MultiLabel, RawLabel::List(l)) => {
                let mut v = vec![0f32; self.names.len()];
                for n in l {
                    v[id(n)?] = 1.0;
                }
                Ok(Target::Multi(v))
            }
            (Problem::Regression, other) => Err(err(
                path,
                line,
                format!(
                    "regression needs a number as label, not {}",
                    label_json(other)
                ),
            )),
            (p, other) => Err(err(
                path,
                line,
                format!(
                    "label {} does not fit the training labels ({})",
                    label_json(other),
                    p.name()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, body: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ff-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn csv_quotes_and_jsonl_labels() {
        let p = tmp(
            "a.csv",
            "text,label\n\"Hello, \"\"world\"\"\",pos\n\"two\nlines\",neg\nplain,pos\n",
        );
        let ex = read_examples(&p, &Columns::default()).unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[0].text, "Hello, \"world\"");
        assert_eq!(ex[1].text, "two\nlines");
        assert_eq!((ex[1].line, ex[2].line), (3, 5));
        let set = LabelSet::from_examples(&p, &ex, &[]).unwrap();
        assert_eq!(set.names, ["neg", "pos"]);
        assert_eq!(set.target(&p, &ex[0]).unwrap(), Target::Class(1));

        let j = tmp(
            "b.jsonl",
            "{\"text\": \"a\", \"label\": 0.5}\n\n{\"text\": \"b\", \"label\": 2}\n",
        );
        let ex = read_examples(&j, &Columns::default()).unwrap();
        let set = LabelSet::from_examples(&j, &ex, &[]).unwrap();
        assert_eq!(set.problem, Problem::Regression);
        assert_eq!(set.target(&j, &ex[1]).unwrap(), Target::Value(2.0));
    }

    #[test]
    fn problems_name_file_and_line() {
        let p = tmp(
            "c.jsonl",
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"sentence\": \"b\", \"label\": \"y\"}\n",
        );
        let e = read_examples(&p, &Columns::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.jsonl") && e.contains("line 2") && e.contains("`text`"),
            "{e}"
        );
        let p = tmp("d.jsonl", "");
        let e = read_examples(&p, &Columns::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let p = tmp(
            "e.jsonl",
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"z\"}\n",
        );
        let ex = read_examples(&p, &Columns::default()).unwrap();
        let set = LabelSet {
            problem: Problem::SingleLabel,
            names: vec!["x".into()],
        };
        let e = set.target(&p, &ex[1]).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`z`"), "{e}");
        let p = tmp(
            "f.jsonl",
            "{\"text\": \"a\", \"label\": 1.5}\n{\"text\": \"b\", \"label\": \"high\"}\n",
        );
        let ex = read_examples(&p, &Columns::default()).unwrap();
        let e = LabelSet::from_examples(&p, &ex, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        // Labels as JSON, not Rust's Debug (`List(["x"])`, `Name("positive")`).
        let p = tmp(
            "g.jsonl",
            "{\"text\": \"a\", \"label\": \"positive\"}\n{\"text\": \"b\", \"label\": [\"x\"]}\n",
        );
        let ex = read_examples(&p, &Columns::default()).unwrap();
        let e = LabelSet::from_examples(&p, &ex, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("label [\"x\"] is of another kind than line 1's \"positive\""),
            "{e}"
        );
        let set = LabelSet {
            problem: Problem::Regression,
            names: vec!["LABEL_0".into()],
        };
        let e = set.target(&p, &ex[1]).unwrap_err().to_string();
        assert!(e.contains("not [\"x\"]") && !e.contains("List"), "{e}");
    }

    #[test]
    fn byte_order_marks_and_bad_bytes() {
        // A UTF-8 BOM is skipped: JSONL line 1 and a CSV header's first column read as
        // without it (they were `not JSON` and `no \`text\` column`).
        let p = tmp(
            "bom.jsonl",
            "\u{feff}{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"y\"}\n",
        );
        assert_eq!(read_examples(&p, &Columns::default()).unwrap().len(), 2);
        let p = tmp("bom.csv", "\u{feff}text,label\na,x\nb,y\n");
        assert_eq!(read_examples(&p, &Columns::default()).unwrap()[0].text, "a");
        let dir = p.parent().unwrap();
        let bad = dir.join("latin1.jsonl");
        std::fs::write(
            &bad,
            b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"caf\xe9\"}\n",
        )
        .unwrap();
        let e = read_examples(&bad, &Columns::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("latin1.jsonl") && e.contains("line 2") && e.contains("column 14"),
            "{e}"
        );
        let u16 = dir.join("utf16.jsonl");
        std::fs::write(&u16, b"\xff\xfe{\x00}\x00").unwrap();
        let e = read_examples(&u16, &Columns::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("UTF-16"), "{e}");
    }
}
