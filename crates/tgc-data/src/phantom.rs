//! Synthetic phantoms whose captions decide which lesion is the target.
//!
//! Every slice has two lungs and 2 to 4 identical-looking candidate lesions, each in a
//! different (side, zone) cell: side = the patient's left or right lung, zone = the
//! upper, middle or lower third of the lung. A random non-empty proper subset of them is
//! the target; the LViT-style caption names exactly that subset ("unilateral pulmonary
//! infection, one infected area, lower left lung.") and the mask is its union. The
//! other candidates are distractors, so a model that ignores the text cannot do better
//! than guessing.
//!
//! Orientation follows the radiological display convention used by chest X-rays and by
//! the axial CT slices of this crate: the patient's **right** lung is on the **image
//! left**, the patient's left lung on the image right, superior/anterior at the top.
//! For the CT-like kind the "zones" are the top/middle/bottom thirds of the lung in the
//! slice (anterior to posterior), a stand-in for MosMedData+ captions.
//!
//! Sample `i` is generated on the fly from `(seed, i)` alone (SplitMix64 stream), so
//! access is random, cheap (about a millisecond at 224 px) and identical across runs.

use crate::sample::{ImageF32, Mask, Sample, SegDataset, SplitMix64};
use crate::text::{radiology_rewrite, LvitCaption, Zone};
use crate::{Error, Result};

/// The look of the phantoms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhantomKind {
    /// A frontal chest X-ray: bright mediastinum/soft tissue, dark lungs, brighter opacities.
    ChestXray,
    /// An axial lung CT slice (lung window): air outside, body, dark lungs, ground-glass
    /// lesions.
    CtSlice,
}

/// The target and distractors of one phantom (for tests and analysis).
#[derive(Debug, Clone)]
pub struct PhantomDetail {
    /// The sample (image, target mask, caption, rewritten aux caption).
    pub sample: Sample,
    /// One mask per candidate lesion.
    pub candidates: Vec<Mask>,
    /// Which candidates are named by the caption (their union is `sample.mask`).
    pub target: Vec<bool>,
}

/// A deterministic synthetic dataset (see the module docs).
#[derive(Debug, Clone)]
pub struct SyntheticPhantoms {
    kind: PhantomKind,
    n: usize,
    seed: u64,
    size: usize,
    name: String,
}

impl SyntheticPhantoms {
    /// `n` phantoms of `kind`, `size` x `size` pixels (224 is the usual choice), from `seed`.
    pub fn new(kind: PhantomKind, n: usize, seed: u64, size: usize) -> Self {
        let name = match kind {
            PhantomKind::ChestXray => "phantoms-cxr",
            PhantomKind::CtSlice => "phantoms-ct",
        };
        Self {
            kind,
            n,
            seed,
            size: size.max(16),
            name: name.to_string(),
        }
    }

    /// The kind of phantom.
    pub fn kind(&self) -> PhantomKind {
        self.kind
    }

    /// Sample `i` with its candidate lesions.
    pub fn get_detailed(&self, i: usize) -> Result<PhantomDetail> {
        if i >= self.n {
            return Err(Error::Msg(format!("{}: index {i} out of range", self.name)));
        }
        Ok(self.generate(i))
    }

