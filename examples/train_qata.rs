//! Train TGC-Net on QaTa-COV19 (chest X-rays with LViT captions) with the paper's
//! settings for it (lr 2e-5, batch 8, early stopping), on the `cpu` preset by default.
//!
//! ```sh
//! cargo run --release --example train_qata -- --epochs 5 --shuffle-captions
//! # a quick look on a subset:
//! cargo run --release --example train_qata -- --train-count 400 --val-count 100 --epochs 2
//! # BERT-family text tower (weights/fetch_minilm.sh first):
//! cargo run --release --example train_qata -- --text-tower minilm
//! ```
//!
//! `--shuffle-captions` evaluates the best checkpoint on the validation split twice: with
//! each image's own caption and with the captions permuted across images (fixed seed).
//! A model that reads the text loses Dice when the captions no longer describe the image.
//! `--tta flip` makes that evaluation average in a mirrored pass (see `tgc eval --tta`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tgc::data::{LvitDataset, Preprocess, Sample, SegDataset, Split, SplitMix64, Subset};
use tgc::model::{FrozenTowers, TgcConfig, TgcNet, WeightSource};
use tgc::train::{evaluate, FeatureStore, TrainConfig, Trainer, Tta};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Train TGC-Net on QaTa-COV19 (LViT layout)")]
struct Args {
    /// Where to train: auto (a CUDA or Metal GPU when built with `--features cuda` or
    /// `--features metal` and one answers, else the CPU), cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: String,
    /// QaTa-COV19 root in LViT layout (default: ../shared/data/qata-cov19 from the repo
    /// root).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model preset: tiny, cpu or paper.
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// A `TgcConfig` as JSON (overrides --preset; `step_timing --dump` writes one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// CLIP weights: a safetensors file or folder, `hub:<repo>`, or `random`.
    #[arg(long, default_value = "random")]
    clip_weights: String,
    /// Epochs (an upper bound: early stopping ends the run after --patience epochs
    /// without a better val Dice).
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Early-stopping patience in epochs; 0 trains to the end of the epochs or budget.
    #[arg(long, default_value_t = 10)]
    patience: u32,
    /// Decay of an exponential moving average of the weights, validated and saved in
    /// their place (`TrainConfig::ema_decay`; 0: off). 0.999 averages over roughly the
    /// last thousand steps.
    #[arg(long, default_value_t = 0.0)]
    ema: f64,
    /// Stop after this many optimiser steps in total; the warm-up + cosine schedule is
    /// planned over them (as for --minutes).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate (the paper's 2e-5 for QaTa-COV19).
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    /// AdamW's decoupled weight decay, on every trainable parameter
    /// (`TrainConfig::weight_decay`; the paper's 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Images per optimiser step (the paper's 8; `TrainConfig::batch_size`).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Use only the first N training images.
    #[arg(long)]
    train_count: Option<usize>,
    /// Use only the first N validation images.
    #[arg(long)]
    val_count: Option<usize>,
    /// Use N training images spread evenly over the folder instead of the first N: the
    /// folder lists its 2,951 covid_* images before its 2,765 sub-* ones, so the first N
    /// come from one source.
    #[arg(long, conflicts_with = "train_count")]
    train_sample: Option<usize>,
    /// Use N validation images spread evenly over the folder instead of the first N.
    #[arg(long, conflicts_with = "val_count")]
    val_sample: Option<usize>,
    /// Output folder for checkpoints, metrics, plots and overlays.
    #[arg(long, default_value = "runs/qata")]
    out: PathBuf,
    /// After training, evaluate the best checkpoint with captions shuffled across images.
    #[arg(long)]
    shuffle_captions: bool,
    /// Test-time augmentation of that evaluation: none, or flip (a mirrored pass with
    /// "left"/"right" swapped in the captions, averaged in). Validation during training
    /// never uses it.
    #[arg(long, default_value = "none")]
    tta: Tta,
    /// Text tower: clip (the paper) or minilm (all-MiniLM-L6-v2 from weights/minilm).
    #[arg(long, default_value = "clip")]
    text_tower: String,
    /// CLIP vision tower training (Table 4): frozen (the paper), query_value (each
    /// layer's q and v projections) or full. Fine-tuning disables the image-feature cache.
    #[arg(long, default_value = "frozen")]
    clip_finetune: String,
    /// Time budget in minutes, from the start of the program to the end of the last
    /// validation: two short probe runs (their own models, the same feature cache)
    /// measure seconds per step for a first plan (training in 80% of the budget), and
    /// after every epoch the trainer re-plans from the measured step and validation
    /// times so far so that the run ends within the budget less 3%
    /// (`TrainConfig::time_budget_secs`). An estimate, not a hard deadline.
    #[arg(long)]
    minutes: Option<f64>,
    /// Override the preset's label (output) size, e.g. 224 to score the `tiny` preset at
    /// QaTa's native resolution.
    #[arg(long)]
    label_size: Option<usize>,
    /// Resume from the run's last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Split each batch into this many parts trained on their own threads (gradients
    /// summed; `TrainConfig::data_parallel`). 0: 2 on machines with at most 4 cores, else
    /// 1.
    #[arg(long, default_value_t = 0)]
    data_parallel: usize,
    /// Split each batch into this many micro-batches run one after another, their
    /// gradients summed before the step (gradient accumulation,
    /// `TrainConfig::micro_batches`): the paper preset's batch 8 on a GPU that holds
    /// only a few images' activations (docs/reproducing.md).
    #[arg(long, default_value_t = 1)]
    micro_batches: usize,
    /// Override the preset's text FiLM in the decoder (`true` or `false`; the `cpu`
    /// preset has it on, `paper` and `tiny` off). Not in the paper: see tgc-decoder.
    #[arg(long)]
    text_film: Option<bool>,
    /// Random rotation of training images up to this many degrees either way (0: off;
    /// `TrainConfig::max_rotation_deg`). Augmented features are recomputed every step.
    #[arg(long, default_value_t = 0.0)]
    rotate: f32,
    /// Random zoom of training images drawn in LO,HI, e.g. `0.9,1.1` (default 1,1: off;
    /// `TrainConfig::scale_range`).
    #[arg(long, value_parser = parse_range, default_value = "1,1")]
    scale: (f32, f32),
    /// Random contrast of training images about mid-grey, drawn in LO,HI, e.g. `0.8,1.2`
    /// (default 1,1: off; `TrainConfig::contrast_range`). Contrast, brightness and gamma
    /// change the image, not the mask; augmented features are recomputed every step.
    #[arg(long, value_parser = parse_range, default_value = "1,1")]
    contrast: (f32, f32),
    /// Random brightness shift of training images up to this much either way, in units
    /// of the [0, 1] intensity range (0: off; `TrainConfig::max_brightness`).
    #[arg(long, default_value_t = 0.0)]
    brightness: f32,
    /// Random gamma of training images drawn log-uniformly in LO,HI, e.g. `0.8,1.25`
    /// (default 1,1: off; `TrainConfig::gamma_range`).
    #[arg(long, value_parser = parse_range, default_value = "1,1")]
    gamma: (f32, f32),
    /// Seed of the trainable modules' initialisation and of the data order and
    /// augmentation (`TgcNet::new_seeded`, `TrainConfig::seed`). Without it: 0 for the
    /// initialisation and 42 for the data, as every run before the option. Two seeds of
    /// one command measure how much a result owes to the draw.
    #[arg(long)]
    seed: Option<u64>,
}

