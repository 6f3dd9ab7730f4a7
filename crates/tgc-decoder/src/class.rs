//! Class aggregation: linear attention across the K prompts of an image, at every pixel
//! of a pooled grid (CAT-Seg's "class aggregation").

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;
use tgc_nn::LayerNorm;
use tgc_nn::Linear;

use crate::spatial::{maybe_dropout, Mlp};
use crate::Result;

/// Linear attention of "Transformers are RNNs" with the `elu(x) + 1` feature map.
///
/// `q`, `k`, `v`: `N x heads x L x hd` -> `N x heads x L x hd`:
/// `out_l = φ(q_l)ᵀ (Σ_s φ(k_s) v_sᵀ) / (φ(q_l)ᵀ Σ_s φ(k_s) + eps)`.
///
/// (CAT-Seg divides the values by `S` and multiplies the output by `S` again to avoid fp16
/// overflow; that cancels exactly in f32 and is not done here.)
pub(crate) fn linear_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    const EPS: f64 = 1e-6;
    let phi_q = (q.elu(1.0)? + 1.0)?;
    let phi_k = (k.elu(1.0)? + 1.0)?;
    let kv = phi_k.t()?.matmul(v)?; // N x h x hd x hd
    let k_sum = phi_k.sum_keepdim(2)?; // N x h x 1 x hd
    let z = (phi_q.matmul(&k_sum.t()?)? + EPS)?; // N x h x L x 1
    Ok(phi_q.matmul(&kv)?.broadcast_div(&z)?)
}

/// Pools `x` (`N x H x W x C`) with a `p x p` average over the top-left
/// `(H/p*p) x (W/p*p)` block, as PyTorch's `AvgPool2d(p)` does (a trailing odd row or
/// column is dropped from the pooled map; it still gets the upsampled update).
pub(crate) fn avg_pool_nhwc(x: &Tensor, p: usize) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let (hp, wp) = (h / p, w / p);
    let x = if hp * p != h || wp * p != w {
        x.narrow(1, 0, hp * p)?.narrow(2, 0, wp * p)?
    } else {
        x.clone()
    };
    let x = x
        .reshape((n * hp, p, wp, p, c))?
        .sum(3)?
        .sum(1)?
        .reshape((n, hp, wp, c))?;
    Ok((x / (p * p) as f64)?)
}

/// Class aggregation layer: pool, `x + LinAttn(LN(x) | text guidance)`, `x + MLP(LN(x))`,
/// upsample back, residual.
#[derive(Clone, Debug)]
pub(crate) struct ClassAggregation {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    norm2: LayerNorm,
    mlp: Mlp,
    heads: usize,
    pool: usize,
}

impl ClassAggregation {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dim: usize,
        guidance: usize,
        heads: usize,
        mlp_hidden: usize,
        pool: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: tgc_nn::layer_norm(dim, eps, vb.pp("norm1"))?,
            q: tgc_nn::linear(dim + guidance, dim, vb.pp("q"))?,
            k: tgc_nn::linear(dim + guidance, dim, vb.pp("k"))?,
            v: tgc_nn::linear(dim, dim, vb.pp("v"))?,
            norm2: tgc_nn::layer_norm(dim, eps, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, mlp_hidden, false, vb.pp("mlp"))?,
            heads,
            pool,
        })
    }

    /// `x`: `(B*K) x H x W x C` (pairs ordered `b*K + k`), `text`: projected text guidance
    /// `B x K x G` -> `(B*K) x H x W x C`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        text: &Tensor,
        dropout: f32,
        train: bool,
    ) -> Result<Tensor> {
        let (bk, h, w, c) = x.dims4()?;
        let (b, k, g) = text.dims3()?;
        // Pooling needs at least p rows and columns; on smaller grids it is skipped.
        let p = if h >= self.pool && w >= self.pool {
            self.pool.max(1)
        } else {
            1
        };
        let xp = if p > 1 {
            avg_pool_nhwc(x, p)?
        } else {
            x.clone()
        };
        let (hp, wp) = (h / p, w / p);
        let s = hp * wp;
        // Tokens of one attention sequence are the K prompts of one image at one pixel.
        let xp = xp
            .reshape((b, k, s, c))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * s, k, c))?;
        let tg = text
            .unsqueeze(1)?
            .broadcast_as((b, s, k, g))?
            .reshape((b * s, k, g))?;
        let xn = self.norm1.forward(&xp)?;
        let qk_in = Tensor::cat(&[&xn, &tg], D::Minus1)?;
        let hd = c / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b * s, k, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(qk_in.apply(&self.q)?)?;
        let kk = split(qk_in.apply(&self.k)?)?;
        let v = split(xn.apply(&self.v)?)?;
        // CAT-Seg's class attention has no output projection.
        let att = linear_attention(&q, &kk, &v)?
            .transpose(1, 2)?
            .reshape((b * s, k, c))?;
        let xp = (xp + maybe_dropout(&att, dropout, train)?)?;
        let xp = (&xp
            + self
                .mlp
                .forward(&self.norm2.forward(&xp)?, dropout, train)?)?;
        // Back to one map per pair, channels first for the resize.
        let xp = xp
            .reshape((b, s, k, c))?
            .transpose(1, 2)?
            .reshape((bk, hp, wp, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let up = tgc_nn::resize_bilinear(&xp, h, w)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        Ok((x + up)?)
    }
}
