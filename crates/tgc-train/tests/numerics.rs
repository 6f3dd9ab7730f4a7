//! Optimiser, schedule and losses against PyTorch fixtures, hand-computed cases and
//! finite differences. Fixtures: tests/fixtures/make_adamw_fixture.py.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use tgc_train::checkpoint::{load_checkpoint, save_checkpoint};
use tgc_train::loss::{
    bce_with_logits, dice_bce, lvit_weighted_dice_bce, soft_dice_loss, weighted_dice_bce, SegLoss,
};
use tgc_train::{clip_grad_norm, AdamW, AdamWConfig, Error, WarmupCosine};

type R = Result<(), Box<dyn std::error::Error>>;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    candle_core::safetensors::load(&p, &Device::Cpu).expect("fixture (run make_adamw_fixture.py)")
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    vec_f64(a)
        .iter()
        .zip(vec_f64(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

const NAMES: [&str; 3] = ["p0", "p1", "p2"];

fn fixture_config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    }
}

fn fresh(fx: &HashMap<String, Tensor>) -> (Vec<Var>, AdamW) {
    fresh_with(fx, true)
}

fn fresh_with(fx: &HashMap<String, Tensor>, fused: bool) -> (Vec<Var>, AdamW) {
    let vars: Vec<Var> = NAMES
        .iter()
        .map(|n| Var::from_tensor(&fx[&format!("{n}.init")]).unwrap())
        .collect();
    let named = NAMES
        .iter()
        .zip(&vars)
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let opt = AdamW::new(named, fixture_config())
        .unwrap()
        .with_fused_cpu(fused);
    (vars, opt)
}

/// Step `s` of the fixture: its gradients, clipped, then one AdamW step.
fn run_step(
    fx: &HashMap<String, Tensor>,
    vars: &[Var],
    opt: &mut AdamW,
    s: usize,
) -> (f64, tgc_train::StepStats) {
    let mut grads = GradStore::default();
    for (n, v) in NAMES.iter().zip(vars) {
        if let Some(g) = fx.get(&format!("grad.{s}.{n}")) {
            grads.insert(v.as_tensor(), g.clone());
        }
    }
    let refs: Vec<&Var> = vars.iter().collect();
    let norm = clip_grad_norm(&mut grads, &refs, 1.0).unwrap();
    let lr = vec_f64(&fx["lrs"])[s];
    (norm, opt.step(&grads, lr).unwrap())
}

#[test]
fn adamw_and_clipping_match_pytorch() {
    // Fused CPU kernel (default) and the composed tensor-op path (GPU, other dtypes).
    for fused in [true, false] {
        adamw_matches_pytorch(fused);
    }
}

fn adamw_matches_pytorch(fused: bool) {
    let fx = fixture("adamw.safetensors");
    let (vars, mut opt) = fresh_with(&fx, fused);
    let norms = vec_f64(&fx["norms"]);
    for (s, &expected_norm) in norms.iter().enumerate() {
        let (norm, stats) = run_step(&fx, &vars, &mut opt, s);
        assert!(
            (norm - expected_norm).abs() <= 1e-6 * expected_norm,
            "step {s}: norm {norm} vs torch {expected_norm}"
        );
        // p2 has no gradient at steps 1 and 4: skipped and reported.
        let expect_missing: Vec<String> = if s == 1 || s == 4 {
            vec!["p2".into()]
        } else {
            vec![]
        };
        assert_eq!(stats.missing_grads, expect_missing, "step {s}");
        assert_eq!(stats.updated, 3 - expect_missing.len());
        assert_eq!(stats.step, s as u64 + 1);
        for (n, v) in NAMES.iter().zip(&vars) {
            let d = max_abs_diff(v.as_tensor(), &fx[&format!("expected.{s}.{n}")]);
            assert!(
                d <= 1e-6,
                "fused {fused} step {s} {n}: max |rust - torch| = {d:e}"
            );
        }
    }
}

