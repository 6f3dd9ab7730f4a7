//! # tgc-date: DATE, the Domain-Augmented Text Encoder fusion of TGC-Net
//!
//! TGC-Net encodes two prompts per image with the same frozen text encoder: the primary
//! prompt `T_p` (the report sentence, e.g. "bilateral pulmonary infection, two infected
//! areas") and an auxiliary prompt `T_a` (domain knowledge about the finding, written by
//! an LLM). DATE lets the domain knowledge attend to the report and adds the result back
//! onto the report's tokens:
//!
//! ```text
//! F_infused = CrossAttn(Q = F_a, K = F_p, V = F_p)
//! F_T       = LN(F_p + Dropout(F_infused))
//! ```
//!
//! This crate takes the per-token text states only (`N x L x D_t`, with key-padding masks);
//! running the text encoder is the job of `tgc-model`. Because the residual sum is taken
//! position by position, both prompts must be tokenised to the same length `L` (77 for
//! CLIP, which pads every prompt to its context length).
//!
//! **Output mask.** [`Date::forward`] returns the *primary* mask with `F_T`: position `i` of
//! `F_T` is the primary token `i` refined by the auxiliary prompt, so the primary prompt's
//! EOS position stays the pooling position (CLIP) and positions past the primary's end
//! remain padding.
//!
//! **Ablations.** "main only" and "aux only" (the paper's text ablation) are handled by the
//! model crate by skipping DATE and feeding one prompt's states directly; the
//! "LLM-expanded" ablation concatenates the texts at tokenisation. [`TextFusion`] is the
//! object-safe trait the model crate holds (`Box<dyn TextFusion>`) so another fusion can be
//! swapped in.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use tgc_date::{Date, DateConfig, TextFusion};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! // A small configuration; `DateConfig::default()` is the paper's (768 wide, 8 heads).
//! let cfg = DateConfig { text_dim: 32, heads: 4, ..DateConfig::default() };
//! let date = Date::new(&cfg, vb.pp("date"))?;
//!
//! let (n, l) = (2, 7);
//! let primary = Tensor::randn(0f32, 1.0, (n, l, 32), &dev)?;
//! let aux = Tensor::randn(0f32, 1.0, (n, l, 32), &dev)?;
//! // 1 = token, 0 = padding: prompt 0 has 5 tokens, prompt 1 has 7.
//! let primary_mask = Tensor::new(&[[1f32, 1., 1., 1., 1., 0., 0.], [1.; 7]], &dev)?;
//! let aux_mask = Tensor::ones((n, l), DType::F32, &dev)?;
//!
//! let (f_t, mask) = date.forward(&primary, &primary_mask, &aux, &aux_mask, false)?;
//! assert_eq!(f_t.dims(), &[2, 7, 32]);
//! assert_eq!(mask.dims(), &[2, 7]);
//!
//! // The same module through the trait object the model crate holds.
//! let fusion: Box<dyn TextFusion> = Box::new(date);
//! let (again, _) = fusion.fuse(&primary, &primary_mask, &aux, &aux_mask, false)?;
//! assert_eq!(again.dims(), f_t.dims());
//! # Ok::<(), tgc_date::Error>(())
//! ```

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use tgc_nn::{LayerNorm, MhaConfig, MultiHeadAttention};

/// Errors of the DATE module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input tensor has the wrong rank, size or does not agree with another input.
    #[error("DATE: tensor `{tensor}`: {message}")]
    Shape {
        /// Name of the offending input (`primary`, `aux_mask`, ...).
        tensor: &'static str,
        /// What is wrong, with the shapes involved.
        message: String,
    },
    /// The configuration cannot build a module.
    #[error("DATE: invalid config: {0}")]
    Config(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Configuration of [`Date`]. `Default` is the paper's (CLIP ViT-L/14 text width).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DateConfig {
    /// Width `D_t` of the text encoder's per-token states (768 for CLIP ViT-L/14).
    pub text_dim: usize,
    /// Attention heads of the cross-attention; must divide `text_dim` (8).
    pub heads: usize,
    /// Dropout on the infused features before the residual sum, in training only (0.1).
    pub dropout: f64,
    /// Epsilon of the layer norm (1e-5, PyTorch's default).
    pub eps: f64,
}

impl Default for DateConfig {
    fn default() -> Self {
        Self {
            text_dim: 768,
            heads: 8,
            dropout: 0.1,
            eps: 1e-5,
        }
    }
}

impl DateConfig {
    /// Number of trainable parameters of a [`Date`] with this configuration:
    /// four `D_t x D_t` projections with bias (q, k, v, out) plus the layer norm,
    /// `4 (D_t² + D_t) + 2 D_t` (2,363,904 for the paper's `D_t = 768`).
    pub fn num_params(&self) -> usize {
        let d = self.text_dim;
        4 * (d * d + d) + 2 * d
    }
}

/// Object-safe interface of a text fusion (primary + auxiliary prompt -> one sequence), so
/// the model crate can hold `Box<dyn TextFusion>` and swap implementations for ablations.
pub trait TextFusion: Send + Sync {
    /// Fuses the primary and auxiliary prompt states; see [`Date::forward`] for shapes.
    fn fuse(
        &self,
        primary: &Tensor,
        primary_mask: &Tensor,
        aux: &Tensor,
        aux_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)>;
}

