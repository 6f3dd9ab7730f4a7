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
//!
//! The hot loops are compiled twice, for the baseline x86-64 target and with AVX2 + FMA
//! (fused multiply-adds, 256-bit vectors), and the build is chosen at run time, so the
//! binaries stay portable. The two agree up to the rounding of the fused multiply-adds.

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
    /// `self * a + b`, fused (one rounding) when `FMA`, else a multiply and an add.
    /// Only the AVX2 + FMA kernels pass `FMA = true`: without the instruction a fused
    /// multiply-add is a slow libm call.
    fn mul_add_if<const FMA: bool>(self, a: Self, b: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const HALF: Self = 0.5;
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            fn trunc_pos(self) -> Self {
                (self as i64) as $t
            }
            fn to_isize(self) -> isize {
                self as isize
            }
            #[inline(always)]
            fn mul_add_if<const FMA: bool>(self, a: Self, b: Self) -> Self {
                if FMA {
                    self.mul_add(a, b)
                } else {
                    self * a + b
                }
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Whether this CPU runs the AVX2 + FMA builds of the kernels. The crate is compiled
/// for the baseline target (portable binaries), so the hot loops are built twice and
/// chosen at run time; std caches the CPUID result.
#[inline]
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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

/// How many queries ahead the backward pass prefetches its strided per-query data.
const PREFETCH_AHEAD: usize = 4;

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
        // Level and point of sample j, advanced without a division per sample.
        let (mut l, mut p) = (j0 / g.points, j0 % g.points);
        for j in j0..j1 {
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
            p += 1;
            if p == g.points {
                p = 0;
                l += 1;
            }
        }
    }
}

/// Forward pass: `out[n, q, m, :] = sum_{l, p} a[n, q, m, l, p] * bilinear(value_l[n, :, m, :], loc)`.
///
/// Parallel over `(batch, query)` rows; within a row the corners of the next head are
/// gathered (and their value rows prefetched) before the current head is summed, so
/// that the scattered loads overlap the arithmetic.
pub(crate) fn forward<T: Real>(g: &Geometry, value: &[T], loc: &[T], attn: &[T], out: &mut [T]) {
    forward_with(g, value, loc, attn, out, has_avx2_fma())
}

/// [`forward`] with the AVX2 + FMA build allowed (`simd`, the CPU must have both) or not.
fn forward_with<T: Real>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    out: &mut [T],
    simd: bool,
) {
    match g.head_dim {
        8 => forward_dh::<T, 8>(g, value, loc, attn, out, simd),
        16 => forward_dh::<T, 16>(g, value, loc, attn, out, simd),
        32 => forward_dh::<T, 32>(g, value, loc, attn, out, simd),
        64 => forward_dh::<T, 64>(g, value, loc, attn, out, simd),
        _ => forward_dh::<T, 0>(g, value, loc, attn, out, simd),
    }
}

/// [`forward`] for head dim `D` known at compile time (`D = 0`: read from `g`), so that
/// the channel loops unroll and the accumulators stay in registers.
fn forward_dh<T: Real, const D: usize>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    out: &mut [T],
    avx2: bool,
) {
    let dh = if D == 0 { g.head_dim } else { D };
    let row = g.heads * dh;
    out.par_chunks_mut(row)
        .with_min_len(8)
        .enumerate()
        .for_each_init(
            || (Box::new(Corners::<T>::new()), Box::new(Corners::<T>::new())),
            |(cur, next), (nq, out_row)| {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe {
                        forward_row_avx2::<T, D>(g, value, loc, attn, nq, out_row, cur, next)
                    };
                    return;
                }
                let _ = avx2;
                forward_row::<T, D, false>(g, value, loc, attn, nq, out_row, cur, next)
            },
        );
}

/// [`forward_row`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_row_avx2<T: Real, const D: usize>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    nq: usize,
    out_row: &mut [T],
    cur: &mut Box<Corners<T>>,
    next: &mut Box<Corners<T>>,
) {
    forward_row::<T, D, true>(g, value, loc, attn, nq, out_row, cur, next)
}

