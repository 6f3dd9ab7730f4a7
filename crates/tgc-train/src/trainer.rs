//! The training and evaluation loops of TGC-Net: [`Trainer`], [`evaluate`].
//!
//! The frozen towers' outputs are computed once per (image, augmentation variant) and per
//! prompt and kept in a [`FeatureStore`] (in memory, plus an on-disk
//! [`tgc_data::FeatureCache`] for images when a cache folder is given); every step then
//! runs only the trainable modules. Random rotations and zooms
//! ([`TrainConfig::max_rotation_deg`], [`TrainConfig::scale_range`]) and random
//! contrast, brightness and gamma ([`TrainConfig::contrast_range`],
//! [`TrainConfig::max_brightness`], [`TrainConfig::gamma_range`]) give continuous
//! variants that never repeat: those are computed on every step and never stored.
//!
//! When the model fine-tunes CLIP's vision tower (`TgcConfig::clip_finetune` not
//! `frozen`), image features change with every update: the store then never caches or
//! reads image features (in memory or on disk), and every step feeds the raw CLIP images
//! through the model ([`TgcNet::forward_images`]) so the gradients reach the tower.
//! Prompt features are still cached (the text tower stays frozen). [`Trainer::new`]
//! logs which path it takes ([`Trainer::image_features`]).
//!
//! Checkpoints hold the trainable weights, the AdamW
//! moments, the step, the epoch and the early-stopping state, so a resumed run continues
//! bit for bit (dropout off, as in the `cpu` and `tiny` presets).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tgc_data::{
    Augment, AugmentParams, Batch, DataLoader, FeatureCache, MetricsSummary, Preprocess,
    SegDataset, SegMetrics,
};
use tgc_model::{ImageFeatures, PromptFeatures, TgcNet};

use crate::checkpoint::{self, META_BEST_METRIC, META_CONFIG, META_EPOCH, META_STEP};
use crate::{
    dice_bce, AdamW, AdamWConfig, EarlyStopping, Error, MetricsWriter, Result, Verdict,
    WarmupCosine, WeightEma, RAW_WEIGHT_PREFIX,
};

/// Metadata key of the step total planned from a time budget
/// ([`TrainConfig::time_budget_secs`]); absent when no plan was made.
pub const META_PLANNED_STEPS: &str = "tgc.planned_steps";
/// Metadata key of the warm-up length of that plan.
pub const META_PLANNED_WARMUP: &str = "tgc.planned_warmup";
/// Metadata key of the position inside the current epoch (batches done).
pub const META_BATCH_IN_EPOCH: &str = "tgc.batch_in_epoch";
/// Metadata key of the early-stopping state (JSON).
pub const META_EARLY_STOP: &str = "tgc.early_stop";
/// Metadata key of the model config (JSON), as `tgc_model` reads it.
pub const META_MODEL_CONFIG: &str = tgc_model::CONFIG_METADATA_KEY;

/// Hyper-parameters of a training run. `Default` is the paper's recipe with the QaTa
/// learning rate; see [`TrainConfig::for_dataset`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Epochs to train (an upper bound with early stopping).
    pub epochs: usize,
    /// Stop after this many optimiser steps in total (an interruption: the schedule is
    /// still planned over `epochs`, so a resumed run continues it exactly).
    pub max_steps: Option<u64>,
    /// Plan the warm-up + cosine schedule over this many steps instead of
    /// `epochs x batches per epoch` (None). Set it with `max_steps` for a run with a
    /// fixed step budget (e.g. a time budget), so the learning rate reaches its peak and
    /// decays within the budget.
    pub schedule_steps: Option<u64>,
    /// Images per batch (8).
    pub batch_size: usize,
    /// Peak learning rate (2e-5 QaTa-COV19, 5e-4 MosMedData+, 2e-4 abdominal CT).
    pub lr: f64,
    /// AdamW weight decay (1e-4).
    pub weight_decay: f64,
    /// Fraction of the total steps spent in linear warm-up (0.05).
    pub warmup_frac: f64,
    /// Final learning rate as a fraction of `lr` (0.01).
    pub min_lr_frac: f64,
    /// Global gradient-norm clip (1.0; 0 disables).
    pub grad_clip: f64,
    /// Weight of BCE in the loss (0.5); Dice gets `1 - bce_weight`.
    pub bce_weight: f64,
    /// Seed of the data order, augmentation and initialisation.
    pub seed: u64,
    /// Early-stopping patience in epochs (0 disables).
    pub patience: u32,
    /// Horizontal flips (with left/right swapped in the prompts); cacheable.
    pub flip: bool,
    /// Random rotation of every training sample, drawn uniformly in
    /// `[-max_rotation_deg, max_rotation_deg]` degrees (0: off). Rotated and scaled
    /// samples are continuous variants: their frozen features are computed every step and
    /// never cached (the identity and flipped variants still are), so on a preset with
    /// an expensive CLIP this costs the tower's forward pass per image.
    pub max_rotation_deg: f32,
    /// Random isotropic zoom of every training sample, drawn uniformly in `[lo, hi]`
    /// (`[1, 1]`: off; > 1 enlarges the content). Not cacheable, as for rotations.
    pub scale_range: (f32, f32),
    /// Random contrast of every training image about mid-grey, drawn uniformly in
    /// `[lo, hi]` (`[1, 1]`: off). Contrast, brightness and gamma change the image and
    /// not the mask ([`tgc_data::AugmentParams::intensity`]); like rotations, they make
    /// every sample a continuous variant whose frozen features are computed every step.
    pub contrast_range: (f32, f32),
    /// Random brightness shift of every training image, drawn uniformly in
    /// `[-max_brightness, max_brightness]` in units of the [0, 1] intensity range (0: off).
    pub max_brightness: f32,
    /// Random gamma of every training image, drawn log-uniformly in `[lo, hi]`
    /// (`[1, 1]`: off).
    pub gamma_range: (f32, f32),
    /// Folder of the on-disk image feature cache (none: memory only).
    pub cache_dir: Option<PathBuf>,
    /// Keep frozen features in memory between epochs (false: recompute every step, the
    /// "without cache" timing).
    pub use_cache: bool,
    /// Validation images written as overlays each epoch.
    pub overlays: usize,
    /// Show progress bars.
    pub progress: bool,
    /// Split every training batch into this many parts whose forward and backward
    /// passes run on their own threads, their gradients summed (1: off). Candle runs
    /// much of a small model's step on the calling thread (element-wise ops), so one
    /// step uses about 1.25 of two cores; two parts use both. The gradients equal the
    /// unsplit batch's up to floating-point rounding, and resuming stays bit-exact for
    /// the same setting.
    pub data_parallel: usize,
    /// Split every training batch into this many micro-batches whose forward and
    /// backward passes run one after another, their gradients summed before the one
    /// optimiser step (1: off): gradient accumulation, for a batch whose activations do
    /// not fit the device at once (the `paper` preset needs about 3.7 GiB per image,
    /// docs/reproducing.md). Each micro-batch is split again by `data_parallel`. The
    /// gradients equal the whole batch's up to floating-point rounding.
    pub micro_batches: usize,
    /// Fit the run into this many seconds of [`Trainer::fit`] (None). After every whole
    /// epoch the trainer measures its average seconds per step and per validation so far
    /// and re-plans: `max_steps` and the cosine schedule's length become the most steps
    /// whose training and validations end within the budget less 3% (never more than
    /// `epochs` allow; a warm-up still running is shortened to `warmup_frac` of the new
    /// total, never below the steps taken). `max_steps` / `schedule_steps` set here are
    /// the plan for the first epoch only. The plan goes into the checkpoints, so a
    /// resumed run keeps it (and does not re-plan). A time-planned run depends on the
    /// machine's speed, so two runs need not take the same number of steps.
    pub time_budget_secs: Option<f64>,
    /// Decay of an exponential moving average of the trainable weights ([`WeightEma`];
    /// 0: off, the default). When on, validation, `best.safetensors` and the model
    /// tensors of `last.safetensors` are the averaged weights; the raw ones are kept
    /// under `train.<name>` for resuming. 0.999 averages over roughly the last thousand
    /// steps.
    pub ema_decay: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            max_steps: None,
            schedule_steps: None,
            batch_size: 8,
            lr: 2e-5,
            weight_decay: 1e-4,
            warmup_frac: 0.05,
            min_lr_frac: 0.01,
            grad_clip: 1.0,
            bce_weight: 0.5,
            seed: 42,
            patience: 10,
            flip: true,
            max_rotation_deg: 0.0,
            scale_range: (1.0, 1.0),
            contrast_range: (1.0, 1.0),
            max_brightness: 0.0,
            gamma_range: (1.0, 1.0),
            cache_dir: None,
            use_cache: true,
            overlays: 4,
            progress: true,
            data_parallel: 1,
            micro_batches: 1,
            time_budget_secs: None,
            ema_decay: 0.0,
        }
    }
}

