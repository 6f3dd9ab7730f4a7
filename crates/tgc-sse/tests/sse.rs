//! Tests of the SSE against hand-written f64 oracles (fusion, upsampling), the tensor
//! contracts of DESIGN.md (shapes, errors) and gradient flow to every parameter.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tgc_sse::{Error, Sse, SseConfig, SseMode};

const MODES: [SseMode; 3] = [SseMode::Full, SseMode::ClipOnly, SseMode::CnnOnly];

/// A small configuration: D = 32, 2 MSDeformAttn layers, CLIP width 48.
fn small_cfg(mode: SseMode) -> SseConfig {
    let mut cfg = SseConfig::cpu().with_mode(mode);
    cfg.cnn_channels = [8, 16, 24];
    cfg.stem_channels = 8;
    cfg.cnn_blocks = [1, 1, 1];
    cfg.clip_dim = 48;
    cfg.d_model = 32;
    cfg.norm_groups = 4;
    cfg.msda.d_model = 32;
    cfg.msda.n_heads = 4;
    cfg.msda.n_layers = 2;
    cfg.msda.ffn_dim = 64;
    cfg.msda.dropout = 0.0;
    cfg
}

/// Builds an SSE whose every parameter is random (so LN/GN affine parts are exercised).
fn build(cfg: &SseConfig, dtype: DType, seed_scale: f64) -> (VarMap, Sse) {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let sse = Sse::new(cfg, VarBuilder::from_varmap(&varmap, dtype, &dev)).unwrap();
    for var in varmap.all_vars() {
        let r = Tensor::randn(0f64, seed_scale, var.shape(), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        var.set(&r).unwrap();
    }
    (varmap, sse)
}

fn weights(varmap: &VarMap) -> HashMap<String, Vec<f64>> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let flat = v
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (k.clone(), flat)
        })
        .collect()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Oracle of `Sse::fuse`: returns `B x D x g x g` row-major, computed with plain loops.
#[allow(clippy::too_many_arguments)]
fn fuse_oracle(
    w: &HashMap<String, Vec<f64>>,
    mode: SseMode,
    clip: &[f64],
    cnn: &[f64],
    b: usize,
    g: usize,
    dv: usize,
    c32: usize,
    d: usize,
    eps: f64,
) -> Vec<f64> {
    let n = g * g;
    let mut out = vec![0f64; b * d * n];
    for bi in 0..b {
        for p in 0..n {
            // Token p = row-major position (y, x) = (p / g, p % g).
            let mut z = vec![0f64; d];
            for (o, zo) in z.iter_mut().enumerate() {
                if mode.uses_clip() {
                    // P_V: z = W x + b, W is D x D_v.
                    *zo += w["p_v.bias"][o];
                    for i in 0..dv {
                        *zo += w["p_v.weight"][o * dv + i] * clip[(bi * n + p) * dv + i];
                    }
                }
                if mode.uses_cnn() {
                    // P_C: a 1x1 conv is a matmul over channels at each position.
                    *zo += w["p_c.bias"][o];
                    for c in 0..c32 {
                        *zo += w["p_c.weight"][o * c32 + c] * cnn[(bi * c32 + c) * n + p];
                    }
                }
            }
            let mean = z.iter().sum::<f64>() / d as f64;
            let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            for o in 0..d {
                let y = (z[o] - mean) / (var + eps).sqrt() * w["fuse_norm.weight"][o]
                    + w["fuse_norm.bias"][o];
                out[(bi * d + o) * n + p] = y;
            }
        }
    }
    out
}

