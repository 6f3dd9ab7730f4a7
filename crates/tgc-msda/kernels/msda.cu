// Multi-scale deformable attention: CUDA kernels (forward and backward).
//
// Layouts (contiguous, row-major), as in the Rust crate:
//   value  N x S x M x Dh        (levels concatenated along S)
//   loc    N x Lq x M x L x P x 2 ((x, y) in [0, 1])
//   attn   N x Lq x M x L x P
//   out    N x Lq x M x Dh
//   level  int32 [3 L]: H_0, W_0, H_1, W_1, ..., then start_0, start_1, ...
//
// Forward: one thread per output element (n, q, m, c) (the "im2col" design).
// Backward: a block is blockDim.y groups of blockDim.x = Dh threads; each group owns one
// (n, q, m) and each thread one channel. Value gradients are scattered with atomicAdd;
// location and weight gradients are per-channel partial sums reduced in shared memory.
//
// Sampling: bilinear at pixel coordinates (x W - 0.5, y H - 0.5), zero outside
// (grid_sample, align_corners = False, padding_mode = "zeros").
//
// Build to PTX: nvcc --ptx -arch=compute_90 -O3 -o msda.ptx msda.cu

template <typename T>
__device__ __forceinline__ T bilinear(const T* v, int h, int w, int stride, T h_im, T w_im) {
    const int h_low = (int)floor(h_im);
    const int w_low = (int)floor(w_im);
    const int h_high = h_low + 1;
    const int w_high = w_low + 1;
    const T lh = h_im - h_low, lw = w_im - w_low;
    const T hh = 1 - lh, hw = 1 - lw;
    T v1 = 0, v2 = 0, v3 = 0, v4 = 0;
    if (h_low >= 0 && w_low >= 0) v1 = v[(h_low * w + w_low) * stride];
    if (h_low >= 0 && w_high < w) v2 = v[(h_low * w + w_high) * stride];
    if (h_high < h && w_low >= 0) v3 = v[(h_high * w + w_low) * stride];
    if (h_high < h && w_high < w) v4 = v[(h_high * w + w_high) * stride];
    return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4;
}

template <typename T>
__device__ void msda_fwd(const T* __restrict__ value, const int* __restrict__ level,
                         const T* __restrict__ loc, const T* __restrict__ attn,
                         T* __restrict__ out, int n_batch, int s_len, int m_heads, int dh,
                         int lq, int n_levels, int n_points) {
    const long total = (long)n_batch * lq * m_heads * dh;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        const int c = i % dh;
        const long nqm = i / dh;
        const int m = nqm % m_heads;
        const long nq = nqm / m_heads;
        const int n = nq / lq;
        const int row = m_heads * dh;
        const T* a_ptr = attn + nqm * n_levels * n_points;
        const T* l_ptr = loc + nqm * n_levels * n_points * 2;
        T acc = 0;
        for (int l = 0; l < n_levels; ++l) {
            const int h = level[2 * l], w = level[2 * l + 1], start = level[2 * n_levels + l];
            const T* v = value + ((long)n * s_len + start) * row + m * dh + c;
            for (int p = 0; p < n_points; ++p) {
                const T x = l_ptr[0], y = l_ptr[1];
                const T a = a_ptr[0];
                l_ptr += 2;
                a_ptr += 1;
                const T h_im = y * h - (T)0.5, w_im = x * w - (T)0.5;
                if (h_im > -1 && w_im > -1 && h_im < h && w_im < w) {
                    acc += a * bilinear(v, h, w, row, h_im, w_im);
                }
            }
        }
        out[i] = acc;
    }
}

// Sums sh[ty * dh + 0 .. dh) into sh[ty * dh]; all threads of the block must call it.
template <typename T>
__device__ __forceinline__ void group_reduce(T* sh, int dh, int pow2) {
    const int tx = threadIdx.x, base = threadIdx.y * dh;
    for (int s = pow2 / 2; s > 0; s >>= 1) {
        if (tx < s && tx + s < dh) sh[base + tx] += sh[base + tx + s];
        __syncthreads();
    }
}

