//! The trainable vision tower (`TowerMode::Trainable`): the same outputs as the frozen
//! tower and as Hugging Face, and gradients that reach every weight, checked against
//! central finite differences in f64.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::*;
use tgc_clip::{ClipConfig, TowerMode, VisionOutput, VisionTransformer, WeightSource};

/// Deterministic pseudo-random values in [-1, 1).
fn pseudo(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn tower(cfg: &ClipConfig, vb: VarBuilder, mode: TowerMode) -> VisionTransformer {
    let t = VisionTransformer::new_with_mode(&cfg.vision, cfg.embed_dim, vb, mode).unwrap();
    assert_eq!(t.mode(), mode);
    t
}

fn all_outputs(o: &VisionOutput) -> Vec<(String, Tensor)> {
    let mut v = vec![
        ("patch_tokens".to_string(), o.patch_tokens.clone()),
        ("dense_embeds".to_string(), o.dense_embeds.clone()),
        ("pooled_embeds".to_string(), o.pooled_embeds.clone()),
    ];
    for (i, h) in o.hidden_states.iter().flatten().enumerate() {
        v.push((format!("hidden #{i}"), h.clone()));
    }
    v
}

/// Frozen and trainable towers built from the same weights agree to 1e-5, at the native
/// grid and at a resampled (bicubic position embeddings) rectangular grid.
#[test]
fn trainable_forward_equals_frozen_forward() {
    let cfg = ClipConfig::tiny();
    let src = WeightSource::File(fixture("tiny_clip.safetensors"));
    let vb = src.var_builder(&cfg, DType::F32, &Device::Cpu).unwrap();
    let frozen = tower(&cfg, vb.clone(), TowerMode::Frozen);
    let trainable = tower(&cfg, vb, TowerMode::Trainable);
    for (i, shape) in [[2, 3, 32, 32], [1, 3, 48, 64]].iter().enumerate() {
        let px = pseudo(shape, 7 + i as u64, DType::F32);
        let a = frozen.forward(&px, &[0, 1, 2]).unwrap();
        let b = trainable.forward(&px, &[0, 1, 2]).unwrap();
        assert_eq!(a.grid, b.grid);
        for ((name, x), (_, y)) in all_outputs(&a).iter().zip(&all_outputs(&b)) {
            assert_close(&format!("{shape:?} {name}"), y, x, 1e-5);
        }
    }
}

/// The trainable tower also matches Hugging Face transformers (the golden fixtures).
#[test]
fn trainable_forward_matches_hugging_face() {
    let cfg = ClipConfig::tiny();
    let src = WeightSource::File(fixture("tiny_clip.safetensors"));
    let vb = src.var_builder(&cfg, DType::F32, &Device::Cpu).unwrap();
    let t = tower(&cfg, vb, TowerMode::Trainable);
    let g = golden();
    for case in ["tiny.native", "tiny.up", "tiny.rect"] {
        let out = t.forward(&g[&format!("{case}.pixels")], &[]).unwrap();
        for what in ["patch_tokens", "dense_embeds", "pooled_embeds"] {
            let got = match what {
                "patch_tokens" => &out.patch_tokens,
                "dense_embeds" => &out.dense_embeds,
                _ => &out.pooled_embeds,
            };
            assert_close(
                &format!("{case} {what}"),
                got,
                &g[&format!("{case}.{what}")],
                1e-4,
            );
        }
    }
}

/// Every fixture tensor of the vision tower as an f64 `Var`.
fn vision_vars() -> HashMap<String, Var> {
    let ts =
        candle_core::safetensors::load(fixture("tiny_clip.safetensors"), &Device::Cpu).unwrap();
    ts.into_iter()
        .filter(|(n, _)| n.starts_with("vision_model.") || n.starts_with("visual_projection."))
        .map(|(n, t)| {
            (
                n,
                Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap(),
            )
        })
        .collect()
}

/// A scalar that depends on every output: fixed random weights on each.
fn loss(t: &VisionTransformer, px: &Tensor) -> Tensor {
    let o = t.forward(px, &[]).unwrap();
    let mut total = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
    for (i, x) in [&o.patch_tokens, &o.dense_embeds, &o.pooled_embeds]
        .into_iter()
        .enumerate()
    {
        let r = pseudo(x.dims(), 100 + i as u64, DType::F64);
        total = (total + (x * r).unwrap().sum_all().unwrap()).unwrap();
    }
    total
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Backward through the trainable tower gives every vision weight a gradient, and the
/// gradient entries of weights in every kind of layer (q/v projections, LayerNorms,
/// MLP, patch, class and position embeddings, the projection) equal central finite
/// differences in f64. The frozen tower, built from the same Vars, loses gradients in
/// its fused kernels (which is why the trainable mode exists).
#[test]
fn gradients_match_finite_differences() {
    let cfg = ClipConfig::tiny();
    let vars = vision_vars();
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
    let t = tower(&cfg, vb, TowerMode::Trainable);
    // A non-native grid, so the bicubic position-embedding path is differentiated too.
    let px = pseudo(&[2, 3, 32, 40], 3, DType::F64);
    let grads = loss(&t, &px).backward().unwrap();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let s = scalar(&g.abs().unwrap().sum_all().unwrap());
        assert!(s.is_finite() && s > 0.0, "{name}: gradient |sum| {s}");
    }

    let l = |i: usize| format!("vision_model.encoder.layers.{i}");
    let checks = [
        (format!("{}.self_attn.q_proj.weight", l(0)), 5),
        (format!("{}.self_attn.q_proj.bias", l(1)), 3),
        (format!("{}.self_attn.v_proj.weight", l(1)), 77),
        (format!("{}.self_attn.k_proj.weight", l(0)), 40),
        (format!("{}.layer_norm1.weight", l(0)), 2),
        (format!("{}.layer_norm2.bias", l(1)), 9),
        (format!("{}.mlp.fc1.weight", l(0)), 123),
        ("vision_model.pre_layrnorm.weight".to_string(), 4),
        ("vision_model.post_layernorm.weight".to_string(), 6),
        (
            "vision_model.embeddings.patch_embedding.weight".to_string(),
            31,
        ),
        ("vision_model.embeddings.class_embedding".to_string(), 1),
        (
            "vision_model.embeddings.position_embedding.weight".to_string(),
            70,
        ),
        ("visual_projection.weight".to_string(), 12),
    ];
    let h = 1e-5;
    for (name, idx) in &checks {
        let v = &vars[name];
        let analytic: Vec<f64> = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let at = |delta: f64| {
            let mut w = orig.clone();
            w[*idx] += delta;
            v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            scalar(&loss(&t, &px))
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        v.set(&Tensor::from_vec(orig.clone(), v.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let a = analytic[*idx];
        let err = (a - numeric).abs() / numeric.abs().max(1e-3);
        assert!(
            err < 1e-5,
            "{name}[{idx}]: analytic {a:e} vs finite difference {numeric:e} (rel {err:e})"
        );
    }

    // The frozen tower on the same Vars (in f32: its fused LayerNorm has no f64 CPU
    // kernel) has no backward through that LayerNorm: the pre-LN weight gets no
    // gradient at all.
    let vars32: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().to_dtype(DType::F32).unwrap()))
        .map(|(n, t)| (n, Var::from_tensor(&t).unwrap().as_tensor().clone()))
        .collect();
    let pre_ln = vars32["vision_model.pre_layrnorm.weight"].clone();
    let vb32 = VarBuilder::from_tensors(vars32, DType::F32, &Device::Cpu);
    let px32 = px.to_dtype(DType::F32).unwrap();
    for (mode, has_grad) in [(TowerMode::Frozen, false), (TowerMode::Trainable, true)] {
        let t = tower(&cfg, vb32.clone(), mode);
        let o = t.forward(&px32, &[]).unwrap();
        let grads = o.patch_tokens.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&pre_ln).is_some(), has_grad, "{mode:?}");
    }
}