/// Oracle of `ConvTranspose2d(D, D, 2, stride 2)`: `x` is `B x D x g x g`; weight is
/// `D_in x D_out x 2 x 2` (PyTorch layout).
fn conv_t2_oracle(x: &[f64], wt: &[f64], bias: &[f64], b: usize, d: usize, g: usize) -> Vec<f64> {
    let go = 2 * g;
    let mut out = vec![0f64; b * d * go * go];
    for bi in 0..b {
        for o in 0..d {
            for yo in 0..go {
                for xo in 0..go {
                    let (yi, xi, dy, dx) = (yo / 2, xo / 2, yo % 2, xo % 2);
                    let mut s = bias[o];
                    for c in 0..d {
                        s += x[((bi * d + c) * g + yi) * g + xi]
                            * wt[((c * d + o) * 2 + dy) * 2 + dx];
                    }
                    out[((bi * d + o) * go + yo) * go + xo] = s;
                }
            }
        }
    }
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn fuse_matches_f64_oracle_in_every_mode() {
    let dev = Device::Cpu;
    let (b, g) = (2, 3);
    for mode in MODES {
        let cfg = small_cfg(mode);
        let (varmap, sse) = build(&cfg, DType::F64, 0.5);
        let w = weights(&varmap);
        let clip = Tensor::randn(0f64, 1.0, (b, g * g, cfg.clip_dim), &dev).unwrap();
        let cnn = Tensor::randn(0f64, 1.0, (b, cfg.cnn_channels[2], g, g), &dev).unwrap();
        let got = sse.fuse(Some(&clip), Some(&cnn), g).unwrap();
        assert_eq!(got.dims(), &[b, cfg.d_model, g, g]);
        let want = fuse_oracle(
            &w,
            mode,
            &to_vec(&clip),
            &to_vec(&cnn),
            b,
            g,
            cfg.clip_dim,
            cfg.cnn_channels[2],
            cfg.d_model,
            cfg.eps,
        );
        let err = max_abs_diff(&to_vec(&got), &want);
        assert!(
            err < 1e-9,
            "{mode:?}: fuse differs from the oracle by {err}"
        );
    }
}

#[test]
fn clip_only_forward_matches_oracle() {
    let dev = Device::Cpu;
    let cfg = small_cfg(SseMode::ClipOnly);
    let (varmap, sse) = build(&cfg, DType::F64, 0.3);
    let w = weights(&varmap);
    let (b, g, d) = (2, 2, cfg.d_model);
    let image = Tensor::randn(0f64, 1.0, (b, 3, 32 * g, 32 * g), &dev).unwrap();
    let clip = Tensor::randn(0f64, 1.0, (b, g * g, cfg.clip_dim), &dev).unwrap();
    let out = sse.forward(&image, Some(&clip), true).unwrap();
    let f32 = fuse_oracle(
        &w,
        SseMode::ClipOnly,
        &to_vec(&clip),
        &[],
        b,
        g,
        cfg.clip_dim,
        0,
        d,
        cfg.eps,
    );
    let f16 = conv_t2_oracle(&f32, &w["up16.weight"], &w["up16.bias"], b, d, g);
    let f8 = conv_t2_oracle(&f16, &w["up8.weight"], &w["up8.bias"], b, d, 2 * g);
    for (name, got, want) in [
        ("f32", &out.f32, f32),
        ("f16", &out.f16, f16),
        ("f8", &out.f8, f8),
    ] {
        let err = max_abs_diff(&to_vec(got), &want);
        assert!(
            err < 1e-9,
            "ClipOnly {name} differs from the oracle by {err}"
        );
    }
}

/// The pre-encoder pyramid (CNN branch, input projections, fusion) against PyTorch in
/// float64: fixture from `tests/fixtures/make_sse_fixture.py` (same config as
/// `small_cfg(Full)`).
#[test]
fn pyramid_matches_pytorch_fixture() {
    let dev = Device::Cpu;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sse_small.safetensors"
    );
    let fx = candle_core::safetensors::load(path, &dev).unwrap();
    for mode in [SseMode::Full, SseMode::CnnOnly] {
        let cfg = small_cfg(mode);
        let varmap = VarMap::new();
        let sse = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F64, &dev)).unwrap();
        // Every parameter outside the MSDeformAttn encoder must come from the fixture.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.starts_with("encoder.") {
                continue;
            }
            let t = fx
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing in the fixture"));
            var.set(t).unwrap();
        }
        let image = &fx["input.image"];
        let clip = &fx["input.clip"];
        let feats = sse.cnn_features(image).unwrap();
        for (got, key) in feats.iter().zip(["output.c8", "output.c16", "output.c32"]) {
            let err = max_abs_diff(&to_vec(got), &to_vec(&fx[key]));
            assert!(err < 1e-9, "{mode:?}: {key} differs from PyTorch by {err}");
        }
        let pyr = sse.pyramid(image, Some(clip)).unwrap();
        let err = max_abs_diff(&to_vec(&pyr[0]), &to_vec(&fx["output.p8"]));
        assert!(err < 1e-9, "{mode:?}: input_proj 1/8 differs by {err}");
        let err = max_abs_diff(&to_vec(&pyr[1]), &to_vec(&fx["output.p16"]));
        assert!(err < 1e-9, "{mode:?}: input_proj 1/16 differs by {err}");
        if mode == SseMode::Full {
            let err = max_abs_diff(&to_vec(&pyr[2]), &to_vec(&fx["output.fused"]));
            assert!(err < 1e-9, "F_fused differs from PyTorch by {err}");
        }
    }
}

