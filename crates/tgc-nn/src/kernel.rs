//! The CPU side shared by the fused ops: one float trait for f32 and f64, and the
//! dispatch from candle's `CpuStorage` to a kernel written once for both.
//!
//! Every fused op here takes f32 or f64 contiguous inputs. A kernel implements
//! [`Kernel1`], [`Kernel2`] or [`Kernel3`] (by its number of inputs) generically over
//! [`Float`]; [`cpu_kernel1`] and friends match the storages' dtypes, slice the
//! contiguous ranges (an error naming the input otherwise) and wrap the result, so an
//! op's `cpu_fwd` is one call.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// Float operations the kernels need, for f32 and f64.
pub(crate) trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn max(self, other: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
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

/// A one-input CPU kernel; `dims` are the input's dimensions.
pub(crate) trait Kernel1 {
    fn run<T: Float>(&self, dims: &[usize], a: &[T]) -> Vec<T>;
}

/// A two-input CPU kernel; `dims` are the first input's dimensions.
pub(crate) trait Kernel2 {
    fn run<T: Float>(&self, dims: &[usize], a: &[T], b: &[T]) -> Vec<T>;
}

/// A three-input CPU kernel.
pub(crate) trait Kernel3 {
    fn run<T: Float>(&self, a: &[T], b: &[T], c: &[T]) -> Vec<T>;
}

/// One input of a kernel: its storage, its layout and its name in the not-contiguous
/// error.
pub(crate) type Input<'a> = (&'a CpuStorage, &'a Layout, &'a str);

/// Runs `k` on a contiguous f32 or f64 storage; `dtype_error` is the error for others.
pub(crate) fn cpu_kernel1(k: &impl Kernel1, a: Input, dtype_error: &str) -> Result<CpuStorage> {
    let (s1, l1, n1) = a;
    let dims = l1.dims();
    Ok(match s1 {
        CpuStorage::F32(a) => CpuStorage::F32(k.run(dims, crate::contiguous_slice(a, l1, n1)?)),
        CpuStorage::F64(a) => CpuStorage::F64(k.run(dims, crate::contiguous_slice(a, l1, n1)?)),
        _ => candle_core::bail!("{dtype_error}"),
    })
}

/// Runs `k` on two contiguous storages of one float type (f32 or f64).
pub(crate) fn cpu_kernel2(
    k: &impl Kernel2,
    inputs: [Input; 2],
    dtype_error: &str,
) -> Result<CpuStorage> {
    let [(s1, l1, n1), (s2, l2, n2)] = inputs;
    let dims = l1.dims();
    Ok(match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(k.run(
            dims,
            crate::contiguous_slice(a, l1, n1)?,
            crate::contiguous_slice(b, l2, n2)?,
        )),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(k.run(
            dims,
            crate::contiguous_slice(a, l1, n1)?,
            crate::contiguous_slice(b, l2, n2)?,
        )),
        _ => candle_core::bail!("{dtype_error}"),
    })
}

/// Runs `k` on three contiguous storages of one float type (f32 or f64).
pub(crate) fn cpu_kernel3(
    k: &impl Kernel3,
    inputs: [Input; 3],
    dtype_error: &str,
) -> Result<CpuStorage> {
    let [(s1, l1, n1), (s2, l2, n2), (s3, l3, n3)] = inputs;
    Ok(match (s1, s2, s3) {
        (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32(k.run(
            crate::contiguous_slice(a, l1, n1)?,
            crate::contiguous_slice(b, l2, n2)?,
            crate::contiguous_slice(c, l3, n3)?,
        )),
        (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => CpuStorage::F64(k.run(
            crate::contiguous_slice(a, l1, n1)?,
            crate::contiguous_slice(b, l2, n2)?,
            crate::contiguous_slice(c, l3, n3)?,
        )),
        _ => candle_core::bail!("{dtype_error}"),
    })
}

/// The gradients of an affine normalisation (LayerNorm, GroupNorm) from its fused
/// backward kernel, which returns them packed flat as `[dx | dw | db]` so that one pass
/// over `x` produces all three; `db` has the weight's shape.
pub(crate) fn split_affine_grads(
    packed: &Tensor,
    x: &Tensor,
    w: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, c) = (x.elem_count(), w.elem_count());
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = packed.narrow(0, n, c)?.reshape(w.shape())?;
    let db = packed.narrow(0, n + c, c)?.reshape(w.shape())?;
    Ok((Some(dx), Some(dw), Some(db)))
}
