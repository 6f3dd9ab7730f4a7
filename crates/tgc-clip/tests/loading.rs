//! Weight sources: the hf-hub cache path offline, named errors for missing and
//! mis-shaped tensors, and the deterministic random initialisation.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use tgc_clip::weights::{expected_tensors, random_tensors};
use tgc_clip::{ClipConfig, ClipModel, Error, WeightSource};

fn load_file(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn save(ts: &HashMap<String, Tensor>, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    candle_core::safetensors::save(ts, &p).unwrap();
    p
}

/// A warm hub cache laid out as `hf-hub` writes it, read without any network.
#[test]
fn hub_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.path().join("models--tgc-test--tiny-clip");
    let snap = repo_dir.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), rev).unwrap();
    std::fs::copy(
        fixture("tiny_clip.safetensors"),
        snap.join("model.safetensors"),
    )
    .unwrap();

    // The cache API sees it ...
    let found = hf_hub::Cache::new(cache.path().to_path_buf())
        .model("tgc-test/tiny-clip".to_string())
        .get("model.safetensors");
    assert_eq!(
        found.as_deref(),
        Some(snap.join("model.safetensors").as_path())
    );

    // ... and so does the model loader, by branch name and by commit.
    let g = golden();
    for revision in ["main", rev] {
        let src = WeightSource::Hub {
            repo: "tgc-test/tiny-clip".into(),
            revision: revision.into(),
            cache_dir: Some(cache.path().to_path_buf()),
        };
        assert_eq!(src.resolve().unwrap(), vec![snap.join("model.safetensors")]);
        let m = ClipModel::load(&ClipConfig::tiny(), &src, &Device::Cpu).unwrap();
        let out = m.encode_image_dense(&g["tiny.native.pixels"]).unwrap();
        assert_close(
            "hub pooled",
            &out.pooled_embeds,
            &g["tiny.native.pooled_embeds"],
            1e-4,
        );
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Hugging Face names
    let mut ts = load_file("tiny_clip.safetensors");
    let gone = "vision_model.encoder.layers.1.mlp.fc2.bias";
    ts.remove(gone).unwrap();
    let p = save(&ts, dir.path(), "hf.safetensors");
    match ClipModel::load(
        &ClipConfig::tiny(),
        &WeightSource::File(p.clone()),
        &Device::Cpu,
    ) {
        Err(Error::MissingTensor {
            name,
            hf_name,
            files,
        }) => {
            assert_eq!(name, gone);
            assert_eq!(hf_name, gone);
            assert!(files.contains("hf.safetensors"), "{files}");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // open_clip names: the error gives the open_clip name and what it maps to
    let mut ts = load_file("tiny_clip_openclip.safetensors");
    ts.remove("transformer.resblocks.1.attn.in_proj_weight")
        .unwrap();
    let p = save(&ts, dir.path(), "oc.safetensors");
    let err =
        ClipModel::load(&ClipConfig::tiny(), &WeightSource::File(p), &Device::Cpu).unwrap_err();
    match &err {
        Error::MissingTensor { name, hf_name, .. } => {
            assert_eq!(name, "transformer.resblocks.1.attn.in_proj_weight");
            assert_eq!(
                hf_name,
                "text_model.encoder.layers.1.self_attn.q_proj.weight"
            );
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("in_proj_weight") && msg.contains("oc.safetensors"),
        "{msg}"
    );
}

#[test]
fn misshaped_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut ts = load_file("tiny_clip.safetensors");
    ts.insert(
        "text_projection.weight".into(),
        Tensor::zeros((8, 16), DType::F16, &Device::Cpu).unwrap(),
    );
    let p = save(&ts, dir.path(), "bad.safetensors");
    match ClipModel::load(
        &ClipConfig::tiny(),
        &WeightSource::File(p.clone()),
        &Device::Cpu,
    ) {
        Err(Error::ShapeMismatch {
            name,
            file,
            expected,
            got,
            ..
        }) => {
            assert_eq!(name, "text_projection.weight");
            assert_eq!(file, p);
            assert_eq!(expected, vec![16, 16]);
            assert_eq!(got, vec![8, 16]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // A config that does not fit the checkpoint: the first mismatch is named.
    let mut cfg = ClipConfig::tiny();
    cfg.vision.patch_size = 4;
    cfg.vision.image_size = 16;
    let err = ClipModel::load(
        &cfg,
        &WeightSource::File(fixture("tiny_clip_openclip.safetensors")),
        &Device::Cpu,
    )
    .unwrap_err();
    match err {
        Error::ShapeMismatch {
            name,
            expected,
            got,
            ..
        } => {
            assert_eq!(name, "visual.conv1.weight");
            assert_eq!(expected, vec![32, 3, 4, 4]);
            assert_eq!(got, vec![32, 3, 8, 8]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn unknown_naming_and_empty_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut ts = HashMap::new();
    ts.insert(
        "foo".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = save(&ts, dir.path(), "foo.safetensors");
    assert!(matches!(
        ClipModel::load(&ClipConfig::tiny(), &WeightSource::File(p), &Device::Cpu),
        Err(Error::UnknownNaming { .. })
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        ClipModel::load(
            &ClipConfig::tiny(),
            &WeightSource::Dir(empty.path().into()),
            &Device::Cpu
        ),
        Err(Error::NoWeights(_))
    ));
}

#[test]
fn random_weights_are_deterministic_and_scaled() {
    let cfg = ClipConfig::tiny();
    let a = random_tensors(&cfg, 7).unwrap();
    let b = random_tensors(&cfg, 7).unwrap();
    let c = random_tensors(&cfg, 8).unwrap();
    assert_eq!(a.len(), expected_tensors(&cfg).len());
    let name = "text_model.embeddings.token_embedding.weight";
    assert_eq!(max_abs_diff(&a[name], &b[name]), 0.0);
    assert!(max_abs_diff(&a[name], &c[name]) > 0.01);
    // normal(0, 0.02): 790k samples, so mean and std are tight
    let v = a[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 1e-4, "mean {mean}");
    assert!((std - 0.02).abs() < 2e-4, "std {std}");
    let ln = a["vision_model.post_layernorm.weight"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(ln.iter().all(|&x| x == 1.0));
    let bias = a["vision_model.encoder.layers.0.mlp.fc1.bias"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(bias.iter().all(|&x| x == 0.0));

    // Same seed, same model outputs; non-degenerate dense features.
    let m1 = ClipModel::load(&cfg, &WeightSource::Random { seed: 7 }, &Device::Cpu).unwrap();
    let m2 = ClipModel::load(&cfg, &WeightSource::Random { seed: 7 }, &Device::Cpu).unwrap();
    let g = golden();
    let o1 = m1.encode_image_dense(&g["tiny.native.pixels"]).unwrap();
    let o2 = m2.encode_image_dense(&g["tiny.native.pixels"]).unwrap();
    assert_eq!(max_abs_diff(&o1.dense_embeds, &o2.dense_embeds), 0.0);
    let spread = o1
        .dense_embeds
        .flatten_all()
        .unwrap()
        .var(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        spread > 1e-4 && spread.is_finite(),
        "dense feature variance {spread}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let m = ClipModel::load(
        &ClipConfig::tiny(),
        &WeightSource::Random { seed: 0 },
        &Device::Cpu,
    )
    .unwrap();
    let dev = Device::Cpu;
    let odd = Tensor::zeros((1, 3, 30, 32), DType::F32, &dev).unwrap();
    assert!(matches!(m.encode_image_dense(&odd), Err(Error::Input(_))));
    let two_ch = Tensor::zeros((1, 2, 32, 32), DType::F32, &dev).unwrap();
    assert!(matches!(
        m.encode_image_dense(&two_ch),
        Err(Error::Input(_))
    ));
    let img = Tensor::zeros((1, 3, 32, 32), DType::F32, &dev).unwrap();
    assert!(matches!(
        m.encode_image_dense_with(&img, &[3]),
        Err(Error::Input(_))
    ));
    let long = Tensor::zeros((1, 78), DType::U32, &dev).unwrap();
    assert!(matches!(m.encode_text(&long, None), Err(Error::Input(_))));
    let oov = Tensor::new(&[[49406u32, 49408]], &dev).unwrap();
    assert!(matches!(m.encode_text(&oov, None), Err(Error::Input(_))));
    let ids = Tensor::new(&[[49406u32, 49407]], &dev).unwrap();
    let bad_mask = Tensor::ones((1, 3), DType::F32, &dev).unwrap();
    assert!(matches!(
        m.encode_text(&ids, Some(&bad_mask)),
        Err(Error::Input(_))
    ));
}
