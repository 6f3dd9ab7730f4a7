//! SSE speed on the CPU preset: batch 8 at S_n = 448 (14 x 14 CLIP grid, D_v = 256).
//!
//! Run: `cargo bench -p tgc-sse --bench sse` (add `-- cnn` etc. to filter).
//!
//! - `cnn/forward`, `cnn/forward_backward`: the CNN branch alone (the baseline);
//! - `sse_full/forward`, `sse_full/forward_backward`: the whole Full-mode SSE (CNN, fusion,
//!   3 MSDeformAttn layers);
//! - `sse_clip_only/*`: the ClipOnly ablation.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use tgc_sse::{Sse, SseConfig, SseMode};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 8;
const S_N: usize = 448;

/// Random-weighted scalar loss over the outputs (a plain sum has zero gradient through
/// the final normalisations).
fn loss(outs: &[&Tensor], weights: &[Tensor]) -> Tensor {
    outs.iter()
        .zip(weights)
        .map(|(t, w)| (*t * w).unwrap().sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let image = Tensor::randn(0f32, 1.0, (BATCH, 3, S_N, S_N), &dev).unwrap();
    let g = S_N / 32;

    let modes = [
        ("sse_full", SseMode::Full),
        ("sse_clip_only", SseMode::ClipOnly),
    ];

    // The CNN branch alone (from a Full-mode SSE).
    {
        let cfg = SseConfig::cpu();
        let varmap = VarMap::new();
        let sse = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let feats = sse.cnn_features(&image).unwrap();
        let w: Vec<Tensor> = feats
            .iter()
            .map(|t| Tensor::randn(0f32, 1.0, t.shape(), &dev).unwrap())
            .collect();
        let mut group = c.benchmark_group("cnn");
        group.sample_size(10);
        group.bench_function("forward", |bch| {
            bch.iter(|| sse.cnn_features(&image).unwrap())
        });
        group.bench_function("forward_backward", |bch| {
            bch.iter(|| {
                let f = sse.cnn_features(&image).unwrap();
                loss(&[&f[0], &f[1], &f[2]], &w).backward().unwrap()
            })
        });
        group.finish();
    }

    for (name, mode) in modes {
        let cfg = SseConfig::cpu().with_mode(mode);
        let varmap = VarMap::new();
        let sse = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let clip = Tensor::randn(0f32, 1.0, (BATCH, g * g, cfg.clip_dim), &dev).unwrap();
        let out = sse.forward(&image, Some(&clip), true).unwrap();
        let w: Vec<Tensor> = [&out.f8, &out.f16, &out.f32]
            .iter()
            .map(|t| Tensor::randn(0f32, 1.0, t.shape(), &dev).unwrap())
            .collect();
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        group.bench_function("forward", |bch| {
            bch.iter(|| sse.forward(&image, Some(&clip), false).unwrap())
        });
        group.bench_function("forward_backward", |bch| {
            bch.iter(|| {
                let o = sse.forward(&image, Some(&clip), true).unwrap();
                loss(&[&o.f8, &o.f16, &o.f32], &w).backward().unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