/// One output row `(n, q)`: all heads. The corners of the next (head, chunk) are
/// gathered (and their value rows prefetched) before the current one is summed, so that
/// the scattered loads overlap the arithmetic.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_row<T: Real, const D: usize, const FMA: bool>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    nq: usize,
    out_row: &mut [T],
    cur: &mut Box<Corners<T>>,
    next: &mut Box<Corners<T>>,
) {
    let dh = if D == 0 { g.head_dim } else { D };
    let (m_heads, lq) = (g.heads, g.queries);
    let samples = g.levels() * g.points;
    let chunks = samples.div_ceil(CHUNK);
    let n = nq / lq;
    out_row.fill(T::ZERO);
    // Units of work: (head, chunk of samples).
    let unit = |u: usize| {
        let (m, c) = (u / chunks, u % chunks);
        let j0 = c * CHUNK;
        (m, j0, (j0 + CHUNK).min(samples))
    };
    let units = m_heads * chunks;
    let (m, j0, j1) = unit(0);
    cur.gather(g, value, loc, n, m, (nq * m_heads + m) * samples, j0, j1);
    for u in 0..units {
        if u + 1 < units {
            let (m, j0, j1) = unit(u + 1);
            next.gather(g, value, loc, n, m, (nq * m_heads + m) * samples, j0, j1);
        }
        let (m, j0, _) = unit(u);
        let base_w = (nq * m_heads + m) * samples + j0;
        let o = &mut out_row[m * dh..(m + 1) * dh];
        for c in 0..cur.len {
            let coef = attn[base_w + cur.sample[c] as usize] * cur.wgt[c];
            let v = &value[cur.off[c]..cur.off[c] + dh];
            for (oc, &vc) in o.iter_mut().zip(v) {
                *oc = coef.mul_add_if::<FMA>(vc, *oc);
            }
        }
        std::mem::swap(cur, next);
    }
}

/// Returns `sum(go * v)` and does `gv += coef * go`, with eight partial sums so that the
/// reduction vectorises (a single accumulator forces a scalar loop).
#[inline(always)]
fn dot_axpy<T: Real, const D: usize, const FMA: bool>(
    gv: &mut [T],
    v: &[T],
    go: &[T],
    coef: T,
) -> T {
    let (gv, v, go) = if D == 0 {
        (gv, v, go)
    } else {
        (&mut gv[..D], &v[..D], &go[..D])
    };
    let mut acc = [T::ZERO; 8];
    let n8 = v.len() / 8 * 8;
    for ((gvc, vc), goc) in gv[..n8]
        .chunks_exact_mut(8)
        .zip(v[..n8].chunks_exact(8))
        .zip(go[..n8].chunks_exact(8))
    {
        for i in 0..8 {
            acc[i] = goc[i].mul_add_if::<FMA>(vc[i], acc[i]);
            gvc[i] = coef.mul_add_if::<FMA>(goc[i], gvc[i]);
        }
    }
    let mut dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for ((gvc, &vc), &goc) in gv[n8..].iter_mut().zip(&v[n8..]).zip(&go[n8..]) {
        dot = goc.mul_add_if::<FMA>(vc, dot);
        *gvc = coef.mul_add_if::<FMA>(goc, *gvc);
    }
    dot
}

/// Raw pointer that may be shared between rayon tasks writing disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every task writes a disjoint set of elements (see `backward`).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// Backward pass. Accumulates the value gradient into `grad_value`, which must be zero
/// on entry (the op hands over freshly zeroed memory), and overwrites the gradients of
/// the locations and weights.
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
    let simd = has_avx2_fma();
    backward_with(
        g, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, simd,
    )
}

/// [`backward`] with the AVX2 + FMA build allowed (`simd`, the CPU must have both) or not.
#[allow(clippy::too_many_arguments)]
fn backward_with<T: Real>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    grad_out: &[T],
    grad_value: &mut [T],
    grad_loc: &mut [T],
    grad_attn: &mut [T],
    avx2: bool,
) {
    let m_heads = g.heads;
    assert_eq!(grad_value.len(), value.len());
    assert_eq!(grad_loc.len(), loc.len());
    assert_eq!(grad_attn.len(), attn.len());
    let gv = SharedMut(grad_value.as_mut_ptr());
    let gl = SharedMut(grad_loc.as_mut_ptr());
    let ga = SharedMut(grad_attn.as_mut_ptr());
    (0..g.batch * m_heads).into_par_iter().for_each(|nm| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
            unsafe { backward_head_avx2(g, value, loc, attn, grad_out, gv, gl, ga, nm) };
            return;
        }
        let _ = avx2;
        backward_head_dh::<T, false>(g, value, loc, attn, grad_out, gv, gl, ga, nm)
    });
}

