//! The CLIP BPE tokenizer over the `tokenizers` crate.
//!
//! Text is cleaned as open_clip's `SimpleTokenizer` does without ftfy
//! (`basic_clean`: HTML-unescape twice and trim; `whitespace_clean`: runs of
//! whitespace to one space; then lower-case), encoded with the CLIP
//! `tokenizer.json` (BOS 49406 ... EOS 49407), truncated to the context length
//! keeping EOS last, and padded with 0 (open_clip's choice; [`Padding::Eos`]
//! pads with 49407 as Hugging Face's CLIP tokenizer does). The pooled text state
//! is taken at the first occurrence of the largest id, which is the EOS in both
//! cases.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Start-of-text id.
pub const BOS_ID: u32 = 49406;
/// End-of-text id (the largest id in the vocabulary).
pub const EOS_ID: u32 = 49407;
/// CLIP's context length.
pub const CONTEXT_LENGTH: usize = 77;

/// The id written after the EOS up to the context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// Pad with 0 (`!`), as open_clip's `tokenize` does (the default).
    #[default]
    Zero,
    /// Pad with the EOS id, as Hugging Face's `CLIPTokenizer` does.
    Eos,
}

/// A CLIP tokenizer producing fixed-length id rows and key-padding masks.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    context_length: usize,
    padding: Padding,
}

impl ClipTokenizer {
    /// Loads a CLIP `tokenizer.json` (e.g. the shipped `weights/clip-tokenizer.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Self::check(inner, path)
    }

    /// Loads a CLIP tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| Error::Tokenizer {
            path: "<bytes>".into(),
            msg: e.to_string(),
        })?;
        Self::check(inner, Path::new("<bytes>"))
    }

    fn check(inner: tokenizers::Tokenizer, path: &Path) -> Result<Self> {
        for (tok, id) in [("<|startoftext|>", BOS_ID), ("<|endoftext|>", EOS_ID)] {
            if inner.token_to_id(tok) != Some(id) {
                return Err(Error::Tokenizer {
                    path: path.to_path_buf(),
                    msg: format!("not a CLIP tokenizer: `{tok}` is not id {id}"),
                });
            }
        }
        Ok(Self {
            inner,
            context_length: CONTEXT_LENGTH,
            padding: Padding::Zero,
        })
    }

    /// Sets the padding id policy.
    pub fn with_padding(mut self, padding: Padding) -> Self {
        self.padding = padding;
        self
    }

    /// Sets the row length (77 for CLIP; must be at least 2).
    pub fn with_context_length(mut self, len: usize) -> Self {
        self.context_length = len.max(2);
        self
    }

    /// The row length.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The padding id policy.
    pub fn padding(&self) -> Padding {
        self.padding
    }

    /// The ids of one text, BOS ... EOS, truncated to the context length with
    /// EOS kept last, not padded. "a photo of a cat" gives
    /// `[49406, 320, 1125, 539, 320, 2368, 49407]`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let clean = clean_text(text);
        let enc = self
            .inner
            .encode(clean.as_str(), true)
            .map_err(|e| Error::Tokenizer {
                path: "<encode>".into(),
                msg: format!("{text:?}: {e}"),
            })?;
        let mut ids = enc.get_ids().to_vec();
        if ids.first() != Some(&BOS_ID) {
            ids.insert(0, BOS_ID);
        }
        if ids.last() != Some(&EOS_ID) || ids.len() < 2 {
            ids.push(EOS_ID);
        }
        if ids.len() > self.context_length {
            ids.truncate(self.context_length);
            ids[self.context_length - 1] = EOS_ID;
        }
        Ok(ids)
    }

    /// One padded row of `context_length` ids and its mask (1 = real token).
    pub fn encode_padded(&self, text: &str) -> Result<(Vec<u32>, Vec<f32>)> {
        let ids = self.encode(text)?;
        let n = ids.len();
        let pad = match self.padding {
            Padding::Zero => 0,
            Padding::Eos => EOS_ID,
        };
        let mut row = ids;
        row.resize(self.context_length, pad);
        let mut mask = vec![1f32; n];
        mask.resize(self.context_length, 0.0);
        Ok((row, mask))
    }

    /// A batch: ids B x L (u32) and mask B x L (f32, 1 = real token), L = context length.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let l = self.context_length;
        let mut ids = Vec::with_capacity(texts.len() * l);
        let mut mask = Vec::with_capacity(texts.len() * l);
        for t in texts {
            let (r, m) = self.encode_padded(t.as_ref())?;
            ids.extend(r);
            mask.extend(m);
        }
        let b = texts.len();
        Ok((
            Tensor::from_vec(ids, (b, l), device)?,
            Tensor::from_vec(mask, (b, l), device)?,
        ))
    }
}

/// open_clip's `whitespace_clean(basic_clean(text)).lower()` without ftfy.
pub fn clean_text(text: &str) -> String {
    let t = html_unescape(&html_unescape(text));
    t.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Unescapes the HTML entities that occur in captions: named `&amp; &lt; &gt;
/// &quot; &apos; &nbsp;` and numeric `&#NN;` / `&#xHH;` (Python's
/// `html.unescape` knows all HTML5 names; others are left as they are).
fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let semi = tail.find(';').filter(|&i| i <= 10);
        let decoded = semi.and_then(|i| {
            let ent = &tail[1..i];
            let ch = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let num = if let Some(h) = ent.strip_prefix("#x").or(ent.strip_prefix("#X")) {
                        u32::from_str_radix(h, 16).ok()
                    } else if let Some(d) = ent.strip_prefix('#') {
                        d.parse::<u32>().ok()
                    } else {
                        None
                    };
                    num.and_then(char::from_u32)
                }
            };
            ch.map(|c| (c, i + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning() {
        assert_eq!(clean_text("  A  Cat&amp;Dog\n\t&#65; "), "a cat&dog a");
        assert_eq!(clean_text("&amp;amp;"), "&");
        assert_eq!(clean_text("x & y"), "x & y");
    }
}
