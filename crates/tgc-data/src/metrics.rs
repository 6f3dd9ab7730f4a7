//! Segmentation metrics.
//!
//! Conventions (LViT, followed by RecLMIS and the papers TGC-Net compares with):
//! - binarisation: prediction `p > threshold` (0.5 on probabilities, 0 on logits);
//!   target `t > 0.5`;
//! - per image ("macro", the numbers of the paper's tables):
//!   Dice = 2|P∩G| / (|P| + |G| + 1e-5), IoU = |P∩G| / |P∪G|, averaged over images.
//!   When both P and G are empty, Dice is 0 by the formula, and IoU is defined as 0 too
//!   (as scikit-learn's `jaccard_score`, which LViT calls, returns with its default
//!   `zero_division`), so both metrics treat that case alike;
//! - pixel-pooled ("micro", as Ariadne's Thread reports): Dice = 2ΣI / (ΣP + ΣG + 1e-5),
//!   IoU = ΣI / ΣU (0 when ΣU = 0), sums over all pixels of all images;
//! - volumes: per volume and organ 3D Dice = 2|P∩G| / (|P| + |G|); an organ absent from
//!   both prediction and ground truth of a volume is skipped (not counted), an organ
//!   absent from one of them scores 0. The summary gives the mean over volumes per organ
//!   and the mean of those per-organ means.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Accumulates segmentation metrics over batches and volumes.
#[derive(Debug, Clone)]
pub struct SegMetrics {
    threshold: f32,
    dice_sum: f64,
    iou_sum: f64,
    n_images: usize,
    inter: u64,
    pred: u64,
    gt: u64,
    union: u64,
    organs: BTreeMap<String, Vec<f64>>,
}

/// The result of [`SegMetrics::summary`]; all values in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSummary {
    /// Mean per-image Dice (LViT convention).
    pub dice: f64,
    /// Mean per-image IoU (LViT convention, "mIoU" in the papers).
    pub iou: f64,
    /// Pixel-pooled Dice.
    pub micro_dice: f64,
    /// Pixel-pooled IoU.
    pub micro_iou: f64,
    /// Number of images scored.
    pub n_images: usize,
    /// Mean 3D Dice per organ over volumes (only organs seen in `update_volume`).
    pub organ_dice: BTreeMap<String, f64>,
    /// Mean of `organ_dice` (None without volumes).
    pub mean_organ_dice: Option<f64>,
}

impl std::fmt::Display for MetricsSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dice {:.2} mIoU {:.2} (per image, n={}); micro Dice {:.2} IoU {:.2}",
            100.0 * self.dice,
            100.0 * self.iou,
            self.n_images,
            100.0 * self.micro_dice,
            100.0 * self.micro_iou
        )?;
        if let Some(m) = self.mean_organ_dice {
            write!(f, "; 3D Dice mean {:.2}", 100.0 * m)?;
            for (k, v) in &self.organ_dice {
                write!(f, " {k} {:.2}", 100.0 * v)?;
            }
        }
        Ok(())
    }
}

impl Default for SegMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SegMetrics {
    /// For probabilities (threshold 0.5).
    pub fn new() -> Self {
        Self::with_threshold(0.5)
    }

    /// For logits (threshold 0).
    pub fn for_logits() -> Self {
        Self::with_threshold(0.0)
    }

    /// With an explicit threshold (`pred > threshold` is foreground).
    pub fn with_threshold(threshold: f32) -> Self {
        Self {
            threshold,
            dice_sum: 0.0,
            iou_sum: 0.0,
            n_images: 0,
            inter: 0,
            pred: 0,
            gt: 0,
            union: 0,
            organs: BTreeMap::new(),
        }
    }

    /// Adds a batch. `pred_probs` and `target` have the same shape, B x ... (e.g.
    /// B x 1 x H x W or B x K x H x W); every index of the first dimension is one image
    /// (use B*K x H x W to score prompts separately).
    pub fn update(&mut self, pred_probs: &Tensor, target: &Tensor) -> Result<()> {
        let (p, t, b) = flat_batch("SegMetrics::update", pred_probs, target)?;
        self.update_slices(&p, &t, b)
    }

    /// Adds `n_images` images stored back to back in `pred` and `target`.
    pub fn update_slices(&mut self, pred: &[f32], target: &[f32], n_images: usize) -> Result<()> {
        if pred.len() != target.len() || n_images == 0 || !pred.len().is_multiple_of(n_images) {
            return Err(Error::Msg(format!(
                "SegMetrics: {} predictions, {} targets, {n_images} images",
                pred.len(),
                target.len()
            )));
        }
        let per = pred.len() / n_images;
        for (p, t) in pred.chunks(per).zip(target.chunks(per)) {
            let (mut i, mut np, mut ng) = (0u64, 0u64, 0u64);
            for (&a, &b) in p.iter().zip(t) {
                let a = a > self.threshold;
                let b = b > 0.5;
                i += (a && b) as u64;
                np += a as u64;
                ng += b as u64;
            }
            let u = np + ng - i;
            self.dice_sum += 2.0 * i as f64 / (np as f64 + ng as f64 + 1e-5);
            self.iou_sum += if u == 0 { 0.0 } else { i as f64 / u as f64 };
            self.n_images += 1;
            self.inter += i;
            self.pred += np;
            self.gt += ng;
            self.union += u;
        }
        Ok(())
    }