/// Parses `LO,HI` into a pair of numbers.
fn parse_range(s: &str) -> std::result::Result<(f32, f32), String> {
    let (lo, hi) = s
        .split_once(',')
        .ok_or_else(|| format!("expected LO,HI (e.g. 0.9,1.1), got {s:?}"))?;
    let num = |x: &str| {
        x.trim()
            .parse::<f32>()
            .map_err(|e| format!("{x:?} in {s:?}: {e}"))
    };
    Ok((num(lo)?, num(hi)?))
}

fn weights(spec: &str) -> WeightSource {
    match spec {
        "random" => WeightSource::Random { seed: 0 },
        s if s.starts_with("hub:") => WeightSource::hub(&s[4..]),
        s if std::path::Path::new(s).is_dir() => WeightSource::Dir(s.into()),
        s => WeightSource::File(s.into()),
    }
}

/// The first `count` samples of `ds`, or `sample` of them spread evenly over it (all of
/// them for neither).
fn subset(
    ds: Arc<dyn SegDataset>,
    count: Option<usize>,
    sample: Option<usize>,
) -> Result<Arc<dyn SegDataset>> {
    Ok(match (count, sample) {
        (_, Some(0)) | (Some(0), _) => bail!("a subset of 0 images leaves nothing to train on"),
        (_, Some(n)) => Arc::new(Subset::evenly_spaced(ds, n)),
        (Some(n), None) if n < ds.len() => Arc::new(Subset::new(ds, (0..n).collect())),
        _ => ds,
    })
}

