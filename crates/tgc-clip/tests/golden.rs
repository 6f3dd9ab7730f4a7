//! Outputs against Hugging Face transformers (fixtures from
//! tests/fixtures/make_fixtures.py), in both weight-naming schemes, at the
//! native image size and at bicubically interpolated sizes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use tgc_clip::{similarity_map, ClipConfig, ClipModel, Naming, WeightSource, WeightStore};

const TOL: f32 = 1e-4;

fn check_vision(
    model: &ClipModel,
    g: &std::collections::HashMap<String, Tensor>,
    case: &str,
    layers: &[usize],
) {
    let px = &g[&format!("{case}.pixels")];
    let out = model.encode_image_dense_with(px, layers).unwrap();
    let (_, _, h, w) = px.dims4().unwrap();
    let p = model.config().vision.patch_size;
    assert_eq!(out.grid, (h / p, w / p));
    assert_close(
        &format!("{case} patch_tokens"),
        &out.patch_tokens,
        &g[&format!("{case}.patch_tokens")],
        TOL,
    );
    assert_close(
        &format!("{case} dense_embeds"),
        &out.dense_embeds,
        &g[&format!("{case}.dense_embeds")],
        TOL,
    );
    assert_close(
        &format!("{case} pooled_embeds"),
        &out.pooled_embeds,
        &g[&format!("{case}.pooled_embeds")],
        TOL,
    );
    let hs = out.hidden_states.expect("hidden states requested");
    assert_eq!(hs.len(), layers.len());
    for (t, l) in hs.iter().zip(layers) {
        assert_close(
            &format!("{case} hidden {l}"),
            t,
            &g[&format!("{case}.hidden.{l}")],
            TOL,
        );
    }
}

fn check_text(
    model: &ClipModel,
    g: &std::collections::HashMap<String, Tensor>,
    case: &str,
    with_mask: bool,
) {
    let ids = g[&format!("{case}.ids")].to_dtype(DType::U32).unwrap();
    let mask = if with_mask {
        Some(g[&format!("{case}.mask")].clone())
    } else {
        None
    };
    let out = model.encode_text(&ids, mask.as_ref()).unwrap();
    assert_close(
        &format!("{case} token_states"),
        &out.token_states,
        &g[&format!("{case}.token_states")],
        TOL,
    );
    assert_close(
        &format!("{case} pooled"),
        &out.pooled,
        &g[&format!("{case}.pooled")],
        TOL,
    );
    assert_close(
        &format!("{case} text_embeds"),
        &out.text_embeds,
        &g[&format!("{case}.text_embeds")],
        TOL,
    );
    if let Some(m) = mask {
        assert_close(&format!("{case} mask"), &out.mask, &m, 0.0);
    }
}

fn check_tiny(model: &ClipModel) {
    let g = golden();
    check_vision(model, &g, "tiny.native", &[0, 1, 2]);
    check_vision(model, &g, "tiny.up", &[0, 1, 2]);
    check_vision(model, &g, "tiny.rect", &[2, 0]);
    check_text(model, &g, "tiny.text", true);
    check_text(model, &g, "tiny.text_nomask", false);
}

#[test]
fn tiny_hugging_face_names() {
    let path = fixture("tiny_clip.safetensors");
    assert_eq!(
        WeightStore::open(std::slice::from_ref(&path))
            .unwrap()
            .naming(),
        Naming::HuggingFace
    );
    let m = ClipModel::load(&ClipConfig::tiny(), &WeightSource::File(path), &Device::Cpu).unwrap();
    check_tiny(&m);
}

#[test]
fn tiny_open_clip_names() {
    let path = fixture("tiny_clip_openclip.safetensors");
    assert_eq!(
        WeightStore::open(std::slice::from_ref(&path))
            .unwrap()
            .naming(),
        Naming::OpenClip
    );
    let m = ClipModel::load(&ClipConfig::tiny(), &WeightSource::File(path), &Device::Cpu).unwrap();
    check_tiny(&m);
}

#[test]
fn tiny_from_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny_clip_openclip.safetensors"),
        dir.path().join("a.safetensors"),
    )
    .unwrap();
    let m = ClipModel::load(
        &ClipConfig::tiny(),
        &WeightSource::Dir(dir.path().into()),
        &Device::Cpu,
    )
    .unwrap();
    let g = golden();
    check_vision(&m, &g, "tiny.native", &[1]);
}

/// Second model: 6x6 native grid resampled down (4x5) and up (13x9), exact GELU.
#[test]
fn interpolated_position_embeddings_and_gelu() {
    let m = ClipModel::load(
        &interp_config(),
        &WeightSource::File(fixture("interp_clip.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let g = golden();
    for case in ["interp.native", "interp.down", "interp.up"] {
        check_vision(&m, &g, case, &[2]);
    }
    check_text(&m, &g, "interp.text", true);
}

#[test]
fn similarity_map_matches_reference() {
    let m = ClipModel::load(
        &ClipConfig::tiny(),
        &WeightSource::File(fixture("tiny_clip.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let g = golden();
    let img = g["tiny.rect.pixels"].squeeze(0).unwrap();
    let ids = g["tiny.text.ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap();
    let mask = g["tiny.text.mask"].narrow(0, 0, 1).unwrap();
    let map = similarity_map(&m, &img, &ids, Some(&mask)).unwrap();
    assert_eq!(map.dims(), &[5, 7]);
    assert_close("similarity map", &map, &g["tiny.simmap"], TOL);
}
