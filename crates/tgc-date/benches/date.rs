//! Forward + backward time of DATE at the `cpu` preset text geometry (N = 8 prompt pairs,
//! L = 77 tokens, D_t = 512, 8 heads), against the cost of the LayerNorm-only residual
//! path (`ln_only`: what remains when DATE is ablated to "main only" plus a norm), measured
//! in the same run:
//!
//! ```text
//! cargo bench -p tgc-date --bench date
//! ```

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use tgc_date::{Date, DateConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (n, l, dt) = (8, 77, 512);
    let primary = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, l, dt), &dev).unwrap()).unwrap();
    let aux = Tensor::randn(0f32, 1.0, (n, l, dt), &dev).unwrap();
    let mask = Tensor::cat(
        &[
            Tensor::ones((n, 20), DType::F32, &dev).unwrap(),
            Tensor::zeros((n, l - 20), DType::F32, &dev).unwrap(),
        ],
        1,
    )
    .unwrap();
    let cfg = DateConfig {
        text_dim: dt,
        ..DateConfig::default()
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let date = Date::new(&cfg, vb.pp("date")).unwrap();
    let ln = tgc_nn::layer_norm(dt, 1e-5, vb.pp("ln")).unwrap();
    let mut group = c.benchmark_group("date_fwd_bwd_cpu_preset");
    group.sample_size(20);
    group.bench_function("date", |b| {
        b.iter(|| {
            let (f, _) = date.forward(&primary, &mask, &aux, &mask, true).unwrap();
            f.sqr().unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.bench_function("ln_only", |b| {
        b.iter(|| {
            let f = ln.forward(&primary).unwrap();
            f.sqr().unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
