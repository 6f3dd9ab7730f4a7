//! The Semantic-Structural Synergy Encoder: CNN branch, CLIP fusion, MSDeformAttn.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Init};
use tgc_nn::GroupNorm;
use tgc_nn::Linear;

use crate::cnn::{check_image, CnnBranch};
use crate::config::groups_for;
use crate::{Error, Result, SseConfig, SseMode};

/// The pixel pyramid `F_V = {F_V^1/8, F_V^1/16, F_V^1/32}` produced by [`Sse::forward`].
#[derive(Clone, Debug)]
pub struct SseOutput {
    /// `F_V^1/8`: `B x D x S_n/8 x S_n/8`.
    pub f8: Tensor,
    /// `F_V^1/16`: `B x D x S_n/16 x S_n/16`.
    pub f16: Tensor,
    /// `F_V^1/32`: `B x D x S_n/32 x S_n/32` (the CLIP grid).
    pub f32: Tensor,
    /// The CNN stem output `F_cnn^1/4`, `B x stem_channels x S_n/4 x S_n/4`, not refined
    /// by MSDeformAttn: guidance for a decoder with a 1/4-scale stage. `None` in
    /// [`SseMode::ClipOnly`] (no CNN).
    pub f4: Option<Tensor>,
}

/// Deformable DETR's `input_proj`: `Conv1x1(C_s -> D)` (Xavier-uniform weight, zero bias)
/// followed by `GroupNorm(32, D)`.
#[derive(Clone, Debug)]
struct InputProj {
    conv: Conv2d,
    norm: GroupNorm,
}

impl InputProj {
    fn new(c_in: usize, cfg: &SseConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let conv = conv1x1_xavier(c_in, d, vb.pp("conv"))?;
        let norm = tgc_nn::group_norm(groups_for(d, cfg.norm_groups), d, cfg.eps, vb.pp("norm"))?;
        Ok(Self { conv, norm })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(&self.conv.forward(x)?)?)
    }
}

