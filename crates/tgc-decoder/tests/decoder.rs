//! Tests of the cost-aggregation decoder against independent oracles: a PyTorch
//! reference (fixture), hand-computed cosines, a closed-form parameter count, and
//! gradient flow to every parameter.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tgc_decoder::{
    coordinate_channels, cost_volume, effective_window, CostAggregationDecoder, DecoderConfig,
    Error, FineCost, HalfStage, QuarterStage,
};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder_fixture.safetensors")
}

/// The tiny configuration of `make_fixture.py` (`BASE`).
fn tiny(use_clip_cost: bool) -> DecoderConfig {
    DecoderConfig {
        d_model: 16,
        hidden: 16,
        guidance_dim: 8,
        heads: 2,
        layers: 2,
        window: 4,
        mlp_ratio: 2,
        class_mlp: 24,
        class_pool: 2,
        use_clip_cost,
        f16_proj: 4,
        f8_proj: 4,
        up_channels: [12, 6],
        decoder_dims: [8, 4],
        guidance_kernel: 3,
        group_norm_channels: 4,
        dropout: 0.0,
        ln_eps: 1e-5,
        text_film: false,
        quarter: None,
        half: None,
        coord_channels: false,
        fine_cost: None,
    }
}

/// `tiny` with the FiLM and the quarter stage of the fixture's case `d`.
fn tiny_quarter() -> DecoderConfig {
    DecoderConfig {
        text_film: true,
        quarter: Some(QuarterStage {
            in_channels: 3,
            proj: 4,
            up_channels: 6,
            dim: 4,
        }),
        ..tiny(true)
    }
}

/// `tiny_quarter` with the half stage of the fixture's case `e`.
fn tiny_half() -> DecoderConfig {
    DecoderConfig {
        half: Some(HalfStage {
            in_channels: 3,
            proj: 3,
            up_channels: 5,
            dim: 4,
        }),
        ..tiny_quarter()
    }
}

/// `tiny_half` with the coordinate channels of the fixture's case `f`.
fn tiny_coord() -> DecoderConfig {
    DecoderConfig {
        coord_channels: true,
        ..tiny_half()
    }
}

/// `tiny_half` with the fine cost maps of the fixture's case `g` (1/16, 1/8 and 1/4
/// stages; the half stage has none).
fn tiny_fine() -> DecoderConfig {
    DecoderConfig {
        fine_cost: Some(FineCost { heads: 2, dim: 3 }),
        ..tiny_half()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> R<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Random decoder inputs `(vision, text, f16, f8, clip_cost)` for B images, K prompts,
/// an `h x w` grid and width `d`.
fn random_inputs(
    b: usize,
    k: usize,
    h: usize,
    w: usize,
    d: usize,
) -> R<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let dev = Device::Cpu;
    Ok((
        Tensor::randn(0f32, 1.0, (b * k, d, h, w), &dev)?,
        Tensor::randn(0f32, 1.0, (b, k, d), &dev)?,
        Tensor::randn(0f32, 1.0, (b, d, 2 * h, 2 * w), &dev)?,
        Tensor::randn(0f32, 1.0, (b, d, 4 * h, 4 * w), &dev)?,
        Tensor::randn(0f32, 0.3, (b, k, h, w), &dev)?,
    ))
}

fn check_case(case: &str, use_clip: bool) -> R<()> {
    check_case_cfg(case, use_clip, tiny(use_clip))
}

fn check_case_cfg(case: &str, use_clip: bool, cfg: DecoderConfig) -> R<()> {
    let dev = Device::Cpu;
    let path = fixture_path();
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &dev)?;
    let get = |k: &str| -> R<Tensor> {
        t.get(&format!("{case}.{k}"))
            .cloned()
            .ok_or_else(|| format!("fixture lacks {case}.{k}").into())
    };
    // SAFETY: the fixture file is committed and not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev)? };
    let dec = CostAggregationDecoder::new(&cfg, vb.pp(case))?;
    let (vision, text, f16, f8) = (
        get("input.vision")?,
        get("input.text")?,
        get("input.f16")?,
        get("input.f8")?,
    );
    let clip = if use_clip {
        Some(get("input.clip_cost")?)
    } else {
        None
    };
    let f4 = if cfg.quarter.is_some() {
        Some(get("input.f4")?)
    } else {
        None
    };
    let image = if cfg.half.is_some() {
        Some(get("input.image")?)
    } else {
        None
    };
    let cost = cost_volume(&vision, &text)?;
    let e_cost = max_abs_diff(&cost, &get("output.cost")?)?;
    let logits = dec.forward_with_guidance(
        &vision,
        &text,
        &f16,
        &f8,
        f4.as_ref(),
        image.as_ref(),
        clip.as_ref(),
        false,
    )?;
    let e = max_abs_diff(&logits, &get("output.logits")?)?;
    println!("case {case}: max |cost - torch| = {e_cost:.2e}, max |logits - torch| = {e:.2e}");
    assert!(
        e_cost < 1e-5,
        "case {case}: cost volume differs by {e_cost}"
    );
    assert!(e < 1e-4, "case {case}: logits differ from PyTorch by {e}");
    Ok(())
}

