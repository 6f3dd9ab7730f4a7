//! Cost of one `MsDeformEncoderLayer` at the `cpu` preset's SSE shape (batch 8, levels
//! 56^2, 28^2, 14^2, d 128, 4 heads, FFN 512), forward + backward, next to its parts.
//!
//! `cargo run --release -p tgc-msda --example layer_timing`

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use tgc_msda::{MsDeformAttnConfig, MsDeformEncoder};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn time(
    name: &str,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    f()?;
    let (c0, w0) = (cpu_s(), Instant::now());
    for _ in 0..reps {
        f()?;
    }
    println!(
        "{name:<44} cpu {:7.3} s   wall {:7.3} s",
        (cpu_s() - c0) / reps as f64,
        w0.elapsed().as_secs_f64() / reps as f64
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (b, d) = (8, 128);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, 4116, d), &dev)?)?;
    let ln = tgc_nn::layer_norm(d, 1e-5, vb.pp("ln"))?;
    time("tgc_nn::LayerNorm (8 x 4116 x 128)", 3, || {
        ln.forward(x.as_tensor())?
            .sqr()?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let lin = tgc_nn::linear_xavier(d, 512, vb.pp("lin"))?;
    time("Linear 128 -> 512 (3-D input)", 3, || {
        lin.forward(x.as_tensor())?
            .sqr()?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let a = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, 4116, 4, 12), &dev)?)?;
    time("candle_nn::ops::softmax (8 x 4116 x 4 x 12)", 3, || {
        candle_nn::ops::softmax(a.as_tensor(), D::Minus1)?
            .sqr()?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    time("tgc_nn::softmax_last_dim (same)", 3, || {
        tgc_nn::softmax_last_dim(a.as_tensor())?
            .sqr()?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let cfg = MsDeformAttnConfig {
        d_model: d,
        n_heads: 4,
        n_layers: 1,
        ffn_dim: 512,
        dropout: 0.0,
        ..Default::default()
    };
    let enc = MsDeformEncoder::new(&cfg, vb.pp("enc"))?;
    let srcs: Vec<candle_core::Var> = [56, 28, 14]
        .iter()
        .map(|&s| candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, d, s, s), &dev)?))
        .collect::<candle_core::Result<_>>()?;
    let src_t: Vec<Tensor> = srcs.iter().map(|v| v.as_tensor().clone()).collect();
    time("MsDeformEncoder, 1 layer, fwd", 2, || {
        enc.forward(&src_t, false)
            .map(|_| ())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    })?;
    time("MsDeformEncoder, 1 layer, fwd+bwd", 2, || {
        let o = enc
            .forward(&src_t, true)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut l = o[0].sqr()?.sum_all()?;
        for t in &o[1..] {
            l = (l + t.sqr()?.sum_all()?)?;
        }
        l.backward().map(|_| ())
    })?;
    Ok(())
}
