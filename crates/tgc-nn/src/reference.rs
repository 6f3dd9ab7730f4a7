//! Plain-loop f64 references of the building blocks, reading their weights from a
//! [`VarMap`]: independent oracles for the modules' tests (DATE, VLCM), written the way
//! the equations read rather than the way the fused kernels compute.
//!
//! They are slow and panic on misuse (a missing parameter, mismatched lengths): they are
//! for tests on small shapes, not for inference.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use tgc_nn::reference;
//!
//! // y = x Wᵀ + b by hand: W = [[1, 2], [3, 4]], b = [0.5, -1], x = [1, 1].
//! let y = reference::linear(&vec![vec![1.0, 1.0]], &[1.0, 2.0, 3.0, 4.0], &[0.5, -1.0]);
//! assert_eq!(y, vec![vec![3.5, 6.0]]);
//!
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
//! vb.get_with_hints(3, "norm.weight", candle_nn::Init::Const(2.0))?;
//! assert_eq!(reference::param(&vm, "norm.weight"), vec![2.0, 2.0, 2.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Result, Tensor};
use candle_nn::VarMap;

/// Rows of a matrix (tokens x features).
pub type Rows = Vec<Vec<f64>>;

/// A parameter of the VarMap as a flat f64 vector.
///
/// # Panics
/// When `vm` has no parameter `name` (the message names it).
pub fn param(vm: &VarMap, name: &str) -> Vec<f64> {
    let data = vm.data().lock().unwrap();
    let var = data
        .get(name)
        .unwrap_or_else(|| panic!("no parameter `{name}` in the VarMap"));
    var.as_tensor()
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .unwrap_or_else(|e| panic!("parameter `{name}`: {e}"))
}

/// Replaces every parameter with N(0, 0.5²) values: zero biases and unit LayerNorm
/// weights would hide errors in how they are applied.
pub fn randomise(vm: &VarMap) -> Result<()> {
    for var in vm.all_vars() {
        let r = Tensor::randn(0f64, 0.5, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&r)?;
    }
    Ok(())
}

/// `y = x Wᵀ + b` row by row; `w` is `out x in` row-major.
///
/// # Panics
/// When a row of `x` is not `in` wide.
pub fn linear(x: &Rows, w: &[f64], b: &[f64]) -> Rows {
    let out = b.len();
    let inp = w.len() / out;
    x.iter()
        .map(|row| {
            assert_eq!(row.len(), inp, "linear: row width vs weight");
            (0..out)
                .map(|o| b[o] + (0..inp).map(|i| w[o * inp + i] * row[i]).sum::<f64>())
                .collect()
        })
        .collect()
}

/// LayerNorm over each row (biased variance, as PyTorch).
pub fn layer_norm(x: &Rows, g: &[f64], b: &[f64], eps: f64) -> Rows {
    x.iter()
        .map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let s = (var + eps).sqrt();
            row.iter()
                .enumerate()
                .map(|(i, v)| (v - mean) / s * g[i] + b[i])
                .collect()
        })
        .collect()
}

/// Multi-head attention of [`crate::MultiHeadAttention`]'s parameters under `prefix`
/// (`q_proj`, `k_proj`, `v_proj`, `out_proj`), with explicit per-head loops; keys with
/// `mask <= 0.5` are skipped.
///
/// # Panics
/// When `kv` and `mask` differ in length or a parameter is missing.
pub fn mha(vm: &VarMap, prefix: &str, q: &Rows, kv: &Rows, mask: &[f64], heads: usize) -> Rows {
    assert_eq!(kv.len(), mask.len(), "mha: one mask entry per key");
    let p = |n: &str| param(vm, &format!("{prefix}.{n}"));
    let qp = linear(q, &p("q_proj.weight"), &p("q_proj.bias"));
    let kp = linear(kv, &p("k_proj.weight"), &p("k_proj.bias"));
    let vp = linear(kv, &p("v_proj.weight"), &p("v_proj.bias"));
    let dim = qp[0].len();
    let hd = dim / heads;
    let mut out = vec![vec![0.0; dim]; q.len()];
    for h in 0..heads {
        let cols = h * hd..(h + 1) * hd;
        for (i, qi) in qp.iter().enumerate() {
            let scores: Vec<Option<f64>> = kp
                .iter()
                .zip(mask)
                .map(|(kj, &m)| {
                    (m > 0.5).then(|| {
                        cols.clone().map(|c| qi[c] * kj[c]).sum::<f64>() / (hd as f64).sqrt()
                    })
                })
                .collect();
            let max = scores.iter().flatten().cloned().fold(f64::MIN, f64::max);
            let exps: Vec<f64> = scores
                .iter()
                .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                .collect();
            let z: f64 = exps.iter().sum();
            for c in cols.clone() {
                out[i][c] = exps.iter().zip(&vp).map(|(e, vj)| e / z * vj[c]).sum();
            }
        }
    }
    linear(&out, &p("out_proj.weight"), &p("out_proj.bias"))
}
