//! AdamW step and gradient clipping over 10.5M parameters (about TGC-Net's 10.3M
//! trainable), against candle-nn's AdamW (same update, private state) as the baseline.
//!
//! `cargo bench -p tgc-train --bench optim`

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, Criterion};
use tgc_train::{AdamW, AdamWConfig};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let vars: Vec<Var> = (0..40)
        .map(|_| Var::randn(0f32, 1.0, (512, 512), &dev).unwrap())
        .collect();
    let mut grads = GradStore::default();
    for v in &vars {
        let g = Tensor::randn(0f32, 1.0, (512, 512), &dev).unwrap();
        grads.insert(v.as_tensor(), g.to_dtype(DType::F32).unwrap());
    }
    let cfg = AdamWConfig {
        lr: 1e-3,
        ..Default::default()
    };
    let named = vars
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("v{i}"), v.clone()))
        .collect();
    let mut ours = AdamW::new(named, cfg).unwrap();
    let mut baseline = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )
    .unwrap();
    let mut g = c.benchmark_group("adamw_10.5M");
    g.sample_size(10);
    g.bench_function("tgc_train::AdamW::step", |b| {
        b.iter(|| ours.step(&grads, 1e-3).unwrap())
    });
    g.bench_function("candle_nn::AdamW::step (baseline)", |b| {
        b.iter(|| baseline.step(&grads).unwrap())
    });
    g.bench_function("clip_grad_norm (no clipping)", |b| {
        b.iter(|| ours.clip_grad_norm(&mut grads, 1e9).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
