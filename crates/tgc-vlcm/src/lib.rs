//! # tgc-vlcm: VLCM, the Vision-Language Calibration Module of TGC-Net
//!
//! VLCM calibrates the coarsest visual features `F_V^1/32` and the fused text features
//! `F_T` against each other before the cost-aggregation decoder. The paper gives only the
//! equations `F_ctx = G(F_V, F_T)`, `F'_V = CrossAttn(Q=F_V, K=V=F_ctx)` and
//! `F'_T = CrossAttn(Q=F_T, K=V=F_ctx)`; this crate implements them concretely, per
//! (image, prompt) pair, with `V = F_V^1/32` as `N x D` tokens and
//! `T = Linear(D_t -> D)(F_T)`:
//!
//! ```text
//! v   = mean(V)                 t   = masked_mean(T)           (summaries)
//! g_V = sigmoid(W_V [V ; t])    g_T = sigmoid(W_T [T ; v])     (token-wise gates, 2D -> D)
//! F_ctx = concat_tokens(g_V * V, g_T * T)                       (text padding masked)
//! F'_V = LN(V + MHA(Q=V, K=V=F_ctx))
//! F'_T = LN(T + MHA(Q=T, K=V=F_ctx))
//! ```
//!
//! `[X ; s]` concatenates the summary `s` to every token of `X` along the channels.
//! The alignment ablation of the paper is available through [`VlcmVariant`]:
//! `Identity` (no calibration, text still projected to `D`), `SingleCrossAttn` (vision
//! attends text), `BiCrossAttn` (each attends the other) and `Gated` (the default, above).
//!
//! **Pairing.** Calibration is per (image, prompt) pair, so the vision input `B x D x h x w`
//! is repeated per prompt: the text batch is `B*K` with prompts of image `b` at rows
//! `b*K .. b*K + K - 1`, and output row `b*K + k` holds image `b` calibrated with prompt
//! `k`.
//!
//! [`Calibrator`] is the object-safe trait the model crate holds (`Box<dyn Calibrator>`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use tgc_vlcm::{Calibrator, Vlcm, VlcmConfig, VlcmVariant};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! // A small configuration; `VlcmConfig::default()` is the paper's (D = 256, D_t = 768).
//! let cfg = VlcmConfig { d_model: 16, text_dim: 24, heads: 4, ..VlcmConfig::default() };
//! assert_eq!(cfg.variant, VlcmVariant::Gated);
//! let vlcm = Vlcm::new(&cfg, vb.pp("vlcm"))?;
//!
//! let (b, k, l) = (2, 3, 5); // 2 images, 3 prompts each, 5 text tokens
//! let vision = Tensor::randn(0f32, 1.0, (b, 16, 4, 4), &dev)?; // F_V^1/32
//! let text = Tensor::randn(0f32, 1.0, (b * k, l, 24), &dev)?; // F_T from DATE
//! let text_mask = Tensor::ones((b * k, l), DType::F32, &dev)?;
//!
//! let out = vlcm.forward(&vision, &text, &text_mask, k)?;
//! assert_eq!(out.vision.dims(), &[6, 16, 4, 4]); // row b*K + k: image b with prompt k
//! assert_eq!(out.text.dims(), &[6, 5, 16]);
//! assert_eq!(out.text_mask.dims(), &[6, 5]);
//!
//! let calibrator: Box<dyn Calibrator> = Box::new(vlcm);
//! let again = calibrator.calibrate(&vision, &text, &text_mask, k)?;
//! assert_eq!(again.text.dims(), out.text.dims());
//! # Ok::<(), tgc_vlcm::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use tgc_nn::Linear;
use tgc_nn::{LayerNorm, MhaConfig, MultiHeadAttention};

