//! Metrics against hand-computed cases.

use candle_core::{Device, Tensor};
use tgc_data::*;

fn t(v: &[f32], b: usize, h: usize, w: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (b, 1, h, w), &Device::Cpu).unwrap()
}

#[test]
fn per_image_and_micro_by_hand() {
    // Image 1 (2x2): pred probs [0.9, 0.6, 0.2, 0.5] -> P = {0, 1} (0.5 is not > 0.5);
    // target {0, 2}. |P∩G| = 1, |P| = 2, |G| = 2: Dice = 2/(4+1e-5), IoU = 1/3.
    // Image 2: pred {3}, target {} : Dice 0, IoU 0/1 = 0.
    // Image 3: both empty: Dice 0 (formula), IoU defined 0.
    let p = t(
        &[0.9, 0.6, 0.2, 0.5, 0.0, 0.0, 0.0, 0.7, 0.1, 0.1, 0.1, 0.1],
        3,
        2,
        2,
    );
    let g = t(
        &[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        3,
        2,
        2,
    );
    let mut m = SegMetrics::new();
    m.update(&p, &g).unwrap();
    let s = m.summary();
    assert_eq!(s.n_images, 3);
    let d1 = 2.0 / (4.0 + 1e-5);
    assert!((s.dice - d1 / 3.0).abs() < 1e-12);
    assert!((s.iou - (1.0 / 3.0) / 3.0).abs() < 1e-12);
    // Pooled: I = 1, P = 3, G = 2, U = 4.
    assert!((s.micro_dice - 2.0 / (5.0 + 1e-5)).abs() < 1e-12);
    assert!((s.micro_iou - 0.25).abs() < 1e-12);

    // Logit threshold 0: the same decisions from logits.
    let logits = t(&[2.0, 0.4, -1.0, 0.0], 1, 2, 2);
    let mut ml = SegMetrics::for_logits();
    ml.update(&logits, &t(&[1.0, 0.0, 1.0, 0.0], 1, 2, 2))
        .unwrap();
    assert!((ml.summary().dice - d1).abs() < 1e-12);

    // Accumulates across updates: perfect image added -> mean of (d1, 0, 0, ~1).
    m.update(
        &t(&[1.0, 0.0, 0.0, 0.0], 1, 2, 2),
        &t(&[1.0, 0.0, 0.0, 0.0], 1, 2, 2),
    )
    .unwrap();
    let s = m.summary();
    assert!((s.dice - (d1 + 2.0 / (2.0 + 1e-5)) / 4.0).abs() < 1e-12);
    assert!((s.iou - (1.0 / 3.0 + 1.0) / 4.0).abs() < 1e-12);

    // Shape mismatch is an error, not a panic.
    assert!(m
        .update(&t(&[0.0; 4], 1, 2, 2), &t(&[0.0; 8], 2, 2, 2))
        .is_err());
}

#[test]
fn volume_dice_by_hand() {
    let mut m = SegMetrics::new();
    // Organ "a": pred {0,1,2}, gt {1,2,3,4}: 2*2/(3+4) = 4/7.
    let p = [true, true, true, false, false];
    let g = [false, true, true, true, true];
    assert_eq!(m.update_volume("a", &p, &g).unwrap(), Some(4.0 / 7.0));
    // Second volume of "a": absent from both -> skipped.
    assert_eq!(
        m.update_volume("a", &[false; 5], &[false; 5]).unwrap(),
        None
    );
    // Third volume of "a": perfect.
    assert_eq!(m.update_volume("a", &g, &g).unwrap(), Some(1.0));
    // Organ "b" via label maps: pred labels [2,2,0,0], gt [2,0,0,0] -> 2/3; label 3
    // ("c") predicted but absent -> 0.
    m.update_label_volume(
        &[2, 2, 0, 3],
        &[2, 0, 0, 0],
        &[(2, "b".into()), (3, "c".into())],
    )
    .unwrap();
    let s = m.summary();
    assert!((s.organ_dice["a"] - (4.0 / 7.0 + 1.0) / 2.0).abs() < 1e-12);
    assert!((s.organ_dice["b"] - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(s.organ_dice["c"], 0.0);
    let mean = ((4.0 / 7.0 + 1.0) / 2.0 + 2.0 / 3.0 + 0.0) / 3.0;
    assert!((s.mean_organ_dice.unwrap() - mean).abs() < 1e-12);
}