/// B=2, K=3, 8x8 grid, window 4 with shift 2 and Swin mask, CLIP cost channel.
#[test]
fn matches_pytorch_reference_square_grid_k3() -> R<()> {
    check_case("a", true)
}

/// B=1, K=1, 6x9 grid: 3x3 windows shifted by 1 (non-square mask), odd pooled width,
/// no CLIP cost channel.
#[test]
fn matches_pytorch_reference_odd_grid_k1() -> R<()> {
    check_case("b", false)
}

/// B=2, K=1 with the text FiLM (random, non-zero FiLM weights in the fixture).
#[test]
fn matches_pytorch_reference_with_text_film() -> R<()> {
    let cfg = DecoderConfig {
        text_film: true,
        ..tiny(true)
    };
    check_case_cfg("c", true, cfg)
}

/// B=2, K=2, 4x6 grid with the FiLM and the quarter stage: logits at 32x48.
#[test]
fn matches_pytorch_reference_with_quarter_stage() -> R<()> {
    check_case_cfg("d", true, tiny_quarter())
}

/// B=2, K=2, 3x4 grid with the FiLM, the quarter and the half stage: logits at 48x64
/// from a 96x128 image.
#[test]
fn matches_pytorch_reference_with_half_stage() -> R<()> {
    check_case_cfg("e", true, tiny_half())
}

/// B=2, K=2, grid 3x5: FiLM, quarter and half stages, and coordinate channels on all
/// four stages (the reference takes its coordinates from torch's `affine_grid`).
#[test]
fn matches_pytorch_reference_with_coordinate_channels() -> R<()> {
    check_case_cfg("f", true, tiny_coord())
}

/// B=2, K=2, grid 3x4: FiLM, quarter and half stages, and two fine cost heads of width 3
/// at the 1/16, 1/8 and 1/4 stages (the reference computes them with `F.normalize` and
/// an einsum per pair).
#[test]
fn matches_pytorch_reference_with_fine_cost() -> R<()> {
    check_case_cfg("g", true, tiny_fine())
}

/// Hand-computed pixel centres: `(2 j + 1) / w - 1` across, `(2 i + 1) / h - 1` down.
#[test]
fn coordinate_channels_are_pixel_centres() -> R<()> {
    let xy = coordinate_channels(2, 4, DType::F32, &Device::Cpu)?;
    assert_eq!(xy.dims(), [1, 2, 2, 4]);
    let v = xy.squeeze(0)?.to_vec3::<f32>()?;
    assert_eq!(v[0], vec![vec![-0.75, -0.25, 0.25, 0.75]; 2]);
    assert_eq!(v[1], vec![vec![-0.5; 4], vec![0.5; 4]]);
    let one = coordinate_channels(1, 1, DType::F64, &Device::Cpu)?;
    assert_eq!(one.flatten_all()?.to_vec1::<f64>()?, vec![0.0, 0.0]);
    Ok(())
}