/// Errors of the VLCM module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input tensor has the wrong rank, size or does not agree with another input.
    #[error("VLCM: tensor `{tensor}`: {message}")]
    Shape {
        /// Name of the offending input (`vision`, `text`, `text_mask`, `k`).
        tensor: &'static str,
        /// What is wrong, with the shapes involved.
        message: String,
    },
    /// The configuration cannot build a module, or a variant name is unknown.
    #[error("VLCM: invalid config: {0}")]
    Config(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which calibration to run (the paper's alignment ablation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VlcmVariant {
    /// Gated shared context, both modalities attend it (the paper's VLCM; default).
    #[default]
    Gated,
    /// `F'_V = LN(V + MHA(Q=V, K=V=T))`, `F'_T = LN(T + MHA(Q=T, K=V=V))`.
    #[serde(alias = "bicrossattn", alias = "bi")]
    BiCrossAttn,
    /// `F'_V = LN(V + MHA(Q=V, K=V=T))` (vision attends text), `F'_T = T`.
    #[serde(alias = "singlecrossattn", alias = "single")]
    SingleCrossAttn,
    /// No calibration: `F'_V = V`, `F'_T = T` (text still projected to `D`).
    #[serde(alias = "none")]
    Identity,
}

impl VlcmVariant {
    /// All variants, in the order of the paper's ablation table (strongest first).
    pub const ALL: [VlcmVariant; 4] = [
        VlcmVariant::Gated,
        VlcmVariant::BiCrossAttn,
        VlcmVariant::SingleCrossAttn,
        VlcmVariant::Identity,
    ];

    /// The snake_case name used by serde, `Display` and `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            VlcmVariant::Gated => "gated",
            VlcmVariant::BiCrossAttn => "bi_cross_attn",
            VlcmVariant::SingleCrossAttn => "single_cross_attn",
            VlcmVariant::Identity => "identity",
        }
    }
}

impl fmt::Display for VlcmVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for VlcmVariant {
    type Err = Error;

    /// Parses the snake_case name (case-insensitive; `-` is accepted for `_`).
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        match norm.as_str() {
            "gated" => Ok(VlcmVariant::Gated),
            "bi_cross_attn" | "bicrossattn" | "bi" => Ok(VlcmVariant::BiCrossAttn),
            "single_cross_attn" | "singlecrossattn" | "single" => Ok(VlcmVariant::SingleCrossAttn),
            "identity" | "none" => Ok(VlcmVariant::Identity),
            _ => Err(Error::Config(format!(
                "unknown VLCM variant `{s}` (expected gated, bi_cross_attn, \
                 single_cross_attn or identity)"
            ))),
        }
    }
}

/// Configuration of [`Vlcm`]. `Default` is the paper's (`D = 256`, CLIP ViT-L/14 text).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VlcmConfig {
    /// Model width `D` of the visual features (MSDeformAttn `d_model`, 256).
    pub d_model: usize,
    /// Width `D_t` of the text features from DATE (768).
    pub text_dim: usize,
    /// Attention heads; must divide `d_model` (8).
    pub heads: usize,
    /// Which calibration to run ([`VlcmVariant::Gated`]).
    pub variant: VlcmVariant,
    /// Epsilon of the layer norms (1e-5).
    pub eps: f64,
}

impl Default for VlcmConfig {
    fn default() -> Self {
        Self {
            d_model: 256,
            text_dim: 768,
            heads: 8,
            variant: VlcmVariant::Gated,
            eps: 1e-5,
        }
    }
}

impl VlcmConfig {
    /// Number of trainable parameters of a [`Vlcm`] with this configuration.
    ///
    /// Text projection `D_t D + D`; per attention branch `4 (D² + D)` (q, k, v, out) plus
    /// a layer norm `2 D`; per gate `2 D · D + D`. Gated: projection + 2 gates + 2
    /// branches (986,880 for the paper's config); BiCrossAttn: projection + 2 branches;
    /// SingleCrossAttn: projection + 1 branch; Identity: projection only.
    pub fn num_params(&self) -> usize {
        let (d, dt) = (self.d_model, self.text_dim);
        let proj = dt * d + d;
        let branch = 4 * (d * d + d) + 2 * d;
        let gate = 2 * d * d + d;
        match self.variant {
            VlcmVariant::Gated => proj + 2 * gate + 2 * branch,
            VlcmVariant::BiCrossAttn => proj + 2 * branch,
            VlcmVariant::SingleCrossAttn => proj + branch,
            VlcmVariant::Identity => proj,
        }
    }
}

