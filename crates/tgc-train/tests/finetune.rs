//! Training with CLIP's vision tower fine-tuned (`clip_finetune`, the paper's Table 4
//! encoder rows) on synthetic phantoms with the `tiny` preset: image features bypass
//! every cache, exactly the chosen tower parameters train, and the frozen CLIP stays
//! bit-identical.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use tgc_data::{Augment, DataLoader, PhantomKind, Preprocess, SegDataset, SyntheticPhantoms};
use tgc_model::{ClipFinetune, TgcConfig, TgcNet, WeightSource};
use tgc_train::{batch_logits, dice_bce, FeatureStore, ImageFeatureSource, TrainConfig, Trainer};

fn preprocess(cfg: &TgcConfig) -> Preprocess {
    Preprocess {
        clip_size: cfg.clip_size,
        cnn_size: cfg.cnn_size,
        label_size: cfg.label_size,
    }
}

fn model(cfg: &TgcConfig) -> TgcNet {
    TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap()
}

fn phantoms(n: usize, seed: u64, size: usize) -> Arc<dyn SegDataset> {
    Arc::new(SyntheticPhantoms::new(PhantomKind::CtSlice, n, seed, size))
}

fn quiet(max_steps: u64, cache_dir: std::path::PathBuf) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        max_steps: Some(max_steps),
        batch_size: 4,
        lr: 1e-3,
        progress: false,
        overlays: 0,
        patience: 0,
        cache_dir: Some(cache_dir),
        ..TrainConfig::default()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn snapshot(m: &TgcNet) -> HashMap<String, Vec<f32>> {
    m.trainable_tensors()
        .into_iter()
        .map(|(n, t)| (n, values(&t)))
        .collect()
}

/// Trains `cfg` for two steps; returns the model, its weights before, the changed
/// variable names, and the output folder (kept alive).
fn train_two_steps(cfg: &TgcConfig) -> (TgcNet, BTreeSet<String>, tempfile::TempDir) {
    let m = model(cfg);
    let before = snapshot(&m);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut t = Trainer::new(
        &m,
        quiet(2, cache.clone()),
        phantoms(8, 1, cfg.label_size),
        phantoms(2, 2, cfg.label_size),
        preprocess(cfg),
        dir.path().join("run"),
    )
    .unwrap();
    assert_eq!(t.image_features(), ImageFeatureSource::FineTunedTower);
    t.fit().unwrap();
    assert_eq!(t.steps(), 2);
    // No image features were cached on disk.
    assert!(
        !cache.exists(),
        "fine-tuning must not open the feature cache"
    );
    let changed = snapshot(&m)
        .into_iter()
        .filter(|(n, v)| before[n] != *v)
        .map(|(n, _)| n)
        .collect();
    (m, changed, dir)
}

#[test]
fn query_value_training_changes_exactly_the_q_v_projections() {
    let cfg = TgcConfig::tiny().with_clip_finetune(ClipFinetune::QueryValue);
    let probe = cfg.clone();
    let px = Tensor::randn(
        0f32,
        1.0,
        (2, 3, cfg.clip_size, cfg.clip_size),
        &Device::Cpu,
    )
    .unwrap();
    let (m, changed, dir) = train_two_steps(&cfg);
    let frozen_before = model(&probe).towers().encode_images(&px).unwrap();

    let clip: BTreeSet<&String> = changed
        .iter()
        .filter(|n| n.starts_with("clip_vision."))
        .collect();
    let layers = cfg.clip.vision.layers;
    let want: BTreeSet<String> = (0..layers)
        .flat_map(|i| {
            ["q_proj", "v_proj"].into_iter().flat_map(move |p| {
                ["weight", "bias"]
                    .into_iter()
                    .map(move |w| format!("clip_vision.encoder.layers.{i}.self_attn.{p}.{w}"))
            })
        })
        .collect();
    assert_eq!(clip, want.iter().collect(), "changed CLIP variables");
    for module in ["sse.", "date.", "vlcm.", "decoder."] {
        assert!(
            changed.iter().any(|n| n.starts_with(module)),
            "no {module} variable changed"
        );
    }

    // The frozen towers were not touched by training (the tower's Vars are copies).
    let frozen_after = m.towers().encode_images(&px).unwrap();
    assert!(values(&frozen_before.patch_tokens) == values(&frozen_after.patch_tokens));
    assert!(values(&frozen_before.dense_embeds) == values(&frozen_after.dense_embeds));
    // Every other tensor of the trainable tower is bit-identical to the pretrained one:
    // a fresh model given only the saved Vars computes bit-identical image features.
    let fresh = model(&cfg);
    fresh
        .load_weights(dir.path().join("run").join("last.safetensors"))
        .unwrap();
    let a = m.encode_images(&px).unwrap();
    let b = fresh.encode_images(&px).unwrap();
    assert!(values(&a.patch_tokens) == values(&b.patch_tokens));
    assert!(values(&a.dense_embeds) == values(&b.dense_embeds));
    // ... and differ from the frozen tower's now.
    assert!(values(&a.patch_tokens) != values(&frozen_after.patch_tokens));
}

#[test]
fn full_finetune_gives_every_vision_parameter_a_gradient() {
    let cfg = TgcConfig::tiny().with_clip_finetune(ClipFinetune::Full);
    // Two optimiser steps (also off the zero-initialised Deformable DETR point).
    let (m, changed, _dir) = train_two_steps(&cfg);
    let clip_vars: Vec<_> = m
        .trainable_vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with("clip_vision."))
        .collect();
    // Patch, class and position embeddings, pre-LN (2), post-LN (2), projection, and 16
    // tensors per block (2 LayerNorms, q/k/v/out projections, 2 MLP linears).
    let n_vision = 8 + 16 * cfg.clip.vision.layers;
    assert_eq!(clip_vars.len(), n_vision);
    for (n, _) in &clip_vars {
        assert!(changed.contains(n), "{n} did not change in training");
    }
    // One more batch through the trainer's own path: every vision Var gets a finite,
    // non-zero gradient.
    let pre = preprocess(&cfg);
    let loader = DataLoader::new(
        phantoms(4, 3, cfg.label_size),
        pre,
        4,
        None,
        Augment::off(),
        Device::Cpu,
    );
    let batch = loader.epoch(0).next().unwrap().unwrap();
    let mut store = FeatureStore::new(None, &pre, true);
    let logits = batch_logits(&m, &mut store, &batch, true).unwrap();
    let grads = dice_bce(&logits, &batch.masks, 0.5, 0.5)
        .unwrap()
        .backward()
        .unwrap();
    for (n, v) in &clip_vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{n}: no gradient"));
        let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s.is_finite() && s > 0.0, "{n}: gradient |sum| {s}");
    }
}
