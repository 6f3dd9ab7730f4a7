//! Segmentation losses on logits: BCE-with-logits, soft Dice, their weighted sum, and
//! LViT's `WeightedDiceBCE` reproduced exactly.
//!
//! All functions take `logits` and `target` of the same shape `B x K x (spatial...)`
//! (usually `B x K x H x W`, K prompts per image), `target` in [0, 1] (converted to the
//! logits' dtype), and return a scalar (rank-0) tensor. They are built from ops whose
//! backward passes are correct in candle 0.11.1 (`relu`, `abs`, `exp`, `log`,
//! `ops::sigmoid`); the tests check every gradient against central finite differences.
//!
//! ## What LViT actually uses
//!
//! The paper trains with "LViT's weighted Dice-BCE". LViT's `WeightedDiceBCE`
//! (`utils.py`, used with `dice_weight = BCE_weight = 0.5` and its model's sigmoid output)
//! differs from a plain Dice + BCE in three ways, all reproduced by
//! [`lvit_weighted_dice_bce`]:
//! - Dice per image over all prompts and pixels, with *squared* denominators
//!   (V-Net style) and smooth = 1e-5: with its weights `[0.5, 0.5]` every pixel is scaled
//!   by 0.5, so the loss is `1 - (0.5 * sum(p t) + 1e-5) / (0.25 * (sum p^2 + sum t^2) + 1e-5)`.
//! - BCE is class balanced: `0.5 * mean over target pixels + 0.5 * mean over background
//!   pixels`, pooled over the whole batch (`WeightedBCE(weights=[0.5, 0.5])`).
//! - `F.binary_cross_entropy` on probabilities (log clamped at -100); here it is computed
//!   from logits, which is equal except where the sigmoid saturates in f32.
//!
//! [`soft_dice_loss`] / [`dice_bce`] are the textbook versions (linear denominators,
//! smooth = 1 by default, per image *and prompt*, plain mean BCE); [`SegLoss`] picks one
//! by config.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default Dice smoothing term of [`soft_dice_loss`]: keeps empty-target images from
/// giving a 0/0 and softens the loss on tiny lesions (LViT's own loss uses 1e-5, see the
/// module doc).
pub const DEFAULT_DICE_SMOOTH: f64 = 1.0;

fn check_pair(logits: &Tensor, target: &Tensor, what: &str) -> Result<Tensor> {
    if logits.dims() != target.dims() {
        return Err(Error::InvalidArgument(format!(
            "{what}: logits {:?} and target {:?} differ in shape",
            logits.dims(),
            target.dims()
        )));
    }
    if logits.rank() < 3 {
        return Err(Error::InvalidArgument(format!(
            "{what}: expected B x K x spatial..., got logits of shape {:?}",
            logits.dims()
        )));
    }
    if !logits.dtype().is_float() {
        return Err(Error::InvalidArgument(format!(
            "{what}: logits must be floating point, got {:?}",
            logits.dtype()
        )));
    }
    Ok(target.to_dtype(logits.dtype())?)
}

/// Element-wise `max(x, 0) - x t + log(1 + exp(-|x|))`, stable for any |x|. (At x = 0
/// candle's relu and abs both take the +1 branch, which gives the exact derivative
/// `sigmoid(0) - t`.)
fn bce_elementwise(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((x.relu()? - (x * t)?)? + softplus_neg_abs)?)
}

/// Binary cross-entropy with logits, mean over every element (as
/// `F.binary_cross_entropy_with_logits(x, t)`).
///
/// `logits`, `target`: `B x K x spatial...`; returns a scalar.
pub fn bce_with_logits(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let t = check_pair(logits, target, "bce_with_logits")?;
    Ok(bce_elementwise(logits, &t)?.mean_all()?)
}