fn bits(vars: &[Var]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

#[test]
fn save_load_continue_is_bit_identical() -> R {
    let fx = fixture("adamw.safetensors");
    let n = vec_f64(&fx["norms"]).len();
    // Uninterrupted run.
    let (vars_a, mut opt_a) = fresh(&fx);
    for s in 0..n {
        run_step(&fx, &vars_a, &mut opt_a, s);
    }
    // Interrupted after 3 steps (inside p2's skipped steps, so per-variable counts differ).
    let (vars_b, mut opt_b) = fresh(&fx);
    for s in 0..3 {
        run_step(&fx, &vars_b, &mut opt_b, s);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ck.safetensors");
    let mut tensors = opt_b.state_tensors()?;
    for (n, v) in NAMES.iter().zip(&vars_b) {
        tensors.insert(format!("model.{n}"), v.as_tensor().clone());
    }
    save_checkpoint(&path, &tensors, &HashMap::new())?;
    drop((vars_b, opt_b));

    let ck = load_checkpoint(&path, &Device::Cpu)?;
    let vars_c: Vec<Var> = NAMES
        .iter()
        .map(|n| Var::from_tensor(&ck.tensors[&format!("model.{n}")]).unwrap())
        .collect();
    let named = NAMES
        .iter()
        .zip(&vars_c)
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let mut opt_c = AdamW::new(named, fixture_config())?;
    opt_c.load_state(&ck.tensors)?;
    assert_eq!(opt_c.steps(), 3);
    for s in 3..n {
        run_step(&fx, &vars_c, &mut opt_c, s);
    }
    assert_eq!(bits(&vars_a), bits(&vars_c));
    let (sa, sc) = (opt_a.state_tensors()?, opt_c.state_tensors()?);
    assert_eq!(sa.len(), sc.len());
    for (k, a) in &sa {
        let c = &sc[k];
        assert_eq!(a.dtype(), c.dtype(), "{k}");
        match a.dtype() {
            DType::F32 => {
                let fa: Vec<u32> = a
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let fc: Vec<u32> = c
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert_eq!(fa, fc, "{k}");
            }
            _ => assert_eq!(
                a.flatten_all()?.to_vec1::<i64>()?,
                c.flatten_all()?.to_vec1::<i64>()?,
                "{k}"
            ),
        }
    }
    Ok(())
}

#[test]
fn load_state_rejects_mismatched_state() -> R {
    let fx = fixture("adamw.safetensors");
    let (_vars, opt) = fresh(&fx);
    let good = opt.state_tensors()?;

    let (_v2, mut other) = fresh(&fx);
    let mut missing = good.clone();
    missing.remove("optim.v.p1");
    let e = other.load_state(&missing).unwrap_err().to_string();
    assert!(e.contains("optim.v.p1"), "{e}");

    let mut wrong_shape = good.clone();
    wrong_shape.insert(
        "optim.m.p0".into(),
        Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?,
    );
    let e = other.load_state(&wrong_shape).unwrap_err().to_string();
    assert!(e.contains("optim.m.p0") && e.contains("[4, 3]"), "{e}");

    let mut extra = good.clone();
    extra.insert(
        "optim.m.gone".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu)?,
    );
    let e = other.load_state(&extra).unwrap_err().to_string();
    assert!(e.contains("optim.m.gone"), "{e}");

    // Non-optimiser entries (model weights) are ignored.
    let mut with_model = good;
    with_model.insert(
        "model.x".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu)?,
    );
    other.load_state(&with_model)?;
    Ok(())
}

#[test]
fn adamw_rejects_bad_input() {
    let v = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let dup = vec![("a".to_string(), v.clone()), ("a".to_string(), v.clone())];
    assert!(matches!(
        AdamW::new(dup, AdamWConfig::default()),
        Err(Error::InvalidArgument(_))
    ));
    let bad = AdamWConfig {
        beta2: 1.0,
        ..Default::default()
    };
    assert!(AdamW::new(vec![("a".into(), v.clone())], bad).is_err());
    let mut opt = AdamW::new(vec![("a".into(), v.clone())], AdamWConfig::default()).unwrap();
    assert!(opt.step(&GradStore::default(), f64::NAN).is_err());
    let mut g = GradStore::default();
    assert!(clip_grad_norm(&mut g, &[&v], 0.0).is_err());
}

