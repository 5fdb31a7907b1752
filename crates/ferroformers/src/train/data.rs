//! Training data for text classification: JSON Lines (or a JSON array) and CSV/TSV files with
//! HF datasets' column names (`text`, optional `text_pair`, `label`; overridable), labels as
//! strings, integers, floats (regression) or lists (multi-label). Every problem is reported
//! with the file and line before training starts.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Which columns hold what.
#[derive(Debug, Clone)]
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
}

fn err(path: &Path, line: usize, detail: impl std::fmt::Display) -> Error {
    Error::invalid_file(path, format!("line {line}: {detail}"))
}

/// Read every example of `path` (`.csv`/`.tsv` as delimited text with a header, anything else
/// as JSON Lines or one JSON array of objects).
pub fn read_examples(path: &Path, cols: &Columns) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
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
    rows.into_iter()
        .map(|(line, row)| example(path, line, &row, cols))
        .collect()
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
    let obj = row
        .as_object()
        .ok_or_else(|| err(path, line, "not an object with named columns"))?;
    let names = || obj.keys().cloned().collect::<Vec<_>>().join(", ");
    let text_of = |col: &str| -> Result<String> {
        match obj.get(col) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(err(
                path,
                line,
                format!("column `{col}` is not a string: {other}"),
            )),
            None => Err(err(
                path,
                line,
                format!("no `{col}` column (columns: {})", names()),
            )),
        }
    };
    let text = text_of(&cols.text)?;
    let pair = match &cols.text_pair {
        Some(c) => Some(text_of(c)?),
        None => None,
    };
    let label = match obj.get(&cols.label) {
        None => {
            return Err(err(
                path,
                line,
                format!("no `{}` column (columns: {})", cols.label, names()),
            ))
        }
        Some(v) => raw_label(
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
        })?,
    };
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

impl LabelSet {
    /// The labels of the training examples: names sorted (as HF's `run_classification`),
    /// integers as ids (names from `base_names` when it has one per id, else `LABEL_i`),
    /// floats as regression, lists as multi-label. Mixed kinds are an error naming the line.
    pub fn from_examples(path: &Path, ex: &[Example], base_names: &[String]) -> Result<Self> {
        let first = &ex[0];
        let kind = |l: &RawLabel| match l {
            RawLabel::Name(_) => 0,
            RawLabel::Int(_) | RawLabel::Float(_) => 1,
            RawLabel::List(_) => 2,
        };
        for e in ex {
            if kind(&e.label) != kind(&first.label) {
                return Err(err(
                    path,
                    e.line,
                    format!(
                        "label {:?} is of another kind than line {}'s {:?}",
                        e.label, first.line, first.label
                    ),
                ));
            }
        }
        match &first.label {
            RawLabel::Name(_) => {
                let set: BTreeSet<&str> = ex
                    .iter()
                    .filter_map(|e| match &e.label {
                        RawLabel::Name(n) => Some(n.as_str()),
                        _ => None,
                    })
                    .collect();
                Ok(LabelSet {
                    problem: Problem::SingleLabel,
                    names: set.into_iter().map(str::to_string).collect(),
                })
            }
            RawLabel::List(_) => {
                let set: BTreeSet<&str> = ex
                    .iter()
                    .flat_map(|e| match &e.label {
                        RawLabel::List(l) => l.iter().map(String::as_str).collect(),
                        _ => Vec::new(),
                    })
                    .collect();
                if set.is_empty() {
                    return Err(err(path, first.line, "every label list is empty"));
                }
                Ok(LabelSet {
                    problem: Problem::MultiLabel,
                    names: set.into_iter().map(str::to_string).collect(),
                })
            }
            _ => {
                if ex.iter().any(|e| matches!(e.label, RawLabel::Float(_))) {
                    return Ok(LabelSet {
                        problem: Problem::Regression,
                        names: vec!["LABEL_0".into()],
                    });
                }
                let mut max = 0i64;
                for e in ex {
                    if let RawLabel::Int(i) = e.label {
                        if i < 0 {
                            return Err(err(
                                path,
                                e.line,
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

    /// The target of one example of `path` (training or evaluation file): a label the
    /// training file did not have is an error naming the line.
    pub fn target(&self, path: &Path, e: &Example) -> Result<Target> {
        let unseen = |l: &str| {
            err(
                path,
                e.line,
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
        match (self.problem, &e.label) {
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
                e.line,
                format!("regression needs a number as label, not {other:?}"),
            )),
            (p, other) => Err(err(
                path,
                e.line,
                format!(
                    "label {other:?} does not fit the training labels ({})",
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
    }
}
