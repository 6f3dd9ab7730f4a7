//! The fused op against the composite oracle, central finite differences (f64) and a
//! hand-computed case.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{case, max_abs_diff, Case, Rng};
use tgc_msda::{ms_deform_attn, ms_deform_attn_backward, MsdaImpl};

/// (batch, levels, heads, head dim, queries, points, location range)
type Spec = (
    usize,
    Vec<(usize, usize)>,
    usize,
    usize,
    usize,
    usize,
    (f64, f64),
);

fn specs() -> Vec<Spec> {
    vec![
        (2, vec![(6, 9), (3, 5), (2, 1)], 2, 4, 7, 3, (-0.2, 1.2)),
        (1, vec![(4, 4)], 3, 5, 9, 1, (-0.5, 1.5)),
        (3, vec![(1, 7), (5, 2)], 1, 3, 4, 2, (0.0, 1.0)),
        (1, vec![(11, 13), (6, 7), (3, 4)], 8, 8, 33, 4, (-0.1, 1.1)),
        (2, vec![(3, 3)], 2, 2, 5, 1, (-2.0, 3.0)),
        // L x P = 33 samples: more than the kernel's 32-sample gather chunk.
        (1, vec![(5, 6), (3, 3), (2, 2)], 2, 4, 6, 11, (-0.1, 1.1)),
        // Head dims the kernels specialise at compile time (8 is above).
        (2, vec![(5, 7), (3, 4)], 2, 16, 6, 2, (-0.3, 1.3)),
        (1, vec![(4, 4), (2, 2), (1, 1)], 3, 32, 5, 4, (-0.1, 1.1)),
        (1, vec![(3, 5)], 1, 64, 4, 2, (0.0, 1.0)),
    ]
}

fn run(c: &Case, imp: MsdaImpl) -> Tensor {
    ms_deform_attn(&c.value, &c.shapes, &c.loc, &c.attn, imp).unwrap()
}

#[test]
fn fused_forward_matches_composite() {
    let mut rng = Rng::new(1);
    for (n, shapes, m, dh, lq, p, (lo, hi)) in specs() {
        let c = case(&mut rng, n, &shapes, m, dh, lq, p, lo, hi, DType::F32);
        let fused = run(&c, MsdaImpl::Fused);
        let comp = run(&c, MsdaImpl::Composite);
        assert_eq!(fused.dims(), &[n, lq, m * dh]);
        let d = max_abs_diff(&fused, &comp);
        assert!(
            d < 1e-5,
            "fused vs composite differ by {d} for levels {shapes:?}"
        );
        // Auto picks the fused kernel on the CPU.
        assert_eq!(max_abs_diff(&run(&c, MsdaImpl::Auto), &fused), 0.0);
    }
}

/// Gradients of sum(out * g) for (value, loc, attn) with the given implementation.
fn grads(c: &Case, g: &Tensor, imp: MsdaImpl) -> [Tensor; 3] {
    let v = Var::from_tensor(&c.value).unwrap();
    let l = Var::from_tensor(&c.loc).unwrap();
    let a = Var::from_tensor(&c.attn).unwrap();
    let out = ms_deform_attn(v.as_tensor(), &c.shapes, l.as_tensor(), a.as_tensor(), imp).unwrap();
    let loss = (out * g).unwrap().sum_all().unwrap();
    let gs = loss.backward().unwrap();
    [
        gs.get(v.as_tensor()).expect("no value grad").clone(),
        gs.get(l.as_tensor()).expect("no location grad").clone(),
        gs.get(a.as_tensor()).expect("no weight grad").clone(),
    ]
}

fn loss_of(c: &Case, value: &Tensor, loc: &Tensor, attn: &Tensor, g: &Tensor) -> f64 {
    let out = ms_deform_attn(value, &c.shapes, loc, attn, MsdaImpl::Fused).unwrap();
    (out * g)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Central finite differences of the loss w.r.t. every element of input `which`.
fn finite_diff(c: &Case, g: &Tensor, which: usize) -> Tensor {
    let inputs = [&c.value, &c.loc, &c.attn];
    let base = inputs[which]
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let shape = inputs[which].shape().clone();
    let eps = 1e-6;
    let mut out = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, &shape, &Device::Cpu).unwrap();
            let mut args = [c.value.clone(), c.loc.clone(), c.attn.clone()];
            args[which] = t;
            loss_of(c, &args[0], &args[1], &args[2], g)
        };
        out.push((eval(eps) - eval(-eps)) / (2.0 * eps));
    }
    Tensor::from_vec(out, &shape, &Device::Cpu).unwrap()
}

#[test]
fn fused_gradients_match_finite_differences_f64() {
    let mut rng = Rng::new(2);
    let small: Vec<Spec> = vec![
        (2, vec![(4, 5), (2, 3), (1, 2)], 2, 3, 4, 2, (-0.2, 1.2)),
        (1, vec![(3, 3)], 1, 2, 3, 1, (-0.4, 1.4)),
        (1, vec![(2, 5), (3, 1)], 3, 2, 5, 3, (0.0, 1.0)),
        (1, vec![(3, 4), (2, 2)], 2, 16, 3, 2, (-0.2, 1.2)),
    ];
    for (n, shapes, m, dh, lq, p, (lo, hi)) in small {
        let c = case(&mut rng, n, &shapes, m, dh, lq, p, lo, hi, DType::F64);
        let g = rng.uniform(&[n, lq, m * dh], -1.0, 1.0, DType::F64);
        let analytic = grads(&c, &g, MsdaImpl::Fused);
        for (which, name) in ["value", "locations", "weights"].iter().enumerate() {
            let fd = finite_diff(&c, &g, which);
            let d = max_abs_diff(&analytic[which], &fd);
            assert!(
                d < 1e-6,
                "{name} gradient differs from finite differences by {d} ({shapes:?})"
            );
            let norm = fd
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(norm > 1e-3, "degenerate {name} gradient for {shapes:?}");
        }
    }
}

