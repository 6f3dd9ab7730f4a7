//! # tgc-decoder: the CAT-Seg cost-aggregation decoder of TGC-Net
//!
//! TGC-Net decodes its calibrated features with the cost aggregation of CAT-Seg
//! (Cho et al., CVPR 2024), adapted to per-(image, prompt) visual features:
//!
//! 1. **Cost volume.** For every (image, prompt) pair the cosine similarity between the
//!    calibrated visual feature `F'_V^1/32` of that pair and the pair's text vector gives a
//!    `h x w` map. Optionally a second, parameter-free channel is stacked: CLIP's own
//!    zero-shot similarity map (`use_clip_cost`, default on), so `C_in` is 1 or 2.
//! 2. **Cost embedding.** `Conv7x7(C_in -> hidden)`.
//! 3. **Aggregation** (`layers` times): spatial aggregation, a Swin W-MSA / SW-MSA pair
//!    whose queries and keys see `[LN(x); LN(appearance guidance)]`, then class
//!    aggregation, linear attention (`elu + 1`) across the K prompts of an image after a
//!    `2 x 2` average pooling, with queries and keys from `[LN(x); text guidance]`.
//!    Guidance: `ReLU(Conv3x3(D -> 128))` of `F'_V^1/32` and `ReLU(Linear(D -> 128))` of the
//!    L2-normalised text vector (CAT-Seg normalises it before projecting).
//! 4. **Upsampling.** `ConvT(128 -> 96, 2, 2)` ‖ `ReLU(Conv3x3(D -> 32))(F_V^1/16)` ->
//!    DoubleConv -> `ConvT(64 -> 48, 2, 2)` ‖ `ReLU(Conv3x3(D -> 16))(F_V^1/8)` ->
//!    DoubleConv -> `Conv3x3(32 -> 1)`: logits per prompt at 1/8 scale. The caller resizes
//!    them to the label size with [`resize_logits`].
//!
//! ## Choices where CAT-Seg or the paper leave room
//!
//! - **Window size.** Windows tile the grid exactly, no padding: the effective window on an
//!   axis is the largest divisor of the grid that is `<= window` (24 -> 12, the paper grid;
//!   14 -> 7, the CPU preset grid; 16 -> 8), a grid no larger than the window is one window,
//!   and a grid whose best divisor is below `window / 2` (a prime such as 13) becomes one
//!   global window. See [`effective_window`]. The SW-MSA block shifts by half a window and
//!   uses Swin's attention mask (-100 between tokens the cyclic roll brought together);
//!   when one window covers an axis that axis is not shifted (as CAT-Seg does).
//! - **Class axis.** Not padded (CAT-Seg's `pad_len = 256` learnable tokens would swamp a
//!   single referring prompt); K = 1 works and the class attention then reduces to its
//!   value path. Note what that means for TGC-Net's one-report-per-image use: with K = 1
//!   the text guidance of the class attention has no effect (linear attention over one
//!   token returns its value), so the text reaches the logits only through the cosine
//!   cost channel and the VLCM-calibrated appearance guidance, both at `1/32` scale.
//! - **Text FiLM** (`text_film`, off by default; our addition, not in the paper or
//!   CAT-Seg). Zero-initialised per-channel scale and shift from the normalised text
//!   vector on the cost embedding and on both upsampling DoubleConvs (before their last
//!   ReLU). It gives the report a direct route to the `1/16` and `1/8` features; the
//!   `cpu` preset turns it on because a small model trained from scratch otherwise finds
//!   the image-only "segment every lesion" solution first and never opens the text route
//!   (see docs/results.md). Parameters `text_film.{cost, up.0, up.1}.{weight, bias}`.
//! - **Quarter stage** (`quarter`, off by default; our addition). A third upsampling
//!   stage to 1/4 scale guided by the CNN stem's `F_cnn^1/4` (the SSE passes it through
//!   unrefined), so the logits come out at `8h x 8w`: small models at low resolution
//!   otherwise predict on a grid as coarse as 20 x 20. Call
//!   [`CostAggregationDecoder::forward_with_f4`]; see [`QuarterStage`].
//! - **Half stage** (`half`, off by default; our addition, needs the quarter stage). A
//!   fourth upsampling stage to 1/2 scale guided by the input image itself (a `2 x 2`
//!   patch convolution and a `3 x 3` convolution), so the logits come out at
//!   `16h x 16w`. The CNN branch downsamples its input 4x in its first layer, so this is
//!   the only path from the image's pixels at 1/2 scale to the logits; see [`HalfStage`]
//!   and [`CostAggregationDecoder::forward_with_guidance`].
//! - **Coordinate channels** (`coord_channels`, off by default; our addition). Each
//!   upsampling stage's guidance map gets the `x` and `y` of its pixel centres as two
//!   more channels ([`coordinate_channels`]). Reports name places ("lower left lung"),
//!   but only the `1/32` cost map knows where a pixel is; with the coordinates and the
//!   text FiLM, the finer stages can weigh a feature by where it lies and what the
//!   report says. Checked against the PyTorch reference (case `f`, coordinates from
//!   torch's `affine_grid`).
//! - **Fine cost maps** (`fine_cost`, off by default; our addition, CAT-Seg's cost volume
//!   repeated on finer grids). The cost volume compares text and pixels only on the
//!   `1/32` grid (5 x 5 to 7 x 7 cells in the CPU configurations), too coarse for a lesion
//!   of 2% of the image; the FiLM gives the finer stages the text per channel, not per
//!   pixel. With `fine_cost`, the 1/16, 1/8 and (with the quarter stage) 1/4 stages each
//!   get `heads` cosine maps between a `1 x 1` projection of the stage's per-image
//!   features and a linear projection of the pair's text vector. Checked against the
//!   PyTorch reference (case `g`) and finite differences; see [`FineCost`].
//! - **Pooling.** `class_pool x class_pool` average pooling before the class attention.
//!   With an odd grid the trailing row/column is left out of the pooled map (PyTorch's
//!   `AvgPool2d` floor rule) but still receives the upsampled update; grids smaller than
//!   the pool skip pooling. The pooled result is upsampled with
//!   [`tgc_nn::resize_bilinear`] (`align_corners = false`; CAT-Seg uses `true`).
//! - **Per-pair features.** `F'_V^1/32` differs per prompt (VLCM calibrates it), so the
//!   appearance guidance is per pair; `F_V^1/16` and `F_V^1/8` are per image and are
//!   broadcast to the K prompts of their image.
//! - **GroupNorm.** DoubleConv uses `channels / group_norm_channels` groups (CAT-Seg:
//!   16 channels per group, so 4 groups at 64 and 2 at 32).
//! - `guidance_kernel` (default 3) sets the kernel of the guidance projections; 1 is a
//!   CPU speed option (the `F_V^1/8` projection is the most expensive convolution).
//! - The decoder-guidance projections keep CAT-Seg's ReLU; the aggregation has no dropout
//!   by default (`dropout = 0`, as CAT-Seg); `train` only switches dropout on.
//!
//! Parameter names follow the module tree: `cost_embed`, `appearance_guidance`,
//! `text_guidance`, `layers.{i}.spatial.{guidance_norm, blocks.{0,1}.{norm1, attn.{q,k,v,proj},
//! norm2, mlp.{fc1,fc2}}}`, `layers.{i}.class.{norm1, q, k, v, norm2, mlp.{fc1,fc2}}`,
//! `decoder_guidance.{0,1}`, `up.{0,1}.{convt, conv1, norm1, conv2, norm2}`, `head`
//! (and `decoder_guidance.2`, `up.2.*` with the quarter stage;
//! `decoder_guidance.3.{down, conv}`, `up.3.*` with the half stage;
//! `fine_cost.{i}.{image, text}` with the fine cost maps).
//! With the paper configuration and the CLIP cost channel the decoder has 2,005,473
//! parameters.
//!
//! Every convolution is a [`tgc_nn::MatmulConv`] (the odd "same" kernels) or
//! [`tgc_nn::MatmulConvTranspose`] (`ConvT(2, 2)`): the same weights, names and results
//! as `candle_nn::Conv2d` / `ConvTranspose2d`, computed as one matrix product so that the
//! backward pass on CPU is not candle's naive transposed convolution. The window attention
//! uses the fused [`tgc_nn::softmax_last_dim`].
//!
//! ## Example
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use tgc_decoder::{CostAggregationDecoder, DecoderConfig};
//!
//! let dev = Device::Cpu;
//! let cfg = DecoderConfig {
//!     d_model: 32,
//!     hidden: 16,
//!     guidance_dim: 16,
//!     heads: 2,
//!     window: 4,
//!     class_mlp: 32,
//!     f16_proj: 8,
//!     f8_proj: 4,
//!     up_channels: [8, 4],
//!     decoder_dims: [16, 8],
//!     group_norm_channels: 4,
//!     ..DecoderConfig::default()
//! };
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let decoder = CostAggregationDecoder::new(&cfg, vb)?;
//!
//! let (b, k, h, w) = (1, 2, 8, 8);
//! let vision = Tensor::randn(0f32, 1.0, (b * k, 32, h, w), &dev)?; // F'_V^1/32 per pair
//! let text = Tensor::randn(0f32, 1.0, (b, k, 32), &dev)?; // text vector per prompt
//! let f16 = Tensor::randn(0f32, 1.0, (b, 32, 2 * h, 2 * w), &dev)?;
//! let f8 = Tensor::randn(0f32, 1.0, (b, 32, 4 * h, 4 * w), &dev)?;
//! let clip_cost = Tensor::randn(0f32, 0.1, (b, k, h, w), &dev)?;
//! let logits = decoder.forward(&vision, &text, &f16, &f8, Some(&clip_cost), false)?;
//! assert_eq!(logits.dims(), &[b, k, 4 * h, 4 * w]);
//! let full = tgc_decoder::resize_logits(&logits, 64, 64)?;
//! assert_eq!(full.dims(), &[b, k, 64, 64]);
//! # Ok::<(), tgc_decoder::Error>(())
//! ```

