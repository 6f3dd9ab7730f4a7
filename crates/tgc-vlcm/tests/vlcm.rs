//! VLCM against independent oracles: a plain-loop f64 re-implementation of every variant
//! from the raw VarMap tensors (explicit per-head softmax attention, explicit
//! concatenation for the gates), padding invariance, central finite differences in f64,
//! gradient flow to every parameter and both inputs, and hand-computed parameter counts.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tgc_nn::reference::{layer_norm, linear, mha, param, randomise, Rows};
use tgc_vlcm::{Calibrator, Error, Vlcm, VlcmConfig, VlcmVariant};

type R = std::result::Result<(), Box<dyn std::error::Error>>;

fn add(a: &Rows, b: &Rows) -> Rows {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(u, v)| u + v).collect())
        .collect()
}

/// `LN(x + MHA(Q=x, K=V=ctx))` of branch `prefix`.
fn branch(vm: &VarMap, prefix: &str, x: &Rows, ctx: &Rows, mask: &[f64], cfg: &VlcmConfig) -> Rows {
    let att = mha(vm, &format!("{prefix}.attn"), x, ctx, mask, cfg.heads);
    layer_norm(
        &add(x, &att),
        &param(vm, &format!("{prefix}.norm.weight")),
        &param(vm, &format!("{prefix}.norm.bias")),
        cfg.eps,
    )
}

/// Gate `sigmoid(W [x_n ; s] + b)` with an explicit concatenation per token.
fn gate(vm: &VarMap, prefix: &str, x: &Rows, s: &[f64]) -> Rows {
    let cat: Rows = x
        .iter()
        .map(|row| row.iter().chain(s).cloned().collect())
        .collect();
    let z = linear(
        &cat,
        &param(vm, &format!("{prefix}.weight")),
        &param(vm, &format!("{prefix}.bias")),
    );
    z.iter()
        .map(|r| r.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect())
        .collect()
}

fn mul(a: &Rows, b: &Rows) -> Rows {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(u, v)| u * v).collect())
        .collect()
}

/// VLCM from DESIGN.md's equations, one (image, prompt) pair at a time; `vision` is
/// `B x D x N`.
/// Returns per pair (F'_V as N x D rows with n = y*w + x, F'_T as L x D rows).
fn oracle(
    vm: &VarMap,
    cfg: &VlcmConfig,
    vision: &Tensor,
    text: &Tensor,
    mask: &Tensor,
    k: usize,
) -> Vec<(Rows, Rows)> {
    // `vision` is passed flattened, B x D x N with n = y*w + x.
    let vision = vision
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let d = cfg.d_model;
    let text = text.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
    let mask = mask.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let p = |n: &str| param(vm, n);
    (0..text.len())
        .map(|r| {
            let img = r / k;
            let n_tok = vision[img][0].len();
            let v: Rows = (0..n_tok)
                .map(|n| (0..d).map(|c| vision[img][c][n]).collect())
                .collect();
            let t = linear(
                &text[r],
                &p("vlcm.text_proj.weight"),
                &p("vlcm.text_proj.bias"),
            );
            let m = &mask[r];
            match cfg.variant {
                VlcmVariant::Identity => (v, t),
                VlcmVariant::SingleCrossAttn => {
                    (branch(vm, "vlcm.vision_branch", &v, &t, m, cfg), t)
                }
                VlcmVariant::BiCrossAttn => {
                    let ones = vec![1.0; v.len()];
                    (
                        branch(vm, "vlcm.vision_branch", &v, &t, m, cfg),
                        branch(vm, "vlcm.text_branch", &t, &v, &ones, cfg),
                    )
                }
                VlcmVariant::Gated => {
                    let v_sum: Vec<f64> = (0..d)
                        .map(|c| v.iter().map(|row| row[c]).sum::<f64>() / v.len() as f64)
                        .collect();
                    let cnt: f64 = m.iter().sum();
                    let t_sum: Vec<f64> = (0..d)
                        .map(|c| t.iter().zip(m).map(|(row, mm)| row[c] * mm).sum::<f64>() / cnt)
                        .collect();
                    let g_v = gate(vm, "vlcm.gate_v", &v, &t_sum);
                    let g_t = gate(vm, "vlcm.gate_t", &t, &v_sum);
                    let mut ctx = mul(&g_v, &v);
                    ctx.extend(mul(&g_t, &t));
                    let mut cm = vec![1.0; v.len()];
                    cm.extend(m.iter().cloned());
                    (
                        branch(vm, "vlcm.vision_branch", &v, &ctx, &cm, cfg),
                        branch(vm, "vlcm.text_branch", &t, &ctx, &cm, cfg),
                    )
                }
            }
        })
        .collect()
}