impl TrainConfig {
    /// The training augmentation these settings describe, checked: rotation finite and
    /// non-negative, brightness finite in `[0, 1)`, and for the scale, contrast and gamma
    /// ranges `0 < lo <= hi`, finite.
    pub fn augment(&self) -> Result<Augment> {
        if !(self.max_rotation_deg.is_finite() && self.max_rotation_deg >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "max_rotation_deg must be a finite number >= 0, got {}",
                self.max_rotation_deg
            )));
        }
        if !(self.max_brightness.is_finite() && (0.0..1.0).contains(&self.max_brightness)) {
            return Err(Error::InvalidArgument(format!(
                "max_brightness must be a finite number in [0, 1), got {}",
                self.max_brightness
            )));
        }
        for (name, (lo, hi)) in [
            ("scale_range", self.scale_range),
            ("contrast_range", self.contrast_range),
            ("gamma_range", self.gamma_range),
        ] {
            if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
                return Err(Error::InvalidArgument(format!(
                    "{name} must satisfy 0 < lo <= hi, got ({lo}, {hi})"
                )));
            }
        }
        let on = |(lo, hi): (f32, f32)| (lo, hi) != (1.0, 1.0);
        let varied = self.max_rotation_deg > 0.0
            || on(self.scale_range)
            || on(self.contrast_range)
            || on(self.gamma_range)
            || self.max_brightness > 0.0;
        Ok(Augment {
            enabled: self.flip || varied,
            hflip_prob: if self.flip { 0.5 } else { 0.0 },
            max_rotation_deg: self.max_rotation_deg,
            scale_range: self.scale_range,
            contrast_range: self.contrast_range,
            max_brightness: self.max_brightness,
            gamma_range: self.gamma_range,
        })
    }

    /// The main job's recipe on synthetic phantoms (`examples/train_mosmed.rs` without
    /// `--data`): 10 epochs at lr 1e-3, no early stopping, batches split over
    /// [`crate::default_data_parallel`] threads. At lr 3e-3 about half of the
    /// initialisations never left the "segment every lesion" plateau (docs/results.md,
    /// "The main job had stopped reading the text").
    ///
    /// ```
    /// let tc = tgc_train::TrainConfig::for_phantoms();
    /// assert_eq!((tc.epochs, tc.lr, tc.patience), (10, 1e-3, 0));
    /// ```
    pub fn for_phantoms() -> Self {
        Self {
            epochs: 10,
            lr: 1e-3,
            patience: 0,
            data_parallel: crate::default_data_parallel(),
            ..Self::default()
        }
    }

    /// The paper's learning rate for a dataset: `qata` 2e-5, `mosmed` 5e-4, `ct` 2e-4.
    pub fn for_dataset(name: &str) -> Self {
        let lr = match name {
            "mosmed" | "mosmeddata+" => 5e-4,
            "ct" | "abdomen" | "msd" | "word" | "abdomenct1k" => 2e-4,
            _ => 2e-5,
        };
        Self {
            lr,
            ..Self::default()
        }
    }
}

/// Frozen features computed once and reused: images by (content hash, variant), prompts
/// by text.
pub struct FeatureStore {
    images: HashMap<([u8; 32], u64), ImageFeatures>,
    prompts: HashMap<String, PromptFeatures>,
    disk: Option<FeatureCache>,
    pending: Vec<(tgc_data::CacheKey, Vec<(String, Tensor)>)>,
    preprocess_id: String,
    keep: bool,
}

impl FeatureStore {
    /// A store; `disk` adds a persistent image cache, `keep` = false disables reuse.
    pub fn new(disk: Option<FeatureCache>, preprocess: &Preprocess, keep: bool) -> Self {
        Self {
            images: HashMap::new(),
            prompts: HashMap::new(),
            disk,
            pending: Vec::new(),
            preprocess_id: preprocess.id(),
            keep,
        }
    }

