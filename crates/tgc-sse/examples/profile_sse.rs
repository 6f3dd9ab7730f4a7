//! Per-component cost of the SSE on the CPU preset (batch 8, S_n = 448), in process CPU
//! seconds (robust to other processes sharing the cores) and wall seconds.
//!
//! Run: `cargo run --release -p tgc-sse --example profile_sse`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tgc_sse::{MatmulConv, Sse, SseConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// User + system CPU seconds of this process (Linux `/proc/self/stat`).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn time<T>(name: &str, reps: usize, mut f: impl FnMut() -> T) {
    f();
    let (c0, w0) = (cpu_seconds(), Instant::now());
    for _ in 0..reps {
        f();
    }
    let cpu = (cpu_seconds() - c0) / reps as f64;
    let wall = w0.elapsed().as_secs_f64() / reps as f64;
    println!("{name:<40} cpu {cpu:7.3} s   wall {wall:7.3} s");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let cfg = SseConfig::cpu();
    let b = 8;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let sse = Sse::new(&cfg, vb.pp("sse"))?;
    let image = Tensor::randn(0f32, 1.0, (b, 3, 448, 448), &dev)?;
    let clip = Tensor::randn(0f32, 1.0, (b, 196, cfg.clip_dim), &dev)?;

    // One 3x3 convolution 32 -> 32 at 1/8 (56 x 56), candle's conv2d against MatmulConv.
    let x56 = Tensor::randn(0f32, 1.0, (b, 32, 56, 56), &dev)?;
    let cand = candle_nn::conv2d_no_bias(
        32,
        32,
        3,
        candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("cand"),
    )?;
    let mm = MatmulConv::new(32, 32, 3, 1, vb.pp("mm"))?;
    time("conv3x3 32->32 @56 candle conv2d fwd+bwd", 3, || {
        candle_core::Module::forward(&cand, &x56)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    });
    time("conv3x3 32->32 @56 MatmulConv fwd+bwd", 3, || {
        mm.forward(&x56)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    });
    time("cnn fwd", 3, || sse.cnn_features(&image).unwrap());
    time("cnn fwd+bwd", 2, || {
        let f = sse.cnn_features(&image).unwrap();
        let l =
            (f[0].sum_all().unwrap() + f[1].sum_all().unwrap() + f[2].sum_all().unwrap()).unwrap();
        l.backward().unwrap()
    });
    time("pyramid fwd", 3, || {
        sse.pyramid(&image, Some(&clip)).unwrap()
    });
    time("sse fwd", 2, || {
        sse.forward(&image, Some(&clip), false).unwrap()
    });
    time("sse fwd+bwd", 2, || {
        let o = sse.forward(&image, Some(&clip), true).unwrap();
        let l = ((o.f8.sqr().unwrap().sum_all().unwrap()
            + o.f16.sqr().unwrap().sum_all().unwrap())
        .unwrap()
            + o.f32.sqr().unwrap().sum_all().unwrap())
        .unwrap();
        l.backward().unwrap()
    });
    Ok(())
}
