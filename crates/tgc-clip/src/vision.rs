//! The CLIP vision tower: patch embedding, position embeddings (bicubically
//! resampled for other image sizes), pre-LN, encoder, post-LN and visual
//! projection applied to every token.

use candle_core::{IndexOp, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::encoder::{Activation, Dense, Encoder, EncoderConfig, Norm, TowerMode};
use crate::interp::resize_bicubic_hwd;
use crate::{Error, Result};

/// Geometry of the vision tower (Hugging Face `vision_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Training image size (pixels, square); fixes the number of position embeddings.
    pub image_size: usize,
    /// Patch size (pixels).
    pub patch_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Token width D_v.
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

impl Default for VisionConfig {
    /// ViT-L/14 at 336 px (the paper).
    fn default() -> Self {
        Self {
            image_size: 336,
            patch_size: 14,
            num_channels: 3,
            width: 1024,
            layers: 24,
            heads: 16,
            mlp_dim: 4096,
            activation: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    /// Side of the native patch grid (`image_size / patch_size`).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

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

/// Output of [`VisionTransformer::forward`] (and `ClipModel::encode_image_dense`).
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Final-layer patch tokens without CLS, before post-LN: B x N x D_v
    /// (Hugging Face `last_hidden_state[:, 1:]`), N = grid.0 * grid.1, row-major.
    pub patch_tokens: Tensor,
    /// `visual_projection(post_layernorm(patch_tokens))`: B x N x E, the dense
    /// joint-space features (not normalised).
    pub dense_embeds: Tensor,
    /// `visual_projection(post_layernorm(CLS))`: B x E, the CLIP image embedding
    /// (not normalised; Hugging Face `image_embeds` before the L2 norm).
    pub pooled_embeds: Tensor,
    /// Patch grid (rows, columns).
    pub grid: (usize, usize),
    /// Requested intermediate states without CLS, B x N x D_v each, in the order
    /// requested (index i = Hugging Face `hidden_states[i]`), or `None` when
    /// none were requested.
    pub hidden_states: Option<Vec<Tensor>>,
}

/// The CLIP vision transformer (Hugging Face `vision_model` + `visual_projection`),
/// frozen ([`VisionTransformer::new`]) or trainable
/// ([`VisionTransformer::new_with_mode`] with [`TowerMode::Trainable`]).
///
/// A trainable tower computes exactly what the frozen one does (up to float rounding)
/// with differentiable LayerNorm and softmax kernels; build it from a `VarBuilder`
/// that hands out `Var`s for the parameters to fine-tune (and plain tensors for the
/// rest) and the gradients reach them.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    cfg: VisionConfig,
    /// Patch embedding as a matmul: (3 p p) -> D_v, no bias.
    patch_embed: Dense,
    class_embedding: Tensor,
    /// Native position embeddings: (1 + S*S) x D_v.
    position_embedding: Tensor,
    pre_layrnorm: Norm,
    encoder: Encoder,
    post_layernorm: Norm,
    projection: Dense,
    mode: TowerMode,
}

impl VisionTransformer {
    /// Loads the frozen tower. `vb` is the model root; tensors are read from
    /// `vision_model.*` and `visual_projection.weight` (E x D_v).
    pub fn new(cfg: &VisionConfig, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::new_with_mode(cfg, embed_dim, vb, TowerMode::Frozen)
    }

    /// Loads the tower in the given [`TowerMode`]; names as in [`VisionTransformer::new`].
    /// In [`TowerMode::Trainable`] the tensors `vb` returns are used as they are (no
    /// copies), so `Var`s among them receive gradients and see optimiser updates.
    pub fn new_with_mode(
        cfg: &VisionConfig,
        embed_dim: usize,
        vb: VarBuilder,
        mode: TowerMode,
    ) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let (d, p, c) = (cfg.width, cfg.patch_size, cfg.num_channels);
        let n_pos = cfg.grid() * cfg.grid() + 1;
        let eps = cfg.layer_norm_eps;
        let conv = emb.pp("patch_embedding").get((d, c, p, p), "weight")?;
        Ok(Self {
            cfg: cfg.clone(),
            // A reshape of a contiguous tensor is a view: a Var stays shared.
            patch_embed: Dense::new(conv.reshape((d, c * p * p))?, None, mode)?,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.pp("position_embedding").get((n_pos, d), "weight")?,
            pre_layrnorm: Norm::load(d, eps, vm.pp("pre_layrnorm"), mode)?,
            encoder: Encoder::new_with_mode(&cfg.encoder(), vm.pp("encoder"), mode)?,
            post_layernorm: Norm::load(d, eps, vm.pp("post_layernorm"), mode)?,
            projection: Dense::load(vb.pp("visual_projection"), d, embed_dim, false, mode)?,
            mode,
        })
    }

    /// The tower's configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Whether the tower is frozen or trainable.
    pub fn mode(&self) -> TowerMode {
        self.mode
    }

    /// Position embeddings for a `gh x gw` patch grid: (1 + gh*gw) x D_v. The
    /// native grid uses the stored table; any other grid resamples the patch part
    /// bicubically (transformers' `interpolate_pos_encoding=True`), CLS unchanged.
    pub fn position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let s = self.cfg.grid();
        if (gh, gw) == (s, s) {
            return Ok(self.position_embedding.clone());
        }
        let d = self.cfg.width;
        let cls = self.position_embedding.i(0..1)?;
        let grid = self.position_embedding.i(1..)?.reshape((s, s, d))?;
        let grid = resize_bicubic_hwd(&grid, gh, gw)?.reshape((gh * gw, d))?;
        Ok(Tensor::cat(&[cls, grid], 0)?)
    }

    /// `pixels`: B x 3 x H x W (CLIP-normalised), H and W multiples of the patch
    /// size. `hidden_layers`: indices of extra states to return (0 = encoder
    /// input after pre-LN, i = output of block i). See [`VisionOutput`] for shapes.
    pub fn forward(&self, pixels: &Tensor, hidden_layers: &[usize]) -> Result<VisionOutput> {
        let (b, c, h, w) = pixels.dims4().map_err(|_| {
            Error::Input(format!(
                "image batch must be B x {} x H x W, got {:?}",
                self.cfg.num_channels,
                pixels.dims()
            ))
        })?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            return Err(Error::Input(format!(
                "image batch {:?}: need {} channels and H, W positive multiples of the patch size {p}",
                pixels.dims(),
                self.cfg.num_channels
            )));
        }
        let too_deep = hidden_layers.iter().find(|&&i| i > self.cfg.layers);
        if let Some(i) = too_deep {
            return Err(Error::Input(format!(
                "hidden state {i} requested, the vision encoder has {} layers",
                self.cfg.layers
            )));
        }
        let (gh, gw) = (h / p, w / p);
        let d = self.cfg.width;
        // Patchify by reshapes: identical to the stride-p convolution, one gemm.
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let tokens = self.patch_embed.forward(&patches)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .to_dtype(tokens.dtype())?;
        let x = Tensor::cat(&[cls, tokens], 1)?;
        let x = x.broadcast_add(&self.position_embeddings(gh, gw)?.unsqueeze(0)?)?;
        let x = self.pre_layrnorm.forward(&x)?;
        let (last, kept) = self.encoder.forward(&x, None, hidden_layers)?;
        let n = gh * gw;
        let post = self.post_layernorm.forward(&last)?;
        let proj = self.projection.forward(&post)?;
        let hidden_states = if hidden_layers.is_empty() {
            None
        } else {
            Some(
                kept.iter()
                    .map(|t| t.narrow(1, 1, n))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        };
        Ok(VisionOutput {
            patch_tokens: last.narrow(1, 1, n)?,
            dense_embeds: proj.narrow(1, 1, n)?,
            pooled_embeds: proj.i((.., 0))?,
            grid: (gh, gw),
            hidden_states,
        })
    }
}
