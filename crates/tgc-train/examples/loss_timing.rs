//! The training loss at the QaTa label size (batch 8, one prompt, 224 x 224), forward +
//! backward: `0.5 * bce_with_logits + 0.5 * soft_dice_loss` composed from candle ops
//! against the fused `dice_bce`, same inputs, interleaved rounds. The printed ratio is the
//! measurement; absolute times depend on the machine's load.
//!
//! `cargo run --release -p tgc-train --example loss_timing`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use tgc_train::{bce_with_logits, dice_bce, soft_dice_loss};

fn main() -> tgc_train::Result<()> {
    let dev = Device::Cpu;
    let shape = (8, 1, 224, 224);
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, shape, &dev)?)?;
    let t = Tensor::rand(0f32, 1.0, shape, &dev)?
        .gt(0.8)?
        .to_dtype(DType::F32)?;
    let composed = || -> tgc_train::Result<()> {
        let l = ((bce_with_logits(x.as_tensor(), &t)? * 0.5)?
            + (soft_dice_loss(x.as_tensor(), &t, 1.0)? * 0.5)?)?;
        l.backward()?;
        Ok(())
    };
    let fused = || -> tgc_train::Result<()> {
        dice_bce(x.as_tensor(), &t, 0.5, 0.5)?.backward()?;
        Ok(())
    };
    let reps = 20;
    for round in 0..3 {
        let t0 = Instant::now();
        for _ in 0..reps {
            composed()?;
        }
        let a = t0.elapsed().as_secs_f64() / reps as f64;
        let t0 = Instant::now();
        for _ in 0..reps {
            fused()?;
        }
        let f = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "round {round} (fwd+bwd, 8 x 224 x 224): composed {:.2} ms, fused {:.2} ms, ratio {:.1}x",
            a * 1e3,
            f * 1e3,
            a / f
        );
    }
    Ok(())
}
