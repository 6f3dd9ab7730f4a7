//! Oracles: hand-computed values and central finite differences in f64.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tgc_nn::{layer_norm, masked_mean, resize_bilinear, MhaConfig, MultiHeadAttention};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
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

/// Central finite differences of `f` at `x` against the autograd gradient.
fn gradcheck(x: &Var, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let loss = f(x.as_tensor())?;
    let grads = loss.backward()?;
    let g = grads
        .get(x.as_tensor())
        .expect("no gradient reached the input")
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
        let num = (lp - lm) / (2.0 * eps);
        worst = worst.max((num - g[i]).abs());
    }
    Ok(worst)
}

#[test]
fn layer_norm_matches_hand_computation() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let ln = layer_norm(4, 1e-5, VarBuilder::from_varmap(&vm, DType::F64, &dev))?;
    let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 6.0]], &dev)?;
    // mean 3, var (4+1+0+9)/4 = 3.5
    let s = (3.5f64 + 1e-5).sqrt();
    let want = Tensor::new(&[[-2.0 / s, -1.0 / s, 0.0, 3.0 / s]], &dev)?;
    assert!(max_abs(&ln.forward(&x)?, &want) < 1e-12);
    Ok(())
}

#[test]
fn layer_norm_gradients_match_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let ln = layer_norm(5, 1e-5, VarBuilder::from_varmap(&vm, DType::F64, &dev))?;
    let target = Tensor::randn(0f64, 1.0, (3, 5), &dev)?;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5), &dev)?)?;
    let err = gradcheck(&x, &|t| (ln.forward(t)? * &target)?.sum_all())?;
    assert!(err < 1e-6, "layer norm input gradient off by {err}");
    // Parameters get gradients too.
    let loss = (ln.forward(x.as_tensor())? * &target)?.sum_all()?;
    let grads = loss.backward()?;
    for (name, v) in vm.data().lock().unwrap().iter() {
        assert!(grads.get(v.as_tensor()).is_some(), "{name} has no gradient");
    }
    Ok(())
}

#[test]
fn fused_layer_norm_matches_composite_with_gradients() -> Result<()> {
    let dev = Device::Cpu;
    // 3 x 45 = 135 rows: more than two of the backward's 64-row blocks, the last partial.
    for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
        let w = Var::from_tensor(&Tensor::randn(1f64, 0.5, 24, &dev)?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, 24, &dev)?.to_dtype(dtype)?)?;
        let ln = tgc_nn::LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
        let x = Var::from_tensor(&Tensor::randn(0.3f64, 2.0, (3, 45, 24), &dev)?.to_dtype(dtype)?)?;
        let target = Tensor::randn(0f64, 1.0, (3, 45, 24), &dev)?.to_dtype(dtype)?;
        let fused = ln.forward(x.as_tensor())?;
        let composite = ln.forward_composite(x.as_tensor())?;
        let d = max_abs(
            &fused.to_dtype(DType::F64)?,
            &composite.to_dtype(DType::F64)?,
        );
        assert!(d < tol, "{dtype:?} forward differs by {d}");
        let gf = (fused * &target)?.sum_all()?.backward()?;
        let gc = (composite * &target)?.sum_all()?.backward()?;
        for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
            let a = gf
                .get(v.as_tensor())
                .expect("fused gradient")
                .to_dtype(DType::F64)?;
            let c = gc
                .get(v.as_tensor())
                .expect("composite gradient")
                .to_dtype(DType::F64)?;
            let d = max_abs(&a, &c);
            assert!(d < tol * 50.0, "{dtype:?} {name} gradient differs by {d}");
        }
    }
    Ok(())
}

