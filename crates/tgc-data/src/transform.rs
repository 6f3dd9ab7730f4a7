//! Preprocessing to the model's input sizes and text-aware augmentation.
//!
//! For every sample three arrays are made in one pass each, directly from the source
//! image (resize and augmentation are a single resampling, so there is no double
//! interpolation):
//! - the CLIP input, 3 x S_c x S_c: bilinear (half-pixel centres, as `align_corners =
//!   false`; no antialiasing), grey repeated to 3 channels, then CLIP's per-channel
//!   normalisation `(v - mean) / std` with mean (0.48145466, 0.4578275, 0.40821073) and
//!   std (0.26862954, 0.26130258, 0.27577711);
//! - the CNN input, 3 x S_n x S_n: same resampling, then `(v - 0.5) / 0.5`, i.e. [0, 1]
//!   mapped to [-1, 1] in every channel (the CNN is trained from scratch, so a fixed
//!   symmetric range is all it needs);
//! - the label, S_l x S_l: nearest neighbour, values 0/1.
//!
//! Outside the source image (after rotation/scaling) images and labels are 0.

use serde::{Deserialize, Serialize};

use crate::sample::{Sample, SplitMix64};
use crate::text::swap_left_right;

/// CLIP's image mean (OpenAI).
#[allow(clippy::excessive_precision)] // the published constants, verbatim
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's image std (OpenAI).
#[allow(clippy::excessive_precision)] // the published constants, verbatim
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The input geometry of the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// S_c, the CLIP input size (336 in the paper).
    pub clip_size: usize,
    /// S_n, the CNN input size (768 in the paper).
    pub cnn_size: usize,
    /// Size of the label / output mask (224 for QaTa-COV19 and MosMedData+).
    pub label_size: usize,
}

impl Default for Preprocess {
    /// The paper's geometry: CLIP 336, CNN 768, labels 224.
    fn default() -> Self {
        Self {
            clip_size: 336,
            cnn_size: 768,
            label_size: 224,
        }
    }
}

impl Preprocess {
    /// The `cpu` preset: CLIP 112, CNN 224 (the datasets' native size), labels 224.
    pub fn cpu() -> Self {
        Self {
            clip_size: 112,
            cnn_size: 224,
            label_size: 224,
        }
    }

    /// A stable id of this preprocessing for frozen-feature cache keys.
    pub fn id(&self) -> String {
        format!(
            "v1-clip{}-cnn{}-lbl{}-bilinear-openai-norm",
            self.clip_size, self.cnn_size, self.label_size
        )
    }

    /// Applies the geometry (and the augmentation `aug`) to a sample.
    pub fn apply(&self, sample: &Sample, aug: &AugmentParams) -> Prepared {
        let img = &sample.image;
        let warp = Warp::new(aug);
        let clip = resample_image(img, self.clip_size, &warp, |c, v| {
            (aug.intensity(v) - CLIP_MEAN[c]) / CLIP_STD[c]
        });
        let cnn = resample_image(img, self.cnn_size, &warp, |_, v| {
            (aug.intensity(v) - 0.5) / 0.5
        });
        let mask = resample_mask(&sample.mask, self.label_size, &warp);
        let (caption, aux) = if aug.hflip {
            (
                swap_left_right(&sample.caption),
                sample.aux_caption.as_deref().map(swap_left_right),
            )
        } else {
            (sample.caption.clone(), sample.aux_caption.clone())
        };
        Prepared {
            clip,
            cnn,
            mask,
            aux_caption: aux.unwrap_or_else(|| caption.clone()),
            caption,
            id: sample.id.clone(),
            image_hash: img.content_hash(),
            variant: aug.variant(),
        }
    }
}

/// One preprocessed sample (host memory).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// 3 x S_c x S_c, CLIP-normalised.
    pub clip: Vec<f32>,
    /// 3 x S_n x S_n, in [-1, 1].
    pub cnn: Vec<f32>,
    /// S_l x S_l, 0/1.
    pub mask: Vec<f32>,
    /// Caption after augmentation (left/right swapped on a flip).
    pub caption: String,
    /// Auxiliary caption after augmentation (the caption when there is none).
    pub aux_caption: String,
    /// Sample id.
    pub id: String,
    /// Content hash of the source image (before augmentation).
    pub image_hash: [u8; 32],
    /// Augmentation variant (see [`AugmentParams::variant`]).
    pub variant: u64,
}

