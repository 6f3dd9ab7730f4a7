//! Checkpoints, guards, JSONL logs, plots and overlays.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use tgc_train::checkpoint::{self, check_config_compatible, load_checkpoint, save_checkpoint};
use tgc_train::overlay::{contour, render_overlay, write_overlay, OverlayConfig};
use tgc_train::plot::{epoch_points, plot_curves, plot_curves_from_jsonl, PlotConfig};
use tgc_train::{check_finite, font, read_jsonl, Error, MetricsWriter};

type R = Result<(), Box<dyn std::error::Error>>;

fn sample_tensors(seed: f32) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 + seed).collect();
    HashMap::from([
        (
            "model.w".to_string(),
            Tensor::from_vec(a, (3, 4), &dev).unwrap(),
        ),
        (
            "model.b".to_string(),
            Tensor::new(&[1.5f64, -2.0], &dev).unwrap(),
        ),
        (
            "model.h".to_string(),
            Tensor::new(&[1.5f32, -2.0], &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        ),
        ("optim.steps".to_string(), Tensor::new(7i64, &dev).unwrap()),
    ])
}

fn meta(step: u64) -> HashMap<String, String> {
    HashMap::from([
        (
            checkpoint::META_CONFIG.to_string(),
            r#"{"d_model":128}"#.to_string(),
        ),
        (checkpoint::META_STEP.to_string(), step.to_string()),
        (checkpoint::META_EPOCH.to_string(), "2".to_string()),
        (checkpoint::META_RNG.to_string(), "[1,2,3]".to_string()),
        (
            checkpoint::META_BEST_METRIC.to_string(),
            "0.8123".to_string(),
        ),
    ])
}

fn assert_same(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (k, x) in a {
        let y = &b[k];
        assert_eq!(x.dims(), y.dims(), "{k}");
        assert_eq!(x.dtype(), y.dtype(), "{k}");
        let (x, y) = (
            x.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
            y.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
        );
        assert_eq!(
            x.to_vec1::<f64>().unwrap(),
            y.to_vec1::<f64>().unwrap(),
            "{k}"
        );
    }
}

#[test]
fn checkpoint_roundtrip() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ck.safetensors");
    let t = sample_tensors(0.0);
    save_checkpoint(&path, &t, &meta(42))?;
    let ck = load_checkpoint(&path, &Device::Cpu)?;
    assert_same(&t, &ck.tensors);
    assert_eq!(ck.meta_parse::<u64>(checkpoint::META_STEP)?, 42);
    assert_eq!(ck.meta(checkpoint::META_CONFIG)?, r#"{"d_model":128}"#);
    assert_eq!(
        ck.meta(checkpoint::META_FORMAT_VERSION)?,
        checkpoint::FORMAT_VERSION
    );
    assert_eq!(ck.meta_parse::<f64>(checkpoint::META_BEST_METRIC)?, 0.8123);
    let e = ck.meta("nope").unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("ck.safetensors"), "{e}");
    // No temp file left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    Ok(())
}

#[test]
fn interrupted_write_keeps_previous_checkpoint() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("last.safetensors");
    let v1 = sample_tensors(0.0);
    save_checkpoint(&path, &v1, &meta(1))?;
    // A save of v2 killed mid-write leaves a partial temp file (another pid's name) and
    // no rename: the previous checkpoint must load unchanged.
    let bytes_v1 = std::fs::read(&path)?;
    let leftover = dir.path().join("last.safetensors.tmp-999999");
    std::fs::write(&leftover, &bytes_v1[..bytes_v1.len() / 2])?;
    let ck = load_checkpoint(&path, &Device::Cpu)?;
    assert_same(&v1, &ck.tensors);
    assert_eq!(ck.meta_parse::<u64>(checkpoint::META_STEP)?, 1);
    // The next save works despite the leftover and replaces the checkpoint.
    let v2 = sample_tensors(1.0);
    save_checkpoint(&path, &v2, &meta(2))?;
    let ck = load_checkpoint(&path, &Device::Cpu)?;
    assert_same(&v2, &ck.tensors);
    assert_eq!(ck.meta_parse::<u64>(checkpoint::META_STEP)?, 2);
    Ok(())
}

