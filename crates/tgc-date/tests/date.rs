//! DATE against independent oracles: a plain-loop f64 re-implementation of the forward pass
//! from the raw VarMap tensors (explicit per-head softmax attention), padding invariance,
//! central finite differences in f64, gradient flow to every parameter, and a
//! hand-computed parameter count.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tgc_date::{Date, DateConfig, Error, TextFusion};
use tgc_nn::reference::{layer_norm, mha, param, randomise, Rows};

/// DATE from the paper's equations, one prompt pair at a time.
fn oracle(
    vm: &VarMap,
    cfg: &DateConfig,
    primary: &Tensor,
    pmask: &Tensor,
    aux: &Tensor,
) -> Vec<Rows> {
    let primary = primary
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let aux = aux.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
    let pmask = pmask
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    (0..primary.len())
        .map(|n| {
            let inf = mha(
                vm,
                "date.cross_attn",
                &aux[n],
                &primary[n],
                &pmask[n],
                cfg.heads,
            );
            let res: Rows = primary[n]
                .iter()
                .zip(&inf)
                .map(|(p, f)| p.iter().zip(f).map(|(a, b)| a + b).collect())
                .collect();
            layer_norm(
                &res,
                &param(vm, "date.norm.weight"),
                &param(vm, "date.norm.bias"),
                cfg.eps,
            )
        })
        .collect()
}

fn max_diff(a: &[Rows], b: &[Rows]) -> f64 {
    let mut m = 0f64;
    for (x, y) in a.iter().zip(b) {
        for (r, s) in x.iter().zip(y) {
            for (u, v) in r.iter().zip(s) {
                m = m.max((u - v).abs());
            }
        }
    }
    m
}

fn small_cfg() -> DateConfig {
    DateConfig {
        text_dim: 12,
        heads: 3,
        dropout: 0.1,
        eps: 1e-5,
    }
}

fn build(cfg: &DateConfig, dtype: DType) -> Result<(VarMap, Date)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let date = Date::new(cfg, vb.pp("date")).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    randomise(&vm)?;
    Ok((vm, date))
}

/// Masks with different amounts of padding per row (5, 3 and 6 valid tokens out of 6).
fn masks(dev: &Device) -> Result<(Tensor, Tensor)> {
    let pm = Tensor::new(
        &[
            [1f64, 1., 1., 1., 1., 0.],
            [1., 1., 1., 0., 0., 0.],
            [1., 1., 1., 1., 1., 1.],
        ],
        dev,
    )?;
    let am = Tensor::new(
        &[
            [1f64, 1., 1., 0., 0., 0.],
            [1., 1., 1., 1., 1., 1.],
            [1., 1., 1., 1., 0., 0.],
        ],
        dev,
    )?;
    Ok((pm, am))
}

#[test]
fn forward_matches_f64_oracle() -> anyhow_free::R {
    let dev = Device::Cpu;
    let cfg = small_cfg();
    let (vm, date) = build(&cfg, DType::F64)?;
    let (pm, am) = masks(&dev)?;
    let primary = Tensor::randn(0f64, 1.0, (3, 6, 12), &dev)?;
    let aux = Tensor::randn(0f64, 1.0, (3, 6, 12), &dev)?;
    let (f_t, mask) = date.forward(&primary, &pm, &aux, &am, false)?;
    let got = f_t.to_vec3::<f64>()?;
    let want = oracle(&vm, &cfg, &primary, &pm, &aux);
    let err = max_diff(&got, &want);
    println!("DATE vs f64 oracle: max |diff| = {err:.3e}");
    assert!(err < 1e-9, "DATE differs from the oracle by {err}");
    // The output mask is the primary mask.
    assert_eq!(mask.to_vec2::<f64>()?, pm.to_vec2::<f64>()?);
    Ok(())
}