#[test]
fn clip_leaves_small_and_non_finite_grads_alone() -> R {
    let dev = Device::Cpu;
    let v = Var::zeros(2, DType::F32, &dev)?;
    let mut g = GradStore::default();
    g.insert(v.as_tensor(), Tensor::new(&[3f32, 4.0], &dev)?);
    // Hand-computed: norm 5, max 10 -> unchanged.
    assert_eq!(clip_grad_norm(&mut g, &[&v], 10.0)?, 5.0);
    assert_eq!(
        g.get(v.as_tensor()).unwrap().to_vec1::<f32>()?,
        vec![3.0, 4.0]
    );
    // max 1 -> scaled by 1 / (5 + 1e-6).
    clip_grad_norm(&mut g, &[&v], 1.0)?;
    let c = g.get(v.as_tensor()).unwrap().to_vec1::<f32>()?;
    assert!(
        (c[0] - 0.6).abs() < 1e-6 && (c[1] - 0.8).abs() < 1e-6,
        "{c:?}"
    );
    g.insert(v.as_tensor(), Tensor::new(&[f32::NAN, 1.0], &dev)?);
    assert!(clip_grad_norm(&mut g, &[&v], 1.0)?.is_nan());
    assert_eq!(g.get(v.as_tensor()).unwrap().to_vec1::<f32>()?[1], 1.0);
    Ok(())
}

#[test]
fn warmup_cosine_hand_computed() -> R {
    let s = WarmupCosine::new(1.0, 4, 12, 0.1)?;
    let expected = [
        (0, 0.0),
        (1, 0.25),
        (2, 0.5),
        (4, 1.0),
        // p = 2/8: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
        (6, 0.1 + 0.45 * (1.0 + std::f64::consts::FRAC_1_SQRT_2)),
        (8, 0.55),
        (12, 0.1),
        (1000, 0.1),
    ];
    for (step, lr) in expected {
        assert!(
            (s.lr_at(step) - lr).abs() < 1e-12,
            "step {step}: {} vs {lr}",
            s.lr_at(step)
        );
    }
    let f = WarmupCosine {
        warmup_start_factor: 0.2,
        ..s
    };
    assert!((f.lr_at(0) - 0.2).abs() < 1e-12);
    assert!((f.lr_at(2) - 0.6).abs() < 1e-12);
    let no_warmup = WarmupCosine::new(2.0, 0, 10, 0.0)?;
    assert_eq!(no_warmup.lr_at(0), 2.0);
    assert!((no_warmup.lr_at(5) - 1.0).abs() < 1e-12);
    assert!(WarmupCosine::new(1.0, 5, 4, 0.0).is_err());
    assert!(WarmupCosine::new(1.0, 0, 4, 2.0).is_err());
    Ok(())
}

type LossFn = fn(&Tensor, &Tensor) -> tgc_train::Result<Tensor>;

fn loss_cases() -> [(&'static str, LossFn); 4] {
    [
        ("bce", bce_with_logits),
        ("dice", |x, t| soft_dice_loss(x, t, 1.0)),
        ("dice_bce", |x, t| dice_bce(x, t, 0.5, 0.5)),
        ("lvit", lvit_weighted_dice_bce),
    ]
}

#[test]
fn losses_match_pytorch_values_and_grads() -> R {
    let fx = fixture("losses.safetensors");
    let (x, t) = (&fx["logits"], &fx["target"]);
    let cases = loss_cases();
    for (name, f) in cases {
        // f64: tight. f32: loose (single precision).
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-6)] {
            let v = Var::from_tensor(&x.to_dtype(dtype)?)?;
            let loss = f(v.as_tensor(), &t.to_dtype(dtype)?)?;
            assert_eq!(loss.rank(), 0);
            let val = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let want = vec_f64(&fx[&format!("{name}.value")])[0];
            assert!(
                (val - want).abs() <= tol,
                "{name} {dtype:?}: {val} vs torch {want}"
            );
            let g = loss.backward()?;
            let g = g.get(v.as_tensor()).expect("gradient");
            let d = max_abs_diff(g, &fx[&format!("{name}.grad")]);
            assert!(d <= tol, "{name} {dtype:?} grad: max diff {d:e}");
        }
    }
    // The config enum dispatches to the same functions.
    let want = vec_f64(&fx["dice_bce.value"])[0];
    let got = SegLoss::default().compute(x, t)?.to_scalar::<f64>()?;
    assert!((got - want).abs() < 1e-12);
    let want = vec_f64(&fx["lvit.value"])[0];
    let got = SegLoss::LvitWeightedDiceBce
        .compute(x, t)?
        .to_scalar::<f64>()?;
    assert!((got - want).abs() < 1e-12);
    Ok(())
}

