//! Convolutions computed as one matrix product, fast to train on CPU.
//!
//! Candle's CPU `conv2d` backward computes the input gradient with a naive transposed
//! convolution, and `conv_transpose2d` forward is the same naive loop. Here a convolution
//! is an unfold (im2col) followed by one matrix product, so the forward and both weight and
//! input gradients are matrix products plus one cheap gather/scatter pass:
//!
//! - [`MatmulConv`]: `Conv2d` with an odd kernel `k`, stride 1 and padding `k / 2`
//!   ("same" convolution: the `k * k` shifted views of the zero-padded input concatenated
//!   on channels), or `kernel == stride` without padding (patchify / patch merging: a
//!   space-to-depth reshape). Optional bias.
//! - [`MatmulConvTranspose`]: `ConvTranspose2d` with `kernel == stride`, no padding: one
//!   matrix product followed by a depth-to-space reshape. Optional bias.
//!
//! The bias is fused into the product: the unfolded input gets an extra row of ones and the
//! weight matrix an extra column holding the bias, so the bias gradient comes out of the
//! weight-gradient product (no strided reduction over the output).
//!
//! Weights use the PyTorch / `candle_nn` layouts (`O x I x k x k` for convolutions,
//! `I x O x k x k` for transposed convolutions) and names (`weight`, `bias`), so the same
//! checkpoints load. [`conv2d`], [`conv2d_no_bias`], [`conv_transpose2d`] and
//! [`conv_transpose2d_no_bias`] mirror the `candle_nn` constructors, with the same
//! initialisation hints. Unsupported configurations are errors.
//!
//! On CPU (f32/f64) the unfold and its adjoint (fold, col2im) are fused multi-threaded
//! kernels, deterministic whatever the thread count; elsewhere the same computation is
//! built from candle's differentiable view ops ([`MatmulConv::forward_composite`],
//! [`MatmulConvTranspose::forward_composite`]).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, Init, VarBuilder};
use rayon::prelude::*;

use crate::kernel::{cpu_kernel1, Float, Kernel1};

/// Geometry of an unfold of a `B x c x h x w` input into `B x rows x (ho * wo)` columns,
/// with `rows = c * k * k` (+ 1 when `ones_row`: a trailing row of ones for the bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
    ones_row: bool,
}

impl Geometry {
    fn new(c: usize, h: usize, w: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
        if c == 0 || h == 0 || w == 0 {
            candle_core::bail!("conv: empty input {c} x {h} x {w}");
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!(
                "conv: input {h} x {w} with padding {pad} is smaller than the kernel {k}"
            );
        }
        Ok(Self {
            c,
            h,
            w,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
            ones_row: false,
        })
    }

    fn kk(&self) -> usize {
        self.k * self.k
    }

    fn n(&self) -> usize {
        self.ho * self.wo
    }

    fn rows(&self) -> usize {
        self.c * self.kk() + usize::from(self.ones_row)
    }

    /// Output columns `[lo, hi)` of an output row whose input column `ox * stride + kx -
    /// pad` lies inside `[0, w)` (stride 1 only), or `None` when empty.
    fn span(&self, kx: usize) -> Option<(usize, usize)> {
        let lo = self.pad.saturating_sub(kx);
        let hi = (self.w + self.pad).saturating_sub(kx).min(self.wo);
        (lo < hi).then_some((lo, hi))
    }

    /// Input row read by output row `oy` at kernel row `ky`, if inside the image.
    fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.pad)
            .filter(|&iy| iy < self.h)
    }

    /// Input column read by output column `ox` at kernel column `kx`, if inside.
    fn in_col(&self, ox: usize, kx: usize) -> Option<usize> {
        (ox * self.stride + kx)
            .checked_sub(self.pad)
            .filter(|&ix| ix < self.w)
    }
}

/// Unfolds one input channel plane (`h x w`) into its `k * k` rows of `ho * wo` columns.
fn unfold_plane<T: Float>(x: &[T], out: &mut [T], g: &Geometry) {
    let n = g.n();
    for ky in 0..g.k {
        for kx in 0..g.k {
            let row = &mut out[(ky * g.k + kx) * n..][..n];
            for oy in 0..g.ho {
                let Some(iy) = g.in_row(oy, ky) else { continue };
                let xrow = &x[iy * g.w..][..g.w];
                let orow = &mut row[oy * g.wo..][..g.wo];
                if g.stride == 1 {
                    if let Some((lo, hi)) = g.span(kx) {
                        let shift = kx as isize - g.pad as isize;
                        let (a, b) = (
                            (lo as isize + shift) as usize,
                            (hi as isize + shift) as usize,
                        );
                        orow[lo..hi].copy_from_slice(&xrow[a..b]);
                    }
                } else {
                    for (ox, o) in orow.iter_mut().enumerate() {
                        if let Some(ix) = g.in_col(ox, kx) {
                            *o = xrow[ix];
                        }
                    }
                }
            }
        }
    }
}