#[test]
fn fused_layer_norm_parameter_gradients_match_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1.5, (70, 6), &dev)?;
    let target = Tensor::randn(0f64, 1.0, (70, 6), &dev)?;
    let w0 = Tensor::randn(1f64, 0.3, 6, &dev)?;
    let b0 = Tensor::randn(0f64, 0.3, 6, &dev)?;
    let w = Var::from_tensor(&w0)?;
    let err = gradcheck(&w, &|t| {
        (tgc_nn::LayerNorm::new(t.clone(), b0.clone(), 1e-5).forward(&x)? * &target)?.sum_all()
    })?;
    assert!(err < 1e-6, "weight gradient off by {err}");
    let b = Var::from_tensor(&b0)?;
    let err = gradcheck(&b, &|t| {
        (tgc_nn::LayerNorm::new(w0.clone(), t.clone(), 1e-5).forward(&x)? * &target)?.sum_all()
    })?;
    assert!(err < 1e-6, "bias gradient off by {err}");
    Ok(())
}

#[test]
fn linear_matches_candle_linear_with_gradients() -> Result<()> {
    let dev = Device::Cpu;
    // 2 x 300 = 600 rows: several of the bias-gradient's 256-row blocks, the last partial.
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
        let w = Var::from_tensor(&Tensor::randn(0f64, 0.3, (7, 5), &dev)?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.3, 7, &dev)?.to_dtype(dtype)?)?;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 300, 5), &dev)?.to_dtype(dtype)?)?;
        let target = Tensor::randn(0f64, 1.0, (2, 300, 7), &dev)?.to_dtype(dtype)?;
        let ours = tgc_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let theirs = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let yo = ours.forward(x.as_tensor())?;
        let yt = theirs.forward(x.as_tensor())?;
        assert_eq!(yo.dims(), &[2, 300, 7]);
        let d = max_abs(&yo.to_dtype(DType::F64)?, &yt.to_dtype(DType::F64)?);
        assert!(d < tol, "{dtype:?} forward differs by {d}");
        let go = (yo * &target)?.sum_all()?.backward()?;
        let gt = (yt * &target)?.sum_all()?.backward()?;
        for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
            let a = go
                .get(v.as_tensor())
                .expect("gradient")
                .to_dtype(DType::F64)?;
            let c = gt
                .get(v.as_tensor())
                .expect("candle gradient")
                .to_dtype(DType::F64)?;
            let d = max_abs(&a, &c);
            assert!(d < tol * 100.0, "{dtype:?} {name} gradient differs by {d}");
        }
    }
    // Bias gradient against finite differences; no bias works too.
    let x = Tensor::randn(0f64, 1.0, (4, 3, 5), &dev)?;
    let w = Tensor::randn(0f64, 0.3, (2, 5), &dev)?;
    let target = Tensor::randn(0f64, 1.0, (4, 3, 2), &dev)?;
    let b = Var::from_tensor(&Tensor::randn(0f64, 0.3, 2, &dev)?)?;
    let err = gradcheck(&b, &|t| {
        (tgc_nn::Linear::new(w.clone(), Some(t.clone())).forward(&x)? * &target)?.sum_all()
    })?;
    assert!(err < 1e-6, "bias gradient off by {err}");
    let y = tgc_nn::Linear::new(w.clone(), None).forward(&x)?;
    let want = x.broadcast_matmul(&w.t()?)?;
    assert!(max_abs(&y, &want) < 1e-12);
    Ok(())
}

#[test]
fn resize_bilinear_matches_pytorch_convention() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[[[1.0f64, 2.0], [3.0, 4.0]]]], &dev)?;
    let y = resize_bilinear(&x, 4, 4)?;
    // 1-D 2 -> 4 with align_corners=False: [a, .75a+.25b, .25a+.75b, b]
    let r = |a: f64, b: f64| [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b];
    let (c0, c1) = (r(1.0, 2.0), r(3.0, 4.0));
    let mut want = vec![];
    for i in 0..4 {
        let w = r(0.0, 1.0)[i];
        for j in 0..4 {
            want.push(c0[j] * (1.0 - w) + c1[j] * w);
        }
    }
    let want = Tensor::from_vec(want, (1, 1, 4, 4), &dev)?;
    assert!(max_abs(&y, &want) < 1e-12);
    // 4 -> 2 averages neighbouring pairs.
    let x = Tensor::new(&[[[[1.0f64, 3.0, 5.0, 7.0]]]], &dev)?;
    let y = resize_bilinear(&x, 1, 2)?;
    assert!(max_abs(&y, &Tensor::new(&[[[[2.0f64, 6.0]]]], &dev)?) < 1e-12);
    Ok(())
}

