//! # tgc-nn: gradient-correct building blocks for the TGC-Net crates
//!
//! Candle 0.11's fused `LayerNorm` and `softmax_last_dim` have no backward pass: calling
//! `backward()` through them returns `Ok` with the gradients silently missing, and
//! `upsample_bilinear2d` has no backward at all. Every trainable module of TGC-Net (SSE,
//! DATE, VLCM, the decoder, the MSDeformAttn encoder) needs those operations, so this crate
//! provides versions built from differentiable primitives, tested against finite
//! differences:
//!
//! - [`LayerNorm`] / [`layer_norm`]: normalisation over the last dimension (a fused
//!   kernel with analytic backward on CPU, the composite form elsewhere).
//! - [`GroupNorm`] / [`group_norm`]: `candle_nn::GroupNorm` fused into one CPU op with an
//!   analytic backward (same weights and names; the composite form elsewhere).
//! - [`MultiHeadAttention`]: scaled dot-product attention with separate query and key/value
//!   widths and an optional key-padding mask (text tokens after EOS).
//! - [`resize_bilinear`]: PyTorch `interpolate(mode="bilinear", align_corners=False)` as two
//!   matrix products, so gradients flow to the input.
//! - [`masked_mean`]: mean over valid tokens.
//! - [`dropout`] / [`seed_dropout`]: inverted dropout whose CPU masks are reproducible
//!   and whose backward pass keeps no gradient for the mask (candle's does, at the
//!   size of the input).
//! - [`softmax_last_dim`]: a fused softmax with an analytic backward (candle's fused one
//!   has no backward; the generic one is several times slower).
//! - [`Linear`]: `nn.Linear` with a fused bias add (candle's spends more time on the bias
//!   gradient than on the matrix product for `B x T x D` inputs), and [`linear_xavier`]:
//!   one with Xavier-uniform weights and zero bias (the init Deformable DETR and CAT-Seg
//!   use for their projections).
//! - [`MatmulConv`] / [`conv2d`] and [`MatmulConvTranspose`] / [`conv_transpose2d`]:
//!   convolutions ("same" odd kernels, `kernel == stride` patch convolutions, and
//!   `kernel == stride` transposed convolutions) as an unfold and one matrix product, so
//!   the backward pass is matrix products too (candle's CPU conv backward and transposed
//!   convolution are naive loops). Same weights and names as `candle_nn`'s.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let ln = tgc_nn::layer_norm(8, 1e-5, vb.pp("norm"))?;
//! let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
//! let y = ln.forward(&x)?;
//! assert_eq!(y.dims(), &[2, 3, 8]);
//! let up = tgc_nn::resize_bilinear(&Tensor::ones((1, 1, 4, 4), DType::F32, &dev)?, 8, 8)?;
//! assert_eq!(up.dims(), &[1, 1, 8, 8]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// The elements of a contiguous CPU tensor's storage; `what` names the tensor in the
/// error (the fused kernels below only take contiguous inputs).
pub(crate) fn contiguous_slice<'a, T>(
    v: &'a [T],
    l: &candle_core::Layout,
    what: &str,
) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
    Ok(&v[a..b])
}

mod conv;
mod dropout;
mod group_norm;
mod kernel;
mod layer_norm;
mod linear;
pub mod reference;
mod softmax;
pub use conv::{
    conv2d, conv2d_no_bias, conv_transpose2d, conv_transpose2d_no_bias, MatmulConv,
    MatmulConvTranspose,
};
pub use dropout::{dropout, seed_dropout};
pub use group_norm::{group_norm, GroupNorm};
pub use linear::{add_bias, Linear};
pub use softmax::softmax_last_dim;

/// Layer normalisation over the last dimension, with a working backward pass.
///
/// Weight names: `weight` (ones) and `bias` (zeros), as in PyTorch.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Builds a layer norm from existing parameters.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

/// Creates a [`LayerNorm`] of width `dim` under `vb` (`weight` = 1, `bias` = 0).
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
    Ok(LayerNorm::new(weight, bias, eps))
}

