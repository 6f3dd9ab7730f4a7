//! Loaders against the real data in ../shared/data, checked against values computed
//! independently (Python csv/openpyxl/nibabel) by fixtures/make_fixtures.py.

use std::path::PathBuf;

use tgc_data::*;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real_data.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn qata_counts_and_pairs() {
    let fx = fixture();
    let root = data().join("qata-cov19");
    for (split, want) in [(Split::Train, 5716usize), (Split::Val, 1429)] {
        let ds = LvitDataset::open(&root, split).unwrap();
        assert_eq!(ds.len(), want, "{split:?}");
        assert_eq!(
            fx["qata"][split.as_str()]["count"].as_u64().unwrap() as usize,
            want
        );
        // Every image has its mask (checked at open) and the same size (PNG headers).
        let dims = ds.validate().unwrap();
        assert!(dims.iter().all(|&d| d == (224, 224)));
        let first = &fx["qata"][split.as_str()]["first"];
        assert_eq!(ds.caption(0).unwrap(), first[1].as_str().unwrap());
        let (img, mask) = ds.paths(0).unwrap();
        assert_eq!(
            mask.file_name().unwrap().to_str().unwrap(),
            first[0].as_str().unwrap()
        );
        assert_eq!(
            img.file_name().unwrap().to_str().unwrap(),
            first[0].as_str().unwrap().strip_prefix("mask_").unwrap()
        );
    }
    // Decode a few samples fully: grey 224x224, binary non-empty masks, aux rewritten.
    let ds = LvitDataset::open(&root, Split::Val).unwrap();
    for i in [0, 700, 1428] {
        let s = ds.get(i).unwrap();
        assert_eq!(
            (s.image.channels, s.image.height, s.image.width),
            (1, 224, 224)
        );
        assert!(s.mask.data.iter().all(|&v| v <= 1));
        assert!(s.mask.count() > 0);
        assert!(s.aux_caption.unwrap().starts_with("Chest X-ray"));
    }
}

#[test]
fn xlsx_rows_match_openpyxl() {
    let fx = fixture();
    for split in ["Train", "Val", "Test"] {
        let p = data().join(format!("lvit-text-xlsx/MoNuSeg_{split}_text.xlsx"));
        let rows = read_captions(&p).unwrap();
        let want = &fx["xlsx"][split];
        assert_eq!(
            rows.len() as u64,
            want["count"].as_u64().unwrap(),
            "{split}"
        );
        for (i, r) in want["first"].as_array().unwrap().iter().enumerate() {
            assert_eq!(rows[i].0, r[0].as_str().unwrap());
            assert_eq!(rows[i].1, r[1].as_str().unwrap());
        }
        let last = rows.last().unwrap();
        assert_eq!(last.0, want["last"][0].as_str().unwrap());
        assert_eq!(last.1, want["last"][1].as_str().unwrap());
    }
}