#[test]
fn resize_bilinear_gradient_matches_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let target = Tensor::randn(0f64, 1.0, (2, 3, 7, 5), &dev)?;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 3, 4), &dev)?)?;
    let err = gradcheck(&x, &|t| (resize_bilinear(t, 7, 5)? * &target)?.sum_all())?;
    assert!(err < 1e-6, "resize gradient off by {err}");
    Ok(())
}

#[test]
fn attention_matches_explicit_computation_and_ignores_padding() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = MhaConfig {
        q_dim: 6,
        kv_dim: 5,
        dim: 8,
        heads: 2,
    };
    let mha = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev))?;
    let q = Tensor::randn(0f64, 1.0, (2, 3, 6), &dev)?;
    let kv = Tensor::randn(0f64, 1.0, (2, 4, 5), &dev)?;
    let mask = Tensor::new(&[[1f64, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], &dev)?;
    let out = mha.forward(&q, &kv, Some(&mask))?;

    // Explicit loop oracle from the stored weights.
    let get = |n: &str| {
        vm.data()
            .lock()
            .unwrap()
            .get(n)
            .unwrap()
            .as_tensor()
            .clone()
    };
    let lin = |x: &Tensor, p: &str| -> Result<Tensor> {
        x.matmul(&get(&format!("{p}.weight")).t()?)?
            .broadcast_add(&get(&format!("{p}.bias")))
    };
    let mut rows = vec![];
    for b in 0..2 {
        let valid = if b == 0 { 3 } else { 2 };
        let qb = lin(&q.get(b)?, "q_proj")?;
        let kb = lin(&kv.get(b)?.narrow(0, 0, valid)?, "k_proj")?;
        let vb = lin(&kv.get(b)?.narrow(0, 0, valid)?, "v_proj")?;
        let mut heads = vec![];
        for h in 0..2 {
            let qh = qb.narrow(1, h * 4, 4)?;
            let kh = kb.narrow(1, h * 4, 4)?;
            let vh = vb.narrow(1, h * 4, 4)?;
            let s = (qh.matmul(&kh.t()?)? / 2.0)?.exp()?;
            let p = s.broadcast_div(&s.sum_keepdim(1)?)?;
            heads.push(p.matmul(&vh)?);
        }
        rows.push(lin(&Tensor::cat(&heads, 1)?, "out_proj")?);
    }
    let want = Tensor::stack(&rows, 0)?;
    assert!(max_abs(&out, &want) < 1e-10);

    // Changing a padded key/value leaves the output unchanged.
    let noise = Tensor::randn(0f64, 5.0, (1, 1, 5), &dev)?;
    let kv2 = kv.slice_assign(&[0..1, 3..4, 0..5], &noise)?;
    assert!(max_abs(&mha.forward(&q, &kv2, Some(&mask))?, &out) < 1e-12);

    // Every parameter receives a non-zero gradient.
    let loss = out.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    for (name, v) in vm.data().lock().unwrap().iter() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no grad"));
        let n = g.abs()?.sum_all()?.to_scalar::<f64>()?;
        assert!(n > 0.0 && n.is_finite(), "{name}: gradient {n}");
    }
    Ok(())
}

#[test]
fn masked_mean_skips_padding() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[[1.0f64, 2.0], [3.0, 4.0], [100.0, 100.0]]], &dev)?;
    let m = Tensor::new(&[[1.0f64, 1.0, 0.0]], &dev)?;
    let y = masked_mean(&x, &m)?;
    assert!(max_abs(&y, &Tensor::new(&[[2.0f64, 3.0]], &dev)?) < 1e-12);
    Ok(())
}

