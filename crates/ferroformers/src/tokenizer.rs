//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or the same fast tokenizer built
//! from legacy files (`vocab.txt` for WordPiece/BERT, `vocab.json` + `merges.txt` for byte-level
//! BPE/RoBERTa), the way `transformers`' slow->fast converters build them.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, EncodeInput, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::config::TokenizerConfig;
use crate::error::{Error, Result};

/// One tokenized input: ids plus what post-processing needs to map back to the text.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Character (not byte) offsets into the input text, `(0, 0)` for special tokens.
    pub offsets: Vec<(usize, usize)>,
    pub special_tokens_mask: Vec<u32>,
    pub word_ids: Vec<Option<u32>>,
    /// Which input (0 = text, 1 = text_pair) each token came from; `None` for special tokens.
    pub sequence_ids: Vec<Option<usize>>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Inputs are truncated to this many tokens (special tokens included).
    pub max_length: usize,
    pub pad_id: u32,
    pub mask_token: Option<String>,
    pub mask_id: Option<u32>,
    pub clean_up_tokenization_spaces: bool,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Load the tokenizer of a model folder. `model_limit` is the longest input the model can take
    /// (from its position embeddings); the tokenizer's own `model_max_length` may lower it.
    pub fn from_dir(dir: &Path, model_type: &str, model_limit: Option<usize>) -> Result<Self> {
        let cfg = TokenizerConfig::from_dir(dir)?;
        let json = dir.join("tokenizer.json");
        let (inner, legacy) = if json.is_file() {
            let t = tokenizers::Tokenizer::from_file(&json)
                .map_err(|e| Error::invalid_file(&json, e))?;
            (t, false)
        } else if dir.join("vocab.txt").is_file() {
            (build_wordpiece(dir, &cfg)?, true)
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            (build_byte_level_bpe(dir, &cfg, model_type)?, true)
        } else {
            return Err(Error::MissingFile {
                path: dir.join("tokenizer.json"),
                what: "no tokenizer found: expected tokenizer.json, vocab.txt, or vocab.json + \
                       merges.txt"
                    .into(),
            });
        };
        Self::from_parts(inner, &cfg, legacy, model_limit)
    }

    fn from_parts(
        mut inner: tokenizers::Tokenizer,
        cfg: &TokenizerConfig,
        legacy: bool,
        model_limit: Option<usize>,
    ) -> Result<Self> {
        let max_length = match (cfg.model_max_length, model_limit) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => 512,
        };
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
        let pad_id = cfg
            .pad_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .unwrap_or(0);
        let mask_id = cfg.mask_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(Self {
            inner,
            max_length,
            pad_id,
            mask_token: cfg.mask_token.clone(),
            mask_id,
            // Legacy BERT/RoBERTa tokenizers clean up by default; saved configs say so explicitly.
            clean_up_tokenization_spaces: cfg.clean_up_tokenization_spaces.unwrap_or(legacy),
        })
    }

    /// Tokenize one text (or text pair) with special tokens, truncated to `max_length`.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Encoded> {
        self.encode_with(text, pair, true)
    }

    pub fn encode_with(
        &self,
        text: &str,
        pair: Option<&str>,
        add_special_tokens: bool,
    ) -> Result<Encoded> {
        let input: EncodeInput = match pair {
            Some(p) => (text, p).into(),
            None => text.into(),
        };
        let enc = self
            .inner
            .encode_char_offsets(input, add_special_tokens)
            .map_err(tok_err)?;
        let n = enc.get_ids().len();
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
            special_tokens_mask: enc.get_special_tokens_mask().to_vec(),
            word_ids: enc.get_word_ids().to_vec(),
            sequence_ids: (0..n).map(|i| enc.get_sequence_ids()[i]).collect(),
        })
    }

    /// Decode ids to text the way `tokenizer.decode` does in Python (including the optional
    /// clean-up of spaces before punctuation).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(tok_err)?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Change the truncation length (special tokens included).
    pub fn set_max_length(&mut self, max_length: usize) -> Result<()> {
        self.inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
        self.max_length = max_length;
        Ok(())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `PreTrainedTokenizerBase.clean_up_tokenization`.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::invalid_file(p, "path is not valid UTF-8"))
}

fn add_specials(
    t: &mut tokenizers::Tokenizer,
    tokens: &[(Option<&String>, &str)],
    lstrip_mask: Option<&str>,
) -> Result<()> {
    let mut added = Vec::new();
    for (tok, default) in tokens {
        let content = tok.map(|s| s.as_str()).unwrap_or(default).to_string();
        if t.token_to_id(&content).is_none() {
            continue;
        }
        let mut at = AddedToken::from(content.clone(), true);
        if lstrip_mask == Some(content.as_str()) {
            at = at.lstrip(true);
        }
        added.push(at);
    }
    t.add_special_tokens(added).map_err(tok_err)?;
    Ok(())
}