/// Soft Dice loss on `sigmoid(logits)`, per (image, prompt), then the mean over `B x K`:
/// `1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth)`, sums over the spatial dims.
///
/// `logits`, `target`: `B x K x spatial...`; returns a scalar.
pub fn soft_dice_loss(logits: &Tensor, target: &Tensor, smooth: f64) -> Result<Tensor> {
    let t = check_pair(logits, target, "soft_dice_loss")?;
    if !smooth.is_finite() || smooth < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "soft_dice_loss: smooth must be finite and >= 0, got {smooth}"
        )));
    }
    let p = candle_nn::ops::sigmoid(logits)?.flatten_from(2)?;
    let t = t.flatten_from(2)?;
    let inter = (&p * &t)?.sum(2)?;
    let denom = (p.sum(2)? + t.sum(2)?)?;
    let dice = ((inter * 2.0)? + smooth)?.div(&(denom + smooth)?)?;
    Ok(dice.affine(-1.0, 1.0)?.mean_all()?)
}

/// `w_bce * bce_with_logits + w_dice * soft_dice_loss(smooth = DEFAULT_DICE_SMOOTH)`
/// (the paper: 0.5 and 0.5).
///
/// `logits`, `target`: `B x K x spatial...`; returns a scalar. On CPU (f32, f64) the two
/// terms and their gradient are one fused op ([`weighted_dice_bce`]).
pub fn dice_bce(logits: &Tensor, target: &Tensor, w_bce: f64, w_dice: f64) -> Result<Tensor> {
    weighted_dice_bce(logits, target, w_bce, w_dice, DEFAULT_DICE_SMOOTH)
}

/// `w_bce * bce_with_logits + w_dice * soft_dice_loss(smooth)`, the same value and
/// gradient as composing the two.
///
/// On CPU with f32 or f64 logits it is one fused op: one pass over the pixels forward and
/// two backward, accumulated in f64 with per-(image, prompt) partial sums added in a fixed
/// order (so the result does not depend on the thread count). The composed version made
/// some twenty full-size temporaries per step at the label size (8 x 224 x 224 in the
/// QaTa runs), forward and backward. Other devices and dtypes compose the two functions.
///
/// `logits`, `target`: `B x K x spatial...`; returns a scalar.
pub fn weighted_dice_bce(
    logits: &Tensor,
    target: &Tensor,
    w_bce: f64,
    w_dice: f64,
    smooth: f64,
) -> Result<Tensor> {
    let t = check_pair(logits, target, "dice_bce")?;
    if !smooth.is_finite() || smooth < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "dice_bce: smooth must be finite and >= 0, got {smooth}"
        )));
    }
    let fused = logits.device().is_cpu()
        && matches!(logits.dtype(), DType::F32 | DType::F64)
        && logits.elem_count() > 0;
    if !fused {
        let bce = bce_with_logits(logits, &t)?;
        let dice = soft_dice_loss(logits, &t, smooth)?;
        return Ok(((bce * w_bce)? + (dice * w_dice)?)?);
    }
    let op = DiceBceOp {
        w_bce,
        w_dice,
        smooth,
        pairs: logits.dim(0)? * logits.dim(1)?,
    };
    Ok(logits.contiguous()?.apply_op2(&t.contiguous()?, op)?)
}