#[test]
fn truncated_or_missing_checkpoint_gives_clear_error() -> R {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.safetensors");
    save_checkpoint(&good, &sample_tensors(0.0), &meta(1))?;
    let bytes = std::fs::read(&good)?;
    // Cut inside the data, inside the header, and inside the 8-byte length prefix.
    for cut in [bytes.len() - 5, 40, 3] {
        let bad = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&bad, &bytes[..cut])?;
        let err = load_checkpoint(&bad, &Device::Cpu).unwrap_err();
        assert!(
            matches!(err, Error::CheckpointCorrupt { .. }),
            "cut {cut}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("cut{cut}.safetensors")) && msg.contains("truncated or corrupt"),
            "{msg}"
        );
    }
    let missing = dir.path().join("nothing.safetensors");
    let err = load_checkpoint(&missing, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::CheckpointMissing(_)), "{err:?}");
    assert!(err.to_string().contains("nothing.safetensors"));
    Ok(())
}

#[test]
fn wrong_format_version_is_rejected() -> R {
    let dir = tempfile::tempdir()?;
    let t = sample_tensors(0.0);
    // Written by someone else: plain safetensors without our version, or a future one.
    let plain = dir.path().join("plain.safetensors");
    candle_core::safetensors::save(&t, &plain)?;
    let err = load_checkpoint(&plain, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::FormatVersion { found, .. } if found == "none"),
        "{err:?}"
    );
    let future = dir.path().join("future.safetensors");
    let mut m = HashMap::new();
    m.insert(
        checkpoint::META_FORMAT_VERSION.to_string(),
        "99".to_string(),
    );
    let sorted: std::collections::BTreeMap<&str, &Tensor> =
        t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    std::fs::write(&future, safetensors::serialize(sorted, Some(m.clone()))?)?;
    let msg = load_checkpoint(&future, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("format version 99") && msg.contains("future.safetensors"),
        "{msg}"
    );
    // Refusing to write another version.
    assert!(save_checkpoint(dir.path().join("x"), &t, &m).is_err());
    Ok(())
}

#[test]
fn config_mismatch_names_fields() {
    let current = r#"{"d_model": 128, "sse": {"layers": 3, "heads": 8}, "name": "cpu"}"#;
    let same_reordered = r#"{"name": "cpu", "sse": {"heads": 8, "layers": 3}, "d_model": 128}"#;
    check_config_compatible(current, same_reordered).unwrap();
    let other =
        r#"{"d_model": 256, "sse": {"layers": 6, "heads": 8}, "name": "cpu", "extra": true}"#;
    let err = check_config_compatible(current, other).unwrap_err();
    assert!(matches!(err, Error::ConfigMismatch(_)));
    let msg = err.to_string();
    assert_eq!(
        msg,
        "checkpoint from another config (checkpoint vs current): d_model 256 vs 128; extra true vs (absent); sse.layers 6 vs 3"
    );
    assert!(check_config_compatible(current, "{not json").is_err());
}

#[test]
fn guard_names_step_and_batch() {
    check_finite(0.25, 3, &["a"]).unwrap();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let msg = check_finite(bad, 17, &["img_3.png", "img_9.png"])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("step 17") && msg.contains("img_3.png, img_9.png"),
            "{msg}"
        );
    }
}