#[test]
fn seeded_varmap_is_reproducible_and_follows_the_hints() -> Result<()> {
    use candle_nn::Init;
    let dev = Device::Cpu;
    let make = |seed: u64| -> Result<(VarMap, Tensor, Tensor)> {
        let vm = VarMap::new();
        let vb = tgc_nn::SeededVarMap::new(&vm, seed).into_var_builder(DType::F32, &dev);
        let a = vb.get_with_hints(
            (200, 100),
            "a",
            Init::Randn {
                mean: 1.0,
                stdev: 2.0,
            },
        )?;
        let u = vb.get_with_hints((100, 100), "u", Init::Uniform { lo: -3.0, up: -1.0 })?;
        Ok((vm, a, u))
    };
    let (vm1, a1, u1) = make(7)?;
    let (_, a2, _) = make(7)?;
    let (_, a3, _) = make(8)?;
    assert_eq!(max_abs(&a1, &a2), 0.0);
    assert!(max_abs(&a1, &a3) > 0.1);
    // Moments of 20000 normal draws: mean 1 +- 0.05, std 2 +- 0.05.
    let v: Vec<f32> = a1.flatten_all()?.to_vec1()?;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
    assert!(
        (mean - 1.0).abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05,
        "{mean} {var}"
    );
    let u: Vec<f32> = u1.flatten_all()?.to_vec1()?;
    assert!(u.iter().all(|&x| (-3.0..-1.0).contains(&x)));
    // The variables are trainable Vars in the map.
    assert_eq!(vm1.all_vars().len(), 2);
    Ok(())
}

#[test]
fn fused_softmax_matches_generic_and_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 3.0, (3, 4, 7), &dev)?;
    let fused = tgc_nn::softmax_last_dim(&x)?;
    let generic = candle_nn::ops::softmax(&x, candle_core::D::Minus1)?;
    assert!(max_abs(&fused, &generic) < 1e-14);
    // Non-contiguous input (a transpose) is handled.
    let xt = x.transpose(1, 2)?;
    let a = tgc_nn::softmax_last_dim(&xt)?;
    let b = candle_nn::ops::softmax(&xt.contiguous()?, candle_core::D::Minus1)?;
    assert!(max_abs(&a, &b) < 1e-14);
    let target = Tensor::randn(0f64, 1.0, (3, 4, 7), &dev)?;
    let v = Var::from_tensor(&x)?;
    let err = gradcheck(&v, &|t| (tgc_nn::softmax_last_dim(t)? * &target)?.sum_all())?;
    assert!(err < 1e-7, "softmax gradient off by {err}");
    // f32 agrees with f64.
    let f = tgc_nn::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(DType::F64)?;
    assert!(max_abs(&f, &fused) < 1e-6);
    Ok(())
}

/// The fused group norm against `candle_nn::GroupNorm` (the composite it replaces) in
/// forward and in all three gradients, over several group layouts, a rank-3 and a rank-5
/// input, and a non-contiguous input.
#[test]
fn fused_group_norm_matches_candle_group_norm_with_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let cases: [(&[usize], usize); 5] = [
        (&[3, 8, 5, 7], 4),
        (&[2, 6, 9, 9], 1),
        (&[2, 6, 4, 4], 6),
        (&[4, 12, 10], 3),
        (&[2, 4, 3, 2, 5], 2),
    ];
    for (dims, groups) in cases {
        let c = dims[1];
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
            let w = Var::from_tensor(&Tensor::randn(1f64, 0.5, c, &dev)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, c, &dev)?.to_dtype(dtype)?)?;
            let ours = tgc_nn::GroupNorm::new(
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                c,
                groups,
                1e-5,
            )?;
            let reference = candle_nn::GroupNorm::new(
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                c,
                groups,
                1e-5,
            )?;
            let x = Var::from_tensor(&Tensor::randn(0.3f64, 2.0, dims, &dev)?.to_dtype(dtype)?)?;
            let target = Tensor::randn(0f64, 1.0, dims, &dev)?.to_dtype(dtype)?;
            let fused = ours.forward(x.as_tensor())?;
            let composite = reference.forward(x.as_tensor())?;
            let d = max_abs(&fused, &composite);
            assert!(
                d < tol,
                "{dims:?}/{groups} {dtype:?}: forward differs by {d}"
            );
            let gf = (fused * &target)?.sum_all()?.backward()?;
            let gc = (composite * &target)?.sum_all()?.backward()?;
            for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
                let a = gf.get(v.as_tensor()).expect("fused gradient");
                let r = gc.get(v.as_tensor()).expect("composite gradient");
                let d = max_abs(a, r);
                assert!(
                    d < tol * 50.0,
                    "{dims:?}/{groups} {dtype:?}: {name} gradient differs by {d}"
                );
            }
        }
    }
    // A transposed (non-contiguous) input gives what its contiguous copy gives.
    let vm = VarMap::new();
    let gn = tgc_nn::group_norm(2, 4, 1e-5, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1.0, (2, 4, 6, 5), &dev)?.transpose(2, 3)?;
    assert!(!x.is_contiguous());
    assert_eq!(
        max_abs(&gn.forward(&x)?, &gn.forward(&x.contiguous()?)?),
        0.0
    );
    Ok(())
}

