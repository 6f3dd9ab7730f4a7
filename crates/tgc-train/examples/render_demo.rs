//! Writes a demo curves plot and an overlay, to look at the output style.
//!
//! `cargo run --release -p tgc-train --example render_demo -- /tmp/tgc-demo`

use candle_core::{Device, Tensor};
use tgc_train::plot::{plot_curves, PlotConfig};
use tgc_train::{write_overlay, Result};

fn main() -> Result<()> {
    let out =
        std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "tgc-demo".into()));
    std::fs::create_dir_all(&out).map_err(|e| tgc_train::Error::Io {
        op: "creating",
        path: out.clone(),
        source: e,
    })?;
    let records: Vec<serde_json::Value> = (1..=20)
        .flat_map(|e| {
            let e = e as f64;
            [
                serde_json::json!({"epoch": e, "train_loss": 0.2 + 0.8 / e}),
                serde_json::json!({"epoch": e, "val_dice": 0.9 - 0.5 / e}),
            ]
        })
        .collect();
    plot_curves(&records, out.join("curves.png"), &PlotConfig::default())?;

    let (h, w) = (256usize, 256usize);
    let dev = Device::Cpu;
    let img: Vec<f32> = (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as f32, (i % w) as f32);
            0.5 + 0.4 * ((x / 20.0).sin() * (y / 30.0).cos())
        })
        .collect();
    let disk = |cx: f32, cy: f32, r: f32| -> Vec<f32> {
        (0..h * w)
            .map(|i| {
                let (y, x) = ((i / w) as f32, (i % w) as f32);
                (((x - cx).powi(2) + (y - cy).powi(2)).sqrt() < r) as u8 as f32
            })
            .collect()
    };
    let image = Tensor::from_vec(img, (h, w), &dev)?;
    let pred = Tensor::from_vec(disk(120.0, 130.0, 50.0), (h, w), &dev)?;
    let gt = Tensor::from_vec(disk(130.0, 125.0, 55.0), (h, w), &dev)?;
    write_overlay(
        &image,
        &pred,
        Some(&gt),
        "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
        out.join("overlay.png"),
    )?;
    println!("wrote {}/curves.png and overlay.png", out.display());
    Ok(())
}
