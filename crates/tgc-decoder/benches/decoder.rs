//! Decoder speed at the CPU preset (D = 128, 14x14 grid, batch 8, K = 1, CLIP cost), the
//! same with 1x1 guidance projections (`guidance_kernel = 1`), and the paper geometry
//! (D = 256, 24x24 grid, batch 1).
//!
//! Run: `cargo bench -p tgc-decoder --bench decoder`.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use tgc_decoder::{CostAggregationDecoder, DecoderConfig};

// The training binaries use mimalloc (glibc malloc is several times slower on backward).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Setup {
    dec: CostAggregationDecoder,
    vision: Var,
    text: Tensor,
    f16: Tensor,
    f8: Tensor,
    clip: Tensor,
    _varmap: VarMap,
}

fn setup(d: usize, grid: usize, b: usize, k: usize, gk: usize) -> Setup {
    let dev = Device::Cpu;
    let cfg = DecoderConfig {
        d_model: d,
        guidance_kernel: gk,
        ..DecoderConfig::default()
    };
    let varmap = VarMap::new();
    let dec = CostAggregationDecoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))
        .unwrap();
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
    Setup {
        dec,
        vision: Var::from_tensor(&r(&[b * k, d, grid, grid])).unwrap(),
        text: r(&[b, k, d]),
        f16: r(&[b, d, 2 * grid, 2 * grid]),
        f8: r(&[b, d, 4 * grid, 4 * grid]),
        clip: r(&[b, k, grid, grid]),
        _varmap: varmap,
    }
}

fn bench(c: &mut Criterion) {
    for (name, d, grid, b, k, gk) in [
        ("cpu_preset_b8", 128, 14, 8, 1, 3),
        ("cpu_preset_b8_guidance1x1", 128, 14, 8, 1, 1),
        ("paper_b1", 256, 24, 1, 1, 3),
    ] {
        let s = setup(d, grid, b, k, gk);
        let fwd = || {
            s.dec
                .forward(&s.vision, &s.text, &s.f16, &s.f8, Some(&s.clip), true)
                .unwrap()
        };
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        g.bench_function("forward", |bch| bch.iter(fwd));
        g.bench_function("forward_backward", |bch| {
            bch.iter(|| fwd().sqr().unwrap().sum_all().unwrap().backward().unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
