#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use tgc_clip::{Activation, ClipConfig, TextConfig, VisionConfig};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("clip_golden.safetensors"), &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_abs_diff(got, want);
    assert!(d <= tol, "{what}: max |diff| {d} > {tol}");
}

/// The second fixture model of make_fixtures.py (`interp_clip.safetensors`).
pub fn interp_config() -> ClipConfig {
    ClipConfig {
        vision: VisionConfig {
            image_size: 48,
            patch_size: 8,
            num_channels: 3,
            width: 24,
            layers: 2,
            heads: 3,
            mlp_dim: 96,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-5,
        },
        text: TextConfig {
            vocab_size: 1000,
            context_length: 77,
            width: 16,
            layers: 1,
            heads: 2,
            mlp_dim: 64,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-5,
        },
        embed_dim: 8,
    }
}