    /// Image features of a batch, computing the missing ones with the model's towers.
    pub fn images(&mut self, model: &TgcNet, batch: &Batch) -> Result<ImageFeatures> {
        let n = batch.len();
        let mut out: Vec<Option<ImageFeatures>> = vec![None; n];
        let mut missing = vec![];
        let mut transient: Vec<u32> = vec![];
        for (i, slot) in out.iter_mut().enumerate() {
            // Rotated or scaled samples never repeat: computed, used once, not stored.
            if !AugmentParams::is_discrete_variant(batch.variants[i]) {
                transient.push(i as u32);
                continue;
            }
            let key = (batch.image_hashes[i], batch.variants[i]);
            if let Some(f) = self.images.get(&key) {
                *slot = Some(f.clone());
                continue;
            }
            if let Some(disk) = &self.disk {
                let k = disk.key_for_image(
                    &batch.image_hashes[i],
                    &self.preprocess_id,
                    batch.variants[i],
                );
                if let Some(t) = disk.get(&k)? {
                    let (Some(p), Some(d)) = (t.get("patch"), t.get("dense")) else {
                        return Err(Error::InvalidArgument(format!(
                            "feature cache {} has an entry without patch/dense tensors",
                            disk.dir().display()
                        )));
                    };
                    *slot = Some(ImageFeatures {
                        patch_tokens: p.unsqueeze(0)?.to_device(model.device())?,
                        dense_embeds: d.unsqueeze(0)?.to_device(model.device())?,
                    });
                    continue;
                }
            }
            missing.push(i);
        }
        // One image at a time: the towers' arithmetic then never depends on which other
        // images share a batch, so cached and fresh features are bit-identical (exact
        // resume relies on it).
        for &i in &missing {
            let img = batch.clip_images.narrow(0, i, 1)?;
            let mut one = model.towers().encode_images(&img).map_err(model_err)?;
            if let Some(disk) = &self.disk {
                // The disk cache stores f16: use the rounded values from the start, so an
                // epoch that reads the cache sees exactly what the first one computed.
                let round = |t: &Tensor| t.to_dtype(DType::F16)?.to_dtype(DType::F32);
                one = ImageFeatures {
                    patch_tokens: round(&one.patch_tokens)?,
                    dense_embeds: round(&one.dense_embeds)?,
                };
                let k = disk.key_for_image(
                    &batch.image_hashes[i],
                    &self.preprocess_id,
                    batch.variants[i],
                );
                self.pending.push((
                    k,
                    vec![
                        ("patch".into(), one.patch_tokens.squeeze(0)?),
                        ("dense".into(), one.dense_embeds.squeeze(0)?),
                    ],
                ));
            } else if self.keep {
                self.images
                    .insert((batch.image_hashes[i], batch.variants[i]), one.clone());
            }
            out[i] = Some(one);
        }
        // Never cached, so they need not match a single-image pass: one batched pass
        // saves the per-call overhead of a small tower (about 5% of a `tiny`-family step
        // here) and stays deterministic (the batch is the same on a resumed run).
        if !transient.is_empty() {
            let idx = Tensor::new(transient.as_slice(), batch.clip_images.device())?;
            let imgs = batch.clip_images.index_select(&idx, 0)?;
            let all = model.towers().encode_images(&imgs).map_err(model_err)?;
            for (row, &i) in transient.iter().enumerate() {
                out[i as usize] = Some(ImageFeatures {
                    patch_tokens: all.patch_tokens.narrow(0, row, 1)?,
                    dense_embeds: all.dense_embeds.narrow(0, row, 1)?,
                });
            }
        }
        let items: Vec<&ImageFeatures> = out
            .iter()
            .map(|f| f.as_ref().expect("filled above"))
            .collect();
        ImageFeatures::cat(&items).map_err(model_err)
    }

    /// Features of `texts` (one row each), computing the missing ones.
    pub fn prompts(&mut self, model: &TgcNet, texts: &[String]) -> Result<PromptFeatures> {
        let missing: Vec<String> = {
            let mut m: Vec<String> = texts
                .iter()
                .filter(|t| !self.prompts.contains_key(*t))
                .cloned()
                .collect();
            m.sort();
            m.dedup();
            m
        };
        // One prompt at a time, for the same reason as images.
        for t in missing {
            let one = model
                .towers()
                .encode_prompts(std::slice::from_ref(&t))
                .map_err(model_err)?;
            self.prompts.insert(t, one);
        }
        let items: Vec<&PromptFeatures> = texts.iter().map(|t| &self.prompts[t]).collect();
        let out = PromptFeatures::cat(&items).map_err(model_err)?;
        if !self.keep {
            self.prompts.clear();
        }
        Ok(out)
    }

    /// Writes computed image features to the disk cache (if any).
    pub fn flush(&mut self) -> Result<()> {
        if let Some(disk) = &mut self.disk {
            if !self.pending.is_empty() {
                disk.insert_many(std::mem::take(&mut self.pending))?;
            }
        }
        Ok(())
    }
}

fn model_err(e: tgc_model::Error) -> Error {
    Error::from(e)
}

/// Where a training run's image features come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFeatureSource {
    /// Computed once by the frozen CLIP tower and reused (memory, and the disk cache
    /// when one is configured).
    Cached,
    /// Computed on every step by the model's fine-tuned CLIP vision tower, with
    /// gradients (never cached).
    FineTunedTower,
}

impl ImageFeatureSource {
    /// The source `model` needs.
    pub fn for_model(model: &TgcNet) -> Self {
        if model.finetunes_clip() {
            ImageFeatureSource::FineTunedTower
        } else {
            ImageFeatureSource::Cached
        }
    }
}

/// Logits `B x 1 x S x S` of a batch, its primary prompts and aux prompts as the model
/// sees them. Image features come from `store` (cached frozen features) unless the model
/// fine-tunes CLIP, in which case the batch's raw CLIP images go through the model's
/// trainable vision tower.
pub fn batch_logits(
    model: &TgcNet,
    store: &mut FeatureStore,
    batch: &Batch,
    train: bool,
) -> Result<Tensor> {
    let inputs = batch_inputs(model, store, batch)?;
    forward_inputs(model, &inputs, batch, train)
}

/// What the model reads besides the batch's CNN images: prompt features and, unless the
/// model fine-tunes CLIP, the frozen image features.
struct BatchInputs {
    image: Option<ImageFeatures>,
    primary: PromptFeatures,
    aux: Option<PromptFeatures>,
}

/// Looks up (or computes and caches) the frozen features of a batch.
fn batch_inputs(model: &TgcNet, store: &mut FeatureStore, batch: &Batch) -> Result<BatchInputs> {
    let mut prim = Vec::with_capacity(batch.len());
    let mut aux = Vec::with_capacity(batch.len());
    for (c, a) in batch.captions.iter().zip(&batch.aux_captions) {
        let (p, x) = model.effective_prompts(c, a);
        prim.push(p);
        if let Some(x) = x {
            aux.push(x);
        }
    }
    let primary = store.prompts(model, &prim)?;
    let aux = if aux.is_empty() {
        None
    } else {
        Some(store.prompts(model, &aux)?)
    };
    let image = match ImageFeatureSource::for_model(model) {
        ImageFeatureSource::FineTunedTower => None,
        ImageFeatureSource::Cached => Some(store.images(model, batch)?),
    };
    Ok(BatchInputs {
        image,
        primary,
        aux,
    })
}

/// The seed of the dropout masks of one part (data-parallel or micro-batch) of one
/// training step: they depend on the run's seed, the step and the part only, so a
/// resumed run draws the masks the uninterrupted one drew. Distinct (step, part) pairs
/// give distinct seeds while parts stay below 2^16 (a part holds at least one image).
fn dropout_seed(run_seed: u64, step: u64, part: usize) -> u64 {
    run_seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (step << 16) ^ part as u64
}