/// Zero-initialised FiLM: a decoder with `text_film` computes exactly what the same
/// weights compute without it.
#[test]
fn text_film_starts_as_the_plain_decoder() -> R<()> {
    let dev = Device::Cpu;
    let film_cfg = DecoderConfig {
        text_film: true,
        ..tiny(true)
    };
    let vm_film = VarMap::new();
    let dec_film = CostAggregationDecoder::new(
        &film_cfg,
        VarBuilder::from_varmap(&vm_film, DType::F32, &dev),
    )?;
    let vm_plain = VarMap::new();
    let dec_plain = CostAggregationDecoder::new(
        &tiny(true),
        VarBuilder::from_varmap(&vm_plain, DType::F32, &dev),
    )?;
    {
        let film = vm_film.data().lock().unwrap();
        let plain = vm_plain.data().lock().unwrap();
        assert_eq!(
            film.len(),
            plain.len() + 6,
            "three FiLM linears (weight + bias)"
        );
        for (name, var) in plain.iter() {
            var.set(film[name].as_tensor())?;
        }
        for (name, var) in film.iter().filter(|(n, _)| n.starts_with("text_film.")) {
            let m = var
                .as_tensor()
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(m, 0.0, "{name} is not zero-initialised");
        }
    }
    let (vision, text, f16, f8, clip) = random_inputs(2, 2, 8, 8, 16)?;
    let a = dec_film.forward(&vision, &text, &f16, &f8, Some(&clip), false)?;
    let p = dec_plain.forward(&vision, &text, &f16, &f8, Some(&clip), false)?;
    assert_eq!(max_abs_diff(&a, &p)?, 0.0);
    Ok(())
}

/// Cosine channel against arithmetic done by hand.
#[test]
fn cost_volume_matches_hand_computation() -> R<()> {
    let dev = Device::Cpu;
    // B=1, K=2, D=3, h=1, w=2. Pair 0 sees pixels (1,0,0) and (1,1,0); pair 1 sees
    // (0,3,4) and (-2,0,0).
    // vision is (B*K) x D x h x w: channel-major per pair.
    let vision = Tensor::from_vec(
        vec![
            1f32, 1.0, 0.0, 1.0, 0.0, 0.0, // pair 0: d0=(1,1), d1=(0,1), d2=(0,0)
            0.0, -2.0, 3.0, 0.0, 4.0, 0.0, // pair 1: d0=(0,-2), d1=(3,0), d2=(4,0)
        ],
        (2, 3, 1, 2),
        &dev,
    )?;
    // Text of prompt 0 = (2,0,0); prompt 1 = (0,0,5).
    let text = Tensor::from_vec(vec![2f32, 0.0, 0.0, 0.0, 0.0, 5.0], (1, 2, 3), &dev)?;
    let c = cost_volume(&vision, &text)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // pair 0: cos((1,0,0),(1,0,0)) = 1; cos((1,1,0),(1,0,0)) = 1/sqrt(2).
    // pair 1: cos((0,3,4),(0,0,1)) = 4/5; cos((-2,0,0),(0,0,1)) = 0.
    let expect = [1.0f32, std::f32::consts::FRAC_1_SQRT_2, 0.8, 0.0];
    for (g, e) in c.iter().zip(expect) {
        assert!((g - e).abs() < 1e-6, "cost {c:?} vs {expect:?}");
    }
    Ok(())
}

