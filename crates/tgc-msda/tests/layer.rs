//! The encoder layers: initialisation, gradient flow to every parameter, and training.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tgc_msda::{MsDeformAttn, MsDeformAttnConfig, MsDeformEncoder, MsdaImpl};

fn small_cfg() -> MsDeformAttnConfig {
    MsDeformAttnConfig {
        d_model: 16,
        n_heads: 4,
        n_levels: 3,
        n_points: 2,
        n_layers: 2,
        ffn_dim: 32,
        dropout: 0.0,
        implementation: MsdaImpl::Auto,
    }
}

fn pyramid(b: usize, d: usize, seed: f32) -> Vec<Tensor> {
    // Deterministic smooth inputs (no RNG): sin patterns that differ per level/channel.
    [(6usize, 8usize), (3, 4), (2, 2)]
        .iter()
        .enumerate()
        .map(|(l, &(h, w))| {
            let n = b * d * h * w;
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as f32) * 0.37 + seed + l as f32).sin())
                .collect();
            Tensor::from_vec(v, (b, d, h, w), &Device::Cpu).unwrap()
        })
        .collect()
}

/// Minimal Adam on the VarMap's variables (bias-corrected, no weight decay).
struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
    lr: f64,
}

impl Adam {
    fn new(vars: Vec<Var>, lr: f64) -> Self {
        let m = vars
            .iter()
            .map(|v| v.zeros_like().unwrap())
            .collect::<Vec<_>>();
        let v2 = m.clone();
        Self {
            vars,
            m,
            v: v2,
            t: 0,
            lr,
        }
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) {
        self.t += 1;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for i in 0..self.vars.len() {
            let Some(g) = grads.get(self.vars[i].as_tensor()) else {
                continue;
            };
            self.m[i] = ((&self.m[i] * b1).unwrap() + (g * (1.0 - b1)).unwrap()).unwrap();
            self.v[i] =
                ((&self.v[i] * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let upd = ((&self.m[i] / c1).unwrap()
                / ((&self.v[i] / c2).unwrap().sqrt().unwrap() + eps).unwrap())
            .unwrap();
            let new = (self.vars[i].as_tensor() - (upd * self.lr).unwrap()).unwrap();
            self.vars[i].set(&new).unwrap();
        }
    }
}

fn mse(outs: &[Tensor], targets: &[Tensor]) -> Tensor {
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (o, t) in outs.iter().zip(targets) {
        total = (total + (o - t).unwrap().sqr().unwrap().mean_all().unwrap()).unwrap();
    }
    total
}

#[test]
fn encoder_every_parameter_gets_gradient_and_training_lowers_loss() {
    let cfg = small_cfg();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let enc =
        MsDeformEncoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let srcs = pyramid(2, cfg.d_model, 0.0);
    // Target: a fixed different pattern, so the encoder has to change its output.
    let targets: Vec<Tensor> = pyramid(2, cfg.d_model, 1.3)
        .iter()
        .map(|t| (t * 0.8).unwrap())
        .collect();

    let out = enc.forward(&srcs, true).unwrap();
    for (o, s) in out.iter().zip(&srcs) {
        assert_eq!(o.dims(), s.dims());
    }
    let loss0 = mse(&out, &targets);
    let vars = varmap.data().lock().unwrap().clone();
    // 1 level embedding + per layer 4 linears x 2 (attn) + 2 linears x 2 + 2 norms x 2.
    assert_eq!(vars.len(), 1 + cfg.n_layers * (8 + 4 + 4));
    let mut opt = Adam::new(vars.values().cloned().collect(), 3e-3);
    let l0 = loss0.to_scalar::<f32>().unwrap();
    let mut grads = loss0.backward().unwrap();
    let mut last = l0;
    for _ in 0..40 {
        opt.step(&grads);
        let loss = mse(&enc.forward(&srcs, true).unwrap(), &targets);
        last = loss.to_scalar::<f32>().unwrap();
        grads = loss.backward().unwrap();
    }
    // Checked after training: at Deformable DETR's init the sampling-offset and
    // attention-weight projections are zero, so the query (and with it the level
    // embedding) has exactly zero gradient on the very first step.
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let abs = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(abs.is_finite() && abs > 0.0, "gradient of {name} is {abs}");
    }
    assert!(last < 0.7 * l0, "loss did not fall enough: {l0} -> {last}");
}

#[test]
fn eval_is_deterministic_and_fused_matches_composite() {
    let mut cfg = small_cfg();
    cfg.dropout = 0.5;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let enc =
        MsDeformEncoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let srcs = pyramid(1, cfg.d_model, 0.5);
    let a = enc.forward(&srcs, false).unwrap();
    let b = enc.forward(&srcs, false).unwrap();
    let t = enc.forward(&srcs, true).unwrap();
    let diff = |x: &Tensor, y: &Tensor| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(diff(&a[0], &b[0]), 0.0, "eval must not apply dropout");
    assert!(
        diff(&a[0], &t[0]) > 1e-3,
        "training with dropout 0.5 must differ from eval"
    );

    // Same weights, composite sampling core.
    cfg.implementation = MsdaImpl::Composite;
    let enc2 =
        MsDeformEncoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let c = enc2.forward(&srcs, false).unwrap();
    for (x, y) in a.iter().zip(&c) {
        assert!(
            diff(x, y) < 1e-4,
            "fused and composite encoders differ by {}",
            diff(x, y)
        );
    }
}

#[test]
fn sampling_offset_bias_init_follows_deformable_detr() {
    let cfg = MsDeformAttnConfig {
        d_model: 8,
        n_heads: 4,
        n_levels: 2,
        n_points: 3,
        ..Default::default()
    };
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let attn = MsDeformAttn::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let data = varmap.data().lock().unwrap();
    let bias = data["sampling_offsets.bias"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    // Heads at 0, 90, 180, 270 degrees, normalised to max |component| = 1, scaled by point index.
    let dirs = [(1f32, 0f32), (0., 1.), (-1., 0.), (0., -1.)];
    for (h, &(dx, dy)) in dirs.iter().enumerate() {
        for l in 0..2 {
            for p in 0..3 {
                let i = ((h * 2 + l) * 3 + p) * 2;
                let k = (p + 1) as f32;
                assert!(
                    (bias[i] - dx * k).abs() < 1e-5 && (bias[i + 1] - dy * k).abs() < 1e-5,
                    "head {h} point {p}: {:?}",
                    &bias[i..i + 2]
                );
            }
        }
    }
    let w = data["sampling_offsets.weight"]
        .as_tensor()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(w, 0.0);
    drop(data);
    // With zero offset weights, a query at a pixel centre samples the reference point plus
    // the bias offsets: check the module runs and keeps the shape.
    let q = Tensor::ones((1, 5, 8), DType::F32, &dev).unwrap();
    let refs = Tensor::full(0.5f32, (1, 5, 2, 2), &dev).unwrap();
    let input = Tensor::ones((1, 4 * 4 + 2 * 2, 8), DType::F32, &dev).unwrap();
    let out = attn
        .forward(&q, &refs, &input, &[(4, 4), (2, 2)], None)
        .unwrap();
    assert_eq!(out.dims(), &[1, 5, 8]);
    let _ = out.apply(&candle_nn::Activation::Relu).unwrap();
}

#[test]
fn bad_config_and_inputs_are_errors() {
    let dev = Device::Cpu;
    let bad = MsDeformAttnConfig {
        d_model: 30,
        n_heads: 8,
        ..Default::default()
    };
    assert!(MsDeformEncoder::new(&bad, VarBuilder::zeros(DType::F32, &dev)).is_err());
    let cfg = small_cfg();
    let enc = MsDeformEncoder::new(&cfg, VarBuilder::zeros(DType::F32, &dev)).unwrap();
    let srcs = pyramid(1, cfg.d_model, 0.0);
    assert!(
        enc.forward(&srcs[..2], false).is_err(),
        "wrong number of levels"
    );
    let wrong = vec![
        srcs[0].clone(),
        srcs[1].narrow(1, 0, 8).unwrap(),
        srcs[2].clone(),
    ];
    assert!(enc.forward(&wrong, false).is_err(), "wrong channel count");
}