mod class;
mod spatial;

use candle_core::{DType, Tensor, D};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};
use tgc_nn::{GroupNorm, MatmulConv, MatmulConvTranspose};

use class::ClassAggregation;
pub use spatial::effective_window;
use spatial::SpatialAggregation;

/// Errors of the decoder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor op failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An input tensor has the wrong shape.
    #[error("tgc-decoder: input `{tensor}` has shape {got:?}, expected {expected}")]
    Shape {
        /// Name of the offending argument.
        tensor: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
    /// The configuration is inconsistent.
    #[error("tgc-decoder: invalid DecoderConfig: {0}")]
    Config(String),
    /// The CLIP cost channel is configured but missing, or given but not configured.
    #[error("tgc-decoder: {0}")]
    ClipCost(&'static str),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Configuration of [`CostAggregationDecoder`]. `Default` is the paper's (CAT-Seg ViT-L
/// configuration, adapted as described in the crate docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecoderConfig {
    /// Width `D` of the visual features and of the text vector (256).
    pub d_model: usize,
    /// Width of the aggregated cost embedding (128).
    pub hidden: usize,
    /// Width of the appearance and text guidance projections (128).
    pub guidance_dim: usize,
    /// Attention heads in both aggregations (4); must divide `hidden`.
    pub heads: usize,
    /// Number of aggregation layers (2).
    pub layers: usize,
    /// Requested Swin window (12); see [`effective_window`].
    pub window: usize,
    /// Swin MLP ratio (4): hidden width `mlp_ratio * hidden`.
    pub mlp_ratio: usize,
    /// Hidden width of the class-aggregation MLP (512).
    pub class_mlp: usize,
    /// Average pooling before class aggregation (2).
    pub class_pool: usize,
    /// Stack CLIP's zero-shot cosine map as a second cost channel (true).
    pub use_clip_cost: bool,
    /// Projection width of `F_V^1/16` in the first upsampling stage (32).
    pub f16_proj: usize,
    /// Projection width of `F_V^1/8` in the second upsampling stage (16).
    pub f8_proj: usize,
    /// Output channels of the two transposed convolutions ([96, 48]).
    pub up_channels: [usize; 2],
    /// Output channels of the two DoubleConvs ([64, 32]).
    pub decoder_dims: [usize; 2],
    /// Kernel of the appearance- and decoder-guidance convolutions (3, as CAT-Seg). 1 is a
    /// speed option for CPU training: the `F_V^1/8` projection is the decoder's most
    /// expensive convolution and a 1x1 kernel does 9x fewer multiply-adds there.
    pub guidance_kernel: usize,
    /// Channels per GroupNorm group in the DoubleConvs (16).
    pub group_norm_channels: usize,
    /// Dropout in the aggregation MLPs and attention outputs when training (0.0).
    pub dropout: f32,
    /// LayerNorm epsilon (1e-5).
    pub ln_eps: f64,
    /// Text FiLM (false; **not in the paper**): scale and shift the cost embedding and
    /// the output of both upsampling DoubleConvs per channel by linear maps of the
    /// L2-normalised text vector, `x * (1 + gamma(t)) + beta(t)`, zero-initialised so the
    /// decoder starts as without it. See the crate docs for why single-prompt training
    /// needs it.
    pub text_film: bool,
    /// A third upsampling stage to 1/4 scale (None; **not in the paper**), guided by the
    /// CNN stem's `F_cnn^1/4`: the logits come out at `8h x 8w` instead of `4h x 4w`.
    /// See [`QuarterStage`].
    pub quarter: Option<QuarterStage>,
    /// A fourth upsampling stage to 1/2 scale (None; **not in the paper**), guided by
    /// the input image: the logits come out at `16h x 16w`. Needs [`Self::quarter`].
    /// See [`HalfStage`].
    pub half: Option<HalfStage>,
    /// Coordinate channels (false; **not in the paper**): every upsampling stage's
    /// guidance map gets two more channels, the `x` and `y` of each pixel centre in
    /// `[-1, 1]` (`(2 i + 1) / n - 1`, the `align_corners = false` convention), so its
    /// DoubleConv can make features that depend on where a pixel is. With
    /// [`Self::text_film`] the report can then scale them: "left lung" can gate the
    /// left half of the image at the 1/16, 1/8 (and 1/4, 1/2) scales, where without
    /// them only the 1/32 cost map knows positions. See [`coordinate_channels`].
    pub coord_channels: bool,
    /// Fine cost maps (None; **not in the paper**): the 1/16, 1/8 (and, with the quarter
    /// stage, 1/4) upsampling stages get `heads` more input channels, each the cosine
    /// between a projection of the stage's per-image features and a projection of the
    /// pair's text vector. The cost volume of step 1 is the only place where the text is
    /// compared with the image pixel by pixel, and it lives on the coarsest grid; these
    /// maps repeat the comparison where a small lesion is more than a pixel wide. See
    /// [`FineCost`].
    pub fine_cost: Option<FineCost>,
}

/// The optional fine cost maps ([`DecoderConfig::fine_cost`]; our addition, the idea of
/// CAT-Seg's cost volume repeated on finer grids). At upsampling stage `i` (0: `F_V^1/16`,
/// 1: `F_V^1/8`, 2: the quarter stage's `F_cnn^1/4`; the half stage gets none, its guide
/// is the raw image):
///
/// `cost_i[n, j] = cos(P_i(f)[b, j], T_i(t_n)[j])` for head `j < heads`, with
/// `P_i = Conv1x1(C_i -> heads * dim)` on the per-image features, split into `heads`
/// groups of `dim`, and `T_i = Linear(D -> heads * dim)` on the L2-normalised text vector
/// of pair `n = b*K + k`. The `heads` maps, `(B*K) x heads x H x W`, are concatenated
/// after the guidance map (and coordinate channels) at the input of the stage's
/// DoubleConv. Parameters `fine_cost.{i}.{image, text}.{weight, bias}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FineCost {
    /// Cosine maps per stage.
    pub heads: usize,
    /// Width of each head's projections.
    pub dim: usize,
}

/// The optional 1/4-scale upsampling stage ([`DecoderConfig::quarter`]; our addition):
/// `ConvT(decoder_dims[1] -> up_channels, 2, 2)` ‖ `ReLU(Conv(in_channels -> proj))` of
/// the CNN stem's `F_cnn^1/4` -> DoubleConv(`-> dim`), then the head. Small models
/// trained from scratch at low resolution have 1/8-scale logits on a grid as coarse as
/// 20 x 20, which blurs lesion borders; this stage refines them with the stem's
/// full-detail features at a small cost. Parameters `decoder_guidance.2`,
/// `up.2.{convt, conv1, norm1, conv2, norm2}` and, with the FiLM, `text_film.up.2`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarterStage {
    /// Channels of `F_cnn^1/4` (the SSE's `stem_channels`).
    pub in_channels: usize,
    /// Projection width of `F_cnn^1/4`.
    pub proj: usize,
    /// Output channels of the transposed convolution.
    pub up_channels: usize,
    /// Output channels of the DoubleConv (input of the head).
    pub dim: usize,
}

