//! The Deformable DETR layers: [`MsDeformAttn`], [`MsDeformEncoderLayer`],
//! [`MsDeformEncoder`], configured by [`MsDeformAttnConfig`].

use candle_core::{Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use tgc_nn::Linear;

use crate::{ms_deform_attn, Error, MsdaImpl, Result};

/// Configuration of the MSDeformAttn pixel encoder. `Default` gives the paper's values
/// (Deformable DETR defaults with three levels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MsDeformAttnConfig {
    /// Model width `D` (256).
    pub d_model: usize,
    /// Attention heads `M` (8).
    pub n_heads: usize,
    /// Feature levels `L` (3: 1/8, 1/16, 1/32).
    pub n_levels: usize,
    /// Sampling points per head and level `P` (4).
    pub n_points: usize,
    /// Encoder layers (6).
    pub n_layers: usize,
    /// Hidden width of the feed-forward network (1024).
    pub ffn_dim: usize,
    /// Dropout probability in training (0.1); never applied at evaluation.
    pub dropout: f32,
    /// Implementation of the sampling core ([`MsdaImpl::Auto`]: fused where available).
    pub implementation: MsdaImpl,
}

impl Default for MsDeformAttnConfig {
    fn default() -> Self {
        Self {
            d_model: 256,
            n_heads: 8,
            n_levels: 3,
            n_points: 4,
            n_layers: 6,
            ffn_dim: 1024,
            dropout: 0.1,
            implementation: MsdaImpl::Auto,
        }
    }
}

impl MsDeformAttnConfig {
    /// Checks the values that the layers rely on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model ({}) must be a positive multiple of n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        if !self.d_model.is_multiple_of(2) {
            return bad(format!(
                "d_model ({}) must be even (sine position embedding)",
                self.d_model
            ));
        }
        if self.n_levels == 0 || self.n_points == 0 || self.ffn_dim == 0 {
            return bad("n_levels, n_points and ffn_dim must be positive".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout ({}) must be in [0, 1)", self.dropout));
        }
        Ok(())
    }
}

/// Linear layer as PyTorch's `nn.Linear` after Deformable DETR's `_reset_parameters`:
/// Xavier-uniform weight, bias uniform in `+-1/sqrt(in)`.
fn linear_ffn(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = (6.0 / (in_dim + out_dim) as f64).sqrt();
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b_bound = 1.0 / (in_dim as f64).sqrt();
    let b = vb.get_with_hints(
        out_dim,
        "bias",
        Init::Uniform {
            lo: -b_bound,
            up: b_bound,
        },
    )?;
    Ok(Linear::new(w, Some(b)))
}

/// Linear layer with zero weight and a bias given by `bias_init` (a fresh parameter is
/// written in place; a loaded one is kept).
fn linear_zero(
    in_dim: usize,
    out_dim: usize,
    bias_init: Option<Vec<f32>>,
    vb: VarBuilder,
) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?;
    let fresh = !vb.contains_tensor("bias");
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    if let (true, Some(init)) = (fresh, bias_init) {
        // The VarMap returns the variable's own storage: writing into it sets the init.
        let t = Tensor::from_vec(init, out_dim, b.device())?.to_dtype(b.dtype())?;
        b.slice_set(&t, 0, 0)?;
    }
    Ok(Linear::new(w, Some(b)))
}

/// Multi-scale deformable attention module (Deformable DETR's `MSDeformAttn`).
///
/// Parameter names: `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`.
#[derive(Debug, Clone)]
pub struct MsDeformAttn {
    sampling_offsets: Linear,
    attention_weights: Linear,
    value_proj: Linear,
    output_proj: Linear,
    d_model: usize,
    n_heads: usize,
    n_levels: usize,
    n_points: usize,
    imp: MsdaImpl,
}