// Test geometry: B = 2 images, K = 2 prompts each, D = 8, h x w = 3 x 2, L = 5, D_t = 10.
const B: usize = 2;
const K: usize = 2;
const DM: usize = 8;
const H: usize = 3;
const W: usize = 2;
const L: usize = 5;
const DT: usize = 10;

fn cfg(variant: VlcmVariant) -> VlcmConfig {
    VlcmConfig {
        d_model: DM,
        text_dim: DT,
        heads: 2,
        variant,
        eps: 1e-5,
    }
}

fn build(cfg: &VlcmConfig, dtype: DType) -> Result<(VarMap, Vlcm)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let vlcm = Vlcm::new(cfg, vb.pp("vlcm")).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    randomise(&vm)?;
    Ok((vm, vlcm))
}

/// Text masks with 4, 2, 5 and 3 valid tokens.
fn text_mask(dev: &Device) -> Result<Tensor> {
    Tensor::new(
        &[
            [1f64, 1., 1., 1., 0.],
            [1., 1., 0., 0., 0.],
            [1., 1., 1., 1., 1.],
            [1., 1., 1., 0., 0.],
        ],
        dev,
    )
}

fn inputs(dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        Tensor::randn(0f64, 1.0, (B, DM, H, W), dev)?,
        Tensor::randn(0f64, 1.0, (B * K, L, DT), dev)?,
        text_mask(dev)?,
    ))
}

#[test]
fn every_variant_matches_f64_oracle() -> R {
    let dev = Device::Cpu;
    for variant in VlcmVariant::ALL {
        let c = cfg(variant);
        let (vm, vlcm) = build(&c, DType::F64)?;
        let (vision, text, mask) = inputs(&dev)?;
        let out = vlcm.forward(&vision, &text, &mask, K)?;
        assert_eq!(out.vision.dims(), &[B * K, DM, H, W]);
        assert_eq!(out.text.dims(), &[B * K, L, DM]);
        let want = oracle(&vm, &c, &vision.flatten_from(2)?, &text, &mask, K);
        let got_v = out.vision.flatten_from(2)?.to_vec3::<f64>()?; // BK x D x N
        let got_t = out.text.to_vec3::<f64>()?;
        let mut err = 0f64;
        for (r, (wv, wt)) in want.iter().enumerate() {
            for (n, row) in wv.iter().enumerate() {
                for (c, x) in row.iter().enumerate() {
                    err = err.max((got_v[r][c][n] - x).abs());
                }
            }
            for (l, row) in wt.iter().enumerate() {
                for (c, x) in row.iter().enumerate() {
                    err = err.max((got_t[r][l][c] - x).abs());
                }
            }
        }
        println!("VLCM {variant} vs f64 oracle: max |diff| = {err:.3e}");
        assert!(err < 1e-9, "{variant}: differs from the oracle by {err}");
        assert_eq!(out.text_mask.to_vec2::<f64>()?, mask.to_vec2::<f64>()?);
    }
    Ok(())
}

