//! MatmulConv / MatmulConvTranspose against candle's convolutions (forward and every
//! gradient; candle's conv backward is correct, only slow) and central finite differences.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder, VarMap};
use tgc_nn::{MatmulConv, MatmulConvTranspose, SeededVarMap};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    abs_max(&(a - b).unwrap())
}

/// The largest absolute element of `t`, as f64.
fn abs_max(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        1e-5
    }
}

/// `tol(dtype)` scaled by the reference's magnitude (at least 1): a bias gradient is a
/// sum over every output pixel, so its f32 rounding grows with its size.
fn scaled_tol(reference: &Tensor, dtype: DType) -> f64 {
    tol(dtype) * abs_max(reference).max(1.0)
}

fn randn(shape: &[usize], std: f64, dtype: DType) -> Result<Var> {
    let t = Tensor::randn(0f64, std, shape, &Device::Cpu)?.to_dtype(dtype)?;
    Var::from_tensor(&t)
}

/// Loss `sum(y * r)` for a fixed random `r`, and the gradients of `vars`.
fn grads(y: &Tensor, r: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
    let g = (y * r)?.sum_all()?.backward()?;
    Ok(vars
        .iter()
        .map(|v| g.get(v.as_tensor()).expect("missing gradient").clone())
        .collect())
}

/// Our convolution (fused and composite paths) against candle's, forward and gradients.
fn check_conv(
    dtype: DType,
    (b, c, h, w): (usize, usize, usize, usize),
    o: usize,
    k: usize,
    stride: usize,
    with_bias: bool,
) -> Result<()> {
    let pad = if stride == 1 { k / 2 } else { 0 };
    let cfg = Conv2dConfig {
        padding: pad,
        stride,
        ..Default::default()
    };
    let case =
        format!("{dtype:?} x {b}x{c}x{h}x{w} -> {o}, k {k}, stride {stride}, bias {with_bias}");
    let x = randn(&[b, c, h, w], 1.0, dtype)?;
    let wt = randn(&[o, c, k, k], 0.1, dtype)?;
    let bias = randn(&[o], 0.5, dtype)?;
    let bias_t = with_bias.then(|| bias.as_tensor().clone());
    let theirs = candle_nn::Conv2d::new(wt.as_tensor().clone(), bias_t.clone(), cfg);
    let ours = MatmulConv::from_weights(wt.as_tensor().clone(), bias_t, cfg)?;
    let yc = theirs.forward(x.as_tensor())?;
    let r = Tensor::randn(0f64, 1.0, yc.dims(), &Device::Cpu)?.to_dtype(dtype)?;
    let vars: Vec<&Var> = if with_bias {
        vec![&x, &wt, &bias]
    } else {
        vec![&x, &wt]
    };
    let gc = grads(&yc, &r, &vars)?;
    for (path, y) in [
        ("fused", ours.forward(x.as_tensor())?),
        ("composite", ours.forward_composite(x.as_tensor())?),
    ] {
        let e = max_abs(&y, &yc);
        assert!(e < tol(dtype), "{case} {path}: forward differs by {e}");
        let g = grads(&y, &r, &vars)?;
        for ((name, a), bb) in ["input", "weight", "bias"].iter().zip(&g).zip(&gc) {
            let e = max_abs(a, bb);
            assert!(
                e < scaled_tol(bb, dtype),
                "{case} {path}: {name} gradient differs by {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn matmul_conv_matches_candle_same_padding_odd_kernels() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for k in [1, 3, 5, 7] {
            for with_bias in [false, true] {
                check_conv(dtype, (2, 3, 5, 7), 4, k, 1, with_bias)?;
            }
        }
        // A 7x7 kernel larger than the input (cost embedding on a small grid).
        check_conv(dtype, (3, 2, 4, 2), 5, 7, 1, true)?;
    }
    Ok(())
}

#[test]
fn matmul_conv_matches_candle_kernel_equal_stride() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for with_bias in [false, true] {
            check_conv(dtype, (2, 3, 6, 8), 4, 2, 2, with_bias)?;
            // Odd sides: the trailing row and column are dropped (PyTorch's floor rule).
            check_conv(dtype, (2, 3, 7, 9), 4, 2, 2, with_bias)?;
            check_conv(dtype, (1, 2, 8, 4), 3, 4, 4, with_bias)?;
        }
    }
    Ok(())
}

