//! A fully connected layer that is fast to train on CPU.
//!
//! `candle_nn::Linear` multiplies `B x T x D` inputs against a weight broadcast over the
//! batch, and adds the bias with `broadcast_add`, whose backward sums the gradient over
//! every leading dimension with candle's strided reduction. On the `cpu` preset's
//! MSDeformAttn FFN (8 x 4116 tokens, 128 -> 512) the bias alone took longer than the
//! matrix product (`cargo run --release -p tgc-nn --example linear_timing`). Here the
//! input is flattened to rows, multiplied once, and the bias is added by a fused op whose
//! gradient is a column sum over fixed row blocks (deterministic: the same bits whatever
//! the number of threads).

use candle_core::{CpuStorage, CustomOp2, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernel::{cpu_kernel1, cpu_kernel2, Float, Kernel1, Kernel2};

/// Rows per block of the bias-gradient column sums.
const ROWS: usize = 256;

/// `y = x W^T + b` over the last dimension; weight `out x in`, bias `out`.
///
/// Same parameters and semantics as `candle_nn::Linear` (PyTorch's `nn.Linear`).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Builds a layer from a weight `out x in` and an optional bias `out`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, `out x in`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `out`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    /// `x`: `... x in` -> `... x out`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let mut dims = x.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == in_dim => *last = out_dim,
            _ => candle_core::bail!(
                "linear: input {:?} does not end in the weight's input width {in_dim}",
                x.dims()
            ),
        }
        let rows = x.elem_count() / in_dim;
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => add_bias(&y, b)?,
            None => y,
        };
        y.reshape(dims)
    }
}

/// `y[r, :] + b` for a `rows x n` matrix; fused on CPU, `broadcast_add` elsewhere.
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = y.device().is_cpu()
        && matches!(y.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && b.dtype() == y.dtype()
        && y.rank() == 2
        && b.rank() == 1
        && y.dim(1)? == b.dim(0)?;
    if fused {
        y.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
    } else {
        y.broadcast_add(b)
    }
}

struct AddBias;

fn add_rows<T: Float>(y: &[T], b: &[T]) -> Vec<T> {
    let n = b.len();
    let mut out = y.to_vec();
    out.par_chunks_mut(ROWS * n).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(n) {
            for (v, &bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    });
    out
}

impl Kernel2 for AddBias {
    fn run<T: Float>(&self, _dims: &[usize], y: &[T], b: &[T]) -> Vec<T> {
        add_rows(y, b)
    }
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "tgc-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_kernel2(
            self,
            [(s1, l1, "add_bias: input"), (s2, l2, "add_bias: bias")],
            "add_bias: only f32 and f64 are supported",
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let db = g.apply_op1_no_bwd(&ColumnSum { n: b.elem_count() })?;
        Ok((Some(g), Some(db)))
    }
}

/// Sum over the rows of a contiguous `rows x n` matrix, in fixed row blocks.
struct ColumnSum {
    n: usize,
}

fn column_sum<T: Float>(g: &[T], n: usize) -> Vec<T> {
    let partial: Vec<Vec<T>> = g
        .par_chunks(ROWS * n)
        .map(|chunk| {
            let mut acc = vec![T::ZERO; n];
            for row in chunk.chunks_exact(n) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![T::ZERO; n];
    for p in &partial {
        for (a, &v) in out.iter_mut().zip(p) {
            *a += v;
        }
    }
    out
}

impl Kernel1 for ColumnSum {
    fn run<T: Float>(&self, _dims: &[usize], g: &[T]) -> Vec<T> {
        column_sum(g, self.n)
    }
}

impl candle_core::CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "tgc-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_kernel1(
            self,
            (s, l, "add_bias backward: gradient"),
            "add_bias backward: only f32 and f64 are supported",
        )?;
        Ok((out, Shape::from(self.n)))
    }
}