/// The optional 1/2-scale upsampling stage ([`DecoderConfig::half`]; our addition):
/// `ConvT(quarter.dim -> up_channels, 2, 2)` ‖ `ReLU(Conv3x3(proj -> proj))(ReLU(Conv2x2/2(in_channels -> proj)))`
/// of the input image -> DoubleConv(`-> dim`), then the head. The CNN branch patchifies
/// its input 4 x 4 in its first layer, so without this stage nothing in the model sees
/// the image at a finer scale than 1/4 and lesion borders are placed on a grid of
/// 4-pixel cells; this stage costs two small convolutions at 1/2 scale. Parameters
/// `decoder_guidance.3.{down, conv}`, `up.3.{convt, conv1, norm1, conv2, norm2}` and,
/// with the FiLM, `text_film.up.3`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfStage {
    /// Channels of the input image (the SSE's `in_channels`, 3).
    pub in_channels: usize,
    /// Width of the image guidance.
    pub proj: usize,
    /// Output channels of the transposed convolution.
    pub up_channels: usize,
    /// Output channels of the DoubleConv (input of the head).
    pub dim: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            d_model: 256,
            hidden: 128,
            guidance_dim: 128,
            heads: 4,
            layers: 2,
            window: 12,
            mlp_ratio: 4,
            class_mlp: 512,
            class_pool: 2,
            use_clip_cost: true,
            f16_proj: 32,
            f8_proj: 16,
            up_channels: [96, 48],
            decoder_dims: [64, 32],
            guidance_kernel: 3,
            group_norm_channels: 16,
            dropout: 0.0,
            ln_eps: 1e-5,
            text_film: false,
            quarter: None,
            half: None,
            coord_channels: false,
            fine_cost: None,
        }
    }
}

