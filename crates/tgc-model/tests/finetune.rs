//! CLIP vision fine-tuning (`clip_finetune`, the paper's Table 4 encoder rows): which
//! parameters become trainable, that the fine-tuned model starts from the frozen one,
//! gradient flow into the tower, parameter counts, checkpoints and config handling.

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor};
use tgc_model::finetune::clip_vision_var_name;
use tgc_model::{ClipFinetune, SseMode, TgcConfig, TgcInput, TgcNet, WeightSource};

mod common;
use common::{pseudo, step_off_and_check_gradients};

/// `b` images with one prompt each.
fn input(cfg: &TgcConfig, b: usize, seed: u64) -> TgcInput {
    common::input(cfg, b, 1, seed)
}

fn model(cfg: &TgcConfig, seed: u64) -> TgcNet {
    let towers =
        tgc_model::FrozenTowers::load(cfg, &WeightSource::Random { seed: 0 }, &Device::Cpu)
            .unwrap();
    TgcNet::new_seeded(cfg.clone(), towers, seed).unwrap()
}

fn tiny(f: ClipFinetune) -> TgcConfig {
    TgcConfig::tiny().with_clip_finetune(f)
}

fn clip_vars(m: &TgcNet) -> BTreeSet<String> {
    m.trainable_vars()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("clip_vision."))
        .collect()
}

/// Hugging Face names of the vision tower's tensors (the tiny CLIP).
fn vision_names(cfg: &TgcConfig) -> Vec<(String, usize)> {
    tgc_clip::weights::expected_tensors(&cfg.clip)
        .into_iter()
        .filter(|(n, _)| n.starts_with("vision_model.") || n.starts_with("visual_projection."))
        .map(|(n, s)| (n, s.iter().product()))
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn finetune_policy_decides_which_clip_parameters_are_vars() {
    let frozen = model(&tiny(ClipFinetune::Frozen), 0);
    assert!(clip_vars(&frozen).is_empty());
    assert!(!frozen.finetunes_clip());
    let base = frozen.param_counts();
    assert!(!base.per_module.contains_key("clip_vision"));
    assert_eq!(base.frozen, tgc_model::clip_param_count(&TgcConfig::tiny()));

    // q,v: exactly every layer's q_proj and v_proj weight and bias.
    let qv = model(&tiny(ClipFinetune::QueryValue), 0);
    let layers = TgcConfig::tiny().clip.vision.layers;
    let want: BTreeSet<String> = (0..layers)
        .flat_map(|i| {
            ["q_proj", "v_proj"].into_iter().flat_map(move |p| {
                ["weight", "bias"]
                    .into_iter()
                    .map(move |w| format!("clip_vision.encoder.layers.{i}.self_attn.{p}.{w}"))
            })
        })
        .collect();
    assert_eq!(clip_vars(&qv), want);
    let d = TgcConfig::tiny().clip.vision.width;
    let c = qv.param_counts();
    assert_eq!(c.per_module["clip_vision"], layers * 2 * (d * d + d));
    assert_eq!(c.trainable, base.trainable + c.per_module["clip_vision"]);
    assert_eq!(c.frozen, base.frozen - c.per_module["clip_vision"]);

    // Full: every vision tensor, under the documented names.
    let cfg = tiny(ClipFinetune::Full);
    let full = model(&cfg, 0);
    let names = vision_names(&cfg);
    let want: BTreeSet<String> = names.iter().map(|(n, _)| clip_vision_var_name(n)).collect();
    assert!(want.contains("clip_vision.visual_projection.weight"));
    assert!(want.contains("clip_vision.embeddings.patch_embedding.weight"));
    assert_eq!(clip_vars(&full), want);
    let c = full.param_counts();
    let n_vision: usize = names.iter().map(|(_, n)| n).sum();
    assert_eq!(c.per_module["clip_vision"], n_vision);
    assert_eq!(c.frozen, base.frozen - n_vision);

    // Without the CLIP cost channel the post-LN and projection reach nothing: not Vars.
    let mut no_cost = tiny(ClipFinetune::Full);
    no_cost.decoder.use_clip_cost = false;
    let vars = clip_vars(&model(&no_cost, 0));
    assert_eq!(vars.len(), want.len() - 3);
    assert!(vars
        .iter()
        .all(|n| !n.contains("post_layernorm") && !n.contains("visual_proj")));
}

/// The trainable tower starts from the loaded weights: before any update, every
/// fine-tuning mode computes what the frozen model computes (equal init seeds).
#[test]
fn finetuned_model_starts_where_the_frozen_one_is() {
    let inp = input(&TgcConfig::tiny(), 2, 3);
    let want = model(&tiny(ClipFinetune::Frozen), 5)
        .forward(&inp, false)
        .unwrap();
    for f in [ClipFinetune::QueryValue, ClipFinetune::Full] {
        let m = model(&tiny(f), 5);
        let got = m.forward(&inp, false).unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-5, "{f:?}: max |diff| {d}");
        // Image features are tracked now: they come from Vars.
        let feats = m.encode_images(&inp.clip_images).unwrap();
        assert!(feats.patch_tokens.track_op(), "{f:?}");
    }
}