#[test]
fn jsonl_roundtrip_and_errors() -> R {
    #[derive(serde::Serialize)]
    struct Rec {
        epoch: u32,
        train_loss: f64,
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.jsonl");
    {
        let mut w = MetricsWriter::create(&path)?;
        w.write(&Rec {
            epoch: 1,
            train_loss: 0.5,
        })?;
        w.write(&serde_json::json!({"epoch": 1, "val_dice": 0.7}))?;
        assert!(w.write(&3.0).is_err());
        // Flushed per line: readable while the writer is alive.
        assert_eq!(read_jsonl(&path)?.len(), 2);
    }
    {
        let mut w = MetricsWriter::append(&path)?;
        w.write(&Rec {
            epoch: 2,
            train_loss: 0.25,
        })?;
    }
    let text = std::fs::read_to_string(&path)?;
    assert_eq!(
        text,
        "{\"epoch\":1,\"train_loss\":0.5}\n{\"epoch\":1,\"val_dice\":0.7}\n{\"epoch\":2,\"train_loss\":0.25}\n"
    );
    // A final line cut off by a kill is skipped; a bad line in the middle is an error.
    std::fs::write(&path, format!("{text}{{\"epoch\":3,\"tra"))?;
    assert_eq!(read_jsonl(&path)?.len(), 3);
    std::fs::write(&path, format!("{{\"a\":1}}\nnot json\n{text}"))?;
    let msg = read_jsonl(&path).unwrap_err().to_string();
    assert!(msg.contains("m.jsonl line 2"), "{msg}");
    Ok(())
}

fn count_color(img: &image::RgbImage, y0: u32, c: [u8; 3]) -> usize {
    img.enumerate_pixels()
        .filter(|(_, y, p)| *y >= y0 && p.0 == c)
        .count()
}

#[test]
fn plot_writes_decodable_png() -> R {
    let dir = tempfile::tempdir()?;
    let jsonl = dir.path().join("m.jsonl");
    let mut w = MetricsWriter::create(&jsonl)?;
    for e in 1..=6 {
        w.write(&serde_json::json!({"epoch": e, "step": e * 10, "train_loss": 1.0 / e as f64}))?;
        w.write(&serde_json::json!({"epoch": e, "val_dice": 0.5 + 0.05 * e as f64}))?;
    }
    // A resumed run re-logs epoch 6: the last value wins.
    w.write(&serde_json::json!({"epoch": 6, "val_dice": 0.9}))?;
    let records = read_jsonl(&jsonl)?;
    let pts = epoch_points(&records);
    assert_eq!(pts.len(), 6);
    assert_eq!(pts[5].val_dice, Some(0.9));
    assert_eq!(pts[0].train_loss, Some(1.0));

    for (i, cfg) in [
        PlotConfig::default(),
        PlotConfig {
            width: 320,
            height: 200,
            tick_labels: false,
            ..Default::default()
        },
    ]
    .iter()
    .enumerate()
    {
        let png = dir.path().join(format!("curves{i}.png"));
        plot_curves_from_jsonl(&jsonl, &png, cfg)?;
        let img = image::open(&png)?.to_rgb8();
        assert_eq!((img.width(), img.height()), (cfg.width, cfg.height));
        // Both curves are drawn below the header band.
        assert!(
            count_color(&img, 30, [31, 119, 180]) > 20,
            "loss curve missing"
        );
        assert!(
            count_color(&img, 30, [214, 39, 40]) > 20,
            "dice curve missing"
        );
    }
    // No data yet: an empty frame, not an error.
    let png = dir.path().join("empty.png");
    plot_curves(&[], &png, &PlotConfig::default())?;
    assert_eq!(image::open(&png)?.width(), 800);
    Ok(())
}

#[test]
fn font_draws_hand_checked_glyph() {
    let mut img = image::RgbImage::new(10, 10);
    font::draw_text(&mut img, 2, 1, "I", 1, image::Rgb([255, 255, 255]));
    // 'I': column 2 full height, columns 1 and 3 at the top and bottom rows.
    let mut expected = Vec::new();
    for row in 0..7 {
        expected.push((2 + 2, 1 + row));
    }
    for col in [1, 3] {
        expected.push((2 + col, 1));
        expected.push((2 + col, 7));
    }
    expected.sort();
    let mut lit: Vec<(u32, u32)> = img
        .enumerate_pixels()
        .filter(|(_, _, p)| p.0 == [255, 255, 255])
        .map(|(x, y, _)| (x, y))
        .collect();
    lit.sort();
    assert_eq!(lit, expected);
    assert_eq!(
        font::wrap("left lung opacity", 9),
        vec!["left lung", "opacity"]
    );
    assert_eq!(font::wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
}

#[test]
fn overlay_contours_on_hand_made_squares() -> R {
    let dev = Device::Cpu;
    let (h, w) = (32usize, 32usize);
    let img: Vec<f32> = (0..h * w)
        .map(|i| (i % w) as f32 / (w - 1) as f32)
        .collect();
    let square = |lo: usize, hi: usize| -> Vec<f32> {
        (0..h * w)
            .map(|i| {
                let (y, x) = (i / w, i % w);
                ((lo..hi).contains(&y) && (lo..hi).contains(&x)) as u8 as f32
            })
            .collect()
    };
    let image = Tensor::from_vec(img.clone(), (h, w), &dev)?;
    let pred = Tensor::from_vec(square(8, 24), (1, h, w), &dev)?; // leading 1 allowed
    let gt = Tensor::from_vec(square(10, 26), (h, w), &dev)?;
    let cfg = OverlayConfig::default();
    let out = render_overlay(&image, &pred, Some(&gt), "left lung", &cfg)?;
    // Caption: 32 px wide -> 4 chars per line -> "left" / "lung": 2 lines of 9 px + 2 x 4 padding.
    assert_eq!((out.width(), out.height()), (32, 32 + 8 + 18));
    // Square [lo, hi): its contour is the ring x or y in {lo, hi - 1}.
    let on_ring = |x: usize, y: usize, lo: usize, hi: usize| {
        (lo..hi).contains(&x)
            && (lo..hi).contains(&y)
            && (x == lo || x == hi - 1 || y == lo || y == hi - 1)
    };
    for y in 0..h {
        for x in 0..w {
            let (p, g) = (on_ring(x, y, 8, 24), on_ring(x, y, 10, 26));
            let grey = (img[y * w + x] * 255.0).round() as u8;
            let want = match (p, g) {
                (true, true) => cfg.both_color,
                (true, false) => cfg.pred_color,
                (false, true) => cfg.gt_color,
                _ => [grey; 3],
            };
            assert_eq!(
                out.get_pixel(x as u32, y as u32).0,
                want,
                "pixel ({x}, {y})"
            );
        }
    }
    // The caption band has text pixels, and only text or black.
    let band: Vec<[u8; 3]> = (32..out.height())
        .flat_map(|y| (0..32).map(move |x| (x, y)))
        .map(|(x, y)| out.get_pixel(x, y).0)
        .collect();
    let text = band.iter().filter(|c| **c == cfg.text_color).count();
    assert!(text > 20 && band.iter().all(|c| *c == cfg.text_color || *c == [0, 0, 0]));
    // The file version is the same picture.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o.png");
    write_overlay(&image, &pred, Some(&gt), "left lung", &path)?;
    assert_eq!(image::open(&path)?.to_rgb8(), out);
    // Without ground truth and caption: only the prediction contour, no band.
    let out = render_overlay(&image, &pred, None, "", &cfg)?;
    assert_eq!(out.height(), 32);
    assert_eq!(
        out.get_pixel(12, 10).0,
        [(12.0f32 / 31.0 * 255.0).round() as u8; 3]
    );
    // Size mismatch is an error.
    let small = Tensor::zeros((16, 16), DType::F32, &dev)?;
    assert!(render_overlay(&image, &small, None, "", &cfg).is_err());
    Ok(())
}

#[test]
fn contour_of_single_pixel_and_border() {
    // A 3x3 full mask: everything but the centre is contour (border counts as outside).
    let c = contour(&[true; 9], 3, 3);
    assert_eq!(
        c,
        vec![true, true, true, true, false, true, true, true, true]
    );
    let c = contour(
        &[false, false, false, false, true, false, false, false, false],
        3,
        3,
    );
    assert_eq!(c.iter().filter(|&&b| b).count(), 1);
}