/// Input, weight and bias gradients of the fused group norm against central finite
/// differences in f64, and a hand-computed forward.
#[test]
fn fused_group_norm_gradients_match_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    // One image, 2 channels in one group, 1 x 2 spatial: values 1, 2 | 3, 6 -> mean 3,
    // variance (4 + 1 + 0 + 9) / 4 = 3.5; weight (2, 1), bias (0, 1).
    let gn = tgc_nn::GroupNorm::new(
        Tensor::new(&[2.0f64, 1.0], &dev)?,
        Tensor::new(&[0.0f64, 1.0], &dev)?,
        2,
        1,
        1e-5,
    )?;
    let x = Tensor::new(&[[[[1.0f64, 2.0]], [[3.0, 6.0]]]], &dev)?;
    let s = (3.5f64 + 1e-5).sqrt();
    let want = Tensor::new(&[[[[-4.0 / s, -2.0 / s]], [[1.0, 3.0 / s + 1.0]]]], &dev)?;
    assert!(max_abs(&gn.forward(&x)?, &want) < 1e-12);

    let dims = (3, 6, 4, 3);
    let target = Tensor::randn(0f64, 1.0, dims, &dev)?;
    let w0 = Tensor::randn(1f64, 0.3, 6, &dev)?;
    let b0 = Tensor::randn(0f64, 0.3, 6, &dev)?;
    let x0 = Tensor::randn(0f64, 1.5, dims, &dev)?;
    let norm = |w: &Tensor, b: &Tensor| tgc_nn::GroupNorm::new(w.clone(), b.clone(), 6, 3, 1e-5);
    let x = Var::from_tensor(&x0)?;
    let err = gradcheck(&x, &|t| (norm(&w0, &b0)?.forward(t)? * &target)?.sum_all())?;
    assert!(err < 1e-6, "input gradient off by {err}");
    let w = Var::from_tensor(&w0)?;
    let err = gradcheck(&w, &|t| (norm(t, &b0)?.forward(&x0)? * &target)?.sum_all())?;
    assert!(err < 1e-6, "weight gradient off by {err}");
    let b = Var::from_tensor(&b0)?;
    let err = gradcheck(&b, &|t| (norm(&w0, t)?.forward(&x0)? * &target)?.sum_all())?;
    assert!(err < 1e-6, "bias gradient off by {err}");
    Ok(())
}

/// Bad inputs are errors that say what was expected.
#[test]
fn group_norm_rejects_wrong_channels_and_groups() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let gn = tgc_nn::group_norm(2, 4, 1e-5, vb.pp("a"))?;
    let err = gn
        .forward(&Tensor::zeros((1, 3, 2, 2), DType::F32, &dev)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 channels"), "{err}");
    assert!(gn
        .forward(&Tensor::zeros((2, 4), DType::F32, &dev)?)
        .is_err());
    assert!(tgc_nn::group_norm(3, 4, 1e-5, vb.pp("b")).is_err());
    Ok(())
}