fn check_shapes(cfg: &SseConfig, s_n: usize) {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let sse = Sse::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let b = 1;
    let g = s_n / 32;
    let image = Tensor::randn(0f32, 1.0, (b, 3, s_n, s_n), &dev).unwrap();
    let clip = Tensor::randn(0f32, 1.0, (b, g * g, cfg.clip_dim), &dev).unwrap();
    let out = sse.forward(&image, Some(&clip), false).unwrap();
    let d = cfg.d_model;
    assert_eq!(out.f8.dims(), &[b, d, s_n / 8, s_n / 8], "{:?}", cfg.mode);
    assert_eq!(
        out.f16.dims(),
        &[b, d, s_n / 16, s_n / 16],
        "{:?}",
        cfg.mode
    );
    assert_eq!(out.f32.dims(), &[b, d, g, g], "{:?}", cfg.mode);
    for t in [&out.f8, &out.f16, &out.f32] {
        let v = to_vec(t);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{:?}: non-finite output",
            cfg.mode
        );
    }
    if cfg.mode.uses_cnn() {
        let feats = sse.cnn_features(&image).unwrap();
        for (f, (&c, s)) in feats.iter().zip(cfg.cnn_channels.iter().zip([8, 16, 32])) {
            assert_eq!(f.dims(), &[b, c, s_n / s, s_n / s]);
        }
        // The stem output is passed through as F_cnn^1/4.
        let f4 = out
            .f4
            .as_ref()
            .expect("modes with a CNN return the stem output");
        assert_eq!(f4.dims(), &[b, cfg.stem_channels, s_n / 4, s_n / 4]);
        assert!(to_vec(f4).iter().all(|x| x.is_finite() && *x >= 0.0));
    } else {
        assert!(out.f4.is_none());
    }
}

#[test]
fn shapes_cpu_preset_all_modes() {
    for mode in MODES {
        check_shapes(&SseConfig::cpu().with_mode(mode), 448);
    }
}

#[test]
fn shapes_paper_preset_all_modes() {
    for mode in MODES {
        check_shapes(&SseConfig::paper().with_mode(mode), 768);
    }
}

