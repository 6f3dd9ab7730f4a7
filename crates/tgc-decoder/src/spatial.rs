//! Spatial aggregation: a W-MSA / SW-MSA Swin pair whose queries and keys see the
//! appearance guidance (CAT-Seg's "spatial aggregation").
//!
//! All tensors here are channels-last, `N x H x W x C` with `N = B*K` (one cost map per
//! (image, prompt) pair), because every per-token operation (LayerNorm, the linear
//! projections, the MLP) then works on contiguous rows, and window partition is a single
//! reshape / transpose.

use candle_core::{Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use tgc_nn::LayerNorm;
use tgc_nn::Linear;

use crate::Result;

/// Window size used on an axis of length `grid` when `window` is requested.
///
/// Rules (documented in the crate docs, "Window size"):
/// - `grid <= window`: one window covers the axis (and no shift is applied).
/// - otherwise the largest divisor `d <= window` of `grid` (so windows tile the grid
///   exactly without padding: 24 -> 12, 14 -> 7, 16 -> 8);
/// - if that divisor is smaller than `window / 2` (e.g. a prime grid such as 13 would give
///   `d = 1`), the whole axis becomes one window: global attention is cheap on these small
///   grids and much better than degenerate 1- or 2-token windows.
pub fn effective_window(grid: usize, window: usize) -> usize {
    let window = window.max(1);
    if grid <= window {
        return grid;
    }
    let d = (1..=window)
        .rev()
        .find(|d| grid.is_multiple_of(*d))
        .unwrap_or(1);
    if 2 * d < window {
        grid
    } else {
        d
    }
}

/// Swin geometry of one grid: window and shift per axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WindowGeometry {
    pub h: usize,
    pub w: usize,
    pub wh: usize,
    pub ww: usize,
    /// Shift of the SW-MSA block along H (0 when one window covers the axis).
    pub sh: usize,
    /// Shift of the SW-MSA block along W.
    pub sw: usize,
}

impl WindowGeometry {
    pub(crate) fn new(h: usize, w: usize, window: usize) -> Self {
        let wh = effective_window(h, window);
        let ww = effective_window(w, window);
        let sh = if wh < h { wh / 2 } else { 0 };
        let sw = if ww < w { ww / 2 } else { 0 };
        Self {
            h,
            w,
            wh,
            ww,
            sh,
            sw,
        }
    }

    fn windows(&self) -> usize {
        (self.h / self.wh) * (self.w / self.ww)
    }

    /// Swin's attention mask for the shifted block: `nW x N x N`, 0 between tokens that
    /// came from the same region of the un-rolled grid and -100 between tokens that the
    /// cyclic roll brought together from opposite borders. `None` when nothing is shifted.
    fn shift_mask(&self, dev: &Device) -> Result<Option<Tensor>> {
        if self.sh == 0 && self.sw == 0 {
            return Ok(None);
        }
        // Region of a coordinate along one axis: [0, n-win), [n-win, n-s), [n-s, n).
        let region = |i: usize, n: usize, win: usize, s: usize| -> usize {
            if s == 0 || i < n - win {
                0
            } else if i < n - s {
                1
            } else {
                2
            }
        };
        let (nh, nw) = (self.h / self.wh, self.w / self.ww);
        let n = self.wh * self.ww;
        let mut ids = vec![0usize; nh * nw * n];
        for wi in 0..nh {
            for wj in 0..nw {
                for r in 0..self.wh {
                    for c in 0..self.ww {
                        // Coordinates in the rolled grid are region-labelled like Swin's
                        // `img_mask` (labels live on the rolled layout).
                        let y = wi * self.wh + r;
                        let x = wj * self.ww + c;
                        let id = region(y, self.h, self.wh, self.sh) * 3
                            + region(x, self.w, self.ww, self.sw);
                        ids[(wi * nw + wj) * n + r * self.ww + c] = id;
                    }
                }
            }
        }
        let mut mask = vec![0f32; nh * nw * n * n];
        for win in 0..nh * nw {
            for a in 0..n {
                for b in 0..n {
                    if ids[win * n + a] != ids[win * n + b] {
                        mask[(win * n + a) * n + b] = -100.0;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(mask, (nh * nw, n, n), dev)?))
    }
}

/// `torch.roll` of `x` along `dim` by `shift` (positive = towards higher indices), from
/// `narrow` + `cat` so that the backward pass is plain slicing.
pub(crate) fn roll(x: &Tensor, shift: isize, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)? as isize;
    let s = shift.rem_euclid(n) as usize;
    if s == 0 {
        return Ok(x.clone());
    }
    let n = n as usize;
    Ok(Tensor::cat(
        &[x.narrow(dim, n - s, s)?, x.narrow(dim, 0, n - s)?],
        dim,
    )?)
}

/// `N x H x W x C` -> `(N * nW) x (wh*ww) x C`, windows row-major, tokens row-major.
fn window_partition(x: &Tensor, g: &WindowGeometry) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let (nh, nw) = (h / g.wh, w / g.ww);
    Ok(x.reshape((n * nh, g.wh, nw, g.ww * c))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * nh * nw, g.wh * g.ww, c))?)
}