/// Element types of the fused loss (values are accumulated in f64).
trait LossElem: Copy + Send + Sync {
    fn f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl LossElem for f32 {
    fn f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl LossElem for f64 {
    fn f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

#[inline(always)]
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Per (image, prompt): `[sum of BCE terms, sum(p t), sum(p) + sum(t)]`.
fn pair_sums<T: LossElem>(x: &[T], t: &[T], pairs: usize) -> Vec<[f64; 3]> {
    let per = x.len() / pairs;
    x.par_chunks(per)
        .zip(t.par_chunks(per))
        .map(|(xs, ts)| {
            let (mut bce, mut inter, mut union) = (0f64, 0f64, 0f64);
            for (&xv, &tv) in xs.iter().zip(ts) {
                let (x, t) = (xv.f64(), tv.f64());
                // One exponential serves both: softplus(-|x|) = ln(1 + e) and the
                // sigmoid, with e = exp(-|x|).
                let e = (-x.abs()).exp();
                bce += x.max(0.0) - x * t + e.ln_1p();
                let p = if x >= 0.0 {
                    1.0 / (1.0 + e)
                } else {
                    e / (1.0 + e)
                };
                inter += p * t;
                union += p + t;
            }
            [bce, inter, union]
        })
        .collect()
}

/// The fused `w_bce * BCE + w_dice * soft Dice` ([`weighted_dice_bce`]); inputs
/// `(logits, target)`, contiguous, `pairs` = B x K.
#[derive(Clone, Copy)]
struct DiceBceOp {
    w_bce: f64,
    w_dice: f64,
    smooth: f64,
    pairs: usize,
}

impl DiceBceOp {
    fn value<T: LossElem>(&self, x: &[T], t: &[T]) -> T {
        let sums = pair_sums(x, t, self.pairs);
        let (mut bce, mut dice) = (0f64, 0f64);
        for [b, inter, union] in sums {
            bce += b;
            dice += 1.0 - (2.0 * inter + self.smooth) / (union + self.smooth);
        }
        T::from_f64(self.w_bce * bce / x.len() as f64 + self.w_dice * dice / self.pairs as f64)
    }

    /// `d loss / d x`, scaled by the upstream gradient `scale`.
    fn gradient<T: LossElem>(&self, x: &[T], t: &[T], scale: f64) -> Vec<T> {
        let sums = pair_sums(x, t, self.pairs);
        let per = x.len() / self.pairs;
        let a = scale * self.w_bce / x.len() as f64;
        let b = scale * self.w_dice / self.pairs as f64;
        let s = self.smooth;
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(t.par_chunks(per)))
            .zip(sums.par_iter())
            .for_each(|((o, (xs, ts)), &[_, inter, union])| {
                // d dice / d p_i = (2 t_i (U + s) - (2 I + s)) / (U + s)^2; dp/dx = p (1 - p).
                let den = union + s;
                let (c1, c0) = (2.0 / den, (2.0 * inter + s) / (den * den));
                for ((ov, &xv), &tv) in o.iter_mut().zip(xs).zip(ts) {
                    let (x, t) = (xv.f64(), tv.f64());
                    let p = sigmoid(x);
                    *ov = T::from_f64(a * (p - t) - b * (c1 * t - c0) * p * (1.0 - p));
                }
            });
        out
    }
}

fn loss_slices<'a, T>(
    x: &'a [T],
    lx: &Layout,
    t: &'a [T],
    lt: &Layout,
) -> candle_core::Result<(&'a [T], &'a [T])> {
    match (lx.contiguous_offsets(), lt.contiguous_offsets()) {
        (Some((a, b)), Some((c, d))) if b - a == d - c => Ok((&x[a..b], &t[c..d])),
        _ => candle_core::bail!("dice_bce: logits and target must be contiguous and of one size"),
    }
}

/// A CPU kernel of `(logits, target)`, written once for f32 and f64.
trait LossKernel {
    fn run<T: LossElem>(&self, x: &[T], t: &[T]) -> Vec<T>;
}

impl LossKernel for DiceBceOp {
    fn run<T: LossElem>(&self, x: &[T], t: &[T]) -> Vec<T> {
        vec![self.value(x, t)]
    }
}

impl LossKernel for DiceBceGrad {
    fn run<T: LossElem>(&self, x: &[T], t: &[T]) -> Vec<T> {
        self.op.gradient(x, t, self.scale)
    }
}

/// Runs `k` on logits and target storages of one float type (f32 or f64).
fn cpu_loss_kernel(
    k: &impl LossKernel,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> candle_core::Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(x), CpuStorage::F32(t)) => {
            let (x, t) = loss_slices(x, l1, t, l2)?;
            CpuStorage::F32(k.run(x, t))
        }
        (CpuStorage::F64(x), CpuStorage::F64(t)) => {
            let (x, t) = loss_slices(x, l1, t, l2)?;
            CpuStorage::F64(k.run(x, t))
        }
        _ => candle_core::bail!("dice_bce: logits and target must both be f32 or f64"),
    })
}