#[test]
fn clear_errors_on_bad_inputs() {
    let dev = Device::Cpu;
    for mode in MODES {
        let cfg = small_cfg(mode);
        let varmap = VarMap::new();
        let sse = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let image = Tensor::zeros((2, 3, 64, 64), DType::F32, &dev).unwrap();
        let clip_grid3 = Tensor::zeros((2, 9, cfg.clip_dim), DType::F32, &dev).unwrap();
        let clip_width = Tensor::zeros((2, 4, cfg.clip_dim + 1), DType::F32, &dev).unwrap();
        let clip_batch = Tensor::zeros((1, 4, cfg.clip_dim), DType::F32, &dev).unwrap();
        if mode.uses_clip() {
            let e = sse.forward(&image, None, false).unwrap_err();
            assert!(matches!(e, Error::MissingClipTokens(m) if m == mode), "{e}");
            assert!(e.to_string().contains("clip_tokens"), "{e}");
            let e = sse.forward(&image, Some(&clip_grid3), false).unwrap_err();
            assert!(
                matches!(&e, Error::Input(s) if s.contains("grid 2 x 2")),
                "{mode:?}: {e}"
            );
            let e = sse.forward(&image, Some(&clip_width), false).unwrap_err();
            assert!(
                matches!(&e, Error::Input(s) if s.contains("clip_dim")),
                "{e}"
            );
            let e = sse.forward(&image, Some(&clip_batch), false).unwrap_err();
            assert!(matches!(&e, Error::Input(s) if s.contains("batch")), "{e}");
        }
        let non_square = Tensor::zeros((2, 3, 64, 96), DType::F32, &dev).unwrap();
        let e = sse.forward(&non_square, None, false).unwrap_err();
        assert!(matches!(&e, Error::Input(s) if s.contains("square")), "{e}");
        let odd = Tensor::zeros((2, 3, 80, 80), DType::F32, &dev).unwrap();
        let e = sse.forward(&odd, None, false).unwrap_err();
        assert!(
            matches!(&e, Error::Input(s) if s.contains("multiple of 32")),
            "{e}"
        );
        let grey = Tensor::zeros((2, 1, 64, 64), DType::F32, &dev).unwrap();
        let e = sse.forward(&grey, None, false).unwrap_err();
        assert!(
            matches!(&e, Error::Input(s) if s.contains("channels")),
            "{e}"
        );
    }
    // A CLIP-free mode does not need tokens (needs the encoder to run to the end).
    {
        let cfg = small_cfg(SseMode::CnnOnly);
        let varmap = VarMap::new();
        let sse = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let image = Tensor::zeros((2, 3, 64, 64), DType::F32, &dev).unwrap();
        sse.forward(&image, None, false).unwrap();
    }
    // Inconsistent widths are rejected at construction.
    let mut cfg = small_cfg(SseMode::Full);
    cfg.msda.d_model = 64;
    let varmap = VarMap::new();
    let e = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap_err();
    assert!(
        matches!(&e, Error::Config(s) if s.contains("d_model")),
        "{e}"
    );
}

#[test]
fn mode_serde_is_snake_case() {
    let json = serde_json::to_string(&SseMode::ClipOnly).unwrap();
    assert_eq!(json, "\"clip_only\"");
    let m: SseMode = serde_json::from_str("\"cnn_only\"").unwrap();
    assert_eq!(m, SseMode::CnnOnly);
    let cfg = SseConfig::cpu().with_mode(SseMode::CnnOnly);
    let back: SseConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    // Missing fields take the paper defaults.
    let partial: SseConfig = serde_json::from_str(r#"{"mode": "clip_only"}"#).unwrap();
    assert_eq!(partial, SseConfig::paper().with_mode(SseMode::ClipOnly));
}

/// Forward, a random-weighted scalar loss (a plain sum would have zero gradient through
/// the LayerNorm / GroupNorm), backward; every Var and the CLIP tokens get a finite,
/// non-zero gradient.
fn check_gradients(mode: SseMode) {
    let dev = Device::Cpu;
    let cfg = small_cfg(mode);
    let varmap = VarMap::new();
    let sse = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    // Deformable DETR zero-initialises the sampling-offset and attention-weight
    // projections, so at initialisation no gradient reaches the query side (position and
    // level embeddings). Perturb every parameter slightly, as one optimiser step would.
    for var in varmap.all_vars() {
        let noise = Tensor::randn(0f32, 0.05, var.shape(), &dev).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    let b = 2;
    let image = Tensor::randn(0f32, 1.0, (b, 3, 64, 64), &dev).unwrap();
    let clip =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, 4, cfg.clip_dim), &dev).unwrap()).unwrap();
    let out = sse.forward(&image, Some(clip.as_tensor()), true).unwrap();
    let mut loss = Tensor::new(0f32, &dev).unwrap();
    for t in [&out.f8, &out.f16, &out.f32] {
        let r = Tensor::randn(0f32, 1.0, t.shape(), &dev).unwrap();
        loss = (loss + (t * r).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    assert!(!data.is_empty());
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{mode:?}: no gradient for {name}"));
        let v = to_vec(g);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{mode:?}: {name} non-finite"
        );
        assert!(
            v.iter().any(|x| *x != 0.0),
            "{mode:?}: {name} zero gradient"
        );
    }
    let g = grads.get(clip.as_tensor());
    if mode.uses_clip() {
        let v = to_vec(g.expect("clip tokens got no gradient"));
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0));
    } else {
        assert!(g.is_none(), "CnnOnly must not touch the CLIP tokens");
    }
}