#[test]
fn padded_text_content_does_not_leak() -> R {
    let dev = Device::Cpu;
    for variant in VlcmVariant::ALL {
        let (_vm, vlcm) = build(&cfg(variant), DType::F64)?;
        let (vision, text, mask) = inputs(&dev)?;
        let noise = Tensor::randn(0f64, 10.0, text.shape(), &dev)?
            .broadcast_mul(&mask.affine(-1.0, 1.0)?.unsqueeze(2)?)?;
        let text2 = (&text + noise)?;
        let a = vlcm.forward(&vision, &text, &mask, K)?;
        let b = vlcm.forward(&vision, &text2, &mask, K)?;
        let dv = (&a.vision - &b.vision)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        assert!(dv < 1e-12, "{variant}: padding changed F'_V by {dv}");
        let (ta, tb) = (a.text.to_vec3::<f64>()?, b.text.to_vec3::<f64>()?);
        let m = mask.to_vec2::<f64>()?;
        let mut padded_changed = false;
        for r in 0..B * K {
            for l in 0..L {
                let d = ta[r][l]
                    .iter()
                    .zip(&tb[r][l])
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                if m[r][l] > 0.5 {
                    assert!(
                        d < 1e-12,
                        "{variant}: valid text row ({r},{l}) changed by {d}"
                    );
                } else if d > 1e-3 {
                    padded_changed = true;
                }
            }
        }
        assert!(
            padded_changed,
            "{variant}: the noise never reached the padded rows"
        );
    }
    Ok(())
}

#[test]
fn pairs_follow_image_major_order() -> R {
    // Row b*K + k must be image b with prompt k: swapping the two images must swap the
    // vision outputs block-wise (and leave the text outputs' pairing consistent).
    let dev = Device::Cpu;
    let (_vm, vlcm) = build(&cfg(VlcmVariant::Gated), DType::F64)?;
    let (vision, text, mask) = inputs(&dev)?;
    let swapped_v = Tensor::cat(&[vision.narrow(0, 1, 1)?, vision.narrow(0, 0, 1)?], 0)?;
    let swapped_t = Tensor::cat(&[text.narrow(0, K, K)?, text.narrow(0, 0, K)?], 0)?;
    let swapped_m = Tensor::cat(&[mask.narrow(0, K, K)?, mask.narrow(0, 0, K)?], 0)?;
    let a = vlcm.forward(&vision, &text, &mask, K)?;
    let b = vlcm.forward(&swapped_v, &swapped_t, &swapped_m, K)?;
    let back = Tensor::cat(&[b.vision.narrow(0, K, K)?, b.vision.narrow(0, 0, K)?], 0)?;
    let d = (&a.vision - back)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    assert!(d < 1e-12, "pairing is not image-major: {d}");
    Ok(())
}

#[test]
fn gradients_reach_every_parameter_and_both_inputs() -> R {
    let dev = Device::Cpu;
    for variant in VlcmVariant::ALL {
        let c = VlcmConfig {
            d_model: 16,
            text_dim: 24,
            heads: 4,
            variant,
            eps: 1e-5,
        };
        let (vm, vlcm) = build(&c, DType::F32)?;
        let vision = Var::from_tensor(&Tensor::randn(0f32, 1.0, (B, 16, H, W), &dev)?)?;
        let text = Var::from_tensor(&Tensor::randn(0f32, 1.0, (B * K, L, 24), &dev)?)?;
        let mask = text_mask(&dev)?.to_dtype(DType::F32)?;
        let cal: Box<dyn Calibrator> = Box::new(vlcm);
        let out = cal.calibrate(&vision, &text, &mask, K)?;
        // A non-symmetric scalar loss over both outputs.
        let rv = Tensor::randn(0f32, 1.0, out.vision.shape(), &dev)?;
        let rt = Tensor::randn(0f32, 1.0, out.text.shape(), &dev)?;
        let loss = ((out.vision * rv)?.sum_all()? + (out.text * rt)?.sum_all()?)?;
        let grads = loss.backward()?;
        let data = vm.data().lock().unwrap();
        let expected_vars = match variant {
            VlcmVariant::Gated => 2 + 4 + 2 * 10,
            VlcmVariant::BiCrossAttn => 2 + 2 * 10,
            VlcmVariant::SingleCrossAttn => 2 + 10,
            VlcmVariant::Identity => 2,
        };
        assert_eq!(
            data.len(),
            expected_vars,
            "{variant}: unexpected number of vars"
        );
        for (name, var) in data.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{variant}: no gradient for `{name}`"));
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{variant}: non-finite grad `{name}`"
            );
            let norm = g.iter().map(|v| v.abs()).fold(0f32, f32::max);
            if name.ends_with("k_proj.bias") {
                // q·(k_j + b) - q·k_j = q·b is the same for every key j, and softmax
                // cancels it: this gradient is zero in exact arithmetic (as in PyTorch).
                assert!(
                    norm < 1e-4,
                    "{variant}: k_proj.bias grad should vanish: {norm}"
                );
            } else {
                assert!(norm > 0.0, "{variant}: zero gradient for `{name}`");
            }
        }
        for (name, x) in [("vision", &vision), ("text", &text)] {
            let g = grads
                .get(x.as_tensor())
                .unwrap_or_else(|| panic!("{variant}: no gradient for input `{name}`"));
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            assert!(g.iter().all(|v| v.is_finite()));
            assert!(
                g.iter().any(|v| *v != 0.0),
                "{variant}: zero grad for `{name}`"
            );
        }
    }
    Ok(())
}

