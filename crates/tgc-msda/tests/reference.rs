//! Parity with the PyTorch reference (`grid_sample`-based `ms_deform_attn_core_pytorch`),
//! fixture written by tests/fixtures/make_fixture.py.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use tgc_msda::{ms_deform_attn, position_embedding_sine, MsdaImpl};

fn fixture() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/msda_reference.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).expect("load fixture")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn matches_pytorch_grid_sample_reference() {
    let fx = fixture();
    for name in ["pyramid", "single", "heads"] {
        let t = |k: &str| {
            fx.get(&format!("{name}.{k}"))
                .unwrap_or_else(|| panic!("missing {name}.{k}"))
                .clone()
        };
        let shapes: Vec<(usize, usize)> = t("shapes")
            .to_vec2::<i64>()
            .unwrap()
            .iter()
            .map(|r| (r[0] as usize, r[1] as usize))
            .collect();
        for imp in [MsdaImpl::Fused, MsdaImpl::Composite] {
            let v = Var::from_tensor(&t("value")).unwrap();
            let l = Var::from_tensor(&t("loc")).unwrap();
            let a = Var::from_tensor(&t("attn")).unwrap();
            let out =
                ms_deform_attn(v.as_tensor(), &shapes, l.as_tensor(), a.as_tensor(), imp).unwrap();
            let d = max_abs_diff(&out, &t("out"));
            assert!(d < 1e-10, "{name} {imp:?}: output differs by {d}");
            let gs = (out * t("grad_out"))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (var, key) in [(&v, "grad_value"), (&l, "grad_loc"), (&a, "grad_attn")] {
                let d = max_abs_diff(gs.get(var.as_tensor()).unwrap(), &t(key));
                assert!(d < 1e-10, "{name} {imp:?}: {key} differs by {d}");
            }
        }
    }
}

#[test]
fn sine_position_embedding_matches_detr() {
    let fx = fixture();
    let want = &fx["posembed.d12_h3_w5"];
    let got = position_embedding_sine(3, 5, 12, &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let d = max_abs_diff(&got, want);
    assert!(d < 1e-6, "position embedding differs by {d}");
}