impl MsDeformAttn {
    /// Builds the module with Deformable DETR's initialisation: zero offset weights with
    /// biases pointing in `n_heads` evenly spread directions, scaled by point index; zero
    /// attention-weight projection; Xavier-uniform value and output projections.
    pub fn new(cfg: &MsDeformAttnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, m, l, p) = (cfg.d_model, cfg.n_heads, cfg.n_levels, cfg.n_points);
        let mut grid = Vec::with_capacity(m * l * p * 2);
        for h in 0..m {
            let theta = h as f64 * (2.0 * std::f64::consts::PI / m as f64);
            let (c, s) = (theta.cos(), theta.sin());
            let norm = c.abs().max(s.abs());
            for _ in 0..l {
                for i in 0..p {
                    grid.push((c / norm * (i + 1) as f64) as f32);
                    grid.push((s / norm * (i + 1) as f64) as f32);
                }
            }
        }
        Ok(Self {
            sampling_offsets: linear_zero(d, m * l * p * 2, Some(grid), vb.pp("sampling_offsets"))?,
            attention_weights: linear_zero(d, m * l * p, None, vb.pp("attention_weights"))?,
            value_proj: tgc_nn::linear_xavier(d, d, vb.pp("value_proj"))?,
            output_proj: tgc_nn::linear_xavier(d, d, vb.pp("output_proj"))?,
            d_model: d,
            n_heads: m,
            n_levels: l,
            n_points: p,
            imp: cfg.implementation,
        })
    }

    /// - `query`: `N x Lq x D` (content + position embedding),
    /// - `reference_points`: `N x Lq x L x 2`, `(x, y)` in `[0, 1]` per level,
    /// - `input_flatten`: `N x S x D`, levels flattened row-major and concatenated,
    /// - `spatial_shapes`: `(H_l, W_l)` per level,
    /// - `padding_mask`: optional `N x S`, 1 where the input is padding (its value is zeroed).
    ///
    /// Returns `N x Lq x D`.
    pub fn forward(
        &self,
        query: &Tensor,
        reference_points: &Tensor,
        input_flatten: &Tensor,
        spatial_shapes: &[(usize, usize)],
        padding_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (n, lq, _) = query.dims3()?;
        let (_, s, _) = input_flatten.dims3()?;
        let (m, l, p) = (self.n_heads, self.n_levels, self.n_points);
        if spatial_shapes.len() != l {
            return Err(Error::Shape(format!(
                "MsDeformAttn built for {l} levels got spatial_shapes {spatial_shapes:?}"
            )));
        }
        if reference_points.dims() != [n, lq, l, 2] {
            return Err(Error::Shape(format!(
                "reference_points must be N x Lq x L x 2 = {:?}, got {:?}",
                [n, lq, l, 2],
                reference_points.dims()
            )));
        }
        let mut value = self.value_proj.forward(input_flatten)?;
        if let Some(mask) = padding_mask {
            let keep = mask
                .to_dtype(value.dtype())?
                .affine(-1.0, 1.0)?
                .unsqueeze(D::Minus1)?;
            value = value.broadcast_mul(&keep)?;
        }
        let value = value.reshape((n, s, m, self.d_model / m))?;
        let offsets = self
            .sampling_offsets
            .forward(query)?
            .reshape((n, lq, m, l, p, 2))?;
        let attn = self
            .attention_weights
            .forward(query)?
            .reshape((n, lq, m, l * p))?;
        let attn = tgc_nn::softmax_last_dim(&attn)?.reshape((n, lq, m, l, p))?;
        // Offsets are in pixels of each level: divide by (W_l, H_l).
        let norm: Vec<f32> = spatial_shapes
            .iter()
            .flat_map(|&(h, w)| [1.0 / w as f32, 1.0 / h as f32])
            .collect();
        let norm =
            Tensor::from_vec(norm, (1, 1, 1, l, 1, 2), query.device())?.to_dtype(query.dtype())?;
        let loc = reference_points
            .reshape((n, lq, 1, l, 1, 2))?
            .broadcast_add(&offsets.broadcast_mul(&norm)?)?;
        let out = ms_deform_attn(&value, spatial_shapes, &loc, &attn, self.imp)?;
        Ok(self.output_proj.forward(&out)?)
    }
}

