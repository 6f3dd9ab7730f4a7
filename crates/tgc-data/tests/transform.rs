//! Resampling against torch's `F.interpolate` (fixture from fixtures/make_fixtures.py).

use std::path::PathBuf;

use tgc_data::*;

#[test]
fn resize_matches_torch_interpolate() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real_data.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let r = &fx["resize"];
    let vals = |k: &str| -> Vec<f32> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let img = vals("image");
    let mask = Mask {
        height: 5,
        width: 7,
        data: img.iter().map(|&v| (v > 0.5) as u8).collect(),
    };
    let s = Sample {
        id: "r".into(),
        image: ImageF32::grey(5, 7, img).unwrap(),
        mask,
        caption: "x".into(),
        aux_caption: None,
    };
    for (a, b) in [(3usize, 9usize), (9, 3)] {
        let pre = Preprocess {
            clip_size: a,
            cnn_size: b,
            label_size: a,
        };
        let out = pre.apply(&s, &AugmentParams::default());
        for c in 0..3 {
            // Undo each normalisation: every channel is the same grey resample.
            let clip: Vec<f32> = out.clip[c * a * a..(c + 1) * a * a]
                .iter()
                .map(|v| v * CLIP_STD[c] + CLIP_MEAN[c])
                .collect();
            let cnn: Vec<f32> = out.cnn[c * b * b..(c + 1) * b * b]
                .iter()
                .map(|v| v * 0.5 + 0.5)
                .collect();
            for (x, y) in clip.iter().zip(vals(&format!("bilinear_{a}"))) {
                assert!((x - y).abs() < 1e-5, "clip {a}: {x} vs {y}");
            }
            for (x, y) in cnn.iter().zip(vals(&format!("bilinear_{b}"))) {
                assert!((x - y).abs() < 1e-5, "cnn {b}: {x} vs {y}");
            }
        }
        assert_eq!(out.mask, vals(&format!("nearest_{a}")), "labels {a}");
    }
}

#[test]
fn axis_aligned_fast_path_equals_general_path() {
    // A rotation of 1e-7 degrees takes the general per-pixel path; 0 takes the separable
    // fast path. Both must agree (flip and scale included), for grey and RGB images.
    let ds = SyntheticPhantoms::new(PhantomKind::ChestXray, 1, 3, 40);
    let mut s = ds.get(0).unwrap();
    let pre = Preprocess {
        clip_size: 24,
        cnn_size: 56,
        label_size: 40,
    };
    for rgb in [false, true] {
        if rgb {
            let g = s.image.data.clone();
            let mut d = g.clone();
            d.extend(g.iter().map(|v| v * 0.5));
            d.extend(g.iter().map(|v| 1.0 - v));
            s.image = ImageF32 {
                channels: 3,
                height: 40,
                width: 40,
                data: d,
            };
        }
        for (hflip, scale) in [(false, 1.0), (true, 1.0), (true, 1.13), (false, 0.9)] {
            let a = AugmentParams {
                hflip,
                rotation_deg: 0.0,
                scale,
            };
            let b = AugmentParams {
                rotation_deg: 1e-7,
                ..a
            };
            let (x, y) = (pre.apply(&s, &a), pre.apply(&s, &b));
            for (p, q) in x.clip.iter().zip(&y.clip).chain(x.cnn.iter().zip(&y.cnn)) {
                assert!(
                    (p - q).abs() < 1e-4,
                    "{p} vs {q} (flip {hflip}, scale {scale}, rgb {rgb})"
                );
            }
        }
    }
}