impl DecoderConfig {
    /// Number of cost channels per (image, prompt) pair: 2 with the CLIP map, else 1.
    pub fn cost_channels(&self) -> usize {
        if self.use_clip_cost {
            2
        } else {
            1
        }
    }

    /// Extra guidance channels per upsampling stage: 2 with [`Self::coord_channels`],
    /// else 0.
    pub fn coord_extra(&self) -> usize {
        if self.coord_channels {
            2
        } else {
            0
        }
    }

    /// Extra DoubleConv input channels of upsampling stage `stage` from
    /// [`Self::fine_cost`]: `heads` at stages 0, 1 and 2 (the quarter stage), else 0.
    pub fn fine_cost_extra(&self, stage: usize) -> usize {
        match &self.fine_cost {
            Some(fc) if stage < 3 => fc.heads,
            _ => 0,
        }
    }

    /// GroupNorm groups for `channels`: `channels / group_norm_channels`, at least 1.
    pub fn groups(&self, channels: usize) -> usize {
        (channels / self.group_norm_channels.max(1)).max(1)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return bad(format!(
                "hidden {} is not divisible by heads {}",
                self.hidden, self.heads
            ));
        }
        if self.d_model == 0 || self.hidden == 0 || self.window == 0 || self.class_pool == 0 {
            return bad("d_model, hidden, window and class_pool must be positive".into());
        }
        if self.guidance_kernel.is_multiple_of(2) {
            return bad(format!(
                "guidance_kernel {} must be odd (same padding)",
                self.guidance_kernel
            ));
        }
        if let Some(q) = &self.quarter {
            if q.in_channels == 0 || q.proj == 0 || q.up_channels == 0 {
                return bad(format!(
                    "quarter stage: in_channels, proj and up_channels must be positive, got {q:?}"
                ));
            }
        }
        if let Some(hs) = &self.half {
            if self.quarter.is_none() {
                return bad(
                    "the half stage upsamples the quarter stage's output: set quarter too".into(),
                );
            }
            if hs.in_channels == 0 || hs.proj == 0 || hs.up_channels == 0 {
                return bad(format!(
                    "half stage: in_channels, proj and up_channels must be positive, got {hs:?}"
                ));
            }
        }
        if let Some(fc) = &self.fine_cost {
            if fc.heads == 0 || fc.dim == 0 {
                return bad(format!(
                    "fine_cost: heads and dim must be positive, got {fc:?}"
                ));
            }
        }
        let quarter_dim = self.quarter.as_ref().map(|q| q.dim);
        let half_dim = self.half.as_ref().map(|hs| hs.dim);
        for c in self
            .decoder_dims
            .into_iter()
            .chain(quarter_dim)
            .chain(half_dim)
        {
            if c == 0 || !c.is_multiple_of(self.groups(c)) {
                return bad(format!(
                    "decoder channels {c} not divisible into {} GroupNorm groups",
                    self.groups(c)
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} outside [0, 1)", self.dropout));
        }
        Ok(())
    }
}

/// Cosine cost volume: `vision` `(B*K) x D x h x w` (pairs ordered `b*K + k`) against
/// `text` `B x K x D` -> `B x K x h x w`, the cosine of each pixel's feature with its
/// pair's text vector. Both sides are L2-normalised over `D` (with `1e-12` added to the
/// squared norm, so the gradient stays finite at zero).
pub fn cost_volume(vision: &Tensor, text: &Tensor) -> Result<Tensor> {
    let (bk, d, h, w) = vision.dims4()?;
    let (b, k, dt) = text.dims3()?;
    if bk != b * k || d != dt {
        return Err(Error::Shape {
            tensor: "vision",
            got: vision.dims().to_vec(),
            expected: format!("(B*K={}) x (D={dt}) x h x w", b * k),
        });
    }
    let v = vision.reshape((b, k, d, h * w))?;
    let vn = v.broadcast_div(&(v.sqr()?.sum_keepdim(2)? + 1e-12)?.sqrt()?)?;
    let tn = text.broadcast_div(&(text.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)?;
    // (B, K, 1, D) @ (B, K, D, hw) -> (B, K, 1, hw)
    let cos = tn.unsqueeze(2)?.contiguous()?.matmul(&vn.contiguous()?)?;
    Ok(cos.reshape((b, k, h, w))?)
}

/// The coordinate channels of [`DecoderConfig::coord_channels`]: `1 x 2 x h x w`, channel
/// 0 the `x` and channel 1 the `y` of each pixel centre, `(2 j + 1) / w - 1` and
/// `(2 i + 1) / h - 1`, so both lie in `(-1, 1)` and are symmetric about the centre (a
/// horizontal flip of the image negates channel 0).
///
/// ```
/// use candle_core::{DType, Device};
/// let xy = tgc_decoder::coordinate_channels(1, 2, DType::F32, &Device::Cpu)?;
/// assert_eq!(xy.flatten_all()?.to_vec1::<f32>()?, [-0.5, 0.5, 0.0, 0.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn coordinate_channels(
    h: usize,
    w: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let xs: Vec<f64> = (0..w)
        .map(|j| (2 * j + 1) as f64 / w as f64 - 1.0)
        .collect();
    let ys: Vec<f64> = (0..h)
        .map(|i| (2 * i + 1) as f64 / h as f64 - 1.0)
        .collect();
    let x = Tensor::from_vec(xs, (1, 1, 1, w), device)?.broadcast_as((1, 1, h, w))?;
    let y = Tensor::from_vec(ys, (1, 1, h, 1), device)?.broadcast_as((1, 1, h, w))?;
    Ok(Tensor::cat(&[x, y], 1)?.to_dtype(dtype)?)
}

/// Bilinearly resizes logits `B x K x h x w` to `B x K x out_h x out_w`
/// (`align_corners = false`, differentiable), e.g. from the decoder's 1/8 scale to the
/// label size.
pub fn resize_logits(logits: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    Ok(tgc_nn::resize_bilinear(logits, out_h, out_w)?)
}

/// One aggregation layer: spatial then class aggregation.
#[derive(Clone, Debug)]
struct AggregationLayer {
    spatial: SpatialAggregation,
    class: ClassAggregation,
}

/// `(Conv3x3 -> GroupNorm -> ReLU) x 2`, convolutions without bias.
#[derive(Clone, Debug)]
struct DoubleConv {
    conv1: MatmulConv,
    norm1: GroupNorm,
    conv2: MatmulConv,
    norm2: GroupNorm,
}

impl DoubleConv {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let c3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv1: tgc_nn::conv2d_no_bias(cin, cout, 3, c3, vb.pp("conv1"))?,
            norm1: tgc_nn::group_norm(groups, cout, 1e-5, vb.pp("norm1"))?,
            conv2: tgc_nn::conv2d_no_bias(cout, cout, 3, c3, vb.pp("conv2"))?,
            norm2: tgc_nn::group_norm(groups, cout, 1e-5, vb.pp("norm2"))?,
        })
    }

    /// `film`: per-row `(gamma, beta)`, each `N x C`, applied after the second norm.
    fn forward(&self, x: &Tensor, film: Option<&(Tensor, Tensor)>) -> Result<Tensor> {
        let x = x.apply(&self.conv1)?.apply(&self.norm1)?.relu()?;
        let x = x.apply(&self.conv2)?.apply(&self.norm2)?;
        let x = match film {
            Some((gamma, beta)) => {
                let (n, c) = gamma.dims2()?;
                film_apply(
                    &x,
                    &gamma.reshape((n, c, 1, 1))?,
                    &beta.reshape((n, c, 1, 1))?,
                )?
            }
            None => x,
        };
        Ok(x.relu()?)
    }
}