#[test]
fn gradients_reach_every_parameter_clip_only() {
    check_gradients(SseMode::ClipOnly);
}

#[test]
fn gradients_reach_every_parameter_full() {
    check_gradients(SseMode::Full);
}

#[test]
fn gradients_reach_every_parameter_cnn_only() {
    check_gradients(SseMode::CnnOnly);
}

/// Analytic parameter count of the CNN branch, P_C and the input projections.
fn cnn_proj_formula(cfg: &SseConfig) -> usize {
    let conv_gn = |ci: usize, co: usize, k: usize| ci * co * k * k + 2 * co;
    let s = cfg.stem_channels;
    // Stem: 4x4 patchify + 3x3; stages: 2x2 patch merging + residual blocks.
    let mut n = conv_gn(cfg.in_channels, s, 4) + conv_gn(s, s, 3);
    let mut c_in = s;
    for (&c, &blocks) in cfg.cnn_channels.iter().zip(&cfg.cnn_blocks) {
        n += conv_gn(c_in, c, 2) + blocks * 2 * conv_gn(c, c, 3);
        c_in = c;
    }
    let d = cfg.d_model;
    let [c8, c16, c32] = cfg.cnn_channels;
    // P_C (conv + bias), input projections (conv + bias + GroupNorm affine).
    n + (c32 * d + d) + (c8 * d + 3 * d) + (c16 * d + 3 * d)
}

#[test]
fn parameter_count_paper_and_cpu() {
    let dev = Device::Cpu;
    for (name, cfg) in [("paper", SseConfig::paper()), ("cpu", SseConfig::cpu())] {
        let varmap = VarMap::new();
        Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let data = varmap.data().lock().unwrap();
        let count = |pred: &dyn Fn(&str) -> bool| -> usize {
            data.iter()
                .filter(|(k, _)| pred(k))
                .map(|(_, v)| v.as_tensor().elem_count())
                .sum()
        };
        let total = count(&|_| true);
        let cnn_proj = count(&|k| {
            k.starts_with("cnn.") || k.starts_with("p_c.") || k.starts_with("input_proj.")
        });
        let p_v = count(&|k| k.starts_with("p_v."));
        let ln = count(&|k| k.starts_with("fuse_norm."));
        let enc = count(&|k| k.starts_with("encoder."));
        println!(
            "{name}: SSE total {total} = CNN+P_C+input_proj {cnn_proj} + P_V {p_v} + LN {ln} \
             + MSDeformAttn encoder {enc}"
        );
        assert_eq!(
            total,
            cnn_proj + p_v + ln + enc,
            "{name}: unaccounted parameters"
        );
        assert_eq!(
            cnn_proj,
            cnn_proj_formula(&cfg),
            "{name}: CNN+projection count"
        );
        assert_eq!(p_v, cfg.clip_dim * cfg.d_model + cfg.d_model);
        if name == "paper" {
            // DESIGN.md budget: the CNN branch with its projections is 0.5-1.0M of the
            // 10.3M trainable parameters.
            assert!(
                (500_000..=1_000_000).contains(&cnn_proj),
                "paper CNN+projection count {cnn_proj} outside the 0.5-1.0M budget"
            );
        }
    }
}
