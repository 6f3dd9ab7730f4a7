//! End-to-end tests of the `tgc` binary: train -> eval -> predict on synthetic phantoms
//! with the tiny preset, and one-line errors on bad input.

use std::path::Path;

use assert_cmd::Command;
use tgc_data::{PhantomKind, SegDataset, SyntheticPhantoms};

fn tgc() -> Command {
    Command::cargo_bin("tgc").expect("the tgc binary is built")
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Writes phantom `i` of the validation set (seed 2) as an 8-bit grey PNG; returns its
/// caption and size.
fn write_phantom(path: &Path, size: usize) -> (String, usize) {
    let ds = SyntheticPhantoms::new(PhantomKind::CtSlice, 1, 2, size);
    let s = ds.get(0).expect("phantom");
    assert_eq!(s.image.channels, 1);
    let px: Vec<u8> = s
        .image
        .data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    image::GrayImage::from_raw(s.image.width as u32, s.image.height as u32, px)
        .expect("buffer")
        .save(path)
        .expect("png");
    (s.caption, s.image.width)
}

/// The checkpoint a `tgc train` run left in `out`: best.safetensors, or
/// final.safetensors when max_steps ended it inside the first epoch.
fn checkpoint_in(out: &Path) -> std::path::PathBuf {
    ["best.safetensors", "final.safetensors"]
        .iter()
        .map(|f| out.join(f))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no checkpoint in {}", out.display()))
}

/// The value of `tgc eval`'s "Dice" line, checked to be a fraction.
fn dice_line(stdout: &str) -> f64 {
    let dice: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Dice "))
        .expect("Dice line")
        .trim()
        .parse()
        .expect("Dice is a number");
    assert!((0.0..=1.0).contains(&dice), "{dice}");
    dice
}

#[test]
fn train_eval_predict_on_phantoms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let cfg = dir.path().join("run.toml");
    let val_count = 8;
    std::fs::write(
        &cfg,
        format!(
            "preset = \"tiny\"\nphantoms = \"ct\"\ntrain_count = 80\nval_count = {val_count}\n\
             [train]\nepochs = 1\nmax_steps = 10\nprogress = false\noverlays = 1\n"
        ),
    )
    .expect("write run.toml");

    let s = stdout_of(
        tgc()
            .args(["train", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out),
    );
    assert!(s.contains("best val Dice:"), "{s}");
    for f in [
        "best.safetensors",
        "last.safetensors",
        "metrics.jsonl",
        "run.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let ck = out.join("best.safetensors");

    // eval: the Dice line parses, the CSV has one row per validation image.
    let csv = dir.path().join("scores.csv");
    let s = stdout_of(
        tgc()
            .args(["eval", "--checkpoint"])
            .arg(&ck)
            .args([
                "--phantoms",
                "ct",
                "--count",
                &val_count.to_string(),
                "--by-size",
                "--csv",
            ])
            .arg(&csv),
    );
    let dice = dice_line(&s);
    let n: usize = s
        .lines()
        .find_map(|l| l.strip_prefix("n "))
        .expect("n line")
        .trim()
        .parse()
        .expect("n is a number");
    assert_eq!(n, val_count);
    let text = std::fs::read_to_string(&csv).expect("csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("id,dice,iou,lesion_share"));
    let rows: Vec<Vec<f64>> = lines
        .map(|r| r.split(',').skip(1).map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), val_count);
    // The per-image Dice scores average to the printed Dice (to its 4 decimals).
    let mean: f64 = rows.iter().map(|r| r[0]).sum::<f64>() / val_count as f64;
    assert!((mean - dice).abs() < 1e-4, "{mean} vs {dice}");

    // --by-size: each printed group holds the CSV rows whose lesion share falls in it,
    // with their mean Dice, and the groups' losses add up to 1 - Dice.
    let groups: Vec<(String, Vec<f64>)> = s
        .lines()
        .skip_while(|l| !l.starts_with("lesion "))
        .skip(1)
        .take_while(|l| !l.starts_with("per-image"))
        .map(|l| {
            let (label, rest) = l.split_at(12);
            let v = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            (label.trim().to_string(), v)
        })
        .collect();
    assert!(!groups.is_empty(), "{s}");
    let bounds = |label: &str| -> (f64, f64) {
        match label {
            "empty" => (0.0, 0.0),
            "under 2%" => (1e-12, 0.02),
            "2-5%" => (0.02, 0.05),
            "5-10%" => (0.05, 0.10),
            "10-20%" => (0.10, 0.20),
            "over 20%" => (0.20, 1.01),
            _ => panic!("unknown group {label}: {s}"),
        }
    };
    let mut lost = 0.0;
    for (label, v) in &groups {
        let (lo, hi) = bounds(label);
        let inside: Vec<f64> = rows
            .iter()
            .filter(|r| {
                if label == "empty" {
                    r[2] == 0.0
                } else {
                    r[2] >= lo && r[2] < hi
                }
            })
            .map(|r| r[0])
            .collect();
        assert_eq!(inside.len() as f64, v[0], "{label}: {s}");
        let mean = inside.iter().sum::<f64>() / inside.len() as f64;
        assert!((mean - v[1]).abs() < 1e-4, "{label}: {mean} vs {}", v[1]);
        lost += v[3];
    }
    assert!((lost - (1.0 - dice)).abs() < 5e-4, "{lost} vs {dice}");

    // Thresholds: 0.5 is the default; a sweep scores every threshold on one pass, and at
    // threshold 1 no probability is foreground, so the pooled Dice is 0 (every phantom
    // has a lesion).
    let s = stdout_of(
        tgc()
            .args(["eval", "--phantoms", "ct", "--count"])
            .arg(val_count.to_string())
            .args(["--threshold", "0.5", "--checkpoint"])
            .arg(&ck),
    );
    assert_eq!(dice_line(&s), dice);
    let s = stdout_of(
        tgc()
            .args(["eval", "--phantoms", "ct", "--count"])
            .arg(val_count.to_string())
            .args(["--threshold", "1,0.5", "--checkpoint"])
            .arg(&ck),
    );
    let row = |t: &str| -> Vec<f64> {
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{t} ")))
            .unwrap_or_else(|| panic!("no row for threshold {t}: {s}"))
            .split_whitespace()
            .map(|v| v.parse().expect("a number"))
            .collect()
    };
    assert_eq!(row("0.5")[0], dice, "{s}");
    assert_eq!(row("1")[2], 0.0, "{s}");
    let err = one_line_error(
        tgc()
            .args([
                "eval",
                "--phantoms",
                "ct",
                "--threshold",
                "1.5",
                "--checkpoint",
            ])
            .arg(&ck),
    );
    assert!(err.contains("--threshold 1.5"), "{err}");

    // Flip test-time augmentation is accepted and gives a valid Dice (the averaging itself
    // is checked against an oracle in tgc-train's tests); an unknown one is refused.
    let eval_tta = |tta: &str| {
        tgc()
            .args(["eval", "--phantoms", "ct", "--count"])
            .arg(val_count.to_string())
            .args(["--tta", tta, "--checkpoint"])
            .arg(&ck)
            .output()
            .expect("runs")
    };
    let out = eval_tta("flip");
    assert!(out.status.success(), "{out:?}");
    dice_line(&String::from_utf8_lossy(&out.stdout));
    let out = eval_tta("mirror");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mirror") && err.contains("flip"), "{err}");

    // Ensembles: one checkpoint twice is that checkpoint (the averaging of different
    // members is checked against their own maps in tgc-train's and tgc-cli's unit tests).
    let s = stdout_of(
        tgc()
            .args(["eval", "--phantoms", "ct", "--count"])
            .arg(val_count.to_string())
            .arg("--checkpoint")
            .arg(&ck)
            .arg(&ck),
    );
    assert!(s.contains("ensemble  2 checkpoints"), "{s}");
    assert_eq!(dice_line(&s), dice);
    // `tgc info` reads a checkpoint's model: the tiny preset it was trained with.
    let counts = |s: String| -> Vec<String> {
        s.lines()
            .skip_while(|l| !l.starts_with("inputs"))
            .map(String::from)
            .collect()
    };
    let from_ck = counts(stdout_of(tgc().args(["info", "--checkpoint"]).arg(&ck)));
    assert_eq!(
        from_ck,
        counts(stdout_of(tgc().args(["info", "--preset", "tiny"])))
    );
    assert!(
        from_ck.iter().any(|l| l.starts_with("total")),
        "{from_ck:?}"
    );
    // A run folder stands for its best checkpoint; one without any is named in the error.
    let s = stdout_of(
        tgc()
            .args(["eval", "--phantoms", "ct", "--count"])
            .arg(val_count.to_string())
            .arg("--checkpoint")
            .arg(ck.parent().expect("the run folder")),
    );
    assert_eq!(dice_line(&s), dice);
    let err = one_line_error(
        tgc()
            .args(["eval", "--phantoms", "ct", "--checkpoint"])
            .arg(dir.path()),
    );
    assert!(err.contains("holds no best.safetensors"), "{err}");
    // A member of another geometry (labels at 32 px): one line naming both files.
    let small_cfg = dir.path().join("small.toml");
    std::fs::write(
        &small_cfg,
        "preset = \"tiny\"\nphantoms = \"ct\"\ntrain_count = 8\nval_count = 4\n\
         [model]\nlabel_size = 32\n[train]\nepochs = 1\nmax_steps = 1\nprogress = false\n\
         overlays = 0\n",
    )
    .expect("write small.toml");
    let small = dir.path().join("small");
    stdout_of(
        tgc()
            .args(["train", "--config"])
            .arg(&small_cfg)
            .arg("--out")
            .arg(&small),
    );
    let small_ck = checkpoint_in(&small);
    let err = one_line_error(
        tgc()
            .args(["eval", "--phantoms", "ct", "--checkpoint"])
            .arg(&ck)
            .arg(&small_ck),
    );
    assert!(
        err.contains("small") && err.contains("best.safetensors") && err.contains("sizes"),
        "{err}"
    );

    // --sample N scores images k * len / N of the split, not its first N: on QaTa's
    // training folder (covid_* names before sub-* ones) that reaches both sources.
    let qata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/qata-cov19");
    let train = tgc_data::LvitDataset::open(&qata, tgc_data::Split::Train).expect("QaTa");
    let sampled_csv = dir.path().join("sampled.csv");
    let s = stdout_of(
        tgc()
            .args(["eval", "--split", "train", "--sample", "4", "--csv"])
            .arg(&sampled_csv)
            .arg("--data")
            .arg(&qata)
            .arg("--checkpoint")
            .arg(&ck),
    );
    assert!(s.contains("4 evenly spaced of 5716"), "{s}");
    let ids: Vec<String> = std::fs::read_to_string(&sampled_csv)
        .expect("csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect();
    let want: Vec<String> = [0, 1429, 2858, 4287]
        .iter()
        .map(|&i| train.get(i).expect("sample").id)
        .collect();
    assert_eq!(ids, want);
    assert!(
        ids[0].starts_with("covid") && ids[3].starts_with("sub-"),
        "{ids:?}"
    );
    let out = tgc()
        .args(["eval", "--sample", "4", "--count", "4", "--data"])
        .arg(&qata)
        .arg("--checkpoint")
        .arg(&ck)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--sample") && err.contains("--count"), "{err}");

    // predict: a 96 px phantom -> mask at the input size, or at the label size (64).
    let img = dir.path().join("x.png");
    let (caption, size) = write_phantom(&img, 96);
    let mask = dir.path().join("m.png");
    let overlay = dir.path().join("o.png");
    stdout_of(
        tgc()
            .args(["predict", "--checkpoint"])
            .arg(&ck)
            .arg("--image")
            .arg(&img)
            .args(["--text", &caption, "--out"])
            .arg(&mask)
            .arg("--overlay")
            .arg(&overlay),
    );
    let m = image::open(&mask).expect("mask decodes").to_luma8();
    assert_eq!(m.dimensions(), (size as u32, size as u32));
    assert!(m.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    assert!(image::open(&overlay).is_ok());
    stdout_of(
        tgc()
            .args(["predict", "--label-size-output", "--checkpoint"])
            .arg(&ck)
            .arg("--image")
            .arg(&img)
            .args(["--text", &caption, "--out"])
            .arg(&mask),
    );
    let m = image::open(&mask).expect("mask decodes");
    assert_eq!((m.width(), m.height()), (64, 64));

    // predict --list: each row's mask is the one an --image call writes for it (the model
    // loads once); the same image twice needs an out name for one of the rows.
    let other = "a lesion in the spleen";
    let single = |text: &str, out: &Path| {
        stdout_of(
            tgc()
                .args(["predict", "--checkpoint"])
                .arg(&ck)
                .arg("--image")
                .arg(&img)
                .args(["--text", text, "--out"])
                .arg(out),
        );
        image::open(out).expect("mask decodes").to_luma8()
    };
    let write_list = |name: &str, rows: &[[&str; 3]]| {
        let path = dir.path().join(name);
        let mut w = csv::Writer::from_path(&path).expect("list");
        w.write_record(["image", "text", "out"]).expect("header");
        for r in rows {
            w.write_record(r).expect("row");
        }
        w.flush().expect("flush");
        path
    };
    let list = write_list(
        "list.csv",
        &[
            ["x.png", &caption, ""],
            ["x.png", other, "more/x-other.png"],
        ],
    );
    let masks = dir.path().join("masks");
    let s = stdout_of(
        tgc()
            .args(["predict", "--checkpoint"])
            .arg(&ck)
            .arg("--list")
            .arg(&list)
            .arg("--out")
            .arg(&masks)
            .arg("--overlay")
            .arg(dir.path().join("overlays")),
    );
    assert!(s.starts_with("2 masks"), "{s}");
    for (file, text) in [("x.png", caption.as_str()), ("more/x-other.png", other)] {
        let got = image::open(masks.join(file)).expect("mask").to_luma8();
        assert_eq!(got, single(text, &dir.path().join("single.png")), "{file}");
        assert!(dir.path().join("overlays").join(file).is_file(), "{file}");
    }
    let list_error = |rows: &[[&str; 3]]| {
        let list = write_list("bad.csv", rows);
        one_line_error(
            tgc()
                .args(["predict", "--checkpoint"])
                .arg(&ck)
                .arg("--list")
                .arg(&list)
                .arg("--out")
                .arg(&masks),
        )
    };
    let err = list_error(&[["x.png", &caption, ""], ["x.png", other, ""]]);
    assert!(
        err.contains("bad.csv lines 2 and 3 both write x.png"),
        "{err}"
    );
    let err = list_error(&[["x.png", &caption, ""], ["y.png", other, ""]]);
    assert!(
        err.contains("bad.csv line 3") && err.contains("y.png not found"),
        "{err}"
    );
    let err = list_error(&[["x.png", " ", ""]]);
    assert!(err.contains("bad.csv line 2: the text is empty"), "{err}");

    // A CT volume with two organ prompts: a label map on the input's voxel grid.
    let ct = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/ct-example/example_ct_sm.nii.gz");
    if ct.is_file() {
        let seg = dir.path().join("seg.nii.gz");
        let s = stdout_of(
            tgc()
                .args(["predict", "--checkpoint"])
                .arg(&ck)
                .arg("--volume")
                .arg(&ct)
                .args(["--organs", "spleen,liver", "--out"])
                .arg(&seg),
        );
        assert!(s.contains("label 2 liver"), "{s}");
        let input = tgc_data::Volume::read(&ct).expect("input volume");
        let out = tgc_data::Volume::read(&seg).expect("label map decodes");
        assert_eq!(out.dims, input.dims);
        assert_eq!(out.orientation, input.orientation);
        assert!(out.data.iter().all(|&v| v == 0.0 || v == 1.0 || v == 2.0));

        // eval --volumes on the same volume as an MSD folder: its 3D Dice and voxel
        // counts equal those of predict's label map against the label file, computed here.
        let msd = dir.path().join("msd");
        for sub in ["imagesTr", "labelsTr"] {
            std::fs::create_dir_all(msd.join(sub)).expect("mkdir");
        }
        std::fs::copy(&ct, msd.join("imagesTr/ct.nii.gz")).expect("copy ct");
        let labels = ct.with_file_name("example_seg.nii.gz");
        std::fs::copy(&labels, msd.join("labelsTr/ct.nii.gz")).expect("copy labels");
        std::fs::write(
            msd.join("dataset.json"),
            r#"{"labels": {"0": "background", "1": "spleen", "5": "liver"}}"#,
        )
        .expect("dataset.json");
        let csv = dir.path().join("volumes.csv");
        let s = stdout_of(
            tgc()
                .args(["eval", "--checkpoint"])
                .arg(&ck)
                .arg("--volumes")
                .arg(&msd)
                .arg("--csv")
                .arg(&csv),
        );
        let truth = tgc_data::Volume::read(&labels).expect("labels");
        let text = std::fs::read_to_string(&csv).expect("csv");
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("volume,organ,dice,predicted_voxels,true_voxels")
        );
        let mut organs = 0;
        for (row, (pred_id, true_id)) in lines.zip([(1.0, 1.0), (2.0, 5.0)]) {
            let f: Vec<&str> = row.split(',').collect();
            assert_eq!(f[0], "ct.nii.gz", "{row}");
            assert_eq!(f[1], ["spleen", "liver"][organs], "{row}");
            let p: Vec<bool> = out.data.iter().map(|&v| v == pred_id).collect();
            let g: Vec<bool> = truth.data.iter().map(|&v| v == true_id).collect();
            let np = p.iter().filter(|&&x| x).count();
            let ng = g.iter().filter(|&&x| x).count();
            let both = p.iter().zip(&g).filter(|(a, b)| **a && **b).count();
            assert_eq!(f[3], np.to_string(), "{row}");
            assert_eq!(f[4], ng.to_string(), "{row}");
            let dice = 2.0 * both as f64 / (np + ng) as f64;
            assert_eq!(f[2], format!("{dice:.4}"), "{row}");
            organs += 1;
        }
        assert_eq!(organs, 2);
        assert!(s.contains("mean 3D Dice: "), "{s}");
        let volumes_error = |extra: &[&str]| {
            one_line_error(
                tgc()
                    .args(["eval", "--checkpoint"])
                    .arg(&ck)
                    .arg("--volumes")
                    .arg(&msd)
                    .args(extra),
            )
        };
        let err = volumes_error(&["--organs", "kidney"]);
        assert!(err.contains("kidney"), "{err}");
        let err = one_line_error(tgc().args(["eval", "--checkpoint"]).arg(&ck).args([
            "--phantoms",
            "ct",
            "--organs",
            "liver",
        ]));
        assert!(err.contains("--volumes"), "{err}");
        let err = volumes_error(&["--threshold", "0.3"]);
        assert!(err.contains("--threshold"), "{err}");
    }

    // A file that is not a checkpoint: one error line naming it.
    let err = one_line_error(
        tgc()
            .args(["eval", "--phantoms", "ct", "--checkpoint"])
            .arg(&img),
    );
    assert!(err.contains("x.png"), "{err}");
}

/// Runs a command that must fail; checks it exits with 1 and prints one `error: ` line,
/// which it returns.
fn one_line_error(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn predict_missing_image_is_one_line_error() {
    let predict = |text: &str| {
        one_line_error(tgc().args([
            "predict",
            "--checkpoint",
            "no-such.safetensors",
            "--image",
            "no-such-image.png",
            "--text",
            text,
            "--out",
            "m.png",
        ]))
    };
    let err = predict("left lung");
    assert!(err.contains("no-such-image.png"), "{err}");
    // A blank prompt is refused before anything is loaded, naming the flag.
    let err = predict("  ");
    assert!(err.contains("--text is empty"), "{err}");
}

#[test]
fn device_flag_is_checked_before_anything_loads() {
    let eval = |device: &str| {
        one_line_error(
            tgc()
                .args(["eval", "--phantoms", "ct", "--device", device])
                .args(["--checkpoint", "no-such.safetensors"]),
        )
    };
    let err = eval("tpu");
    assert!(err.contains("unknown device \"tpu\""), "{err}");
    if !candle_core::utils::cuda_is_available() {
        let err = eval("cuda:0");
        assert!(err.contains("--features cuda"), "{err}");
    }
    // cpu gets as far as the checkpoint.
    let err = eval("cpu");
    assert!(err.contains("no-such.safetensors"), "{err}");
}

#[test]
fn unknown_run_file_field_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "preset = \"tiny\"\n[train]\nepoch = 1\n").expect("write");
    let err = one_line_error(
        tgc()
            .args(["train", "--phantoms", "ct", "--config"])
            .arg(&cfg),
    );
    assert!(err.contains("`epoch`"), "{err}");
}

/// `train_sample` / `val_sample` in run.toml train and validate on images spread over
/// QaTa's splits (the names say which), `train_count` takes the first N of real data
/// too, and the misuses are one-line errors naming the fields.
#[test]
fn run_file_samples_real_splits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/qata-cov19");
    let run = |extra: &str| {
        let cfg = dir.path().join("run.toml");
        std::fs::write(
            &cfg,
            format!(
                "preset = \"tiny\"\n{extra}\n[train]\nepochs = 1\nmax_steps = 1\nprogress = false\n\
                 overlays = 0\n"
            ),
        )
        .expect("write run.toml");
        let mut cmd = tgc();
        cmd.args(["train", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(dir.path().join("out"))
            .arg("--data")
            .arg(&qata);
        cmd
    };
    let s = stdout_of(&mut run("train_sample = 6\nval_sample = 4"));
    assert!(s.contains("6 train / 4 val images"), "{s}");
    assert!(s.contains("[6 evenly spaced of 5716]"), "{s}");
    assert!(s.contains("[4 evenly spaced of 1429]"), "{s}");
    let s = stdout_of(&mut run("train_count = 5\nval_count = 3"));
    assert!(s.contains("5 train / 3 val images"), "{s}");

    let err = one_line_error(&mut run("train_sample = 6\ntrain_count = 6"));
    assert!(err.contains("train_count and train_sample"), "{err}");
    let err = one_line_error(&mut run("val_sample = 0"));
    assert!(err.contains("val_sample = 0"), "{err}");
    let cfg = dir.path().join("phantoms.toml");
    std::fs::write(
        &cfg,
        "preset = \"tiny\"\nphantoms = \"ct\"\nval_sample = 4\n",
    )
    .expect("write");
    let err = one_line_error(tgc().args(["train", "--config"]).arg(&cfg));
    assert!(err.contains("apply to real data"), "{err}");
}

#[test]
fn info_total_is_the_sum_of_modules() {
    let s = stdout_of(tgc().args(["info", "--preset", "tiny"]));
    let num = |name: &str| -> usize {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} line in {s}"))
            .trim()
            .parse()
            .expect("number")
    };
    let parts: usize = ["sse ", "date ", "vlcm ", "decoder "]
        .iter()
        .map(|m| num(m))
        .sum();
    assert_eq!(parts, num("total "));
    assert!(num("frozen ") > 0);
}

/// `tgc train --volumes`: CT volumes split by volume (the last one validates), only the
/// slices that hold a prompted organ, run.json records the split, and `tgc eval
/// --last-volumes` scores exactly the validation volume.
#[test]
fn train_and_eval_on_ct_volumes() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/ct-example");
    let (ct, labels) = (
        shared.join("example_ct_sm.nii.gz"),
        shared.join("example_seg.nii.gz"),
    );
    if !ct.is_file() {
        eprintln!("skipping: {} is missing", ct.display());
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let msd = dir.path().join("msd");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(msd.join(sub)).expect("mkdir");
    }
    for name in ["ct_a.nii.gz", "ct_b.nii.gz"] {
        std::fs::copy(&ct, msd.join("imagesTr").join(name)).expect("copy ct");
        std::fs::copy(&labels, msd.join("labelsTr").join(name)).expect("copy labels");
    }
    std::fs::write(
        msd.join("dataset.json"),
        r#"{"labels": {"0": "background", "1": "spleen", "5": "liver"}}"#,
    )
    .expect("dataset.json");
    // The slices of one volume that hold each organ, counted by the library on its own.
    let one = tgc_data::NiftiVolumeDataset::from_pairs(
        "one",
        vec![(ct.clone(), labels.clone())],
        vec![(1, "spleen".into()), (5, "liver".into())],
        tgc_data::NiftiOptions {
            only_slices_with_organ: true,
            ..Default::default()
        },
    )
    .expect("one volume");
    let per_volume = one.len();
    assert!(per_volume > 0);

    let cfg = dir.path().join("ct.toml");
    std::fs::write(
        &cfg,
        "preset = \"tiny\"\n[volumes]\norgans = [\"spleen\", \"liver\"]\n\
         [train]\nepochs = 1\nmax_steps = 4\nprogress = false\noverlays = 0\n",
    )
    .expect("write ct.toml");
    let out = dir.path().join("run");
    let s = stdout_of(
        tgc()
            .args(["train", "--config"])
            .arg(&cfg)
            .arg("--volumes")
            .arg(&msd)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        s.contains(&format!("{per_volume} train / {per_volume} val images")),
        "{s}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).expect("run.json"))
            .expect("json");
    assert_eq!(record["volumes"]["val_volumes"], 1, "{record}");
    assert_eq!(record["train"]["lr"], 2e-4, "{record}");
    let ck = checkpoint_in(&out);

    let s = stdout_of(
        tgc()
            .args(["eval", "--checkpoint"])
            .arg(&ck)
            .arg("--volumes")
            .arg(&msd)
            .args(["--last-volumes", "1"]),
    );
    assert!(s.contains("(1 volumes, 2 organs)"), "{s}");
    assert!(s.contains("ct_b.nii.gz spleen"), "{s}");
    assert!(!s.contains("ct_a.nii.gz"), "{s}");

    // One volume cannot be split: one line naming the folder.
    let single = dir.path().join("single");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(single.join(sub)).expect("mkdir");
    }
    std::fs::copy(&ct, single.join("imagesTr/ct.nii.gz")).expect("copy");
    std::fs::copy(&labels, single.join("labelsTr/ct.nii.gz")).expect("copy");
    std::fs::copy(msd.join("dataset.json"), single.join("dataset.json")).expect("copy");
    let err = one_line_error(
        tgc()
            .args(["train", "--preset", "tiny", "--volumes"])
            .arg(&single)
            .arg("--out")
            .arg(dir.path().join("run2")),
    );
    assert!(err.contains("single") && err.contains("1 volumes"), "{err}");
}
