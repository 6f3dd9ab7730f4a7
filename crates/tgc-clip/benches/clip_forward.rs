//! ViT-B/16 vision forward at 224 px, batch 1, random frozen weights.
//!
//! Run: `cargo bench -p tgc-clip --bench clip_forward`; the PyTorch side-by-side
//! is `python3 crates/tgc-clip/benches/clip_forward_torch.py` (see docs/clip.md).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use tgc_clip::{ClipConfig, ClipModel, WeightSource};

fn vit_b16_forward(c: &mut Criterion) {
    let dev = Device::Cpu;
    let model = ClipModel::load(
        &ClipConfig::vit_b16(),
        &WeightSource::Random { seed: 0 },
        &dev,
    )
    .expect("random ViT-B/16");
    let img = Tensor::randn(0f32, 1f32, (1, 3, 224, 224), &dev)
        .and_then(|t| t.to_dtype(DType::F32))
        .expect("input");
    let mut g = c.benchmark_group("clip_forward");
    g.sample_size(20);
    g.bench_function("vit_b16_224_dense_b1", |b| {
        b.iter(|| model.encode_image_dense(&img).expect("forward"))
    });
    g.finish();
}

criterion_group!(benches, vit_b16_forward);
criterion_main!(benches);
