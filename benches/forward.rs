//! Forward and forward+backward of the trainable modules of TgcNet at batch 8, on frozen
//! features (as training with the feature cache runs them), for the `tiny` and `cpu`
//! presets. Run: `cargo bench --bench forward` (the `cpu` preset takes minutes per sample
//! on two cores; see docs/results.md).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use tgc::model::{TgcConfig, TgcNet, WeightSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_preset(c: &mut Criterion, cfg: TgcConfig, samples: usize) {
    let dev = Device::Cpu;
    let b = 8;
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &dev).unwrap();
    let clip = Tensor::randn(0f32, 1.0, (b, 3, cfg.clip_size, cfg.clip_size), &dev).unwrap();
    let cnn = Tensor::randn(0f32, 1.0, (b, 3, cfg.cnn_size, cfg.cnn_size), &dev).unwrap();
    let image = model.towers().encode_images(&clip).unwrap();
    let prompts: Vec<Vec<String>> = (0..b)
        .map(|i| {
            vec![format!(
                "unilateral pulmonary infection, one infected area, lower {} lung.",
                ["left", "right"][i % 2]
            )]
        })
        .collect();
    let (primary, aux) = model.encode_prompts(&prompts, None).unwrap();
    let target = Tensor::zeros(
        (b, 1, cfg.label_size, cfg.label_size),
        candle_core::DType::F32,
        &dev,
    )
    .unwrap();
    let mut g = c.benchmark_group(format!("tgcnet_{}_batch8", cfg.preset));
    g.sample_size(samples);
    g.bench_function("forward", |bch| {
        bch.iter(|| {
            model
                .forward_features(&image, &cnn, &primary, aux.as_ref(), 1, false)
                .unwrap()
        })
    });
    g.bench_function("forward_backward", |bch| {
        bch.iter(|| {
            let logits = model
                .forward_features(&image, &cnn, &primary, aux.as_ref(), 1, true)
                .unwrap();
            let loss = tgc::train::dice_bce(&logits, &target, 0.5, 0.5).unwrap();
            loss.backward().unwrap()
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_preset(c, TgcConfig::tiny(), 10);
    bench_preset(c, TgcConfig::cpu(), 10);
}

criterion_group!(group, benches);
criterion_main!(group);