/// Applies dropout with probability `p` in training only.
fn dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        Ok(tgc_nn::dropout(x, p)?)
    } else {
        Ok(x.clone())
    }
}

/// Post-norm encoder layer: self MSDeformAttn, residual, LayerNorm, FFN (ReLU), residual,
/// LayerNorm. Parameter names: `self_attn`, `norm1`, `linear1`, `linear2`, `norm2`.
#[derive(Debug, Clone)]
pub struct MsDeformEncoderLayer {
    self_attn: MsDeformAttn,
    norm1: tgc_nn::LayerNorm,
    linear1: Linear,
    linear2: Linear,
    norm2: tgc_nn::LayerNorm,
    dropout: f32,
}

impl MsDeformEncoderLayer {
    /// Builds one layer.
    pub fn new(cfg: &MsDeformAttnConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: MsDeformAttn::new(cfg, vb.pp("self_attn"))?,
            norm1: tgc_nn::layer_norm(cfg.d_model, 1e-5, vb.pp("norm1"))?,
            linear1: linear_ffn(cfg.d_model, cfg.ffn_dim, vb.pp("linear1"))?,
            linear2: linear_ffn(cfg.ffn_dim, cfg.d_model, vb.pp("linear2"))?,
            norm2: tgc_nn::layer_norm(cfg.d_model, 1e-5, vb.pp("norm2"))?,
            dropout: cfg.dropout,
        })
    }

    /// - `src`: `N x S x D`, `pos`: `N x S x D` (position + level embedding),
    /// - `reference_points`: `N x S x L x 2`, `spatial_shapes`: `(H_l, W_l)` per level.
    ///
    /// Returns `N x S x D`. Dropout only when `train`.
    pub fn forward(
        &self,
        src: &Tensor,
        pos: &Tensor,
        reference_points: &Tensor,
        spatial_shapes: &[(usize, usize)],
        train: bool,
    ) -> Result<Tensor> {
        let q = (src + pos)?;
        let src2 = self
            .self_attn
            .forward(&q, reference_points, src, spatial_shapes, None)?;
        let src = self
            .norm1
            .forward(&(src + dropout(&src2, self.dropout, train)?)?)?;
        let h = dropout(&self.linear1.forward(&src)?.relu()?, self.dropout, train)?;
        let src2 = dropout(&self.linear2.forward(&h)?, self.dropout, train)?;
        Ok(self.norm2.forward(&(src + src2)?)?)
    }
}

/// DETR's `PositionEmbeddingSine(num_pos_feats = d_model / 2, temperature = 10000,
/// normalize = True, scale = 2 pi)` for an unpadded `h x w` map: `d_model x h x w`, the
/// first half encodes y, the second x, interleaving sin and cos.
pub fn position_embedding_sine(h: usize, w: usize, d_model: usize, dev: &Device) -> Result<Tensor> {
    if !d_model.is_multiple_of(2) {
        return Err(Error::Config(format!(
            "position embedding needs an even width, got {d_model}"
        )));
    }
    let f = d_model / 2;
    let scale = 2.0 * std::f64::consts::PI;
    let eps = 1e-6;
    let mut data = vec![0f32; d_model * h * w];
    let dim_t: Vec<f64> = (0..f)
        .map(|i| 10000f64.powf(2.0 * (i / 2) as f64 / f as f64))
        .collect();
    for y in 0..h {
        // cumsum of the all-ones mask gives 1..=h; normalised by the last value.
        let ye = (y + 1) as f64 / (h as f64 + eps) * scale;
        for x in 0..w {
            let xe = (x + 1) as f64 / (w as f64 + eps) * scale;
            for i in 0..f {
                let (vy, vx) = (ye / dim_t[i], xe / dim_t[i]);
                let (py, px) = if i % 2 == 0 {
                    (vy.sin(), vx.sin())
                } else {
                    (vy.cos(), vx.cos())
                };
                data[(i * h + y) * w + x] = py as f32;
                data[((f + i) * h + y) * w + x] = px as f32;
            }
        }
    }
    Ok(Tensor::from_vec(data, (d_model, h, w), dev)?)
}