/// The augmentation policy of a [`crate::DataLoader`].
///
/// Geometric draws (flip, rotation, zoom) move image and mask together; intensity draws
/// (contrast, brightness, gamma) change the image only, as a different exposure of the
/// same radiograph would. A setting at its identity value consumes no randomness, so a
/// policy without intensity draws repeats the draws it made before those fields existed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Augment {
    /// The switch: when false no augmentation is applied.
    pub enabled: bool,
    /// Probability of a horizontal flip (which also swaps "left"/"right" in the text).
    pub hflip_prob: f32,
    /// Rotation drawn uniformly in [-max, max] degrees.
    pub max_rotation_deg: f32,
    /// Isotropic scale drawn uniformly in [min, max].
    pub scale_range: (f32, f32),
    /// Contrast factor drawn uniformly in [min, max] ((1, 1): off); see
    /// [`AugmentParams::intensity`].
    pub contrast_range: (f32, f32),
    /// Brightness shift drawn uniformly in [-max, max], in units of the [0, 1] intensity
    /// range (0: off).
    pub max_brightness: f32,
    /// Gamma drawn log-uniformly in [min, max] ((1, 1): off), so that 0.8 and 1.25 are
    /// equally likely.
    pub gamma_range: (f32, f32),
}

impl Default for Augment {
    /// Off.
    fn default() -> Self {
        Self::off()
    }
}

impl Augment {
    /// No augmentation (variant 0 only).
    pub fn off() -> Self {
        Self {
            enabled: false,
            hflip_prob: 0.0,
            max_rotation_deg: 0.0,
            scale_range: (1.0, 1.0),
            contrast_range: (1.0, 1.0),
            max_brightness: 0.0,
            gamma_range: (1.0, 1.0),
        }
    }
    /// Random horizontal flips only: two discrete variants (0, 1), so frozen features can
    /// be cached for both.
    pub fn flip_only() -> Self {
        Self {
            enabled: true,
            hflip_prob: 0.5,
            ..Self::off()
        }
    }
    /// Every sample flipped (variant 1): to build the cache of the flipped variant.
    pub fn always_flip() -> Self {
        Self {
            enabled: true,
            hflip_prob: 1.0,
            ..Self::off()
        }
    }
    /// Flips, rotations up to 10 degrees and scaling in [0.9, 1.1]: continuous variants,
    /// not cacheable.
    pub fn full() -> Self {
        Self {
            enabled: true,
            hflip_prob: 0.5,
            max_rotation_deg: 10.0,
            scale_range: (0.9, 1.1),
            ..Self::off()
        }
    }

    /// Draws the parameters for one sample.
    pub fn draw(&self, rng: &mut SplitMix64) -> AugmentParams {
        if !self.enabled {
            return AugmentParams::default();
        }
        let hflip = rng.uniform() < self.hflip_prob as f64;
        let rotation_deg = if self.max_rotation_deg > 0.0 {
            rng.range(-self.max_rotation_deg as f64, self.max_rotation_deg as f64) as f32
        } else {
            0.0
        };
        let scale = uniform_in(rng, self.scale_range);
        let contrast = uniform_in(rng, self.contrast_range);
        let brightness = if self.max_brightness > 0.0 {
            rng.range(-self.max_brightness as f64, self.max_brightness as f64) as f32
        } else {
            0.0
        };
        let (lo, hi) = self.gamma_range;
        let gamma = if hi > lo {
            rng.range((lo as f64).ln(), (hi as f64).ln()).exp() as f32
        } else {
            lo
        };
        AugmentParams {
            hflip,
            rotation_deg,
            scale,
            contrast,
            brightness,
            gamma,
        }
    }
}