/// Inverse of [`window_partition`]: `(N * nW) x (wh*ww) x C` -> `N x H x W x C`.
fn window_reverse(x: &Tensor, g: &WindowGeometry, n: usize) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let (nh, nw) = (g.h / g.wh, g.w / g.ww);
    Ok(x.reshape((n * nh, nw, g.wh, g.ww * c))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, g.h, g.w, c))?)
}

/// Two-layer perceptron `C -> hidden -> C` with a configurable activation.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
    gelu: bool,
}

impl Mlp {
    pub(crate) fn new(dim: usize, hidden: usize, gelu: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: tgc_nn::linear(dim, hidden, vb.pp("fc1"))?,
            fc2: tgc_nn::linear(hidden, dim, vb.pp("fc2"))?,
            gelu,
        })
    }

    /// `... x C` -> `... x C`; dropout `p` after the activation and the output when
    /// `train` (CAT-Seg uses p = 0).
    pub(crate) fn forward(&self, x: &Tensor, dropout: f32, train: bool) -> Result<Tensor> {
        let h = x.apply(&self.fc1)?;
        let h = if self.gelu { h.gelu_erf()? } else { h.relu()? };
        let h = maybe_dropout(&h, dropout, train)?;
        maybe_dropout(&h.apply(&self.fc2)?, dropout, train)
    }
}

pub(crate) fn maybe_dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        Ok(tgc_nn::dropout(x, p)?)
    } else {
        Ok(x.clone())
    }
}

/// One Swin block: `x + W-MSA(LN(x) | LN(g))`, then `x + MLP(LN(x))`.
///
/// Queries and keys are projected from `[LN(x); LN(g)]` (width `C + G`), values from
/// `LN(x)`; no relative position bias (CAT-Seg).
#[derive(Clone, Debug)]
struct SwinBlock {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    norm2: LayerNorm,
    mlp: Mlp,
    heads: usize,
    shifted: bool,
}