/// Adds the `k * k` rows of one channel's columns back into its `h x w` plane (the
/// adjoint of [`unfold_plane`]).
fn fold_plane<T: Float>(cols: &[T], dx: &mut [T], g: &Geometry) {
    let n = g.n();
    for ky in 0..g.k {
        for kx in 0..g.k {
            let row = &cols[(ky * g.k + kx) * n..][..n];
            for oy in 0..g.ho {
                let Some(iy) = g.in_row(oy, ky) else { continue };
                let drow = &mut dx[iy * g.w..][..g.w];
                let crow = &row[oy * g.wo..][..g.wo];
                if g.stride == 1 {
                    if let Some((lo, hi)) = g.span(kx) {
                        let shift = kx as isize - g.pad as isize;
                        let (a, b) = (
                            (lo as isize + shift) as usize,
                            (hi as isize + shift) as usize,
                        );
                        for (d, &v) in drow[a..b].iter_mut().zip(&crow[lo..hi]) {
                            *d += v;
                        }
                    }
                } else {
                    for (ox, &v) in crow.iter().enumerate() {
                        if let Some(ix) = g.in_col(ox, kx) {
                            drow[ix] += v;
                        }
                    }
                }
            }
        }
    }
}

fn unfold_cpu<T: Float>(x: &[T], b: usize, g: &Geometry) -> Vec<T> {
    let (n, plane) = (g.n(), g.h * g.w);
    let mut out = vec![T::ZERO; b * g.rows() * n];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(g.rows() * n)
        .zip(x.par_chunks(g.c * plane))
        .for_each(|(ob, xb)| {
            let (cols, ones) = ob.split_at_mut(g.c * g.kk() * n);
            ones.fill(T::ONE);
            cols.par_chunks_mut(g.kk() * n)
                .zip(xb.par_chunks(plane))
                .for_each(|(oc, xc)| unfold_plane(xc, oc, g));
        });
    out
}

fn fold_cpu<T: Float>(cols: &[T], b: usize, g: &Geometry) -> Vec<T> {
    let (n, plane) = (g.n(), g.h * g.w);
    let mut dx = vec![T::ZERO; b * g.c * plane];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(plane).enumerate().for_each(|(i, d)| {
        let (bi, ci) = (i / g.c, i % g.c);
        let src = &cols[(bi * g.rows() + ci * g.kk()) * n..][..g.kk() * n];
        fold_plane(src, d, g);
    });
    dx
}

/// `B x c x h x w` -> `B x rows x (ho * wo)`; backward: [`Fold`].
struct Unfold(Geometry);

impl Kernel1 for Unfold {
    fn run<T: Float>(&self, dims: &[usize], x: &[T]) -> Vec<T> {
        unfold_cpu(x, dims[0], &self.0)
    }
}

impl Kernel1 for Fold {
    fn run<T: Float>(&self, dims: &[usize], cols: &[T]) -> Vec<T> {
        fold_cpu(cols, dims[0], &self.0)
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "tgc-unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let b = l.dims()[0];
        let out = cpu_kernel1(
            self,
            (s, l, "unfold: input"),
            "unfold: only f32 and f64 are supported",
        )?;
        Ok((out, Shape::from((b, g.rows(), g.n()))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Fold(self.0))?,
        ))
    }
}

