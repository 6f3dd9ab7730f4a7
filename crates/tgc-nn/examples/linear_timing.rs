//! Linear layer on `B x T x D` input (8 x 4116 x 128 -> 512, the `cpu` preset's MSDA FFN),
//! forward + backward: candle_nn::Linear (batched matmul against a broadcast weight,
//! `broadcast_add` bias) against tgc_nn::Linear (flattened rows, fused bias), and the bare
//! matrix product as the floor.
//!
//! `cargo run --release -p tgc-nn --example linear_timing`

use std::time::Instant;

use candle_core::{Device, Module, Tensor, Var};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, t, i, o) = (8, 4116, 128, 512);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, i), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (o, i), &dev)?)?;
    let bias = Var::from_tensor(&Tensor::zeros(o, candle_core::DType::F32, &dev)?)?;
    let lin = candle_nn::Linear::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()));
    let ours = tgc_nn::Linear::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()));
    for round in 0..2 {
        let t0 = Instant::now();
        for _ in 0..3 {
            let y = lin.forward(x.as_tensor())?;
            y.sqr()?.sum_all()?.backward()?;
        }
        let a = t0.elapsed().as_secs_f64() / 3.0;
        let t0 = Instant::now();
        for _ in 0..3 {
            let y = ours.forward(x.as_tensor())?;
            y.sqr()?.sum_all()?.backward()?;
        }
        let f = t0.elapsed().as_secs_f64() / 3.0;
        let t0 = Instant::now();
        for _ in 0..3 {
            let y = x
                .as_tensor()
                .reshape((b * t, i))?
                .matmul(&w.as_tensor().t()?)?;
            y.sqr()?.sum_all()?.backward()?;
        }
        let nb = t0.elapsed().as_secs_f64() / 3.0;
        let t0 = Instant::now();
        for _ in 0..3 {
            let y = x
                .as_tensor()
                .reshape((b * t, i))?
                .matmul(&w.as_tensor().t()?)?;
            y.sqr()?.sum_all()?;
        }
        let fo = t0.elapsed().as_secs_f64() / 3.0;
        println!("round {round} (wall, fwd+bwd): candle_nn::Linear {a:.3} s, tgc_nn::Linear {f:.3} s, matmul without bias {nb:.3} s (its fwd alone {fo:.3} s)");
    }
    Ok(())
}
