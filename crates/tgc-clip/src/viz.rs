//! CLIP image preprocessing, the zero-shot similarity map of the paper's
//! Fig. 1a and a PNG heat-map writer.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use image::{imageops::FilterType, DynamicImage, Rgb, RgbImage};

use crate::{ClipModel, Error, Result};

/// CLIP's per-channel pixel mean (RGB, on [0, 1] pixels).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel pixel standard deviation (the published digits).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// CLIP preprocessing: grey images are repeated to RGB, the shorter side is
/// resized to `size` (bicubic, Catmull-Rom), the centre `size x size` is cropped,
/// pixels scaled to [0, 1] and normalised with [`CLIP_MEAN`]/[`CLIP_STD`].
/// Returns 3 x size x size f32 on `device`.
pub fn preprocess(img: &DynamicImage, size: usize, device: &Device) -> Result<Tensor> {
    if size == 0 || img.width() == 0 || img.height() == 0 {
        return Err(Error::Input(format!(
            "cannot preprocess a {}x{} image to {size} px",
            img.width(),
            img.height()
        )));
    }
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as f64, rgb.height() as f64);
    let s = size as f64 / w.min(h);
    let (nw, nh) = (
        ((w * s).round() as u32).max(size as u32),
        ((h * s).round() as u32).max(size as u32),
    );
    let resized = if (nw, nh) == (rgb.width(), rgb.height()) {
        rgb
    } else {
        image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom)
    };
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let mut data = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel(x0 + x as u32, y0 + y as u32);
            for c in 0..3 {
                data[(c * size + y) * size + x] =
                    (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
    }
    Ok(Tensor::from_vec(data, (3, size, size), device)?)
}

/// Normalises a B x 3 x H x W (or 3 x H x W) tensor of [0, 1] pixels with CLIP's mean/std.
pub fn normalize(pixels: &Tensor) -> Result<Tensor> {
    let dev = pixels.device();
    let shape: Vec<usize> = if pixels.rank() == 4 {
        vec![1, 3, 1, 1]
    } else {
        vec![3, 1, 1]
    };
    let mean = Tensor::new(&CLIP_MEAN, dev)?.reshape(shape.as_slice())?;
    let std = Tensor::new(&CLIP_STD, dev)?.reshape(shape.as_slice())?;
    Ok(pixels
        .to_dtype(DType::F32)?
        .broadcast_sub(&mean)?
        .broadcast_div(&std)?)
}

/// Zero-shot similarity map (paper Fig. 1a): the cosine between CLIP's dense
/// projected patch features and its projected text embedding.
///
/// `image`: 3 x H x W or 1 x 3 x H x W (CLIP-normalised); `ids`: L or 1 x L
/// token ids (u32); `mask`: optional, same shape as `ids`. Returns the
/// grid_h x grid_w map of cosines in [-1, 1].
pub fn similarity_map(
    model: &ClipModel,
    image: &Tensor,
    ids: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let image = if image.rank() == 3 {
        image.unsqueeze(0)?
    } else {
        image.clone()
    };
    let ids = if ids.rank() == 1 {
        ids.unsqueeze(0)?
    } else {
        ids.clone()
    };
    let mask = match mask {
        Some(m) if m.rank() == 1 => Some(m.unsqueeze(0)?),
        Some(m) => Some(m.clone()),
        None => None,
    };
    if image.dim(0)? != 1 || ids.dim(0)? != 1 {
        return Err(Error::Input(format!(
            "similarity_map takes one image and one text, got {:?} and {:?}",
            image.dims(),
            ids.dims()
        )));
    }
    let v = model.encode_image_dense(&image)?;
    let t = model.encode_text(&ids, mask.as_ref())?;
    let dense = l2_normalize(&v.dense_embeds.squeeze(0)?)?; // N x E
    let text = l2_normalize(&t.text_embeds)?; // 1 x E
    let sim = dense.matmul(&text.t()?)?.squeeze(1)?;
    Ok(sim.reshape(v.grid)?)
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// A "turbo"-like blue-cyan-yellow-red colour for t in [0, 1].
fn colour(t: f32) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    // Piecewise-linear jet: 0 dark blue, .35 cyan, .5 green-ish, .65 yellow, 1 dark red.
    let stops: [(f32, [f32; 3]); 6] = [
        (0.0, [0.0, 0.0, 0.5]),
        (0.15, [0.0, 0.0, 1.0]),
        (0.35, [0.0, 1.0, 1.0]),
        (0.65, [1.0, 1.0, 0.0]),
        (0.85, [1.0, 0.0, 0.0]),
        (1.0, [0.5, 0.0, 0.0]),
    ];
    let mut c = stops[5].1;
    for w in stops.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if t <= t1 {
            let a = (t - t0) / (t1 - t0);
            c = [
                c0[0] + a * (c1[0] - c0[0]),
                c0[1] + a * (c1[1] - c0[1]),
                c0[2] + a * (c1[2] - c0[2]),
            ];
            break;
        }
    }
    Rgb([
        (c[0] * 255.0).round() as u8,
        (c[1] * 255.0).round() as u8,
        (c[2] * 255.0).round() as u8,
    ])
}

/// Writes an H x W map as a colour PNG, min-max normalised (a constant map is
/// drawn at the bottom colour). Each cell becomes a square of
/// `max(1, 256 / max(H, W))` pixels so small patch grids stay visible.
pub fn write_heatmap_png(map: &Tensor, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let (h, w) = map
        .dims2()
        .map_err(|_| Error::Input(format!("heat map must be H x W, got {:?}", map.dims())))?;
    let v = map.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::Input("heat map contains non-finite values".into()));
    }
    let lo = v.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let cell = (256 / h.max(w).max(1)).max(1) as u32;
    let img = RgbImage::from_fn(w as u32 * cell, h as u32 * cell, |x, y| {
        let i = (y / cell) as usize * w + (x / cell) as usize;
        colour((v[i] - lo) / span)
    });
    img.save(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        source: e,
    })
}
