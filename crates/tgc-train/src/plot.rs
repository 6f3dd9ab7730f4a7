//! Training curves as a PNG: train loss (left axis) and validation Dice (right axis, 0..1)
//! per epoch, drawn with `plotters` into a buffer and encoded with `image`.
//!
//! Axis tick labels need a TrueType font (plotters' `ab_glyph` backend has none built
//! in): [`PlotConfig::font_path`], else the first of a few common system fonts
//! (DejaVu Sans, Liberation Sans, Arial), is used. Without one the chart is drawn
//! without tick labels rather than failing. The header (legend and value ranges) is
//! always written with the built-in [`crate::font`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::{Rgb, RgbImage};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::font;

/// Size and font of [`plot_curves`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlotConfig {
    /// PNG width in pixels.
    pub width: u32,
    /// PNG height in pixels.
    pub height: u32,
    /// A TrueType/OpenType font for tick labels; `None` searches common system fonts. The
    /// font is registered with plotters once per process: the first call that finds one wins.
    pub font_path: Option<PathBuf>,
    /// Whether to use a font at all (false: no tick labels, header only).
    pub tick_labels: bool,
}

impl Default for PlotConfig {
    fn default() -> Self {
        Self {
            width: 800,
            height: 480,
            font_path: None,
            tick_labels: true,
        }
    }
}

/// One epoch's values, as plotted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochPoint {
    /// Epoch number.
    pub epoch: f64,
    /// Mean training loss of the epoch.
    pub train_loss: Option<f64>,
    /// Validation Dice after the epoch.
    pub val_dice: Option<f64>,
}