/// The forward pass of a batch whose frozen features were looked up by [`batch_inputs`].
fn forward_inputs(
    model: &TgcNet,
    inputs: &BatchInputs,
    batch: &Batch,
    train: bool,
) -> Result<Tensor> {
    let (primary, aux) = (&inputs.primary, inputs.aux.as_ref());
    match &inputs.image {
        None => model.forward_images(
            &batch.clip_images,
            &batch.cnn_images,
            primary,
            aux,
            1,
            train,
        ),
        Some(image) => model.forward_features(image, &batch.cnn_images, primary, aux, 1, train),
    }
    .map_err(model_err)
}

/// Per-image scores of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageScore {
    /// Sample id.
    pub id: String,
    /// LViT Dice of this image.
    pub dice: f64,
    /// IoU of this image.
    pub iou: f64,
}

/// Test-time augmentation for [`evaluate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tta {
    /// One pass per image (what the paper and LViT report).
    #[default]
    None,
    /// A second pass on the mirrored image with "left" and "right" swapped in its prompts
    /// (the same flip as the training augmentation); its probabilities are mirrored back
    /// and averaged with the plain pass. Twice the evaluation cost.
    Flip,
}

impl std::str::FromStr for Tta {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Tta::None),
            "flip" => Ok(Tta::Flip),
            other => Err(Error::InvalidArgument(format!(
                "unknown test-time augmentation {other:?} (expected none or flip)"
            ))),
        }
    }
}

/// `x` (`... x W`) mirrored along its last axis.
fn mirror_width(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(candle_core::D::Minus1)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.index_select(&idx, x.rank() - 1)?)
}

/// Evaluates `model` on `dataset` (no augmentation): LViT metrics and per-image scores.
/// With [`Tta::Flip`] every probability map is the mean of the plain and the mirrored
/// pass. Calls `on_batch(batch, probs)` for every batch (for overlays or predictions).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &TgcNet,
    dataset: Arc<dyn SegDataset>,
    preprocess: Preprocess,
    batch_size: usize,
    store: &mut FeatureStore,
    progress: bool,
    tta: Tta,
    on_batch: impl FnMut(&Batch, &Tensor) -> Result<()>,
) -> Result<(MetricsSummary, Vec<ImageScore>)> {
    evaluate_members(
        &mut [(model, store)],
        dataset,
        preprocess,
        batch_size,
        progress,
        tta,
        on_batch,
    )
}

/// Evaluates the ensemble of `members` on `dataset` as [`evaluate`] does one model: each
/// image's probability map is the mean of the members' maps (each with [`Tta::Flip`]
/// already applied), thresholded once. Independently trained checkpoints make
/// different mistakes on small lesions, so their mean scores above each of them.
///
/// Every member must read `preprocess`'s geometry (CLIP, CNN and label sizes; the
/// architecture may differ otherwise) and sit on the first member's device. Frozen
/// features are computed per member and not kept: members may use different CLIP weights.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::Device;
/// use tgc_data::{PhantomKind, Preprocess, SegDataset, SyntheticPhantoms};
/// use tgc_model::{TgcConfig, TgcNet, WeightSource};
/// use tgc_train::{evaluate_ensemble, Tta};
///
/// let cfg = TgcConfig::tiny();
/// let (clip_size, cnn_size, label_size) = (cfg.clip_size, cfg.cnn_size, cfg.label_size);
/// let pre = Preprocess { clip_size, cnn_size, label_size };
/// // Two checkpoints would be loaded with `load_weights`; random members here.
/// let a = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 1 }, &Device::Cpu)?;
/// let b = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 2 }, &Device::Cpu)?;
/// let val: Arc<dyn SegDataset> =
///     Arc::new(SyntheticPhantoms::new(PhantomKind::CtSlice, 4, 2, label_size));
/// let (m, scores) = evaluate_ensemble(&[&a, &b], val, pre, 2, false, Tta::None, |_, _| Ok(()))?;
/// assert_eq!((m.n_images, scores.len()), (4, 4));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn evaluate_ensemble(
    members: &[&TgcNet],
    dataset: Arc<dyn SegDataset>,
    preprocess: Preprocess,
    batch_size: usize,
    progress: bool,
    tta: Tta,
    on_batch: impl FnMut(&Batch, &Tensor) -> Result<()>,
) -> Result<(MetricsSummary, Vec<ImageScore>)> {
    let Some(first) = members.first() else {
        return Err(Error::InvalidArgument(
            "evaluate_ensemble: an ensemble needs at least one member".into(),
        ));
    };
    for (i, m) in members.iter().enumerate() {
        let c = m.config();
        let geometry = (c.clip_size, c.cnn_size, c.label_size);
        let want = (
            preprocess.clip_size,
            preprocess.cnn_size,
            preprocess.label_size,
        );
        if geometry != want {
            return Err(Error::InvalidArgument(format!(
                "evaluate_ensemble: member {i} reads (clip, cnn, label) sizes {geometry:?}, \
                 the ensemble {want:?}: members must share the input geometry"
            )));
        }
        if !m.device().same_device(first.device()) {
            return Err(Error::InvalidArgument(format!(
                "evaluate_ensemble: member {i} is on {:?}, member 0 on {:?}",
                m.device().location(),
                first.device().location()
            )));
        }
    }
    let mut stores: Vec<FeatureStore> = members
        .iter()
        .map(|_| FeatureStore::new(None, &preprocess, false))
        .collect();
    let mut pairs: Vec<(&TgcNet, &mut FeatureStore)> =
        members.iter().copied().zip(stores.iter_mut()).collect();
    evaluate_members(
        &mut pairs, dataset, preprocess, batch_size, progress, tta, on_batch,
    )
}

/// The loop of [`evaluate`] and [`evaluate_ensemble`]: the batches once, every member on
/// each, their probability maps averaged.
fn evaluate_members(
    members: &mut [(&TgcNet, &mut FeatureStore)],
    dataset: Arc<dyn SegDataset>,
    preprocess: Preprocess,
    batch_size: usize,
    progress: bool,
    tta: Tta,
    mut on_batch: impl FnMut(&Batch, &Tensor) -> Result<()>,
) -> Result<(MetricsSummary, Vec<ImageScore>)> {
    let device = members[0].0.device().clone();
    let loader = |augment| {
        DataLoader::new(
            dataset.clone(),
            preprocess,
            batch_size,
            None,
            augment,
            device.clone(),
        )
    };
    let plain = loader(Augment::off());
    // Same order, no shuffling: batch k of both loaders holds the same samples.
    let mut mirrored = match tta {
        Tta::None => None,
        Tta::Flip => Some(loader(Augment::always_flip()).epoch(0)),
    };
    let bar = bar(plain.num_batches() as u64, progress, "eval");
    let mut metrics = SegMetrics::new();
    let mut scores = vec![];
    for batch in plain.epoch(0) {
        let batch = batch?;
        let flipped = match mirrored.as_mut() {
            None => None,
            Some(m) => Some(m.next().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: the mirrored pass ran out of batches",
                    dataset.name()
                ))
            })??),
        };
        let mut sum: Option<Tensor> = None;
        for (model, store) in members.iter_mut() {
            let mut p = candle_nn::ops::sigmoid(&batch_logits(model, store, &batch, false)?)?;
            if let Some(flipped) = &flipped {
                let back = mirror_width(&candle_nn::ops::sigmoid(&batch_logits(
                    model, store, flipped, false,
                )?)?)?;
                p = ((p + back)? * 0.5)?;
            }
            sum = Some(match sum {
                None => p,
                Some(s) => (s + p)?,
            });
        }
        let probs = match sum {
            Some(s) if members.len() > 1 => (s / members.len() as f64)?,
            Some(s) => s,
            None => unreachable!("at least one member"),
        };
        metrics.update(&probs, &batch.masks)?;
        for i in 0..batch.len() {
            let mut one = SegMetrics::new();
            one.update(&probs.narrow(0, i, 1)?, &batch.masks.narrow(0, i, 1)?)?;
            let s = one.summary();
            scores.push(ImageScore {
                id: batch.ids[i].clone(),
                dice: s.dice,
                iou: s.iou,
            });
        }
        on_batch(&batch, &probs)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    for (_, store) in members.iter_mut() {
        store.flush()?;
    }
    Ok((metrics.summary(), scores))
}

