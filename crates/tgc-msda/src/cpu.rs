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
    /// Truncation of a non-negative value (= floor).
    fn trunc_pos(self) -> Self;
    fn to_isize(self) -> isize;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const HALF: Self = 0.5;
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    fn trunc_pos(self) -> Self {
        (self as i64) as f32
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
    fn trunc_pos(self) -> Self {
        (self as i64) as f64
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
    // h_im, w_im > -1 here, so truncating (x + 1) is floor(x) + 1 (and avoids a libm
    // call on targets without SSE4.1's roundss).
    let h_low_f = (h_im + T::ONE).trunc_pos() - T::ONE;
    let w_low_f = (w_im + T::ONE).trunc_pos() - T::ONE;
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

/// Samples gathered before any value is read, so that the loads of all their corners
/// are in flight together (the kernel is bound by the latency of scattered value reads).
const CHUNK: usize = 32;

/// Hints the CPU to fetch the `bytes` starting at `p` into cache.
#[inline(always)]
fn prefetch<T>(p: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetch never faults, even on an invalid address.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    (p as *const i8).wrapping_add(off),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// The in-bounds corners of up to `CHUNK` samples of one (n, q, m).
struct Corners<T> {
    len: usize,
    /// Offset of the corner's `Dh` channels in the value tensor.
    off: [usize; 4 * CHUNK],
    /// Bilinear weight, and its derivatives w.r.t. the pixel coordinates.
    wgt: [T; 4 * CHUNK],
    dw: [T; 4 * CHUNK],
    dh: [T; 4 * CHUNK],
    /// Sample (within the chunk) the corner belongs to.
    sample: [u8; 4 * CHUNK],
}

impl<T: Real> Corners<T> {
    fn new() -> Self {
        Self {
            len: 0,
            off: [0; 4 * CHUNK],
            wgt: [T::ZERO; 4 * CHUNK],
            dw: [T::ZERO; 4 * CHUNK],
            dh: [T::ZERO; 4 * CHUNK],
            sample: [0; 4 * CHUNK],
        }
    }

    /// Gathers samples `j0 .. j0 + CHUNK` (flattened over levels x points) of the
    /// (n, q, m) whose weights start at `base_w`, prefetching their value rows.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn gather(
        &mut self,
        g: &Geometry,
        value: &[T],
        loc: &[T],
        n: usize,
        m: usize,
        base_w: usize,
        j0: usize,
        j1: usize,
    ) {
        let row = g.heads * g.head_dim;
        let bytes = g.head_dim * std::mem::size_of::<T>();
        self.len = 0;
        for j in j0..j1 {
            let l = j / g.points;
            let (h, w) = g.shapes[l];
            let idx = base_w + j;
            let fp = footprint(loc[2 * idx], loc[2 * idx + 1], h, w);
            let v_base = (n * g.value_len + g.starts[l]) * row + m * g.head_dim;
            for k in 0..fp.count {
                let off = v_base + fp.pix[k] * row;
                prefetch(value[off..].as_ptr(), bytes);
                let c = self.len;
                self.off[c] = off;
                self.wgt[c] = fp.wgt[k];
                self.dw[c] = fp.dw[k];
                self.dh[c] = fp.dh[k];
                self.sample[c] = (j - j0) as u8;
                self.len += 1;
            }
        }
    }
}

/// Forward pass: `out[n, q, m, :] = sum_{l, p} a[n, q, m, l, p] * bilinear(value_l[n, :, m, :], loc)`.
pub(crate) fn forward<T: Real>(g: &Geometry, value: &[T], loc: &[T], attn: &[T], out: &mut [T]) {
    let (m_heads, dh, lq) = (g.heads, g.head_dim, g.queries);
    let samples = g.levels() * g.points;
    let row = m_heads * dh;
    out.par_chunks_mut(row)
        .with_min_len(8)
        .enumerate()
        .for_each_init(
            || Box::new(Corners::<T>::new()),
            |cs, (nq, out_row)| {
                let n = nq / lq;
                for m in 0..m_heads {
                    let o = &mut out_row[m * dh..(m + 1) * dh];
                    o.fill(T::ZERO);
                    let base_w = (nq * m_heads + m) * samples;
                    for j0 in (0..samples).step_by(CHUNK) {
                        let j1 = (j0 + CHUNK).min(samples);
                        cs.gather(g, value, loc, n, m, base_w, j0, j1);
                        for c in 0..cs.len {
                            let coef = attn[base_w + j0 + cs.sample[c] as usize] * cs.wgt[c];
                            let v = &value[cs.off[c]..cs.off[c] + dh];
                            for (oc, &vc) in o.iter_mut().zip(v) {
                                *oc += coef * vc;
                            }
                        }
                    }
                }
            },
        );
}

/// Returns `sum(go * v)` and does `gv += coef * go`, with eight partial sums so that the
/// reduction vectorises (a single accumulator forces a scalar loop).
#[inline(always)]
fn dot_axpy<T: Real>(gv: &mut [T], v: &[T], go: &[T], coef: T) -> T {
    let mut acc = [T::ZERO; 8];
    let n8 = v.len() / 8 * 8;
    for ((gvc, vc), goc) in gv[..n8]
        .chunks_exact_mut(8)
        .zip(v[..n8].chunks_exact(8))
        .zip(go[..n8].chunks_exact(8))
    {
        for i in 0..8 {
            acc[i] += goc[i] * vc[i];
            gvc[i] += coef * goc[i];
        }
    }
    let mut dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for ((gvc, &vc), &goc) in gv[n8..].iter_mut().zip(&v[n8..]).zip(&go[n8..]) {
        dot += goc * vc;
        *gvc += coef * goc;
    }
    dot
}

/// Raw pointer that may be shared between rayon tasks writing disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every task writes a disjoint set of elements (see `backward`).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// Backward pass. Writes (overwrites) the gradients of value, locations and weights.
#[allow(clippy::too_many_arguments)]
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
    let (m_heads, dh, lq) = (g.heads, g.head_dim, g.queries);
    let samples = g.levels() * g.points;
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
        let mut cs = Box::new(Corners::<T>::new());
        let mut acc = [(T::ZERO, T::ZERO, T::ZERO); CHUNK];
        for q in 0..lq {
            let nq = n * lq + q;
            let go = &grad_out[nq * row + m * dh..][..dh];
            let base_w = (nq * m_heads + m) * samples;
            for j0 in (0..samples).step_by(CHUNK) {
                let j1 = (j0 + CHUNK).min(samples);
                cs.gather(g, value, loc, n, m, base_w, j0, j1);
                for &off in &cs.off[..cs.len] {
                    prefetch(
                        gv.0.wrapping_add(off) as *const T,
                        dh * std::mem::size_of::<T>(),
                    );
                }
                acc[..j1 - j0].fill((T::ZERO, T::ZERO, T::ZERO));
                for c in 0..cs.len {
                    let off = cs.off[c];
                    let s = cs.sample[c] as usize;
                    let a = attn[base_w + j0 + s];
                    let v = &value[off..off + dh];
                    let coef = a * cs.wgt[c];
                    // SAFETY: [off, off + dh) is head `m` of image `n`, which only this
                    // task touches; in bounds since `v` is (same length as grad_value).
                    let gvs = unsafe { std::slice::from_raw_parts_mut(gv.0.add(off), dh) };
                    let dot = dot_axpy(gvs, v, go, coef);
                    let e = &mut acc[s];
                    e.0 += cs.wgt[c] * dot;
                    e.1 += cs.dw[c] * dot;
                    e.2 += cs.dh[c] * dot;
                }
                for (s, &(g_a, g_w, g_h)) in acc[..j1 - j0].iter().enumerate() {
                    let idx = base_w + j0 + s;
                    let l = (j0 + s) / g.points;
                    let (h, w) = g.shapes[l];
                    let a = attn[idx];
                    // SAFETY: `idx` indexes (n, q, m, l, p), owned by this task; in bounds
                    // as `attn[idx]` was just read from a same-length slice.
                    unsafe {
                        *ga.0.add(idx) = g_a;
                        *gl.0.add(2 * idx) = a * g_w * T::from_usize(w);
                        *gl.0.add(2 * idx + 1) = a * g_h * T::from_usize(h);
                    }
                }
            }
        }
    });
}