    /// Adds one volume's binary prediction and ground truth of one organ (same length,
    /// any order as long as it is the same). Returns the volume's Dice, or None when the
    /// organ is absent from both (then nothing is recorded).
    pub fn update_volume(
        &mut self,
        organ: &str,
        pred: &[bool],
        target: &[bool],
    ) -> Result<Option<f64>> {
        if pred.len() != target.len() {
            return Err(Error::Msg(format!(
                "SegMetrics::update_volume({organ}): {} predicted voxels, {} target voxels",
                pred.len(),
                target.len()
            )));
        }
        let d = dice_3d(pred, target);
        if let Some(d) = d {
            self.organs.entry(organ.to_string()).or_default().push(d);
        }
        Ok(d)
    }

    /// Adds a predicted and a ground-truth label map of one volume for each `(label id,
    /// organ name)`.
    pub fn update_label_volume(
        &mut self,
        pred: &[u8],
        target: &[u8],
        organs: &[(u8, String)],
    ) -> Result<()> {
        for (id, name) in organs {
            let p: Vec<bool> = pred.iter().map(|&v| v == *id).collect();
            let t: Vec<bool> = target.iter().map(|&v| v == *id).collect();
            self.update_volume(name, &p, &t)?;
        }
        Ok(())
    }

    /// The metrics so far (zeros before any update).
    pub fn summary(&self) -> MetricsSummary {
        let n = self.n_images.max(1) as f64;
        let organ_dice: BTreeMap<String, f64> = self
            .organs
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().sum::<f64>() / v.len() as f64))
            .collect();
        let mean_organ_dice = if organ_dice.is_empty() {
            None
        } else {
            Some(organ_dice.values().sum::<f64>() / organ_dice.len() as f64)
        };
        MetricsSummary {
            dice: self.dice_sum / n,
            iou: self.iou_sum / n,
            micro_dice: 2.0 * self.inter as f64 / (self.pred as f64 + self.gt as f64 + 1e-5),
            micro_iou: if self.union == 0 {
                0.0
            } else {
                self.inter as f64 / self.union as f64
            },
            n_images: self.n_images,
            organ_dice,
            mean_organ_dice,
        }
    }
}

/// The share of a target image's pixels that are foreground (`t > 0.5`).
fn foreground_share(t: &[f32]) -> f64 {
    t.iter().filter(|&&v| v > 0.5).count() as f64 / t.len() as f64
}

/// A batch of predictions and targets of one shape `B x ...` as flat f32 vectors and `B`.
fn flat_batch(who: &str, pred: &Tensor, target: &Tensor) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    if pred.dims() != target.dims() || pred.rank() == 0 || pred.dims()[0] == 0 {
        return Err(Error::Msg(format!(
            "{who}: prediction shape {:?} != target shape {:?}, or an empty batch",
            pred.dims(),
            target.dims()
        )));
    }
    let flat = |x: &Tensor| x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    Ok((flat(pred)?, flat(target)?, pred.dims()[0]))
}

/// 3D Dice 2|P∩G|/(|P|+|G|); None when both are empty.
pub fn dice_3d(pred: &[bool], target: &[bool]) -> Option<f64> {
    let (mut i, mut s) = (0u64, 0u64);
    for (&a, &b) in pred.iter().zip(target) {
        i += (a && b) as u64;
        s += a as u64 + b as u64;
    }
    if s == 0 {
        None
    } else {
        Some(2.0 * i as f64 / s as f64)
    }
}

/// The default group edges of [`LesionSizeBreakdown`]: the target's share of the image
/// under 2%, 2-5%, 5-10%, 10-20% and over 20%.
pub const LESION_SHARE_EDGES: [f64; 4] = [0.02, 0.05, 0.10, 0.20];