/// `B x rows x (ho * wo)` -> `B x c x h x w`, summing overlapping contributions (col2im;
/// the ones row, if any, is ignored). Backward (without a ones row): [`Unfold`].
struct Fold(Geometry);

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "tgc-fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let b = l.dims()[0];
        let out = cpu_kernel1(
            self,
            (s, l, "fold: input"),
            "fold: only f32 and f64 are supported",
        )?;
        Ok((out, Shape::from((b, g.c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if self.0.ones_row {
            candle_core::bail!("fold backward: not defined with a ones row");
        }
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Unfold(self.0))?,
        ))
    }
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Candle-op version of [`Unfold`] for the two supported geometries.
fn unfold_composite(x: &Tensor, g: &Geometry) -> Result<Tensor> {
    let b = x.dim(0)?;
    let (k, n) = (g.k, g.n());
    let cols = if g.stride == 1 {
        let p = g.pad;
        let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let mut views = Vec::with_capacity(g.kk());
        for ky in 0..k {
            for kx in 0..k {
                views.push(xp.narrow(2, ky, g.ho)?.narrow(3, kx, g.wo)?);
            }
        }
        Tensor::stack(&views, 2)?.reshape((b, g.c * g.kk(), n))?
    } else {
        // kernel == stride, no padding: space-to-depth of the part the kernel covers.
        x.narrow(2, 0, g.ho * k)?
            .narrow(3, 0, g.wo * k)?
            .reshape((b, g.c, g.ho, k, g.wo, k))?
            .permute((0, 1, 3, 5, 2, 4))?
            .contiguous()?
            .reshape((b, g.c * g.kk(), n))?
    };
    if g.ones_row {
        let ones = Tensor::ones((b, 1, n), x.dtype(), x.device())?;
        Tensor::cat(&[cols, ones], 1)
    } else {
        Ok(cols)
    }
}

/// `B x (c k k) x (h w)` -> `B x c x hk x wk`, row `c k k + ky k + kx`, column `y w + x`
/// going to pixel `(y k + ky, x k + kx)` of channel `c`.
fn depth_to_space(
    z: &Tensor,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    composite: bool,
) -> Result<Tensor> {
    let b = z.dim(0)?;
    if !composite && fused(z) {
        let g = Geometry::new(c, h * k, w * k, k, k, 0)?;
        z.contiguous()?.apply_op1(Fold(g))
    } else {
        z.reshape((b, c, k, k, h, w))?
            .permute((0, 1, 4, 2, 5, 3))?
            .contiguous()?
            .reshape((b, c, h * k, w * k))
    }
}

/// Checks a `Conv2dConfig` against what [`MatmulConv`] supports.
fn check_conv(kernel: usize, cfg: &Conv2dConfig) -> Result<()> {
    let same = cfg.stride == 1 && kernel % 2 == 1 && cfg.padding == kernel / 2;
    let patch = kernel == cfg.stride && cfg.padding == 0;
    if kernel == 0 || cfg.groups != 1 || cfg.dilation != 1 || !(same || patch) {
        candle_core::bail!(
            "MatmulConv supports an odd kernel with stride 1 and padding kernel/2, or \
             kernel == stride without padding (groups 1, dilation 1); got kernel {kernel}, \
             stride {}, padding {}, dilation {}, groups {}",
            cfg.stride,
            cfg.padding,
            cfg.dilation,
            cfg.groups
        );
    }
    Ok(())
}

/// Checks a `ConvTranspose2dConfig` against what [`MatmulConvTranspose`] supports.
fn check_conv_transpose(kernel: usize, cfg: &ConvTranspose2dConfig) -> Result<()> {
    if kernel == 0
        || kernel != cfg.stride
        || cfg.padding != 0
        || cfg.output_padding != 0
        || cfg.dilation != 1
    {
        candle_core::bail!(
            "MatmulConvTranspose supports kernel == stride without padding (dilation 1); got \
             kernel {kernel}, stride {}, padding {}, output_padding {}, dilation {}",
            cfg.stride,
            cfg.padding,
            cfg.output_padding,
            cfg.dilation
        );
    }
    Ok(())
}

fn check_bias(bias: Option<&Tensor>, c_out: usize, what: &str) -> Result<()> {
    if let Some(b) = bias {
        if b.dims() != [c_out] {
            candle_core::bail!(
                "{what}: bias {:?} does not match {c_out} output channels",
                b.dims()
            );
        }
    }
    Ok(())
}

/// A 2-D convolution computed as an unfold and one matrix product, for speed on CPU.
///
/// Supports an odd kernel `k` with stride 1 and padding `k / 2` (output the size of the
/// input), and `kernel == stride` without padding (output `floor(H / k) x floor(W / k)`,
/// as PyTorch), with an optional bias. Same result and parameters (`weight`
/// `O x I x k x k`, `bias` `O`) as `candle_nn::Conv2d` / `torch.nn.Conv2d`, but the
/// backward pass is a matrix product too (about twice as fast as candle's on CPU; see the
/// `conv_timing` example).
#[derive(Clone, Debug)]
pub struct MatmulConv {
    weight: Tensor,
    bias: Option<Tensor>,
    c_out: usize,
    c_in: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MatmulConv {
    /// Creates a bias-free convolution with `weight` (`c_out x c_in x kernel x kernel`,
    /// Kaiming-normal as candle's `conv2d`) under `vb`. Padding is `kernel / 2` for
    /// stride 1 (odd kernels), 0 for `kernel == stride`. Errors on other pairs.
    ///
    /// Same as [`conv2d_no_bias`] with that padding.
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let padding = if stride == 1 { kernel / 2 } else { 0 };
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        conv2d_no_bias(c_in, c_out, kernel, cfg, vb)
    }