/// A dataset whose captions are permuted across images with a fixed seed: image `i`
/// gets the captions of image `perm[i]` (a derangement is not enforced; with hundreds
/// of images few keep their own).
struct ShuffledCaptions {
    inner: Arc<dyn SegDataset>,
    perm: Vec<usize>,
    name: String,
}

impl ShuffledCaptions {
    fn new(inner: Arc<dyn SegDataset>, seed: u64) -> Self {
        let mut perm: Vec<usize> = (0..inner.len()).collect();
        let mut rng = SplitMix64::new(seed);
        for i in (1..perm.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        let name = format!("{} (shuffled captions)", inner.name());
        Self { inner, perm, name }
    }
}

impl SegDataset for ShuffledCaptions {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, i: usize) -> tgc::data::Result<Sample> {
        let mut s = self.inner.get(i)?;
        let other = self.inner.get(self.perm[i])?;
        s.caption = other.caption;
        s.aux_caption = other.aux_caption;
        Ok(s)
    }
}

fn main() {
    tgc::train::tune_cpu_threads();
    tgc::train::retain_freed_memory();
    if let Err(e) = run() {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let program_start = std::time::Instant::now();
    let args = Args::parse();
    let dev = tgc::model::select_device(&args.device)?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = args
        .data
        .clone()
        .unwrap_or_else(|| repo.join("../shared/data/qata-cov19"));
    let mut cfg: TgcConfig = match &args.config {
        Some(p) => TgcConfig::from_json(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => TgcConfig::preset(&args.preset)?,
    };
    if let Some(s) = args.label_size {
        cfg.label_size = s;
    }
    if let Some(f) = args.text_film {
        cfg.decoder.text_film = f;
    }
    match args.text_tower.as_str() {
        "clip" => {}
        "minilm" => {
            let dir = repo.join("weights/minilm");
            cfg = cfg.with_bert_text(dir.display().to_string(), 384);
        }
        o => bail!("unknown text tower {o:?} (expected clip or minilm)"),
    }
    cfg.clip_finetune =
        serde_json::from_value(serde_json::Value::String(args.clip_finetune.clone()))
            .with_context(|| {
                format!(
                    "unknown --clip-finetune {:?} (expected frozen, query_value or full)",
                    args.clip_finetune
                )
            })?;
    let train: Arc<dyn SegDataset> = Arc::new(
        LvitDataset::open(&root, Split::Train)
            .with_context(|| format!("opening {}", root.display()))?,
    );
    let val: Arc<dyn SegDataset> = Arc::new(LvitDataset::open(&root, Split::Val)?);
    let train = subset(train, args.train_count, args.train_sample)?;
    let val = subset(val, args.val_count, args.val_sample)?;
    println!("QaTa-COV19: {} train, {} val", train.len(), val.len());

    let pre = Preprocess {
        clip_size: cfg.clip_size,
        cnn_size: cfg.cnn_size,
        label_size: cfg.label_size,
    };
    let data_parallel = match args.data_parallel {
        0 => tgc::train::default_data_parallel(),
        n => n,
    };
    // What the probe runs and the real run share: data layout, threads, augmentation.
    let base = TrainConfig {
        cache_dir: Some(args.out.join("feature-cache")),
        data_parallel,
        micro_batches: args.micro_batches,
        batch_size: args.batch,
        max_rotation_deg: args.rotate,
        scale_range: args.scale,
        contrast_range: args.contrast,
        max_brightness: args.brightness,
        gamma_range: args.gamma,
        ema_decay: args.ema,
        weight_decay: args.weight_decay,
        ..TrainConfig::for_dataset("qata")
    };
    let mut max_steps = args.max_steps;
    if let Some(minutes) = args.minutes {
        // Two short probe runs (their own models, the run's feature cache) separate the
        // fixed costs (model build, validation, checkpoints) from the per-step cost: 2
        // steps, then 12 steps of which the last 10 are new, so a step costs about
        // (b - a) / 10. Every step is budgeted at that uncached cost: estimating the
        // cached cost from such short runs was noise (0.09 s/step predicted, 0.24 taken),
        // and here the cache saves only 5-10% per step.
        let fit_secs = |steps: u64| -> Result<f64> {
            let probe = TgcNet::load(cfg.clone(), &weights(&args.clip_weights), &dev)
                .context("building the probe model")?;
            let tc = TrainConfig {
                epochs: 1,
                max_steps: Some(steps),
                progress: false,
                overlays: 0,
                ..base.clone()
            };
            let mut t = Trainer::new(
                &probe,
                tc,
                train.clone(),
                subset(val.clone(), Some(1), None)?,
                pre,
                args.out.join("probe"),
            )?;
            let t0 = std::time::Instant::now();
            t.fit()?;
            Ok(t0.elapsed().as_secs_f64())
        };
        let (a, b) = (fit_secs(2)?, fit_secs(12)?);
        let per_step = ((b - a) / 10.0).max(1e-3);
        // 80% of the budget for training steps, the rest for validation.
        let budget = ((minutes * 60.0 * 0.8) / per_step).floor().max(1.0) as u64;
        println!("probe: {per_step:.2} s/step -> max_steps {budget} for {minutes} min");
        max_steps = Some(max_steps.map_or(budget, |m| m.min(budget)));
    }
    let towers = FrozenTowers::load(&cfg, &weights(&args.clip_weights), &dev)
        .context("loading the frozen towers")?;
    let model =
        TgcNet::new_seeded(cfg, towers, args.seed.unwrap_or(0)).context("building the model")?;
    let counts = model.param_counts();
    println!(
        "trainable parameters: {} ({:?}); frozen: {}",
        counts.trainable, counts.per_module, counts.frozen
    );
    let tc = TrainConfig {
        epochs: args.epochs,
        max_steps,
        // A time or step budget fixes the number of steps: plan the schedule over them.
        schedule_steps: max_steps,
        lr: args.lr,
        // What the probes and the model build left of the budget.
        time_budget_secs: args
            .minutes
            .map(|m| m * 60.0 - program_start.elapsed().as_secs_f64()),
        patience: args.patience,
        seed: args.seed.unwrap_or(base.seed),
        ..base
    };
    let batch = tc.batch_size;
    let mut trainer = Trainer::new(&model, tc, train, val.clone(), pre, &args.out)?;
    if let Some(ema) = trainer.ema() {
        println!(
            "weight average on (decay {}): validation and best.safetensors use the averaged weights",
            ema.decay()
        );
    }
    if args.resume && trainer.last_checkpoint().exists() {
        let last = trainer.last_checkpoint();
        trainer
            .resume(&last)
            .with_context(|| format!("resuming from {}", last.display()))?;
    }
    let summary = trainer.fit()?;
    let has_best = summary.best_checkpoint.is_file() && summary.best_val_dice.is_finite();
    if has_best {
        println!("best val Dice: {:.2}", 100.0 * summary.best_val_dice);
    } else {
        // max_steps (or --minutes) ended training inside the first epoch: no validation
        // ran yet, so validate the last weights.
        let (m, _) = trainer.validate()?;
        println!(
            "val Dice of the last weights (stopped mid-epoch): {:.2}",
            100.0 * m.dice
        );
    }
    drop(trainer);

    if args.shuffle_captions {
        if has_best {
            model
                .load_weights(&summary.best_checkpoint)
                .with_context(|| format!("loading {}", summary.best_checkpoint.display()))?;
        }
        let mut store = FeatureStore::new(None, &pre, true);
        let mut eval_on = |ds: Arc<dyn SegDataset>| {
            evaluate(
                &model,
                ds,
                pre,
                batch,
                &mut store,
                true,
                args.tta,
                |_, _| Ok(()),
            )
        };
        let (own, _) = eval_on(val.clone())?;
        let (shuf, _) = eval_on(Arc::new(ShuffledCaptions::new(val, 7)))?;
        println!(
            "on val (tta {:?}): Dice {:.2} with own captions, {:.2} with shuffled \
             captions ({:+.2})",
            args.tta,
            100.0 * own.dice,
            100.0 * shuf.dice,
            100.0 * (shuf.dice - own.dice)
        );
    }
    Ok(())
}