#[test]
fn ct_example_matches_nibabel() {
    let fx = &fixture()["ct"];
    let ct = data().join("ct-example/example_ct_sm.nii.gz");
    let seg = data().join("ct-example/example_seg.nii.gz");
    let vol = Volume::read(&ct).unwrap();
    let shape: Vec<usize> = fx["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(vol.dims.to_vec(), shape);
    for d in 0..3 {
        assert!((vol.spacing[d] as f64 - fx["spacing"][d].as_f64().unwrap()).abs() < 1e-5);
    }
    let min = vol.data.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = vol.data.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mean = vol.data.iter().map(|&v| v as f64).sum::<f64>() / vol.data.len() as f64;
    assert_eq!(min as f64, fx["hu_min"].as_f64().unwrap());
    assert_eq!(max as f64, fx["hu_max"].as_f64().unwrap());
    assert!((mean - fx["hu_mean"].as_f64().unwrap()).abs() < 1e-3);

    let opts = NiftiOptions {
        organs: Some(vec!["spleen".into()]),
        ..Default::default()
    };
    let ds = NiftiVolumeDataset::from_pairs(
        "ct-example",
        vec![(ct.clone(), seg.clone())],
        vec![(1, "spleen".into()), (5, "liver".into())],
        opts,
    )
    .unwrap();
    assert_eq!(ds.len(), 30);
    let per_slice: Vec<u64> = fx["spleen_per_slice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mut total = 0;
    let (mut sc, mut sr) = (0.0f64, 0.0f64);
    for k in 0..ds.len() {
        let s = ds.get(k).unwrap();
        assert_eq!(s.caption, "spleen");
        assert_eq!((s.image.height, s.image.width), (101, 122));
        let n = s.mask.count() as u64;
        assert_eq!(Some(&n), per_slice.get(k), "slice {k}");
        total += n;
        for (i, &m) in s.mask.data.iter().enumerate() {
            if m == 1 {
                sc += (i % s.mask.width) as f64;
                sr += (i / s.mask.width) as f64;
            }
        }
        if k == 15 {
            // Windowed value at display (col 60, row 50): HU from nibabel's canonical array.
            let hu = fx["hu_at_display_60_50_15"].as_f64().unwrap() as f32;
            let want = HuWindow::default().apply(hu);
            assert!((s.image.data[50 * 122 + 60] - want).abs() < 1e-6);
        }
    }
    assert_eq!(total, fx["spleen_voxels"].as_u64().unwrap());
    // Spleen centroid: on the patient's left = the image right in display convention.
    let c = &fx["spleen_centroid_col_row"];
    assert!((sc / total as f64 - c[0].as_f64().unwrap()).abs() < 1e-6);
    assert!((sr / total as f64 - c[1].as_f64().unwrap()).abs() < 1e-6);
    assert!(c[0].as_f64().unwrap() > 61.0);

    // Reassembly: feed the ground-truth slices back as predictions; the written volume
    // must equal the source labels (for the spleen) voxel for voxel, with the source affine.
    let mut asm = VolumeAssembler::new(&ds, 0).unwrap();
    for k in 0..ds.len() {
        let s = ds.get(k).unwrap();
        let p: Vec<f32> = s.mask.data.iter().map(|&v| v as f32).collect();
        asm.add_slice(k, 0, &p, s.mask.height, s.mask.width)
            .unwrap();
    }
    let mut m = SegMetrics::new();
    let scores = asm.score(&ds, 0, &mut m).unwrap();
    assert_eq!(scores["spleen"], Some(1.0));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pred.nii.gz");
    asm.write(&out).unwrap();
    let back = Volume::read(&out).unwrap();
    let src = Volume::read(&seg).unwrap();
    assert_eq!(back.dims, src.dims);
    assert_eq!(header_affine(&back.header), header_affine(&src.header));
    for (a, b) in back.data.iter().zip(&src.data) {
        assert_eq!(*a == 1.0, *b == 1.0);
    }
}

#[test]
fn orientation_matches_nibabel_canonical() {
    let fx = fixture();
    for name in ["orient_sform", "orient_qform"] {
        let p =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.nii.gz"));
        let v = Volume::read(&p).unwrap();
        let want = &fx["orient"][name];
        let dd: Vec<usize> = want["display_dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(v.display_dims().to_vec(), dd, "{name}");
        let vals: Vec<f32> = (0..dd[2]).flat_map(|k| v.slice(k)).collect();
        let wv: Vec<f32> = want["display_values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(vals, wv, "{name}");
    }
}

#[test]
fn nifti_layouts_msd_and_abdomenct1k() {
    let fx = &fixture()["ct"];
    let ct = data().join("ct-example/example_ct_sm.nii.gz");
    let seg = data().join("ct-example/example_seg.nii.gz");
    let dir = tempfile::tempdir().unwrap();
    // MSD: dataset.json labels in MSD ({"1": "spleen"}) style.
    let msd = dir.path().join("Task09_Spleen");
    std::fs::create_dir_all(msd.join("imagesTr")).unwrap();
    std::fs::create_dir_all(msd.join("labelsTr")).unwrap();
    std::fs::copy(&ct, msd.join("imagesTr/spleen_1.nii.gz")).unwrap();
    std::fs::copy(&seg, msd.join("labelsTr/spleen_1.nii.gz")).unwrap();
    std::fs::write(msd.join("imagesTr/._spleen_1.nii.gz"), b"mac resource fork").unwrap();
    std::fs::write(
        msd.join("dataset.json"),
        r#"{"name": "Spleen", "labels": {"0": "background", "1": "spleen"}}"#,
    )
    .unwrap();
    let ds = NiftiVolumeDataset::open(
        &msd,
        NiftiLayout::Msd,
        NiftiOptions {
            only_slices_with_organ: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.organs(), &[(1, "spleen".to_string())]);
    let nonempty = fx["spleen_per_slice"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v.as_u64().unwrap() > 0)
        .count();
    assert_eq!(ds.len(), nonempty);
    assert!(ds.get(0).unwrap().mask.count() > 0);
    // nnU-Net v2 style labels ({"spleen": 1}) give the same table.
    std::fs::write(
        msd.join("dataset.json"),
        r#"{"labels": {"background": 0, "spleen": 1}}"#,
    )
    .unwrap();
    let ds2 = NiftiVolumeDataset::open(&msd, NiftiLayout::Msd, NiftiOptions::default()).unwrap();
    assert_eq!(ds2.organs(), ds.organs());
    assert_eq!(ds2.len(), 30);

    // AbdomenCT-1k: Image/Case_00001_0000.nii.gz + Mask/Case_00001.nii.gz, 4 organs.
    let ac = dir.path().join("AbdomenCT-1K");
    std::fs::create_dir_all(ac.join("Image")).unwrap();
    std::fs::create_dir_all(ac.join("Mask")).unwrap();
    std::fs::copy(&ct, ac.join("Image/Case_00001_0000.nii.gz")).unwrap();
    std::fs::copy(&seg, ac.join("Mask/Case_00001.nii.gz")).unwrap();
    let ds =
        NiftiVolumeDataset::open(&ac, NiftiLayout::AbdomenCt1k, NiftiOptions::default()).unwrap();
    assert_eq!(ds.organs().len(), 4);
    assert_eq!(ds.len(), 30 * 4);
    // Label 1 ("liver" in AbdomenCT-1k's table) holds the example's spleen voxels here.
    let total: usize = (0..ds.len())
        .filter(|&i| ds.locate(i).unwrap().2 == 0)
        .map(|i| ds.get(i).unwrap().mask.count())
        .sum();
    assert_eq!(total as u64, fx["spleen_voxels"].as_u64().unwrap());
    assert_eq!(ds.get(0).unwrap().caption, "liver");
}

/// QaTa-COV19's training folder is sorted by name with one source per prefix, so the
/// first N images come from one source while an evenly spaced subset keeps the mix. The
/// oracle is a directory listing of the image folder, independent of the loader.
#[test]
fn evenly_spaced_subset_keeps_the_source_mix() {
    let root = data().join("qata-cov19");
    let names: Vec<String> = std::fs::read_dir(root.join("Train_Folder/img"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let sub_share =
        names.iter().filter(|n| n.starts_with("sub-")).count() as f64 / names.len() as f64;
    assert!(sub_share > 0.3 && sub_share < 0.7, "{sub_share}");

    let ds = std::sync::Arc::new(LvitDataset::open(&root, Split::Train).unwrap());
    assert_eq!(ds.len(), names.len());
    let is_sub = |i: usize| {
        let (img, _) = ds.paths(i).unwrap();
        img.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("sub-")
    };
    let n = 1429;
    let first = (0..n).filter(|&i| is_sub(i)).count();
    assert_eq!(first, 0, "the first {n} names are all covid_*");

    let even = Subset::evenly_spaced(ds.clone(), n);
    assert_eq!(even.len(), n);
    let even_sub = even.indices().iter().filter(|&&i| is_sub(i)).count() as f64 / n as f64;
    assert!(
        (even_sub - sub_share).abs() < 2.0 / n as f64 + 1e-9,
        "evenly spaced share {even_sub} vs folder share {sub_share}"
    );
    // Evenly spaced indices are strictly increasing and span the folder.
    assert!(even.indices().windows(2).all(|w| w[0] < w[1]));
    assert_eq!(even.indices()[0], 0);
    assert!(*even.indices().last().unwrap() >= ds.len() - ds.len() / n - 1);
}