fn bar(len: u64, show: bool, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed}}<{{eta}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

/// One line of the metrics log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Optimiser steps so far.
    pub step: u64,
    /// Mean training loss of the epoch.
    pub train_loss: f64,
    /// Validation Dice (LViT, per image).
    pub val_dice: f64,
    /// Validation mIoU (LViT, per image).
    pub val_iou: f64,
    /// Validation pixel-pooled Dice.
    pub val_micro_dice: f64,
    /// Training images per second (trainable modules and feature lookup).
    pub images_per_sec: f64,
    /// Wall time of the training part of the epoch, seconds.
    pub epoch_seconds: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// The run stopped inside this epoch (`max_steps`); the numbers cover the batches
    /// trained in it before the stop.
    #[serde(default)]
    pub partial: bool,
}

/// The outcome of [`Trainer::fit`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Epoch records.
    pub epochs: Vec<EpochRecord>,
    /// Best validation Dice.
    pub best_val_dice: f64,
    /// Optimiser steps taken in total.
    pub steps: u64,
    /// Path of the best checkpoint.
    pub best_checkpoint: PathBuf,
    /// Early stopping ended the run: val Dice did not improve for `patience` epochs.
    pub early_stopped: bool,
}

/// A training run: the model, its optimiser and schedule, data and output folder.
pub struct Trainer<'a> {
    model: &'a TgcNet,
    cfg: TrainConfig,
    opt: AdamW,
    schedule: WarmupCosine,
    train: DataLoader,
    val: Arc<dyn SegDataset>,
    preprocess: Preprocess,
    store: FeatureStore,
    images: ImageFeatureSource,
    out_dir: PathBuf,
    early: EarlyStopping,
    epoch: usize,
    batch_in_epoch: usize,
    best: f64,
    /// The step total planned from the time budget, once planned.
    planned_steps: Option<u64>,
    /// The trainable variables, in the optimiser's (name) order.
    vars: Vec<(String, Var)>,
    /// The weight average, when `ema_decay` is not 0.
    ema: Option<WeightEma>,
    /// One thread pool per data-parallel part, built by the first data-parallel step: each
    /// part's kernels and matrix products run on its own pool instead of both parts
    /// sharing the global one, where they queued behind each other's jobs and spent a
    /// tenth of the step in the scheduler (`perf`: `sched_yield`, futex waits).
    part_pools: Vec<rayon::ThreadPool>,
}

/// The thread pools of `parts` data-parallel parts: the global pool's threads shared
/// out evenly, at least one each.
fn part_pools(parts: usize) -> Result<Vec<rayon::ThreadPool>> {
    let threads = (rayon::current_num_threads() / parts).max(1);
    (0..parts)
        .map(|i| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |t| format!("tgc-part{i}-{t}"))
                .build()
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "could not start the thread pool of data-parallel part {i}: {e}"
                    ))
                })
        })
        .collect()
}

/// The most further steps that fit in `remaining_secs` when a step costs `step_secs` and
/// every epoch, whole or cut short, adds `epoch_overhead_secs` (validation,
/// checkpoints); epochs have `steps_per_epoch` steps and at most `max_steps` more are
/// allowed. Training resumes at an epoch boundary.
pub fn plan_steps(
    remaining_secs: f64,
    step_secs: f64,
    epoch_overhead_secs: f64,
    steps_per_epoch: u64,
    max_steps: u64,
) -> u64 {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(remaining_secs) || !positive(step_secs) || steps_per_epoch == 0 {
        return 0;
    }
    let overhead = epoch_overhead_secs.max(0.0);
    let mut best = 0;
    let mut epochs = 1u64;
    loop {
        let time_for_steps = remaining_secs - epochs as f64 * overhead;
        if time_for_steps <= 0.0 || (epochs - 1) * steps_per_epoch >= max_steps {
            break;
        }
        let fit = (time_for_steps / step_secs).floor() as u64;
        // `epochs` epochs hold more than `(epochs - 1)` epochs' steps.
        let steps = fit.min(epochs * steps_per_epoch).min(max_steps);
        if steps > (epochs - 1) * steps_per_epoch {
            best = best.max(steps);
        }
        if fit < epochs * steps_per_epoch {
            break;
        }
        epochs += 1;
    }
    best
}

