//! Shared helpers for the tgc-msda tests: deterministic random inputs.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};

/// Small deterministic generator (SplitMix64) so tests do not depend on candle's RNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn uniform(&mut self, shape: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * self.next_f64()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

/// One random problem: (value, shapes, locations, weights).
pub struct Case {
    pub value: Tensor,
    pub shapes: Vec<(usize, usize)>,
    pub loc: Tensor,
    pub attn: Tensor,
}

/// Random inputs: value in [-1, 1], locations in [lo, hi], weights in [0, 1].
#[allow(clippy::too_many_arguments)]
pub fn case(
    rng: &mut Rng,
    n: usize,
    shapes: &[(usize, usize)],
    m: usize,
    dh: usize,
    lq: usize,
    p: usize,
    lo: f64,
    hi: f64,
    dtype: DType,
) -> Case {
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let l = shapes.len();
    Case {
        value: rng.uniform(&[n, s, m, dh], -1.0, 1.0, dtype),
        shapes: shapes.to_vec(),
        loc: rng.uniform(&[n, lq, m, l, p, 2], lo, hi, dtype),
        attn: rng.uniform(&[n, lq, m, l, p], 0.0, 1.0, dtype),
    }
}

/// Max absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
