//! Fused softmax over the last dimension with an analytic backward pass.
//!
//! `candle_nn::ops::softmax_last_dim` has no backward (gradients silently vanish) and
//! the generic `candle_nn::ops::softmax` runs five separate passes with temporaries;
//! attention over 8 x 8 x 196 x 273 scores spent most of its time there. This op makes
//! one pass per row forward and one per row backward, parallel over rows.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::kernel::{cpu_kernel1, cpu_kernel2, Float, Kernel1, Kernel2};

/// Rows shorter than this are processed in chunks of several rows per task.
const MIN_TASK: usize = 4096;

fn rows_per_task(dim: usize) -> usize {
    MIN_TASK.div_ceil(dim.max(1)).max(1)
}

struct SoftmaxLastDim;

fn fwd_rows<T: Float>(x: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    let per = rows_per_task(dim) * dim;
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_mut(dim).zip(xs.chunks(dim)) {
                let mut m = T::NEG_INFINITY;
                for &v in xrow {
                    m = m.max(v);
                }
                let mut s = T::ZERO;
                for (ov, &v) in orow.iter_mut().zip(xrow) {
                    let e = (v - m).exp();
                    *ov = e;
                    s += e;
                }
                let inv = T::ONE / s;
                for ov in orow.iter_mut() {
                    *ov = *ov * inv;
                }
            }
        });
    out
}

/// The row length: the last dimension.
fn last_dim(dims: &[usize]) -> usize {
    dims.last().copied().unwrap_or(1)
}

impl Kernel1 for SoftmaxLastDim {
    fn run<T: Float>(&self, dims: &[usize], x: &[T]) -> Vec<T> {
        fwd_rows(x, last_dim(dims))
    }
}

impl Kernel2 for SoftmaxBackward {
    fn run<T: Float>(&self, dims: &[usize], y: &[T], g: &[T]) -> Vec<T> {
        bwd_rows(y, g, last_dim(dims))
    }
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "tgc-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_kernel1(
            self,
            (storage, layout, "softmax: input"),
            "softmax: only f32 and f64 are supported on CPU",
        )?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(
            res.contiguous()?.apply_op2_no_bwd(&g, &SoftmaxBackward)?,
        ))
    }
}

/// `dx = y * (g - sum(g * y))` per row; inputs `y` (softmax output) and `g` (its grad).
struct SoftmaxBackward;

fn bwd_rows<T: Float>(y: &[T], g: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; y.len()];
    let per = rows_per_task(dim) * dim;
    out.par_chunks_mut(per)
        .zip(y.par_chunks(per).zip(g.par_chunks(per)))
        .for_each(|(o, (ys, gs))| {
            for ((orow, yrow), grow) in o.chunks_mut(dim).zip(ys.chunks(dim)).zip(gs.chunks(dim)) {
                let mut dot = T::ZERO;
                for (&a, &b) in yrow.iter().zip(grow) {
                    dot += a * b;
                }
                for ((ov, &a), &b) in orow.iter_mut().zip(yrow).zip(grow) {
                    *ov = a * (b - dot);
                }
            }
        });
    out
}

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "tgc-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_kernel2(
            self,
            [
                (s1, l1, "softmax backward: output"),
                (s2, l2, "softmax backward: gradient"),
            ],
            "softmax backward: only f32 and f64 are supported on CPU",
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last dimension, with a backward pass.
///
/// On CPU a fused, multi-threaded kernel (f32/f64); on other devices candle's generic
/// (differentiable) `softmax`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}