impl<'a> Trainer<'a> {
    /// Sets up a run writing to `out_dir` (`last.safetensors`, `best.safetensors`,
    /// `metrics.jsonl`, `curves.png`, `overlays/`).
    pub fn new(
        model: &'a TgcNet,
        cfg: TrainConfig,
        train: Arc<dyn SegDataset>,
        val: Arc<dyn SegDataset>,
        preprocess: Preprocess,
        out_dir: impl AsRef<Path>,
    ) -> Result<Self> {
        let out_dir = out_dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io("creating", &out_dir, e))?;
        if cfg.batch_size == 0 || cfg.epochs == 0 {
            return Err(Error::InvalidArgument(
                "batch_size and epochs must be positive".into(),
            ));
        }
        let augment = cfg.augment()?;
        let loader = DataLoader::new(
            train,
            preprocess,
            cfg.batch_size,
            Some(cfg.seed),
            augment,
            model.device().clone(),
        )
        .with_drop_last(false);
        let per_epoch = loader.num_batches() as u64;
        // The schedule is planned over the epochs (or `schedule_steps`); `max_steps` only
        // interrupts the run, so an interrupted run and its resumption follow the same
        // learning rates.
        let total = cfg
            .schedule_steps
            .unwrap_or(per_epoch * cfg.epochs as u64)
            .max(1);
        let warmup = ((total as f64) * cfg.warmup_frac).round() as u64;
        let schedule = WarmupCosine::new(cfg.lr, warmup, total, cfg.lr * cfg.min_lr_frac)?;
        let opt = AdamW::new(
            model.trainable_vars(),
            AdamWConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        let images = ImageFeatureSource::for_model(model);
        let disk = match &cfg.cache_dir {
            Some(dir) if cfg.use_cache && images == ImageFeatureSource::Cached => {
                let id = model.config().frozen_id("");
                Some(FeatureCache::open(dir, &id)?)
            }
            _ => None,
        };
        if images == ImageFeatureSource::FineTunedTower {
            let msg = format!(
                "clip_finetune = {}: image features are computed by the fine-tuned CLIP \
                 vision tower on every step (no image feature cache{}); prompt features \
                 are still cached",
                model.config().clip_finetune,
                if cfg.cache_dir.is_some() {
                    ", cache_dir ignored"
                } else {
                    ""
                }
            );
            tracing::info!("{msg}");
            if cfg.progress {
                eprintln!("{msg}");
            }
        }
        let store = FeatureStore::new(disk, &preprocess, cfg.use_cache);
        let early = EarlyStopping::new(cfg.patience.max(1), 0.0)?;
        let vars = model.trainable_vars();
        let ema = if cfg.ema_decay == 0.0 {
            None
        } else {
            Some(WeightEma::new(&vars, cfg.ema_decay)?)
        };
        Ok(Self {
            model,
            opt,
            schedule,
            train: loader,
            val,
            preprocess,
            store,
            images,
            out_dir,
            early,
            epoch: 0,
            batch_in_epoch: 0,
            best: f64::NEG_INFINITY,
            planned_steps: None,
            vars,
            ema,
            part_pools: Vec::new(),
            cfg,
        })
    }

    /// Path of the rolling checkpoint.
    pub fn last_checkpoint(&self) -> PathBuf {
        self.out_dir.join("last.safetensors")
    }

    /// Path of the best checkpoint.
    pub fn best_checkpoint(&self) -> PathBuf {
        self.out_dir.join("best.safetensors")
    }

