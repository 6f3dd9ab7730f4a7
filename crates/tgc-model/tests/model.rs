//! TgcNet composition: shapes, parameter counts, gradient flow for every ablation, and
//! checkpoints.

use candle_core::Device;
use tgc_model::{SseMode, TextMode, TgcConfig, TgcNet, VlcmVariant, WeightSource};

mod common;
use common::{check_gradients, input};

#[test]
fn every_ablation_variant_trains_every_parameter() {
    let base = TgcConfig::tiny();
    check_gradients(base.clone(), 2);
    check_gradients(base.clone(), 1);
    for mode in [SseMode::ClipOnly, SseMode::CnnOnly] {
        check_gradients(base.clone().with_sse_mode(mode), 1);
    }
    for tm in [
        TextMode::MainOnly,
        TextMode::AuxOnly,
        TextMode::Concatenated,
    ] {
        check_gradients(base.clone().with_text_mode(tm), 1);
    }
    for v in [
        VlcmVariant::Identity,
        VlcmVariant::SingleCrossAttn,
        VlcmVariant::BiCrossAttn,
    ] {
        check_gradients(base.clone().with_vlcm(v), 1);
    }
    let mut no_clip_cost = base.clone();
    no_clip_cost.decoder.use_clip_cost = false;
    check_gradients(no_clip_cost, 1);
    // "none": no SSE, no DATE, no VLCM.
    check_gradients(
        base.with_sse_mode(SseMode::ClipOnly)
            .with_text_mode(TextMode::MainOnly)
            .with_vlcm(VlcmVariant::Identity),
        1,
    );
}

/// `tiny` with the text FiLM and the decoder's quarter stage.
fn tiny_with_quarter_stage() -> TgcConfig {
    let mut cfg = TgcConfig::tiny();
    cfg.decoder.text_film = true;
    cfg.decoder.quarter = Some(tgc_decoder::QuarterStage {
        in_channels: cfg.sse.stem_channels,
        proj: 4,
        up_channels: 8,
        dim: 8,
    });
    cfg
}

/// The decoder's optional 1/4 stage (guided by the SSE's stem output): logits still come
/// out at the label size, every parameter (stem included) gets a gradient, and a stage
/// whose input width is not the stem's, or one without a CNN, is a config error.
#[test]
fn quarter_stage_trains_every_parameter() {
    let cfg = tiny_with_quarter_stage();
    check_gradients(cfg.clone(), 2);
    let mut bad = cfg.clone();
    bad.decoder.quarter.as_mut().unwrap().in_channels += 1;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("stem_channels"), "{err}");
    let err = cfg
        .with_sse_mode(SseMode::ClipOnly)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("clip_only"), "{err}");
}

/// The decoder's optional 1/2 stage (guided by the CNN branch's input image): logits
/// still come out at the label size, every parameter gets a gradient, and a stage whose
/// input width is not the image's, or one without a CNN, is a config error.
#[test]
fn half_stage_trains_every_parameter() {
    let mut cfg = tiny_with_quarter_stage();
    cfg.decoder.half = Some(tgc_decoder::HalfStage {
        in_channels: cfg.sse.in_channels,
        proj: 4,
        up_channels: 4,
        dim: 4,
    });
    check_gradients(cfg.clone(), 2);
    let mut bad = cfg.clone();
    bad.decoder.half.as_mut().unwrap().in_channels += 1;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("sse.in_channels"), "{err}");
    let mut no_quarter = cfg.clone();
    no_quarter.decoder.quarter = None;
    let err = no_quarter.validate().unwrap_err().to_string();
    assert!(err.contains("quarter"), "{err}");
    let err = cfg
        .with_sse_mode(SseMode::ClipOnly)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("clip_only"), "{err}");
}