#[test]
fn primary_padding_content_does_not_leak() -> anyhow_free::R {
    let dev = Device::Cpu;
    let cfg = small_cfg();
    let (_vm, date) = build(&cfg, DType::F64)?;
    let (pm, am) = masks(&dev)?;
    let primary = Tensor::randn(0f64, 1.0, (3, 6, 12), &dev)?;
    let aux = Tensor::randn(0f64, 1.0, (3, 6, 12), &dev)?;
    // New random content (large) at the primary's padded positions only.
    let noise = (Tensor::randn(0f64, 10.0, (3, 6, 12), &dev)?
        .broadcast_mul(&pm.affine(-1.0, 1.0)?.unsqueeze(2)?))?;
    let primary2 = (&primary + noise)?;
    let (a, _) = date.forward(&primary, &pm, &aux, &am, false)?;
    let (b, _) = date.forward(&primary2, &pm, &aux, &am, false)?;
    let (a, b) = (a.to_vec3::<f64>()?, b.to_vec3::<f64>()?);
    let pmv = pm.to_vec2::<f64>()?;
    let mut changed_padding = false;
    for n in 0..3 {
        for l in 0..6 {
            let d = a[n][l]
                .iter()
                .zip(&b[n][l])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            if pmv[n][l] > 0.5 {
                assert!(d < 1e-12, "valid row ({n},{l}) changed by {d}");
            } else if d > 1e-3 {
                // Padded rows carry their own (padding) residual: they may change.
                changed_padding = true;
            }
        }
    }
    assert!(
        changed_padding,
        "the noise did not reach the padded rows at all"
    );
    Ok(())
}

#[test]
fn masking_a_key_changes_the_output() -> anyhow_free::R {
    // Guard against a mask that is silently ignored: dropping one valid key must change
    // every valid row, and agree with the oracle given the same mask.
    let dev = Device::Cpu;
    let cfg = small_cfg();
    let (vm, date) = build(&cfg, DType::F64)?;
    let primary = Tensor::randn(0f64, 1.0, (1, 4, 12), &dev)?;
    let aux = Tensor::randn(0f64, 1.0, (1, 4, 12), &dev)?;
    let full = Tensor::ones((1, 4), DType::F64, &dev)?;
    let part = Tensor::new(&[[1f64, 1., 0., 1.]], &dev)?;
    let (a, _) = date.forward(&primary, &full, &aux, &full, false)?;
    let (b, _) = date.forward(&primary, &part, &aux, &full, false)?;
    let diff = (&a - &b)?
        .abs()?
        .max_keepdim(2)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert!(
        diff.iter().all(|d| *d > 1e-6),
        "mask had no effect: {diff:?}"
    );
    let want = oracle(&vm, &cfg, &primary, &part, &aux);
    assert!(max_diff(&b.to_vec3::<f64>()?, &want) < 1e-9);
    Ok(())
}

#[test]
fn dropout_only_in_training() -> anyhow_free::R {
    let dev = Device::Cpu;
    let mut cfg = small_cfg();
    cfg.dropout = 0.5;
    let (_vm, date) = build(&cfg, DType::F64)?;
    let (pm, am) = masks(&dev)?;
    let primary = Tensor::randn(0f64, 1.0, (3, 6, 12), &dev)?;
    let aux = Tensor::randn(0f64, 1.0, (3, 6, 12), &dev)?;
    let (e1, _) = date.forward(&primary, &pm, &aux, &am, false)?;
    let (e2, _) = date.forward(&primary, &pm, &aux, &am, false)?;
    let (t1, _) = date.forward(&primary, &pm, &aux, &am, true)?;
    let same = (&e1 - &e2)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let drop = (&e1 - &t1)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    assert_eq!(same, 0.0, "evaluation must be deterministic");
    assert!(drop > 1e-3, "dropout 0.5 in training changed nothing");

    // With dropout 0, training and evaluation agree.
    cfg.dropout = 0.0;
    let vm = VarMap::new();
    let date0 = Date::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev))?;
    let (a, _) = date0.forward(&primary, &pm, &aux, &am, true)?;
    let (b, _) = date0.forward(&primary, &pm, &aux, &am, false)?;
    assert_eq!(
        (&a - &b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?,
        0.0
    );
    Ok(())
}

