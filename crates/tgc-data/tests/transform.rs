//! Resampling against torch's `F.interpolate` (fixture from fixtures/make_fixtures.py).

use std::path::PathBuf;

use tgc_data::*;

/// The `resize` fixture: a named array of it as f32.
fn resize_fixture() -> impl Fn(&str) -> Vec<f32> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real_data.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    move |k: &str| {
        fx["resize"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    }
}

#[test]
fn resize_matches_torch_interpolate() {
    let vals = resize_fixture();
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

/// Contrast, brightness and gamma change the CLIP and CNN inputs exactly as the formula
/// says (applied to torch's bilinear resample), and leave the label and caption alone.
#[test]
fn intensity_augmentation_changes_the_image_only() {
    let vals = resize_fixture();
    let img = vals("image");
    let s = Sample {
        id: "r".into(),
        mask: Mask {
            height: 5,
            width: 7,
            data: img.iter().map(|&v| (v > 0.5) as u8).collect(),
        },
        image: ImageF32::grey(5, 7, img).unwrap(),
        caption: "Bilateral pulmonary infection, left lung.".into(),
        aux_caption: None,
    };
    let pre = Preprocess {
        clip_size: 3,
        cnn_size: 9,
        label_size: 3,
    };
    let (contrast, brightness, gamma) = (1.3f64, -0.05f64, 0.7f64);
    let aug = AugmentParams {
        contrast: contrast as f32,
        brightness: brightness as f32,
        gamma: gamma as f32,
        ..AugmentParams::default()
    };
    let expected = |v: f32| -> f32 {
        let y = contrast * ((v as f64).powf(gamma) - 0.5) + 0.5 + brightness;
        y.clamp(0.0, 1.0) as f32
    };
    let plain = pre.apply(&s, &AugmentParams::default());
    let out = pre.apply(&s, &aug);
    let (mut clamped, mut changed) = (0, 0);
    for c in 0..3 {
        for (i, &t) in vals("bilinear_9").iter().enumerate() {
            let x = out.cnn[c * 81 + i] * 0.5 + 0.5;
            assert!(
                (x - expected(t)).abs() < 1e-5,
                "cnn {i}: {x} vs {}",
                expected(t)
            );
            clamped += (expected(t) == 0.0 || expected(t) == 1.0) as usize;
            changed += ((x - t).abs() > 1e-3) as usize;
        }
        for (i, &t) in vals("bilinear_3").iter().enumerate() {
            let x = out.clip[c * 9 + i] * CLIP_STD[c] + CLIP_MEAN[c];
            assert!(
                (x - expected(t)).abs() < 1e-5,
                "clip {i}: {x} vs {}",
                expected(t)
            );
        }
    }
    assert!(
        changed > 200,
        "the intensities hardly changed ({changed} of 243)"
    );
    assert!(clamped < 243, "every value clamped: a degenerate case");
    assert_eq!(out.mask, plain.mask);
    assert_eq!(out.caption, plain.caption);
    assert!(!AugmentParams::is_discrete_variant(out.variant));
    assert_eq!(plain.variant, 0);
}

/// Intensity draws stay in their ranges (gamma log-uniform, so as often below 1 as
/// above on (0.8, 1.25)), leave the geometry alone, and an `Augment` written before
/// these fields existed still reads (as off).
#[test]
fn intensity_draws_stay_in_their_ranges() {
    let policy = Augment {
        enabled: true,
        contrast_range: (0.8, 1.2),
        max_brightness: 0.1,
        gamma_range: (0.8, 1.25),
        ..Augment::off()
    };
    let mut rng = SplitMix64::new(7);
    let n = 4000;
    let mut below_one = 0;
    for _ in 0..n {
        let a = policy.draw(&mut rng);
        assert!((0.8..=1.2).contains(&a.contrast), "{a:?}");
        assert!((-0.1..=0.1).contains(&a.brightness), "{a:?}");
        assert!((0.8..=1.25).contains(&a.gamma), "{a:?}");
        assert!(!a.hflip && a.rotation_deg == 0.0 && a.scale == 1.0, "{a:?}");
        below_one += (a.gamma < 1.0) as usize;
    }
    let share = below_one as f64 / n as f64;
    assert!(
        (share - 0.5).abs() < 0.03,
        "gamma below 1 in {share} of draws"
    );

    let old =
        r#"{"enabled":true,"hflip_prob":0.5,"max_rotation_deg":10.0,"scale_range":[0.9,1.1]}"#;
    let read: Augment = serde_json::from_str(old).unwrap();
    assert_eq!(read, Augment::full());
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
                scale,
                ..AugmentParams::default()
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
