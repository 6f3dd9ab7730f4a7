//! The frozen towers and the features they give: [`FrozenTowers`], [`ImageFeatures`],
//! [`PromptFeatures`].
//!
//! The towers never train, so their outputs for an image or a prompt never change; the
//! training crate caches these feature structs and only runs the trainable modules.
//! (With `TgcConfig::clip_finetune` set, `TgcNet` computes image features with its own
//! trainable copy of the vision tower instead; prompts still come from here.)

use candle_core::{DType, Device, Tensor, D};
use tgc_clip::{ClipModel, ClipTokenizer, WeightSource};

use crate::config::{TextTower, TgcConfig};
use crate::text::BertTextTower;
use crate::{Error, Result};

/// The CLIP BPE tokenizer shipped with the project (OpenAI's vocabulary).
pub const CLIP_TOKENIZER_JSON: &[u8] = include_bytes!("../../../weights/clip-tokenizer.json");

/// Frozen features of a batch of images.
#[derive(Clone, Debug)]
pub struct ImageFeatures {
    /// CLIP final-layer patch tokens without CLS: `B x N_v x D_v`.
    pub patch_tokens: Tensor,
    /// The same tokens after post-LN and the visual projection (joint space): `B x N_v x E`.
    pub dense_embeds: Tensor,
}

impl ImageFeatures {
    /// Concatenates per-image features along the batch axis.
    pub fn cat(items: &[&ImageFeatures]) -> Result<Self> {
        let p: Vec<&Tensor> = items.iter().map(|f| &f.patch_tokens).collect();
        let d: Vec<&Tensor> = items.iter().map(|f| &f.dense_embeds).collect();
        Ok(Self {
            patch_tokens: Tensor::cat(&p, 0)?,
            dense_embeds: Tensor::cat(&d, 0)?,
        })
    }
}

/// Frozen features of a batch of prompts.
#[derive(Clone, Debug)]
pub struct PromptFeatures {
    /// Per-token states: `P x L x D_t`.
    pub states: Tensor,
    /// Key-padding mask: `P x L`, 1 = token.
    pub mask: Tensor,
    /// Pooling weights over tokens: `P x L` (one-hot at EOS for CLIP, the normalised mask
    /// for BERT); the text vector of a prompt is `sum_l pool[l] * F'_T[l]`.
    pub pool: Tensor,
    /// CLIP's projected text embedding `P x E` (only with the CLIP text tower).
    pub embeds: Option<Tensor>,
}

impl PromptFeatures {
    /// Concatenates prompt features along the first axis.
    pub fn cat(items: &[&PromptFeatures]) -> Result<Self> {
        let get = |f: fn(&PromptFeatures) -> &Tensor| -> Result<Tensor> {
            let v: Vec<&Tensor> = items.iter().map(|p| f(p)).collect();
            Ok(Tensor::cat(&v, 0)?)
        };
        let embeds = if items.iter().all(|p| p.embeds.is_some()) {
            let v: Vec<&Tensor> = items.iter().filter_map(|p| p.embeds.as_ref()).collect();
            Some(Tensor::cat(&v, 0)?)
        } else {
            None
        };
        Ok(Self {
            states: get(|p| &p.states)?,
            mask: get(|p| &p.mask)?,
            pool: get(|p| &p.pool)?,
            embeds,
        })
    }
}

/// The frozen CLIP towers, the tokenizer and the optional BERT text tower.
pub struct FrozenTowers {
    clip: ClipModel,
    source: WeightSource,
    tokenizer: ClipTokenizer,
    bert: Option<BertTextTower>,
    max_len: usize,
    device: Device,
}

impl std::fmt::Debug for FrozenTowers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenTowers")
            .field("clip", self.clip.config())
            .field("bert", &self.bert)
            .finish()
    }
}

impl FrozenTowers {
    /// Parameters of the BERT text tower, when the config uses one.
    pub fn bert_param_count(&self) -> Option<usize> {
        self.bert.as_ref().map(BertTextTower::param_count)
    }

    /// Loads the towers of `cfg` from `clip_weights` (a hub repo, a file, or random
    /// weights) on `device`.
    pub fn load(cfg: &TgcConfig, clip_weights: &WeightSource, device: &Device) -> Result<Self> {
        let clip = ClipModel::load(&cfg.clip, clip_weights, device)
            .map_err(|e| Error::Config(format!("loading CLIP weights: {e}")))?;
        let tokenizer = ClipTokenizer::from_bytes(CLIP_TOKENIZER_JSON)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .with_context_length(cfg.max_text_len);
        let bert = match &cfg.text_tower {
            TextTower::Clip => None,
            TextTower::Bert { dir, hidden } => {
                let t = BertTextTower::load(dir, device)?;
                if t.hidden_size() != *hidden {
                    return Err(Error::Config(format!(
                        "text tower in {dir} has width {}, config says {hidden}",
                        t.hidden_size()
                    )));
                }
                Some(t)
            }
        };
        Ok(Self {
            clip,
            source: clip_weights.clone(),
            tokenizer,
            bert,
            max_len: cfg.max_text_len,
            device: device.clone(),
        })
    }

    /// The CLIP model.
    pub fn clip(&self) -> &ClipModel {
        &self.clip
    }

    /// Where the CLIP weights came from (the trainable vision tower of a fine-tuning
    /// config starts from the same tensors).
    pub fn weight_source(&self) -> &WeightSource {
        &self.source
    }

    /// The CLIP tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The device the towers run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encodes preprocessed images `B x 3 x S_c x S_c` (CLIP mean/std).
    pub fn encode_images(&self, clip_images: &Tensor) -> Result<ImageFeatures> {
        let out = self
            .clip
            .encode_image_dense(clip_images)
            .map_err(|e| Error::Input(format!("CLIP vision tower: {e}")))?;
        Ok(ImageFeatures {
            patch_tokens: out.patch_tokens,
            dense_embeds: out.dense_embeds,
        })
    }

    /// Encodes prompts with the configured text tower.
    pub fn encode_prompts<S: AsRef<str>>(&self, texts: &[S]) -> Result<PromptFeatures> {
        if texts.is_empty() {
            return Err(Error::Input("no prompts to encode".into()));
        }
        match &self.bert {
            None => {
                let (ids, mask) = self
                    .tokenizer
                    .encode_batch(texts, &self.device)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                let out = self
                    .clip
                    .encode_text(&ids, Some(&mask))
                    .map_err(|e| Error::Input(format!("CLIP text tower: {e}")))?;
                // CLIP pools at the EOS token, the position of the largest id.
                let eos = ids.argmax_keepdim(D::Minus1)?;
                let positions = Tensor::arange(0u32, ids.dim(1)? as u32, &self.device)?
                    .unsqueeze(0)?
                    .broadcast_as(ids.shape())?;
                let pool = positions.broadcast_eq(&eos)?.to_dtype(DType::F32)?;
                Ok(PromptFeatures {
                    states: out.token_states,
                    mask: out.mask,
                    pool,
                    embeds: Some(out.text_embeds),
                })
            }
            Some(bert) => {
                let refs: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
                let (ids, mask) = bert.tokenize(&refs, self.max_len)?;
                let states = bert.encode(&ids, &mask)?;
                let pool = mask.broadcast_div(&mask.sum_keepdim(1)?.clamp(1.0, f64::MAX)?)?;
                Ok(PromptFeatures {
                    states,
                    mask,
                    pool,
                    embeds: None,
                })
            }
        }
    }
}
