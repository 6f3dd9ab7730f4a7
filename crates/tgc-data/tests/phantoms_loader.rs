//! Phantoms (determinism, text decides the target) and the loader (shapes, determinism,
//! text-aware flips).

use std::sync::Arc;

use candle_core::Device;
use tgc_data::*;

#[test]
fn phantoms_are_deterministic() {
    for kind in [PhantomKind::ChestXray, PhantomKind::CtSlice] {
        let a = SyntheticPhantoms::new(kind, 20, 7, 96);
        let b = SyntheticPhantoms::new(kind, 20, 7, 96);
        let c = SyntheticPhantoms::new(kind, 20, 8, 96);
        let mut differs = 0;
        for i in 0..20 {
            let (x, y, z) = (a.get(i).unwrap(), b.get(i).unwrap(), c.get(i).unwrap());
            // Same seed: identical bytes.
            let bytes = |s: &Sample| {
                s.image
                    .data
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>()
            };
            assert_eq!(bytes(&x), bytes(&y));
            assert_eq!(x.mask, y.mask);
            assert_eq!(x.caption, y.caption);
            differs += (bytes(&x) != bytes(&z)) as usize;
        }
        assert_eq!(differs, 20, "another seed gives other images");
    }
}

#[test]
fn caption_decides_the_target() {
    let ds = SyntheticPhantoms::new(PhantomKind::ChestXray, 200, 1, 64);
    let mut captions = std::collections::HashSet::new();
    for i in 0..ds.len() {
        let d = ds.get_detailed(i).unwrap();
        let s = &d.sample;
        captions.insert(s.caption.clone());
        // At least one distractor, at least one target.
        assert!(d.target.iter().any(|&t| t) && d.target.iter().any(|&t| !t));
        // The mask is exactly the union of the named candidates and no distractor pixel.
        for (c, &t) in d.candidates.iter().zip(&d.target) {
            assert!(c.count() > 20, "lesion too small in {i}");
            let inside = c
                .data
                .iter()
                .zip(&s.mask.data)
                .filter(|(a, b)| **a == 1 && **b == 1)
                .count();
            if t {
                assert_eq!(inside, c.count());
            } else {
                assert_eq!(inside, 0, "distractor in mask, sample {i}");
            }
        }
        // The caption is consistent with the candidate positions: parse it and check the
        // side of every target (patient's left = image right half).
        let p = LvitCaption::parse(&s.caption).unwrap();
        assert_eq!(p.areas, d.target.iter().filter(|&&t| t).count());
        let mut left = 0;
        let mut right = 0;
        for (c, &t) in d.candidates.iter().zip(&d.target) {
            if !t {
                continue;
            }
            let cx: f64 = c
                .data
                .iter()
                .enumerate()
                .filter(|(_, &v)| v == 1)
                .map(|(j, _)| (j % 64) as f64)
                .sum::<f64>()
                / c.count() as f64;
            if cx > 32.0 {
                left += 1
            } else {
                right += 1
            }
        }
        assert_eq!(
            (left, right),
            (p.left.len(), p.right.len()),
            "sample {i}: {}",
            s.caption
        );
    }
    assert!(captions.len() > 20, "captions vary: {}", captions.len());
    // A text-blind predictor that segments every candidate lesion scores clearly worse
    // than the caption-aware one (which is exact by construction).
    let mut blind = SegMetrics::new();
    for i in 0..ds.len() {
        let d = ds.get_detailed(i).unwrap();
        let mut union = vec![0f32; 64 * 64];
        for c in &d.candidates {
            for (u, &v) in union.iter_mut().zip(&c.data) {
                *u = u.max(v as f32);
            }
        }
        let t: Vec<f32> = d.sample.mask.data.iter().map(|&v| v as f32).collect();
        blind.update_slices(&union, &t, 1).unwrap();
    }
    let s = blind.summary();
    assert!(s.dice < 0.75, "text-blind Dice {}", s.dice);
}

#[test]
fn loader_shapes_determinism_and_flip() {
    let ds: Arc<dyn SegDataset> = Arc::new(SyntheticPhantoms::new(PhantomKind::CtSlice, 10, 5, 32));
    let pre = Preprocess {
        clip_size: 16,
        cnn_size: 32,
        label_size: 32,
    };
    let l = DataLoader::new(ds.clone(), pre, 4, Some(11), Augment::full(), Device::Cpu);
    assert_eq!(l.num_batches(), 3);
    let e0: Vec<Batch> = l.epoch(0).map(|b| b.unwrap()).collect();
    let e0b: Vec<Batch> = l.epoch(0).map(|b| b.unwrap()).collect();
    let e1: Vec<Batch> = l.epoch(1).map(|b| b.unwrap()).collect();
    assert_eq!(
        e0.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    assert_eq!(e0[0].clip_images.dims(), &[4, 3, 16, 16]);
    assert_eq!(e0[0].cnn_images.dims(), &[4, 3, 32, 32]);
    assert_eq!(e0[0].masks.dims(), &[4, 1, 32, 32]);
    let idx = |v: &[Batch]| v.iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>();
    assert_eq!(idx(&e0), idx(&e0b));
    assert_ne!(idx(&e0), idx(&e1));
    let mut sorted = idx(&e0);
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    for (a, b) in e0.iter().zip(&e0b) {
        let x = a
            .cnn_images
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = b
            .cnn_images
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y);
        assert_eq!(a.captions, b.captions);
    }
    // Masks stay binary after rotation/scale.
    let m = e0[0].masks.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));

    // Always-flip versus no augmentation: the image is mirrored and left/right swapped.
    let plain = DataLoader::new(ds.clone(), pre, 10, None, Augment::off(), Device::Cpu);
    let flip = DataLoader::new(
        ds.clone(),
        pre,
        10,
        None,
        Augment::always_flip(),
        Device::Cpu,
    );
    let a = plain.iter().next().unwrap().unwrap();
    let b = flip.iter().next().unwrap().unwrap();
    assert!(a.variants.iter().all(|&v| v == 0) && b.variants.iter().all(|&v| v == 1));
    assert_eq!(a.image_hashes, b.image_hashes);
    let mirrored = b.masks.flip_w();
    assert_eq!(
        a.masks.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        mirrored.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    for (x, y) in a.captions.iter().zip(&b.captions) {
        assert_eq!(&swap_left_right(x), y);
        let (p, q) = (
            LvitCaption::parse(x).unwrap(),
            LvitCaption::parse(y).unwrap(),
        );
        assert_eq!((p.left.clone(), p.right.clone()), (q.right, q.left));
    }
    for (x, y) in a.aux_captions.iter().zip(&b.aux_captions) {
        assert_eq!(&swap_left_right(x), y);
    }
}

trait FlipW {
    fn flip_w(&self) -> candle_core::Tensor;
}
impl FlipW for candle_core::Tensor {
    fn flip_w(&self) -> candle_core::Tensor {
        let w = self.dim(3).unwrap();
        let idx: Vec<u32> = (0..w as u32).rev().collect();
        let idx = candle_core::Tensor::new(idx, self.device()).unwrap();
        self.index_select(&idx, 3).unwrap()
    }
}