    /// Where this run's image features come from: cached frozen features, or the
    /// fine-tuned CLIP vision tower on every step.
    pub fn image_features(&self) -> ImageFeatureSource {
        self.images
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> u64 {
        self.opt.steps()
    }

    /// The weight average, when [`TrainConfig::ema_decay`] turns it on.
    pub fn ema(&self) -> Option<&WeightEma> {
        self.ema.as_ref()
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.opt.state_tensors()?;
        match &self.ema {
            Some(ema) => tensors.extend(ema.checkpoint_tensors(&self.vars)?),
            None => tensors.extend(self.model.trainable_tensors()),
        }
        let mut meta = HashMap::new();
        meta.insert(
            META_MODEL_CONFIG.to_string(),
            serde_json::to_string(self.model.config())
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        );
        meta.insert(
            META_CONFIG.to_string(),
            serde_json::to_string(&self.cfg).map_err(|e| Error::InvalidArgument(e.to_string()))?,
        );
        meta.insert(META_STEP.to_string(), self.opt.steps().to_string());
        meta.insert(META_EPOCH.to_string(), self.epoch.to_string());
        meta.insert(
            META_BATCH_IN_EPOCH.to_string(),
            self.batch_in_epoch.to_string(),
        );
        meta.insert(META_BEST_METRIC.to_string(), format!("{:e}", self.best));
        meta.insert(META_EARLY_STOP.to_string(), self.early.to_json());
        if let Some(p) = self.planned_steps {
            meta.insert(META_PLANNED_STEPS.to_string(), p.to_string());
            meta.insert(
                META_PLANNED_WARMUP.to_string(),
                self.schedule.warmup_steps.to_string(),
            );
        }
        checkpoint::save_checkpoint(path, &tensors, &meta)
    }

    /// Restores weights, optimiser moments and position from a checkpoint written by this
    /// trainer (e.g. `last.safetensors` of an interrupted run).
    pub fn resume(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let ck = checkpoint::load_checkpoint(path, self.model.device())?;
        self.model.load_weights(path).map_err(model_err)?;
        match &mut self.ema {
            // The model tensors just loaded are the average; the raw weights go back
            // into the variables.
            Some(ema) => ema
                .load_checkpoint_tensors(&ck.tensors, &self.vars)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?,
            None => {
                if ck.tensors.keys().any(|k| k.starts_with(RAW_WEIGHT_PREFIX)) {
                    return Err(Error::InvalidArgument(format!(
                        "{} holds a weight average (it was trained with ema_decay > 0): \
                         resume it with the same ema_decay",
                        path.display()
                    )));
                }
            }
        }
        self.opt.load_state(&ck.tensors)?;
        self.epoch = ck.meta_parse(META_EPOCH)?;
        self.batch_in_epoch = ck.meta_parse(META_BATCH_IN_EPOCH)?;
        self.best = ck.meta_parse(META_BEST_METRIC)?;
        self.early = EarlyStopping::from_json(ck.meta(META_EARLY_STOP)?)?;
        if ck.meta(META_PLANNED_STEPS).is_ok() {
            self.apply_plan(
                ck.meta_parse(META_PLANNED_STEPS)?,
                ck.meta_parse(META_PLANNED_WARMUP)?,
            )?;
        }
        Ok(())
    }

    /// The step total planned from the time budget, once the first epoch has measured
    /// the run's speed (or restored from a checkpoint).
    pub fn planned_steps(&self) -> Option<u64> {
        self.planned_steps
    }

    /// Makes `total` the run's step count and the cosine schedule's length, with a
    /// warm-up of `warmup` steps.
    fn apply_plan(&mut self, total: u64, warmup: u64) -> Result<()> {
        let total = total.max(1);
        self.planned_steps = Some(total);
        self.cfg.max_steps = Some(total);
        self.cfg.schedule_steps = Some(total);
        self.schedule = WarmupCosine::new(
            self.schedule.base_lr,
            warmup.min(total),
            total,
            self.schedule.min_lr,
        )?;
        Ok(())
    }

    /// The warm-up of a plan made at the current step: unchanged once it is over;
    /// while it lasts (a first plan over many epochs, as `tgc train` makes without
    /// `schedule_steps`), shortened to `warmup_frac` of the new total but not below the
    /// steps already taken, so the lr never steps back.
    fn planned_warmup(&self, total: u64) -> u64 {
        let old = self.schedule.warmup_steps;
        let step = self.opt.steps();
        if step >= old {
            return old;
        }
        let wanted = ((total as f64) * self.cfg.warmup_frac).round() as u64;
        wanted.max(step).min(old)
    }

    /// The loss of one training batch and the gradients of the trainable parameters,
    /// as a training step computes them (nothing is updated): the batch is split into
    /// `micro_batches` chunks run one after another (only one chunk's activations live
    /// at a time), each chunk into `data_parallel` parts on their own threads and
    /// thread pools when that is above 1 (the global pool's threads shared out evenly,
    /// at least one per part), each part's loss weighted by its share of the images so
    /// that the sum is the whole batch's loss, and the gradients summed in chunk and
    /// part order (deterministic). Frozen features come from (and go into) the
    /// trainer's cache.
    pub fn loss_and_gradients(&mut self, batch: &Batch) -> Result<(f64, GradStore)> {
        let chunks = self.cfg.micro_batches.clamp(1, batch.len().max(1));
        if chunks == 1 {
            return self.chunk_loss_and_gradients(batch, batch.len(), 0);
        }
        let mut value = 0.0;
        let mut merged: Option<GradStore> = None;
        for (i, chunk) in batch.split(chunks)?.iter().enumerate() {
            let (v, grads) = self.chunk_loss_and_gradients(chunk, batch.len(), i)?;
            value += v;
            merged = Some(match merged {
                None => grads,
                Some(mut m) => {
                    self.add_var_gradients(&mut m, &grads)?;
                    m
                }
            });
        }
        Ok((value, merged.expect("a batch has at least one chunk")))
    }

    /// Adds the trainable parameters' gradients in `from` to those in `into`.
    fn add_var_gradients(&self, into: &mut GradStore, from: &GradStore) -> Result<()> {
        for (_, var) in self.opt.vars() {
            let t = var.as_tensor();
            if let Some(g) = from.get(t) {
                let sum = match into.remove(t) {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                };
                into.insert(t, sum);
            }
        }
        Ok(())
    }

    /// [`Self::loss_and_gradients`] of chunk `chunk` of a batch of `total` images: the
    /// loss is weighted by the chunk's share of the batch.
    fn chunk_loss_and_gradients(
        &mut self,
        batch: &Batch,
        total: usize,
        chunk: usize,
    ) -> Result<(f64, GradStore)> {
        let w_bce = self.cfg.bce_weight;
        let parts = self.cfg.data_parallel.clamp(1, batch.len().max(1));
        let loss_of = |logits: &Tensor, b: &Batch| -> Result<(f64, Tensor)> {
            let loss = dice_bce(logits, &b.masks, w_bce, 1.0 - w_bce)?;
            Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, loss))
        };
        let (run_seed, step) = (self.cfg.seed, self.steps());
        // Dropout streams are numbered across the chunks' parts: chunk 0's parts keep
        // the numbers they had before micro-batches existed.
        let first_part = chunk * self.cfg.data_parallel.max(1);
        if parts == 1 {
            tgc_nn::seed_dropout(dropout_seed(run_seed, step, first_part));
            let logits = batch_logits(self.model, &mut self.store, batch, true)?;
            let (value, loss) = loss_of(&logits, batch)?;
            // A share of 1 (the whole batch) multiplies exactly.
            let share = batch.len() as f64 / total as f64;
            return Ok((value * share, (loss * share)?.backward()?));
        }
        if self.part_pools.len() < parts {
            // `parts` is below `data_parallel` only for a short batch.
            self.part_pools = part_pools(self.cfg.data_parallel.max(parts))?;
        }
        let subs = batch.split(parts)?;
        // The feature cache is filled in order on this thread.
        let inputs = subs
            .iter()
            .map(|b| batch_inputs(self.model, &mut self.store, b))
            .collect::<Result<Vec<_>>>()?;
        let model = self.model;
        let total = total as f64;
        let results: Vec<Result<(f64, GradStore)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = subs
                .iter()
                .zip(&inputs)
                .zip(&self.part_pools)
                .enumerate()
                .map(|(part, ((b, inp), pool))| {
                    scope.spawn(move || -> Result<(f64, GradStore)> {
                        let work = || -> Result<(f64, GradStore)> {
                            // Seeded on the pool's thread, where the forward pass runs.
                            tgc_nn::seed_dropout(dropout_seed(run_seed, step, first_part + part));
                            let logits = forward_inputs(model, inp, b, true)?;
                            let (value, loss) = loss_of(&logits, b)?;
                            let share = b.len() as f64 / total;
                            Ok((value * share, (loss * share)?.backward()?))
                        };
                        pool.install(work)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidArgument(
                            "a data-parallel training thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        let mut value = 0.0;
        let mut stores = Vec::with_capacity(parts);
        for r in results {
            let (v, g) = r?;
            value += v;
            stores.push(g);
        }
        let mut merged = stores.remove(0);
        for grads in &stores {
            self.add_var_gradients(&mut merged, grads)?;
        }
        Ok((value, merged))
    }

    /// Trains until the epochs or `max_steps` run out or early stopping fires; validates
    /// and checkpoints after every epoch (and at `max_steps`).
    pub fn fit(&mut self) -> Result<TrainSummary> {
        let log_path = self.out_dir.join("metrics.jsonl");
        let mut log = if self.opt.steps() > 0 {
            MetricsWriter::append(&log_path)?
        } else {
            MetricsWriter::create(&log_path)?
        };
        let mut records = vec![];
        let mut early_stopped = false;
        let fit_start = Instant::now();
        // A run planned by time re-plans after each of its epochs from the average speed
        // so far (a machine's speed drifts by 10-30% over half an hour); a run resumed
        // after its plan was made keeps that plan.
        let replans = self.cfg.time_budget_secs.is_some() && self.planned_steps.is_none();
        let (mut timed_secs, mut timed_steps, mut timed_overhead, mut timed_epochs) =
            (0f64, 0usize, 0f64, 0usize);
        while self.epoch < self.cfg.epochs {
            let per_epoch = self.train.num_batches();
            let bar = bar(
                per_epoch as u64,
                self.cfg.progress,
                &format!("epoch {}", self.epoch + 1),
            );
            bar.set_position(self.batch_in_epoch as u64);
            let start = Instant::now();
            let (mut loss_sum, mut n_batches, mut n_images) = (0f64, 0usize, 0usize);
            for (bi, batch) in self.train.epoch(self.epoch).enumerate() {
                if bi < self.batch_in_epoch {
                    continue;
                }
                if self.cfg.max_steps.is_some_and(|m| self.opt.steps() >= m) {
                    break;
                }
                let batch = batch?;
                let (value, mut grads) = self.loss_and_gradients(&batch)?;
                if let Err(e) = crate::check_finite(value, self.opt.steps(), &batch.ids) {
                    bar.abandon();
                    return Err(Error::InvalidArgument(format!(
                        "{e}; the last good checkpoint is {}",
                        self.last_checkpoint().display()
                    )));
                }
                if self.cfg.grad_clip > 0.0 {
                    self.opt.clip_grad_norm(&mut grads, self.cfg.grad_clip)?;
                }
                let lr = self.schedule.lr_at(self.opt.steps());
                let stats = self.opt.step(&grads, lr)?;
                if !stats.missing_grads.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "trainable parameters without a gradient: {}",
                        stats.missing_grads.join(", ")
                    )));
                }
                if let Some(ema) = &mut self.ema {
                    ema.update(&self.vars)?;
                }
                self.batch_in_epoch = bi + 1;
                loss_sum += value;
                n_batches += 1;
                n_images += batch.len();
                bar.inc(1);
                bar.set_message(format!(
                    "loss {:.4} {:.1} img/s",
                    loss_sum / n_batches as f64,
                    n_images as f64 / start.elapsed().as_secs_f64()
                ));
            }
            bar.finish_and_clear();
            self.store.flush()?;
            let stopped_early = self.cfg.max_steps.is_some_and(|m| self.opt.steps() >= m)
                && self.batch_in_epoch < per_epoch;
            let seconds = start.elapsed().as_secs_f64();
            if !stopped_early {
                self.epoch += 1;
                self.batch_in_epoch = 0;
            }
            let (summary, _) = self.validate()?;
            let rec = EpochRecord {
                // The epoch in progress for a mid-epoch stop.
                epoch: self.epoch + usize::from(stopped_early),
                step: self.opt.steps(),
                train_loss: if n_batches > 0 {
                    loss_sum / n_batches as f64
                } else {
                    f64::NAN
                },
                val_dice: summary.dice,
                val_iou: summary.iou,
                val_micro_dice: summary.micro_dice,
                images_per_sec: n_images as f64 / seconds.max(1e-9),
                epoch_seconds: seconds,
                lr: self.schedule.lr_at(self.opt.steps()),
                partial: stopped_early,
            };
            log.write(&rec)?;
            if self.cfg.progress {
                eprintln!(
                    "epoch {}{} step {}: loss {:.4}, val Dice {:.2} mIoU {:.2} (micro Dice {:.2}), {:.1} img/s",
                    rec.epoch,
                    if rec.partial { " (partial)" } else { "" },
                    rec.step,
                    rec.train_loss,
                    100.0 * rec.val_dice,
                    100.0 * rec.val_iou,
                    100.0 * rec.val_micro_dice,
                    rec.images_per_sec
                );
            }
            records.push(rec);
            // Only whole epochs count for early stopping; a mid-epoch stop keeps its
            // position in the last checkpoint for an exact resume.
            let verdict =
                (!stopped_early).then(|| self.early.update(self.epoch as u64, summary.dice));
            let stop = self.cfg.patience > 0 && verdict == Some(Verdict::Stop);
            // Planned before the checkpoints are written, so they carry the plan.
            if let (Some(budget), true, false, true) = (
                self.cfg.time_budget_secs,
                replans,
                stopped_early,
                n_batches > 0,
            ) {
                timed_secs += seconds;
                timed_steps += n_batches;
                // Validation; the checkpoints written next take a small fraction of it.
                timed_overhead += start.elapsed().as_secs_f64() - seconds;
                timed_epochs += 1;
                let step_secs = timed_secs / timed_steps as f64;
                let overhead = timed_overhead / timed_epochs as f64;
                let remaining = budget * 0.97 - fit_start.elapsed().as_secs_f64();
                let per_epoch = per_epoch as u64;
                let left = (self.cfg.epochs - self.epoch) as u64 * per_epoch;
                let more = plan_steps(remaining, step_secs, overhead, per_epoch, left);
                let total = self.opt.steps() + more;
                self.apply_plan(total, self.planned_warmup(total))?;
                let msg = format!(
                    "time budget {budget:.0} s: {step_secs:.3} s/step, {overhead:.1} s per \
                     validation, {remaining:.0} s left (3% spare) -> {total} \
                     steps in all ({more} more)"
                );
                tracing::info!("{msg}");
                if self.cfg.progress {
                    eprintln!("{msg}");
                }
            }
            if summary.dice > self.best {
                self.best = summary.dice;
                self.save(&self.best_checkpoint())?;
            }
            self.save(&self.last_checkpoint())?;
            let _ = crate::plot_curves_from_jsonl(
                &log_path,
                self.out_dir.join("curves.png"),
                &crate::PlotConfig::default(),
            );
            if stop {
                early_stopped = true;
                // Said out loud: a run that ends well inside its epochs or time budget
                // otherwise looks like a crash or a wrong plan.
                let msg = format!(
                    "early stopping: val Dice has not improved on {:.2} (epoch {}) for {} \
                     epochs; stopped at step {} of {} planned",
                    100.0 * self.early.best.unwrap_or(f64::NAN),
                    self.early.best_epoch.unwrap_or(0),
                    self.cfg.patience,
                    self.opt.steps(),
                    self.schedule.total_steps,
                );
                tracing::info!("{msg}");
                if self.cfg.progress {
                    eprintln!("{msg}");
                }
                break;
            }
            if self.cfg.max_steps.is_some_and(|m| self.opt.steps() >= m) {
                break;
            }
        }
        Ok(TrainSummary {
            epochs: records,
            best_val_dice: self.best,
            steps: self.opt.steps(),
            best_checkpoint: self.best_checkpoint(),
            early_stopped,
        })
    }

