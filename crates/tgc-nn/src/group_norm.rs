//! Fused group normalisation with an analytic backward pass.
//!
//! `candle_nn::GroupNorm` is eleven candle ops (reshape, mean, centre, variance, divide,
//! scale, shift, each a fresh tensor) whose backward pass doubles that and adds the
//! strided reductions of the weight and bias gradients. In the decoder's DoubleConvs and
//! the CNN branch of the small presets the maps are large and thin (8 images x 4-16
//! channels x 40 x 40 or 80 x 80), so those temporaries, not arithmetic, were the cost.
//! This op makes one pass per group forward and two per group backward.
//!
//! The weight and bias gradients are sums over the batch: each (image, group) task writes
//! its own partial sums, which are added in image order afterwards, so the result does
//! not depend on the number of threads (exact resume needs bit-identical gradients).

use candle_core::{CpuStorage, CustomOp3, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::kernel::{cpu_kernel3, split_affine_grads, Float, Kernel3};
use crate::layer_norm::row_stats;

/// Group geometry of a contiguous `N x C x spatial...` tensor.
#[derive(Clone, Copy, Debug)]
struct Groups {
    /// Groups per image.
    groups: usize,
    /// Channels per group.
    per_group: usize,
    /// Spatial size (product of the dims after the channel dim).
    spatial: usize,
}

fn forward<T: Float>(x: &[T], w: &[T], b: &[T], g: Groups, eps: f64) -> Vec<T> {
    let eps = T::from_f64(eps);
    let (cg, hw) = (g.per_group, g.spatial);
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(cg * hw)
        .zip(x.par_chunks(cg * hw))
        .enumerate()
        .for_each(|(i, (o, xs))| {
            let first = (i % g.groups) * cg;
            let (mean, rstd) = row_stats(xs, eps);
            for j in 0..cg {
                let (wv, bv) = (w[first + j], b[first + j]);
                let span = j * hw..(j + 1) * hw;
                for (ov, &xv) in o[span.clone()].iter_mut().zip(&xs[span]) {
                    *ov = (xv - mean) * rstd * wv + bv;
                }
            }
        });
    out
}

/// Returns `[dx | dw | db]` for the upstream gradient `gr`.
fn backward<T: Float>(x: &[T], w: &[T], gr: &[T], g: Groups, eps: f64) -> Vec<T> {
    let c = w.len();
    let eps = T::from_f64(eps);
    let (cg, hw) = (g.per_group, g.spatial);
    let len = cg * hw;
    let tasks = x.len() / len;
    let mut out = vec![T::ZERO; x.len() + 2 * c];
    let (dx, dparams) = out.split_at_mut(x.len());
    // Per (image, group): the group's cg weight-gradient partials, then cg bias ones.
    let mut partial = vec![T::ZERO; tasks * 2 * cg];
    dx.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .zip(gr.par_chunks(len))
        .zip(partial.par_chunks_mut(2 * cg))
        .enumerate()
        .for_each(|(i, (((dxs, xs), gs), part))| {
            let first = (i % g.groups) * cg;
            let (mean, rstd) = row_stats(xs, eps);
            let (pw, pb) = part.split_at_mut(cg);
            // dx = rstd * (gy - mean(gy) - xhat * mean(gy * xhat)), gy = g * w[channel];
            // per channel, sum(gy) = w * sum(g) and sum(gy * xhat) = w * sum(g * xhat).
            let (mut s1, mut s2) = (T::ZERO, T::ZERO);
            for j in 0..cg {
                let span = j * hw..(j + 1) * hw;
                let (mut sw, mut sb) = (T::ZERO, T::ZERO);
                for (&xv, &gv) in xs[span.clone()].iter().zip(&gs[span]) {
                    sw += gv * ((xv - mean) * rstd);
                    sb += gv;
                }
                pw[j] = sw;
                pb[j] = sb;
                let wv = w[first + j];
                s1 += sb * wv;
                s2 += sw * wv;
            }
            let n = T::from_usize(len);
            let (m1, m2) = (s1 / n, s2 / n);
            for j in 0..cg {
                let wv = w[first + j];
                let span = j * hw..(j + 1) * hw;
                for ((dv, &xv), &gv) in dxs[span.clone()]
                    .iter_mut()
                    .zip(&xs[span.clone()])
                    .zip(&gs[span])
                {
                    let xhat = (xv - mean) * rstd;
                    *dv = rstd * (gv * wv - m1 - xhat * m2);
                }
            }
        });
    let (dw, db) = dparams.split_at_mut(c);
    for (i, part) in partial.chunks_exact(2 * cg).enumerate() {
        let first = (i % g.groups) * cg;
        for j in 0..cg {
            dw[first + j] += part[j];
            db[first + j] += part[cg + j];
        }
    }
    out
}

struct GroupNormOp {
    groups: Groups,
    eps: f64,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "tgc-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_kernel3(
            self,
            [
                (s1, l1, "group_norm: input"),
                (s2, l2, "group_norm: weight"),
                (s3, l3, "group_norm: bias"),
            ],
            "group_norm: input, weight and bias must all be f32 or f64",
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let packed = x.apply_op3_no_bwd(
            w,
            &g,
            &GroupNormBackward {
                groups: self.groups,
                eps: self.eps,
            },
        )?;
        split_affine_grads(&packed, x, w)
    }
}