/// A uniform draw in `[lo, hi]`, or `lo` without drawing when the range is empty.
fn uniform_in(rng: &mut SplitMix64, (lo, hi): (f32, f32)) -> f32 {
    if hi > lo {
        rng.range(lo as f64, hi as f64) as f32
    } else {
        lo
    }
}

/// The augmentation of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Horizontal flip (the caption's left/right are swapped too).
    pub hflip: bool,
    /// Rotation about the image centre, degrees, counter-clockwise on screen.
    pub rotation_deg: f32,
    /// Zoom factor (> 1 enlarges the content).
    pub scale: f32,
    /// Contrast factor about mid-grey (1: unchanged).
    pub contrast: f32,
    /// Brightness shift in units of the [0, 1] intensity range (0: unchanged).
    pub brightness: f32,
    /// Gamma applied to the [0, 1] intensities (1: unchanged; < 1 brightens).
    pub gamma: f32,
}

impl Default for AugmentParams {
    fn default() -> Self {
        Self {
            hflip: false,
            rotation_deg: 0.0,
            scale: 1.0,
            contrast: 1.0,
            brightness: 0.0,
            gamma: 1.0,
        }
    }
}

impl AugmentParams {
    /// The intensity change of this draw applied to one source value `v` in [0, 1]:
    /// `clamp(contrast * (v^gamma - 0.5) + 0.5 + brightness, 0, 1)`. The identity when
    /// contrast, brightness and gamma are at 1, 0 and 1. Applied after resampling, so
    /// the zeros outside a rotated or zoomed image change with it, as the film would.
    ///
    /// ```
    /// use tgc_data::AugmentParams;
    /// let a = AugmentParams { contrast: 2.0, brightness: 0.1, gamma: 2.0, ..Default::default() };
    /// // 0.8^2 = 0.64; 2 * (0.64 - 0.5) + 0.5 + 0.1 = 0.88
    /// assert!((a.intensity(0.8) - 0.88).abs() < 1e-6);
    /// assert_eq!(a.intensity(1.0), 1.0); // 1.1, clamped
    /// assert_eq!(AugmentParams::default().intensity(0.3), 0.3);
    /// ```
    #[inline]
    pub fn intensity(&self, v: f32) -> f32 {
        if self.contrast == 1.0 && self.brightness == 0.0 && self.gamma == 1.0 {
            return v;
        }
        let g = if self.gamma == 1.0 {
            v
        } else {
            v.max(0.0).powf(self.gamma)
        };
        (self.contrast * (g - 0.5) + 0.5 + self.brightness).clamp(0.0, 1.0)
    }

    /// The cache variant id: 0 = identity, 1 = horizontal flip only; any rotation,
    /// scaling or intensity change gives a hash with the top bit set (a continuous
    /// variant).
    pub fn variant(&self) -> u64 {
        let intensity_identity =
            self.contrast == 1.0 && self.brightness == 0.0 && self.gamma == 1.0;
        if self.rotation_deg == 0.0 && self.scale == 1.0 && intensity_identity {
            return self.hflip as u64;
        }
        let mut h = blake3::Hasher::new();
        h.update(&[self.hflip as u8]);
        h.update(&self.rotation_deg.to_le_bytes());
        h.update(&self.scale.to_le_bytes());
        if !intensity_identity {
            // Only then, so that geometric variants keep the ids they had before
            // intensity augmentation existed.
            h.update(&self.contrast.to_le_bytes());
            h.update(&self.brightness.to_le_bytes());
            h.update(&self.gamma.to_le_bytes());
        }
        let b = h.finalize();
        let mut x = [0u8; 8];
        x.copy_from_slice(&b.as_bytes()[..8]);
        u64::from_le_bytes(x) | (1 << 63)
    }

    /// Whether a [`Self::variant`] id is one of the discrete, cacheable variants
    /// (identity or flip) rather than a continuous one (any rotation, scaling or
    /// intensity change), which
    /// almost never repeats and so is not worth caching.
    pub fn is_discrete_variant(variant: u64) -> bool {
        variant >> 63 == 0
    }
}

/// Output-normalised -> source-normalised coordinate map (centred coordinates).
struct Warp {
    m: [f64; 4],
    flip: bool,
}