/// [`backward_head_dh`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_head_avx2<T: Real>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    grad_out: &[T],
    gv: SharedMut<T>,
    gl: SharedMut<T>,
    ga: SharedMut<T>,
    nm: usize,
) {
    backward_head_dh::<T, true>(g, value, loc, attn, grad_out, gv, gl, ga, nm)
}

/// [`backward_head`] for the head dim known at compile time where it is a common one.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head_dh<T: Real, const FMA: bool>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    grad_out: &[T],
    gv: SharedMut<T>,
    gl: SharedMut<T>,
    ga: SharedMut<T>,
    nm: usize,
) {
    match g.head_dim {
        8 => backward_head::<T, 8, FMA>(g, value, loc, attn, grad_out, gv, gl, ga, nm),
        16 => backward_head::<T, 16, FMA>(g, value, loc, attn, grad_out, gv, gl, ga, nm),
        32 => backward_head::<T, 32, FMA>(g, value, loc, attn, grad_out, gv, gl, ga, nm),
        64 => backward_head::<T, 64, FMA>(g, value, loc, attn, grad_out, gv, gl, ga, nm),
        _ => backward_head::<T, 0, FMA>(g, value, loc, attn, grad_out, gv, gl, ga, nm),
    }
}

/// The backward pass of head `nm % heads` of image `nm / heads`: all its queries.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head<T: Real, const D: usize, const FMA: bool>(
    g: &Geometry,
    value: &[T],
    loc: &[T],
    attn: &[T],
    grad_out: &[T],
    gv: SharedMut<T>,
    gl: SharedMut<T>,
    ga: SharedMut<T>,
    nm: usize,
) {
    let dh = if D == 0 { g.head_dim } else { D };
    let (m_heads, lq) = (g.heads, g.queries);
    let samples = g.levels() * g.points;
    let row = m_heads * dh;
    let n = nm / m_heads;
    let m = nm % m_heads;
    let mut cur = Box::new(Corners::<T>::new());
    let mut next = Box::new(Corners::<T>::new());
    let mut acc = [(T::ZERO, T::ZERO, T::ZERO); CHUNK];
    let t = std::mem::size_of::<T>();
    // Units of work: (query, chunk of samples); the corners of the next unit are
    // gathered and prefetched before the current one is processed.
    let chunks = samples.div_ceil(CHUNK);
    let units = lq * chunks;
    let unit = |u: usize| {
        let (q, c) = (u / chunks, u % chunks);
        let j0 = c * CHUNK;
        (n * lq + q, j0, (j0 + CHUNK).min(samples))
    };
    // A macro, not a closure: a closure would be compiled without the AVX2 features of
    // the caller and called out of line (perf: 15% of the time in the call).
    macro_rules! gather {
        ($cs:expr, $u:expr) => {{
            let cs: &mut Corners<T> = $cs;
            let (nq, j0, j1) = unit($u);
            cs.gather(g, value, loc, n, m, (nq * m_heads + m) * samples, j0, j1);
            for &off in &cs.off[..cs.len] {
                prefetch(gv.0.wrapping_add(off) as *const T, dh * t);
            }
        }};
    }
    gather!(&mut cur, 0);
    for u in 0..units {
        let (nq, j0, j1) = unit(u);
        let q = nq - n * lq;
        let base_w = (nq * m_heads + m) * samples;
        // The per-query inputs and outputs of one head are strided by all heads' data:
        // fetch those of a later query now, the hardware prefetcher does not.
        if j0 == 0 && q + PREFETCH_AHEAD < lq {
            let wa = base_w + PREFETCH_AHEAD * m_heads * samples;
            prefetch(loc[2 * wa..].as_ptr(), 2 * samples * t);
            prefetch(attn[wa..].as_ptr(), samples * t);
            prefetch(
                grad_out[(nq + PREFETCH_AHEAD) * row + m * dh..].as_ptr(),
                dh * t,
            );
            prefetch(gl.0.wrapping_add(2 * wa) as *const T, 2 * samples * t);
            prefetch(ga.0.wrapping_add(wa) as *const T, samples * t);
        }
        if u + 1 < units {
            gather!(&mut next, u + 1);
        }
        let cs = &*cur;
        let go = &grad_out[nq * row + m * dh..][..dh];
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
            let dot = dot_axpy::<T, D, FMA>(gvs, v, go, coef);
            let e = &mut acc[s];
            e.0 += cs.wgt[c] * dot;
            e.1 += cs.dw[c] * dot;
            e.2 += cs.dh[c] * dot;
        }
        let (mut l, mut p) = (j0 / g.points, j0 % g.points);
        for (s, &(g_a, g_w, g_h)) in acc[..j1 - j0].iter().enumerate() {
            let idx = base_w + j0 + s;
            let (h, w) = g.shapes[l];
            p += 1;
            if p == g.points {
                p = 0;
                l += 1;
            }
            let a = attn[idx];
            // SAFETY: `idx` indexes (n, q, m, l, p), owned by this task; in bounds
            // as `attn[idx]` was just read from a same-length slice.
            unsafe {
                *ga.0.add(idx) = g_a;
                *gl.0.add(2 * idx) = a * g_w * T::from_usize(w);
                *gl.0.add(2 * idx + 1) = a * g_h * T::from_usize(h);
            }
        }
        std::mem::swap(&mut cur, &mut next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers in `[lo, hi)`.
    fn fill(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((x >> 11) as f64 / (1u64 << 53) as f64)
            })
            .collect()
    }

    /// The AVX2 + FMA build and the baseline build compute the same thing (only the
    /// rounding of the fused multiply-adds differs), for the unrolled and the generic
    /// head dims. On a CPU without AVX2 there is nothing to compare.
    #[test]
    fn simd_build_matches_baseline_build() {
        if !has_avx2_fma() {
            return;
        }
        for (head_dim, shapes) in [
            (32, vec![(6, 5), (3, 4)]),
            (5, vec![(7, 7)]),
            (8, vec![(4, 9), (2, 2), (1, 3)]),
        ] {
            let starts: Vec<usize> = shapes
                .iter()
                .scan(0, |acc, &(h, w)| {
                    let s = *acc;
                    *acc += h * w;
                    Some(s)
                })
                .collect();
            let value_len: usize = shapes.iter().map(|&(h, w)| h * w).sum();
            let g = Geometry {
                batch: 2,
                value_len,
                heads: 3,
                head_dim,
                queries: 11,
                points: 2,
                shapes,
                starts,
            };
            let samples = g.batch * g.queries * g.heads * g.levels() * g.points;
            let value = fill(g.batch * value_len * g.heads * head_dim, 1, -1.0, 1.0);
            let loc = fill(2 * samples, 2, -0.2, 1.2);
            let attn = fill(samples, 3, 0.0, 1.0);
            let go = fill(g.batch * g.queries * g.heads * head_dim, 4, -1.0, 1.0);
            let run = |simd: bool| {
                let mut out = vec![0.0; go.len()];
                forward_with(&g, &value, &loc, &attn, &mut out, simd);
                let (mut gv, mut gl, mut ga) = (
                    vec![0.0; value.len()],
                    vec![0.0; loc.len()],
                    vec![0.0; attn.len()],
                );
                backward_with(
                    &g, &value, &loc, &attn, &go, &mut gv, &mut gl, &mut ga, simd,
                );
                [out, gv, gl, ga]
            };
            let (base, simd) = (run(false), run(true));
            for (name, (a, b)) in ["out", "grad_value", "grad_loc", "grad_attn"]
                .iter()
                .zip(base.iter().zip(&simd))
            {
                let nonzero = a.iter().filter(|v| **v != 0.0).count();
                assert!(nonzero > a.len() / 4, "{name}: too few non-zeros");
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() < 1e-12, "{name} (Dh {head_dim}): {x} vs {y}");
                }
            }
        }
    }
}