/// `x * (1 + gamma) + beta` with `gamma` and `beta` broadcast over `x`.
fn film_apply(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    Ok((x.broadcast_mul(&(gamma + 1.0)?)?.broadcast_add(beta))?)
}

/// The text FiLM maps ([`DecoderConfig::text_film`]): one zero-initialised
/// `Linear(D -> 2 C)` per modulated feature, output split into `(gamma, beta)`.
#[derive(Clone, Debug)]
struct TextFilm {
    cost: tgc_nn::Linear,
    up: [tgc_nn::Linear; 2],
    quarter: Option<tgc_nn::Linear>,
    half: Option<tgc_nn::Linear>,
}

impl TextFilm {
    fn new(
        d: usize,
        channels: [usize; 3],
        quarter: Option<usize>,
        half: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        // Zero weights: the decoder starts exactly as without FiLM, and the weights still
        // get a gradient (d out / d gamma = x).
        let zero_linear = |cout: usize, vb: VarBuilder| -> Result<tgc_nn::Linear> {
            let w = vb.get_with_hints((2 * cout, d), "weight", candle_nn::Init::Const(0.0))?;
            let b = vb.get_with_hints(2 * cout, "bias", candle_nn::Init::Const(0.0))?;
            Ok(tgc_nn::Linear::new(w, Some(b)))
        };
        Ok(Self {
            cost: zero_linear(channels[0], vb.pp("cost"))?,
            up: [
                zero_linear(channels[1], vb.pp("up").pp(0))?,
                zero_linear(channels[2], vb.pp("up").pp(1))?,
            ],
            quarter: quarter
                .map(|c| zero_linear(c, vb.pp("up").pp(2)))
                .transpose()?,
            half: half
                .map(|c| zero_linear(c, vb.pp("up").pp(3)))
                .transpose()?,
        })
    }

    /// `text`: normalised text vectors `N x D` -> `(gamma, beta)`, each `N x C`.
    fn params(layer: &tgc_nn::Linear, text: &Tensor) -> Result<(Tensor, Tensor)> {
        let gb = text.apply(layer)?;
        let c = gb.dim(1)? / 2;
        Ok((gb.narrow(1, 0, c)?, gb.narrow(1, c, c)?))
    }
}

/// The projections of one stage's fine cost maps ([`FineCost`]).
#[derive(Clone, Debug)]
struct FineCostMaps {
    image: MatmulConv,
    text: tgc_nn::Linear,
    heads: usize,
    dim: usize,
}

impl FineCostMaps {
    fn new(cin: usize, d: usize, fc: &FineCost, vb: VarBuilder) -> Result<Self> {
        let width = fc.heads * fc.dim;
        Ok(Self {
            image: tgc_nn::conv2d(cin, width, 1, Conv2dConfig::default(), vb.pp("image"))?,
            text: tgc_nn::linear(d, width, vb.pp("text"))?,
            heads: fc.heads,
            dim: fc.dim,
        })
    }