/// Every model configuration shipped in `configs/` (the QaTa runs of docs/results.md and
/// the probes under `configs/probes/`) parses, validates, builds, and trains every
/// parameter: a stale field or a width mismatch there would otherwise surface only when
/// someone reruns a documented command.
#[test]
fn committed_configs_build_and_train_every_parameter() {
    fn json_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                json_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "json") {
                out.push(path);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut files = Vec::new();
    json_files(&root, &mut files);
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the committed configs, found {files:?}"
    );
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg: TgcConfig = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{} is invalid: {e}", path.display()));
        // Printed so that a failing gradient check names the file.
        eprintln!("checking {}", path.display());
        check_gradients(cfg, 1);
    }
}

#[test]
fn cpu_preset_trains_every_parameter() {
    check_gradients(TgcConfig::cpu(), 1);
}

#[test]
fn parameter_counts_per_module_match_module_formulas() {
    let cfg = TgcConfig::cpu();
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap();
    let c = model.param_counts();
    assert_eq!(c.per_module["date"], cfg.date.num_params());
    assert_eq!(c.per_module["vlcm"], cfg.vlcm.num_params());
    assert_eq!(c.trainable, c.per_module.values().sum::<usize>());
    // Frozen towers: the formula against the actual tensors of the tiny CLIP.
    let tiny = TgcConfig::tiny();
    let tensors = tgc_clip::weights::random_tensors(&tiny.clip, 0).unwrap();
    let actual: usize = tensors.values().map(|t| t.elem_count()).sum();
    assert_eq!(tgc_model::clip_param_count(&tiny), actual);
}

#[test]
fn paper_preset_runs_and_is_near_the_papers_size() {
    let cfg = TgcConfig::paper();
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap();
    let c = model.param_counts();
    println!("paper preset: {c:?}");
    let rel = (c.trainable as f64 - 10.3e6).abs() / 10.3e6;
    assert!(
        rel < 0.15,
        "paper preset has {} trainable parameters ({:.1}% from 10.3M)",
        c.trainable,
        rel * 100.0
    );
    assert!(
        c.frozen > 400_000_000,
        "ViT-L/14 CLIP has ~428M parameters, counted {}",
        c.frozen
    );
    let logits = model.forward(&input(&cfg, 1, 1, 0), false).unwrap();
    assert_eq!(logits.dims(), &[1, 1, cfg.label_size, cfg.label_size]);
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}

#[test]
fn checkpoints_round_trip_and_reject_other_configs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cfg = TgcConfig::tiny();
    let a = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap();
    a.save_weights(&path).unwrap();
    // A second model with another init seed becomes identical after loading.
    let towers =
        tgc_model::FrozenTowers::load(&cfg, &WeightSource::Random { seed: 0 }, &Device::Cpu)
            .unwrap();
    let b = TgcNet::new_seeded(cfg.clone(), towers, 99).unwrap();
    let inp = input(&cfg, 1, 1, 5);
    let before: Vec<f32> = b
        .forward(&inp, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    b.load_weights(&path).unwrap();
    let la: Vec<f32> = a
        .forward(&inp, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let lb: Vec<f32> = b
        .forward(&inp, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(
        before, la,
        "differently seeded models should differ before loading"
    );
    assert_eq!(la, lb);
    // Another config: the error names the differing field.
    let mut other = cfg.clone();
    other.decoder.hidden = 16;
    other.decoder.guidance_dim = 16;
    let c = TgcNet::load(other, &WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap();
    let err = c.load_weights(&path).unwrap_err().to_string();
    assert!(
        err.contains("decoder.hidden") && err.contains("model.safetensors"),
        "{err}"
    );
    // A truncated file names the file.
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("truncated.safetensors");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let err = b.load_weights(&bad).unwrap_err().to_string();
    assert!(err.contains("truncated.safetensors"), "{err}");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let cfg = TgcConfig::tiny();
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap();
    let mut inp = input(&cfg, 1, 1, 0);
    inp.prompts = vec![vec!["  ".into()]];
    let err = model.forward(&inp, false).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let mut bad = cfg.clone();
    bad.cnn_size = 96;
    let err = TgcNet::load(bad, &WeightSource::Random { seed: 0 }, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cnn_size"), "{err}");
}
