//! Fused softmax over the last dimension with an analytic backward pass.
//!
//! `candle_nn::ops::softmax_last_dim` has no backward (gradients silently vanish) and
//! the generic `candle_nn::ops::softmax` runs five separate passes with temporaries;
//! attention over 8 x 8 x 196 x 273 scores spent most of its time there. This op makes
//! one pass per row forward and one per row backward, parallel over rows.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows shorter than this are processed in chunks of several rows per task.
const MIN_TASK: usize = 4096;

fn rows_per_task(dim: usize) -> usize {
    MIN_TASK.div_ceil(dim.max(1)).max(1)
}

struct SoftmaxLastDim;

fn fwd_rows<T: Copy + Send + Sync + num_like::Float>(x: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let per = rows_per_task(dim) * dim;
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_mut(dim).zip(xs.chunks(dim)) {
                let mut m = T::neg_inf();
                for &v in xrow {
                    m = m.max(v);
                }
                let mut s = T::zero();
                for (ov, &v) in orow.iter_mut().zip(xrow) {
                    let e = (v - m).exp();
                    *ov = e;
                    s = s + e;
                }
                let inv = T::one() / s;
                for ov in orow.iter_mut() {
                    *ov = *ov * inv;
                }
            }
        });
    out
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "tgc-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = layout.dims().last().copied().unwrap_or(1);
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: input must be contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(fwd_rows(&v[start..end], dim)),
            CpuStorage::F64(v) => CpuStorage::F64(fwd_rows(&v[start..end], dim)),
            _ => candle_core::bail!("softmax: only f32 and f64 are supported on CPU"),
        };
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

fn bwd_rows<T: Copy + Send + Sync + num_like::Float>(y: &[T], g: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    let per = rows_per_task(dim) * dim;
    out.par_chunks_mut(per)
        .zip(y.par_chunks(per).zip(g.par_chunks(per)))
        .for_each(|(o, (ys, gs))| {
            for ((orow, yrow), grow) in o.chunks_mut(dim).zip(ys.chunks(dim)).zip(gs.chunks(dim)) {
                let mut dot = T::zero();
                for (&a, &b) in yrow.iter().zip(grow) {
                    dot = dot + a * b;
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
        let dim = l1.dims().last().copied().unwrap_or(1);
        let msg = || candle_core::Error::Msg("softmax backward: inputs must be contiguous".into());
        let (a0, a1) = l1.contiguous_offsets().ok_or_else(msg)?;
        let (b0, b1) = l2.contiguous_offsets().ok_or_else(msg)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(bwd_rows(&y[a0..a1], &g[b0..b1], dim))
            }
            (CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(bwd_rows(&y[a0..a1], &g[b0..b1], dim))
            }
            _ => candle_core::bail!("softmax backward: only f32 and f64 are supported on CPU"),
        };
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

/// The few float operations the kernels need, for f32 and f64.
mod num_like {
    pub trait Float:
        Copy
        + PartialOrd
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
    {
        fn zero() -> Self;
        fn one() -> Self;
        fn neg_inf() -> Self;
        fn exp(self) -> Self;
        fn max(self, other: Self) -> Self;
    }
    macro_rules! impl_float {
        ($t:ty) => {
            impl Float for $t {
                fn zero() -> Self {
                    0.0
                }
                fn one() -> Self {
                    1.0
                }
                fn neg_inf() -> Self {
                    <$t>::NEG_INFINITY
                }
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                fn max(self, other: Self) -> Self {
                    <$t>::max(self, other)
                }
            }
        };
    }
    impl_float!(f32);
    impl_float!(f64);
}
