//! Fused layer normalisation over the last dimension with an analytic backward pass.
//!
//! The composite version (mean, centre, variance, divide, scale, shift: nine candle ops)
//! spent most of a training step of the `cpu` preset in its temporaries and in the
//! strided reductions that give the weight and bias gradients (a sum over every leading
//! dimension). This op makes one pass per row forward and one per row backward.
//!
//! The weight and bias gradients are sums over rows; they are reduced in fixed-size row
//! blocks whose partial sums are added in block order, so the result does not depend on
//! the number of threads or on rayon's work stealing (exact resume needs bit-identical
//! gradients from run to run).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernel::{cpu_kernel3, split_affine_grads, Float, Kernel3};

/// Rows per task of the backward pass (and per partial sum of the parameter gradients).
const BWD_ROWS: usize = 64;

/// Mean and `1 / sqrt(var + eps)` of one row (two-pass variance, as PyTorch).
#[inline(always)]
pub(crate) fn row_stats<T: Float>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(x.len());
    let mut s = T::ZERO;
    for &v in x {
        s += v;
    }
    let mean = s / n;
    let mut q = T::ZERO;
    for &v in x {
        let c = v - mean;
        q += c * c;
    }
    (mean, T::from_f64(1.0) / (q / n + eps).sqrt())
}

fn forward<T: Float>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    let eps = T::from_f64(eps);
    let mut out = vec![T::ZERO; x.len()];
    let per = BWD_ROWS * dim;
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(dim).zip(xs.chunks_exact(dim)) {
                let (mean, rstd) = row_stats(xrow, eps);
                for (((ov, &xv), &wv), &bv) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                    *ov = (xv - mean) * rstd * wv + bv;
                }
            }
        });
    out
}

/// Returns `[dx | dw | db]` for upstream gradient `g`.
fn backward<T: Float>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    let rows = x.len() / dim;
    let eps = T::from_f64(eps);
    let mut out = vec![T::ZERO; x.len() + 2 * dim];
    let (dx, dparams) = out.split_at_mut(x.len());
    let per = BWD_ROWS * dim;
    let blocks = rows.div_ceil(BWD_ROWS);
    // Partial (dw, db) of each row block, 2 * dim values per block.
    let mut partial = vec![T::ZERO; blocks * 2 * dim];
    dx.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .zip(g.par_chunks(per))
        .zip(partial.par_chunks_mut(2 * dim))
        .for_each(|(((dxs, xs), gs), part)| {
            let (pw, pb) = part.split_at_mut(dim);
            let n = T::from_usize(dim);
            for ((dxrow, xrow), grow) in dxs
                .chunks_exact_mut(dim)
                .zip(xs.chunks_exact(dim))
                .zip(gs.chunks_exact(dim))
            {
                let (mean, rstd) = row_stats(xrow, eps);
                // dx = rstd * (gy - mean(gy) - xhat * mean(gy * xhat)), gy = g * w.
                let (mut s1, mut s2) = (T::ZERO, T::ZERO);
                for (((&xv, &gv), &wv), (pwv, pbv)) in xrow
                    .iter()
                    .zip(grow)
                    .zip(w)
                    .zip(pw.iter_mut().zip(pb.iter_mut()))
                {
                    let xhat = (xv - mean) * rstd;
                    let gy = gv * wv;
                    s1 += gy;
                    s2 += gy * xhat;
                    *pwv += gv * xhat;
                    *pbv += gv;
                }
                let (m1, m2) = (s1 / n, s2 / n);
                for (((dv, &xv), &gv), &wv) in dxrow.iter_mut().zip(xrow).zip(grow).zip(w) {
                    let xhat = (xv - mean) * rstd;
                    *dv = rstd * (gv * wv - m1 - xhat * m2);
                }
            }
        });
    for part in partial.chunks_exact(2 * dim) {
        for (acc, &v) in dparams.iter_mut().zip(part) {
            *acc += v;
        }
    }
    out
}

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tgc-layer-norm"
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
                (s1, l1, "layer_norm: input"),
                (s2, l2, "layer_norm: weight"),
                (s3, l3, "layer_norm: bias"),
            ],
            "layer_norm: input, weight and bias must all be f32 or f64",
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
        let packed = x.apply_op3_no_bwd(w, &g, &LayerNormBackward { eps: self.eps })?;
        split_affine_grads(&packed, x, w)
    }
}

/// Inputs `(x, weight, grad_out)`; output `[dx | dw | db]` flat.
struct LayerNormBackward {
    eps: f64,
}

impl Kernel3 for LayerNormOp {
    fn run<T: Float>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        forward(x, w, b, self.eps)
    }
}

impl Kernel3 for LayerNormBackward {
    fn run<T: Float>(&self, x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        backward(x, w, g, self.eps)
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "tgc-layer-norm-bwd"
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
                (s1, l1, "layer_norm: input"),
                (s2, l2, "layer_norm: weight"),
                (s3, l3, "layer_norm: gradient"),
            ],
            "layer_norm backward: only f32 and f64 are supported",
        )?;
        let len = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// Fused layer norm on CPU (f32/f64, contiguous last dimension); `None` where the
/// composite path must be used (other devices or dtypes).
pub(crate) fn fused_layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let dim = weight.elem_count();
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype()
        && bias.elem_count() == dim
        && weight.rank() == 1
        && x.dims().last() == Some(&dim);
    if !fused {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (w, b) = (weight.contiguous()?, bias.contiguous()?);
    Ok(Some(x.apply_op3(&w, &b, LayerNormOp { eps })?))
}