impl LayerNorm {
    /// The same normalisation from nine differentiable candle ops: the fallback on
    /// devices without the fused kernel, and the test oracle for it.
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / dim)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / dim)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

impl Module for LayerNorm {
    /// `x`: `... x dim` -> `... x dim`. Fused kernel with analytic backward on CPU
    /// (f32/f64), [`LayerNorm::forward_composite`] elsewhere.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match layer_norm::fused_layer_norm(x, &self.weight, &self.bias, self.eps)? {
            Some(y) => Ok(y),
            None => self.forward_composite(x),
        }
    }
}

/// A [`Linear`] layer initialised as `candle_nn::linear` (and PyTorch's `nn.Linear`):
/// Kaiming-normal weight, bias uniform in `+-1/sqrt(in_dim)`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// A `Linear` layer with Xavier-uniform weight and zero bias, named `weight` / `bias`.
pub fn linear_xavier(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = (6.0 / (in_dim + out_dim) as f64).sqrt();
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

/// Widths of a [`MultiHeadAttention`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MhaConfig {
    /// Width of the query input.
    pub q_dim: usize,
    /// Width of the key/value input.
    pub kv_dim: usize,
    /// Internal and output width (split across heads).
    pub dim: usize,
    /// Number of heads; must divide `dim`.
    pub heads: usize,
}

/// Multi-head scaled dot-product attention with an optional key-padding mask.
///
/// Parameters: `q_proj` (q_dim -> dim), `k_proj`, `v_proj` (kv_dim -> dim) and
/// `out_proj` (dim -> dim), all Xavier-initialised with zero bias.
#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl MultiHeadAttention {
    /// Creates the attention block under `vb`.
    pub fn new(cfg: MhaConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.heads == 0 || !cfg.dim.is_multiple_of(cfg.heads) {
            candle_core::bail!(
                "MultiHeadAttention: dim {} is not divisible by heads {}",
                cfg.dim,
                cfg.heads
            );
        }
        Ok(Self {
            q_proj: linear_xavier(cfg.q_dim, cfg.dim, vb.pp("q_proj"))?,
            k_proj: linear_xavier(cfg.kv_dim, cfg.dim, vb.pp("k_proj"))?,
            v_proj: linear_xavier(cfg.kv_dim, cfg.dim, vb.pp("v_proj"))?,
            out_proj: linear_xavier(cfg.dim, cfg.dim, vb.pp("out_proj"))?,
            heads: cfg.heads,
            head_dim: cfg.dim / cfg.heads,
        })
    }

    /// Attention of `q` over `kv`.
    ///
    /// - `q`: `B x Lq x q_dim`
    /// - `kv`: `B x Lk x kv_dim`
    /// - `key_padding_mask`: optional `B x Lk`, 1.0 for real tokens and 0.0 for padding;
    ///   padded keys get no attention weight.
    ///
    /// Returns `B x Lq x dim`.
    pub fn forward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        key_padding_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, lq, _) = q.dims3()?;
        let (_, lk, _) = kv.dims3()?;
        let split = |x: Tensor, l: usize| -> Result<Tensor> {
            x.reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let qh = split(q.apply(&self.q_proj)?, lq)?;
        let kh = split(kv.apply(&self.k_proj)?, lk)?;
        let vh = split(kv.apply(&self.v_proj)?, lk)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (qh.matmul(&kh.t()?)? * scale)?;
        if let Some(mask) = key_padding_mask {
            // Large negative bias on padded keys; softmax then gives them ~0 weight.
            let bias = ((mask.to_dtype(scores.dtype())? - 1.0)? * 1e9)?.reshape((b, 1, 1, lk))?;
            scores = scores.broadcast_add(&bias)?;
        }
        let attn = softmax_last_dim(&scores)?;
        let out =
            attn.matmul(&vh)?
                .transpose(1, 2)?
                .reshape((b, lq, self.heads * self.head_dim))?;
        out.apply(&self.out_proj)
    }
}