/// Forward on raw input, one SGD step off the zero-initialised Deformable DETR point,
/// then every trainable variable (the CLIP ones included) must get a finite, non-zero
/// gradient; the frozen text features none.
fn check_gradients(cfg: TgcConfig) {
    let name = format!("{:?}/{:?}", cfg.sse.mode, cfg.clip_finetune);
    let m = model(&cfg, 1);
    let inp = input(&cfg, 2, 7);
    let target = pseudo(&[2, 1, cfg.label_size, cfg.label_size], 11, &Device::Cpu)
        .ge(0.4)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let loss = || {
        let logits = m.forward(&inp, true).unwrap();
        (logits - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    assert!(!clip_vars(&m).is_empty(), "{name}: no CLIP variables");
    step_off_and_check_gradients(&m, &name, loss);
    let (primary, _) = m.encode_prompts(&inp.prompts, None).unwrap();
    assert!(
        !primary.states.track_op(),
        "{name}: text tower must stay frozen"
    );
}

#[test]
fn every_finetuned_clip_parameter_gets_a_gradient() {
    // ViT q,v / ViT full fine-tune (no CNN), and CNN+ViT full fine-tune.
    check_gradients(tiny(ClipFinetune::QueryValue).with_sse_mode(SseMode::ClipOnly));
    check_gradients(tiny(ClipFinetune::Full).with_sse_mode(SseMode::ClipOnly));
    check_gradients(tiny(ClipFinetune::Full));
}

#[test]
fn precomputed_image_features_are_refused_when_finetuning() {
    let cfg = tiny(ClipFinetune::QueryValue);
    let m = model(&cfg, 0);
    let inp = input(&cfg, 1, 2);
    let image = m.towers().encode_images(&inp.clip_images).unwrap();
    let (p, a) = m.encode_prompts(&inp.prompts, None).unwrap();
    let err = m
        .forward_features(&image, &inp.cnn_images, &p, a.as_ref(), 1, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("clip_finetune") && err.contains("forward_images"),
        "{err}"
    );
    // forward_images (cached prompts, raw images) is the way, and agrees with forward.
    let x = m
        .forward_images(&inp.clip_images, &inp.cnn_images, &p, a.as_ref(), 1, false)
        .unwrap();
    let y = m.forward(&inp, false).unwrap();
    assert_eq!(max_diff(&x, &y), 0.0);
}

#[test]
fn finetuned_checkpoints_round_trip_and_frozen_ones_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(ClipFinetune::Full);
    let a = model(&cfg, 0);
    // Move the CLIP weights away from the pretrained ones, as training would.
    for (n, v) in a.trainable_vars() {
        if n.starts_with("clip_vision.") {
            let shifted = (v.as_tensor()
                + pseudo(v.dims(), 9, &Device::Cpu).affine(0.01, 0.0).unwrap())
            .unwrap();
            v.set(&shifted).unwrap();
        }
    }
    let path = dir.path().join("full.safetensors");
    a.save_weights(&path).unwrap();
    let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(saved.contains_key("clip_vision.encoder.layers.1.mlp.fc2.weight"));

    let b = model(&cfg, 42);
    let inp = input(&cfg, 1, 4);
    let before = b.forward(&inp, false).unwrap();
    b.load_weights(&path).unwrap();
    let la = a.forward(&inp, false).unwrap();
    let lb = b.forward(&inp, false).unwrap();
    assert!(max_diff(&before, &la) > 0.0);
    assert_eq!(max_diff(&la, &lb), 0.0);

    // Frozen checkpoint -> fine-tuning model, and the reverse: the config diff names it.
    let frozen = model(&TgcConfig::tiny(), 0);
    let fpath = dir.path().join("frozen.safetensors");
    frozen.save_weights(&fpath).unwrap();
    let err = b.load_weights(&fpath).unwrap_err().to_string();
    assert!(
        err.contains("clip_finetune") && err.contains("frozen.safetensors"),
        "{err}"
    );
    let err = frozen.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("clip_finetune"), "{err}");
    let qv = model(&tiny(ClipFinetune::QueryValue), 0);
    let err = qv.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("clip_finetune"), "{err}");

    // A checkpoint written before the field existed (no `clip_finetune` in its config)
    // is a frozen one: it still loads into a frozen model.
    let bytes = std::fs::read(&fpath).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let json = &meta.metadata().as_ref().unwrap()[tgc_model::CONFIG_METADATA_KEY];
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_object_mut().unwrap().remove("clip_finetune").unwrap();
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&fpath, &Device::Cpu).unwrap();
    let old = dir.path().join("old.safetensors");
    let meta = HashMap::from([(tgc_model::CONFIG_METADATA_KEY.to_string(), v.to_string())]);
    safetensors::serialize_to_file(tensors.iter(), Some(meta), &old).unwrap();
    frozen.load_weights(&old).unwrap();
    let err = b.load_weights(&old).unwrap_err().to_string();
    assert!(err.contains("clip_finetune"), "{err}");

    // One written by a newer version, with a field this one does not know, is refused
    // by name instead of loading as a different model or failing on a tensor shape.
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["decoder"]["future_stage"] = serde_json::json!({"heads": 4});
    let newer = dir.path().join("newer.safetensors");
    let meta = HashMap::from([(tgc_model::CONFIG_METADATA_KEY.to_string(), v.to_string())]);
    safetensors::serialize_to_file(tensors.iter(), Some(meta), &newer).unwrap();
    let err = frozen.load_weights(&newer).unwrap_err().to_string();
    assert!(
        err.contains("`decoder.future_stage`") && err.contains("newer.safetensors"),
        "{err}"
    );
    // An explicit null for a field this version lacks carries no setting: it loads.
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["decoder"]["future_stage"] = serde_json::Value::Null;
    let meta = HashMap::from([(tgc_model::CONFIG_METADATA_KEY.to_string(), v.to_string())]);
    safetensors::serialize_to_file(tensors.iter(), Some(meta), &newer).unwrap();
    frozen.load_weights(&newer).unwrap();
}

