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
    truncate_encodings, AddedToken, Decoder, EncodeInput, ModelWrapper, PostProcessor,
    PostProcessorWrapper, TruncationDirection, TruncationParams, TruncationStrategy,
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
    /// Tokens were cut off at `max_length` ([`Tokenizer::encode`]; never for windows, which
    /// keep the overflow).
    pub truncated: bool,
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
    /// `unk_token_id` / `cls_token_id` as HF's tokenizer reports them (from the special tokens).
    pub unk_id: Option<u32>,
    pub cls_id: Option<u32>,
    /// The same tokenizer without truncation nor post-processor, made on first use by
    /// `encode_windows`.
    untruncated: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// The same tokenizer with byte-level BPE's `add_prefix_space` on, for input already split
    /// into words (`encode_words`).
    words: std::sync::OnceLock<std::result::Result<tokenizers::Tokenizer, String>>,
    /// The same tokenizer without truncation but with its post-processor (special tokens as
    /// `encode` adds them), made on first use by `tokens` and `untruncated_len`.
    whole: std::sync::OnceLock<tokenizers::Tokenizer>,
}

/// One token of a text as TEI's `/tokenize` lists it: `start..stop` are byte offsets into the
/// text (`None` for special tokens, whose `text` is the token itself).
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub special: bool,
    pub start: Option<usize>,
    pub stop: Option<usize>,
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
        } else if let Some(t) = {
            let raw = dir.join("tokenizer_config.json");
            let raw = if raw.is_file() {
                crate::config::read_json(&raw)?
            } else {
                serde_json::Value::Object(Default::default())
            };
            crate::sentencepiece::from_dir(dir, &raw)?
        } {
            (t, false)
        } else {
            return Err(Error::MissingFile {
                path: dir.join("tokenizer.json"),
                what: "no tokenizer found: expected tokenizer.json, vocab.txt, vocab.json + \
                       merges.txt, or a SentencePiece model (spiece.model, source.spm)"
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
        let special_id = |tok: &Option<String>, defaults: &[&str]| match tok {
            Some(t) => inner.token_to_id(t),
            None => defaults.iter().find_map(|t| inner.token_to_id(t)),
        };
        let unk_id = special_id(&cfg.unk_token, &["[UNK]", "<unk>"]);
        let cls_id = special_id(&cfg.cls_token, &["[CLS]", "<s>"]);
        Ok(Self {
            inner,
            max_length,
            pad_id,
            mask_token: cfg.mask_token.clone(),
            mask_id,
            // Legacy BERT/RoBERTa tokenizers clean up by default; saved configs say so explicitly.
            clean_up_tokenization_spaces: cfg.clean_up_tokenization_spaces.unwrap_or(legacy),
            unk_id,
            cls_id,
            untruncated: std::sync::OnceLock::new(),
            words: std::sync::OnceLock::new(),
            whole: std::sync::OnceLock::new(),
        })
    }

    /// A tokenizer built in code (e.g. from a GGUF file's vocabulary and merges), with the
    /// special tokens and limits of `cfg`.
    pub fn from_tokenizer(
        inner: tokenizers::Tokenizer,
        cfg: &TokenizerConfig,
        model_limit: Option<usize>,
    ) -> Result<Self> {
        Self::from_parts(inner, cfg, false, model_limit)
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
        Ok(cut_encoded(&enc))
    }

    /// Token ids as given (no special tokens added), cut to `max_length` like a text: an
    /// input of `index` that is already tokenized (OpenAI's and TEI's embedding routes take
    /// ids). Empty, or an id outside the vocabulary: an error naming the input.
    pub fn encoded_ids(&self, ids: &[u32], index: usize) -> Result<Encoded> {
        if ids.is_empty() {
            return Err(Error::input(index, "the list of token ids is empty"));
        }
        self.check_ids(ids, index)?;
        let n = ids.len().min(self.max_length);
        Ok(Encoded {
            ids: ids[..n].to_vec(),
            type_ids: vec![0; n],
            offsets: vec![(0, 0); n],
            special_tokens_mask: vec![0; n],
            word_ids: vec![None; n],
            sequence_ids: vec![Some(0); n],
            truncated: n < ids.len(),
        })
    }

    /// Tokenize a text already split into words (HF's `is_split_into_words=True`), with special
    /// tokens, truncated to `max_length`; `word_ids` index `words`. Byte-level BPE tokenizers
    /// (RoBERTa, GPT-2) put a space before every word, as HF needs them loaded
    /// (`add_prefix_space=True`, what `run_ner` does).
    pub fn encode_words(&self, words: &[String]) -> Result<Encoded> {
        let tok = self
            .words
            .get_or_init(|| {
                let mut t = self.inner.clone();
                if let Some(pre) = t.get_pre_tokenizer() {
                    let mut v = serde_json::to_value(pre).map_err(|e| e.to_string())?;
                    fn prefix_space(v: &mut serde_json::Value) {
                        match v {
                            serde_json::Value::Object(o) => {
                                if o.get("type").and_then(|t| t.as_str()) == Some("ByteLevel") {
                                    o.insert("add_prefix_space".into(), true.into());
                                }
                                o.values_mut().for_each(prefix_space);
                            }
                            serde_json::Value::Array(a) => a.iter_mut().for_each(prefix_space),
                            _ => {}
                        }
                    }
                    prefix_space(&mut v);
                    let pre: tokenizers::PreTokenizerWrapper =
                        serde_json::from_value(v).map_err(|e| e.to_string())?;
                    t.with_pre_tokenizer(Some(pre));
                }
                Ok(t)
            })
            .as_ref()
            .map_err(|e| Error::Tokenizer(e.clone()))?;
        let input = tokenizers::InputSequence::from(words);
        let enc = tok
            .encode_char_offsets(EncodeInput::Single(input), true)
            .map_err(tok_err)?;
        Ok(cut_encoded(&enc))
    }

    /// Tokenize with special tokens into overlapping windows of at most `max_length` tokens, as
    /// HF's fast tokenizer does with `truncation=.., max_length, stride, return_overflowing_tokens`:
    /// the first window, then its overflows (flattened one level, as `transformers` does).
    /// `only_second` truncates only `pair` (QA's `truncation="only_second"`), else the single
    /// text is cut. Settings `tokenizers` would reject or panic on are returned as errors.
    pub fn encode_windows(
        &self,
        text: &str,
        pair: Option<&str>,
        max_length: usize,
        stride: usize,
        only_second: bool,
    ) -> Result<Vec<Encoded>> {
        if only_second != pair.is_some() {
            return Err(Error::Tokenizer(
                "windows are made over a single text, or over the second text of a pair".into(),
            ));
        }
        let stride_name = if only_second { "doc_stride" } else { "stride" };
        let processor = self.inner.get_post_processor();
        let added = |is_pair| processor.map_or(0, |p| p.added_tokens(is_pair));
        // What `tokenizers` checks when truncation with a stride is set.
        if max_length < added(false) || stride > max_length - added(false) {
            return Err(Error::param(
                stride_name,
                format!(
                    "the stride ({stride}) must be smaller than the maximum length ({max_length}) \
                     minus the {} special tokens",
                    added(false)
                ),
            ));
        }
        // Tokenize untruncated and cut here: with truncation set, `tokenizers` 0.23 stops
        // tokenizing at `max_length` tokens and so loses the overflow the windows need. The
        // post-processor runs once, below (it also trims offsets, so it must not run twice).
        let untruncated = self.untruncated.get_or_init(|| {
            let mut t = self.inner.clone();
            // Only `Some` parameters are checked: disabling cannot fail.
            let _ = t.with_truncation(None);
            t.with_post_processor(None::<PostProcessorWrapper>);
            t
        });
        let raw = |t: &str| untruncated.encode_char_offsets(t, false).map_err(tok_err);
        let first = raw(text)?;
        let second = match pair {
            Some(p) => {
                // As `encode` does for a pair: the second sequence is type 1 (post-processors
                // keep that for overflowing windows).
                let mut e = raw(p)?;
                e.set_type_ids(vec![1; e.len()]);
                Some(e)
            }
            None => None,
        };
        let budget = max_length.saturating_sub(added(pair.is_some()));
        let total = first.len() + second.as_ref().map_or(0, |e| e.len());
        if total > budget {
            // `Encoding::truncate` asserts `stride < window`.
            let window = if only_second {
                budget.saturating_sub(first.len())
            } else {
                budget
            };
            if window == 0 {
                return Err(Error::param(
                    "max_seq_len",
                    format!(
                        "the question ({} tokens) leaves no room for the context in {max_length} \
                         tokens",
                        first.len()
                    ),
                ));
            }
            if stride >= window {
                return Err(Error::param(
                    stride_name,
                    format!(
                        "the stride ({stride}) must be smaller than the window it overlaps \
                         ({window} tokens)"
                    ),
                ));
            }
        }
        let params = TruncationParams {
            direction: TruncationDirection::Right,
            max_length: budget,
            strategy: if only_second {
                TruncationStrategy::OnlySecond
            } else {
                TruncationStrategy::LongestFirst
            },
            stride,
        };
        let (first, second) = truncate_encodings(first, second, &params).map_err(tok_err)?;
        let enc = match processor {
            Some(p) => p.process(first, second, true).map_err(tok_err)?,
            None => {
                let parts = std::iter::once(first).chain(second).collect();
                <dyn PostProcessor>::default_process(parts, true)
                    .map_err(tok_err)?
                    .pop()
                    .ok_or_else(|| Error::Tokenizer("empty encoding".into()))?
            }
        };
        let mut out = vec![to_encoded(&enc)];
        out.extend(enc.get_overflowing().iter().map(to_encoded));
        Ok(out)
    }

    /// `convert_tokens_to_string` of HF's fast tokenizers: the backend decoder on token strings
    /// (no extra clean-up), or the tokens joined by spaces when there is no decoder.
    pub fn convert_tokens_to_string(&self, tokens: &[String]) -> Result<String> {
        match self.inner.get_decoder() {
            Some(d) => d.decode(tokens.to_vec()).map_err(tok_err),
            None => Ok(tokens.join(" ")),
        }
    }

    /// Whether the model marks word continuations (WordPiece's `##`, a BPE
    /// `continuing_subword_prefix`): HF then tells subwords by token length, not by spaces.
    pub fn has_subword_prefix(&self) -> bool {
        match self.inner.get_model() {
            ModelWrapper::WordPiece(m) => !m.continuing_subword_prefix.is_empty(),
            ModelWrapper::BPE(m) => m
                .get_continuing_subword_prefix()
                .as_deref()
                .is_some_and(|p| !p.is_empty()),
            _ => false,
        }
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

    /// Decode ids to text as the tokenizer's own decoder gives it, without Python's clean-up
    /// of spaces (what openai-whisper and faster-whisper decode to).
    pub fn decode_raw(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
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
        self.words = std::sync::OnceLock::new();
        Ok(())
    }

    /// Truncate only the first text of a pair (HF's `truncation="only_first"`, as zero-shot
    /// classification does: the hypothesis is kept whole).
    pub fn set_truncation_only_first(&mut self) -> Result<()> {
        self.inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: self.max_length,
                strategy: TruncationStrategy::OnlyFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
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

    /// The first of `ids` outside the vocabulary, if any.
    pub fn unknown_id(&self, ids: &[u32]) -> Option<u32> {
        let vocab = self.vocab_size();
        ids.iter().copied().find(|&id| id as usize >= vocab)
    }

    /// Token ids given for input `index` must be in the vocabulary: else an error naming the
    /// first one outside it.
    pub fn check_ids(&self, ids: &[u32], index: usize) -> Result<()> {
        match self.unknown_id(ids) {
            Some(id) => Err(Error::input(
                index,
                format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.vocab_size()
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn whole(&self) -> &tokenizers::Tokenizer {
        self.whole.get_or_init(|| {
            let mut t = self.inner.clone();
            // Turning truncation off cannot fail (only a stride over the length can).
            let _ = t.with_truncation(None);
            t
        })
    }

    /// The tokens of `text`, not truncated, with byte offsets (what TEI's `/tokenize` answers).
    pub fn tokens(&self, text: &str, add_special_tokens: bool) -> Result<Vec<Token>> {
        let enc = self
            .whole()
            .encode(text, add_special_tokens)
            .map_err(tok_err)?;
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .zip(enc.get_special_tokens_mask())
            .zip(enc.get_tokens())
            .map(|(((&id, &(start, stop)), &special), token)| {
                if special == 1 {
                    Token {
                        id,
                        text: token.clone(),
                        special: true,
                        start: None,
                        stop: None,
                    }
                } else {
                    let bytes = text.as_bytes().get(start..stop).unwrap_or_default();
                    Token {
                        id,
                        text: String::from_utf8_lossy(bytes).into_owned(),
                        special: false,
                        start: Some(start),
                        stop: Some(stop),
                    }
                }
            })
            .collect())
    }

    /// How many tokens `text` (and `pair`) make with special tokens, before truncation.
    pub fn untruncated_len(&self, text: &str, pair: Option<&str>) -> Result<usize> {
        let input: EncodeInput = match pair {
            Some(p) => (text, p).into(),
            None => text.into(),
        };
        Ok(self.whole().encode(input, true).map_err(tok_err)?.len())
    }
}

/// Once per process, on stderr: an input was longer than the model's maximum and was cut
/// there (transformers' tokenizer warns as well, and its pipelines then fail; ours always
/// truncate, so the answer covers the start only). Called by the pipelines that run such an
/// input, not by the tokenizer (a server counting tokens, or refusing the input, is not).
pub fn warn_truncated(max_length: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "warning: an input was longer than the model's maximum of {max_length} tokens and was \
             cut there (the answer covers its first {max_length} tokens only)"
        )
    });
}

/// [`to_encoded`] of a truncating encode: `truncated` when tokens overflowed `max_length`.
fn cut_encoded(enc: &tokenizers::Encoding) -> Encoded {
    Encoded {
        truncated: !enc.get_overflowing().is_empty(),
        ..to_encoded(enc)
    }
}

fn to_encoded(enc: &tokenizers::Encoding) -> Encoded {
    Encoded {
        ids: enc.get_ids().to_vec(),
        type_ids: enc.get_type_ids().to_vec(),
        offsets: enc.get_offsets().to_vec(),
        special_tokens_mask: enc.get_special_tokens_mask().to_vec(),
        word_ids: enc.get_word_ids().to_vec(),
        sequence_ids: enc.get_sequence_ids(),
        truncated: false,
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