/// Family name under which the tick-label font is registered with plotters.
const FAMILY: &str = "tgc-plot-sans";
const SYSTEM_FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font once per process; true if one is available.
fn ensure_font(config: &PlotConfig) -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if !config.tick_labels {
        return false;
    }
    *REGISTERED.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = config.font_path.iter().cloned().collect();
        candidates.extend(SYSTEM_FONTS.iter().map(PathBuf::from));
        for p in candidates {
            if let Ok(bytes) = std::fs::read(&p) {
                // plotters keeps a &'static reference: leak one font per process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Extracts the per-epoch points from metric records: every JSON object with a numeric
/// `epoch` and a numeric `train_loss` and/or `val_dice`. For an epoch logged more than
/// once (a resumed run) the last value wins. Sorted by epoch.
pub fn epoch_points(records: &[serde_json::Value]) -> Vec<EpochPoint> {
    let mut by_epoch: BTreeMap<i64, EpochPoint> = BTreeMap::new();
    for r in records {
        let Some(epoch) = r.get("epoch").and_then(|e| e.as_f64()) else {
            continue;
        };
        let loss = r.get("train_loss").and_then(|v| v.as_f64());
        let dice = r.get("val_dice").and_then(|v| v.as_f64());
        if loss.is_none() && dice.is_none() {
            continue;
        }
        // Key on epoch * 1000 so fractional epochs keep their order.
        let e = by_epoch
            .entry((epoch * 1000.0).round() as i64)
            .or_insert(EpochPoint {
                epoch,
                train_loss: None,
                val_dice: None,
            });
        if loss.is_some() {
            e.train_loss = loss;
        }
        if dice.is_some() {
            e.val_dice = dice;
        }
    }
    by_epoch.into_values().collect()
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Header band height (legend written with the built-in font), in pixels.
const HEADER: u32 = 24;

/// Draws train loss and validation Dice per epoch from `records` (see [`epoch_points`])
/// into a `config.width x config.height` PNG at `png_path`. Records without epochs give
/// an empty frame (so the loop can call it from the first epoch on).
pub fn plot_curves(
    records: &[serde_json::Value],
    png_path: impl AsRef<Path>,
    config: &PlotConfig,
) -> Result<()> {
    let path = png_path.as_ref();
    let (w, h) = (config.width, config.height);
    if w < 64 || h < 64 + HEADER {
        return Err(Error::InvalidArgument(format!(
            "plot {}: {w}x{h} is too small (at least 64 x {})",
            path.display(),
            64 + HEADER
        )));
    }
    let pts = epoch_points(records);
    let labels = ensure_font(config);
    let loss_pts: Vec<(f64, f64)> = pts
        .iter()
        .filter_map(|p| p.train_loss.filter(|v| v.is_finite()).map(|v| (p.epoch, v)))
        .collect();
    let dice_pts: Vec<(f64, f64)> = pts
        .iter()
        .filter_map(|p| p.val_dice.filter(|v| v.is_finite()).map(|v| (p.epoch, v)))
        .collect();
    let (x0, x1) = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) if b.epoch > a.epoch => (a.epoch, b.epoch),
        (Some(a), _) => (a.epoch - 0.5, a.epoch + 0.5),
        _ => (0.0, 1.0),
    };
    let lmax = loss_pts
        .iter()
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max);
    let lmin = loss_pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let (y0, y1) = if loss_pts.is_empty() {
        (0.0, 1.0)
    } else {
        let lo = lmin.min(0.0);
        let hi = if lmax > lo { lmax * 1.05 } else { lo + 1.0 };
        (lo, hi)
    };
    let loss_color = RGBColor(31, 119, 180);
    let dice_color = RGBColor(214, 39, 40);

    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let area = root.margin(HEADER, 8, 8, 8);
        let (lab, ylab) = if labels { (40, 50) } else { (4, 4) };
        let mut chart = ChartBuilder::on(&area)
            .x_label_area_size(lab)
            .y_label_area_size(ylab)
            .right_y_label_area_size(ylab)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| plot_err(path, e))?
            .set_secondary_coord(x0..x1, 0.0..1.0);
        {
            let mut mesh = chart.configure_mesh();
            if labels {
                mesh.label_style((FAMILY, 13))
                    .x_desc("epoch")
                    .y_desc("train loss")
                    .axis_desc_style((FAMILY, 14));
            } else {
                mesh.x_labels(0).y_labels(0);
            }
            mesh.draw().map_err(|e| plot_err(path, e))?;
        }
        if labels {
            chart
                .configure_secondary_axes()
                .label_style((FAMILY, 13))
                .y_desc("val Dice")
                .axis_desc_style((FAMILY, 14))
                .draw()
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .draw_series(LineSeries::new(
                loss_pts.iter().copied(),
                loss_color.stroke_width(2),
            ))
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(
                loss_pts
                    .iter()
                    .map(|&p| Circle::new(p, 3, loss_color.filled())),
            )
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_secondary_series(LineSeries::new(
                dice_pts.iter().copied(),
                dice_color.stroke_width(2),
            ))
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_secondary_series(
                dice_pts
                    .iter()
                    .map(|&p| Circle::new(p, 3, dice_color.filled())),
            )
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    let mut img = RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| plot_err(path, "plot buffer has the wrong size"))?;
    // Legend with the built-in font: always legible, font file or not.
    let last = |v: &[(f64, f64)]| v.last().map(|p| format!("{:.4}", p.1));
    let best_dice = dice_pts.iter().map(|p| p.1).fold(f64::NAN, f64::max);
    let loss_txt = format!(
        "train loss (left) last {}",
        last(&loss_pts).unwrap_or_else(|| "-".into())
    );
    let dice_txt = format!(
        "val Dice (right, 0..1) last {} best {}",
        last(&dice_pts).unwrap_or_else(|| "-".into()),
        if best_dice.is_nan() {
            "-".to_string()
        } else {
            format!("{best_dice:.4}")
        }
    );
    let y = ((HEADER - font::GLYPH_H) / 2) as i64;
    font::draw_text(&mut img, 8, y, &loss_txt, 1, Rgb([31, 119, 180]));
    let x2 = 8 + (loss_txt.len() as i64 + 3) * font::advance(1) as i64;
    font::draw_text(&mut img, x2, y, &dice_txt, 1, Rgb([214, 39, 40]));
    img.save(path).map_err(|e| plot_err(path, e))
}

/// [`plot_curves`] from a JSONL metrics file (see [`crate::log::read_jsonl`]).
pub fn plot_curves_from_jsonl(
    jsonl_path: impl AsRef<Path>,
    png_path: impl AsRef<Path>,
    config: &PlotConfig,
) -> Result<()> {
    let records = crate::log::read_jsonl(jsonl_path)?;
    plot_curves(&records, png_path, config)
}