/// The DATE module: cross-attention of the auxiliary prompt over the primary prompt,
/// residual onto the primary prompt, layer norm.
///
/// Parameters (under the `VarBuilder` prefix): `cross_attn.{q,k,v,out}_proj.{weight,bias}`
/// (Xavier-uniform weights, zero biases) and `norm.{weight,bias}`.
#[derive(Clone, Debug)]
pub struct Date {
    cross_attn: MultiHeadAttention,
    norm: LayerNorm,
    dropout: f64,
    text_dim: usize,
}

impl Date {
    /// Builds DATE under `vb`.
    pub fn new(cfg: &DateConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.heads == 0 || !cfg.text_dim.is_multiple_of(cfg.heads) {
            return Err(Error::Config(format!(
                "text_dim {} is not divisible by heads {}",
                cfg.text_dim, cfg.heads
            )));
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(Error::Config(format!(
                "dropout must be in [0, 1), got {}",
                cfg.dropout
            )));
        }
        let cross_attn = MultiHeadAttention::new(
            MhaConfig {
                q_dim: cfg.text_dim,
                kv_dim: cfg.text_dim,
                dim: cfg.text_dim,
                heads: cfg.heads,
            },
            vb.pp("cross_attn"),
        )?;
        let norm = tgc_nn::layer_norm(cfg.text_dim, cfg.eps, vb.pp("norm"))?;
        Ok(Self {
            cross_attn,
            norm,
            dropout: cfg.dropout,
            text_dim: cfg.text_dim,
        })
    }

    /// Fuses the two prompts: `F_T = LN(F_p + Dropout(CrossAttn(Q=F_a, K=V=F_p)))`.
    ///
    /// - `primary` (`F_p`): `N x L x D_t`, per-token states of the report sentence.
    /// - `primary_mask`: `N x L`, 1.0 for tokens and 0.0 for padding. It masks the keys of
    ///   the cross-attention, so padding of the primary prompt never contributes.
    /// - `aux` (`F_a`): `N x L x D_t`, per-token states of the auxiliary prompt, tokenised
    ///   to the same length `L` (the residual sum is position-wise).
    /// - `aux_mask`: `N x L`. Checked for shape only: the auxiliary tokens are the
    ///   *queries*, which need no mask, and every query position, padded or not, yields a
    ///   well-defined row (a mixture of valid primary tokens). Zeroing the infusion at
    ///   auxiliary padding would withhold the domain knowledge from the primary prompt's
    ///   EOS token whenever the auxiliary prompt is the shorter one.
    /// - `train`: applies dropout to the infused features.
    ///
    /// Returns `(F_T, mask)`: `F_T` is `N x L x D_t` and `mask` is `primary_mask`
    /// (`N x L`), since row `i` of `F_T` is primary token `i` refined.
    pub fn forward(
        &self,
        primary: &Tensor,
        primary_mask: &Tensor,
        aux: &Tensor,
        aux_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        self.check_inputs(primary, primary_mask, aux, aux_mask)?;
        let key_mask = primary_mask.to_dtype(primary.dtype())?;
        let mut infused = self.cross_attn.forward(aux, primary, Some(&key_mask))?;
        if train && self.dropout > 0.0 {
            infused = tgc_nn::dropout(&infused, self.dropout as f32)?;
        }
        let f_t = self.norm.forward(&(primary + infused)?)?;
        Ok((f_t, primary_mask.clone()))
    }

    /// Validates ranks and sizes of the inputs.
    fn check_inputs(
        &self,
        primary: &Tensor,
        primary_mask: &Tensor,
        aux: &Tensor,
        aux_mask: &Tensor,
    ) -> Result<()> {
        let seq = |name: &'static str, t: &Tensor| -> Result<(usize, usize)> {
            match t.dims() {
                &[n, l, d] if d == self.text_dim => Ok((n, l)),
                &[_, _, d] => Err(Error::Shape {
                    tensor: name,
                    message: format!("width {d} does not match text_dim {}", self.text_dim),
                }),
                dims => Err(Error::Shape {
                    tensor: name,
                    message: format!("expected N x L x {}, got {dims:?}", self.text_dim),
                }),
            }
        };
        let (n, l) = seq("primary", primary)?;
        let (na, la) = seq("aux", aux)?;
        if (na, la) != (n, l) {
            return Err(Error::Shape {
                tensor: "aux",
                message: format!(
                    "shape {:?} differs from primary {:?}: both prompts must have the same \
                     batch and be tokenised to the same length L (F_p + F_infused is summed \
                     position-wise)",
                    aux.dims(),
                    primary.dims()
                ),
            });
        }
        for (name, m) in [("primary_mask", primary_mask), ("aux_mask", aux_mask)] {
            if m.dims() != [n, l] {
                return Err(Error::Shape {
                    tensor: name,
                    message: format!("expected [{n}, {l}] (N x L), got {:?}", m.dims()),
                });
            }
        }
        Ok(())
    }
}

impl TextFusion for Date {
    fn fuse(
        &self,
        primary: &Tensor,
        primary_mask: &Tensor,
        aux: &Tensor,
        aux_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        self.forward(primary, primary_mask, aux, aux_mask, train)
    }
}