/// Worst |central FD - autograd| over all entries of `x`, where `set(x')` evaluates the loss
/// at a perturbed value; also returns the largest gradient magnitude.
fn fd_check(
    base: &Tensor,
    analytic: &Tensor,
    loss_at: &dyn Fn(&Tensor) -> Result<f64>,
) -> Result<(f64, f64)> {
    let g = analytic.flatten_all()?.to_vec1::<f64>()?;
    let x = base.flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    let (mut worst, mut scale) = (0f64, 0f64);
    for i in 0..x.len() {
        let mut p = x.clone();
        p[i] += eps;
        let lp = loss_at(&Tensor::from_vec(p.clone(), base.shape(), base.device())?)?;
        p[i] -= 2.0 * eps;
        let lm = loss_at(&Tensor::from_vec(p, base.shape(), base.device())?)?;
        worst = worst.max(((lp - lm) / (2.0 * eps) - g[i]).abs());
        scale = scale.max(g[i].abs());
    }
    Ok((worst, scale))
}

#[test]
fn gradcheck_gated_vision_input_and_gate_weight_f64() -> R {
    let dev = Device::Cpu;
    let c = VlcmConfig {
        d_model: 4,
        text_dim: 6,
        heads: 2,
        variant: VlcmVariant::Gated,
        eps: 1e-5,
    };
    let (vm, vlcm) = build(&c, DType::F64)?;
    let (b, k, l) = (2, 2, 3);
    let vision = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, 4, 2, 2), &dev)?)?;
    let text = Tensor::randn(0f64, 1.0, (b * k, l, 6), &dev)?;
    let mask = Tensor::new(
        &[[1f64, 1., 0.], [1., 1., 1.], [1., 0., 0.], [1., 1., 1.]],
        &dev,
    )?;
    let rv = Tensor::randn(0f64, 1.0, (b * k, 4, 2, 2), &dev)?;
    let rt = Tensor::randn(0f64, 1.0, (b * k, l, 4), &dev)?;
    let loss = |v: &Tensor| -> Result<Tensor> {
        let o = vlcm
            .forward(v, &text, &mask, k)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        (o.vision * &rv)?.sum_all()? + (o.text * &rt)?.sum_all()?
    };
    let grads = loss(vision.as_tensor())?.backward()?;
    let gate_w = vm
        .data()
        .lock()
        .unwrap()
        .get("vlcm.gate_v.weight")
        .unwrap()
        .clone();
    let g_vis = grads
        .get(vision.as_tensor())
        .expect("no grad for vision")
        .clone();
    let g_gate = grads
        .get(gate_w.as_tensor())
        .expect("no grad for gate_v")
        .clone();

    let (worst, scale) = fd_check(vision.as_tensor(), &g_vis, &|v: &Tensor| {
        loss(v)?.to_scalar::<f64>()
    })?;
    println!(
        "gated VLCM d loss / d vision: max |fd - autograd| = {worst:.3e} (max |g| {scale:.3e})"
    );
    assert!(
        scale > 1e-3 && worst < 1e-7,
        "vision gradcheck: {worst} (scale {scale})"
    );

    let original = gate_w.as_tensor().copy()?;
    let (worst, scale) = fd_check(&original, &g_gate, &|w: &Tensor| {
        gate_w.set(w)?;
        loss(vision.as_tensor())?.to_scalar::<f64>()
    })?;
    gate_w.set(&original)?;
    println!("gated VLCM d loss / d gate_v.weight: max |fd - autograd| = {worst:.3e} (max |g| {scale:.3e})");
    assert!(
        scale > 1e-3 && worst < 1e-7,
        "gate gradcheck: {worst} (scale {scale})"
    );
    Ok(())
}

