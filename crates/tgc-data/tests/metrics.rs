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

/// Six 10x10 images (shares 0, 1%, 2%, 4%, 15%, 20%) grouped by hand.
#[test]
fn lesion_size_breakdown_by_hand() {
    let (h, w) = (10, 10);
    let mut g = vec![0f32; 6 * 100];
    let mut p = vec![0f32; 6 * 100];
    // img0: both empty -> "empty", Dice 0 by the formula.
    // img1: 1 px (1%), found exactly.
    g[100] = 1.0;
    p[100] = 0.9;
    // img2: 2 px (2%, on the edge -> "2-5%"), one of them found: 2*1/(1+2).
    g[200..202].fill(1.0);
    p[200] = 0.8;
    // img3: 4 px (4%), 4 predicted of which 2 overlap: 2*2/(4+4).
    g[300..304].fill(1.0);
    p[302..306].fill(0.7);
    // img4: 15 px (15%), found exactly.
    g[400..415].fill(1.0);
    p[400..415].fill(0.6);
    // img5: 20 px (20%, on the edge -> "over 20%"), missed.
    g[500..520].fill(1.0);
    let (pt, gt) = (t(&p, 6, h, w), t(&g, 6, h, w));
    let mut by_size = LesionSizeBreakdown::new(0.5);
    // Two updates, as batches arrive.
    by_size
        .update(&pt.narrow(0, 0, 4).unwrap(), &gt.narrow(0, 0, 4).unwrap())
        .unwrap();
    by_size
        .update(&pt.narrow(0, 4, 2).unwrap(), &gt.narrow(0, 4, 2).unwrap())
        .unwrap();
    assert_eq!(
        LesionSizeBreakdown::shares(&gt).unwrap(),
        vec![0.0, 0.01, 0.02, 0.04, 0.15, 0.20]
    );
    let groups = by_size.groups();
    let labels: Vec<&str> = groups.iter().map(|g| g.label.as_str()).collect();
    assert_eq!(
        labels,
        ["empty", "under 2%", "2-5%", "5-10%", "10-20%", "over 20%"]
    );
    let n: Vec<usize> = groups.iter().map(|g| g.summary.n_images).collect();
    assert_eq!(n, [1, 1, 2, 0, 1, 1]);
    let d1 = 2.0 / (2.0 + 1e-5);
    let d2 = 2.0 / (3.0 + 1e-5);
    let d3 = 4.0 / (8.0 + 1e-5);
    let d4 = 30.0 / (30.0 + 1e-5);
    let dice: Vec<f64> = groups.iter().map(|g| g.summary.dice).collect();
    let want = [0.0, d1, (d2 + d3) / 2.0, 0.0, d4, 0.0];
    for (got, want) in dice.iter().zip(want) {
        assert!((got - want).abs() < 1e-12, "{dice:?} vs {want}");
    }
    // The groups' losses add up to what the overall mean misses.
    let mut all = SegMetrics::new();
    all.update(&pt, &gt).unwrap();
    let overall = all.summary().dice;
    assert!((overall - (d1 + d2 + d3 + d4) / 6.0).abs() < 1e-12);
    let lost: f64 = groups.iter().map(|g| g.dice_lost).sum();
    assert!((lost - (1.0 - overall)).abs() < 1e-12);
    assert!((groups[2].dice_lost - 2.0 / 6.0 * (1.0 - (d2 + d3) / 2.0)).abs() < 1e-12);

    // Custom edges, and the errors.
    let two = LesionSizeBreakdown::with_edges(0.5, &[0.1]).unwrap();
    let labels: Vec<String> = two.groups().into_iter().map(|g| g.label).collect();
    assert_eq!(labels, ["empty", "under 10%", "over 10%"]);
    for bad in [&[][..], &[0.0], &[0.05, 0.05], &[0.2, 0.1], &[0.5, 1.0]] {
        assert!(
            LesionSizeBreakdown::with_edges(0.5, bad).is_err(),
            "{bad:?}"
        );
    }
    assert!(by_size
        .update(&t(&[0.0; 4], 1, 2, 2), &t(&[0.0; 8], 2, 2, 2))
        .is_err());
}
