//! Bicubic resampling of the vision position embeddings.
//!
//! Hugging Face transformers' `CLIPVisionEmbeddings.interpolate_pos_encoding`
//! resizes the square grid of patch position embeddings with
//! `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` to the
//! grid of the input image. This module reproduces PyTorch's
//! `upsample_bicubic2d` exactly: Keys' cubic convolution with A = -0.75, source
//! coordinate `(dst + 0.5) * in/out - 0.5` (not clamped, as PyTorch does for
//! cubic), taps clamped to the border. Bicubic is separable, so the resize is
//! two small matmuls with interpolation matrices.

use candle_core::{Device, Result, Tensor};

const A: f64 = -0.75;

fn cubic1(x: f64) -> f64 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic2(x: f64) -> f64 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// The `out x inp` matrix M with `y = M x` equal to PyTorch's 1-D bicubic
/// resize (align_corners = false, size given, no scale factor).
pub fn bicubic_matrix(inp: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f64; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let real = (o as f64 + 0.5) * scale - 0.5;
        let fl = real.floor();
        let t = real - fl;
        let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let idx = (fl as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
            m[o * inp + idx] += wk;
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// Resizes a grid of embeddings `grid`: S_h x S_w x D to `out_h x out_w x D`
/// with PyTorch's bicubic interpolation (align_corners = false).
pub fn resize_bicubic_hwd(grid: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (sh, sw, d) = grid.dims3()?;
    if (sh, sw) == (out_h, out_w) {
        return Ok(grid.clone());
    }
    let dev: &Device = grid.device();
    let dtype = grid.dtype();
    let mh = Tensor::from_vec(bicubic_matrix(sh, out_h), (out_h, sh), dev)?.to_dtype(dtype)?;
    let mw = Tensor::from_vec(bicubic_matrix(sw, out_w), (out_w, sw), dev)?.to_dtype(dtype)?;
    // rows: out_h x (sw*d)
    let rows = mh.matmul(&grid.reshape((sh, sw * d))?)?;
    // columns: for every output row, out_w x sw @ sw x d
    let rows = rows.reshape((out_h, sw, d))?;
    mw.unsqueeze(0)?
        .broadcast_as((out_h, out_w, sw))?
        .contiguous()?
        .matmul(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identity when the size does not change (t = 0 gives weights 0, 1, 0, 0).
    #[test]
    fn same_size_is_identity() {
        let m = bicubic_matrix(5, 5);
        for i in 0..5 {
            for j in 0..5 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((m[i * 5 + j] - want).abs() < 1e-7);
            }
        }
    }

    /// Rows sum to one: a constant field stays constant under any resize.
    #[test]
    fn rows_sum_to_one() {
        for (i, o) in [(4, 7), (7, 4), (24, 16), (2, 9)] {
            let m = bicubic_matrix(i, o);
            for r in 0..o {
                let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "{i}->{o} row {r}: {s}");
            }
        }
    }
}