    /// `feat`: per-image features `B x C x H x W`; `text`: normalised text vectors
    /// `(B*K) x D` -> cosine maps `(B*K) x heads x H x W`.
    fn forward(&self, feat: &Tensor, text: &Tensor, k: usize) -> Result<Tensor> {
        let (b, _, h, w) = feat.dims4()?;
        let (nh, dh) = (self.heads, self.dim);
        let unit = |t: Tensor, dim: usize| -> Result<Tensor> {
            Ok(t.broadcast_div(&(t.sqr()?.sum_keepdim(dim)? + 1e-12)?.sqrt()?)?)
        };
        // B x heads x dh x HW, unit vectors along dh.
        let img = unit(feat.apply(&self.image)?.reshape((b, nh, dh, h * w))?, 2)?;
        // B x K x heads x dh -> B x heads x K x dh.
        let txt = unit(text.apply(&self.text)?.reshape((b, k, nh, dh))?, 3)?
            .permute((0, 2, 1, 3))?
            .contiguous()?;
        // (B, heads, K, dh) @ (B, heads, dh, HW) -> (B, heads, K, HW)
        let cos = txt.matmul(&img.contiguous()?)?;
        Ok(cos
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b * k, nh, h, w))?)
    }
}

/// One upsampling stage: `ConvT(2, 2)`, concatenation with projected per-image features,
/// DoubleConv.
#[derive(Clone, Debug)]
struct UpStage {
    convt: MatmulConvTranspose,
    conv: DoubleConv,
}

/// The CAT-Seg cost-aggregation decoder (see the crate docs for the architecture).
#[derive(Clone, Debug)]
pub struct CostAggregationDecoder {
    cfg: DecoderConfig,
    cost_embed: MatmulConv,
    appearance_guidance: MatmulConv,
    text_guidance: tgc_nn::Linear,
    layers: Vec<AggregationLayer>,
    decoder_guidance: [MatmulConv; 2],
    up: [UpStage; 2],
    /// The optional 1/4 stage: guidance projection and upsampling stage.
    quarter: Option<(MatmulConv, UpStage)>,
    /// The optional 1/2 stage: image guidance (patch conv, 3x3 conv) and upsampling stage.
    half: Option<(MatmulConv, MatmulConv, UpStage)>,
    head: MatmulConv,
    text_film: Option<TextFilm>,
    /// Fine cost projections per stage (0: 1/16, 1: 1/8, 2: quarter), when configured.
    fine_cost: Vec<FineCostMaps>,
}