impl SwinBlock {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dim: usize,
        guidance: usize,
        heads: usize,
        mlp_hidden: usize,
        eps: f64,
        shifted: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn = vb.pp("attn");
        Ok(Self {
            norm1: tgc_nn::layer_norm(dim, eps, vb.pp("norm1"))?,
            q: tgc_nn::linear(dim + guidance, dim, attn.pp("q"))?,
            k: tgc_nn::linear(dim + guidance, dim, attn.pp("k"))?,
            v: tgc_nn::linear(dim, dim, attn.pp("v"))?,
            proj: tgc_nn::linear(dim, dim, attn.pp("proj"))?,
            norm2: tgc_nn::layer_norm(dim, eps, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, mlp_hidden, true, vb.pp("mlp"))?,
            heads,
            shifted,
        })
    }

    /// `x`: `N x H x W x C`, `g`: normalised guidance `N x H x W x G` -> `N x H x W x C`.
    fn forward(
        &self,
        x: &Tensor,
        g: &Tensor,
        geo: &WindowGeometry,
        mask: Option<&Tensor>,
        dropout: f32,
        train: bool,
    ) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let xn = self.norm1.forward(x)?;
        let qk_in = Tensor::cat(&[&xn, g], 3)?;
        // Projections are per token, so they commute with the roll and the window
        // partition: project once on the grid, then move one `3C`-wide tensor.
        let qkv = Tensor::cat(
            &[
                qk_in.apply(&self.q)?,
                qk_in.apply(&self.k)?,
                xn.apply(&self.v)?,
            ],
            3,
        )?;
        let (sh, sw) = if self.shifted {
            (geo.sh, geo.sw)
        } else {
            (0, 0)
        };
        let qkv = roll(&roll(&qkv, -(sh as isize), 1)?, -(sw as isize), 2)?;
        let win = window_partition(&qkv, geo)?; // (n*nW) x L x 3C
        let (bw, l, _) = win.dims3()?;
        let hd = c / self.heads;
        let split = |i: usize| -> Result<Tensor> {
            Ok(win
                .narrow(2, i * c, c)?
                .reshape((bw, l, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let mut scores = q.matmul(&k.t()?)?; // bw x heads x L x L
        if let (true, Some(mask)) = (self.shifted, mask) {
            let nw = geo.windows();
            scores = scores
                .reshape((n, nw, self.heads, l, l))?
                .broadcast_add(&mask.reshape((1, nw, 1, l, l))?)?
                .reshape((bw, self.heads, l, l))?;
        }
        let attn = tgc_nn::softmax_last_dim(&scores)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((bw, l, c))?;
        let out = window_reverse(&out, geo, n)?;
        let out = roll(&roll(&out, sh as isize, 1)?, sw as isize, 2)?;
        let out = maybe_dropout(&out.apply(&self.proj)?, dropout, train)?;
        debug_assert_eq!(out.dims(), &[n, h, w, c]);
        let x = (x + out)?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?, dropout, train)?;
        Ok((x + y)?)
    }
}

/// The W-MSA / SW-MSA pair of one aggregation layer, sharing one guidance LayerNorm.
#[derive(Clone, Debug)]
pub(crate) struct SpatialAggregation {
    guidance_norm: LayerNorm,
    blocks: [SwinBlock; 2],
    window: usize,
}

impl SpatialAggregation {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dim: usize,
        guidance: usize,
        heads: usize,
        mlp_hidden: usize,
        window: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bvb = vb.pp("blocks");
        Ok(Self {
            guidance_norm: tgc_nn::layer_norm(guidance, eps, vb.pp("guidance_norm"))?,
            blocks: [
                SwinBlock::new(dim, guidance, heads, mlp_hidden, eps, false, bvb.pp("0"))?,
                SwinBlock::new(dim, guidance, heads, mlp_hidden, eps, true, bvb.pp("1"))?,
            ],
            window,
        })
    }

    /// `x`: `N x H x W x C`, `guidance`: `N x H x W x G` (unnormalised) -> `N x H x W x C`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        guidance: &Tensor,
        dropout: f32,
        train: bool,
    ) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let geo = WindowGeometry::new(h, w, self.window);
        let mask = geo
            .shift_mask(x.device())?
            .map(|m| m.to_dtype(x.dtype()))
            .transpose()?;
        let g = self.guidance_norm.forward(guidance)?;
        let x = self.blocks[0].forward(x, &g, &geo, None, dropout, train)?;
        self.blocks[1].forward(&x, &g, &geo, mask.as_ref(), dropout, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rules() {
        assert_eq!(effective_window(24, 12), 12);
        assert_eq!(effective_window(14, 12), 7);
        assert_eq!(effective_window(16, 12), 8);
        assert_eq!(effective_window(12, 12), 12);
        assert_eq!(effective_window(8, 12), 8);
        assert_eq!(effective_window(13, 12), 13);
        assert_eq!(effective_window(8, 4), 4);
    }

    #[test]
    fn roll_matches_definition() -> Result<()> {
        let x = Tensor::arange(0f32, 5.0, &Device::Cpu)?;
        let r = roll(&x, 2, 0)?.to_vec1::<f32>()?;
        assert_eq!(r, vec![3.0, 4.0, 0.0, 1.0, 2.0]);
        let r = roll(&x, -2, 0)?.to_vec1::<f32>()?;
        assert_eq!(r, vec![2.0, 3.0, 4.0, 0.0, 1.0]);
        Ok(())
    }

    #[test]
    fn partition_roundtrip_and_order() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 6.0 * 3.0, &dev)?.reshape((2, 4, 6, 3))?;
        let g = WindowGeometry::new(4, 6, 2);
        let p = window_partition(&x, &g)?;
        assert_eq!(p.dims(), &[2 * 2 * 3, 4, 3]);
        // Window 1 of image 0 holds rows 0..2, columns 2..4; token 2 is (row 1, col 2).
        let expect = x
            .narrow(0, 0, 1)?
            .narrow(1, 1, 1)?
            .narrow(2, 2, 1)?
            .flatten_all()?;
        let got = p.narrow(0, 1, 1)?.narrow(1, 2, 1)?.flatten_all()?;
        assert_eq!(expect.to_vec1::<f32>()?, got.to_vec1::<f32>()?);
        let back = window_reverse(&p, &g, 2)?;
        let diff = (back - &x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
