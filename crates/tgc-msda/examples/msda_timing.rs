//! Wall and CPU time per call of the fused sampling core at the paper shape, robust to a
//! shared machine (CPU time does not grow when other processes take the cores).
//!
//! `cargo run --release -p tgc-msda --example msda_timing -- [batch] [iters] [uniform]`

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use tgc_msda::{ms_deform_attn, MsdaImpl};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Process CPU time (user + system, all threads) in milliseconds, from /proc/self/stat.
fn cpu_ms() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks * 10.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1);
    let iters: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(5);
    let uniform = args.get(3).is_some_and(|v| v == "uniform");
    let dev = Device::Cpu;
    let shapes = [(96usize, 96usize), (48, 48), (24, 24)];
    let (m, dh, p, l) = (8, 32, 4, 3);
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let loc = if uniform {
        Tensor::rand(0f32, 1.0, (n, s, m, l, p, 2), &dev)?
    } else {
        let mut refs = Vec::new();
        for &(h, w) in &shapes {
            for y in 0..h {
                for x in 0..w {
                    refs.push((x as f32 + 0.5) / w as f32);
                    refs.push((y as f32 + 0.5) / h as f32);
                }
            }
        }
        let refs = Tensor::from_vec(refs, (1, s, 1, 1, 1, 2), &dev)?;
        let inv: Vec<f32> = shapes
            .iter()
            .flat_map(|&(h, w)| [1.0 / w as f32, 1.0 / h as f32])
            .collect();
        let inv = Tensor::from_vec(inv, (1, 1, 1, l, 1, 2), &dev)?;
        refs.broadcast_add(
            &Tensor::rand(-4f32, 4.0, (n, s, m, l, p, 2), &dev)?.broadcast_mul(&inv)?,
        )?
        .contiguous()?
    };
    let value = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, s, m, dh), &dev)?)?;
    let loc = Var::from_tensor(&loc)?;
    let attn = Var::from_tensor(&Tensor::rand(0f32, 0.1, (n, s, m, l, p), &dev)?)?;
    let go = Tensor::randn(0f32, 1.0, (n, s, m * dh), &dev)?;
    let fwd = || {
        ms_deform_attn(
            value.as_tensor(),
            &shapes,
            loc.as_tensor(),
            attn.as_tensor(),
            MsdaImpl::Fused,
        )
    };
    fwd()?;
    let (t0, c0) = (Instant::now(), cpu_ms());
    for _ in 0..iters {
        fwd()?;
    }
    let (wf, cf) = (
        t0.elapsed().as_secs_f64() * 1e3 / iters as f64,
        (cpu_ms() - c0) / iters as f64,
    );
    let (t0, c0) = (Instant::now(), cpu_ms());
    for _ in 0..iters {
        let loss = (fwd()? * &go)?.sum_all()?;
        loss.backward()?;
    }
    let (wb, cb) = (
        t0.elapsed().as_secs_f64() * 1e3 / iters as f64,
        (cpu_ms() - c0) / iters as f64,
    );
    // The op's backward driven directly with the output gradient, as PyTorch's
    // `out.backward(grad_out)` (no loss graph).
    let (t0, c0) = (Instant::now(), cpu_ms());
    for _ in 0..iters {
        let out = fwd()?;
        let grads = tgc_msda::ms_deform_attn_backward(
            value.as_tensor(),
            &shapes,
            loc.as_tensor(),
            attn.as_tensor(),
            &go,
        )?;
        drop((out, grads));
    }
    let (wd, cd) = (
        t0.elapsed().as_secs_f64() * 1e3 / iters as f64,
        (cpu_ms() - c0) / iters as f64,
    );
    println!("fused paper b{n}{}: fwd {wf:.1} ms wall / {cf:.1} ms cpu; fwd+bwd {wb:.1} ms wall / {cb:.1} ms cpu; fwd + op backward {wd:.1} ms wall / {cd:.1} ms cpu",
        if uniform { " uniform" } else { "" });
    Ok(())
}
