//! Fused, multi-threaded CPU kernels for the sampling core (forward and backward).
//!
//! Layouts (all contiguous, row-major):
//! - value `N x S x M x Dh`, levels concatenated along `S`,
//! - locations `N x Lq x M x L x P x 2` as `(x, y)` in `[0, 1]`,
//! - weights `N x Lq x M x L x P`,
//! - output `N x Lq x M x Dh`.
//!
//! The forward pass is parallel over `(batch, query)` rows: each row owns its output.
//! The backward pass is parallel over `(batch, head)`: the value gradient of one head of
//! one image is a disjoint (strided) slice, so no atomics and no per-thread copies of the
//! value gradient are needed, and the location/weight gradients of `(n, q, m)` are
//! written by exactly one task.

use rayon::prelude::*;

use crate::Geometry;

/// Floating point element type the kernels are generic over (f32 and f64).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const HALF: Self;
    fn from_usize(v: usize) -> Self;
    fn floor(self) -> Self;
    fn to_isize(self) -> isize;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const HALF: Self = 0.5;
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    fn floor(self) -> Self {
        f32::floor(self)
    }
    fn to_isize(self) -> isize {
        self as isize
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const HALF: Self = 0.5;
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    fn floor(self) -> Self {
        f64::floor(self)
    }
    fn to_isize(self) -> isize {
        self as isize
    }
}

/// Bilinear footprint of one sampling point: up to four in-bounds corners, each with its
/// pixel index inside the level, its interpolation weight and the derivatives of that
/// weight with respect to the pixel coordinates `(w_im, h_im)`.
struct Footprint<T> {
    count: usize,
    pix: [usize; 4],
    wgt: [T; 4],
    dw: [T; 4],
    dh: [T; 4],
}

/// Computes the corners for the point `(x, y)` on a `h x w` level with the sampling
/// convention of `grid_sample(align_corners=False, padding_mode="zeros")`: pixel
/// coordinates `(x * w - 0.5, y * h - 0.5)`, out-of-bounds corners contribute zero.
#[inline(always)]
fn footprint<T: Real>(x: T, y: T, h: usize, w: usize) -> Footprint<T> {
    let hf = T::from_usize(h);
    let wf = T::from_usize(w);
    let h_im = y * hf - T::HALF;
    let w_im = x * wf - T::HALF;
    let mut fp = Footprint {
        count: 0,
        pix: [0; 4],
        wgt: [T::ZERO; 4],
        dw: [T::ZERO; 4],
        dh: [T::ZERO; 4],
    };
    // Same early exit as the reference kernel: no corner can be inside the level.
    let minus_one = T::ZERO - T::ONE;
    if !(h_im > minus_one && w_im > minus_one && h_im < hf && w_im < wf) {
        return fp;
    }
    let h_low_f = h_im.floor();
    let w_low_f = w_im.floor();
    let lh = h_im - h_low_f;
    let lw = w_im - w_low_f;
    let hh = T::ONE - lh;
    let hw = T::ONE - lw;
    let h_low = h_low_f.to_isize();
    let w_low = w_low_f.to_isize();
    let (hi, wi) = (h as isize, w as isize);
    // (dy, dx, weight, d weight / d w_im, d weight / d h_im)
    let corners = [
        (0isize, 0isize, hh * hw, T::ZERO - hh, T::ZERO - hw),
        (0, 1, hh * lw, hh, T::ZERO - lw),
        (1, 0, lh * hw, T::ZERO - lh, hw),
        (1, 1, lh * lw, lh, lw),
    ];
    for (dy, dx, wt, dwt, dht) in corners {
        let yy = h_low + dy;
        let xx = w_low + dx;
        if yy >= 0 && yy < hi && xx >= 0 && xx < wi {
            let k = fp.count;
            fp.pix[k] = (yy * wi + xx) as usize;
            fp.wgt[k] = wt;
            fp.dw[k] = dwt;
            fp.dh[k] = dht;
            fp.count += 1;
        }
    }
    fp
}

