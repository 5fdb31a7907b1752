//! SentencePiece models without `tokenizer.json`: T5's `spiece.model`, and Marian's
//! `source.spm` whose pieces map to ids through `vocab.json`. The `ModelProto` protobuf is read
//! by hand (pieces with scores and types, the normalizer's precompiled charsmap and whitespace
//! flags, the trainer's model type) and turned into a `tokenizers::Tokenizer` the way
//! transformers' `convert_slow_tokenizer` (`SpmConverter` / `T5Converter`) builds the fast one:
//! a Unigram model, a `Precompiled` normalizer followed by its whitespace handling, a `Metaspace`
//! pre-tokenizer and decoder, and a post-processor that appends `</s>`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// A piece's kind (`SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// What the tokenizer needs from a `ModelProto`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmModel {
    pub pieces: Vec<Piece>,
    /// `trainer_spec.model_type`: 1 unigram, 2 bpe, 3 word, 4 char.
    pub model_type: u64,
    pub byte_fallback: bool,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
}

/// A minimal protobuf reader: varints and length-delimited fields.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn bytes(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let out = self.buf.get(self.pos..end).ok_or("truncated field")?;
        self.pos = end;
        Ok(out)
    }

    /// The next field: `(number, wire type, payload)`; varints come back in `Field::Varint`.
    fn field(&mut self) -> std::result::Result<(u64, Field<'a>), String> {
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let f = match wire {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed(self.bytes(8)?),
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.bytes(n)?)
            }
            5 => Field::Fixed(self.bytes(4)?),
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok((num, f))
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed(&'a [u8]),
    Bytes(&'a [u8]),
}

fn parse_piece(buf: &[u8]) -> std::result::Result<Piece, String> {
    let mut r = Reader::new(buf);
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while !r.done() {
        match r.field()? {
            (1, Field::Bytes(b)) => {
                piece.piece = String::from_utf8(b.to_vec()).map_err(|_| "piece is not UTF-8")?
            }
            (2, Field::Fixed(b)) if b.len() == 4 => {
                piece.score = f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            (3, Field::Varint(t)) => {
                piece.kind = match t {
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    _ => PieceType::Normal,
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

impl SpmModel {
    /// Parse a serialized `ModelProto`.
    pub fn parse(buf: &[u8]) -> std::result::Result<Self, String> {
        let mut m = SpmModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
        };
        let mut r = Reader::new(buf);
        while !r.done() {
            match r.field()? {
                (1, Field::Bytes(b)) => m.pieces.push(parse_piece(b)?),
                (2, Field::Bytes(b)) => {
                    let mut t = Reader::new(b);
                    while !t.done() {
                        match t.field()? {
                            (3, Field::Varint(v)) => m.model_type = v,
                            (35, Field::Varint(v)) => m.byte_fallback = v != 0,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    let mut n = Reader::new(b);
                    while !n.done() {
                        match n.field()? {
                            (2, Field::Bytes(c)) => m.precompiled_charsmap = c.to_vec(),
                            (3, Field::Varint(v)) => m.add_dummy_prefix = v != 0,
                            (4, Field::Varint(v)) => m.remove_extra_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("no pieces".into());
        }
        Ok(m)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&buf)
            .map_err(|e| Error::invalid_file(path, format!("SentencePiece model: {e}")))
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= c.len() {
                out.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The tokenizer files of a folder without `tokenizer.json`, as `(spm model, joint vocab)`.
fn find_files(dir: &Path) -> Option<(std::path::PathBuf, Option<std::path::PathBuf>)> {
    let spiece = dir.join("spiece.model");
    if spiece.is_file() {
        return Some((spiece, None));
    }
    let source = dir.join("source.spm");
    let vocab = dir.join("vocab.json");
    if source.is_file() && vocab.is_file() {
        return Some((source, Some(vocab)));
    }
    // Other SentencePiece layouts (XLM-R's and mBART's fairseq id offsets, Llama's byte-fallback
    // BPE) need their own converters: they are not guessed here.
    None
}

fn special(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}

/// Build the fast tokenizer of a SentencePiece folder, or `None` when the folder has no
/// SentencePiece model. `tokenizer_config` is the folder's `tokenizer_config.json` (or `{}`).
pub fn from_dir(dir: &Path, tokenizer_config: &Value) -> Result<Option<tokenizers::Tokenizer>> {
    let Some((model_path, vocab_path)) = find_files(dir) else {
        return Ok(None);
    };
    build(&model_path, vocab_path.as_deref(), tokenizer_config).map(Some)
}

/// Marian's target-side tokenizer (`target.spm` + `vocab.json`), what `tokenizer(text_target=..)`
/// uses.
pub fn marian_target(dir: &Path, tokenizer_config: &Value) -> Result<tokenizers::Tokenizer> {
    build(
        &dir.join("target.spm"),
        Some(&dir.join("vocab.json")),
        tokenizer_config,
    )
}

fn build(
    model_path: &Path,
    vocab_path: Option<&Path>,
    tokenizer_config: &Value,
) -> Result<tokenizers::Tokenizer> {
    let model_path = model_path.to_path_buf();
    let spm = SpmModel::from_file(&model_path)?;
    if spm.model_type != 1 {
        return Err(Error::invalid_file(
            &model_path,
            format!(
                "SentencePiece model type {} is not supported without tokenizer.json (only \
                 unigram); save the tokenizer with its tokenizer.json",
                spm.model_type
            ),
        ));
    }
    let cfg = |k: &str| tokenizer_config.get(k);
    let token = |k: &str, default: &str| -> String {
        match cfg(k) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string(),
            _ => default.to_string(),
        }
    };
    let eos = token("eos_token", "</s>");
    let unk = token("unk_token", "<unk>");
    // (piece, score) in id order, and the special tokens.
    let mut vocab: Vec<(String, f64)> = Vec::new();
    let mut specials: Vec<(u32, String)> = Vec::new();
    let unk_id: u32;
    match vocab_path {
        None => {
            for (i, p) in spm.pieces.iter().enumerate() {
                vocab.push((p.piece.clone(), f64::from(p.score)));
                if matches!(p.kind, PieceType::Control | PieceType::Unknown) {
                    specials.push((i as u32, p.piece.clone()));
                }
            }
            unk_id = spm
                .pieces
                .iter()
                .position(|p| p.kind == PieceType::Unknown)
                .unwrap_or(0) as u32;
            // T5Converter: `<extra_id_{n-1}>` .. `<extra_id_0>` after the pieces.
            let is_t5 = cfg("tokenizer_class")
                .and_then(Value::as_str)
                .is_some_and(|c| c.starts_with("T5"));
            let extra = cfg("extra_ids")
                .and_then(Value::as_u64)
                .unwrap_or(if is_t5 { 100 } else { 0 }) as usize;
            for k in (0..extra).rev() {
                let t = format!("<extra_id_{k}>");
                if !vocab.iter().any(|(p, _)| *p == t) {
                    specials.push((vocab.len() as u32, t.clone()));
                    vocab.push((t, 0.0));
                }
            }
        }
        Some(vp) => {
            // Marian: segmentation by the source model, ids from the joint vocab.json. Pieces
            // the source model lacks get a score no segmentation would pick.
            let text = std::fs::read_to_string(vp).map_err(|e| Error::io(vp, e))?;
            let map: HashMap<String, u32> =
                serde_json::from_str(&text).map_err(|e| Error::invalid_file(vp, e))?;
            let n = map.values().max().map_or(0, |m| *m as usize + 1);
            let scores: HashMap<&str, f32> = spm
                .pieces
                .iter()
                .filter(|p| matches!(p.kind, PieceType::Normal | PieceType::UserDefined))
                .map(|p| (p.piece.as_str(), p.score))
                .collect();
            let floor = scores.values().copied().fold(0f32, f32::min) as f64 - 1000.0;
            let mut by_id: Vec<Option<String>> = vec![None; n];
            for (p, &i) in &map {
                by_id[i as usize] = Some(p.clone());
            }
            for (i, p) in by_id.into_iter().enumerate() {
                let p = p.unwrap_or_else(|| format!("<unused_{i}>"));
                let score = scores.get(p.as_str()).map_or(floor, |s| f64::from(*s));
                vocab.push((p, score));
            }
            let id = |t: &str| map.get(t).copied();
            unk_id = id(&unk).ok_or_else(|| {
                Error::invalid_file(
                    vp,
                    format!("the unknown token `{unk}` is not in vocab.json"),
                )
            })?;
            for t in [eos.clone(), unk.clone(), token("pad_token", "<pad>")] {
                if let Some(i) = id(&t) {
                    vocab[i as usize].1 = 0.0;
                    specials.push((i, t));
                }
            }
        }
    }
    // Tokens named in tokenizer_config's `added_tokens_decoder` are special too.
    if let Some(Value::Object(added)) = cfg("added_tokens_decoder") {
        for (k, v) in added {
            let (Ok(i), Some(c)) = (k.parse::<u32>(), v.get("content").and_then(Value::as_str))
            else {
                continue;
            };
            if !specials.iter().any(|(j, _)| *j == i) && (i as usize) < vocab.len() {
                specials.push((i, c.to_string()));
            }
        }
    }
    specials.sort();
    let eos_id = vocab
        .iter()
        .position(|(p, _)| *p == eos)
        .ok_or_else(|| Error::invalid_file(&model_path, format!("no `{eos}` piece")))?
        as u32;
    let prepend = if !spm.add_dummy_prefix {
        "never"
    } else if cfg("legacy").and_then(Value::as_bool) == Some(false) {
        "first"
    } else {
        "always"
    };
    let mut normalizers = Vec::new();
    if !spm.precompiled_charsmap.is_empty() {
        normalizers.push(json!({"type": "Precompiled",
                                "precompiled_charsmap": base64(&spm.precompiled_charsmap)}));
    }
    if spm.remove_extra_whitespaces {
        normalizers.push(json!({"type": "Strip", "strip_left": false, "strip_right": true}));
        normalizers.push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"},
                                "content": "\u{2581}"}));
    }
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}",
                           "prepend_scheme": prepend, "split": true});
    let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let eos_piece = json!({"SpecialToken": {"id": eos, "type_id": 0}});
    let mut special_tokens = Map::new();
    special_tokens.insert(
        eos.clone(),
        json!({"id": eos, "ids": [eos_id], "tokens": [eos]}),
    );
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": specials.iter().map(|(i, c)| special(*i, c)).collect::<Vec<_>>(),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": metaspace.clone(),
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [seq("A"), eos_piece.clone()],
            "pair": [seq("A"), eos_piece.clone(), seq("B"), eos_piece],
            "special_tokens": special_tokens,
        },
        "decoder": metaspace,
        "model": {
            "type": "Unigram",
            "unk_id": unk_id,
            "vocab": vocab.iter().map(|(p, s)| json!([p, s])).collect::<Vec<_>>(),
            "byte_fallback": spm.byte_fallback,
        },
    });
    let s = serde_json::to_string(&tok).map_err(|e| Error::Tokenizer(e.to_string()))?;
    s.parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::invalid_file(&model_path, format!("building the tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn reads_varints_and_pieces() {
        // piece "a" (field 1), score 1.5 (field 2, fixed32), type 3 (control).
        let mut p = vec![0x0a, 1, b'a', 0x15];
        p.extend_from_slice(&1.5f32.to_le_bytes());
        p.extend_from_slice(&[0x18, 3]);
        let mut model = vec![0x0a, p.len() as u8];
        model.extend_from_slice(&p);
        let m = SpmModel::parse(&model).unwrap();
        assert_eq!(m.pieces[0].piece, "a");
        assert_eq!(m.pieces[0].score, 1.5);
        assert_eq!(m.pieces[0].kind, PieceType::Control);
        assert!(SpmModel::parse(&[0x0a, 5, 1]).is_err());
    }
}