/// Reference points at pixel centres, normalised by each level's size: `S x 2` as
/// `(x, y)`, levels concatenated (no padding, so valid ratios are 1).
pub fn reference_points(spatial_shapes: &[(usize, usize)], dev: &Device) -> Result<Tensor> {
    let mut data = Vec::new();
    for &(h, w) in spatial_shapes {
        for y in 0..h {
            for x in 0..w {
                data.push((x as f32 + 0.5) / w as f32);
                data.push((y as f32 + 0.5) / h as f32);
            }
        }
    }
    let s = data.len() / 2;
    Ok(Tensor::from_vec(data, (s, 2), dev)?)
}

/// The Deformable DETR encoder over a feature pyramid: sine position embedding plus a
/// learnable level embedding (`level_embed`, `L x D`), then `n_layers` post-norm layers
/// (`layers.{i}`).
#[derive(Debug, Clone)]
pub struct MsDeformEncoder {
    layers: Vec<MsDeformEncoderLayer>,
    level_embed: Tensor,
    cfg: MsDeformAttnConfig,
}

impl MsDeformEncoder {
    /// Builds the encoder under `vb`.
    pub fn new(cfg: &MsDeformAttnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let level_embed = vb.get_with_hints(
            (cfg.n_levels, cfg.d_model),
            "level_embed",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let layers = (0..cfg.n_layers)
            .map(|i| MsDeformEncoderLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            level_embed,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the encoder was built with.
    pub fn config(&self) -> &MsDeformAttnConfig {
        &self.cfg
    }

    /// `srcs[l]`: `B x D x H_l x W_l` for each of the `L` levels. Returns the refined maps
    /// with the same shapes. Dropout only when `train`.
    pub fn forward(&self, srcs: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let (l_n, d) = (self.cfg.n_levels, self.cfg.d_model);
        if srcs.len() != l_n {
            return Err(Error::Shape(format!(
                "MsDeformEncoder expects {l_n} levels, got {}",
                srcs.len()
            )));
        }
        let b = srcs[0].dim(0)?;
        let dtype = srcs[0].dtype();
        let dev = srcs[0].device().clone();
        let mut shapes = Vec::with_capacity(l_n);
        let mut flat = Vec::with_capacity(l_n);
        let mut pos = Vec::with_capacity(l_n);
        for (l, src) in srcs.iter().enumerate() {
            let (bl, c, h, w) = src.dims4()?;
            if bl != b || c != d {
                return Err(Error::Shape(format!(
                    "srcs[{l}] must be {b} x {d} x H x W, got {:?}",
                    src.dims()
                )));
            }
            shapes.push((h, w));
            flat.push(src.flatten_from(2)?.transpose(1, 2)?); // B x HW x D
            let pe = position_embedding_sine(h, w, d, &dev)?
                .to_dtype(dtype)?
                .flatten_from(1)?
                .t()?; // HW x D
            let lvl = self.level_embed.narrow(0, l, 1)?.to_dtype(dtype)?;
            pos.push(pe.broadcast_add(&lvl)?);
        }
        let mut x = Tensor::cat(&flat, 1)?.contiguous()?;
        let s = x.dim(1)?;
        let pos = Tensor::cat(&pos, 0)?
            .unsqueeze(0)?
            .broadcast_as((b, s, d))?
            .contiguous()?;
        let refs = reference_points(&shapes, &dev)?
            .to_dtype(dtype)?
            .reshape((1, s, 1, 2))?
            .broadcast_as((b, s, l_n, 2))?
            .contiguous()?;
        for layer in &self.layers {
            x = layer.forward(&x, &pos, &refs, &shapes, train)?;
        }
        let mut out = Vec::with_capacity(l_n);
        let mut start = 0;
        for &(h, w) in &shapes {
            out.push(
                x.narrow(1, start, h * w)?
                    .transpose(1, 2)?
                    .reshape((b, d, h, w))?,
            );
            start += h * w;
        }
        Ok(out)
    }
}
