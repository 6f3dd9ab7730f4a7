//! Frozen-feature cache: round trip (f16 tolerance), atomicity, validation.

use candle_core::{DType, Device, Tensor};
use tgc_data::*;

fn feats(seed: u64) -> Vec<(String, Tensor)> {
    let mut r = SplitMix64::new(seed);
    let a: Vec<f32> = (0..2 * 3 * 5).map(|_| r.range(-8.0, 8.0) as f32).collect();
    let b: Vec<f32> = (0..7).map(|_| r.normal() as f32).collect();
    vec![
        (
            "patch".into(),
            Tensor::from_vec(a, (2, 3, 5), &Device::Cpu).unwrap(),
        ),
        ("cls".into(), Tensor::from_vec(b, 7, &Device::Cpu).unwrap()),
    ]
}

fn assert_close(a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims());
    assert_eq!(a.dtype(), DType::F32);
    let x = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let y = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (p, q) in x.iter().zip(&y) {
        // f16 has an 11-bit significand: relative error <= 2^-11.
        assert!((p - q).abs() <= q.abs() * 4.9e-4 + 1e-7, "{p} vs {q}");
    }
}

#[test]
fn round_trip_reopen_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = FeatureCache::open(dir.path(), "clip-test").unwrap();
    let img = ImageF32::grey(2, 2, vec![0.0, 0.5, 1.0, 0.25]).unwrap();
    let k0 = c.key_for_image(&img.content_hash(), "pre", 0);
    let k1 = c.key_for_image(&img.content_hash(), "pre", 1);
    let kt = c.key_for_text("spleen");
    assert_ne!(k0, k1);
    assert_ne!(k0, c.key_for_image(&img.content_hash(), "pre2", 0));
    assert_ne!(kt, c.key_for_tokens(&[1, 2]));
    assert_eq!(
        c.insert_many(vec![(k0, feats(0)), (k1, feats(1))]).unwrap(),
        2
    );
    assert_eq!(
        c.insert_many(vec![(kt, feats(2)), (k0, feats(9))]).unwrap(),
        1
    );
    assert_eq!(c.shard_paths().len(), 2);
    drop(c);
    let c = FeatureCache::open(dir.path(), "clip-test").unwrap();
    assert_eq!(c.len(), 3);
    for (k, s) in [(k0, 0), (k1, 1), (kt, 2)] {
        let got = c.get(&k).unwrap().unwrap();
        for (name, t) in feats(s) {
            assert_close(&got[&name], &t);
        }
    }
    assert!(c.get(&c.key_for_text("liver")).unwrap().is_none());
    // A different model id gives different keys.
    let other = tempfile::tempdir().unwrap();
    let c2 = FeatureCache::open(other.path(), "other").unwrap();
    assert_ne!(c2.key_for_text("spleen"), kt);
}

#[test]
fn leftover_temp_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = FeatureCache::open(dir.path(), "m").unwrap();
    let k = c.key_for_text("a");
    c.insert_many(vec![(k, feats(3))]).unwrap();
    let shard = c.shard_paths()[0].clone();
    drop(c);
    // A crash mid-write leaves a partial temp file: it must not be read.
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(
        dir.path().join(".tmp-shard-crashed.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let c = FeatureCache::open(dir.path(), "m").unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c.shard_paths(), &[shard]);
    assert!(c.get(&k).unwrap().is_some());
}

#[test]
fn foreign_model_id_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = FeatureCache::open(dir.path(), "model-a").unwrap();
    c.insert_many(vec![(c.key_for_text("a"), feats(4))])
        .unwrap();
    let shard = c.shard_paths()[0].clone();
    drop(c);
    let err = FeatureCache::open(dir.path(), "model-b")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    assert!(err.contains("model id is Some(\"model-a\")"), "{err}");
}

#[test]
fn build_from_loader() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = FeatureCache::open(dir.path(), "m").unwrap();
    let ds = SyntheticPhantoms::new(PhantomKind::ChestXray, 10, 3, 32);
    let pre = Preprocess {
        clip_size: 16,
        cnn_size: 16,
        label_size: 16,
    };
    let loader = DataLoader::new(
        std::sync::Arc::new(ds),
        pre,
        4,
        None,
        Augment::off(),
        Device::Cpu,
    );
    let pid = pre.id();
    let keyer = FeatureCache::open(tempfile::tempdir().unwrap().path(), "m").unwrap();
    let n = c
        .build(
            &loader,
            |b| {
                // "Encoder": the channel mean of each CLIP image, 16 x 16.
                let m = b.clip_images.mean(1)?;
                Ok((0..b.len())
                    .map(|i| {
                        let k = keyer.key_for_image(&b.image_hashes[i], &pid, b.variants[i]);
                        (k, vec![("mean".to_string(), m.get(i).unwrap())])
                    })
                    .collect())
            },
            false,
        )
        .unwrap();
    assert_eq!(n, 10);
    let b = loader.iter().next().unwrap().unwrap();
    let k = c.key_for_image(&b.image_hashes[2], &pid, 0);
    let got = c.get(&k).unwrap().unwrap();
    assert_close(
        &got["mean"],
        &b.clip_images.mean(1).unwrap().get(2).unwrap(),
    );
}
