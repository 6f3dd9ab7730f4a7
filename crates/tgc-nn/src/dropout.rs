//! Inverted dropout with seedable CPU masks and no gradient for the mask.
//!
//! `candle_nn::ops::dropout` has two costs this one avoids:
//!
//! - **Its masks cannot be seeded on the CPU** (candle draws them from the thread's
//!   entropy-seeded RNG and `Device::set_seed` refuses the CPU), so a run with dropout
//!   could not be repeated or resumed exactly. Here every CPU mask element is a hash of
//!   a per-call seed and its index; the per-call seeds come from a per-thread stream that
//!   [`seed_dropout`] sets (the trainer seeds it from the run's seed, the step and the
//!   data-parallel part).
//! - **Its backward pass keeps a full-size gradient for the mask**: it multiplies by an
//!   f32 mask tensor, and candle's `Mul` backward computes and stores the gradient of both
//!   operands, tracked or not, until the `GradStore` is dropped. At the paper preset's
//!   size (MSDeformAttn FFN dropout over 12,096 tokens x 1024) that was about 2 GB per
//!   image (docs/results.md, "Training-step memory of the paper preset"). Here the mask
//!   is a u8 tensor and one custom op applies it, whose backward returns a gradient for
//!   the input only.
//!
//! On CUDA and Metal the mask comes from the device's own RNG (`Device::set_seed` seeds
//! it); the op itself runs through candle's backend functions on every device.

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::op::Mul;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Layout, MetalStorage, Result, Shape, Tensor,
};
use rayon::prelude::*;

thread_local! {
    /// The state of this thread's stream of per-call mask seeds.
    static STREAM: Cell<u64> = const { Cell::new(0) };
}

/// SplitMix64's output function: a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Seeds this thread's dropout masks: the CPU masks that [`dropout`] draws on this
/// thread after the call depend only on `seed` and the order of the calls. Threads that
/// never call it start from seed 0.
///
/// ```
/// use candle_core::{Device, Tensor};
///
/// let x = Tensor::ones((4, 64), candle_core::DType::F32, &Device::Cpu)?;
/// tgc_nn::seed_dropout(7);
/// let a = tgc_nn::dropout(&x, 0.5)?.to_vec2::<f32>()?;
/// tgc_nn::seed_dropout(7);
/// let b = tgc_nn::dropout(&x, 0.5)?.to_vec2::<f32>()?;
/// assert_eq!(a, b);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn seed_dropout(seed: u64) {
    STREAM.with(|s| s.set(mix(seed)));
}

/// The next per-call seed of this thread's stream (SplitMix64's step).
fn next_call_seed() -> u64 {
    STREAM.with(|s| {
        let state = s.get().wrapping_add(GOLDEN);
        s.set(state);
        mix(state)
    })
}

/// The keep mask of one CPU call: element `i` is kept (1) when the top 24 bits of
/// `mix(seed ^ i * GOLDEN)` reach `p * 2^24`.
fn cpu_mask(n: usize, p: f32, seed: u64) -> Vec<u8> {
    let threshold = (f64::from(p) * f64::from(1u32 << 24)).round() as u64;
    let mut mask = vec![0u8; n];
    mask.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first = (c << 16) as u64;
            for (j, m) in chunk.iter_mut().enumerate() {
                let h = mix(seed ^ (first + j as u64).wrapping_mul(GOLDEN));
                *m = u8::from(h >> 40 >= threshold);
            }
        });
    mask
}

/// Inverted dropout: each element of `x` is zeroed with probability `p` and the kept
/// ones are scaled by `1 / (1 - p)`, so the expected output is `x`. `p = 0` returns `x`.
///
/// - `x`: any shape, a float dtype; the output has the same shape and dtype.
///
/// The gradient reaches `x` only (`grad * mask / (1 - p)`); the forward pass keeps a
/// u8 mask for it. CPU masks are reproducible ([`seed_dropout`]); other devices draw
/// them from the device's RNG.
///
/// ```
/// use candle_core::{Device, Tensor};
///
/// let x = Tensor::ones(10_000, candle_core::DType::F32, &Device::Cpu)?;
/// let y: Vec<f32> = tgc_nn::dropout(&x, 0.25)?.to_vec1()?;
/// let kept = y.iter().filter(|&&v| v != 0.0).count();
/// assert!((7_200..7_800).contains(&kept)); // about 75% kept
/// assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}")
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let mask = if x.device().is_cpu() {
        let seed = next_call_seed();
        Tensor::from_vec(cpu_mask(x.elem_count(), p, seed), x.shape(), x.device())?
    } else {
        Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(f64::from(p))?
    };
    let scale = 1.0 / (1.0 - f64::from(p));
    x.apply_op2(&mask, ApplyMask { scale })
}

/// `x * mask * scale` for a u8 `mask` of `x`'s shape; the gradient goes to `x` only.
struct ApplyMask {
    scale: f64,
}

impl ApplyMask {
    /// The forward pass through candle's backend functions, so one implementation serves
    /// every device.
    fn run<S: BackendStorage>(&self, x: &S, lx: &Layout, m: &S, lm: &Layout) -> Result<(S, Shape)> {
        if m.dtype() != DType::U8 {
            candle_core::bail!("dropout mask must be u8, got {:?}", m.dtype())
        }
        let shape = lx.shape().clone();
        let dense = Layout::contiguous(&shape);
        let m = m.to_dtype(lm, x.dtype())?;
        let y = x.binary_impl::<Mul>(&m, lx, &dense)?;
        Ok((y.affine(&dense, self.scale, 0.0)?, shape))
    }
}

impl CustomOp2 for ApplyMask {
    fn name(&self) -> &'static str {
        "tgc-dropout"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run(s1, l1, s2, l2)
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.run(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = (grad_res * mask.to_dtype(grad_res.dtype())?)?.affine(self.scale, 0.0)?;
        Ok((Some(dx), None))
    }
}