/// Mean of `x` (`B x L x D`) over the tokens where `mask` (`B x L`, 1 = valid) is set.
///
/// Returns `B x D`. A row with no valid token gives zeros.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?.unsqueeze(D::Minus1)?;
    let sum = x.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1.0, f64::INFINITY)?;
    sum.broadcast_div(&count)
}

/// Interpolation matrix `out x inp` of 1-D linear resampling with
/// `align_corners = False` (PyTorch's convention; no antialiasing).
pub fn bilinear_matrix(inp: usize, out: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let w1 = src - i0 as f64;
        m[o * inp + i0] += (1.0 - w1) as f32;
        m[o * inp + i1] += w1 as f32;
    }
    Tensor::from_vec(m, (out, inp), dev)?.to_dtype(dtype)
}

/// Bilinear resize of `x` (`B x C x H x W`) to `B x C x out_h x out_w`, matching
/// `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`.
///
/// Computed as `M_h · x · M_wᵀ` so the backward pass is exact (candle's
/// `upsample_bilinear2d` has none).
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let mh = bilinear_matrix(h, out_h, x.dtype(), x.device())?;
    let mwt = bilinear_matrix(w, out_w, x.dtype(), x.device())?.t()?;
    // (B*C*H) x W  @  W x out_w
    let xw = x.reshape((b * c * h, w))?.matmul(&mwt)?;
    // (B*C*out_w) x H  @  H x out_h, then back to B x C x out_h x out_w
    let xw = xw
        .reshape((b * c, h, out_w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * c * out_w, h))?;
    let y = xw.matmul(&mh.t()?)?.reshape((b * c, out_w, out_h))?;
    y.transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, out_h, out_w))
}

/// A `VarBuilder` backend that creates missing variables in a [`candle_nn::VarMap`] with values drawn
/// from a generator seeded by `seed` and the variable's name.
///
/// Candle's own `VarMap` initialises from an unseedable thread RNG on CPU; this makes a
/// fresh model bit-for-bit reproducible from its seed, independent of the order in which
/// modules are built. The distributions are those of the [`Init`] hints (constant,
/// normal, uniform, Kaiming), as candle draws them.
pub struct SeededVarMap {
    varmap: candle_nn::VarMap,
    seed: u64,
}

impl SeededVarMap {
    /// Wraps `varmap` (shared: variables created here land in it).
    pub fn new(varmap: &candle_nn::VarMap, seed: u64) -> Self {
        Self {
            varmap: varmap.clone(),
            seed,
        }
    }

    /// A `VarBuilder` over this backend.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

/// SplitMix64: small, fast, and good enough for initial weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn seeded_values(shape: &candle_core::Shape, init: Init, seed: u64, name: &str) -> Vec<f64> {
    use candle_nn::init::NormalOrUniform;
    let n = shape.elem_count();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = SplitMix64(h);
    let (normal, a, b) = match init {
        Init::Const(c) => return vec![c; n],
        Init::Randn { mean, stdev } => (true, mean, stdev),
        Init::Uniform { lo, up } => (false, lo, up),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => (true, 0.0, std),
                NormalOrUniform::Uniform => (false, -(3f64.sqrt()) * std, 3f64.sqrt() * std),
            }
        }
    };
    (0..n)
        .map(|_| {
            if normal {
                a + b * rng.normal()
            } else {
                a + (b - a) * rng.uniform()
            }
        })
        .collect()
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock poisoned");
        if let Some(v) = data.get(name) {
            let t = v.as_tensor();
            if t.shape() != &s {
                candle_core::bail!(
                    "variable {name} exists with shape {:?}, requested {:?}",
                    t.dims(),
                    s.dims()
                );
            }
            return t.to_dtype(dtype);
        }
        let values = seeded_values(&s, h, self.seed, name);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = candle_core::Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock poisoned");
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("variable {name} does not exist and has no shape hint"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock poisoned")
            .contains_key(name)
    }
}