    fn generate(&self, i: usize) -> PhantomDetail {
        let s = self.size;
        let sf = s as f64;
        let mut rng = SplitMix64::stream(self.seed, i as u64);
        let ct = self.kind == PhantomKind::CtSlice;
        let j = |rng: &mut SplitMix64, a: f64| rng.range(-a, a);
        // Anatomy. Lung 0 is on the image left = the patient's right lung.
        let body = (
            0.5 + j(&mut rng, 0.01),
            0.5 + j(&mut rng, 0.01),
            0.46 + j(&mut rng, 0.02),
            if ct { 0.36 } else { 0.5 } + j(&mut rng, 0.02),
        );
        let lung_ay = if ct { 0.24 } else { 0.30 } + j(&mut rng, 0.02);
        let lungs: Vec<(f64, f64, f64, f64)> = (0..2)
            .map(|k| {
                let side = if k == 0 { -1.0 } else { 1.0 };
                (
                    0.5 + side * (0.19 + j(&mut rng, 0.015)),
                    0.5 + j(&mut rng, 0.02),
                    0.13 + j(&mut rng, 0.01),
                    lung_ay + j(&mut rng, 0.01),
                )
            })
            .collect();
        // Candidate cells: (lung index, zone index), distinct.
        let mut cells: Vec<(usize, usize)> =
            (0..2).flat_map(|l| (0..3).map(move |z| (l, z))).collect();
        rng.shuffle(&mut cells);
        let n_cand = 2 + rng.below(3);
        let cells = &cells[..n_cand];
        let n_target = 1 + rng.below(n_cand - 1);
        let mut target = vec![false; n_cand];
        for t in target.iter_mut().take(n_target) {
            *t = true;
        }
        rng.shuffle(&mut target);
        struct Lesion {
            cx: f64,
            cy: f64,
            ax: f64,
            ay: f64,
            rot: f64,
        }
        let lesions: Vec<Lesion> = cells
            .iter()
            .map(|&(l, z)| {
                let (lx, ly, lax, lay) = lungs[l];
                let zone_h = 2.0 * lay / 3.0;
                let r = zone_h * rng.range(0.28, 0.38);
                let cy = ly - lay + zone_h * (z as f64 + 0.5) + j(&mut rng, zone_h * 0.08);
                let cx = lx + j(&mut rng, lax * 0.25);
                Lesion {
                    cx,
                    cy,
                    ax: r * rng.range(0.8, 1.2),
                    ay: r * rng.range(0.8, 1.2),
                    rot: rng.range(0.0, std::f64::consts::PI),
                }
            })
            .collect();
        let inside = |x: f64, y: f64, e: (f64, f64, f64, f64)| {
            let dx = (x - e.0) / e.2;
            let dy = (y - e.1) / e.3;
            dx * dx + dy * dy
        };
        let lesion_d = |x: f64, y: f64, le: &Lesion| {
            let (c, sn) = (le.rot.cos(), le.rot.sin());
            let dx = x - le.cx;
            let dy = y - le.cy;
            let u = (c * dx + sn * dy) / le.ax;
            let v = (-sn * dx + c * dy) / le.ay;
            u * u + v * v
        };
        let (bg, body_v, lung_v, les_amp) = if ct {
            (0.0, 0.55, 0.08, 0.32)
        } else {
            (0.08, 0.62, 0.22, 0.30)
        };
        let mut img = vec![0f32; s * s];
        let mut cands = vec![Mask::zeros(s, s); n_cand];
        for y in 0..s {
            let yn = (y as f64 + 0.5) / sf;
            for x in 0..s {
                let xn = (x as f64 + 0.5) / sf;
                let mut v = bg;
                if inside(xn, yn, body) <= 1.0 {
                    v = body_v;
                    // Soft vertical gradient and a spine-like bright spot for realism.
                    v += 0.05 * (yn - 0.5);
                    if ct && inside(xn, yn, (0.5, 0.5 + body.3 * 0.75, 0.05, 0.05)) <= 1.0 {
                        v = 0.9;
                    }
                }
                for lung in &lungs {
                    let d = inside(xn, yn, *lung);
                    if d <= 1.0 {
                        v = lung_v + 0.04 * d;
                        for (k, le) in lesions.iter().enumerate() {
                            let ld = lesion_d(xn, yn, le);
                            if ld <= 1.0 {
                                v += les_amp * (1.0 - 0.6 * ld);
                                cands[k].data[y * s + x] = 1;
                            }
                        }
                    }
                }
                img[y * s + x] = v as f32;
            }
        }
        for v in img.iter_mut() {
            *v = (*v + 0.03 * rng.normal() as f32).clamp(0.0, 1.0);
        }
        let mut mask = Mask::zeros(s, s);
        for (k, c) in cands.iter().enumerate() {
            if target[k] {
                for (m, &v) in mask.data.iter_mut().zip(&c.data) {
                    *m |= v;
                }
            }
        }
        let mut cap = LvitCaption {
            areas: n_target,
            ..Default::default()
        };
        for (k, &(l, z)) in cells.iter().enumerate() {
            if target[k] {
                // Lung 0 (image left) is the patient's right lung.
                if l == 0 {
                    cap.right.push(Zone::ALL[z]);
                } else {
                    cap.left.push(Zone::ALL[z]);
                }
            }
        }
        let caption = cap.to_caption();
        let modality = if ct { "Chest CT" } else { "Chest X-ray" };
        let sample = Sample {
            id: format!("{}-{}-{i:06}", self.name, self.seed),
            image: ImageF32 {
                channels: 1,
                height: s,
                width: s,
                data: img,
            },
            mask,
            aux_caption: Some(radiology_rewrite(&caption, modality)),
            caption,
        };
        PhantomDetail {
            sample,
            candidates: cands,
            target,
        }
    }
}

impl SegDataset for SyntheticPhantoms {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.n
    }
    fn get(&self, i: usize) -> Result<Sample> {
        Ok(self.get_detailed(i)?.sample)
    }
}