/// Calibrated features of [`Vlcm::forward`], one row per (image, prompt) pair.
#[derive(Clone, Debug)]
pub struct VlcmOutput {
    /// `F'_V`: `(B*K) x D x h x w`; row `b*K + k` is image `b` calibrated with prompt `k`.
    pub vision: Tensor,
    /// `F'_T`: `(B*K) x L x D`. Rows at padded positions are computed but meaningless.
    pub text: Tensor,
    /// The text mask, unchanged: `(B*K) x L`, 1 = token.
    pub text_mask: Tensor,
}

/// Object-safe interface of a vision-language calibration, so the model crate can hold
/// `Box<dyn Calibrator>` and swap implementations for ablations.
pub trait Calibrator: Send + Sync {
    /// Calibrates vision and text features; see [`Vlcm::forward`] for shapes.
    fn calibrate(
        &self,
        vision: &Tensor,
        text: &Tensor,
        text_mask: &Tensor,
        k: usize,
    ) -> Result<VlcmOutput>;
}

/// Token-wise gate `sigmoid(W [X ; s] + b)` with `W` of shape `D x 2D`.
///
/// The weight is one PyTorch-style `Linear(2D -> D)` (`weight`, `bias`), applied as
/// `X W_xᵀ + (s W_sᵀ + b)` so the summary's product is computed once per sequence
/// instead of once per token (identical to concatenating `s` to every token).
#[derive(Clone, Debug)]
struct Gate {
    tokens: Linear,
    summary: Linear,
}

impl Gate {
    fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        let full = tgc_nn::linear_xavier(2 * d, d, vb)?;
        let w = full.weight();
        let tokens = Linear::new(w.narrow(1, 0, d)?, None);
        let summary = Linear::new(w.narrow(1, d, d)?, full.bias().cloned());
        Ok(Self { tokens, summary })
    }

    /// `x`: `B x N x D`, `s`: `B x D` -> gate values in (0, 1), `B x N x D`.
    fn forward(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        let per_token = self.tokens.forward(x)?;
        let per_seq = self.summary.forward(s)?.unsqueeze(1)?;
        Ok(candle_nn::ops::sigmoid(
            &per_token.broadcast_add(&per_seq)?,
        )?)
    }
}

/// Residual cross-attention branch `LN(X + MHA(Q=X, K=V=ctx))`.
#[derive(Clone, Debug)]
struct Branch {
    attn: MultiHeadAttention,
    norm: LayerNorm,
}

impl Branch {
    fn new(cfg: &VlcmConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let attn = MultiHeadAttention::new(
            MhaConfig {
                q_dim: d,
                kv_dim: d,
                dim: d,
                heads: cfg.heads,
            },
            vb.pp("attn"),
        )?;
        let norm = tgc_nn::layer_norm(d, cfg.eps, vb.pp("norm"))?;
        Ok(Self { attn, norm })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, ctx_mask: Option<&Tensor>) -> Result<Tensor> {
        let attended = self.attn.forward(x, ctx, ctx_mask)?;
        Ok(self.norm.forward(&(x + attended)?)?)
    }
}

/// The VLCM module and its ablation variants.
///
/// Parameters (under the `VarBuilder` prefix), depending on the variant:
/// `text_proj.{weight,bias}` (all); `vision_branch.attn.{q,k,v,out}_proj.*` and
/// `vision_branch.norm.*` (all but Identity); `text_branch.*` (Gated, BiCrossAttn);
/// `gate_v.{weight,bias}` and `gate_t.{weight,bias}` (Gated; `weight` is `D x 2D`, the
/// first `D` columns act on the tokens, the last `D` on the other modality's summary).
#[derive(Clone, Debug)]
pub struct Vlcm {
    text_proj: Linear,
    gate_v: Option<Gate>,
    gate_t: Option<Gate>,
    vision_branch: Option<Branch>,
    text_branch: Option<Branch>,
    variant: VlcmVariant,
    d_model: usize,
    text_dim: usize,
}

