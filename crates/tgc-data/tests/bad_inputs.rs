//! Table-driven bad inputs: each gives a clear error naming the file, never a panic.

use std::path::Path;

use tgc_data::*;

fn png(path: &Path, w: u32, h: u32, v: u8) {
    image::GrayImage::from_pixel(w, h, image::Luma([v]))
        .save(path)
        .unwrap();
}

/// A valid one-sample LViT Train folder; returns the root.
fn lvit(dir: &Path, csv: &str) -> std::path::PathBuf {
    let root = dir.join("lvit");
    let f = root.join("Train_Folder");
    std::fs::create_dir_all(f.join("img")).unwrap();
    std::fs::create_dir_all(f.join("labelcol")).unwrap();
    png(&f.join("img/a.png"), 8, 8, 100);
    png(&f.join("labelcol/mask_a.png"), 8, 8, 255);
    std::fs::write(f.join("Train_text.csv"), csv).unwrap();
    root
}

const GOOD: &str = "Image,Description\nmask_a.png,\"unilateral pulmonary infection, one infected area, lower left lung.\"\n";

type Case = (
    &'static str,
    Box<dyn Fn(&Path) -> Result<()>>,
    [&'static str; 2],
);

#[test]
fn bad_inputs_give_clear_errors() {
    let cases: Vec<Case> = vec![
        (
            "valid folder (control)",
            Box::new(|d| {
                let ds = LvitDataset::open(lvit(d, GOOD), Split::Train)?;
                ds.validate()?;
                let s = ds.get(0)?;
                assert_eq!(s.mask.count(), 64);
                Err(Error::Msg("control ok".into()))
            }),
            ["control ok", "control ok"],
        ),
        (
            "missing mask",
            Box::new(|d| {
                let r = lvit(d, GOOD);
                std::fs::remove_file(r.join("Train_Folder/labelcol/mask_a.png")).unwrap();
                LvitDataset::open(r, Split::Train).map(|_| ())
            }),
            ["labelcol/mask_a.png", "missing mask"],
        ),
        (
            "missing image",
            Box::new(|d| {
                let r = lvit(d, GOOD);
                std::fs::remove_file(r.join("Train_Folder/img/a.png")).unwrap();
                LvitDataset::open(r, Split::Train).map(|_| ())
            }),
            ["img/a.png", "missing image"],
        ),
        (
            "size mismatch (headers)",
            Box::new(|d| {
                let r = lvit(d, GOOD);
                png(&r.join("Train_Folder/labelcol/mask_a.png"), 8, 9, 255);
                LvitDataset::open(r, Split::Train)?.validate().map(|_| ())
            }),
            ["mask_a.png", "size mismatch"],
        ),
        (
            "size mismatch (decode)",
            Box::new(|d| {
                let r = lvit(d, GOOD);
                png(&r.join("Train_Folder/labelcol/mask_a.png"), 7, 8, 255);
                LvitDataset::open(r, Split::Train)?.get(0).map(|_| ())
            }),
            ["mask_a.png", "size mismatch"],
        ),
        (
            "truncated PNG",
            Box::new(|d| {
                let r = lvit(d, GOOD);
                let p = r.join("Train_Folder/img/a.png");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
                LvitDataset::open(r, Split::Train)?.get(0).map(|_| ())
            }),
            ["img/a.png", "unreadable image"],
        ),
        (
            "empty caption",
            Box::new(|d| {
                LvitDataset::open(
                    lvit(d, "Image,Description\nmask_a.png,\"  \"\n"),
                    Split::Train,
                )
                .map(|_| ())
            }),
            ["Train_text.csv", "empty caption"],
        ),
        (
            "unknown column",
            Box::new(|d| {
                LvitDataset::open(lvit(d, "Image,Text\nmask_a.png,hello\n"), Split::Train)
                    .map(|_| ())
            }),
            ["Train_text.csv", "missing column \"Description\""],
        ),
        (
            "missing text file",
            Box::new(|d| {
                let r = lvit(d, GOOD);
                std::fs::remove_file(r.join("Train_Folder/Train_text.csv")).unwrap();
                LvitDataset::open(r, Split::Train).map(|_| ())
            }),
            ["Train_Folder", "no Train_text.csv"],
        ),
        (
            "truncated .nii.gz",
            Box::new(|d| {
                let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../../shared/data/ct-example/example_seg.nii.gz");
                let b = std::fs::read(src).unwrap();
                let p = d.join("broken.nii.gz");
                std::fs::write(&p, &b[..b.len() / 3]).unwrap();
                Volume::read(&p).map(|_| ())
            }),
            ["broken.nii.gz", "unreadable NIfTI"],
        ),
        (
            "missing NIfTI label (AbdomenCT-1k layout)",
            Box::new(|d| {
                let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/orient_sform.nii.gz");
                std::fs::create_dir_all(d.join("Image")).unwrap();
                std::fs::create_dir_all(d.join("Mask")).unwrap();
                std::fs::copy(src, d.join("Image/Case_00007_0000.nii.gz")).unwrap();
                NiftiVolumeDataset::open(d, NiftiLayout::AbdomenCt1k, NiftiOptions::default())
                    .map(|_| ())
            }),
            ["Mask/Case_00007.nii.gz", "missing mask"],
        ),
        (
            "corrupt cache shard",
            Box::new(|d| {
                let dir = d.join("cache");
                let mut c = FeatureCache::open(&dir, "m")?;
                let k = c.key_for_text("x");
                c.insert_many(vec![(
                    k,
                    vec![(
                        "f".into(),
                        candle_core::Tensor::ones(
                            64,
                            candle_core::DType::F32,
                            &candle_core::Device::Cpu,
                        )?,
                    )],
                )])?;
                let shard = c.shard_paths()[0].clone();
                drop(c);
                let b = std::fs::read(&shard).unwrap();
                std::fs::write(&shard, &b[..b.len() - 10]).unwrap();
                FeatureCache::open(&dir, "m").map(|_| ())
            }),
            ["shard-", "invalid feature-cache shard"],
        ),
        (
            "foreign safetensors in cache",
            Box::new(|d| {
                let dir = d.join("cache2");
                std::fs::create_dir_all(&dir).unwrap();
                let t = candle_core::Tensor::zeros(
                    4,
                    candle_core::DType::F16,
                    &candle_core::Device::Cpu,
                )?;
                t.save_safetensors("w", dir.join("weights.safetensors"))?;
                FeatureCache::open(&dir, "m").map(|_| ())
            }),
            ["weights.safetensors", "no metadata"],
        ),
    ];
    for (name, f, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(dir.path())));
        let err = match res {
            Err(_) => panic!("{name}: panicked"),
            Ok(Ok(())) => panic!("{name}: no error"),
            Ok(Err(e)) => e.to_string(),
        };
        for w in want {
            assert!(
                err.contains(w),
                "{name}: error {err:?} does not contain {w:?}"
            );
        }
    }
}

#[test]
fn loader_reports_a_bad_sample_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let r = lvit(dir.path(), GOOD);
    let p = r.join("Train_Folder/labelcol/mask_a.png");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let ds = LvitDataset::open(r, Split::Train).unwrap();
    let pre = Preprocess {
        clip_size: 8,
        cnn_size: 8,
        label_size: 8,
    };
    let loader = DataLoader::new(
        std::sync::Arc::new(ds),
        pre,
        2,
        None,
        Augment::off(),
        candle_core::Device::Cpu,
    );
    let mut it = loader.iter();
    let err = it.next().unwrap().unwrap_err().to_string();
    assert!(
        err.contains("mask_a.png") && err.contains("unreadable image"),
        "{err}"
    );
    assert!(it.next().is_none());
}
