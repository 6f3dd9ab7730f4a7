//! Fused vs generic softmax (forward + backward) at the CPU preset's VLCM attention shape
//! (B=8, 8 heads, 196 queries, 273 keys). Run: `cargo bench -p tgc-nn --bench softmax`.

use candle_core::{Device, Tensor, Var, D};
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 8, 196, 273), &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 1.0, (8, 8, 196, 273), &dev).unwrap();
    let mut g = c.benchmark_group("softmax_fwd_bwd_8x8x196x273");
    g.sample_size(10);
    g.bench_function("tgc_nn_fused", |b| {
        b.iter(|| {
            let y = tgc_nn::softmax_last_dim(x.as_tensor()).unwrap();
            (y * &w).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    g.bench_function("candle_generic", |b| {
        b.iter(|| {
            let y = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
            (y * &w).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