fn check_conv_transpose(
    dtype: DType,
    (b, c, h, w): (usize, usize, usize, usize),
    o: usize,
    k: usize,
    with_bias: bool,
) -> Result<()> {
    let cfg = ConvTranspose2dConfig {
        stride: k,
        ..Default::default()
    };
    let case = format!("{dtype:?} convT {b}x{c}x{h}x{w} -> {o}, k {k}, bias {with_bias}");
    let x = randn(&[b, c, h, w], 1.0, dtype)?;
    let wt = randn(&[c, o, k, k], 0.2, dtype)?;
    let bias = randn(&[o], 0.5, dtype)?;
    let bias_t = with_bias.then(|| bias.as_tensor().clone());
    let theirs = candle_nn::ConvTranspose2d::new(wt.as_tensor().clone(), bias_t.clone(), cfg);
    let ours = MatmulConvTranspose::from_weights(wt.as_tensor().clone(), bias_t, cfg)?;
    let yc = theirs.forward(x.as_tensor())?;
    assert_eq!(yc.dims(), &[b, o, h * k, w * k]);
    let r = Tensor::randn(0f64, 1.0, yc.dims(), &Device::Cpu)?.to_dtype(dtype)?;
    let vars: Vec<&Var> = if with_bias {
        vec![&x, &wt, &bias]
    } else {
        vec![&x, &wt]
    };
    let gc = grads(&yc, &r, &vars)?;
    for (path, y) in [
        ("fused", ours.forward(x.as_tensor())?),
        ("composite", ours.forward_composite(x.as_tensor())?),
    ] {
        let e = max_abs(&y, &yc);
        assert!(e < tol(dtype), "{case} {path}: forward differs by {e}");
        let g = grads(&y, &r, &vars)?;
        for ((name, a), bb) in ["input", "weight", "bias"].iter().zip(&g).zip(&gc) {
            let e = max_abs(a, bb);
            assert!(
                e < scaled_tol(bb, dtype),
                "{case} {path}: {name} gradient differs by {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn matmul_conv_transpose_matches_candle() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for with_bias in [false, true] {
            check_conv_transpose(dtype, (2, 3, 3, 5), 4, 2, with_bias)?;
            check_conv_transpose(dtype, (1, 2, 4, 3), 3, 3, with_bias)?;
        }
    }
    Ok(())
}

/// Central finite differences of `f` at `x` against the autograd gradient.
fn gradcheck(x: &Var, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let loss = f(x.as_tensor())?;
    let g = loss.backward()?;
    let g = g
        .get(x.as_tensor())
        .expect("no gradient")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    let mut worst = 0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += eps;
        let lp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device())?)?.to_scalar::<f64>()?;
        p[i] -= 2.0 * eps;
        let lm = f(&Tensor::from_vec(p, x.shape(), x.device())?)?.to_scalar::<f64>()?;
        worst = worst.max(((lp - lm) / (2.0 * eps) - g[i]).abs());
    }
    Ok(worst)
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let dt = DType::F64;
    let x = randn(&[1, 2, 4, 5], 1.0, dt)?;
    let w = randn(&[3, 2, 3, 3], 0.3, dt)?;
    let b = randn(&[3], 0.5, dt)?;
    let r = randn(&[1, 3, 4, 5], 1.0, dt)?;
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
        let y = MatmulConv::from_weights(w.clone(), Some(b.clone()), cfg)?.forward(x)?;
        // Non-linear in the output so that the check is not trivially exact.
        (y.sqr()? * r.as_tensor())?.sum_all()
    };
    let e = [
        gradcheck(&x, &|t| loss(t, w.as_tensor(), b.as_tensor()))?,
        gradcheck(&w, &|t| loss(x.as_tensor(), t, b.as_tensor()))?,
        gradcheck(&b, &|t| loss(x.as_tensor(), w.as_tensor(), t))?,
    ];
    assert!(
        e.iter().all(|&e| e < 1e-6),
        "conv finite differences: {e:?}"
    );

    let wt = randn(&[2, 3, 2, 2], 0.3, dt)?;
    let rt = randn(&[1, 3, 8, 10], 1.0, dt)?;
    let tcfg = ConvTranspose2dConfig {
        stride: 2,
        ..Default::default()
    };
    let loss_t = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
        let y = MatmulConvTranspose::from_weights(w.clone(), Some(b.clone()), tcfg)?.forward(x)?;
        (y.sqr()? * rt.as_tensor())?.sum_all()
    };
    let e = [
        gradcheck(&x, &|t| loss_t(t, wt.as_tensor(), b.as_tensor()))?,
        gradcheck(&wt, &|t| loss_t(x.as_tensor(), t, b.as_tensor()))?,
        gradcheck(&b, &|t| loss_t(x.as_tensor(), wt.as_tensor(), t))?,
    ];
    assert!(
        e.iter().all(|&e| e < 1e-6),
        "conv transpose finite differences: {e:?}"
    );
    Ok(())
}