impl Warp {
    fn new(a: &AugmentParams) -> Self {
        let t = (a.rotation_deg as f64).to_radians();
        let s = a.scale.max(1e-3) as f64;
        // Inverse of (scale * rotation): rotate by -t, divide by s.
        let (c, sn) = (t.cos(), t.sin());
        Self {
            m: [c / s, sn / s, -sn / s, c / s],
            flip: a.hflip,
        }
    }
    /// Maps output pixel centre (u, v) of an `so` grid to continuous source coordinates
    /// (in pixels, pixel centres at integer + 0.5) of a `w` x `h` image.
    #[inline]
    fn map(&self, u: usize, v: usize, so: usize, w: usize, h: usize) -> (f64, f64) {
        let mut x = (u as f64 + 0.5) / so as f64 - 0.5;
        let y = (v as f64 + 0.5) / so as f64 - 0.5;
        if self.flip {
            x = -x;
        }
        let xs = self.m[0] * x + self.m[1] * y;
        let ys = self.m[2] * x + self.m[3] * y;
        ((xs + 0.5) * w as f64, (ys + 0.5) * h as f64)
    }
}

fn resample_image(
    img: &crate::ImageF32,
    so: usize,
    warp: &Warp,
    norm: impl Fn(usize, f32) -> f32,
) -> Vec<f32> {
    let (h, w) = (img.height, img.width);
    let mut out = vec![0f32; 3 * so * so];
    if warp.m[1] == 0.0 && warp.m[2] == 0.0 {
        // Axis-aligned (no rotation): x depends on the column only and y on the row only,
        // so the taps are computed once per column/row (the common case, several times
        // faster). Same arithmetic as the general path below.
        let taps = |n_out: usize, n_in: usize, axis: usize| -> Vec<(usize, usize, f32, bool)> {
            (0..n_out)
                .map(|i| {
                    let (xs, ys) = if axis == 0 {
                        warp.map(i, 0, so, n_in, h)
                    } else {
                        warp.map(0, i, so, w, n_in)
                    };
                    let s = if axis == 0 { xs } else { ys };
                    let x = s - 0.5;
                    let x0 = x.floor();
                    let f = (x - x0) as f32;
                    let x0 = x0 as i64;
                    let c0 = x0.clamp(0, n_in as i64 - 1) as usize;
                    let c1 = (x0 + 1).clamp(0, n_in as i64 - 1) as usize;
                    (c0, c1, f, s >= 0.0 && s <= n_in as f64)
                })
                .collect()
        };
        let tx = taps(so, w, 0);
        let ty = taps(so, h, 1);
        let n_ch = if img.channels == 1 { 1 } else { 3 };
        let mut plane = vec![0f32; so * so];
        for c in 0..n_ch {
            let ch = img.channel(c.min(img.channels - 1));
            for (v, &(y0, y1, fy, iny)) in ty.iter().enumerate() {
                let (r0, r1) = (&ch[y0 * w..(y0 + 1) * w], &ch[y1 * w..(y1 + 1) * w]);
                let row = &mut plane[v * so..(v + 1) * so];
                for (o, &(x0, x1, fx, inx)) in row.iter_mut().zip(&tx) {
                    *o = if iny && inx {
                        let a = r0[x0] * (1.0 - fx) + r0[x1] * fx;
                        let b = r1[x0] * (1.0 - fx) + r1[x1] * fx;
                        a * (1.0 - fy) + b * fy
                    } else {
                        0.0
                    };
                }
            }
            // Grey: one interpolation, repeated to 3 channels.
            let targets = if n_ch == 1 { 0..3 } else { c..c + 1 };
            for t in targets {
                for (o, &p) in out[t * so * so..(t + 1) * so * so].iter_mut().zip(&plane) {
                    *o = norm(t, p);
                }
            }
        }
        return out;
    }
    for v in 0..so {
        for u in 0..so {
            let (xs, ys) = warp.map(u, v, so, w, h);
            // Bilinear with half-pixel centres; zero outside.
            let x = xs - 0.5;
            let y = ys - 0.5;
            let x0 = x.floor();
            let y0 = y.floor();
            let fx = (x - x0) as f32;
            let fy = (y - y0) as f32;
            let (x0, y0) = (x0 as i64, y0 as i64);
            let inside = xs >= 0.0 && ys >= 0.0 && xs <= w as f64 && ys <= h as f64;
            // Neighbours clamped to the border inside the image (no dark fringe).
            let cx0 = x0.clamp(0, w as i64 - 1) as usize;
            let cx1 = (x0 + 1).clamp(0, w as i64 - 1) as usize;
            let cy0 = y0.clamp(0, h as i64 - 1) as usize;
            let cy1 = (y0 + 1).clamp(0, h as i64 - 1) as usize;
            let sample = |ch: &[f32]| {
                if !inside {
                    return 0.0;
                }
                let a = ch[cy0 * w + cx0] * (1.0 - fx) + ch[cy0 * w + cx1] * fx;
                let b = ch[cy1 * w + cx0] * (1.0 - fx) + ch[cy1 * w + cx1] * fx;
                a * (1.0 - fy) + b * fy
            };
            let o = v * so + u;
            if img.channels == 1 {
                // Grey: one interpolation, repeated to 3 channels.
                let val = sample(img.channel(0));
                for c in 0..3 {
                    out[c * so * so + o] = norm(c, val);
                }
            } else {
                for c in 0..3 {
                    out[c * so * so + o] = norm(c, sample(img.channel(c.min(img.channels - 1))));
                }
            }
        }
    }
    out
}