#[test]
fn losses_hand_computed() -> R {
    let dev = Device::Cpu;
    let zeros = Tensor::zeros((1, 1, 2, 2), DType::F64, &dev)?;
    let t = Tensor::new(&[1f64, 0., 0., 0.], &dev)?.reshape((1, 1, 2, 2))?;
    // x = 0: every pixel costs ln 2.
    let bce = bce_with_logits(&zeros, &t)?.to_scalar::<f64>()?;
    assert!((bce - std::f64::consts::LN_2).abs() < 1e-15);
    // p = 0.5 everywhere: (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5.
    let dice = soft_dice_loss(&zeros, &t, 1.0)?.to_scalar::<f64>()?;
    assert!((dice - 0.5).abs() < 1e-15);
    let both = dice_bce(&zeros, &t, 0.5, 0.5)?.to_scalar::<f64>()?;
    assert!((both - 0.5 * (std::f64::consts::LN_2 + 0.5)).abs() < 1e-15);
    // Saturated logits stay finite and exact: the wrong side costs |x|.
    let x = Tensor::new(&[100f32, -100., 100., -100.], &dev)?.reshape((1, 1, 2, 2))?;
    let t = Tensor::new(&[0f32, 1., 1., 0.], &dev)?.reshape((1, 1, 2, 2))?;
    let bce = bce_with_logits(&x, &t)?.to_scalar::<f32>()?;
    assert!((bce - 50.0).abs() < 1e-4, "{bce}");
    // Shape mismatch is an error, not a broadcast.
    assert!(bce_with_logits(&x, &t.reshape((1, 1, 4, 1))?).is_err());
    Ok(())
}

#[test]
fn loss_gradients_match_finite_differences() -> R {
    let dev = Device::Cpu;
    // Includes exact zeros (the relu/abs kink) and an all-background prompt.
    let xs: Vec<f64> = (0..24)
        .map(|i| {
            if i % 7 == 0 {
                0.0
            } else {
                ((i * 37 % 11) as f64 - 5.0) * 0.7
            }
        })
        .collect();
    let ts: Vec<f64> = (0..24)
        .map(|i| {
            if i >= 12 {
                0.0
            } else {
                ((i * 5 % 3) == 0) as u8 as f64
            }
        })
        .collect();
    let shape = (2, 2, 2, 3);
    let t = Tensor::from_vec(ts, shape, &dev)?;
    let fs = loss_cases();
    for (name, f) in fs {
        let v = Var::from_tensor(&Tensor::from_vec(xs.clone(), shape, &dev)?)?;
        let g = f(v.as_tensor(), &t)?.backward()?;
        let g = vec_f64(g.get(v.as_tensor()).unwrap());
        let h = 1e-5;
        for i in 0..xs.len() {
            let eval = |d: f64| {
                let mut y = xs.clone();
                y[i] += d;
                f(&Tensor::from_vec(y, shape, &dev).unwrap(), &t)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-8 + 1e-6 * fd.abs(),
                "{name} d/dx[{i}] (x = {}): autograd {} vs finite difference {fd}",
                xs[i],
                g[i]
            );
        }
    }
    Ok(())
}

#[test]
fn state_snapshot_does_not_change_with_later_steps() -> R {
    // The fused kernel updates moments in place: snapshots must be copies.
    let fx = fixture("adamw.safetensors");
    let (vars, mut opt) = fresh(&fx);
    run_step(&fx, &vars, &mut opt, 0);
    let snap = opt.state_tensors()?;
    let before = vec_f64(&snap["optim.m.p0"]);
    let loaded_src = snap.clone();
    let (vars2, mut opt2) = fresh(&fx);
    opt2.load_state(&loaded_src)?;
    run_step(&fx, &vars, &mut opt, 1);
    run_step(&fx, &vars2, &mut opt2, 1);
    assert_eq!(vec_f64(&snap["optim.m.p0"]), before);
    assert_eq!(vec_f64(&loaded_src["optim.m.p0"]), before);
    assert_ne!(vec_f64(&opt.state_tensors()?["optim.m.p0"]), before);
    Ok(())
}