impl Vlcm {
    /// Builds VLCM under `vb`; only the parameters of `cfg.variant` are created.
    pub fn new(cfg: &VlcmConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.d_model == 0 || cfg.text_dim == 0 {
            return Err(Error::Config(format!(
                "d_model ({}) and text_dim ({}) must be positive",
                cfg.d_model, cfg.text_dim
            )));
        }
        if cfg.heads == 0 || !cfg.d_model.is_multiple_of(cfg.heads) {
            return Err(Error::Config(format!(
                "d_model {} is not divisible by heads {}",
                cfg.d_model, cfg.heads
            )));
        }
        let v = cfg.variant;
        let gated = v == VlcmVariant::Gated;
        let text_proj = tgc_nn::linear_xavier(cfg.text_dim, cfg.d_model, vb.pp("text_proj"))?;
        let vision_branch = match v {
            VlcmVariant::Identity => None,
            _ => Some(Branch::new(cfg, vb.pp("vision_branch"))?),
        };
        let text_branch = match v {
            VlcmVariant::Gated | VlcmVariant::BiCrossAttn => {
                Some(Branch::new(cfg, vb.pp("text_branch"))?)
            }
            _ => None,
        };
        let (gate_v, gate_t) = if gated {
            (
                Some(Gate::new(cfg.d_model, vb.pp("gate_v"))?),
                Some(Gate::new(cfg.d_model, vb.pp("gate_t"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            text_proj,
            gate_v,
            gate_t,
            vision_branch,
            text_branch,
            variant: v,
            d_model: cfg.d_model,
            text_dim: cfg.text_dim,
        })
    }

    /// The variant this module runs.
    pub fn variant(&self) -> VlcmVariant {
        self.variant
    }

    /// Calibrates the visual and text features per (image, prompt) pair.
    ///
    /// - `vision` (`F_V^1/32`): `B x D x h x w`.
    /// - `text` (`F_T`): `(B*K) x L x D_t`; rows `b*K .. b*K + K - 1` are the prompts of
    ///   image `b`.
    /// - `text_mask`: `(B*K) x L`, 1.0 for tokens and 0.0 for padding; padded tokens never
    ///   act as keys, so their content does not change `F'_V` or the valid rows of `F'_T`.
    /// - `k`: prompts per image (`K >= 1`).
    ///
    /// Returns [`VlcmOutput`]: `F'_V` as `(B*K) x D x h x w` (vision repeated per prompt),
    /// `F'_T` as `(B*K) x L x D`, and the text mask.
    pub fn forward(
        &self,
        vision: &Tensor,
        text: &Tensor,
        text_mask: &Tensor,
        k: usize,
    ) -> Result<VlcmOutput> {
        let (b, d, h, w) = self.check_inputs(vision, text, text_mask, k)?;
        let (n, bk) = (h * w, b * k);
        // B x D x h x w -> B x N x D, then one copy per prompt: row b*K + k.
        let v_tok = vision.flatten_from(2)?.transpose(1, 2)?;
        let v = v_tok
            .unsqueeze(1)?
            .broadcast_as((b, k, n, d))?
            .contiguous()?
            .reshape((bk, n, d))?;
        let t = self.text_proj.forward(text)?;
        let mask = text_mask.to_dtype(t.dtype())?;

        let (v_out, t_out) = match self.variant {
            VlcmVariant::Identity => (v, t),
            VlcmVariant::SingleCrossAttn => {
                let vb = self.branch(&self.vision_branch, "vision_branch")?;
                (vb.forward(&v, &t, Some(&mask))?, t)
            }
            VlcmVariant::BiCrossAttn => {
                let vb = self.branch(&self.vision_branch, "vision_branch")?;
                let tb = self.branch(&self.text_branch, "text_branch")?;
                let v_out = vb.forward(&v, &t, Some(&mask))?;
                let t_out = tb.forward(&t, &v, None)?;
                (v_out, t_out)
            }
            VlcmVariant::Gated => {
                let vb = self.branch(&self.vision_branch, "vision_branch")?;
                let tb = self.branch(&self.text_branch, "text_branch")?;
                let (gv, gt) = match (&self.gate_v, &self.gate_t) {
                    (Some(gv), Some(gt)) => (gv, gt),
                    _ => return Err(Error::Config("gated VLCM built without gates".into())),
                };
                let v_sum = v.mean(1)?;
                let t_sum = tgc_nn::masked_mean(&t, &mask)?;
                let g_v = gv.forward(&v, &t_sum)?;
                let g_t = gt.forward(&t, &v_sum)?;
                let ctx = Tensor::cat(&[(g_v * &v)?, (g_t * &t)?], 1)?;
                let ones = Tensor::ones((bk, n), mask.dtype(), mask.device())?;
                let ctx_mask = Tensor::cat(&[&ones, &mask], 1)?;
                let v_out = vb.forward(&v, &ctx, Some(&ctx_mask))?;
                let t_out = tb.forward(&t, &ctx, Some(&ctx_mask))?;
                (v_out, t_out)
            }
        };
        let vision_out = v_out
            .transpose(1, 2)?
            .contiguous()?
            .reshape((bk, d, h, w))?;
        Ok(VlcmOutput {
            vision: vision_out,
            text: t_out,
            text_mask: text_mask.clone(),
        })
    }

    fn branch<'a>(&self, b: &'a Option<Branch>, name: &str) -> Result<&'a Branch> {
        b.as_ref().ok_or_else(|| {
            Error::Config(format!("variant {} built without its {name}", self.variant))
        })
    }

    /// Validates ranks and sizes; returns `(B, D, h, w)`.
    fn check_inputs(
        &self,
        vision: &Tensor,
        text: &Tensor,
        text_mask: &Tensor,
        k: usize,
    ) -> Result<(usize, usize, usize, usize)> {
        let (b, d, h, w) = match vision.dims() {
            &[b, d, h, w] => (b, d, h, w),
            dims => {
                return Err(Error::Shape {
                    tensor: "vision",
                    message: format!("expected B x D x h x w, got {dims:?}"),
                })
            }
        };
        if d != self.d_model {
            return Err(Error::Shape {
                tensor: "vision",
                message: format!(
                    "channel dimension {d} does not match d_model {} (shape {:?})",
                    self.d_model,
                    vision.dims()
                ),
            });
        }
        if b == 0 || h * w == 0 {
            return Err(Error::Shape {
                tensor: "vision",
                message: format!("empty batch or grid: {:?}", vision.dims()),
            });
        }
        if k == 0 {
            return Err(Error::Shape {
                tensor: "k",
                message: "prompts per image must be at least 1".into(),
            });
        }
        let (bk, l) = match text.dims() {
            &[bk, l, dt] if dt == self.text_dim => (bk, l),
            dims => {
                return Err(Error::Shape {
                    tensor: "text",
                    message: format!("expected (B*K) x L x {}, got {dims:?}", self.text_dim),
                })
            }
        };
        if bk != b * k {
            return Err(Error::Shape {
                tensor: "text",
                message: format!(
                    "batch {bk} is not B*K = {b}*{k} = {} (vision batch B = {b}, K = {k} \
                     prompts per image)",
                    b * k
                ),
            });
        }
        if l == 0 {
            return Err(Error::Shape {
                tensor: "text",
                message: "zero-length text sequence".into(),
            });
        }
        if text_mask.dims() != [bk, l] {
            return Err(Error::Shape {
                tensor: "text_mask",
                message: format!(
                    "expected [{bk}, {l}] ((B*K) x L), got {:?}",
                    text_mask.dims()
                ),
            });
        }
        Ok((b, d, h, w))
    }
}

impl Calibrator for Vlcm {
    fn calibrate(
        &self,
        vision: &Tensor,
        text: &Tensor,
        text_mask: &Tensor,
        k: usize,
    ) -> Result<VlcmOutput> {
        self.forward(vision, text, text_mask, k)
    }
}
