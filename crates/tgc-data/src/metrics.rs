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
        if pred_probs.dims() != target.dims() || pred_probs.rank() == 0 {
            return Err(Error::Msg(format!(
                "SegMetrics::update: prediction shape {:?} != target shape {:?}",
                pred_probs.dims(),
                target.dims()
            )));
        }
        let b = pred_probs.dims()[0];
        let p = pred_probs
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let t = target
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
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