fn resample_mask(mask: &crate::Mask, so: usize, warp: &Warp) -> Vec<f32> {
    let (h, w) = (mask.height, mask.width);
    let mut out = vec![0f32; so * so];
    for v in 0..so {
        for u in 0..so {
            let (xs, ys) = warp.map(u, v, so, w, h);
            if xs >= 0.0 && ys >= 0.0 && xs < w as f64 && ys < h as f64 {
                out[v * so + u] = mask.data[ys as usize * w + xs as usize] as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ImageF32, Mask};

    fn sample() -> Sample {
        // 2x4 grey image with distinct values; mask marks the left column.
        let data: Vec<f32> = (0..8).map(|v| v as f32 / 8.0).collect();
        let mut m = Mask::zeros(2, 4);
        m.data[0] = 1;
        m.data[4] = 1;
        Sample {
            id: "t".into(),
            image: ImageF32::grey(2, 4, data).unwrap(),
            mask: m,
            caption: "upper Left lung, bilateral".into(),
            aux_caption: None,
        }
    }

    #[test]
    fn identity_at_same_size_and_flip() {
        let s = sample();
        let p = Preprocess {
            clip_size: 4,
            cnn_size: 4,
            label_size: 4,
        };
        // Non-square source to a square grid is a plain resample; use the mask columns.
        let out = p.apply(&s, &AugmentParams::default());
        // Nearest label: columns map 1:1 (4 -> 4), rows 2 -> 4 duplicate.
        assert_eq!(&out.mask[..4], &[1.0, 0.0, 0.0, 0.0]);
        let f = p.apply(
            &s,
            &AugmentParams {
                hflip: true,
                ..Default::default()
            },
        );
        assert_eq!(&f.mask[..4], &[0.0, 0.0, 0.0, 1.0]);
        assert_eq!(f.caption, "upper Right lung, bilateral");
        assert_eq!(f.aux_caption, f.caption);
        assert_eq!(f.variant, 1);
        assert_eq!(out.variant, 0);
        // CNN channel 0 at (row 0, col 0): bilinear at x = 0.5 px, y = 0.25 px of the
        // source, i.e. source pixel centres (0,0) and y clamped -> value 0 -> -1.
        assert!((out.cnn[0] - (-1.0)).abs() < 1e-6);
        // Grey repeated to 3 channels before normalisation.
        let v = out.clip[5] * CLIP_STD[0] + CLIP_MEAN[0];
        let v2 = out.clip[16 + 5] * CLIP_STD[1] + CLIP_MEAN[1];
        assert!((v - v2).abs() < 1e-6);
    }
}
