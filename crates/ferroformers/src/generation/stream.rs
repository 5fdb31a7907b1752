//! Streaming: turn tokens into text deltas as they come, holding back bytes of a character split
//! across tokens (byte-level BPE emits UTF-8 one byte-token at a time).

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Incremental detokenizer for one sequence. Decodes a short window of recent tokens (so
/// tokenizers that strip a leading space at the start of a text still get spaces right) and
/// emits only complete text.
pub struct TextStreamer<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'t> TextStreamer<'t> {
    pub fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .inner()
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| crate::error::Error::Tokenizer(e.to_string()))
    }

    /// Add a token; returns the new complete text, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let text = self.decode(&self.tokens[self.prefix_offset..])?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let delta = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let text = self.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        if text.len() > prefix.len() && text.starts_with(&prefix) {
            Ok(Some(text[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }
}
