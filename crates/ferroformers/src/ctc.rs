//! CTC decoding with a character vocabulary: transformers' `Wav2Vec2CTCTokenizer` (4.57) as the
//! `automatic-speech-recognition` pipeline uses it (`decode(ids, skip_special_tokens=False)`,
//! with `output_char_offsets` for timestamps).
//!
//! Decoding a frame-wise argmax: ids to tokens, runs of the same token grouped into one (with
//! its first and last frame), the blank (`pad_token`) dropped, the word delimiter (`|`) replaced
//! by `replace_word_delimiter_char` (a space), joined, stripped, lowercased with `do_lower_case`.
//! Special tokens other than the blank (`<s>`, `<unk>`) stay in the text, as in the pipeline.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::config::{read_json, TokenizerConfig};
use crate::error::{Error, Result};

/// One character (grouped frames) of a decoded sequence: frames `[start_offset, end_offset)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharOffset {
    pub char: String,
    pub start_offset: usize,
    pub end_offset: usize,
}

/// One word: from its first character's start to its last character's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordOffset {
    pub word: String,
    pub start_offset: usize,
    pub end_offset: usize,
}

/// `Wav2Vec2CTCTokenizer`, decoding only.
#[derive(Debug, Clone)]
pub struct CtcTokenizer {
    /// id -> token: the vocabulary, with added tokens over it.
    tokens: HashMap<u32, String>,
    pub pad_token: String,
    pub unk_token: String,
    pub word_delimiter_token: Option<String>,
    pub replace_word_delimiter_char: String,
    pub do_lower_case: bool,
    pub clean_up_tokenization_spaces: bool,
}

impl CtcTokenizer {
    /// From `vocab.json` (flat, or nested by language with `target_lang`),
    /// `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        if !vocab_path.is_file() {
            return Err(Error::MissingFile {
                path: vocab_path,
                what: "a CTC model's tokenizer needs its character vocabulary (vocab.json)".into(),
            });
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let raw = if cfg_path.is_file() {
            read_json(&cfg_path)?
        } else {
            Value::Object(Default::default())
        };
        let cfg = TokenizerConfig::from_dir(dir)?;
        let vocab = read_json(&vocab_path)?;
        let target_lang = raw.get("target_lang").and_then(Value::as_str);
        let vocab = match target_lang {
            Some(lang) => vocab.get(lang).cloned().ok_or_else(|| {
                Error::invalid_file(
                    &vocab_path,
                    format!(
                        "tokenizer_config.json sets target_lang `{lang}`, which vocab.json lacks"
                    ),
                )
            })?,
            None => vocab,
        };
        let Some(map) = vocab.as_object() else {
            return Err(Error::invalid_file(
                &vocab_path,
                "expected an object of token: id",
            ));
        };
        let mut tokens = HashMap::new();
        for (tok, id) in map {
            let id = id.as_u64().ok_or_else(|| {
                Error::invalid_file(
                    &vocab_path,
                    format!(
                        "the id of `{tok}` is {id}, not an integer (a vocabulary nested by \
                             language needs target_lang in tokenizer_config.json)"
                    ),
                )
            })?;
            tokens.insert(id as u32, tok.clone());
        }
        let added_path = dir.join("added_tokens.json");
        if added_path.is_file() {
            if let Some(m) = read_json(&added_path)?.as_object() {
                for (tok, id) in m {
                    if let Some(id) = id.as_u64() {
                        tokens.insert(id as u32, tok.clone());
                    }
                }
            }
        }
        if let Some(m) = raw.get("added_tokens_decoder").and_then(Value::as_object) {
            for (id, t) in m {
                let content = t.get("content").and_then(Value::as_str);
                if let (Ok(id), Some(content)) = (id.parse::<u32>(), content) {
                    tokens.insert(id, content.to_string());
                }
            }
        }
        let word_delimiter_token = match raw.get("word_delimiter_token") {
            None => Some("|".to_string()),
            Some(Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .or_else(|| v.get("content").and_then(Value::as_str))
                    .unwrap_or("|")
                    .to_string(),
            ),
        };
        Ok(Self {
            tokens,
            pad_token: cfg.pad_token.unwrap_or_else(|| "<pad>".into()),
            unk_token: cfg.unk_token.unwrap_or_else(|| "<unk>".into()),
            word_delimiter_token,
            replace_word_delimiter_char: raw
                .get("replace_word_delimiter_char")
                .and_then(Value::as_str)
                .unwrap_or(" ")
                .to_string(),
            do_lower_case: cfg.do_lower_case.unwrap_or(false),
            clean_up_tokenization_spaces: cfg.clean_up_tokenization_spaces.unwrap_or(false),
        })
    }

    /// The token of `id` (`unk_token` for ids outside the vocabulary).
    pub fn id_to_token(&self, id: u32) -> &str {
        self.tokens
            .get(&id)
            .map_or(self.unk_token.as_str(), String::as_str)
    }

    /// `decode(ids)`: the text of a frame-wise argmax.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with_offsets(ids).0
    }

    /// `decode(ids, output_char_offsets=True)`: the text and each character's frames (the
    /// characters as they are joined: delimiters already replaced, not lowercased).
    pub fn decode_with_offsets(&self, ids: &[u32]) -> (String, Vec<CharOffset>) {
        // Group runs of the same token (`itertools.groupby` over the token strings).
        let mut groups: Vec<CharOffset> = Vec::new();
        for (frame, &id) in ids.iter().enumerate() {
            let tok = self.id_to_token(id);
            match groups.last_mut() {
                Some(g) if g.char == tok => g.end_offset = frame + 1,
                _ => groups.push(CharOffset {
                    char: tok.to_string(),
                    start_offset: frame,
                    end_offset: frame + 1,
                }),
            }
        }
        let delim = self.word_delimiter_token.as_deref();
        let chars: Vec<CharOffset> = groups
            .into_iter()
            .filter(|g| g.char != self.pad_token)
            .map(|mut g| {
                if Some(g.char.as_str()) == delim {
                    g.char = self.replace_word_delimiter_char.clone();
                }
                g
            })
            .collect();
        let joined: String = chars.iter().map(|c| c.char.as_str()).collect();
        let mut text = py_strip(&joined).to_string();
        if self.do_lower_case {
            text = text.to_lowercase();
        }
        if self.clean_up_tokenization_spaces {
            text = crate::tokenizer::clean_up_tokenization(&text);
        }
        (text, chars)
    }

    /// `_get_word_offsets(char_offsets, replace_word_delimiter_char)`: runs of characters
    /// between delimiters.
    pub fn word_offsets(&self, chars: &[CharOffset]) -> Vec<WordOffset> {
        word_offsets(chars, &self.replace_word_delimiter_char)
    }
}

