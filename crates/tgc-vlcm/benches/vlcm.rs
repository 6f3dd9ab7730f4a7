//! Forward + backward time of every VLCM variant at the `cpu` preset geometry
//! (B = 8 images, K = 1 prompt, D = 128, 14 x 14 grid, L = 77 tokens, D_t = 512).
//! Compare the variants as ratios to `identity` measured in the same run:
//!
//! ```text
//! cargo bench -p tgc-vlcm --bench vlcm
//! ```

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use tgc_vlcm::{Vlcm, VlcmConfig, VlcmVariant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (b, k, d, g, l, dt) = (8, 1, 128, 14, 77, 512);
    let vision = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, d, g, g), &dev).unwrap()).unwrap();
    let text = Tensor::randn(0f32, 1.0, (b * k, l, dt), &dev).unwrap();
    // Realistic padding: prompts of 20 tokens out of 77.
    let mask = Tensor::cat(
        &[
            Tensor::ones((b * k, 20), DType::F32, &dev).unwrap(),
            Tensor::zeros((b * k, l - 20), DType::F32, &dev).unwrap(),
        ],
        1,
    )
    .unwrap();
    let mut group = c.benchmark_group("vlcm_fwd_bwd_cpu_preset");
    group.sample_size(10);
    for variant in VlcmVariant::ALL {
        let cfg = VlcmConfig {
            d_model: d,
            text_dim: dt,
            heads: 8,
            variant,
            eps: 1e-5,
        };
        let vm = VarMap::new();
        let vlcm = Vlcm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        group.bench_function(variant.name(), |bench| {
            bench.iter(|| {
                let out = vlcm.forward(&vision, &text, &mask, k).unwrap();
                let loss = (out.vision.sum_all().unwrap()
                    + out.text.sqr().unwrap().sum_all().unwrap())
                .unwrap();
                loss.backward().unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