#[test]
fn dropout_masks_repeat_under_a_seed_and_change_with_it() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::ones((64, 128), DType::F32, &dev)?;
    let draw = |seed: Option<u64>| -> Result<Vec<f32>> {
        if let Some(s) = seed {
            tgc_nn::seed_dropout(s);
        }
        tgc_nn::dropout(&x, 0.5)?.flatten_all()?.to_vec1::<f32>()
    };
    let a = draw(Some(3))?;
    let a_next = draw(None)?;
    assert_eq!(a, draw(Some(3))?, "same seed, different mask");
    assert_ne!(
        a, a_next,
        "the second call of a stream repeated the first mask"
    );
    assert_ne!(a, draw(Some(4))?, "seeds 3 and 4 drew the same mask");
    // Another thread seeded the same way draws the same masks.
    let b = std::thread::spawn(move || -> Result<Vec<f32>> {
        tgc_nn::seed_dropout(3);
        let x = Tensor::ones((64, 128), DType::F32, &Device::Cpu)?;
        tgc_nn::dropout(&x, 0.5)?.flatten_all()?.to_vec1::<f32>()
    })
    .join()
    .unwrap()?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn dropout_drops_a_share_p_and_scales_the_rest() -> Result<()> {
    let dev = Device::Cpu;
    let n = 200_000;
    let x = Tensor::randn(0f64, 1.0, n, &dev)?;
    for p in [0.1f32, 0.3, 0.7] {
        tgc_nn::seed_dropout(11);
        let y = tgc_nn::dropout(&x, p)?.to_vec1::<f64>()?;
        let xs = x.to_vec1::<f64>()?;
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64;
        // Binomial(n, p): 5 standard deviations.
        let (mean, sd) = (
            n as f64 * p as f64,
            (n as f64 * p as f64 * (1.0 - p as f64)).sqrt(),
        );
        assert!(
            (dropped - mean).abs() < 5.0 * sd,
            "p {p}: {dropped} of {n} dropped"
        );
        let scale = 1.0 / (1.0 - p as f64);
        for (v, x) in y.iter().zip(&xs) {
            assert!(*v == 0.0 || (v - x * scale).abs() < 1e-12 * scale.max(x.abs()));
        }
    }
    assert!(tgc_nn::dropout(&x, 1.0).is_err());
    assert!(tgc_nn::dropout(&x, -0.1).is_err());
    assert_eq!(
        tgc_nn::dropout(&x, 0.0)?.to_vec1::<f64>()?,
        x.to_vec1::<f64>()?
    );
    Ok(())
}

#[test]
fn dropout_of_a_strided_tensor_equals_that_of_its_copy() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (33, 17), &dev)?.t()?;
    tgc_nn::seed_dropout(5);
    let a = tgc_nn::dropout(&x, 0.4)?.to_vec2::<f32>()?;
    tgc_nn::seed_dropout(5);
    let b = tgc_nn::dropout(&x.contiguous()?, 0.4)?.to_vec2::<f32>()?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn dropout_gradient_matches_finite_differences_and_reaches_the_input_only() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f64, 1.0, (4, 9), &dev)?;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 9), &dev)?)?;
    // Every evaluation draws the same mask: a fixed seed before each call.
    let f = |t: &Tensor| -> Result<Tensor> {
        tgc_nn::seed_dropout(9);
        (tgc_nn::dropout(t, 0.3)? * &w)?.sum_all()
    };
    let err = gradcheck(&x, &f)?;
    assert!(err < 1e-6, "dropout input gradient off by {err}");

    // No gradient entry beyond those of the loss without dropout (`x`, and `w`, which
    // candle's `Mul` backward keeps though nothing tracks it); candle's dropout adds one
    // of the input's size for its mask, kept until the GradStore is dropped.
    let entries = |loss: Tensor| -> Result<usize> { Ok(loss.backward()?.get_ids().count()) };
    let plain = entries((x.as_tensor() * &w)?.sum_all()?)?;
    assert_eq!(entries(f(x.as_tensor())?)?, plain);
    let theirs = entries((candle_nn::ops::dropout(x.as_tensor(), 0.3)? * &w)?.sum_all()?)?;
    assert_eq!(theirs, plain + 1);
    Ok(())
}