#[test]
fn composite_gradients_match_fused() {
    let mut rng = Rng::new(3);
    for (n, shapes, m, dh, lq, p, (lo, hi)) in specs() {
        for dtype in [DType::F64, DType::F32] {
            let c = case(&mut rng, n, &shapes, m, dh, lq, p, lo, hi, dtype);
            let g = rng.uniform(&[n, lq, m * dh], -1.0, 1.0, dtype);
            let fused = grads(&c, &g, MsdaImpl::Fused);
            let comp = grads(&c, &g, MsdaImpl::Composite);
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            for (i, name) in ["value", "locations", "weights"].iter().enumerate() {
                let d = max_abs_diff(&fused[i], &comp[i]);
                assert!(
                    d < tol,
                    "{name} grads differ by {d} ({dtype:?}, {shapes:?})"
                );
            }
        }
    }
}

#[test]
fn explicit_backward_matches_composite_autograd() {
    let mut rng = Rng::new(4);
    for (n, shapes, m, dh, lq, p, (lo, hi)) in specs() {
        let c = case(&mut rng, n, &shapes, m, dh, lq, p, lo, hi, DType::F64);
        let g = rng.uniform(&[n, lq, m * dh], -1.0, 1.0, DType::F64);
        let (gv, gl, ga) =
            ms_deform_attn_backward(&c.value, &c.shapes, &c.loc, &c.attn, &g).unwrap();
        let comp = grads(&c, &g, MsdaImpl::Composite);
        for (i, (name, ours)) in [("value", gv), ("locations", gl), ("weights", ga)]
            .iter()
            .enumerate()
        {
            assert_eq!(ours.dims(), comp[i].dims(), "{name} shape");
            let d = max_abs_diff(ours, &comp[i]);
            assert!(d < 1e-10, "{name} grads differ by {d} ({shapes:?})");
        }
    }
    // A wrong output-gradient shape is an error, not a panic.
    let c = case(&mut rng, 1, &[(3, 3)], 2, 4, 5, 2, 0.0, 1.0, DType::F32);
    let bad = Tensor::zeros((1, 5, 7), DType::F32, &Device::Cpu).unwrap();
    let e = ms_deform_attn_backward(&c.value, &c.shapes, &c.loc, &c.attn, &bad).unwrap_err();
    assert!(e.to_string().contains("grad_output"), "{e}");
}

#[test]
fn hand_computed_case() {
    // One 2 x 2 level, one head of width 1, value = [[1, 2], [3, 4]].
    let dev = Device::Cpu;
    let value = Tensor::new(&[1f64, 2., 3., 4.], &dev)
        .unwrap()
        .reshape((1, 4, 1, 1))
        .unwrap();
    // Points: centre of pixel (0, 1) -> 2; the map centre -> 2.5; (x, y) = (0.25, 1.0),
    // pixel coords (0, 1.5): half of row 1 col 0 (3) and half outside -> 1.5.
    let loc = Tensor::new(&[0.75f64, 0.25, 0.5, 0.5, 0.25, 1.0], &dev)
        .unwrap()
        .reshape((1, 1, 1, 1, 3, 2))
        .unwrap();
    let attn = Tensor::new(&[1f64, 10., 100.], &dev)
        .unwrap()
        .reshape((1, 1, 1, 1, 3))
        .unwrap();
    for imp in [MsdaImpl::Fused, MsdaImpl::Composite] {
        let out = ms_deform_attn(&value, &[(2, 2)], &loc, &attn, imp).unwrap();
        let got = out.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want = 2.0 + 10.0 * 2.5 + 100.0 * 1.5;
        assert!(
            (got[0] - want).abs() < 1e-12,
            "{imp:?}: got {got:?}, want {want}"
        );
    }
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = Rng::new(4);
    let c = case(&mut rng, 1, &[(3, 3)], 2, 2, 4, 2, 0.0, 1.0, DType::F32);
    // spatial_shapes that do not sum to S.
    assert!(ms_deform_attn(&c.value, &[(3, 4)], &c.loc, &c.attn, MsdaImpl::Fused).is_err());
    // weights of the wrong shape.
    let attn = c.attn.narrow(4, 0, 1).unwrap();
    assert!(ms_deform_attn(&c.value, &c.shapes, &c.loc, &attn, MsdaImpl::Fused).is_err());
    // mixed dtypes.
    let loc = c.loc.to_dtype(DType::F64).unwrap();
    assert!(ms_deform_attn(&c.value, &c.shapes, &loc, &c.attn, MsdaImpl::Fused).is_err());
    // integer dtype.
    let v = c.value.to_dtype(DType::U32).unwrap();
    assert!(ms_deform_attn(&v, &c.shapes, &c.loc, &c.attn, MsdaImpl::Composite).is_err());
}