/// `BertTokenizerFast` from `vocab.txt` (transformers' `BertConverter`).
fn build_wordpiece(dir: &Path, cfg: &TokenizerConfig) -> Result<tokenizers::Tokenizer> {
    let vocab = dir.join("vocab.txt");
    let unk = cfg.unk_token.clone().unwrap_or_else(|| "[UNK]".into());
    let model = WordPiece::from_file(path_str(&vocab)?)
        .unk_token(unk.clone())
        .build()
        .map_err(|e| Error::invalid_file(&vocab, e))?;
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_normalizer(Some(BertNormalizer::new(
        true,
        cfg.tokenize_chinese_chars.unwrap_or(true),
        cfg.strip_accents,
        cfg.do_lower_case.unwrap_or(true),
    )))
    .map_err(tok_err)?;
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    t.with_decoder(Some(WordPieceDecoder::default()));
    let cls = cfg.cls_token.clone().unwrap_or_else(|| "[CLS]".into());
    let sep = cfg.sep_token.clone().unwrap_or_else(|| "[SEP]".into());
    let id = |tok: &str| {
        t.token_to_id(tok).ok_or_else(|| {
            Error::invalid_file(&vocab, format!("special token `{tok}` not in vocab"))
        })
    };
    let processor = BertProcessing::new((sep.clone(), id(&sep)?), (cls.clone(), id(&cls)?));
    t.with_post_processor(Some(processor));
    add_specials(
        &mut t,
        &[
            (cfg.unk_token.as_ref(), "[UNK]"),
            (cfg.sep_token.as_ref(), "[SEP]"),
            (cfg.pad_token.as_ref(), "[PAD]"),
            (cfg.cls_token.as_ref(), "[CLS]"),
            (cfg.mask_token.as_ref(), "[MASK]"),
        ],
        None,
    )?;
    Ok(t)
}

/// `RobertaTokenizerFast` / `GPT2TokenizerFast` from `vocab.json` + `merges.txt`.
fn build_byte_level_bpe(
    dir: &Path,
    cfg: &TokenizerConfig,
    model_type: &str,
) -> Result<tokenizers::Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let model = BPE::from_file(path_str(&vocab)?, path_str(&merges)?)
        .build()
        .map_err(|e| Error::invalid_file(&vocab, e))?;
    let mut t = tokenizers::Tokenizer::new(model);
    let add_prefix_space = cfg.add_prefix_space.unwrap_or(false);
    t.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    let is_roberta = matches!(
        model_type,
        "roberta" | "xlm-roberta" | "camembert" | "longformer" | "bart" | "mbart"
    );
    if is_roberta {
        let cls = cfg.cls_token.clone().unwrap_or_else(|| "<s>".into());
        let sep = cfg.sep_token.clone().unwrap_or_else(|| "</s>".into());
        let id = |tok: &str| {
            t.token_to_id(tok).ok_or_else(|| {
                Error::invalid_file(&vocab, format!("special token `{tok}` not in vocab"))
            })
        };
        let processor = RobertaProcessing::new((sep.clone(), id(&sep)?), (cls.clone(), id(&cls)?))
            .trim_offsets(true)
            .add_prefix_space(add_prefix_space);
        t.with_post_processor(Some(processor));
        let mask = cfg.mask_token.clone().unwrap_or_else(|| "<mask>".into());
        add_specials(
            &mut t,
            &[
                (cfg.bos_token.as_ref(), "<s>"),
                (cfg.eos_token.as_ref(), "</s>"),
                (cfg.unk_token.as_ref(), "<unk>"),
                (cfg.sep_token.as_ref(), "</s>"),
                (cfg.pad_token.as_ref(), "<pad>"),
                (cfg.cls_token.as_ref(), "<s>"),
                (cfg.mask_token.as_ref(), "<mask>"),
            ],
            Some(mask.as_str()),
        )?;
    } else {
        add_specials(
            &mut t,
            &[
                (cfg.bos_token.as_ref(), "<|endoftext|>"),
                (cfg.eos_token.as_ref(), "<|endoftext|>"),
                (cfg.unk_token.as_ref(), "<|endoftext|>"),
            ],
            None,
        )?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_matches_python() {
        assert_eq!(
            clean_up_tokenization("hello , world . it 's i 'm ok !"),
            "hello, world. it's i'm ok!"
        );
    }
}
