//! [`ClipConfig`] with presets and the two-tower [`ClipModel`].

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::encoder::Activation;
use crate::text::{TextConfig, TextOutput, TextTransformer};
use crate::vision::{VisionConfig, VisionOutput, VisionTransformer};
use crate::weights::WeightSource;
use crate::Result;

/// Configuration of a CLIP model: both towers and the joint embedding width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    /// Vision tower.
    pub vision: VisionConfig,
    /// Text tower.
    pub text: TextConfig,
    /// Joint embedding width E (projection output).
    pub embed_dim: usize,
}

impl Default for ClipConfig {
    /// The paper's CLIP: ViT-L/14 at 336 px.
    fn default() -> Self {
        Self::vit_l14_336()
    }
}

impl ClipConfig {
    /// OpenAI ViT-L/14 at 336 px (`openai/clip-vit-large-patch14-336`): grid
    /// 24x24, D_v 1024, D_t 768, E 768.
    pub fn vit_l14_336() -> Self {
        Self {
            vision: VisionConfig::default(),
            text: TextConfig::default(),
            embed_dim: 768,
        }
    }

    /// OpenAI ViT-B/16 at 224 px (`openai/clip-vit-base-patch16`): grid 14x14,
    /// D_v 768, D_t 512, E 512.
    pub fn vit_b16() -> Self {
        Self {
            vision: VisionConfig {
                image_size: 224,
                patch_size: 16,
                width: 768,
                layers: 12,
                heads: 12,
                mlp_dim: 3072,
                ..VisionConfig::default()
            },
            text: TextConfig {
                width: 512,
                heads: 8,
                mlp_dim: 2048,
                ..TextConfig::default()
            },
            embed_dim: 512,
        }
    }

    /// OpenAI ViT-B/32 at 224 px (`openai/clip-vit-base-patch32`): grid 7x7.
    pub fn vit_b32() -> Self {
        let mut c = Self::vit_b16();
        c.vision.patch_size = 32;
        c
    }

    /// open_clip TinyCLIP-ViT-8M-16-Text-3M: 224 px, patch 16, vision width 256,
    /// 10 layers, 4 heads; text width 256, 3 layers, 4 heads; E 512; MLP ratio 4;
    /// exact GELU (open_clip's default, not quick_gelu).
    pub fn tinyclip_8m_16() -> Self {
        Self {
            vision: VisionConfig {
                image_size: 224,
                patch_size: 16,
                num_channels: 3,
                width: 256,
                layers: 10,
                heads: 4,
                mlp_dim: 1024,
                activation: Activation::Gelu,
                layer_norm_eps: 1e-5,
            },
            text: TextConfig {
                vocab_size: 49408,
                context_length: 77,
                width: 256,
                layers: 3,
                heads: 4,
                mlp_dim: 1024,
                activation: Activation::Gelu,
                layer_norm_eps: 1e-5,
            },
            embed_dim: 512,
        }
    }

    /// A tiny model for tests: 32 px, patch 8 (4x4 grid), vision width 32,
    /// 2 layers, 2 heads; text width 16, 2 layers, 2 heads, the full CLIP
    /// vocabulary (49408) and context (77); E 16. The committed weights
    /// `crates/tgc-clip/tests/fixtures/tiny_clip.safetensors` (Hugging Face
    /// names, f16 storage) match this config. The text width is 16 so that the
    /// 49408-row token table keeps that file small.
    pub fn tiny() -> Self {
        Self {
            vision: VisionConfig {
                image_size: 32,
                patch_size: 8,
                num_channels: 3,
                width: 32,
                layers: 2,
                heads: 2,
                mlp_dim: 128,
                activation: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            text: TextConfig {
                vocab_size: 49408,
                context_length: 77,
                width: 16,
                layers: 2,
                heads: 2,
                mlp_dim: 64,
                activation: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            embed_dim: 16,
        }
    }

    /// A preset by name: `vit_l14_336`, `vit_b16`, `vit_b32`, `tinyclip_8m_16`, `tiny`.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "vit_l14_336" | "paper" => Self::vit_l14_336(),
            "vit_b16" => Self::vit_b16(),
            "vit_b32" => Self::vit_b32(),
            "tinyclip_8m_16" => Self::tinyclip_8m_16(),
            "tiny" => Self::tiny(),
            _ => return None,
        })
    }
}

/// Frozen CLIP vision and text towers.
#[derive(Debug, Clone)]
pub struct ClipModel {
    cfg: ClipConfig,
    vision: VisionTransformer,
    text: TextTransformer,
    device: Device,
}

impl ClipModel {
    /// Builds the model from a `VarBuilder` with Hugging Face `CLIPModel` names.
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            vision: VisionTransformer::new(&cfg.vision, cfg.embed_dim, vb.clone())?,
            text: TextTransformer::new(&cfg.text, cfg.embed_dim, vb.clone())?,
            device: vb.device().clone(),
        })
    }

    /// Loads frozen f32 weights from `source` onto `device` (plain tensors,
    /// never `Var`s). Files may use Hugging Face or open_clip names and any
    /// float dtype; every tensor is checked for presence and shape first.
    pub fn load(cfg: &ClipConfig, source: &WeightSource, device: &Device) -> Result<Self> {
        Self::load_with_dtype(cfg, source, DType::F32, device)
    }

    /// [`ClipModel::load`] with a compute dtype (f32 on CPU; f16/bf16 on GPUs).
    pub fn load_with_dtype(
        cfg: &ClipConfig,
        source: &WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new(cfg, source.var_builder(cfg, dtype, device)?)
    }

    /// The configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The vision tower.
    pub fn vision(&self) -> &VisionTransformer {
        &self.vision
    }

    /// The text tower.
    pub fn text(&self) -> &TextTransformer {
        &self.text
    }

    /// `pixels`: B x 3 x H x W, CLIP-normalised, H and W multiples of the patch
    /// size (other sizes than the training size use bicubic position-embedding
    /// interpolation). Returns patch tokens B x N x D_v, dense projected tokens
    /// B x N x E, pooled embedding B x E and the grid.
    pub fn encode_image_dense(&self, pixels: &Tensor) -> Result<VisionOutput> {
        self.vision.forward(pixels, &[])
    }

    /// [`ClipModel::encode_image_dense`] also returning the states at
    /// `hidden_layers` (0 = after pre-LN, i = output of block i), without CLS.
    pub fn encode_image_dense_with(
        &self,
        pixels: &Tensor,
        hidden_layers: &[usize],
    ) -> Result<VisionOutput> {
        self.vision.forward(pixels, hidden_layers)
    }

    /// `ids`: B x L u32 (L <= 77), `mask`: B x L f32 (1 = real token) or `None`
    /// (all real). Returns per-token states B x L x D_t, the mask, the EOS state
    /// B x D_t and the projected text embedding B x E.
    pub fn encode_text(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<TextOutput> {
        self.text.forward(ids, mask)
    }
}
