//! Criterion benches of the sampling core: fused CPU kernel vs the composite, forward and
//! forward+backward, at the paper shape (levels 96x96, 48x48, 24x24; 8 heads of 32; 4
//! points; 12096 queries) and the CPU-preset shape (56x56, 28x28, 14x14; 4 heads of 32).
//!
//! Run: `cargo bench -p tgc-msda --bench msda` (filter e.g. `-- paper/b1`), and the
//! PyTorch side by side: `python3 crates/tgc-msda/benches/msda_torch.py`.
//! Throughput is the compulsory traffic: every input read once and every output written
//! once (forward: value, locations, weights, output; backward adds the output gradient
//! read and the three input gradients written).

use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tgc_msda::{ms_deform_attn, MsdaImpl};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Problem {
    value: Var,
    loc: Var,
    attn: Var,
    grad_out: Tensor,
    shapes: Vec<(usize, usize)>,
}

/// Sampling locations like the encoder produces them: each query's reference point (its
/// own pixel centre, normalised by its level's size) plus offsets of up to +-4 pixels of
/// the sampled level (Deformable DETR's offsets are initialised at 1..=4 pixels).
/// With `uniform`, locations are uniform in [0, 1] instead (a cache-hostile stress case).
fn locations(shapes: &[(usize, usize)], n: usize, m: usize, p: usize, uniform: bool) -> Tensor {
    let dev = Device::Cpu;
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let l = shapes.len();
    if uniform {
        return Tensor::rand(0f32, 1.0, (n, s, m, l, p, 2), &dev).unwrap();
    }
    let mut refs = Vec::with_capacity(s * 2);
    for &(h, w) in shapes {
        for y in 0..h {
            for x in 0..w {
                refs.push((x as f32 + 0.5) / w as f32);
                refs.push((y as f32 + 0.5) / h as f32);
            }
        }
    }
    let refs = Tensor::from_vec(refs, (1, s, 1, 1, 1, 2), &dev).unwrap();
    let inv: Vec<f32> = shapes
        .iter()
        .flat_map(|&(h, w)| [1.0 / w as f32, 1.0 / h as f32])
        .collect();
    let inv = Tensor::from_vec(inv, (1, 1, 1, l, 1, 2), &dev).unwrap();
    let off = Tensor::rand(-4f32, 4.0, (n, s, m, l, p, 2), &dev).unwrap();
    refs.broadcast_add(&off.broadcast_mul(&inv).unwrap())
        .unwrap()
        .contiguous()
        .unwrap()
}

fn problem(
    shapes: &[(usize, usize)],
    m: usize,
    dh: usize,
    p: usize,
    n: usize,
    uniform: bool,
) -> Problem {
    let dev = Device::Cpu;
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let l = shapes.len();
    let attn = Tensor::rand(0f32, 1.0, (n, s, m, l * p), &dev).unwrap();
    let attn = candle_nn::ops::softmax(&attn, 3)
        .unwrap()
        .reshape((n, s, m, l, p))
        .unwrap();
    Problem {
        value: Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, s, m, dh), &dev).unwrap()).unwrap(),
        loc: Var::from_tensor(&locations(shapes, n, m, p, uniform)).unwrap(),
        attn: Var::from_tensor(&attn).unwrap(),
        grad_out: Tensor::randn(0f32, 1.0, (n, s, m * dh), &dev).unwrap(),
        shapes: shapes.to_vec(),
    }
}

impl Problem {
    fn forward(&self, imp: MsdaImpl) -> Tensor {
        ms_deform_attn(
            self.value.as_tensor(),
            &self.shapes,
            self.loc.as_tensor(),
            self.attn.as_tensor(),
            imp,
        )
        .unwrap()
    }

    fn forward_backward(&self, imp: MsdaImpl) {
        let out = self.forward(imp);
        let loss = (out * &self.grad_out).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(self.value.as_tensor()).is_some());
    }

    /// The forward op, then its backward op driven directly with the output gradient
    /// (what PyTorch's `out.backward(grad_out)` measures; candle's autograd needs a
    /// scalar loss, whose multiply, sum and gradient accumulation `forward_backward`
    /// also times).
    fn forward_op_backward(&self) {
        let out = self.forward(MsdaImpl::Fused);
        let grads = tgc_msda::ms_deform_attn_backward(
            self.value.as_tensor(),
            &self.shapes,
            self.loc.as_tensor(),
            self.attn.as_tensor(),
            &self.grad_out,
        )
        .unwrap();
        drop((out, grads));
    }

    /// Compulsory bytes (f32) of forward and of forward+backward.
    fn bytes(&self) -> (u64, u64) {
        let e = |t: &Tensor| t.elem_count() as u64 * 4;
        let inputs = e(self.value.as_tensor()) + e(self.loc.as_tensor()) + e(self.attn.as_tensor());
        let out = e(&self.grad_out);
        let fwd = inputs + out;
        // backward: reads inputs and grad_out, writes the three gradients.
        (fwd, fwd + 2 * inputs + out)
    }
}

fn bench(c: &mut Criterion) {
    type Shape = (
        &'static str,
        [(usize, usize); 3],
        usize,
        bool,
        &'static [usize],
    );
    let shapes: [Shape; 3] = [
        ("paper", [(96, 96), (48, 48), (24, 24)], 8, false, &[1, 8]),
        ("cpu", [(56, 56), (28, 28), (14, 14)], 4, false, &[1, 8]),
        (
            "paper-uniform",
            [(96, 96), (48, 48), (24, 24)],
            8,
            true,
            &[1],
        ),
    ];
    for (name, levels, heads, uniform, batches) in shapes {
        for &batch in batches {
            let pb = problem(&levels, heads, 32, 4, batch, uniform);
            let (fwd_bytes, fb_bytes) = pb.bytes();
            let mut group = c.benchmark_group(format!("{name}/b{batch}"));
            group.sample_size(10).warm_up_time(Duration::from_secs(1));
            group.measurement_time(Duration::from_secs(if batch == 1 { 5 } else { 10 }));
            let mut imps = vec![("fused", MsdaImpl::Fused)];
            // The composite is slow and memory hungry: batch 1 only.
            if batch == 1 && !uniform {
                imps.push(("composite", MsdaImpl::Composite));
            }
            for (label, imp) in imps {
                group.throughput(Throughput::Bytes(fwd_bytes));
                group.bench_function(BenchmarkId::new("fwd", label), |b| {
                    b.iter(|| pb.forward(imp))
                });
                group.throughput(Throughput::Bytes(fb_bytes));
                group.bench_function(BenchmarkId::new("fwd+bwd", label), |b| {
                    b.iter(|| pb.forward_backward(imp))
                });
                if imp == MsdaImpl::Fused {
                    group.bench_function(BenchmarkId::new("fwd+op-bwd", label), |b| {
                        b.iter(|| pb.forward_op_backward())
                    });
                }
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