/// Inputs `(x, weight, grad_out)`; output `[dx | dw | db]` flat.
struct GroupNormBackward {
    groups: Groups,
    eps: f64,
}

impl Kernel3 for GroupNormOp {
    fn run<T: Float>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        forward(x, w, b, self.groups, self.eps)
    }
}

impl Kernel3 for GroupNormBackward {
    fn run<T: Float>(&self, x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        backward(x, w, g, self.groups, self.eps)
    }
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "tgc-group-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_kernel3(
            self,
            [
                (s1, l1, "group_norm: input"),
                (s2, l2, "group_norm: weight"),
                (s3, l3, "group_norm: gradient"),
            ],
            "group_norm backward: only f32 and f64 are supported",
        )?;
        let len = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// Group normalisation over `N x C x spatial...`, the same weights, names and results as
/// `candle_nn::GroupNorm` (biased variance, `eps` inside the square root, per-channel
/// affine), fused into one CPU op for f32 and f64; other devices and dtypes use
/// `candle_nn::GroupNorm`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let norm = tgc_nn::group_norm(2, 4, 1e-5, vb.pp("norm"))?;
/// let x = Tensor::randn(0f32, 3.0, (2, 4, 5, 5), &Device::Cpu)?;
/// let y = norm.forward(&x)?;
/// // With the initial weights (1) and biases (0) every group has mean 0 and variance 1.
/// let g0 = y.narrow(1, 0, 2)?.flatten_all()?.to_vec1::<f32>()?;
/// let n = 50.0; // the first group of the first image
/// let mean = g0[..50].iter().sum::<f32>() / n;
/// let var = g0[..50].iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
/// assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
    composite: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// A group norm with the given per-channel `weight` and `bias` (`C` each). Errors when
    /// `num_groups` does not divide `num_channels` or the parameters are not of size `C`.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        num_channels: usize,
        num_groups: usize,
        eps: f64,
    ) -> Result<Self> {
        if weight.dims() != [num_channels] || bias.dims() != [num_channels] {
            candle_core::bail!(
                "GroupNorm: weight {:?} and bias {:?} must both have shape [{num_channels}]",
                weight.dims(),
                bias.dims()
            );
        }
        let composite =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), num_channels, num_groups, eps)?;
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
            composite,
        })
    }
}

impl Module for GroupNorm {
    /// `x`: `N x C x spatial...` (rank at least 3) -> the same shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let c = self.weight.elem_count();
        if dims.len() < 3 || dims[1] != c {
            candle_core::bail!(
                "GroupNorm over {c} channels: expected an input N x {c} x spatial..., got {dims:?}"
            );
        }
        let fused = x.device().is_cpu()
            && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
            && self.weight.dtype() == x.dtype()
            && self.bias.dtype() == x.dtype()
            && x.elem_count() > 0;
        if !fused {
            return self.composite.forward(x);
        }
        let groups = Groups {
            groups: self.num_groups,
            per_group: c / self.num_groups,
            spatial: dims[2..].iter().product(),
        };
        let x = x.contiguous()?;
        let (w, b) = (self.weight.contiguous()?, self.bias.contiguous()?);
        x.apply_op3(
            &w,
            &b,
            GroupNormOp {
                groups,
                eps: self.eps,
            },
        )
    }
}

/// A [`GroupNorm`] with its weight (initialised to 1) and bias (0) under `vb`, as
/// `candle_nn::group_norm`: checkpoints of either load into the other.
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(num_channels, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(num_channels, "bias", Init::Const(0.0))?;
    GroupNorm::new(weight, bias, num_channels, num_groups, eps)
}