/// Per-image metrics grouped by the size of the target: its foreground share of the
/// image (pixels with `t > 0.5` over all pixels).
///
/// Small lesions are where text-guided segmenters lose most of their Dice (a one-pixel
/// border error costs a 2% lesion far more than a 20% one), so a single mean hides the
/// part of the data a model is worst at. Each group is a [`SegMetrics`] with the same
/// threshold, so the groups' image-weighted mean Dice is the overall Dice.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use tgc_data::LesionSizeBreakdown;
///
/// // Two 10x10 images: a 1-pixel lesion found exactly, a 30-pixel lesion missed.
/// let mut target = vec![0f32; 200];
/// target[0] = 1.0;
/// target[100..130].fill(1.0);
/// let mut pred = vec![0f32; 200];
/// pred[0] = 1.0;
/// let dev = Device::Cpu;
/// let mut by_size = LesionSizeBreakdown::new(0.5);
/// by_size.update(
///     &Tensor::from_vec(pred, (2, 1, 10, 10), &dev)?,
///     &Tensor::from_vec(target, (2, 1, 10, 10), &dev)?,
/// )?;
/// let groups = by_size.groups(); // "empty" first
/// assert_eq!(groups[1].label, "under 2%");
/// assert_eq!(groups[1].summary.n_images, 1);
/// assert!(groups[1].summary.dice > 0.99);
/// assert_eq!(groups[5].label, "over 20%");
/// assert_eq!(groups[5].summary.dice, 0.0);
/// // Half the images are lost entirely: half of the Dice is missing, all in that group.
/// assert!((groups[5].dice_lost - 0.5).abs() < 1e-12);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct LesionSizeBreakdown {
    edges: Vec<f64>,
    /// `edges.len() + 2` groups: "empty", then one per interval.
    groups: Vec<SegMetrics>,
}

/// One group of a [`LesionSizeBreakdown`].
#[derive(Debug, Clone, PartialEq)]
pub struct LesionSizeGroup {
    /// "empty", "under 2%", "2-5%", ..., "over 20%".
    pub label: String,
    /// The group's metrics (`n_images` 0 when no image fell in it).
    pub summary: MetricsSummary,
    /// The group's share of the Dice missing from 1 over all images:
    /// `n_group / n_all * (1 - dice_group)`. The groups' values add up to `1 - dice`.
    pub dice_lost: f64,
}

impl LesionSizeBreakdown {
    /// With the default edges ([`LESION_SHARE_EDGES`]).
    pub fn new(threshold: f32) -> Self {
        Self::with_edges(threshold, &LESION_SHARE_EDGES).expect("the default edges are valid")
    }

    /// With explicit group edges: strictly increasing shares in (0, 1). An image whose
    /// share equals an edge goes to the group above it.
    pub fn with_edges(threshold: f32, edges: &[f64]) -> Result<Self> {
        let increasing = edges.windows(2).all(|w| w[0] < w[1]);
        if edges.is_empty() || !increasing || edges[0] <= 0.0 || edges[edges.len() - 1] >= 1.0 {
            return Err(Error::Msg(format!(
                "LesionSizeBreakdown: edges {edges:?} must be strictly increasing shares in (0, 1)"
            )));
        }
        Ok(Self {
            edges: edges.to_vec(),
            groups: vec![SegMetrics::with_threshold(threshold); edges.len() + 2],
        })
    }

    /// The target's foreground share of each image of `target` (B x ...), as used for
    /// grouping.
    pub fn shares(target: &Tensor) -> Result<Vec<f64>> {
        let (_, t, b) = flat_batch("LesionSizeBreakdown::shares", target, target)?;
        Ok(t.chunks(t.len() / b).map(foreground_share).collect())
    }

    /// Adds a batch, shapes as in [`SegMetrics::update`].
    pub fn update(&mut self, pred_probs: &Tensor, target: &Tensor) -> Result<()> {
        let (p, t, b) = flat_batch("LesionSizeBreakdown::update", pred_probs, target)?;
        let per = p.len() / b;
        for (p, t) in p.chunks(per).zip(t.chunks(per)) {
            let g = self.group_of(foreground_share(t));
            self.groups[g].update_slices(p, t, 1)?;
        }
        Ok(())
    }

    fn group_of(&self, share: f64) -> usize {
        if share == 0.0 {
            0
        } else {
            1 + self.edges.iter().take_while(|&&e| share >= e).count()
        }
    }

    /// Every group, empty ones included, from "empty" to the largest lesions.
    pub fn groups(&self) -> Vec<LesionSizeGroup> {
        let pct = |e: f64| format!("{}", (e * 1000.0).round() / 10.0);
        let n_all: usize = self.groups.iter().map(|g| g.summary().n_images).sum();
        let last = self.edges.len();
        self.groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let label = match i {
                    0 => "empty".to_string(),
                    1 => format!("under {}%", pct(self.edges[0])),
                    i if i == last + 1 => format!("over {}%", pct(self.edges[last - 1])),
                    i => format!("{}-{}%", pct(self.edges[i - 2]), pct(self.edges[i - 1])),
                };
                let summary = g.summary();
                let dice_lost = if n_all == 0 {
                    0.0
                } else {
                    summary.n_images as f64 / n_all as f64 * (1.0 - summary.dice)
                };
                LesionSizeGroup {
                    label,
                    summary,
                    dice_lost,
                }
            })
            .collect()
    }
}
