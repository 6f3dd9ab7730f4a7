//! Helpers shared by the model tests: deterministic inputs and the gradient-flow check.
#![allow(dead_code)] // each test crate uses its own subset

use candle_core::{DType, Device, Tensor};
use tgc_model::{TgcConfig, TgcInput, TgcNet, WeightSource};

/// Deterministic pseudo-random values in [-1, 1).
pub fn pseudo(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

pub fn input(cfg: &TgcConfig, b: usize, k: usize, seed: u64) -> TgcInput {
    let dev = Device::Cpu;
    let prompts = (0..b)
        .map(|i| {
            (0..k)
                .map(|j| {
                    format!(
                        "opacity in the {} {} lung zone",
                        ["left", "right"][j % 2],
                        ["lower", "upper"][i % 2]
                    )
                })
                .collect()
        })
        .collect();
    TgcInput {
        clip_images: pseudo(&[b, 3, cfg.clip_size, cfg.clip_size], seed, &dev),
        cnn_images: pseudo(&[b, 3, cfg.cnn_size, cfg.cnn_size], seed + 1, &dev),
        prompts,
        aux_prompts: None,
    }
}

/// One SGD step (0.05) on `loss`'s gradients, then asserts that the second backward gives
/// every trainable variable of `model` a finite, non-zero gradient.
///
/// Deformable DETR initialises the sampling-offset and attention-weight projections to
/// zero, so at the exact initial point the level embedding (which only enters through
/// them) has a zero gradient by construction. The step moves off that point.
pub fn step_off_and_check_gradients(model: &TgcNet, name: &str, loss: impl Fn() -> Tensor) {
    let grads = loss().backward().unwrap();
    for (_, v) in model.trainable_vars() {
        if let Some(g) = grads.get(v.as_tensor()) {
            v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap())
                .unwrap();
        }
    }
    let grads = loss().backward().unwrap();
    for (n, v) in model.trainable_vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: {n} received no gradient"));
        let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s.is_finite() && s > 0.0, "{name}: {n} gradient sum {s}");
    }
}

/// Forward on precomputed features + squared-error loss; every trainable variable gets a
/// finite, non-zero gradient ([`step_off_and_check_gradients`]) and the frozen features
/// none.
pub fn check_gradients(cfg: TgcConfig, k: usize) {
    let name = format!(
        "{:?}/{:?}/{:?} k={k}",
        cfg.sse.mode, cfg.text_mode, cfg.vlcm.variant
    );
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 1 }, &Device::Cpu).unwrap();
    let inp = input(&cfg, 2, k, 3);
    let image = model.towers().encode_images(&inp.clip_images).unwrap();
    let (primary, aux) = model.encode_prompts(&inp.prompts, None).unwrap();
    let target = pseudo(&[2, k, cfg.label_size, cfg.label_size], 11, &Device::Cpu)
        .ge(0.4)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    step_off_and_check_gradients(&model, &name, || {
        let logits = model
            .forward_features(&image, &inp.cnn_images, &primary, aux.as_ref(), k, true)
            .unwrap();
        assert_eq!(logits.dims(), target.dims(), "{name}");
        (logits - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    });
    // The frozen towers record no graph: no gradient can flow into their weights, and the
    // only variables are the trainable ones.
    for (what, t) in [
        ("CLIP patch tokens", &image.patch_tokens),
        ("CLIP dense embeddings", &image.dense_embeds),
        ("text states", &primary.states),
    ] {
        assert!(
            !t.track_op(),
            "{name}: frozen {what} carry a gradient graph"
        );
    }
}