#[test]
fn parameter_counts_of_the_paper_config() -> R {
    for variant in VlcmVariant::ALL {
        let c = VlcmConfig {
            variant,
            ..VlcmConfig::default()
        };
        let vm = VarMap::new();
        Vlcm::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        let counted: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
        // By hand, D = 256, D_t = 768:
        //   text projection 768*256 + 256 = 196,864
        //   one attention branch: q,k,v,out 256*256 + 256 each, LN 2*256 = 263,680
        //   one gate Linear(512 -> 256): 512*256 + 256 = 131,328
        let proj = 768 * 256 + 256;
        let branch = 4 * (256 * 256 + 256) + 2 * 256;
        let gate = 512 * 256 + 256;
        let by_hand = match variant {
            VlcmVariant::Gated => proj + 2 * gate + 2 * branch,
            VlcmVariant::BiCrossAttn => proj + 2 * branch,
            VlcmVariant::SingleCrossAttn => proj + branch,
            VlcmVariant::Identity => proj,
        };
        println!("VLCM {variant} parameters (paper config): {counted}");
        assert_eq!(counted, by_hand, "{variant}");
        assert_eq!(c.num_params(), counted, "{variant}");
        if variant == VlcmVariant::Gated {
            assert_eq!(counted, 986_880);
        }
    }
    Ok(())
}

#[test]
fn rejects_bad_shapes_with_named_errors() -> R {
    let dev = Device::Cpu;
    let (_vm, vlcm) = build(&cfg(VlcmVariant::Gated), DType::F32)?;
    let v = Tensor::zeros((2, DM, 3, 3), DType::F32, &dev)?;
    let t = Tensor::zeros((4, L, DT), DType::F32, &dev)?;
    let m = Tensor::ones((4, L), DType::F32, &dev)?;
    let expect = |r: tgc_vlcm::Result<tgc_vlcm::VlcmOutput>, tensor: &str| match r {
        Err(Error::Shape {
            tensor: got,
            message,
        }) => {
            assert_eq!(got, tensor, "wrong tensor named: {message}");
            message
        }
        other => panic!("expected a shape error on `{tensor}`, got {other:?}"),
    };
    let msg = expect(vlcm.forward(&v, &t, &m, 3), "text");
    assert!(msg.contains("B*K"), "unhelpful message: {msg}");
    expect(vlcm.forward(&v, &t, &m, 0), "k");
    expect(
        vlcm.forward(
            &Tensor::zeros((2, DM + 1, 3, 3), DType::F32, &dev)?,
            &t,
            &m,
            2,
        ),
        "vision",
    );
    expect(vlcm.forward(&v.flatten_from(2)?, &t, &m, 2), "vision");
    expect(
        vlcm.forward(&v, &Tensor::zeros((4, L, DT + 2), DType::F32, &dev)?, &m, 2),
        "text",
    );
    expect(
        vlcm.forward(&v, &t, &Tensor::ones((4, L + 1), DType::F32, &dev)?, 2),
        "text_mask",
    );
    assert!(vlcm.forward(&v, &t, &m, 2).is_ok());
    let bad = VlcmConfig {
        heads: 3,
        ..cfg(VlcmVariant::Gated)
    };
    let vm = VarMap::new();
    assert!(matches!(
        Vlcm::new(&bad, VarBuilder::from_varmap(&vm, DType::F32, &dev)),
        Err(Error::Config(_))
    ));
    Ok(())
}

