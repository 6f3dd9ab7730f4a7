//! BERT-family text towers (e.g. all-MiniLM-L6-v2) as an alternative to CLIP's text tower.
//!
//! The tower is frozen: weights are plain tensors from safetensors, never `Var`s. It gives
//! per-token states (`B x L x hidden`) that the model projects into its text width, and
//! the masked-mean sentence embedding sentence-transformers uses for these models.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Script that fetches the MiniLM files into `weights/minilm/`.
pub const MINILM_FETCH_SCRIPT: &str = "weights/fetch_minilm.sh";

/// A frozen BERT encoder with its WordPiece tokenizer.
pub struct BertTextTower {
    model: BertModel,
    tokenizer: Tokenizer,
    params: usize,
    hidden: usize,
    device: Device,
}

/// Parameters of a BERT encoder without pooler: word, position and token-type
/// embeddings with their LayerNorm, then per layer the q/k/v/output projections, two
/// LayerNorms and the two FFN linears.
fn bert_param_count(c: &BertConfig) -> usize {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h;
    let layer = 4 * (h * h + h) + 2 * (2 * h) + (h * i + i) + (i * h + h);
    embeddings + c.num_hidden_layers * layer
}

impl std::fmt::Debug for BertTextTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTextTower")
            .field("hidden", &self.hidden)
            .finish()
    }
}

fn need(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::MissingFile {
            path: p,
            hint: format!(
                "a BERT text tower needs config.json, model.safetensors and tokenizer.json; \
                 for all-MiniLM-L6-v2 run `bash {MINILM_FETCH_SCRIPT}`"
            ),
        })
    }
}

impl BertTextTower {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = need(dir, "config.json")?;
        let weights = need(dir, "model.safetensors")?;
        let tok_path = need(dir, "tokenizer.json")?;
        let config: BertConfig = serde_json::from_slice(&std::fs::read(&config_path)?)
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        // Padding and truncation are done here to the model's fixed length.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // SAFETY: the file is memory-mapped read-only and not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let model = BertModel::load(vb, &config).map_err(|e| Error::Weights {
            path: weights.clone(),
            source: e,
        })?;
        Ok(Self {
            model,
            tokenizer,
            params: bert_param_count(&config),
            hidden: config.hidden_size,
            device: device.clone(),
        })
    }

    /// Width of the token states.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Parameters the encoder holds (embeddings and layers; the pooler, which
    /// sentence-transformers does not use, is not loaded): 22,565,376 for
    /// all-MiniLM-L6-v2.
    pub fn param_count(&self) -> usize {
        self.params
    }

    /// Tokenises `texts` to `max_len` tokens (truncating, keeping `[SEP]`, padding with 0).
    ///
    /// Returns ids `B x max_len` (u32) and mask `B x max_len` (f32, 1 = token).
    pub fn tokenize(&self, texts: &[&str], max_len: usize) -> Result<(Tensor, Tensor)> {
        let mut ids = Vec::with_capacity(texts.len() * max_len);
        let mut mask = Vec::with_capacity(texts.len() * max_len);
        for t in texts {
            let enc = self
                .tokenizer
                .encode(*t, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let mut row: Vec<u32> = enc.get_ids().to_vec();
            if row.len() > max_len {
                let sep = *row.last().unwrap_or(&0);
                row.truncate(max_len);
                row[max_len - 1] = sep;
            }
            let n = row.len();
            ids.extend(row.iter().copied());
            ids.extend(std::iter::repeat_n(0u32, max_len - n));
            mask.extend(std::iter::repeat_n(1f32, n));
            mask.extend(std::iter::repeat_n(0f32, max_len - n));
        }
        let b = texts.len();
        Ok((
            Tensor::from_vec(ids, (b, max_len), &self.device)?,
            Tensor::from_vec(mask, (b, max_len), &self.device)?,
        ))
    }

    /// Per-token states `B x L x hidden` for ids and mask from [`Self::tokenize`].
    pub fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let type_ids = ids.zeros_like()?;
        Ok(self.model.forward(ids, &type_ids, Some(mask))?)
    }

    /// Sentence embeddings `B x hidden` (masked mean of the token states, as
    /// sentence-transformers' mean pooling).
    pub fn sentence_embedding(&self, texts: &[&str]) -> Result<Tensor> {
        let (ids, mask) = self.tokenize(texts, 128)?;
        let states = self.encode(&ids, &mask)?;
        Ok(tgc_nn::masked_mean(&states, &mask)?)
    }
}
