//! Convolutions at decoder-like shapes (batch 8), forward + backward (input, weight and
//! bias gradients): candle's `conv2d` / `conv_transpose2d` against tgc-nn's
//! `MatmulConv` / `MatmulConvTranspose` with the same weights, in the same run. The two are
//! interleaved and the median wall time per iteration is printed, with the ratio
//! candle / matmul (> 1: the matmul convolution is faster).
//!
//! `cargo run --release -p tgc-nn --example conv_timing [-- REPS]`

use std::time::Instant;

use candle_core::{Device, Module, Result, Tensor, Var};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig};
use tgc_nn::{MatmulConv, MatmulConvTranspose};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Median seconds of `reps` forward + backward passes of each module, interleaved.
fn time_pair(x: &Var, reps: usize, a: &dyn Module, b: &dyn Module) -> Result<(f64, f64, f64)> {
    let ya = a.forward(x.as_tensor())?;
    let yb = b.forward(x.as_tensor())?;
    let diff = (&ya - &yb)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64;
    let r = Tensor::randn(0f32, 1.0, ya.dims(), x.device())?;
    let step = |m: &dyn Module| -> Result<f64> {
        let t0 = Instant::now();
        let y = m.forward(x.as_tensor())?;
        let g = (y * &r)?.sum_all()?.backward()?;
        drop(g);
        Ok(t0.elapsed().as_secs_f64())
    };
    // Warm-up (allocator, thread pool).
    step(a)?;
    step(b)?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        ta.push(step(a)?);
        tb.push(step(b)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut ta), median(&mut tb), diff))
}

fn var(shape: &[usize], std: f32) -> Result<Var> {
    Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu)?)
}

fn report(name: &str, (a, b, diff): (f64, f64, f64)) {
    println!(
        "{name:<44} candle {:>8.2} ms   matmul {:>8.2} ms   ratio {:>5.2}x   (max |diff| {diff:.1e})",
        a * 1e3,
        b * 1e3,
        a / b
    );
}

fn main() -> Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPS must be a number"))
        .unwrap_or(5);
    let n = 8;
    println!(
        "fwd+bwd, batch {n}, f32, median of {reps} interleaved runs, {} rayon threads",
        rayon::current_num_threads()
    );

    // (name, c_in, c_out, kernel, side, bias)
    let convs = [
        ("conv3x3 64->48 @28x28, no bias", 64, 48, 3, 28, false),
        ("conv3x3 64->48 @56x56, no bias", 64, 48, 3, 56, false),
        (
            "conv3x3 64->16 @56x56, bias (guidance)",
            64,
            16,
            3,
            56,
            true,
        ),
        (
            "conv7x7 2->48 @14x14, bias (cost embed)",
            2,
            48,
            7,
            14,
            true,
        ),
        ("conv3x3 32->1 @56x56, bias (head)", 32, 1, 3, 56, true),
    ];
    for (name, ci, co, k, s, with_bias) in convs {
        let x = var(&[n, ci, s, s], 1.0)?;
        let w = var(&[co, ci, k, k], 0.05)?;
        let bias = if with_bias {
            Some(var(&[co], 0.1)?.as_tensor().clone())
        } else {
            None
        };
        let cfg = Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        let candle = candle_nn::Conv2d::new(w.as_tensor().clone(), bias.clone(), cfg);
        let ours = MatmulConv::from_weights(w.as_tensor().clone(), bias, cfg)?;
        report(name, time_pair(&x, reps, &candle, &ours)?);
    }

    // (name, c_in, c_out, side)
    let convts = [
        ("convT2x2 48->64 @14x14 -> 28, bias", 48, 64, 14),
        ("convT2x2 48->32 @28x28 -> 56, bias", 48, 32, 28),
    ];
    for (name, ci, co, s) in convts {
        let x = var(&[n, ci, s, s], 1.0)?;
        let w = var(&[ci, co, 2, 2], 0.1)?;
        let bias = var(&[co], 0.1)?;
        let cfg = ConvTranspose2dConfig {
            stride: 2,
            ..Default::default()
        };
        let bias = Some(bias.as_tensor().clone());
        let candle = candle_nn::ConvTranspose2d::new(w.as_tensor().clone(), bias.clone(), cfg);
        let ours = MatmulConvTranspose::from_weights(w.as_tensor().clone(), bias, cfg)?;
        report(name, time_pair(&x, reps, &candle, &ours)?);
    }
    Ok(())
}