    /// Builds a convolution from a weight `O x I x k x k` and an optional bias `O`, as
    /// `candle_nn::Conv2d::new`. Errors on an unsupported configuration.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!("MatmulConv: non-square kernel {kh} x {kw}");
        }
        check_conv(kh, &cfg)?;
        check_bias(bias.as_ref(), c_out, "MatmulConv")?;
        Ok(Self {
            weight,
            bias,
            c_out,
            c_in,
            kernel: kh,
            stride: cfg.stride,
            padding: cfg.padding,
        })
    }

    /// The weight, `O x I x k x k`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `O`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The configuration as a `candle_nn::Conv2dConfig`.
    pub fn config(&self) -> Conv2dConfig {
        Conv2dConfig {
            padding: self.padding,
            stride: self.stride,
            ..Default::default()
        }
    }

    fn geometry(&self, x: &Tensor) -> Result<Geometry> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.c_in {
            candle_core::bail!(
                "MatmulConv expects {} input channels, got input {:?}",
                self.c_in,
                x.dims()
            );
        }
        let mut g = Geometry::new(c, h, w, self.kernel, self.stride, self.padding)?;
        g.ones_row = self.bias.is_some();
        Ok(g)
    }

    fn product(&self, cols: &Tensor, g: &Geometry) -> Result<Tensor> {
        let b = cols.dim(0)?;
        let mut wmat = self.weight.reshape((self.c_out, self.c_in * g.kk()))?;
        if let Some(bias) = &self.bias {
            wmat = Tensor::cat(&[wmat, bias.reshape((self.c_out, 1))?], 1)?;
        }
        wmat.broadcast_left(b)?
            .matmul(cols)?
            .reshape((b, self.c_out, g.ho, g.wo))
    }

    /// `x`: `B x I x H x W` -> `B x O x Ho x Wo`. Fused unfold on CPU (f32/f64),
    /// [`MatmulConv::forward_composite`] elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.geometry(x)?;
        let cols = if fused(x) {
            x.contiguous()?.apply_op1(Unfold(g))?
        } else {
            unfold_composite(x, &g)?
        };
        self.product(&cols, &g)
    }

    /// The same convolution with the unfold built from candle's view ops (shifted
    /// `narrow`s of the zero-padded input, or a space-to-depth permute): the fallback on
    /// other devices and dtypes, and a test oracle for the fused kernel.
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.geometry(x)?;
        self.product(&unfold_composite(x, &g)?, &g)
    }
}

impl Module for MatmulConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        MatmulConv::forward(self, x)
    }
}

/// A 2-D transposed convolution with `kernel == stride` and no padding, computed as one
/// matrix product followed by a depth-to-space reshape.
///
/// Same result and parameters (`weight` `I x O x k x k`, `bias` `O`) as
/// `candle_nn::ConvTranspose2d` / `torch.nn.ConvTranspose2d(k, stride=k)`: output
/// `B x O x kH x kW`. Candle's CPU transposed convolution is a naive loop; here forward and
/// backward are matrix products.
#[derive(Clone, Debug)]
pub struct MatmulConvTranspose {
    weight: Tensor,
    bias: Option<Tensor>,
    c_in: usize,
    c_out: usize,
    kernel: usize,
}

impl MatmulConvTranspose {
    /// Builds a transposed convolution from a weight `I x O x k x k` and an optional bias
    /// `O`, as `candle_nn::ConvTranspose2d::new`. Errors unless `stride == k` with no
    /// padding, output padding or dilation.
    pub fn from_weights(
        weight: Tensor,
        bias: Option<Tensor>,
        cfg: ConvTranspose2dConfig,
    ) -> Result<Self> {
        let (c_in, c_out, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!("MatmulConvTranspose: non-square kernel {kh} x {kw}");
        }
        check_conv_transpose(kh, &cfg)?;
        check_bias(bias.as_ref(), c_out, "MatmulConvTranspose")?;
        Ok(Self {
            weight,
            bias,
            c_in,
            c_out,
            kernel: kh,
        })
    }