#[test]
fn early_stopping_hand_computed() -> R {
    use tgc_train::{EarlyStopping, Verdict};
    let mut es = EarlyStopping::new(2, 0.01)?;
    assert_eq!(es.update(1, 0.5), Verdict::Improved);
    assert_eq!(es.update(2, 0.6), Verdict::Improved);
    assert_eq!(es.update(3, 0.6), Verdict::NoImprovement(1));
    // Resume from the serialised state mid-way.
    let mut es = EarlyStopping::from_json(&es.to_json())?;
    // 0.605 < 0.6 + 0.01: not an improvement -> second bad epoch -> stop.
    assert_eq!(es.update(4, 0.605), Verdict::Stop);
    assert_eq!((es.best, es.best_epoch), (Some(0.6), Some(2)));
    let mut never = EarlyStopping::new(0, 0.0)?;
    never.update(1, 0.9);
    for e in 2..10 {
        assert_eq!(
            never.update(e, f64::NAN),
            Verdict::NoImprovement(e as u32 - 1)
        );
    }
    assert!(EarlyStopping::new(1, -1.0).is_err());
    Ok(())
}

/// The fused `weighted_dice_bce` against the composition of `bce_with_logits` and
/// `soft_dice_loss` (whose values and gradients the tests above check against PyTorch):
/// value and gradient, f32 and f64, several weights and smoothing terms, a prompt with an
/// empty target, soft targets, an upstream gradient other than 1, and a non-contiguous
/// input.
#[test]
fn fused_dice_bce_matches_the_composed_losses() -> R {
    let dev = Device::Cpu;
    let shape = (3, 2, 17, 19);
    let x64 = (Tensor::randn(0f64, 3.0, shape, &dev)? - 1.0)?;
    let hard = Tensor::rand(0f64, 1.0, shape, &dev)?
        .gt(0.7)?
        .to_dtype(DType::F64)?;
    // Prompt (0, 1) has an empty mask.
    let empty = Tensor::zeros((1, 1, 17, 19), DType::F64, &dev)?;
    let hard = hard.slice_assign(&[0..1, 1..2, 0..17, 0..19], &empty)?;
    let soft = Tensor::rand(0f64, 1.0, shape, &dev)?;
    for target in [&hard, &soft] {
        for (w_bce, w_dice, smooth) in [(0.5, 0.5, 1.0), (0.3, 0.7, 1e-5), (1.0, 0.0, 1.0)] {
            // (dtype, value tolerance, gradient tolerance): per-pixel gradients are
            // O(1 / pixels), so they are compared at that scale.
            for (dtype, tol, gtol) in [(DType::F64, 1e-12, 1e-14), (DType::F32, 2e-5, 2e-8)] {
                let t = target.to_dtype(dtype)?;
                let vf = Var::from_tensor(&x64.to_dtype(dtype)?)?;
                let vc = Var::from_tensor(&x64.to_dtype(dtype)?)?;
                let fused = (weighted_dice_bce(vf.as_tensor(), &t, w_bce, w_dice, smooth)? * 3.0)?;
                let composed = ((bce_with_logits(vc.as_tensor(), &t)? * w_bce)?
                    + (soft_dice_loss(vc.as_tensor(), &t, smooth)? * w_dice)?)?;
                let composed = (composed * 3.0)?;
                assert_eq!(fused.rank(), 0);
                let (a, b) = (
                    fused.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    composed.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                );
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "{dtype:?} w ({w_bce}, {w_dice}) smooth {smooth}: fused {a} vs composed {b}"
                );
                let gf = fused.backward()?;
                let gc = composed.backward()?;
                let d = max_abs_diff(
                    gf.get(vf.as_tensor()).expect("fused gradient"),
                    gc.get(vc.as_tensor()).expect("composed gradient"),
                );
                assert!(
                    d <= gtol,
                    "{dtype:?} w ({w_bce}, {w_dice}) smooth {smooth}: gradients differ by {d:e}"
                );
            }
        }
    }
    // A transposed view gives what its contiguous copy gives.
    let xt = x64.transpose(2, 3)?;
    let tt = soft.transpose(2, 3)?;
    assert!(!xt.is_contiguous());
    let a = dice_bce(&xt, &tt, 0.5, 0.5)?.to_scalar::<f64>()?;
    let b = dice_bce(&xt.contiguous()?, &tt.contiguous()?, 0.5, 0.5)?.to_scalar::<f64>()?;
    assert_eq!(a, b);
    // Bad smoothing and mismatched shapes are errors.
    assert!(weighted_dice_bce(&x64, &soft, 0.5, 0.5, -1.0).is_err());
    assert!(weighted_dice_bce(&x64, &soft.narrow(3, 0, 18)?, 0.5, 0.5, 1.0).is_err());
    Ok(())
}