impl CustomOp2 for DiceBceOp {
    fn name(&self) -> &'static str {
        "tgc-dice-bce"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = cpu_loss_kernel(self, s1, l1, s2, l2)?;
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grad = x.apply_op2_no_bwd(t, &DiceBceGrad { op: *self, scale })?;
        // The target is data: no gradient.
        Ok((Some(grad), None))
    }
}

/// `d loss / d logits` of a [`DiceBceOp`], times `scale`; inputs `(logits, target)`.
struct DiceBceGrad {
    op: DiceBceOp,
    scale: f64,
}

impl CustomOp2 for DiceBceGrad {
    fn name(&self) -> &'static str {
        "tgc-dice-bce-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = cpu_loss_kernel(self, s1, l1, s2, l2)?;
        Ok((out, l1.shape().clone()))
    }
}

/// LViT's `WeightedDiceBCE(dice_weight=0.5, BCE_weight=0.5)` with weights `[0.5, 0.5]`
/// for both parts, computed from logits (see the module doc for the formula).
///
/// `logits`, `target`: `B x K x spatial...`; returns a scalar.
pub fn lvit_weighted_dice_bce(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let t = check_pair(logits, target, "lvit_weighted_dice_bce")?;
    let b = logits.dim(0)?;
    // Dice: per image over all prompts and pixels, w = 0.5 everywhere.
    let p = (candle_nn::ops::sigmoid(logits)?.reshape((b, ()))? * 0.5)?;
    let tw = (t.reshape((b, ()))? * 0.5)?;
    let inter = (&p * &tw)?.sum(1)?;
    let union = (p.sqr()?.sum(1)? + tw.sqr()?.sum(1)?)?;
    let dice = ((inter * 2.0)? + 1e-5)?
        .div(&(union + 1e-5)?)?
        .affine(-1.0, 1.0)?
        .mean_all()?;
    // Class-balanced BCE pooled over the batch.
    let l = bce_elementwise(logits, &t)?;
    let pos = t.gt(0.5)?.to_dtype(l.dtype())?;
    let neg = t.lt(0.5)?.to_dtype(l.dtype())?;
    let n_pos = pos.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? + 1e-12;
    let n_neg = neg.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? + 1e-12;
    let bce =
        (((&l * &pos)?.sum_all()? * (0.5 / n_pos))? + ((&l * &neg)?.sum_all()? * (0.5 / n_neg))?)?;
    Ok(((dice * 0.5)? + (bce * 0.5)?)?)
}

/// The segmentation loss of a training run, chosen by config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SegLoss {
    /// `w_bce * BCE + w_dice * soft Dice(smooth)`, Dice per (image, prompt).
    DiceBce {
        /// Weight of the BCE term.
        w_bce: f64,
        /// Weight of the Dice term.
        w_dice: f64,
        /// Dice smoothing term.
        smooth: f64,
    },
    /// LViT's `WeightedDiceBCE` exactly ([`lvit_weighted_dice_bce`]).
    LvitWeightedDiceBce,
}

impl Default for SegLoss {
    /// 0.5 BCE + 0.5 soft Dice with smooth 1 (DESIGN.md).
    fn default() -> Self {
        SegLoss::DiceBce {
            w_bce: 0.5,
            w_dice: 0.5,
            smooth: DEFAULT_DICE_SMOOTH,
        }
    }
}

impl SegLoss {
    /// The loss of `logits` against `target` (`B x K x spatial...`), a scalar.
    pub fn compute(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
        match *self {
            SegLoss::DiceBce {
                w_bce,
                w_dice,
                smooth,
            } => weighted_dice_bce(logits, target, w_bce, w_dice, smooth),
            SegLoss::LvitWeightedDiceBce => lvit_weighted_dice_bce(logits, target),
        }
    }
}
