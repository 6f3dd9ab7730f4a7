//! Prediction overlays: the image in grey, the predicted mask's contour in one colour, the
//! ground truth's in another, and the prompt written beneath with the built-in
//! [`crate::font`] (no font file needed).

use std::path::Path;

use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::font;

/// Colours and threshold of [`render_overlay`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OverlayConfig {
    /// A mask pixel is inside when its value is `> threshold` (probabilities or 0/1).
    pub threshold: f32,
    /// Contour colour of the prediction.
    pub pred_color: [u8; 3],
    /// Contour colour of the ground truth.
    pub gt_color: [u8; 3],
    /// Colour where both contours fall on the same pixel.
    pub both_color: [u8; 3],
    /// Caption text colour (on a black band).
    pub text_color: [u8; 3],
    /// Font scale of the caption; 0 picks 2 for images at least 256 px wide, else 1.
    pub caption_scale: u32,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            pred_color: [255, 40, 40],
            gt_color: [40, 255, 40],
            both_color: [255, 255, 0],
            text_color: [255, 255, 255],
            caption_scale: 0,
        }
    }
}

/// Padding around the caption, in pixels.
const PAD: u32 = 4;

fn to_hw(t: &Tensor, what: &str) -> Result<(usize, usize, Vec<f32>)> {
    // Accept H x W with any number of leading size-1 dims (1 x H x W, 1 x 1 x H x W).
    let dims: Vec<usize> = t.dims().to_vec();
    if dims.len() < 2 || dims[..dims.len() - 2].iter().any(|&d| d != 1) {
        return Err(Error::InvalidArgument(format!(
            "overlay: {what} must be H x W (leading dims of size 1 allowed), got {dims:?}"
        )));
    }
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((h, w, v))
}

/// The inner contour of a binary mask: inside pixels with a 4-neighbour outside (or on
/// the image border). Row-major `h x w`.
pub fn contour(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    let mut out = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            if !mask[y * w + x] {
                continue;
            }
            let edge = y == 0
                || x == 0
                || y + 1 == h
                || x + 1 == w
                || !mask[(y - 1) * w + x]
                || !mask[(y + 1) * w + x]
                || !mask[y * w + x - 1]
                || !mask[y * w + x + 1];
            out[y * w + x] = edge;
        }
    }
    out
}

/// Renders the overlay. `image`: H x W grey values in [0, 1] (clamped; NaN draws black);
/// `pred_mask`, `gt_mask`: H x W, inside where `> config.threshold`. The result is
/// W wide and H tall plus a caption band (none for an empty caption).
pub fn render_overlay(
    image: &Tensor,
    pred_mask: &Tensor,
    gt_mask: Option<&Tensor>,
    caption: &str,
    config: &OverlayConfig,
) -> Result<RgbImage> {
    let (h, w, img) = to_hw(image, "image")?;
    let binarise = |t: &Tensor, what: &str| -> Result<Vec<bool>> {
        let (mh, mw, v) = to_hw(t, what)?;
        if (mh, mw) != (h, w) {
            return Err(Error::InvalidArgument(format!(
                "overlay: {what} is {mh}x{mw}, image is {h}x{w}"
            )));
        }
        Ok(v.iter().map(|&x| x > config.threshold).collect())
    };
    let pred = contour(&binarise(pred_mask, "pred_mask")?, h, w);
    let gt = match gt_mask {
        Some(g) => contour(&binarise(g, "gt_mask")?, h, w),
        None => vec![false; h * w],
    };
    let scale = match config.caption_scale {
        0 if w >= 256 => 2,
        0 => 1,
        s => s,
    };
    let max_chars = ((w as u32).saturating_sub(2 * PAD) / font::advance(scale)).max(1) as usize;
    let lines = font::wrap(caption, max_chars);
    let band = if lines.is_empty() {
        0
    } else {
        2 * PAD + lines.len() as u32 * font::line_height(scale)
    };
    let mut out = RgbImage::new(w as u32, h as u32 + band);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let c = match (pred[i], gt[i]) {
                (true, true) => config.both_color,
                (true, false) => config.pred_color,
                (false, true) => config.gt_color,
                (false, false) => {
                    let v = img[i];
                    let g = if v.is_nan() {
                        0
                    } else {
                        (v.clamp(0.0, 1.0) * 255.0).round() as u8
                    };
                    [g, g, g]
                }
            };
            out.put_pixel(x as u32, y as u32, Rgb(c));
        }
    }
    for (li, line) in lines.iter().enumerate() {
        let y = h as u32 + PAD + li as u32 * font::line_height(scale);
        font::draw_text(
            &mut out,
            PAD as i64,
            y as i64,
            line,
            scale,
            Rgb(config.text_color),
        );
    }
    Ok(out)
}

/// Renders the overlay with the default [`OverlayConfig`] and writes it as PNG to `path`.
pub fn write_overlay(
    image: &Tensor,
    pred_mask: &Tensor,
    gt_mask: Option<&Tensor>,
    caption: &str,
    path: impl AsRef<Path>,
) -> Result<()> {
    let img = render_overlay(
        image,
        pred_mask,
        gt_mask,
        caption,
        &OverlayConfig::default(),
    )?;
    let path = path.as_ref();
    img.save(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