/// Closed-form parameter count of the decoder (biases included):
/// (`g2` = guidance kernel squared, 9 by default)
/// - cost embedding `C_in*128*49 + 128`, appearance guidance `D*G*g2 + G`,
///   text guidance `D*G + G`;
/// - per layer: spatial = `2G` (guidance LN) + 2 blocks of
///   [`2C` LN1 + 2*((C+G)*C + C) q,k + 2*(C*C + C) v,proj + `2C` LN2 + MLP
///   `(C*rC + rC) + (rC*C + C)`]; class = `4C` (two LNs) + 2*((C+G)*C + C) q,k +
///   `C*C + C` v + MLP `(C*M + M) + (M*C + C)`;
/// - decoder guidance `D*p*g2 + p` for p in (32, 16);
/// - stage i: ConvT `in*u*4 + u`, DoubleConv `(u+p)*o*9 + o*o*9` + two GroupNorms `4o`;
/// - head `32*9 + 1`.
fn formula_count(cfg: &DecoderConfig) -> usize {
    let (d, c, g) = (cfg.d_model, cfg.hidden, cfg.guidance_dim);
    let cin = cfg.cost_channels();
    let rc = cfg.mlp_ratio * c;
    let m = cfg.class_mlp;
    let kk = cfg.guidance_kernel * cfg.guidance_kernel;
    let front = cin * c * 49 + c + d * g * kk + g + d * g + g;
    let block =
        2 * c + 2 * ((c + g) * c + c) + 2 * (c * c + c) + 2 * c + (c * rc + rc) + (rc * c + c);
    let spatial = 2 * g + 2 * block;
    let class = 4 * c + 2 * ((c + g) * c + c) + (c * c + c) + (c * m + m) + (m * c + c);
    let layers = cfg.layers * (spatial + class);
    let projs = [cfg.f16_proj, cfg.f8_proj];
    // Coordinate channels widen each DoubleConv's input by 2 (no parameters of their own).
    let xy = if cfg.coord_channels { 2 } else { 0 };
    // Fine cost maps widen the 1/16, 1/8 and 1/4 DoubleConvs' inputs by `heads` and add
    // a 1x1 conv `C_i*hd + hd` and a linear map `D*hd + hd` per stage.
    let (fx, fine) = match &cfg.fine_cost {
        Some(fc) => {
            let hd = fc.heads * fc.dim;
            let mut ins = vec![d, d];
            ins.extend(cfg.quarter.as_ref().map(|q| q.in_channels));
            let p: usize = ins.iter().map(|ci| ci * hd + hd + d * hd + hd).sum();
            (fc.heads, p)
        }
        None => (0, 0),
    };
    let guid: usize = projs.iter().map(|p| d * p * kk + p).sum();
    let ins = [c, cfg.decoder_dims[0]];
    let stages: usize = (0..2)
        .map(|i| {
            let (u, o, p) = (cfg.up_channels[i], cfg.decoder_dims[i], projs[i]);
            ins[i] * u * 4 + u + (u + p + xy + fx) * o * 9 + o * o * 9 + 4 * o
        })
        .sum();
    let quarter = cfg.quarter.as_ref().map_or(0, |q| {
        let (u, o, p) = (q.up_channels, q.dim, q.proj);
        q.in_channels * p * kk
            + p
            + cfg.decoder_dims[1] * u * 4
            + u
            + (u + p + xy + fx) * o * 9
            + o * o * 9
            + 4 * o
    });
    // Half stage: patch conv `in*p*4 + p`, 3x3 conv `p*p*9 + p`, ConvT from the quarter
    // stage's output, DoubleConv and GroupNorms.
    let half = match (&cfg.half, &cfg.quarter) {
        (Some(hs), Some(q)) => {
            let (u, o, p) = (hs.up_channels, hs.dim, hs.proj);
            hs.in_channels * p * 4
                + p
                + p * p * 9
                + p
                + q.dim * u * 4
                + u
                + (u + p + xy) * o * 9
                + o * o * 9
                + 4 * o
        }
        _ => 0,
    };
    let head_in = match (&cfg.half, &cfg.quarter) {
        (Some(hs), _) => hs.dim,
        (None, Some(q)) => q.dim,
        (None, None) => cfg.decoder_dims[1],
    };
    let head = head_in * 9 + 1;
    let mut filmed = vec![c, cfg.decoder_dims[0], cfg.decoder_dims[1]];
    filmed.extend(cfg.quarter.as_ref().map(|q| q.dim));
    filmed.extend(cfg.half.as_ref().map(|hs| hs.dim));
    let film = if cfg.text_film {
        filmed.iter().map(|&ch| d * 2 * ch + 2 * ch).sum()
    } else {
        0
    };
    front + layers + guid + stages + quarter + half + head + film + fine
}

fn varmap_count(cfg: &DecoderConfig) -> R<usize> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    CostAggregationDecoder::new(cfg, vb)?;
    Ok(varmap.all_vars().iter().map(|v| v.elem_count()).sum())
}

