//! The lightweight CNN branch of the SSE: a pyramid at 1/8, 1/16 and 1/32.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use tgc_nn::GroupNorm;

use crate::config::groups_for;
use crate::{Error, Result, SseConfig};

// The matrix-product convolution lives in tgc-nn; re-exported so that
// `tgc_sse::MatmulConv` keeps working.
pub use tgc_nn::MatmulConv;

/// `Conv kxk (no bias) -> GroupNorm -> optional ReLU`, with the convolution a
/// [`MatmulConv`] (`kernel == stride`, or 3x3 stride 1).
///
/// The convolution has no bias because the GroupNorm that follows removes it anyway.
#[derive(Clone, Debug)]
pub struct ConvNorm {
    conv: MatmulConv,
    norm: GroupNorm,
    relu: bool,
}

impl ConvNorm {
    /// Builds the block under `vb` (`conv.weight`, `norm.weight`, `norm.bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        relu: bool,
        cfg: &SseConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = MatmulConv::new(c_in, c_out, kernel, stride, vb.pp("conv"))?;
        let norm = tgc_nn::group_norm(
            groups_for(c_out, cfg.norm_groups),
            c_out,
            cfg.eps,
            vb.pp("norm"),
        )?;
        Ok(Self { conv, norm, relu })
    }

    /// `x`: `B x c_in x H x W` -> `B x c_out x H/stride x W/stride`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.norm.forward(&self.conv.forward(x)?)?;
        Ok(if self.relu { y.relu()? } else { y })
    }
}

/// A ResNet basic block: `ReLU(x + GN(Conv3x3(ReLU(GN(Conv3x3(x))))))`.
#[derive(Clone, Debug)]
pub struct BasicBlock {
    conv1: ConvNorm,
    conv2: ConvNorm,
}

impl BasicBlock {
    /// Builds a block of width `c` under `vb` (`conv1.*`, `conv2.*`).
    pub fn new(c: usize, cfg: &SseConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: ConvNorm::new(c, c, 3, 1, true, cfg, vb.pp("conv1"))?,
            conv2: ConvNorm::new(c, c, 3, 1, false, cfg, vb.pp("conv2"))?,
        })
    }

    /// `x`: `B x c x H x W` -> same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv2.forward(&self.conv1.forward(x)?)?;
        Ok((x + y)?.relu()?)
    }
}

/// One pyramid stage: a 2x2 stride-2 `ConvNorm` (patch merging) followed by
/// [`BasicBlock`]s.
#[derive(Clone, Debug)]
struct Stage {
    down: ConvNorm,
    blocks: Vec<BasicBlock>,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.down.forward(x)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        Ok(x)
    }
}

/// The CNN branch: a stride-4 stem and three stages that each halve the resolution,
/// giving `F_cnn^1/8`, `F_cnn^1/16`, `F_cnn^1/32`.
///
/// - stem: `Conv4x4/4(in -> stem)` (patchify) + GN + ReLU, then `Conv3x3(stem -> stem)` +
///   GN + ReLU at 1/4;
/// - stage `i` (1/8, 1/16, 1/32): `Conv2x2/2(c_in -> C_i)` (patch merging) + GN + ReLU,
///   then `cnn_blocks[i]` residual [`BasicBlock`]s.
///
/// Downsampling early with non-overlapping patch convolutions keeps the high-resolution
/// work small (the CPU preset trains on two cores), and every convolution is a
/// [`MatmulConv`], whose backward pass is a matrix product. GroupNorm (not BatchNorm)
/// makes training and evaluation identical and independent of the batch size.
///
/// Weights: `stem.{0,1}.{conv,norm}.*`, `stages.{0,1,2}.down.*`,
/// `stages.{i}.blocks.{j}.{conv1,conv2}.*`.
#[derive(Clone, Debug)]
pub struct CnnBranch {
    stem: [ConvNorm; 2],
    stages: Vec<Stage>,
    in_channels: usize,
}

impl CnnBranch {
    /// Builds the branch from the widths of `cfg` under `vb`.
    pub fn new(cfg: &SseConfig, vb: VarBuilder) -> Result<Self> {
        let s = cfg.stem_channels;
        let stem = [
            ConvNorm::new(cfg.in_channels, s, 4, 4, true, cfg, vb.pp("stem.0"))?,
            ConvNorm::new(s, s, 3, 1, true, cfg, vb.pp("stem.1"))?,
        ];
        let mut stages = Vec::with_capacity(3);
        let mut c_in = s;
        for (i, (&c, &n)) in cfg.cnn_channels.iter().zip(&cfg.cnn_blocks).enumerate() {
            let vb_s = vb.pp(format!("stages.{i}"));
            let down = ConvNorm::new(c_in, c, 2, 2, true, cfg, vb_s.pp("down"))?;
            let blocks = (0..n)
                .map(|j| BasicBlock::new(c, cfg, vb_s.pp(format!("blocks.{j}"))))
                .collect::<Result<Vec<_>>>()?;
            stages.push(Stage { down, blocks });
            c_in = c;
        }
        Ok(Self {
            stem,
            stages,
            in_channels: cfg.in_channels,
        })
    }

    /// `image`: `B x in_channels x S x S` with `S` a multiple of 32 ->
    /// `[B x C_8 x S/8 x S/8, B x C_16 x S/16 x S/16, B x C_32 x S/32 x S/32]`.
    ///
    /// Errors on a non-square image or one whose side is not a multiple of 32: the CLIP
    /// patch grid it is fused with is square, and the pyramid levels must be exact
    /// halvings of each other.
    pub fn forward(&self, image: &Tensor) -> Result<[Tensor; 3]> {
        Ok(self.forward_with_stem(image)?.1)
    }

    /// As [`Self::forward`], also returning the stem output `F_cnn^1/4`,
    /// `B x stem_channels x S/4 x S/4` (the decoder's optional 1/4 guidance).
    pub fn forward_with_stem(&self, image: &Tensor) -> Result<(Tensor, [Tensor; 3])> {
        check_image(image, self.in_channels)?;
        let stem = self.stem[1].forward(&self.stem[0].forward(image)?)?;
        let mut x = stem.clone();
        let mut outs = Vec::with_capacity(3);
        for st in &self.stages {
            x = st.forward(&x)?;
            outs.push(x.clone());
        }
        let [a, b, c]: [Tensor; 3] = outs
            .try_into()
            .map_err(|_| Error::Config("CnnBranch: expected exactly 3 stages".into()))?;
        Ok((stem, [a, b, c]))
    }
}

/// Checks that `image` is `B x in_channels x S x S` with `S` a positive multiple of 32;
/// returns `S`.
pub(crate) fn check_image(image: &Tensor, in_channels: usize) -> Result<usize> {
    let dims = image.dims();
    let bad = |msg: String| Err(Error::Input(format!("cnn_image {dims:?}: {msg}")));
    if dims.len() != 4 {
        return bad("expected 4 dimensions B x C x S x S".into());
    }
    let (c, h, w) = (dims[1], dims[2], dims[3]);
    if c != in_channels {
        return bad(format!("expected {in_channels} channels, got {c}"));
    }
    if h != w {
        return bad(format!(
            "the CNN branch needs a square image (its 1/32 grid is fused with the square CLIP \
             patch grid), got {h} x {w}"
        ));
    }
    if h == 0 || h % 32 != 0 {
        return bad(format!(
            "the side must be a positive multiple of 32, got {h}"
        ));
    }
    Ok(h)
}