#[test]
fn gradients_reach_every_parameter_and_both_inputs() -> anyhow_free::R {
    let dev = Device::Cpu;
    let cfg = DateConfig {
        text_dim: 32,
        heads: 4,
        ..DateConfig::default()
    };
    let (vm, date) = build(&cfg, DType::F32)?;
    let (pm, am) = masks(&dev)?;
    let (pm, am) = (pm.to_dtype(DType::F32)?, am.to_dtype(DType::F32)?);
    let primary = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 6, 32), &dev)?)?;
    let aux = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 6, 32), &dev)?)?;
    // Through the trait object, in training mode (dropout on), as the model crate will.
    let fusion: Box<dyn TextFusion> = Box::new(date);
    let (f_t, _) = fusion.fuse(&primary, &pm, &aux, &am, true)?;
    // A non-symmetric scalar loss so that LN's bias/weight and every branch matter.
    let r = Tensor::randn(0f32, 1.0, f_t.shape(), &dev)?;
    let loss = (f_t * r)?.sum_all()?;
    let grads = loss.backward()?;
    let data = vm.data().lock().unwrap();
    assert_eq!(data.len(), 10, "expected 4 projections x 2 + norm x 2 vars");
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        assert!(
            g.iter().all(|v| v.is_finite()),
            "non-finite gradient in `{name}`"
        );
        let norm = g.iter().map(|v| v.abs()).fold(0f32, f32::max);
        if name.ends_with("k_proj.bias") {
            // q·(k_j + b) = q·k_j + q·b is constant across keys j: softmax cancels it, so
            // this gradient is zero in exact arithmetic (PyTorch's too).
            assert!(
                norm < 1e-4,
                "k_proj.bias gradient should vanish, got {norm}"
            );
        } else {
            assert!(norm > 0.0, "zero gradient for `{name}`");
        }
    }
    for (name, x) in [("primary", &primary), ("aux", &aux)] {
        let g = grads
            .get(x.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for input `{name}`"));
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        assert!(g.iter().all(|v| v.is_finite()));
        assert!(
            g.iter().any(|v| *v != 0.0),
            "zero gradient for input `{name}`"
        );
    }
    Ok(())
}

/// Central finite differences of `loss(x)` against autograd, f64; returns the worst
/// absolute difference and the largest gradient magnitude.
fn gradcheck(x: &Var, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<(f64, f64)> {
    let grads = f(x.as_tensor())?.backward()?;
    let g = grads
        .get(x.as_tensor())
        .expect("no gradient reached the checked tensor")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    let (mut worst, mut scale) = (0f64, 0f64);
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += eps;
        let lp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device())?)?.to_scalar::<f64>()?;
        p[i] -= 2.0 * eps;
        let lm = f(&Tensor::from_vec(p, x.shape(), x.device())?)?.to_scalar::<f64>()?;
        worst = worst.max(((lp - lm) / (2.0 * eps) - g[i]).abs());
        scale = scale.max(g[i].abs());
    }
    Ok((worst, scale))
}

#[test]
fn gradcheck_aux_input_f64() -> anyhow_free::R {
    let dev = Device::Cpu;
    let cfg = DateConfig {
        text_dim: 6,
        heads: 2,
        dropout: 0.0,
        eps: 1e-5,
    };
    let (_vm, date) = build(&cfg, DType::F64)?;
    let pm = Tensor::new(&[[1f64, 1., 1., 0.], [1., 1., 0., 0.]], &dev)?;
    let am = Tensor::ones((2, 4), DType::F64, &dev)?;
    let primary = Tensor::randn(0f64, 1.0, (2, 4, 6), &dev)?;
    let aux = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 4, 6), &dev)?)?;
    let r = Tensor::randn(0f64, 1.0, (2, 4, 6), &dev)?;
    let f = |a: &Tensor| -> Result<Tensor> {
        let (y, _) = date
            .forward(&primary, &pm, a, &am, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        (y * &r)?.sum_all()
    };
    let (worst, scale) = gradcheck(&aux, &f)?;
    println!("DATE d loss / d aux: max |fd - autograd| = {worst:.3e} (max |grad| {scale:.3e})");
    assert!(scale > 1e-3, "gradient w.r.t. aux is degenerate");
    assert!(worst < 1e-7, "finite differences disagree by {worst}");
    Ok(())
}

#[test]
fn parameter_count_of_the_paper_config() -> anyhow_free::R {
    let cfg = DateConfig::default();
    let vm = VarMap::new();
    Date::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let counted: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    // By hand: q, k, v, out projections 768x768 + 768 bias each; LayerNorm 768 + 768.
    let by_hand = 4 * (768 * 768 + 768) + (768 + 768);
    println!("DATE parameters (paper config, D_t = 768): {counted}");
    assert_eq!(counted, by_hand);
    assert_eq!(counted, 2_363_904);
    assert_eq!(cfg.num_params(), counted);
    Ok(())
}