/// Forward pass: `out[n, q, m, :] = sum_{l, p} a[n, q, m, l, p] * bilinear(value_l[n, :, m, :], loc)`.
pub(crate) fn forward<T: Real>(g: &Geometry, value: &[T], loc: &[T], attn: &[T], out: &mut [T]) {
    let (m_heads, dh, s_len, lq) = (g.heads, g.head_dim, g.value_len, g.queries);
    let (n_lv, n_pt) = (g.levels(), g.points);
    let row = m_heads * dh;
    out.par_chunks_mut(row)
        .with_min_len(8)
        .enumerate()
        .for_each(|(nq, out_row)| {
            let n = nq / lq;
            for m in 0..m_heads {
                let o = &mut out_row[m * dh..(m + 1) * dh];
                o.fill(T::ZERO);
                let base_w = (nq * m_heads + m) * n_lv * n_pt;
                for (l, &(h, w)) in g.shapes.iter().enumerate() {
                    let v_base = (n * s_len + g.starts[l]) * row + m * dh;
                    for p in 0..n_pt {
                        let idx = base_w + l * n_pt + p;
                        let a = attn[idx];
                        let fp = footprint(loc[2 * idx], loc[2 * idx + 1], h, w);
                        for k in 0..fp.count {
                            let c = a * fp.wgt[k];
                            let v = &value[v_base + fp.pix[k] * row..][..dh];
                            for (oc, &vc) in o.iter_mut().zip(v) {
                                *oc += c * vc;
                            }
                        }
                    }
                }
            }
        });
}

/// Raw pointer that may be shared between rayon tasks writing disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every task writes a disjoint set of elements (see `backward`).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// Backward pass. Writes (overwrites) the gradients of value, locations and weights.
pub(crate) fn backward<T: Real>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    grad_out: &[T],
    grad_value: &mut [T],
    grad_loc: &mut [T],
    grad_attn: &mut [T],
) {
    let (m_heads, dh, s_len, lq) = (g.heads, g.head_dim, g.value_len, g.queries);
    let (n_lv, n_pt) = (g.levels(), g.points);
    let row = m_heads * dh;
    assert_eq!(grad_value.len(), value.len());
    assert_eq!(grad_loc.len(), loc.len());
    assert_eq!(grad_attn.len(), attn.len());
    grad_value.fill(T::ZERO);
    let gv = SharedMut(grad_value.as_mut_ptr());
    let gl = SharedMut(grad_loc.as_mut_ptr());
    let ga = SharedMut(grad_attn.as_mut_ptr());
    (0..g.batch * m_heads).into_par_iter().for_each(|nm| {
        let (gv, gl, ga) = (gv, gl, ga);
        let n = nm / m_heads;
        let m = nm % m_heads;
        for q in 0..lq {
            let nq = n * lq + q;
            let go = &grad_out[nq * row + m * dh..][..dh];
            let base_w = (nq * m_heads + m) * n_lv * n_pt;
            for (l, &(h, w)) in g.shapes.iter().enumerate() {
                let (hf, wf) = (T::from_usize(h), T::from_usize(w));
                let v_base = (n * s_len + g.starts[l]) * row + m * dh;
                for p in 0..n_pt {
                    let idx = base_w + l * n_pt + p;
                    let a = attn[idx];
                    let fp = footprint(loc[2 * idx], loc[2 * idx + 1], h, w);
                    let (mut g_a, mut g_w, mut g_h) = (T::ZERO, T::ZERO, T::ZERO);
                    for k in 0..fp.count {
                        let off = v_base + fp.pix[k] * row;
                        let v = &value[off..off + dh];
                        let c = a * fp.wgt[k];
                        // SAFETY: element range [off, off + dh) belongs to head `m` of
                        // image `n`, which only this task touches; `off + dh <= len`
                        // because `v` above was bounds-checked on a same-length slice.
                        let gvs = unsafe { std::slice::from_raw_parts_mut(gv.0.add(off), dh) };
                        let mut dot = T::ZERO;
                        for ((gvc, &vc), &goc) in gvs.iter_mut().zip(v).zip(go) {
                            dot += goc * vc;
                            *gvc += c * goc;
                        }
                        g_a += fp.wgt[k] * dot;
                        g_w += fp.dw[k] * dot;
                        g_h += fp.dh[k] * dot;
                    }
                    // SAFETY: `idx` indexes (n, q, m, l, p), owned by this task (head m of
                    // image n); bounds were checked by the reads of `attn` and `loc`.
                    unsafe {
                        *ga.0.add(idx) = g_a;
                        *gl.0.add(2 * idx) = a * g_w * wf;
                        *gl.0.add(2 * idx + 1) = a * g_h * hf;
                    }
                }
            }
        }
    });
}