#[test]
fn variant_names_and_config_serde() -> R {
    let c = VlcmConfig::default();
    assert_eq!((c.d_model, c.text_dim, c.heads), (256, 768, 8));
    assert_eq!(c.variant, VlcmVariant::Gated);
    for v in VlcmVariant::ALL {
        let json = serde_json::to_string(&v)?;
        assert_eq!(json, format!("\"{}\"", v.name()));
        assert_eq!(serde_json::from_str::<VlcmVariant>(&json)?, v);
        assert_eq!(v.to_string().parse::<VlcmVariant>()?, v);
    }
    assert_eq!(
        "Bi-Cross-Attn".parse::<VlcmVariant>()?,
        VlcmVariant::BiCrossAttn
    );
    assert!("gate".parse::<VlcmVariant>().is_err());
    let partial: VlcmConfig = serde_json::from_str(r#"{"variant": "single_cross_attn"}"#)?;
    assert_eq!(partial.variant, VlcmVariant::SingleCrossAttn);
    assert_eq!(partial.d_model, 256);
    let json = serde_json::to_string(&c)?;
    assert_eq!(serde_json::from_str::<VlcmConfig>(&json)?, c);
    Ok(())
}

#[test]
fn every_variant_matches_pytorch_fixture() -> R {
    // Reference: torch.nn.MultiheadAttention / LayerNorm / Linear over an explicit
    // concatenation, float64, written by tests/fixtures/make_vlcm_torch.py.
    let dev = Device::Cpu;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vlcm_torch.safetensors"
    );
    let fx = candle_core::safetensors::load(path, &dev)?;
    let dims: Vec<usize> = fx["meta.dims"]
        .to_vec1::<i64>()?
        .iter()
        .map(|&d| d as usize)
        .collect();
    let (k, d, dt, heads) = (dims[1], dims[2], dims[3], dims[4]);
    for variant in VlcmVariant::ALL {
        let c = VlcmConfig {
            d_model: d,
            text_dim: dt,
            heads,
            variant,
            eps: 1e-5,
        };
        let vm = VarMap::new();
        let vlcm = Vlcm::new(
            &c,
            VarBuilder::from_varmap(&vm, DType::F64, &dev).pp("vlcm"),
        )?;
        {
            let data = vm.data().lock().unwrap();
            let prefix = format!("{variant}.param.");
            let n_params = fx.keys().filter(|k| k.starts_with(&prefix)).count();
            assert_eq!(data.len(), n_params, "{variant}: parameter sets differ");
            for (name, var) in data.iter() {
                let t = fx
                    .get(&format!("{prefix}{name}"))
                    .unwrap_or_else(|| panic!("{variant}: fixture lacks `{name}`"));
                var.set(t)?;
            }
        }
        let out = vlcm.forward(
            &fx["input.vision"],
            &fx["input.text"],
            &fx["input.text_mask"],
            k,
        )?;
        let max = |a: &Tensor, b: &Tensor| -> Result<f64> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
        };
        let ev = max(&out.vision, &fx[&format!("{variant}.out.vision")])?;
        let et = max(&out.text, &fx[&format!("{variant}.out.text")])?;
        println!("VLCM {variant} vs PyTorch (float64): vision {ev:.3e}, text {et:.3e}");
        assert!(
            ev < 1e-10 && et < 1e-10,
            "{variant}: differs from PyTorch ({ev}, {et})"
        );
    }
    Ok(())
}
