//! The CLIP text tower: token + position embeddings, causal encoder with an
//! optional key-padding mask, final LN, EOS pooling and text projection.

use candle_core::{DType, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::encoder::{layer_norm, Activation, Dense, Encoder, EncoderConfig, TowerMode, NEG_INF};
use crate::{Error, Result};

/// Geometry of the text tower (Hugging Face `text_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Vocabulary size (49408 for the CLIP BPE).
    pub vocab_size: usize,
    /// Maximum sequence length, i.e. number of position embeddings (77).
    pub context_length: usize,
    /// Token width D_t.
    pub width: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Number of attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp_dim: usize,
    /// MLP non-linearity.
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for TextConfig {
    /// The ViT-L/14 CLIP text tower (the paper).
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            context_length: 77,
            width: 768,
            layers: 12,
            heads: 12,
            mlp_dim: 3072,
            activation: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl TextConfig {
    /// The encoder geometry of this tower.
    pub fn encoder(&self) -> EncoderConfig {
        EncoderConfig {
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            mlp_dim: self.mlp_dim,
            activation: self.activation,
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

/// Output of [`TextTransformer::forward`] (and `ClipModel::encode_text`).
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// Per-token states after the final LayerNorm: B x L x D_t.
    pub token_states: Tensor,
    /// Key-padding mask: B x L, f32, 1 = real token (BOS..EOS), 0 = padding.
    pub mask: Tensor,
    /// The state at the EOS position (first position of the largest id, as CLIP
    /// does; EOS 49407 is the largest id): B x D_t.
    pub pooled: Tensor,
    /// `text_projection(pooled)`: B x E, the CLIP text embedding (not normalised).
    pub text_embeds: Tensor,
}

/// The frozen CLIP text transformer (Hugging Face `text_model` + `text_projection`).
#[derive(Debug, Clone)]
pub struct TextTransformer {
    cfg: TextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    projection: Dense,
}

impl TextTransformer {
    /// Loads the tower. `vb` is the model root; tensors are read from
    /// `text_model.*` and `text_projection.weight` (E x D_t).
    pub fn new(cfg: &TextConfig, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let d = cfg.width;
        Ok(Self {
            cfg: cfg.clone(),
            token_embedding: emb
                .pp("token_embedding")
                .get((cfg.vocab_size, d), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.context_length, d), "weight")?,
            encoder: Encoder::new(&cfg.encoder(), tm.pp("encoder"))?,
            final_layer_norm: layer_norm(d, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?,
            projection: Dense::load(
                vb.pp("text_projection"),
                d,
                embed_dim,
                false,
                TowerMode::Frozen,
            )?,
        })
    }

    /// The tower's configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// `ids`: B x L token ids (u32, L <= context_length); `mask`: optional B x L
    /// f32 (1 = real token). With a mask, padded keys are excluded from attention
    /// as in Hugging Face's `CLIPTextModel(attention_mask=...)`; real tokens are
    /// unaffected either way because attention is causal and padding comes last.
    /// Without a mask, every position counts as real (open_clip behaviour).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<TextOutput> {
        let (b, l) = ids
            .dims2()
            .map_err(|_| Error::Input(format!("token ids must be B x L, got {:?}", ids.dims())))?;
        if l == 0 || l > self.cfg.context_length {
            return Err(Error::Input(format!(
                "sequence length {l} must be in 1..={}",
                self.cfg.context_length
            )));
        }
        let dev = ids.device();
        let ids_v = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        if let Some(bad) = ids_v
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let mask = match mask {
            Some(m) => {
                if m.dims() != [b, l] {
                    return Err(Error::Input(format!(
                        "mask must be {b} x {l} like the ids, got {:?}",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::F32)?
            }
            None => Tensor::ones((b, l), DType::F32, dev)?,
        };
        let mask_v = mask.to_vec2::<f32>()?;
        let d = self.cfg.width;
        let flat: Vec<u32> = ids_v.iter().flatten().copied().collect();
        let flat = Tensor::from_vec(flat, b * l, dev)?;
        let x = self
            .token_embedding
            .index_select(&flat, 0)?
            .reshape((b, l, d))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, l)?.unsqueeze(0)?)?;
        // Additive bias B x 1 x L x L: causal, plus padded keys blocked.
        let mut bias = vec![0f32; b * l * l];
        for (bi, mrow) in mask_v.iter().enumerate() {
            for i in 0..l {
                for j in 0..l {
                    if j > i || mrow[j] < 0.5 {
                        bias[(bi * l + i) * l + j] = NEG_INF;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, l, l), dev)?.to_dtype(x.dtype())?;
        let (last, _) = self.encoder.forward(&x, Some(&bias), &[])?;
        let states = self.final_layer_norm.forward(&last)?;
        // EOS pooling: first position of the row maximum (torch.argmax semantics).
        let eos: Vec<u32> = ids_v
            .iter()
            .enumerate()
            .map(|(bi, row)| {
                let mut best = 0usize;
                for (j, &t) in row.iter().enumerate() {
                    if t > row[best] {
                        best = j;
                    }
                }
                (bi * l + best) as u32
            })
            .collect();
        let eos = Tensor::from_vec(eos, b, dev)?;
        let pooled = states.reshape((b * l, d))?.index_select(&eos, 0)?;
        let text_embeds = self.projection.forward(&pooled)?;
        Ok(TextOutput {
            token_states: states,
            mask,
            pooled,
            text_embeds,
        })
    }
}