    /// Validates the weights a checkpoint written now would hold (the average when
    /// [`TrainConfig::ema_decay`] is on, the current weights otherwise); writes overlays
    /// of the first images.
    pub fn validate(&mut self) -> Result<(MetricsSummary, Vec<ImageScore>)> {
        let raw = match &self.ema {
            Some(ema) => Some(ema.swap_in(&self.vars)?),
            None => None,
        };
        let result = self.validate_current();
        if let Some(raw) = raw {
            for ((_, v), r) in self.vars.iter().zip(&raw) {
                v.set(r)?;
            }
        }
        result
    }

    fn validate_current(&mut self) -> Result<(MetricsSummary, Vec<ImageScore>)> {
        let overlays = self.cfg.overlays;
        let dir = self.out_dir.join("overlays");
        let mut written = 0usize;
        let epoch = self.epoch;
        evaluate(
            self.model,
            self.val.clone(),
            self.preprocess,
            self.cfg.batch_size,
            &mut self.store,
            self.cfg.progress,
            Tta::None,
            |batch, probs| {
                if written >= overlays {
                    return Ok(());
                }
                std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
                for i in 0..batch.len().min(overlays - written) {
                    let s = self.preprocess.label_size;
                    // Undo the CNN normalisation for display, at label size.
                    let img = tgc_nn::resize_bilinear(
                        &batch.cnn_images.narrow(0, i, 1)?.narrow(1, 0, 1)?,
                        s,
                        s,
                    )?;
                    let img = ((img.squeeze(0)?.squeeze(0)? + 1.0)? * 0.5)?;
                    let pred = probs.get(i)?.get(0)?;
                    let gt = batch.masks.get(i)?.get(0)?;
                    crate::write_overlay(
                        &img,
                        &pred,
                        Some(&gt),
                        &batch.captions[i],
                        dir.join(format!(
                            "epoch{epoch:03}_{i}_{}.png",
                            sanitize(&batch.ids[i])
                        )),
                    )?;
                    written += 1;
                }
                Ok(())
            },
        )
    }
}

fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