    /// The weight, `I x O x k x k`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `O`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The configuration as a `candle_nn::ConvTranspose2dConfig`.
    pub fn config(&self) -> ConvTranspose2dConfig {
        ConvTranspose2dConfig {
            stride: self.kernel,
            ..Default::default()
        }
    }

    fn run(&self, x: &Tensor, composite: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.c_in {
            candle_core::bail!(
                "MatmulConvTranspose expects {} input channels, got input {:?}",
                self.c_in,
                x.dims()
            );
        }
        let (k, o) = (self.kernel, self.c_out);
        let kk = k * k;
        let mut xr = x.reshape((b, c, h * w))?;
        // O k k x I: row `o k k + ky k + kx`.
        let mut wt = self.weight.reshape((c, o * kk))?.t()?.contiguous()?;
        if let Some(bias) = &self.bias {
            let ones = Tensor::ones((b, 1, h * w), x.dtype(), x.device())?;
            xr = Tensor::cat(&[xr, ones], 1)?;
            let rep = bias
                .reshape((o, 1))?
                .broadcast_as((o, kk))?
                .reshape((o * kk, 1))?;
            wt = Tensor::cat(&[wt, rep], 1)?;
        }
        let z = wt.broadcast_left(b)?.matmul(&xr.contiguous()?)?;
        depth_to_space(&z, o, h, w, k, composite)
    }

    /// `x`: `B x I x H x W` -> `B x O x kH x kW`. Fused depth-to-space on CPU (f32/f64),
    /// [`MatmulConvTranspose::forward_composite`] elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// The same computation with the depth-to-space built from candle's reshape and
    /// permute: the fallback on other devices and dtypes, and a test oracle.
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }
}

impl Module for MatmulConvTranspose {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        MatmulConvTranspose::forward(self, x)
    }
}

fn conv_weight(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: &Conv2dConfig,
    vb: &VarBuilder,
) -> Result<Tensor> {
    check_conv(kernel, cfg)?;
    vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )
}

/// A [`MatmulConv`] with bias, initialised as `candle_nn::conv2d`: `weight`
/// (`out x in x k x k`) Kaiming-normal, `bias` uniform in `+-1/sqrt(in_channels)`.
///
/// `cfg` must be stride 1 with padding `kernel / 2` (odd kernel) or `stride == kernel`
/// without padding; groups and dilation 1.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<MatmulConv> {
    let weight = conv_weight(in_channels, out_channels, kernel, &cfg, &vb)?;
    let bound = 1. / (in_channels as f64).sqrt();
    let bias = vb.get_with_hints(
        out_channels,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    MatmulConv::from_weights(weight, Some(bias), cfg)
}

/// A bias-free [`MatmulConv`], initialised as `candle_nn::conv2d_no_bias` (Kaiming-normal
/// `weight`). Same configurations as [`conv2d`].
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<MatmulConv> {
    let weight = conv_weight(in_channels, out_channels, kernel, &cfg, &vb)?;
    MatmulConv::from_weights(weight, None, cfg)
}

fn conv_transpose_init(out_channels: usize, kernel: usize) -> Init {
    let bound = 1. / (out_channels as f64).sqrt() / kernel as f64;
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A [`MatmulConvTranspose`] with bias, initialised as `candle_nn::conv_transpose2d`:
/// `weight` (`in x out x k x k`) and `bias` uniform in `+-1/(sqrt(out_channels) k)`.
///
/// `cfg` must have `stride == kernel` and no padding, output padding or dilation.
pub fn conv_transpose2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: ConvTranspose2dConfig,
    vb: VarBuilder,
) -> Result<MatmulConvTranspose> {
    check_conv_transpose(kernel, &cfg)?;
    let init = conv_transpose_init(out_channels, kernel);
    let weight = vb.get_with_hints((in_channels, out_channels, kernel, kernel), "weight", init)?;
    let bias = vb.get_with_hints(out_channels, "bias", init)?;
    MatmulConvTranspose::from_weights(weight, Some(bias), cfg)
}

/// A bias-free [`MatmulConvTranspose`], initialised as
/// `candle_nn::conv_transpose2d_no_bias`. Same configurations as [`conv_transpose2d`].
pub fn conv_transpose2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: ConvTranspose2dConfig,
    vb: VarBuilder,
) -> Result<MatmulConvTranspose> {
    check_conv_transpose(kernel, &cfg)?;
    let init = conv_transpose_init(out_channels, kernel);
    let weight = vb.get_with_hints((in_channels, out_channels, kernel, kernel), "weight", init)?;
    MatmulConvTranspose::from_weights(weight, None, cfg)
}