#[test]
fn parameter_count_matches_formula() -> R<()> {
    let paper = DecoderConfig::default();
    let n = varmap_count(&paper)?;
    println!(
        "paper decoder parameters: {n} (formula {})",
        formula_count(&paper)
    );
    assert_eq!(n, formula_count(&paper));
    // The figure quoted in the crate docs.
    assert_eq!(n, 2_005_473);
    let no_clip = DecoderConfig {
        use_clip_cost: false,
        ..paper
    };
    assert_eq!(varmap_count(&no_clip)?, formula_count(&no_clip));
    assert_eq!(varmap_count(&tiny(true))?, formula_count(&tiny(true)));
    let k1 = DecoderConfig {
        guidance_kernel: 1,
        ..tiny(false)
    };
    assert_eq!(varmap_count(&k1)?, formula_count(&k1));
    let film = DecoderConfig {
        text_film: true,
        ..tiny(true)
    };
    assert_eq!(varmap_count(&film)?, formula_count(&film));
    assert_eq!(
        varmap_count(&tiny_quarter())?,
        formula_count(&tiny_quarter())
    );
    assert_eq!(varmap_count(&tiny_half())?, formula_count(&tiny_half()));
    assert_eq!(varmap_count(&tiny_coord())?, formula_count(&tiny_coord()));
    let coord_plain = DecoderConfig {
        coord_channels: true,
        ..tiny(true)
    };
    assert_eq!(varmap_count(&coord_plain)?, formula_count(&coord_plain));
    assert_eq!(varmap_count(&tiny_fine())?, formula_count(&tiny_fine()));
    let fine_plain = DecoderConfig {
        fine_cost: Some(FineCost { heads: 3, dim: 2 }),
        ..tiny(false)
    };
    assert_eq!(varmap_count(&fine_plain)?, formula_count(&fine_plain));
    Ok(())
}

/// Every parameter and the `vision` input get a finite, non-zero gradient.
fn gradient_flow(b: usize, k: usize, h: usize, w: usize, use_clip: bool, gk: usize) -> R<()> {
    gradient_flow_cfg(
        b,
        k,
        h,
        w,
        use_clip,
        DecoderConfig {
            guidance_kernel: gk,
            ..tiny(use_clip)
        },
    )
}

