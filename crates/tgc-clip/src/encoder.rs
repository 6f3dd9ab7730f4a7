//! The pre-norm transformer encoder shared by the CLIP vision and text towers.
//!
//! Weight names follow Hugging Face transformers' `CLIPEncoder`
//! (`layers.N.self_attn.{q,k,v,out}_proj`, `layers.N.layer_norm{1,2}`,
//! `layers.N.mlp.fc{1,2}`).
//!
//! Two [`TowerMode`]s:
//! - [`TowerMode::Frozen`] (the default, and what [`Encoder::new`] builds): the fast
//!   fused candle kernels (`candle_nn::LayerNorm`, `softmax_last_dim`), q/k/v fused
//!   into one matmul and every weight transposed once at load time. Those kernels
//!   have no backward pass, so no gradient flows through a frozen encoder.
//! - [`TowerMode::Trainable`]: the gradient-correct `tgc_nn::LayerNorm` and
//!   `tgc_nn::softmax_last_dim`, and the weights used as given on every call (no
//!   copies made at load time), so that `Var`s among them receive gradients and
//!   in-place optimiser updates take effect on the next forward. Same numerics up to
//!   float rounding.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use serde::{Deserialize, Serialize};

/// How a tower computes: frozen (fused kernels, no backward) or trainable
/// (differentiable kernels, weights used live). See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TowerMode {
    /// Fused candle LayerNorm / softmax, weights pre-transposed and q/k/v pre-fused:
    /// fastest, but gradients silently stop here.
    #[default]
    Frozen,
    /// Gradient-correct tgc-nn LayerNorm / softmax, weights read on every forward:
    /// gradients reach every `Var` the tower was built from.
    Trainable,
}

/// The MLP non-linearity of a CLIP tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: the OpenAI CLIP models.
    #[default]
    QuickGelu,
    /// Exact (erf) GELU: open_clip models trained without `quick_gelu` (e.g. TinyCLIP).
    Gelu,
}

impl Activation {
    /// Applies the activation elementwise.
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

/// Geometry of one transformer encoder stack.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// Token width D.
    pub width: usize,
    /// Number of residual blocks.
    pub layers: usize,
    /// Number of attention heads (D must be divisible by it).
    pub heads: usize,
    /// Hidden width of the MLP.
    pub mlp_dim: usize,
    /// MLP non-linearity.
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for EncoderConfig {
    /// The ViT-L/14 vision encoder (the paper's tower).
    fn default() -> Self {
        Self {
            width: 1024,
            layers: 24,
            heads: 16,
            mlp_dim: 4096,
            activation: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// A bias-carrying linear layer that runs as one 2-D matmul over all tokens.
#[derive(Debug, Clone)]
pub(crate) enum Dense {
    /// Frozen: the weight stored transposed and contiguous once (in x out), so every
    /// forward is a plain gemm.
    Fused {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
    /// Trainable: the weight as given (out x in), transposed as a view on every call,
    /// so gradients reach it and in-place updates are seen.
    Live {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

impl Dense {
    /// `weight`: out x in, `bias`: out.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>, mode: TowerMode) -> Result<Self> {
        Ok(match mode {
            TowerMode::Frozen => Self::Fused {
                weight_t: weight.t()?.contiguous()?,
                bias,
            },
            TowerMode::Trainable => Self::Live { weight, bias },
        })
    }

    pub(crate) fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        mode: TowerMode,
    ) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let b = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(w, b, mode)
    }

    /// `x`: ... x in -> ... x out.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Dense::Fused { weight_t, bias } => linear_rows(x, weight_t, bias.as_ref()),
            Dense::Live { weight, bias } => linear_rows(x, &weight.t()?, bias.as_ref()),
        }
    }
}

/// `x`: ... x in, `weight_t`: in x out (any strides), `bias`: out -> ... x out.
fn linear_rows(x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim.max(1);
    let y = x.reshape((rows, in_dim))?.matmul(weight_t)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = weight_t.dim(1)?;
    y.reshape(out)
}

pub(crate) fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let w = vb.get(dim, "weight")?;
    let b = vb.get(dim, "bias")?;
    Ok(LayerNorm::new(w, b, eps))
}

/// A LayerNorm of either [`TowerMode`].
#[derive(Debug, Clone)]
pub(crate) enum Norm {
    /// candle's fused kernel (no backward).
    Fused(LayerNorm),
    /// tgc-nn's differentiable composite.
    Grad(tgc_nn::LayerNorm),
}

impl Norm {
    pub(crate) fn load(dim: usize, eps: f64, vb: VarBuilder, mode: TowerMode) -> Result<Self> {
        let w = vb.get(dim, "weight")?;
        let b = vb.get(dim, "bias")?;
        Ok(match mode {
            TowerMode::Frozen => Norm::Fused(LayerNorm::new(w, b, eps)),
            TowerMode::Trainable => Norm::Grad(tgc_nn::LayerNorm::new(w, b, eps)),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Fused(n) => n.forward(x),
            Norm::Grad(n) => n.forward(x),
        }
    }
}

/// The q, k and v projections of one attention block.
#[derive(Debug, Clone)]
enum QkvProj {
    /// Frozen: fused into one 3D x D matmul at load time.
    Fused(Dense),
    /// Trainable: the separate weights (D x D each) and biases, concatenated on every
    /// call (the concatenation is differentiable; the matmul stays one gemm).
    Live {
        weights: [Tensor; 3],
        biases: [Tensor; 3],
    },
}

impl QkvProj {
    /// `x`: ... x D -> ... x 3D (q, k, v along the last axis).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            QkvProj::Fused(d) => d.forward(x),
            QkvProj::Live { weights, biases } => {
                let w = Tensor::cat(weights, 0)?;
                let b = Tensor::cat(biases, 0)?;
                linear_rows(x, &w.t()?, Some(&b))
            }
        }
    }
}