#[test]
fn constructors_mirror_candle_names_shapes_and_init() -> Result<()> {
    let dev = Device::Cpu;
    let c3 = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let ct = ConvTranspose2dConfig {
        stride: 2,
        ..Default::default()
    };
    // Same seed, same names and hints: identical parameters.
    let (vm_a, vm_b) = (VarMap::new(), VarMap::new());
    let vb_a = SeededVarMap::new(&vm_a, 7).into_var_builder(DType::F32, &dev);
    let vb_b = SeededVarMap::new(&vm_b, 7).into_var_builder(DType::F32, &dev);
    let ours = tgc_nn::conv2d(5, 4, 3, c3, vb_a.pp("c"))?;
    let theirs = candle_nn::conv2d(5, 4, 3, c3, vb_b.pp("c"))?;
    assert_eq!(ours.weight().dims(), &[4, 5, 3, 3]);
    assert_eq!(max_abs(ours.weight(), theirs.weight()), 0.0);
    assert_eq!(max_abs(ours.bias().unwrap(), theirs.bias().unwrap()), 0.0);
    let ours = tgc_nn::conv2d_no_bias(5, 4, 7, Conv2dConfig { padding: 3, ..c3 }, vb_a.pp("n"))?;
    assert!(ours.bias().is_none());
    let theirs =
        candle_nn::conv2d_no_bias(5, 4, 7, Conv2dConfig { padding: 3, ..c3 }, vb_b.pp("n"))?;
    assert_eq!(max_abs(ours.weight(), theirs.weight()), 0.0);
    let ours = tgc_nn::conv_transpose2d(6, 3, 2, ct, vb_a.pp("t"))?;
    let theirs = candle_nn::conv_transpose2d(6, 3, 2, ct, vb_b.pp("t"))?;
    assert_eq!(ours.weight().dims(), &[6, 3, 2, 2]);
    assert_eq!(max_abs(ours.weight(), theirs.weight()), 0.0);
    assert_eq!(max_abs(ours.bias().unwrap(), theirs.bias().unwrap()), 0.0);
    let ours = tgc_nn::conv_transpose2d_no_bias(6, 3, 2, ct, vb_a.pp("u"))?;
    assert!(ours.bias().is_none());
    let mut names: Vec<String> = vm_a.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        ["c.bias", "c.weight", "n.weight", "t.bias", "t.weight", "u.weight"]
    );
    // The legacy constructor: padding implied by the stride.
    let m = MatmulConv::new(3, 2, 4, 4, vb_a.pp("legacy"))?;
    assert_eq!((m.config().stride, m.config().padding), (4, 0));
    let m = MatmulConv::new(3, 2, 5, 1, vb_a.pp("legacy5"))?;
    assert_eq!((m.config().stride, m.config().padding), (1, 2));
    Ok(())
}

#[test]
fn unsupported_configurations_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let conv = |k: usize, padding: usize, stride: usize, dilation: usize, groups: usize| {
        let cfg = Conv2dConfig {
            padding,
            stride,
            dilation,
            groups,
            ..Default::default()
        };
        tgc_nn::conv2d(4, 4, k, cfg, vb.pp("bad"))
    };
    assert!(conv(3, 1, 2, 1, 1).is_err(), "3x3 stride 2");
    assert!(conv(4, 2, 1, 1, 1).is_err(), "even kernel at stride 1");
    assert!(conv(3, 0, 1, 1, 1).is_err(), "3x3 without padding");
    assert!(conv(3, 2, 1, 2, 1).is_err(), "dilation");
    assert!(conv(3, 1, 1, 1, 2).is_err(), "groups");
    assert!(conv(2, 1, 2, 1, 1).is_err(), "padded patch conv");
    assert!(MatmulConv::new(4, 4, 3, 2, vb.pp("bad2")).is_err());
    assert!(
        vm.data().lock().unwrap().is_empty(),
        "no variable created on error"
    );
    let convt = |k: usize, stride: usize, padding: usize, output_padding: usize| {
        let cfg = ConvTranspose2dConfig {
            padding,
            output_padding,
            stride,
            dilation: 1,
        };
        tgc_nn::conv_transpose2d(4, 4, k, cfg, vb.pp("badt"))
    };
    assert!(convt(3, 2, 0, 0).is_err());
    assert!(convt(2, 2, 1, 0).is_err());
    assert!(convt(2, 2, 0, 1).is_err());
    // Wrong input channels, non-square kernel, mismatched bias.
    let ok = tgc_nn::conv2d_no_bias(
        4,
        2,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("ok"),
    )?;
    assert!(ok
        .forward(&Tensor::zeros((1, 3, 4, 4), DType::F32, &dev)?)
        .is_err());
    let w = Tensor::zeros((2, 4, 3, 1), DType::F32, &dev)?;
    assert!(MatmulConv::from_weights(w, None, Conv2dConfig::default()).is_err());
    let w = Tensor::zeros((2, 4, 1, 1), DType::F32, &dev)?;
    let b = Tensor::zeros(3, DType::F32, &dev)?;
    assert!(MatmulConv::from_weights(w, Some(b), Conv2dConfig::default()).is_err());
    Ok(())
}
