//! Where the time of a gated VLCM step goes at the `cpu` preset geometry (B = 8, K = 1,
//! D = 128, 14 x 14 grid, L = 77, D_t = 512): forward alone, forward + backward, and one
//! attention branch alone. Median of several runs; compare within one run only.
//!
//! ```text
//! cargo run --release -p tgc-vlcm --example vlcm_timing
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tgc_nn::{MhaConfig, MultiHeadAttention};
use tgc_vlcm::{Vlcm, VlcmConfig, VlcmVariant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(t[runs / 2])
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (b, k, d, g, l, dt) = (8, 1, 128, 14, 77, 512);
    let vision = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, d, g, g), &dev)?)?;
    let text = Tensor::randn(0f32, 1.0, (b * k, l, dt), &dev)?;
    let mask = Tensor::cat(
        &[
            Tensor::ones((b * k, 20), DType::F32, &dev)?,
            Tensor::zeros((b * k, l - 20), DType::F32, &dev)?,
        ],
        1,
    )?;
    let runs = 7;
    for variant in VlcmVariant::ALL {
        let cfg = VlcmConfig {
            d_model: d,
            text_dim: dt,
            heads: 8,
            variant,
            eps: 1e-5,
        };
        let vm = VarMap::new();
        let vlcm = Vlcm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let fwd = median_ms(runs, || {
            vlcm.forward(&vision, &text, &mask, k)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok(())
        })?;
        let step = median_ms(runs, || {
            let o = vlcm
                .forward(&vision, &text, &mask, k)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            (o.vision.sum_all()? + o.text.sqr()?.sum_all()?)?.backward()?;
            Ok(())
        })?;
        println!("{variant:>18}: forward {fwd:8.1} ms, forward+backward {step:8.1} ms");
    }
    // One attention branch: 196 queries over 273 keys, the gated vision branch's shape.
    let vm = VarMap::new();
    let mha = MultiHeadAttention::new(
        MhaConfig {
            q_dim: d,
            kv_dim: d,
            dim: d,
            heads: 8,
        },
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, g * g, d), &dev)?)?;
    let kv = Tensor::randn(0f32, 1.0, (b, g * g + l, d), &dev)?;
    let fwd = median_ms(runs, || mha.forward(&q, &kv, None).map(|_| ()))?;
    let step = median_ms(runs, || {
        mha.forward(&q, &kv, None)?.sum_all()?.backward()?;
        Ok(())
    })?;
    println!("  one MHA 196x273: forward {fwd:8.1} ms, forward+backward {step:8.1} ms");
    Ok(())
}