/// `Wav2Vec2CTCTokenizer._get_word_offsets`.
pub fn word_offsets(chars: &[CharOffset], delimiter: &str) -> Vec<WordOffset> {
    let mut words = Vec::new();
    let mut last_is_space = true;
    let mut word = String::new();
    let (mut start, mut end) = (0, 0);
    for c in chars {
        let is_space = c.char == delimiter;
        if is_space == last_is_space {
            end = c.end_offset;
            word.push_str(&c.char);
        } else if is_space {
            words.push(WordOffset {
                word: std::mem::take(&mut word),
                start_offset: start,
                end_offset: end,
            });
        } else {
            start = c.start_offset;
            end = c.end_offset;
            word = c.char.clone();
        }
        last_is_space = is_space;
    }
    if !last_is_space {
        words.push(WordOffset {
            word,
            start_offset: start,
            end_offset: end,
        });
    }
    words
}

/// Python's `str.strip()`: Unicode whitespace and the separators `\x1c`-`\x1f`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

/// The most likely id of each row of `logits` (`[frames][vocab]`, row-major): torch's argmax,
/// the first of equal maxima.
pub fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab.max(1))
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] || (row[best].is_nan() && !v.is_nan()) {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> CtcTokenizer {
        let vocab = ["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A"];
        CtcTokenizer {
            tokens: vocab
                .iter()
                .enumerate()
                .map(|(i, t)| (i as u32, t.to_string()))
                .collect(),
            pad_token: "<pad>".into(),
            unk_token: "<unk>".into(),
            word_delimiter_token: Some("|".into()),
            replace_word_delimiter_char: " ".into(),
            do_lower_case: false,
            clean_up_tokenization_spaces: false,
        }
    }

    #[test]
    fn groups_drops_blanks_and_replaces_delimiters() {
        let t = tok();
        // | T T <pad> T E | | A <pad> <pad> 99
        let ids = [4, 6, 6, 0, 6, 5, 4, 4, 7, 0, 0, 99];
        let (text, chars) = t.decode_with_offsets(&ids);
        assert_eq!(text, "TTE A<unk>");
        let got: Vec<(&str, usize, usize)> = chars
            .iter()
            .map(|c| (c.char.as_str(), c.start_offset, c.end_offset))
            .collect();
        assert_eq!(
            got,
            vec![
                (" ", 0, 1),
                ("T", 1, 3),
                ("T", 4, 5),
                ("E", 5, 6),
                (" ", 6, 8),
                ("A", 8, 9),
                ("<unk>", 11, 12)
            ]
        );
        let words = t.word_offsets(&chars);
        let got: Vec<(&str, usize, usize)> = words
            .iter()
            .map(|w| (w.word.as_str(), w.start_offset, w.end_offset))
            .collect();
        assert_eq!(got, vec![("TTE", 1, 6), ("A<unk>", 8, 12)]);
        let lower = CtcTokenizer {
            do_lower_case: true,
            ..t
        };
        assert_eq!(lower.decode(&ids), "tte a<unk>");
        assert_eq!(lower.decode(&[]), "");
        assert_eq!(lower.decode(&[0, 0]), "");
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(
            argmax_rows(&[1.0, 3.0, 3.0, 0.0, -1.0, -2.0], 3),
            vec![1, 0]
        );
    }
}