impl CostAggregationDecoder {
    /// Builds the decoder under `vb` (names in the crate docs).
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, c, g) = (cfg.d_model, cfg.hidden, cfg.guidance_dim);
        let pad = |p: usize| Conv2dConfig {
            padding: p,
            ..Default::default()
        };
        let cost_embed = tgc_nn::conv2d(cfg.cost_channels(), c, 7, pad(3), vb.pp("cost_embed"))?;
        let gk = cfg.guidance_kernel;
        let appearance_guidance =
            tgc_nn::conv2d(d, g, gk, pad(gk / 2), vb.pp("appearance_guidance"))?;
        let text_guidance = tgc_nn::linear(d, g, vb.pp("text_guidance"))?;
        let layers = (0..cfg.layers)
            .map(|i| {
                let lvb = vb.pp("layers").pp(i);
                Ok(AggregationLayer {
                    spatial: SpatialAggregation::new(
                        c,
                        g,
                        cfg.heads,
                        cfg.mlp_ratio * c,
                        cfg.window,
                        cfg.ln_eps,
                        lvb.pp("spatial"),
                    )?,
                    class: ClassAggregation::new(
                        c,
                        g,
                        cfg.heads,
                        cfg.class_mlp,
                        cfg.class_pool,
                        cfg.ln_eps,
                        lvb.pp("class"),
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let dg = vb.pp("decoder_guidance");
        let decoder_guidance = [
            tgc_nn::conv2d(d, cfg.f16_proj, gk, pad(gk / 2), dg.pp("0"))?,
            tgc_nn::conv2d(d, cfg.f8_proj, gk, pad(gk / 2), dg.pp("1"))?,
        ];
        let up_cfg = ConvTranspose2dConfig {
            stride: 2,
            ..Default::default()
        };
        let ins = [c, cfg.decoder_dims[0]];
        let projs = [cfg.f16_proj, cfg.f8_proj];
        let mut up = Vec::with_capacity(2);
        for i in 0..2 {
            let uvb = vb.pp("up").pp(i);
            let out = cfg.decoder_dims[i];
            up.push(UpStage {
                convt: tgc_nn::conv_transpose2d(
                    ins[i],
                    cfg.up_channels[i],
                    2,
                    up_cfg,
                    uvb.pp("convt"),
                )?,
                conv: DoubleConv::new(
                    cfg.up_channels[i] + projs[i] + cfg.coord_extra() + cfg.fine_cost_extra(i),
                    out,
                    cfg.groups(out),
                    uvb,
                )?,
            });
        }
        let [up0, up1]: [UpStage; 2] = up
            .try_into()
            .map_err(|_| Error::Config("internal: two upsampling stages".into()))?;
        let quarter = match &cfg.quarter {
            Some(q) => {
                let uvb = vb.pp("up").pp(2);
                let proj = tgc_nn::conv2d(q.in_channels, q.proj, gk, pad(gk / 2), dg.pp("2"))?;
                let stage = UpStage {
                    convt: tgc_nn::conv_transpose2d(
                        cfg.decoder_dims[1],
                        q.up_channels,
                        2,
                        up_cfg,
                        uvb.pp("convt"),
                    )?,
                    conv: DoubleConv::new(
                        q.up_channels + q.proj + cfg.coord_extra() + cfg.fine_cost_extra(2),
                        q.dim,
                        cfg.groups(q.dim),
                        uvb,
                    )?,
                };
                Some((proj, stage))
            }
            None => None,
        };
        let half = match (&cfg.half, &cfg.quarter) {
            (Some(hs), Some(q)) => {
                let uvb = vb.pp("up").pp(3);
                let gvb = dg.pp("3");
                let patch = Conv2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                let down = tgc_nn::conv2d(hs.in_channels, hs.proj, 2, patch, gvb.pp("down"))?;
                let conv = tgc_nn::conv2d(hs.proj, hs.proj, 3, pad(1), gvb.pp("conv"))?;
                let stage = UpStage {
                    convt: tgc_nn::conv_transpose2d(
                        q.dim,
                        hs.up_channels,
                        2,
                        up_cfg,
                        uvb.pp("convt"),
                    )?,
                    conv: DoubleConv::new(
                        hs.up_channels + hs.proj + cfg.coord_extra(),
                        hs.dim,
                        cfg.groups(hs.dim),
                        uvb,
                    )?,
                };
                Some((down, conv, stage))
            }
            _ => None,
        };
        let head_in = match (&cfg.half, &cfg.quarter) {
            (Some(hs), _) => hs.dim,
            (None, Some(q)) => q.dim,
            (None, None) => cfg.decoder_dims[1],
        };
        let head = tgc_nn::conv2d(head_in, 1, 3, pad(1), vb.pp("head"))?;
        let text_film = if cfg.text_film {
            Some(TextFilm::new(
                d,
                [c, cfg.decoder_dims[0], cfg.decoder_dims[1]],
                cfg.quarter.as_ref().map(|q| q.dim),
                cfg.half.as_ref().map(|hs| hs.dim),
                vb.pp("text_film"),
            )?)
        } else {
            None
        };
        let fine_cost = match &cfg.fine_cost {
            Some(fc) => {
                let mut ins = vec![d, d];
                ins.extend(cfg.quarter.as_ref().map(|q| q.in_channels));
                ins.iter()
                    .enumerate()
                    .map(|(i, &cin)| FineCostMaps::new(cin, d, fc, vb.pp("fine_cost").pp(i)))
                    .collect::<Result<Vec<_>>>()?
            }
            None => Vec::new(),
        };
        Ok(Self {
            cfg: cfg.clone(),
            cost_embed,
            appearance_guidance,
            text_guidance,
            layers,
            decoder_guidance,
            up: [up0, up1],
            quarter,
            half,
            head,
            text_film,
            fine_cost,
        })
    }

    /// The configuration this decoder was built with.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Decodes mask logits for B images with K prompts each (pairs ordered `b*K + k`).
    ///
    /// - `vision`: calibrated `F'_V^1/32` per pair, `(B*K) x D x h x w`
    /// - `text`: text vector per prompt, `B x K x D`
    /// - `f16`: `F_V^1/16` per image, `B x D x 2h x 2w`
    /// - `f8`: `F_V^1/8` per image, `B x D x 4h x 4w`
    /// - `clip_cost`: CLIP's zero-shot cosine map `B x K x h x w`; required when
    ///   `use_clip_cost`, rejected otherwise
    /// - `train`: enables dropout (if `dropout > 0`)
    ///
    /// Returns logits `B x K x 4h x 4w` (1/8 scale); see [`resize_logits`]. A decoder
    /// with a [`QuarterStage`] needs [`Self::forward_with_f4`].
    pub fn forward(
        &self,
        vision: &Tensor,
        text: &Tensor,
        f16: &Tensor,
        f8: &Tensor,
        clip_cost: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_with_f4(vision, text, f16, f8, None, clip_cost, train)
    }

    /// As [`Self::forward`], with the CNN stem's `F_cnn^1/4` for the optional
    /// [`QuarterStage`]:
    ///
    /// - `f4`: `B x C_4 x 8h x 8w`; required when [`DecoderConfig::quarter`] is set,
    ///   rejected otherwise.
    ///
    /// Returns logits `B x K x 8h x 8w` (1/4 scale) with the quarter stage, else
    /// `B x K x 4h x 4w`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_f4(
        &self,
        vision: &Tensor,
        text: &Tensor,
        f16: &Tensor,
        f8: &Tensor,
        f4: Option<&Tensor>,
        clip_cost: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_with_guidance(vision, text, f16, f8, f4, None, clip_cost, train)
    }

    /// As [`Self::forward_with_f4`], with the input image for the optional
    /// [`HalfStage`]:
    ///
    /// - `image`: the CNN branch's input, `B x C_img x 32h x 32w`; required when
    ///   [`DecoderConfig::half`] is set, rejected otherwise.
    ///
    /// Returns logits `B x K x 16h x 16w` (1/2 scale) with the half stage, else as
    /// [`Self::forward_with_f4`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_guidance(
        &self,
        vision: &Tensor,
        text: &Tensor,
        f16: &Tensor,
        f8: &Tensor,
        f4: Option<&Tensor>,
        image: Option<&Tensor>,
        clip_cost: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        let shape_err = |tensor, t: &Tensor, expected: String| Error::Shape {
            tensor,
            got: t.dims().to_vec(),
            expected,
        };
        let (b, k, dt) = text
            .dims3()
            .map_err(|_| shape_err("text", text, format!("B x K x {d}")))?;
        if dt != d || b == 0 || k == 0 {
            return Err(shape_err("text", text, format!("B x K x {d}, B, K > 0")));
        }
        let bk = b * k;
        let (h, w) = match vision.dims() {
            &[n, dv, h, w] if n == bk && dv == d && h > 0 && w > 0 => (h, w),
            _ => {
                return Err(shape_err(
                    "vision",
                    vision,
                    format!("(B*K={bk}) x {d} x h x w"),
                ))
            }
        };
        if f16.dims() != [b, d, 2 * h, 2 * w] {
            return Err(shape_err(
                "f16",
                f16,
                format!("[{b}, {d}, {}, {}]", 2 * h, 2 * w),
            ));
        }
        if f8.dims() != [b, d, 4 * h, 4 * w] {
            return Err(shape_err(
                "f8",
                f8,
                format!("[{b}, {d}, {}, {}]", 4 * h, 4 * w),
            ));
        }
        check_stage_input(
            "quarter",
            "f4",
            cfg.quarter.as_ref().map(|q| q.in_channels),
            f4,
            [b, 8 * h, 8 * w],
        )?;
        check_stage_input(
            "half",
            "image",
            cfg.half.as_ref().map(|hs| hs.in_channels),
            image,
            [b, 32 * h, 32 * w],
        )?;

        // 1. Cost volume, (B*K) x C_in x h x w.
        let cos = cost_volume(vision, text)?.reshape((bk, 1, h, w))?;
        let cost = match (cfg.use_clip_cost, clip_cost) {
            (true, Some(cc)) => {
                if cc.dims() != [b, k, h, w] {
                    return Err(shape_err("clip_cost", cc, format!("[{b}, {k}, {h}, {w}]")));
                }
                Tensor::cat(&[cos, cc.reshape((bk, 1, h, w))?], 1)?
            }
            (false, None) => cos,
            (true, None) => {
                return Err(Error::ClipCost(
                    "use_clip_cost is set but no clip_cost map was given",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::ClipCost(
                    "a clip_cost map was given but use_clip_cost is false",
                ))
            }
        };

        // 2. Embedding and guidance, channels-last for the aggregation.
        let nhwc = |t: Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.contiguous()?) };
        let mut x = nhwc(cost.apply(&self.cost_embed)?)?;
        let appearance = nhwc(vision.apply(&self.appearance_guidance)?.relu()?)?;
        let tn = text.broadcast_div(&(text.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)?;
        let tn_rows = tn.reshape((bk, d))?;
        if let Some(film) = &self.text_film {
            let (gamma, beta) = TextFilm::params(&film.cost, &tn_rows)?;
            let c = gamma.dim(1)?;
            x = film_apply(
                &x,
                &gamma.reshape((bk, 1, 1, c))?,
                &beta.reshape((bk, 1, 1, c))?,
            )?;
        }
        let text_g = tn.apply(&self.text_guidance)?.relu()?;

        // 3. Aggregation.
        for layer in &self.layers {
            x = layer.spatial.forward(&x, &appearance, cfg.dropout, train)?;
            x = layer.class.forward(&x, &text_g, cfg.dropout, train)?;
        }

        // 4. Upsampling with per-image features broadcast to the K prompts.
        let mut x = x.permute((0, 3, 1, 2))?.contiguous()?;
        // Guidance maps per image, each with its upsampling stage.
        let mut stages = vec![
            (f16.apply(&self.decoder_guidance[0])?.relu()?, &self.up[0]),
            (f8.apply(&self.decoder_guidance[1])?.relu()?, &self.up[1]),
        ];
        // The per-image features each fine cost map compares with the text.
        let mut fine_sources = vec![f16, f8];
        if let (Some(f4), Some((proj, stage))) = (f4, &self.quarter) {
            stages.push((f4.apply(proj)?.relu()?, stage));
            fine_sources.push(f4);
        }
        if let (Some(img), Some((down, conv, stage))) = (image, &self.half) {
            let g = img.apply(down)?.relu()?.apply(conv)?.relu()?;
            stages.push((g, stage));
        }
        let mut scale = 1;
        for (i, (g, stage)) in stages.into_iter().enumerate() {
            let g = if cfg.coord_channels {
                let (gb, _, gh, gw) = g.dims4()?;
                let xy = coordinate_channels(gh, gw, g.dtype(), g.device())?
                    .broadcast_as((gb, 2, gh, gw))?;
                Tensor::cat(&[&g, &xy], 1)?
            } else {
                g
            };
            let (_, gc, gh, gw) = g.dims4()?;
            let g = g
                .unsqueeze(1)?
                .broadcast_as((b, k, gc, gh, gw))?
                .reshape((bk, gc, gh, gw))?;
            let up = x.apply(&stage.convt)?;
            let film = match &self.text_film {
                Some(f) => {
                    let layer = match i {
                        0 | 1 => Some(&f.up[i]),
                        2 => f.quarter.as_ref(),
                        _ => f.half.as_ref(),
                    };
                    layer.map(|l| TextFilm::params(l, &tn_rows)).transpose()?
                }
                None => None,
            };
            let mut parts = vec![up, g];
            if let Some(maps) = self.fine_cost.get(i) {
                parts.push(maps.forward(fine_sources[i], &tn_rows, k)?);
            }
            x = stage
                .conv
                .forward(&Tensor::cat(&parts, 1)?, film.as_ref())?;
            scale *= 2;
        }
        let logits = x.apply(&self.head)?;
        Ok(logits.reshape((b, k, scale * h, scale * w))?)
    }
}

/// Checks the input of an optional decoder stage: present exactly when the stage is, and
/// `[B, in_channels, H, W]` with `[B, H, W] = bhw` when it is.
fn check_stage_input(
    stage: &str,
    input: &'static str,
    in_channels: Option<usize>,
    t: Option<&Tensor>,
    bhw: [usize; 3],
) -> Result<()> {
    match (in_channels, t) {
        (Some(c), Some(t)) => {
            let [b, h, w] = bhw;
            if t.dims() != [b, c, h, w] {
                return Err(Error::Shape {
                    tensor: input,
                    got: t.dims().to_vec(),
                    expected: format!("[{b}, {c}, {h}, {w}]"),
                });
            }
            Ok(())
        }
        (None, None) => Ok(()),
        (Some(_), None) => Err(Error::Config(format!(
            "the decoder has a {stage} stage but no {input} input was given"
        ))),
        (None, Some(_)) => Err(Error::Config(format!(
            "an {input} input was given but the decoder has no {stage} stage"
        ))),
    }
}
