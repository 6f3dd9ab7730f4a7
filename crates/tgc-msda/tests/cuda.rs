//! CUDA kernel against the CPU kernel (run on a GPU machine with `--features cuda`):
//! `cargo test --release -p tgc-msda --features cuda --test cuda -- --nocapture`.
//! The last test times the CUDA op at the paper shape, batch 8.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{case, max_abs_diff, Rng};
use tgc_msda::{ms_deform_attn, MsdaImpl};

fn gpu() -> Device {
    Device::new_cuda(0).expect("CUDA device 0")
}

/// Output and the three gradients of sum(out * g) on `dev`, returned on the CPU.
fn run(
    value: &Tensor,
    shapes: &[(usize, usize)],
    loc: &Tensor,
    attn: &Tensor,
    g: &Tensor,
    dev: &Device,
) -> [Tensor; 4] {
    let v = Var::from_tensor(&value.to_device(dev).unwrap()).unwrap();
    let l = Var::from_tensor(&loc.to_device(dev).unwrap()).unwrap();
    let a = Var::from_tensor(&attn.to_device(dev).unwrap()).unwrap();
    let out = ms_deform_attn(
        v.as_tensor(),
        shapes,
        l.as_tensor(),
        a.as_tensor(),
        MsdaImpl::Fused,
    )
    .unwrap();
    let gs = (&out * g.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    [
        cpu(&out),
        cpu(gs.get(v.as_tensor()).unwrap()),
        cpu(gs.get(l.as_tensor()).unwrap()),
        cpu(gs.get(a.as_tensor()).unwrap()),
    ]
}

#[test]
fn cuda_matches_cpu() {
    let mut rng = Rng::new(7);
    let specs: Vec<(
        usize,
        Vec<(usize, usize)>,
        usize,
        usize,
        usize,
        usize,
        (f64, f64),
    )> = vec![
        (2, vec![(6, 9), (3, 5), (2, 1)], 2, 4, 7, 3, (-0.2, 1.2)),
        (1, vec![(4, 4)], 3, 5, 9, 1, (-0.5, 1.5)),
        (
            2,
            vec![(24, 24), (12, 12), (6, 6)],
            8,
            32,
            300,
            4,
            (-0.05, 1.05),
        ),
        (1, vec![(7, 5), (3, 2)], 4, 48, 40, 2, (0.0, 1.0)),
    ];
    for (n, shapes, m, dh, lq, p, (lo, hi)) in specs {
        for dtype in [DType::F32, DType::F64] {
            let c = case(&mut rng, n, &shapes, m, dh, lq, p, lo, hi, dtype);
            let g = rng.uniform(&[n, lq, m * dh], -1.0, 1.0, dtype);
            let cpu = run(&c.value, &c.shapes, &c.loc, &c.attn, &g, &Device::Cpu);
            let cuda = run(&c.value, &c.shapes, &c.loc, &c.attn, &g, &gpu());
            for (i, name) in ["output", "grad value", "grad locations", "grad weights"]
                .iter()
                .enumerate()
            {
                // Location gradients scale with the level size: compare relative to it.
                let scale = if i == 2 {
                    shapes.iter().map(|&(h, w)| h.max(w)).max().unwrap() as f64
                } else {
                    1.0
                };
                let d = max_abs_diff(&cpu[i], &cuda[i]) / scale;
                assert!(
                    d < 1e-4,
                    "{name} differs by {d} ({dtype:?}, {shapes:?}, heads {m}, dh {dh})"
                );
            }
        }
    }
}

#[test]
fn cuda_paper_shape_batch8_timing() {
    let dev = gpu();
    let (n, m, dh, p) = (8, 8, 32, 4);
    let shapes = [(96usize, 96usize), (48, 48), (24, 24)];
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let value = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, s, m, dh), &dev).unwrap()).unwrap();
    let loc =
        Var::from_tensor(&Tensor::rand(0f32, 1.0, (n, s, m, 3, p, 2), &dev).unwrap()).unwrap();
    let attn = Var::from_tensor(&Tensor::rand(0f32, 0.1, (n, s, m, 3, p), &dev).unwrap()).unwrap();
    let g = Tensor::randn(0f32, 1.0, (n, s, m * dh), &dev).unwrap();
    let fwd = || {
        ms_deform_attn(
            value.as_tensor(),
            &shapes,
            loc.as_tensor(),
            attn.as_tensor(),
            MsdaImpl::Fused,
        )
        .unwrap()
    };
    let step = || {
        let gs = (fwd() * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(gs.get(value.as_tensor()).is_some());
    };
    let sync = || dev.synchronize().unwrap();
    fwd();
    step();
    sync();
    let iters = 20;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        fwd();
    }
    sync();
    let f = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        step();
    }
    sync();
    let fb = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    println!("cuda paper shape b8 (uniform locations): fwd {f:.2} ms, fwd+bwd {fb:.2} ms");
}