/// One pre-norm residual block: `x + Attn(LN1(x))`, then `x + MLP(LN2(x))`.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    layer_norm1: Norm,
    /// q, k and v projections (loaded from the separate `q_proj`/`k_proj`/`v_proj`
    /// tensors), run as one 3D x D matmul.
    qkv: QkvProj,
    out_proj: Dense,
    layer_norm2: Norm,
    fc1: Dense,
    fc2: Dense,
    heads: usize,
    activation: Activation,
    mode: TowerMode,
}

impl EncoderLayer {
    /// Loads one frozen block from `vb` (prefix `...layers.N`).
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with_mode(cfg, vb, TowerMode::Frozen)
    }

    /// Loads one block from `vb` (prefix `...layers.N`) in the given [`TowerMode`].
    pub fn new_with_mode(cfg: &EncoderConfig, vb: VarBuilder, mode: TowerMode) -> Result<Self> {
        let d = cfg.width;
        if cfg.heads == 0 || !d.is_multiple_of(cfg.heads) {
            candle_core::bail!("width {d} is not divisible by heads {}", cfg.heads)
        }
        let att = vb.pp("self_attn");
        let mut ws = Vec::with_capacity(3);
        let mut bs = Vec::with_capacity(3);
        for p in ["q_proj", "k_proj", "v_proj"] {
            ws.push(att.pp(p).get((d, d), "weight")?);
            bs.push(att.pp(p).get(d, "bias")?);
        }
        let qkv = match mode {
            TowerMode::Frozen => QkvProj::Fused(Dense::new(
                Tensor::cat(&ws, 0)?,
                Some(Tensor::cat(&bs, 0)?),
                mode,
            )?),
            TowerMode::Trainable => QkvProj::Live {
                weights: [ws[0].clone(), ws[1].clone(), ws[2].clone()],
                biases: [bs[0].clone(), bs[1].clone(), bs[2].clone()],
            },
        };
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: Norm::load(d, eps, vb.pp("layer_norm1"), mode)?,
            qkv,
            out_proj: Dense::load(att.pp("out_proj"), d, d, true, mode)?,
            layer_norm2: Norm::load(d, eps, vb.pp("layer_norm2"), mode)?,
            fc1: Dense::load(vb.pp("mlp").pp("fc1"), d, cfg.mlp_dim, true, mode)?,
            fc2: Dense::load(vb.pp("mlp").pp("fc2"), cfg.mlp_dim, d, true, mode)?,
            heads: cfg.heads,
            activation: cfg.activation,
            mode,
        })
    }

    /// The mode this block was built in.
    pub fn mode(&self) -> TowerMode {
        self.mode
    }

    /// `x`: B x L x D; `bias`: optional additive attention bias broadcastable to
    /// B x H x L x L (0 = attend, large negative = blocked). Returns B x L x D.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let y = self.layer_norm1.forward(x)?;
        let qkv = self
            .qkv
            .forward(&y)?
            .reshape((b, l, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?; // 3 x B x H x L x hd
        let scale = (hd as f64).powf(-0.5);
        let q = (qkv.get(0)? * scale)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let att = q.matmul(&k.t()?)?; // B x H x L x L
        let att = match bias {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = match self.mode {
            TowerMode::Frozen => candle_nn::ops::softmax_last_dim(&att)?,
            TowerMode::Trainable => tgc_nn::softmax_last_dim(&att)?,
        };
        let o = att
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, d))?;
        let x = (x + self.out_proj.forward(&o)?)?;
        let y = self.layer_norm2.forward(&x)?;
        let y = self
            .fc2
            .forward(&self.activation.apply(&self.fc1.forward(&y)?)?)?;
        x + y
    }
}

/// A stack of [`EncoderLayer`]s (`encoder.layers.*`).
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    /// Loads `cfg.layers` frozen blocks from `vb` (prefix `...encoder`).
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with_mode(cfg, vb, TowerMode::Frozen)
    }

    /// Loads `cfg.layers` blocks from `vb` (prefix `...encoder`) in the given
    /// [`TowerMode`].
    pub fn new_with_mode(cfg: &EncoderConfig, vb: VarBuilder, mode: TowerMode) -> Result<Self> {
        let vl = vb.pp("layers");
        let layers = (0..cfg.layers)
            .map(|i| EncoderLayer::new_with_mode(cfg, vl.pp(i), mode))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Number of blocks.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `x`: B x L x D (the encoder input, i.e. Hugging Face `hidden_states[0]`).
    /// Returns the final B x L x D state and the states at the requested indices
    /// `keep` (index i = Hugging Face `hidden_states[i]`: 0 is the input, i the
    /// output of block i), in the order requested.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        keep: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut kept: Vec<Option<Tensor>> = vec![None; keep.len()];
        let mut store = |i: usize, t: &Tensor| {
            for (slot, &k) in kept.iter_mut().zip(keep) {
                if k == i {
                    *slot = Some(t.clone());
                }
            }
        };
        store(0, x);
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, bias)?;
            store(i + 1, &x);
        }
        let kept = kept
            .into_iter()
            .zip(keep)
            .map(|(t, &k)| {
                t.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "hidden state {k} requested but the encoder has {} layers",
                        self.layers.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((x, kept))
    }
}

/// Softmax-safe "minus infinity" for additive attention biases.
pub(crate) const NEG_INF: f32 = -1e9;