#[test]
fn rejects_bad_shapes_with_named_errors() -> anyhow_free::R {
    let dev = Device::Cpu;
    let cfg = small_cfg();
    let (_vm, date) = build(&cfg, DType::F32)?;
    let p = Tensor::zeros((2, 5, 12), DType::F32, &dev)?;
    let m = Tensor::ones((2, 5), DType::F32, &dev)?;
    let short = Tensor::zeros((2, 4, 12), DType::F32, &dev)?;
    let narrow = Tensor::zeros((2, 5, 8), DType::F32, &dev)?;
    let bad_mask = Tensor::ones((2, 4), DType::F32, &dev)?;
    let expect = |r: tgc_date::Result<(Tensor, Tensor)>, tensor: &str| match r {
        Err(Error::Shape { tensor: t, message }) => {
            assert_eq!(t, tensor, "wrong tensor named: {message}");
        }
        other => panic!("expected a shape error on `{tensor}`, got {other:?}"),
    };
    expect(date.forward(&p, &m, &short, &m, false), "aux");
    expect(date.forward(&narrow, &m, &p, &m, false), "primary");
    expect(date.forward(&p, &bad_mask, &p, &m, false), "primary_mask");
    expect(date.forward(&p, &m, &p, &bad_mask, false), "aux_mask");
    let msg = date
        .forward(&p, &m, &short, &m, false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("same length"), "unhelpful message: {msg}");
    // Heads must divide the width.
    let vm = VarMap::new();
    let bad = DateConfig {
        heads: 5,
        ..small_cfg()
    };
    assert!(matches!(
        Date::new(&bad, VarBuilder::from_varmap(&vm, DType::F32, &dev)),
        Err(Error::Config(_))
    ));
    Ok(())
}

#[test]
fn config_defaults_and_serde() -> anyhow_free::R {
    let cfg = DateConfig::default();
    assert_eq!((cfg.text_dim, cfg.heads), (768, 8));
    assert_eq!(cfg.dropout, 0.1);
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<DateConfig>(&json).unwrap(), cfg);
    // Missing fields take the paper's defaults.
    let partial: DateConfig = serde_json::from_str(r#"{"text_dim": 512}"#).unwrap();
    assert_eq!(partial.text_dim, 512);
    assert_eq!(partial.heads, 8);
    Ok(())
}

/// Test result type accepting both crate and candle errors via `?`.
mod anyhow_free {
    pub type R = std::result::Result<(), Box<dyn std::error::Error>>;
}

#[test]
fn matches_pytorch_fixture() -> anyhow_free::R {
    // Reference: torch.nn.MultiheadAttention + nn.LayerNorm in float64, written by
    // tests/fixtures/make_date_torch.py (see its header to regenerate).
    let dev = Device::Cpu;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/date_torch.safetensors"
    );
    let fx = candle_core::safetensors::load(path, &dev)?;
    let dims = fx["meta.dims"].to_vec1::<i64>()?;
    let (n, l, dt, heads) = (
        dims[0] as usize,
        dims[1] as usize,
        dims[2] as usize,
        dims[3] as usize,
    );
    let cfg = DateConfig {
        text_dim: dt,
        heads,
        ..DateConfig::default()
    };
    let vm = VarMap::new();
    let date = Date::new(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F64, &dev).pp("date"),
    )?;
    let data = vm.data().lock().unwrap();
    let n_params = fx.keys().filter(|k| k.starts_with("param.")).count();
    assert_eq!(
        data.len(),
        n_params,
        "fixture and module disagree on the parameter set"
    );
    for (name, var) in data.iter() {
        let t = fx
            .get(&format!("param.{name}"))
            .unwrap_or_else(|| panic!("fixture lacks `{name}`"));
        var.set(t)?;
    }
    drop(data);
    let primary = &fx["input.primary"];
    assert_eq!(primary.dims(), &[n, l, dt]);
    let (f_t, _) = date.forward(
        primary,
        &fx["input.primary_mask"],
        &fx["input.aux"],
        &fx["input.aux_mask"],
        false,
    )?;
    let err = (f_t - &fx["out.f_t"])?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    println!("DATE vs PyTorch (float64): max |diff| = {err:.3e}");
    assert!(err < 1e-10, "DATE differs from PyTorch by {err}");
    Ok(())
}