/// A 1x1 convolution with Xavier-uniform weight and zero bias (Deformable DETR's init of
/// its input projections).
fn conv1x1_xavier(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    let bound = (6.0 / (c_in + c_out) as f64).sqrt();
    let weight = vb.get_with_hints(
        (c_out, c_in, 1, 1),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let bias = vb.get_with_hints(c_out, "bias", Init::Const(0.0))?;
    Ok(Conv2d::new(weight, Some(bias), Conv2dConfig::default()))
}

/// The MSDeformAttn pixel encoder of `tgc-msda`.
type Encoder = tgc_msda::MsDeformEncoder;

/// The Semantic-Structural Synergy Encoder (SSE) of TGC-Net.
///
/// [`SseMode::Full`] (the paper):
/// 1. the [`CnnBranch`] gives `F_cnn^1/8`, `F_cnn^1/16`, `F_cnn^1/32` from the image at
///    `S_n` px;
/// 2. fusion at 1/32: `F_fused = LN(P_V(F_clip) + P_C(F_cnn^1/32))` with
///    `P_V = Linear(D_v -> D)` on the CLIP patch tokens, `P_C = Conv1x1(C_32 -> D)` and a
///    LayerNorm over the channels (see [`Sse::fuse`]);
/// 3. the other levels go through Deformable DETR's input projections
///    (`Conv1x1(C_s -> D) + GroupNorm(32, D)`);
/// 4. the MSDeformAttn encoder refines `{F_cnn^1/8, F_cnn^1/16, F_fused}` into
///    `F_V = {F_V^1/8, F_V^1/16, F_V^1/32}`.
///
/// [`SseMode::ClipOnly`] and [`SseMode::CnnOnly`] are the paper's encoder ablations.
///
/// Weights: `cnn.*` ([`CnnBranch`]), `p_v.{weight,bias}`, `p_c.{weight,bias}`,
/// `fuse_norm.{weight,bias}`, `input_proj.{0,1}.{conv,norm}.*`, `encoder.*` (MSDeformAttn),
/// and in `ClipOnly` mode `up16.*`, `up8.*`. Only the parts a mode uses are created.
#[derive(Clone, Debug)]
pub struct Sse {
    cfg: SseConfig,
    cnn: Option<CnnBranch>,
    p_v: Option<Linear>,
    p_c: Option<Conv2d>,
    fuse_norm: tgc_nn::LayerNorm,
    input_proj: Option<[InputProj; 2]>,
    encoder: Option<Encoder>,
    up: Option<[ConvTranspose2d; 2]>,
}

impl Sse {
    /// Builds the SSE for `cfg.mode` under `vb`. Validates the configuration.
    pub fn new(cfg: &SseConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.d_model;
        let mode = cfg.mode;
        let cnn = if mode.uses_cnn() {
            Some(CnnBranch::new(cfg, vb.pp("cnn"))?)
        } else {
            None
        };
        let p_v = if mode.uses_clip() {
            Some(tgc_nn::linear_xavier(cfg.clip_dim, d, vb.pp("p_v"))?)
        } else {
            None
        };
        let (p_c, input_proj, encoder) = if mode.uses_cnn() {
            let [c8, c16, c32] = cfg.cnn_channels;
            (
                Some(conv1x1_xavier(c32, d, vb.pp("p_c"))?),
                Some([
                    InputProj::new(c8, cfg, vb.pp("input_proj.0"))?,
                    InputProj::new(c16, cfg, vb.pp("input_proj.1"))?,
                ]),
                Some(Encoder::new(&cfg.msda, vb.pp("encoder"))?),
            )
        } else {
            (None, None, None)
        };
        let fuse_norm = tgc_nn::layer_norm(d, cfg.eps, vb.pp("fuse_norm"))?;
        let up = if mode == SseMode::ClipOnly {
            let ct = ConvTranspose2dConfig {
                stride: 2,
                ..Default::default()
            };
            Some([
                candle_nn::conv_transpose2d(d, d, 2, ct, vb.pp("up16"))?,
                candle_nn::conv_transpose2d(d, d, 2, ct, vb.pp("up8"))?,
            ])
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            cnn,
            p_v,
            p_c,
            fuse_norm,
            input_proj,
            encoder,
            up,
        })
    }

    /// The configuration this SSE was built with.
    pub fn config(&self) -> &SseConfig {
        &self.cfg
    }

    /// The CNN branch: `cnn_image` `B x 3 x S_n x S_n` ->
    /// `[B x C_8 x S_n/8 x S_n/8, B x C_16 x S_n/16 x S_n/16, B x C_32 x S_n/32 x S_n/32]`.
    ///
    /// Errors in [`SseMode::ClipOnly`] (no CNN) and on a bad image shape.
    pub fn cnn_features(&self, cnn_image: &Tensor) -> Result<[Tensor; 3]> {
        self.cnn
            .as_ref()
            .ok_or_else(|| Error::Config(format!("mode {:?} has no CNN branch", self.cfg.mode)))?
            .forward(cnn_image)
    }

    /// The fusion at 1/32 on a `grid x grid` map:
    /// - `Full`: `F_fused = LN(P_V(F_clip) + P_C(F_cnn^1/32))`,
    /// - `ClipOnly`: `LN(P_V(F_clip))`,
    /// - `CnnOnly`: `LN(P_C(F_cnn^1/32))`,
    ///
    /// with the LayerNorm over the `D` channels of each position.
    ///
    /// - `clip_tokens`: `B x N_v x D_v`, CLIP's final-layer patch tokens without CLS,
    ///   `N_v = grid * grid` in row-major order; required when the mode uses CLIP.
    /// - `f_cnn32`: `B x C_32 x grid x grid`; required when the mode uses the CNN.
    ///
    /// Returns `B x D x grid x grid`. Inputs the mode does not use are ignored.
    pub fn fuse(
        &self,
        clip_tokens: Option<&Tensor>,
        f_cnn32: Option<&Tensor>,
        grid: usize,
    ) -> Result<Tensor> {
        let d = self.cfg.d_model;
        let n = grid * grid;
        // Both projections in token layout B x N x D: P_V is a Linear on tokens, P_C a 1x1
        // conv whose output is flattened row-major, which matches CLIP's token order.
        let mut sum: Option<Tensor> = None;
        if let Some(p_v) = &self.p_v {
            let tokens = clip_tokens.ok_or(Error::MissingClipTokens(self.cfg.mode))?;
            self.check_clip_tokens(tokens, None, grid)?;
            sum = Some(tokens.apply(p_v)?);
        }
        if let Some(p_c) = &self.p_c {
            let f = f_cnn32.ok_or_else(|| {
                Error::Input(format!(
                    "fuse: mode {:?} needs f_cnn32 (B x C_32 x grid x grid)",
                    self.cfg.mode
                ))
            })?;
            let (b, c, h, w) = f.dims4()?;
            if (c, h, w) != (self.cfg.cnn_channels[2], grid, grid) {
                return Err(Error::Input(format!(
                    "fuse: f_cnn32 is {:?}, expected B x {} x {grid} x {grid}",
                    f.dims(),
                    self.cfg.cnn_channels[2]
                )));
            }
            let pc = p_c.forward(f)?.reshape((b, d, n))?.transpose(1, 2)?;
            sum = Some(match sum {
                Some(s) => {
                    if s.dim(0)? != b {
                        return Err(Error::Input(format!(
                            "fuse: clip_tokens batch {} != f_cnn32 batch {b}",
                            s.dim(0)?
                        )));
                    }
                    (s + pc)?
                }
                None => pc,
            });
        }
        let sum = sum.ok_or_else(|| Error::Config("fuse: mode uses no input".into()))?;
        let b = sum.dim(0)?;
        let fused = self.fuse_norm.forward(&sum.contiguous()?)?;
        Ok(fused
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, grid, grid))?)
    }

    /// Checks `clip_tokens` is `B x grid^2 x D_v` (and `B == batch` when given).
    fn check_clip_tokens(&self, tokens: &Tensor, batch: Option<usize>, grid: usize) -> Result<()> {
        let dims = tokens.dims();
        let bad = |msg: String| Err(Error::Input(format!("clip_tokens {dims:?}: {msg}")));
        if dims.len() != 3 {
            return bad("expected 3 dimensions B x N_v x D_v".into());
        }
        if let Some(b) = batch {
            if dims[0] != b {
                return bad(format!(
                    "batch {} differs from the image batch {b}",
                    dims[0]
                ));
            }
        }
        if dims[2] != self.cfg.clip_dim {
            return bad(format!(
                "token width {} differs from clip_dim {}",
                dims[2], self.cfg.clip_dim
            ));
        }
        if dims[1] != grid * grid {
            return bad(format!(
                "{} tokens do not form the CNN 1/32 grid {grid} x {grid} = {}; the CNN image \
                 must be S_n = 32 * S_c / patch px (e.g. 768 for ViT-L/14 at 336, 448 for a \
                 patch-16 CLIP at 224), and CLS must be removed",
                dims[1],
                grid * grid
            ));
        }
        Ok(())
    }

    /// The hybrid pyramid that enters the MSDeformAttn encoder (modes with a CNN):
    /// `[InputProj(F_cnn^1/8), InputProj(F_cnn^1/16), F_fused]`, i.e.
    /// `[B x D x S_n/8 x S_n/8, B x D x S_n/16 x S_n/16, B x D x S_n/32 x S_n/32]`, where
    /// `InputProj = Conv1x1(C_s -> D) + GroupNorm(32, D)` as Deformable DETR's `input_proj`.
    ///
    /// Inputs as in [`Sse::forward`]. Errors in [`SseMode::ClipOnly`].
    pub fn pyramid(&self, cnn_image: &Tensor, clip_tokens: Option<&Tensor>) -> Result<[Tensor; 3]> {
        Ok(self.pyramid_with_stem(cnn_image, clip_tokens)?.0)
    }

    /// [`Self::pyramid`] and the CNN stem output `F_cnn^1/4`.
    fn pyramid_with_stem(
        &self,
        cnn_image: &Tensor,
        clip_tokens: Option<&Tensor>,
    ) -> Result<([Tensor; 3], Tensor)> {
        let proj = self
            .input_proj
            .as_ref()
            .ok_or_else(|| Error::Config(format!("mode {:?} has no CNN pyramid", self.cfg.mode)))?;
        let s_n = check_image(cnn_image, self.cfg.in_channels)?;
        let grid = s_n / 32;
        if self.cfg.mode.uses_clip() {
            let tokens = clip_tokens.ok_or(Error::MissingClipTokens(self.cfg.mode))?;
            self.check_clip_tokens(tokens, Some(cnn_image.dim(0)?), grid)?;
        }
        let cnn = self
            .cnn
            .as_ref()
            .ok_or_else(|| Error::Config(format!("mode {:?} has no CNN branch", self.cfg.mode)))?;
        let (stem, [c8, c16, c32]) = cnn.forward_with_stem(cnn_image)?;
        let fused = self.fuse(clip_tokens, Some(&c32), grid)?;
        Ok(([proj[0].forward(&c8)?, proj[1].forward(&c16)?, fused], stem))
    }

    /// Runs the SSE.
    ///
    /// - `cnn_image`: `B x 3 x S_n x S_n`, `S_n` a multiple of 32 (square only). In
    ///   `ClipOnly` mode only its shape is used (it fixes the output sizes).
    /// - `clip_tokens`: `B x N_v x D_v`, CLIP's final-layer patch tokens without CLS in
    ///   row-major order, with `N_v = (S_n/32)^2`; required in `Full` and `ClipOnly` modes,
    ///   ignored in `CnnOnly`.
    /// - `train`: enables dropout in the MSDeformAttn encoder (GroupNorm and LayerNorm are
    ///   the same in both modes).
    ///
    /// Returns [`SseOutput`]: `F_V^1/8`, `F_V^1/16`, `F_V^1/32`, each `B x D x S_n/s x S_n/s`,
    /// and the stem's `F_cnn^1/4` (modes with a CNN).
    pub fn forward(
        &self,
        cnn_image: &Tensor,
        clip_tokens: Option<&Tensor>,
        train: bool,
    ) -> Result<SseOutput> {
        let s_n = check_image(cnn_image, self.cfg.in_channels)?;
        let b = cnn_image.dim(0)?;
        let grid = s_n / 32;
        if self.cfg.mode.uses_clip() {
            let tokens = clip_tokens.ok_or(Error::MissingClipTokens(self.cfg.mode))?;
            self.check_clip_tokens(tokens, Some(b), grid)?;
        }
        match self.cfg.mode {
            SseMode::ClipOnly => {
                let f32 = self.fuse(clip_tokens, None, grid)?;
                let [up16, up8] = self.up.as_ref().ok_or_else(|| {
                    Error::Config("ClipOnly SSE built without its upsamplers".into())
                })?;
                let f16 = up16.forward(&f32)?;
                let f8 = up8.forward(&f16)?;
                Ok(SseOutput {
                    f8,
                    f16,
                    f32,
                    f4: None,
                })
            }
            SseMode::Full | SseMode::CnnOnly => {
                let enc = self.encoder.as_ref().ok_or_else(|| {
                    Error::Config("SSE built without its MSDeformAttn encoder".into())
                })?;
                let (srcs, stem) = self.pyramid_with_stem(cnn_image, clip_tokens)?;
                let out = enc.forward(&srcs, train)?;
                let [f8, f16, f32]: [Tensor; 3] = out.try_into().map_err(|v: Vec<Tensor>| {
                    Error::Config(format!(
                        "MSDeformAttn encoder returned {} levels, not 3",
                        v.len()
                    ))
                })?;
                Ok(SseOutput {
                    f8,
                    f16,
                    f32,
                    f4: Some(stem),
                })
            }
        }
    }
}