#[test]
fn strict_config_parsing_names_unknown_fields() {
    let mut v = serde_json::to_value(TgcConfig::tiny()).unwrap();
    assert_eq!(
        TgcConfig::from_json_value(v.clone()).unwrap(),
        TgcConfig::tiny()
    );
    // Missing fields take defaults (configs written before a field existed).
    v.as_object_mut().unwrap().remove("clip_finetune");
    assert_eq!(
        TgcConfig::from_json_value(v.clone()).unwrap(),
        TgcConfig::tiny()
    );
    v["sse"]["msda"]["n_pionts"] = 4.into();
    v["labelsize"] = 224.into();
    let err = TgcConfig::from_json_value(v).unwrap_err().to_string();
    assert!(
        err.contains("`sse.msda.n_pionts`") && err.contains("`labelsize`"),
        "{err}"
    );
    let err = TgcConfig::from_json("{not json").unwrap_err().to_string();
    assert!(err.contains("invalid JSON"), "{err}");
}

#[test]
fn committed_configs_parse_strictly_and_validate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for dir in [root.clone(), root.join("probes")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "json") {
                let cfg = TgcConfig::from_json(&std::fs::read_to_string(&p).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                cfg.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
    }
    assert!(n >= 5, "only {n} configs found under {}", root.display());
}

#[test]
fn config_field_parses_defaults_and_validates() {
    assert_eq!(TgcConfig::paper().clip_finetune, ClipFinetune::Frozen);
    assert_eq!(TgcConfig::cpu().clip_finetune, ClipFinetune::Frozen);
    assert_eq!(TgcConfig::tiny().clip_finetune, ClipFinetune::Frozen);
    for f in [
        ClipFinetune::Frozen,
        ClipFinetune::QueryValue,
        ClipFinetune::Full,
    ] {
        assert_eq!(serde_json::to_value(f).unwrap(), f.to_string());
    }
    let mut v = serde_json::to_value(TgcConfig::tiny()).unwrap();
    assert_eq!(v["clip_finetune"], "frozen");
    v["clip_finetune"] = "query_value".into();
    let c: TgcConfig = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(c.clip_finetune, ClipFinetune::QueryValue);
    v.as_object_mut().unwrap().remove("clip_finetune");
    let c: TgcConfig = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(c.clip_finetune, ClipFinetune::Frozen);
    v["clip_finetune"] = "everything".into();
    assert!(serde_json::from_value::<TgcConfig>(v).is_err());
    // CNN-only does not use CLIP's image features: nothing to fine-tune.
    let bad = tiny(ClipFinetune::Full).with_sse_mode(SseMode::CnnOnly);
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("clip_finetune") && err.contains("cnn_only"),
        "{err}"
    );
}