template <typename T>
__device__ void msda_bwd(const T* __restrict__ value, const int* __restrict__ level,
                         const T* __restrict__ loc, const T* __restrict__ attn,
                         const T* __restrict__ grad_out, T* __restrict__ grad_value,
                         T* __restrict__ grad_loc, T* __restrict__ grad_attn, int n_batch,
                         int s_len, int m_heads, int dh, int lq, int n_levels, int n_points,
                         int pow2) {
    extern __shared__ unsigned char smem_raw[];
    T* sh_a = reinterpret_cast<T*>(smem_raw);
    T* sh_x = sh_a + blockDim.x * blockDim.y;
    T* sh_y = sh_x + blockDim.x * blockDim.y;
    const int c = threadIdx.x;
    const int tid = threadIdx.y * dh + c;
    const long groups = (long)n_batch * lq * m_heads;
    const int row = m_heads * dh;
    // Every thread of the block runs the same number of iterations (syncthreads inside).
    for (long g0 = (long)blockIdx.x * blockDim.y; g0 < groups; g0 += (long)gridDim.x * blockDim.y) {
        const long nqm = g0 + threadIdx.y;
        const bool active = nqm < groups;
        const int m = active ? nqm % m_heads : 0;
        const long nq = active ? nqm / m_heads : 0;
        const int n = nq / lq;
        const T go = active ? grad_out[nqm * dh + c] : (T)0;
        for (int l = 0; l < n_levels; ++l) {
            const int h = level[2 * l], w = level[2 * l + 1], start = level[2 * n_levels + l];
            const long v_off = ((long)n * s_len + start) * row + m * dh + c;
            for (int p = 0; p < n_points; ++p) {
                const long idx = (nqm * n_levels + l) * n_points + p;
                T g_a = 0, g_x = 0, g_y = 0, a = 0;
                if (active) {
                    const T x = loc[2 * idx], y = loc[2 * idx + 1];
                    a = attn[idx];
                    const T h_im = y * h - (T)0.5, w_im = x * w - (T)0.5;
                    if (h_im > -1 && w_im > -1 && h_im < h && w_im < w) {
                        const int h_low = (int)floor(h_im), w_low = (int)floor(w_im);
                        const int h_high = h_low + 1, w_high = w_low + 1;
                        const T lh = h_im - h_low, lw = w_im - w_low;
                        const T hh = 1 - lh, hw = 1 - lw;
                        const T* v = value + v_off;
                        T* gv = grad_value + v_off;
                        const T ag = a * go;
                        if (h_low >= 0 && w_low >= 0) {
                            const long o = (long)(h_low * w + w_low) * row;
                            const T v1 = v[o];
                            g_a += hh * hw * v1 * go;
                            g_x -= hh * v1 * go;
                            g_y -= hw * v1 * go;
                            atomicAdd(gv + o, hh * hw * ag);
                        }
                        if (h_low >= 0 && w_high < w) {
                            const long o = (long)(h_low * w + w_high) * row;
                            const T v2 = v[o];
                            g_a += hh * lw * v2 * go;
                            g_x += hh * v2 * go;
                            g_y -= lw * v2 * go;
                            atomicAdd(gv + o, hh * lw * ag);
                        }
                        if (h_high < h && w_low >= 0) {
                            const long o = (long)(h_high * w + w_low) * row;
                            const T v3 = v[o];
                            g_a += lh * hw * v3 * go;
                            g_x -= lh * v3 * go;
                            g_y += hw * v3 * go;
                            atomicAdd(gv + o, lh * hw * ag);
                        }
                        if (h_high < h && w_high < w) {
                            const long o = (long)(h_high * w + w_high) * row;
                            const T v4 = v[o];
                            g_a += lh * lw * v4 * go;
                            g_x += lh * v4 * go;
                            g_y += lw * v4 * go;
                            atomicAdd(gv + o, lh * lw * ag);
                        }
                        g_x *= a * w;
                        g_y *= a * h;
                    }
                }
                sh_a[tid] = g_a;
                sh_x[tid] = g_x;
                sh_y[tid] = g_y;
                __syncthreads();
                group_reduce(sh_a, dh, pow2);
                group_reduce(sh_x, dh, pow2);
                group_reduce(sh_y, dh, pow2);
                if (active && c == 0) {
                    grad_attn[idx] = sh_a[tid];
                    grad_loc[2 * idx] = sh_x[tid];
                    grad_loc[2 * idx + 1] = sh_y[tid];
                }
                __syncthreads();
            }
        }
    }
}

#define MSDA_INSTANTIATE(T, SUF)                                                              \
    extern "C" __global__ void msda_fwd_##SUF(const T* value, const int* level, const T* loc, \
                                              const T* attn, T* out, int n_batch, int s_len,  \
                                              int m_heads, int dh, int lq, int n_levels,      \
                                              int n_points) {                                 \
        msda_fwd<T>(value, level, loc, attn, out, n_batch, s_len, m_heads, dh, lq, n_levels,  \
                    n_points);                                                                \
    }                                                                                         \
    extern "C" __global__ void msda_bwd_##SUF(                                                \
        const T* value, const int* level, const T* loc, const T* attn, const T* grad_out,      \
        T* grad_value, T* grad_loc, T* grad_attn, int n_batch, int s_len, int m_heads, int dh, \
        int lq, int n_levels, int n_points, int pow2) {                                       \
        msda_bwd<T>(value, level, loc, attn, grad_out, grad_value, grad_loc, grad_attn,        \
                    n_batch, s_len, m_heads, dh, lq, n_levels, n_points, pow2);               \
    }

MSDA_INSTANTIATE(float, f32)
MSDA_INSTANTIATE(double, f64)
