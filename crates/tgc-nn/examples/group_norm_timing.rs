//! Group norm forward + backward on the shapes of the small QaTa configurations
//! (`configs/qata-tiny-wide160-q4*.json`: DoubleConvs and CNN stem at batch 8):
//! `candle_nn::GroupNorm` (the composite) against `tgc_nn::GroupNorm` (fused), same
//! weights and inputs, interleaved rounds. The printed ratio is the measurement; absolute
//! times depend on the machine's load.
//!
//! `cargo run --release -p tgc-nn --example group_norm_timing`

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time(reps: usize, f: &dyn Fn() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (batch, channels, side, groups)
    let shapes = [(8, 16, 40, 2), (8, 8, 40, 1), (8, 4, 80, 1), (8, 32, 10, 4)];
    for round in 0..3 {
        for &(b, c, s, g) in &shapes {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?)?;
            let w = Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?;
            let bias = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?)?;
            let target = Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?;
            let (wt, bt) = (w.as_tensor().clone(), bias.as_tensor().clone());
            let composite = candle_nn::GroupNorm::new(wt.clone(), bt.clone(), c, g, 1e-5)?;
            let fused = tgc_nn::GroupNorm::new(wt, bt, c, g, 1e-5)?;
            let run = |m: &dyn Module| -> candle_core::Result<()> {
                let y = m.forward(x.as_tensor())?;
                (y * &target)?.sum_all()?.backward()?;
                Ok(())
            };
            let reps = 20;
            let a = time(reps, &|| run(&composite))?;
            let f = time(reps, &|| run(&fused))?;
            println!(
                "round {round} {b}x{c}x{s}x{s} groups {g} (fwd+bwd): candle_nn {:.2} ms, tgc_nn {:.2} ms, ratio {:.1}x",
                a * 1e3,
                f * 1e3,
                a / f
            );
        }
    }
    Ok(())
}