fn gradient_flow_cfg(
    b: usize,
    k: usize,
    h: usize,
    w: usize,
    use_clip: bool,
    cfg: DecoderConfig,
) -> R<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let dec = CostAggregationDecoder::new(&cfg, vb)?;
    let d = cfg.d_model;
    let vision = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b * k, d, h, w), &dev)?)?;
    let text = Tensor::randn(0f32, 1.0, (b, k, d), &dev)?;
    let f16 = Tensor::randn(0f32, 1.0, (b, d, 2 * h, 2 * w), &dev)?;
    let f8 = Tensor::randn(0f32, 1.0, (b, d, 4 * h, 4 * w), &dev)?;
    let clip = Tensor::randn(0f32, 0.3, (b, k, h, w), &dev)?;
    let f4 = match &cfg.quarter {
        Some(q) => Some(Tensor::randn(
            0f32,
            1.0,
            (b, q.in_channels, 8 * h, 8 * w),
            &dev,
        )?),
        None => None,
    };
    let image = match &cfg.half {
        Some(hs) => Some(Tensor::randn(
            0f32,
            1.0,
            (b, hs.in_channels, 32 * h, 32 * w),
            &dev,
        )?),
        None => None,
    };
    let logits = dec.forward_with_guidance(
        &vision,
        &text,
        &f16,
        &f8,
        f4.as_ref(),
        image.as_ref(),
        use_clip.then_some(&clip),
        true,
    )?;
    // A random weighting so no gradient vanishes by symmetry of the loss.
    let target = Tensor::randn(0f32, 1.0, logits.dims(), &dev)?;
    let loss = (logits * target)?.sum_all()?;
    let grads = loss.backward()?;
    let data = varmap.data().lock().unwrap();
    assert!(!data.is_empty());
    let mut missing = vec![];
    for (name, var) in data.iter() {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                let v = g.flatten_all()?.to_vec1::<f32>()?;
                if v.iter().any(|x| !x.is_finite()) {
                    missing.push(format!("{name}: non-finite gradient"));
                }
                let norm = v.iter().map(|x| x.abs()).fold(0f32, f32::max);
                // With K = 1 the class attention is exactly its value path up to the
                // 1e-6 eps of the normaliser: q and k then get gradients of order
                // eps/(q·k)^2, pure rounding noise in f32. Everything else must move.
                let class_qk = name.contains(".class.q.") || name.contains(".class.k.");
                if norm == 0.0 && !(k == 1 && class_qk) {
                    missing.push(format!("{name}: zero gradient"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "gradient problems: {missing:#?}");
    let gv = grads
        .get(vision.as_tensor())
        .ok_or("vision input has no gradient")?;
    let gmax = gv.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(gmax.is_finite() && gmax > 0.0, "vision gradient {gmax}");
    Ok(())
}

#[test]
fn every_parameter_gets_gradient_k2_with_clip_cost() -> R<()> {
    gradient_flow(2, 2, 8, 8, true, 3)
}

#[test]
fn every_parameter_gets_gradient_k1_without_clip_cost_1x1_guidance() -> R<()> {
    gradient_flow(2, 1, 6, 9, false, 1)
}

/// The zero-initialised FiLM weights still get a gradient (d out / d gamma = x).
#[test]
fn every_parameter_gets_gradient_k1_with_text_film() -> R<()> {
    let cfg = DecoderConfig {
        text_film: true,
        ..tiny(true)
    };
    gradient_flow_cfg(2, 1, 8, 8, true, cfg)
}

/// The quarter stage's parameters (FiLM included) get gradients too.
#[test]
fn every_parameter_gets_gradient_k2_with_quarter_stage() -> R<()> {
    gradient_flow_cfg(2, 2, 4, 6, true, tiny_quarter())
}

/// The half stage's parameters (FiLM included) get gradients too.
#[test]
fn every_parameter_gets_gradient_k2_with_half_stage() -> R<()> {
    gradient_flow_cfg(2, 2, 3, 4, true, tiny_half())
}

/// With coordinate channels on every stage, too.
#[test]
fn every_parameter_gets_gradient_k2_with_coordinate_channels() -> R<()> {
    gradient_flow_cfg(2, 2, 3, 4, true, tiny_coord())
}

/// With fine cost maps on the 1/16, 1/8 and 1/4 stages, too.
#[test]
fn every_parameter_gets_gradient_k2_with_fine_cost() -> R<()> {
    gradient_flow_cfg(2, 2, 3, 4, true, tiny_fine())
}

/// The fine cost maps' gradients against central finite differences in f64: a few
/// entries of each projection at the 1/16 and 1/4 stages.
#[test]
fn fine_cost_gradients_match_finite_differences() -> R<()> {
    let dev = Device::Cpu;
    let cfg = DecoderConfig {
        half: None,
        ..tiny_fine()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let dec = CostAggregationDecoder::new(&cfg, vb)?;
    let (b, k, h, w, d) = (2, 2, 2, 2, cfg.d_model);
    let vision = Tensor::randn(0f64, 1.0, (b * k, d, h, w), &dev)?;
    let text = Tensor::randn(0f64, 1.0, (b, k, d), &dev)?;
    let f16 = Tensor::randn(0f64, 1.0, (b, d, 2 * h, 2 * w), &dev)?;
    let f8 = Tensor::randn(0f64, 1.0, (b, d, 4 * h, 4 * w), &dev)?;
    let f4 = Tensor::randn(0f64, 1.0, (b, 3, 8 * h, 8 * w), &dev)?;
    let clip = Tensor::randn(0f64, 0.3, (b, k, h, w), &dev)?;
    let weights = Tensor::randn(0f64, 1.0, (b, k, 8 * h, 8 * w), &dev)?;
    let loss = || -> R<Tensor> {
        let logits =
            dec.forward_with_f4(&vision, &text, &f16, &f8, Some(&f4), Some(&clip), false)?;
        Ok((logits * &weights)?.sum_all()?)
    };
    let grads = loss()?.backward()?;
    let vars = varmap.data().lock().unwrap().clone();
    let eps = 1e-6;
    for name in [
        "fine_cost.0.image.weight",
        "fine_cost.0.text.weight",
        "fine_cost.2.image.weight",
        "fine_cost.2.text.bias",
    ] {
        let var = vars.get(name).ok_or(format!("no parameter {name}"))?;
        let g = grads
            .get(var.as_tensor())
            .ok_or(format!("{name}: no gradient"))?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        // The decoder has ReLUs, so with random inputs a perturbation of 1e-6 sometimes
        // crosses a kink, where a finite difference says nothing about the gradient.
        // Such points show up as central differences at eps and eps / 2 that disagree;
        // they are skipped, and three smooth entries per parameter are required.
        let n = base.len();
        let mut smooth = 0;
        let mut order = vec![0, n / 2, n - 1];
        order.extend((1..n - 1).filter(|&i| i != n / 2));
        for idx in order {
            if smooth == 3 {
                break;
            }
            let at = |delta: f64| -> R<f64> {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &dev)?)?;
                Ok(loss()?.to_scalar::<f64>()?)
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
            let fd_half = (at(eps / 2.0)? - at(-eps / 2.0)?) / eps;
            var.set(&Tensor::from_vec(
                base.clone(),
                var.as_tensor().dims(),
                &dev,
            )?)?;
            if (fd - fd_half).abs() > 1e-7 * (1.0 + fd.abs()) {
                continue;
            }
            let err = (fd - g[idx]).abs();
            assert!(
                err <= 1e-6 * (1.0 + fd.abs()),
                "{name}[{idx}]: analytic {} vs finite difference {fd}",
                g[idx]
            );
            smooth += 1;
        }
        assert_eq!(smooth, 3, "{name}: too few entries away from a ReLU kink");
    }
    Ok(())
}

/// A fine cost with no heads or no width is a config error.
#[test]
fn fine_cost_rejects_empty_heads() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = DecoderConfig {
        fine_cost: Some(FineCost { heads: 0, dim: 3 }),
        ..tiny(true)
    };
    let err = CostAggregationDecoder::new(&cfg, vb)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fine_cost"), "{err}");
}

/// A half-stage decoder needs the image at `32h x 32w` with its channels and the
/// quarter stage; a decoder without it rejects an image.
#[test]
fn half_stage_checks_image_and_config() -> R<()> {
    let dev = Device::Cpu;
    let (b, k, h, w, d) = (1, 2, 2, 2, 16);
    let (vision, text, f16, f8, clip) = random_inputs(b, k, h, w, d)?;
    let f4 = Tensor::zeros((b, 3, 8 * h, 8 * w), DType::F32, &dev)?;
    let image = Tensor::zeros((b, 3, 32 * h, 32 * w), DType::F32, &dev)?;
    let vm = VarMap::new();
    let dec =
        CostAggregationDecoder::new(&tiny_half(), VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let run = |f4: Option<&Tensor>, image: Option<&Tensor>| {
        dec.forward_with_guidance(&vision, &text, &f16, &f8, f4, image, Some(&clip), false)
    };
    assert_eq!(
        run(Some(&f4), Some(&image))?.dims(),
        &[b, k, 16 * h, 16 * w]
    );
    assert!(matches!(run(Some(&f4), None), Err(Error::Config(_))));
    let small = image.narrow(3, 0, 16 * w)?;
    assert!(matches!(
        run(Some(&f4), Some(&small)),
        Err(Error::Shape {
            tensor: "image",
            ..
        })
    ));
    let vm = VarMap::new();
    let quarter = CostAggregationDecoder::new(
        &tiny_quarter(),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    assert!(matches!(
        quarter.forward_with_guidance(
            &vision,
            &text,
            &f16,
            &f8,
            Some(&f4),
            Some(&image),
            Some(&clip),
            false
        ),
        Err(Error::Config(_))
    ));
    // The half stage upsamples the quarter stage's output.
    let no_quarter = DecoderConfig {
        quarter: None,
        ..tiny_half()
    };
    let vm = VarMap::new();
    match CostAggregationDecoder::new(&no_quarter, VarBuilder::from_varmap(&vm, DType::F32, &dev)) {
        Err(Error::Config(m)) => assert!(m.contains("quarter"), "{m}"),
        other => panic!("expected a config error, got {:?}", other.map(|_| ())),
    }
    Ok(())
}

/// A quarter-stage decoder needs `f4` at `8h x 8w` with its channels; a plain one
/// rejects it.
#[test]
fn quarter_stage_checks_f4() -> R<()> {
    let dev = Device::Cpu;
    let (b, k, h, w, d) = (1, 2, 4, 4, 16);
    let (vision, text, f16, f8, clip) = random_inputs(b, k, h, w, d)?;
    let f4 = Tensor::zeros((b, 3, 8 * h, 8 * w), DType::F32, &dev)?;
    let vm = VarMap::new();
    let dec = CostAggregationDecoder::new(
        &tiny_quarter(),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let logits = dec.forward_with_f4(&vision, &text, &f16, &f8, Some(&f4), Some(&clip), false)?;
    assert_eq!(logits.dims(), &[b, k, 8 * h, 8 * w]);
    assert!(matches!(
        dec.forward(&vision, &text, &f16, &f8, Some(&clip), false),
        Err(Error::Config(_))
    ));
    let f4_small = f4.narrow(2, 0, 4 * h)?;
    assert!(matches!(
        dec.forward_with_f4(
            &vision,
            &text,
            &f16,
            &f8,
            Some(&f4_small),
            Some(&clip),
            false
        ),
        Err(Error::Shape { tensor: "f4", .. })
    ));
    let vm = VarMap::new();
    let plain =
        CostAggregationDecoder::new(&tiny(true), VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    assert!(matches!(
        plain.forward_with_f4(&vision, &text, &f16, &f8, Some(&f4), Some(&clip), false),
        Err(Error::Config(_))
    ));
    Ok(())
}

/// The paper grid (24, windows of 12) and the CPU preset grid (14, windows of 7) run at
/// the paper widths and give finite logits at 1/8 scale.
#[test]
fn paper_and_cpu_grids() -> R<()> {
    assert_eq!(effective_window(24, 12), 12);
    assert_eq!(effective_window(14, 12), 7);
    let dev = Device::Cpu;
    for (grid, d) in [(24usize, 256usize), (14, 128)] {
        let cfg = DecoderConfig {
            d_model: d,
            ..DecoderConfig::default()
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let dec = CostAggregationDecoder::new(&cfg, vb)?;
        let (b, k) = (1, 2);
        let (vision, text, f16, f8, clip) = random_inputs(b, k, grid, grid, d)?;
        let logits = dec.forward(&vision, &text, &f16, &f8, Some(&clip), false)?;
        assert_eq!(logits.dims(), &[b, k, 4 * grid, 4 * grid]);
        let s = logits.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(s.is_finite() && s > 0.0);
        let full = tgc_decoder::resize_logits(&logits, 8 * grid, 8 * grid)?;
        assert_eq!(full.dims(), &[b, k, 8 * grid, 8 * grid]);
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> R<()> {
    let dev = Device::Cpu;
    let cfg = tiny(true);
    let varmap = VarMap::new();
    let dec =
        CostAggregationDecoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let (b, k, h, w, d) = (1, 2, 8, 8, 16);
    let vision = Tensor::zeros((b * k, d, h, w), DType::F32, &dev)?;
    let text = Tensor::zeros((b, k, d), DType::F32, &dev)?;
    let f16 = Tensor::zeros((b, d, 2 * h, 2 * w), DType::F32, &dev)?;
    let f8 = Tensor::zeros((b, d, 4 * h, 4 * w), DType::F32, &dev)?;
    let clip = Tensor::zeros((b, k, h, w), DType::F32, &dev)?;
    // Missing CLIP cost while configured.
    assert!(matches!(
        dec.forward(&vision, &text, &f16, &f8, None, false),
        Err(Error::ClipCost(_))
    ));
    // f8 at the wrong scale.
    assert!(matches!(
        dec.forward(&vision, &text, &f16, &f16, Some(&clip), false),
        Err(Error::Shape { tensor: "f8", .. })
    ));
    // vision not per pair.
    let v1 = vision.narrow(0, 0, 1)?;
    assert!(matches!(
        dec.forward(&v1, &text, &f16, &f8, Some(&clip), false),
        Err(Error::Shape {
            tensor: "vision",
            ..
        })
    ));
    // Heads must divide hidden.
    let bad = DecoderConfig {
        heads: 3,
        ..tiny(true)
    };
    let vm = VarMap::new();
    assert!(matches!(
        CostAggregationDecoder::new(&bad, VarBuilder::from_varmap(&vm, DType::F32, &dev)),
        Err(Error::Config(_))
    ));
    Ok(())
}
