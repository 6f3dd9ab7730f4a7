//! The `tgc` command-line tool: train, eval, predict, cache, info and similarity for
//! TGC-Net (text-guided medical image segmentation).
//!
//! ```sh
//! tgc train --preset tiny --phantoms ct --out runs/demo
//! tgc eval --checkpoint runs/demo/best.safetensors --phantoms ct --csv scores.csv
//! tgc eval --checkpoint runs/demo/best.safetensors --phantoms ct --tta flip
//! tgc eval --checkpoint runs/demo/best.safetensors --phantoms ct --threshold 0.3,0.4,0.5
//! tgc eval --checkpoint runs/demo/best.safetensors --phantoms ct --by-size
//! tgc train --preset cpu --volumes Task09_Spleen --out runs/spleen   # CT, split by volume
//! tgc eval --checkpoint runs/spleen/best.safetensors --volumes Task09_Spleen --last-volumes 8
//! tgc predict --checkpoint runs/demo/best.safetensors --image x.png \
//!     --text "left lung opacity" --out mask.png --overlay overlay.png
//! tgc predict --checkpoint runs/demo/best.safetensors --list reports.csv --out masks/
//! tgc eval --checkpoint runs/a/best.safetensors runs/b/best.safetensors --phantoms ct  # ensemble
//! tgc --device cuda:0 eval --checkpoint runs/demo/best.safetensors --phantoms ct   # --features cuda
//! tgc info --preset paper
//! ```
//!
//! Every error is printed as one line `error: ...` and the exit status is 1.

mod run;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use tgc_data::{
    radiology_rewrite, read_image, swap_left_right, write_volume_u8, Augment, AugmentParams,
    DataLoader, FeatureCache, HuWindow, LesionSizeBreakdown, Mask, Preprocess, Sample, SegDataset,
    SegMetrics, Volume, VolumeAssembler,
};
use tgc_model::{TgcConfig, TgcNet, WeightSource, CONFIG_METADATA_KEY};
use tgc_train::{evaluate_ensemble, FeatureStore, ImageScore, Trainer, Tta};

use run::RunFile;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "tgc",
    version,
    about = "TGC-Net: text-guided medical image segmentation (train, eval, predict, ...)"
)]
struct Cli {
    /// Where the model runs: auto (a CUDA or Metal GPU when this build has the feature
    /// and one answers, else the CPU), cpu, cuda[:N] or metal[:N]. GPUs need a build with
    /// `--features cuda` or `--features metal`.
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train TGC-Net on an LViT dataset folder or on synthetic phantoms.
    Train(TrainArgs),
    /// Evaluate a checkpoint: Dice, mIoU, micro Dice and per-image scores.
    Eval(EvalArgs),
    /// Segment one image with a text prompt and write the binary mask PNG.
    Predict(PredictArgs),
    /// Print the trainable parameters per module, the frozen towers and the input sizes.
    Info(InfoArgs),
    /// Write CLIP's zero-shot image-text similarity map (the paper's Fig. 1a).
    Similarity(SimilarityArgs),
    /// Precompute the frozen image features of a dataset into an on-disk cache.
    Cache(CacheArgs),
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Run file (TOML). Every field is optional: preset, data, phantoms, a volumes table
    /// (root, layout, organs, val_volumes, window_level, window_width), out,
    /// clip_weights, train_count, val_count, train_sample, val_sample, a model table
    /// (TgcConfig overrides merged into the preset) and a train table (TrainConfig
    /// overrides). Relative paths in it are relative to the working directory. Flags
    /// below win over the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model preset: paper, cpu or tiny (default: the file's, else cpu).
    #[arg(long)]
    preset: Option<String>,
    /// LViT dataset folder (Train_Folder, Val_Folder with img/, labelcol/ and a text table).
    #[arg(long, conflicts_with_all = ["phantoms", "volumes"])]
    data: Option<PathBuf>,
    /// Train on synthetic phantoms instead: ct or cxr (640 train seed 1, 128 val seed 2;
    /// the main job's recipe unless the file's [train] table says otherwise: lr 1e-3, 10
    /// epochs, `TrainConfig::for_phantoms`).
    #[arg(long, conflicts_with = "volumes")]
    phantoms: Option<String>,
    /// Train on a folder of labelled CT volumes instead (the root of the file's [volumes]
    /// table: layout msd unless it says word or abdomenct1k, every organ unless it names
    /// some, the last fifth of the volumes validating unless val_volumes says how many;
    /// the paper's CT learning rate 2e-4).
    #[arg(long)]
    volumes: Option<PathBuf>,
    /// Output folder: best.safetensors, last.safetensors, metrics.jsonl, curves.png,
    /// overlays/ and run.json (default: the file's, else runs/tgc). When max_steps ends
    /// training inside the first epoch, the last weights are validated and written to
    /// final.safetensors instead of best.safetensors.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Frozen CLIP weights: random, a safetensors file, a folder or hub:REPO
    /// (default: the file's, else random).
    #[arg(long)]
    clip_weights: Option<String>,
    /// Resume from OUT/last.safetensors when it exists.
    #[arg(long)]
    resume: bool,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Checkpoint (best.safetensors / last.safetensors, or a run folder for its
    /// best.safetensors); the model config is read from its metadata. Several (`--checkpoint a.safetensors b.safetensors`) are evaluated as
    /// an ensemble: per image the members' probability maps are averaged, then
    /// thresholded. Members must share the input sizes (clip_size, cnn_size, label_size).
    #[arg(long, required = true, num_args = 1..)]
    checkpoint: Vec<PathBuf>,
    /// LViT dataset folder to evaluate on.
    #[arg(
        long,
        conflicts_with_all = ["phantoms", "volumes"],
        required_unless_present_any = ["phantoms", "volumes"]
    )]
    data: Option<PathBuf>,
    /// A folder of labelled CT volumes (NIfTI) to evaluate on instead, in the --layout
    /// given: every axial slice is segmented once per organ (the organ name is the
    /// prompt), the slices are stacked back into a label map (per voxel the organ of
    /// highest probability above 0.5) and scored with the 3D Dice per volume and organ.
    #[arg(long, conflicts_with = "phantoms")]
    volumes: Option<PathBuf>,
    /// Layout of --volumes: msd (imagesTr/, labelsTr/, dataset.json), word (images<S>/,
    /// labels<S>/ with S = Tr, Val or Ts from --split) or abdomenct1k (Image/, Mask/).
    /// Default: msd.
    #[arg(long, requires = "volumes")]
    layout: Option<String>,
    /// Organs of --volumes to prompt and score, comma-separated names from the label table
    /// (default: every labelled organ).
    #[arg(long, value_delimiter = ',', requires = "volumes")]
    organs: Vec<String>,
    /// HU window level for --volumes (abdomen: 40).
    #[arg(long, default_value_t = 40.0)]
    window_level: f32,
    /// HU window width for --volumes (abdomen: 400).
    #[arg(long, default_value_t = 400.0)]
    window_width: f32,
    /// Score only the last N volumes of --volumes: the validation volumes of a
    /// `tgc train --volumes` run (its run.json records val_volumes).
    #[arg(long, requires = "volumes")]
    last_volumes: Option<usize>,
    /// Evaluate on synthetic validation phantoms (seed 2) instead: ct or cxr.
    #[arg(long)]
    phantoms: Option<String>,
    /// Split of the LViT folder: train, val or test (for --volumes, WORD's Tr, Val or Ts;
    /// MSD folders hold only Tr and AbdomenCT-1k has no splits, so it is ignored there).
    #[arg(long, default_value = "val")]
    split: String,
    /// Evaluate only the first N images (phantoms: the number generated, default 128;
    /// --volumes: the first N volumes, after --last-volumes).
    #[arg(long)]
    count: Option<usize>,
    /// Evaluate N images spread evenly over the --data split (image k * len / N for
    /// k < N) instead of the first N: LViT folders list images by name, and QaTa-COV19's
    /// names start with their source (its first 2,951 training images are all covid_*).
    #[arg(long, requires = "data", conflicts_with = "count")]
    sample: Option<usize>,
    /// Write per-image scores (id, dice, iou, lesion_share: the mask's foreground share
    /// of the image) to this CSV file; with --volumes, per volume and organ (volume,
    /// organ, dice, predicted_voxels, true_voxels).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Also print the metrics grouped by the lesion's share of the image (empty, under
    /// 2%, 2-5%, 5-10%, 10-20%, over 20%) at the first threshold, with each group's share
    /// of the missing Dice: small lesions are where most of it usually is.
    #[arg(long)]
    by_size: bool,
    /// Frozen CLIP weights (default: clip_weights of run.json next to the checkpoint,
    /// else random).
    #[arg(long)]
    clip_weights: Option<String>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Show a progress bar.
    #[arg(long)]
    progress: bool,
    /// Test-time augmentation: none, or flip (also the mirrored image with "left" and
    /// "right" swapped in its caption; the two probability maps averaged, twice the cost).
    #[arg(long, default_value = "none")]
    tta: Tta,
    /// Probability threshold of the masks (LViT's metric: 0.5). Several, comma-separated
    /// (`0.3,0.4,0.5`), print one row per threshold from a single pass over the data;
    /// --csv then scores the first.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    threshold: Vec<f32>,
}

#[derive(clap::Args, Debug)]
struct PredictArgs {
    /// Checkpoint (or a run folder for its best.safetensors); the model config is read
    /// from its metadata. Several predict with
    /// their ensemble (the mean of their probability maps), as `tgc eval` does.
    #[arg(long, required = true, num_args = 1..)]
    checkpoint: Vec<PathBuf>,
    /// Input image (PNG; grey or RGB).
    #[arg(
        long,
        required_unless_present_any = ["volume", "list"],
        conflicts_with_all = ["volume", "list"]
    )]
    image: Option<PathBuf>,
    /// The primary text prompt (a report sentence).
    #[arg(long, required_unless_present_any = ["volume", "list"], conflicts_with = "list")]
    text: Option<String>,
    /// Many images in one run (the model loads once): a CSV file with the columns
    /// `image` and `text`, optionally `aux_text` (else derived from `text` as for --text)
    /// and `out` (the mask's file name, default `<image stem>.png`). Image paths are
    /// relative to the CSV file's folder; --out (and --overlay) are then folders.
    #[arg(long, conflicts_with_all = ["volume", "aux_text"])]
    list: Option<PathBuf>,
    /// A CT volume (.nii / .nii.gz) instead of --image: every axial slice is segmented
    /// once per organ in --organs and --out receives a u8 NIfTI label map (organ i of the
    /// list = label i, background 0; per voxel the organ of highest probability above
    /// --threshold) with the input's header.
    #[arg(long, requires = "organs")]
    volume: Option<PathBuf>,
    /// Comma-separated organ prompts for --volume, e.g. spleen,liver.
    #[arg(long, value_delimiter = ',')]
    organs: Vec<String>,
    /// HU window level for --volume (abdomen: 40).
    #[arg(long, default_value_t = 40.0)]
    window_level: f32,
    /// HU window width for --volume (abdomen: 400).
    #[arg(long, default_value_t = 400.0)]
    window_width: f32,
    /// Auxiliary prompt for DATE (default: the built-in rewriter applied to --text
    /// with --modality, as in training).
    #[arg(long)]
    aux_text: Option<String>,
    /// Modality for the default auxiliary prompt ("Chest X-ray", "Chest CT").
    #[arg(long, default_value = "Chest X-ray")]
    modality: String,
    /// Output mask PNG (0 / 255). Written at the input image's size (the label-size
    /// prediction resized with nearest neighbour), or at the label size with
    /// --label-size-output. With --list, the folder the masks are written to.
    #[arg(long)]
    out: PathBuf,
    /// Keep the mask at the model's label size instead of the input image size.
    #[arg(long)]
    label_size_output: bool,
    /// Also write an overlay PNG (prediction contour and the prompt as caption). With
    /// --list, a folder that receives one overlay per row, named as its mask.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Probability threshold of the mask.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Frozen CLIP weights (default: run.json next to the checkpoint, else random).
    #[arg(long)]
    clip_weights: Option<String>,
    /// Test-time augmentation: none, or flip (also the mirrored image with "left" and
    /// "right" swapped in the prompts; the two probability maps averaged, twice the cost).
    #[arg(long, default_value = "none")]
    tta: Tta,
}

#[derive(clap::Args, Debug)]
struct InfoArgs {
    /// Model preset: paper, cpu or tiny (default: the file's, else cpu).
    #[arg(long)]
    preset: Option<String>,
    /// Run file whose preset and model-table overrides are applied.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The model of a checkpoint (or a run folder's best.safetensors) instead: its config
    /// is read from the checkpoint's metadata.
    #[arg(long, conflicts_with_all = ["preset", "config"])]
    checkpoint: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct SimilarityArgs {
    /// Input image (PNG).
    #[arg(long)]
    image: PathBuf,
    /// Text prompt.
    #[arg(long)]
    text: String,
    /// Output heat-map PNG.
    #[arg(long)]
    out: PathBuf,
    /// Frozen CLIP weights: random, a safetensors file, a folder or hub:REPO.
    #[arg(long, default_value = "random")]
    clip_weights: String,
    /// Preset whose CLIP architecture and input size are used.
    #[arg(long, default_value = "cpu")]
    preset: String,
}

#[derive(clap::Args, Debug)]
struct CacheArgs {
    /// LViT dataset folder.
    #[arg(
        long,
        conflicts_with = "phantoms",
        required_unless_present = "phantoms"
    )]
    data: Option<PathBuf>,
    /// Synthetic phantoms instead: ct or cxr (the 640 training images, seed 1).
    #[arg(long)]
    phantoms: Option<String>,
    /// Split of the LViT folder: train, val or test.
    #[arg(long, default_value = "train")]
    split: String,
    /// Cache folder (pass the same folder as train.cache_dir when training).
    #[arg(long)]
    out: PathBuf,
    /// Model preset: paper, cpu or tiny.
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// Frozen CLIP weights: random, a safetensors file, a folder or hub:REPO.
    #[arg(long, default_value = "random")]
    clip_weights: String,
    /// Also cache the horizontally flipped variant (training uses flips by default).
    #[arg(long)]
    flip: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

fn main() {
    tgc_train::tune_cpu_threads();
    tgc_train::retain_freed_memory();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Info(a) => info(a),
        cmd => device(&cli.device).and_then(|dev| match cmd {
            Cmd::Train(a) => train(a, &dev),
            Cmd::Eval(a) => eval(a, &dev),
            Cmd::Predict(a) => predict(a, &dev),
            Cmd::Similarity(a) => similarity(a, &dev),
            Cmd::Cache(a) => cache(a, &dev),
            Cmd::Info(_) => unreachable!("handled above"),
        }),
    };
    if let Err(e) = res {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn preprocess_of(cfg: &TgcConfig) -> Preprocess {
    Preprocess {
        clip_size: cfg.clip_size,
        cnn_size: cfg.cnn_size,
        label_size: cfg.label_size,
    }
}

/// The `--device` flag as a device; a GPU is announced on stderr (the CPU, the common
/// case, is not).
fn device(spec: &str) -> Result<Device> {
    let dev = tgc_model::select_device(spec)?;
    if !dev.is_cpu() {
        eprintln!("device: {:?}", dev.location());
    }
    Ok(dev)
}

fn build_model(cfg: TgcConfig, weights: &WeightSource, dev: &Device) -> Result<TgcNet> {
    TgcNet::load(cfg, weights, dev).context("building the model")
}

/// What `tgc train` writes next to its checkpoints so later commands can find the
/// frozen weights.
#[derive(serde::Serialize, serde::Deserialize)]
struct RunRecord {
    clip_weights: String,
    data: Option<PathBuf>,
    phantoms: Option<String>,
    /// With `val_volumes` resolved: `tgc eval --volumes ROOT --last-volumes N` scores the
    /// validation volumes.
    #[serde(default)]
    volumes: Option<run::VolumesSpec>,
    model: TgcConfig,
    train: tgc_train::TrainConfig,
}

fn train(a: TrainArgs, dev: &Device) -> Result<()> {
    let file = match &a.config {
        Some(p) => RunFile::read(p)?,
        None => RunFile::default(),
    };
    let preset = a
        .preset
        .clone()
        .or(file.preset.clone())
        .unwrap_or_else(|| "cpu".into());
    let cfg = run::model_config(&preset, file.model.as_ref())?;
    // Flags win over the file; --data, --phantoms and --volumes each replace all three
    // file fields (--volumes keeps the rest of the file's [volumes] table).
    let (data, phantoms, mut volumes) =
        if a.data.is_some() || a.phantoms.is_some() || a.volumes.is_some() {
            let volumes = a.volumes.clone().map(|root| run::VolumesSpec {
                root: Some(root),
                ..file.volumes.clone().unwrap_or_default()
            });
            (a.data.clone(), a.phantoms.clone(), volumes)
        } else {
            (
                file.data.clone(),
                file.phantoms.clone(),
                file.volumes.clone(),
            )
        };
    let out = a
        .out
        .clone()
        .or(file.out.clone())
        .unwrap_or_else(|| "runs/tgc".into());
    let clip_spec = a
        .clip_weights
        .clone()
        .or(file.clip_weights.clone())
        .unwrap_or_else(|| "random".into());
    let base = match &volumes {
        Some(_) => run::default_train_volumes(),
        None => run::default_train(data.as_deref()),
    };
    let tc: tgc_train::TrainConfig = run::apply_overrides(&base, file.train.as_ref(), "train")?;
    let sources = [data.is_some(), phantoms.is_some(), volumes.is_some()];
    if sources.iter().filter(|&&s| s).count() > 1 {
        bail!("more than one of data, phantoms and volumes is set; choose one");
    }
    if data.is_none() && (file.train_sample.is_some() || file.val_sample.is_some()) {
        bail!(
            "train_sample and val_sample apply to real data (data = \"DIR\" or --data) only; \
             use train_count and val_count for phantoms"
        );
    }
    let (train_ds, val_ds) = match (&data, &phantoms) {
        _ if volumes.is_some() => {
            let spec = volumes.as_mut().context("volumes")?;
            let split = run::volume_split(spec)?;
            spec.val_volumes = Some(split.val_volumes);
            (split.train, split.val)
        }
        (Some(root), None) => (
            run::pick(
                run::lvit(root, tgc_data::Split::Train)?,
                file.train_count,
                file.train_sample,
                "train",
            )?,
            run::pick(
                run::lvit(root, tgc_data::Split::Val)?,
                file.val_count,
                file.val_sample,
                "val",
            )?,
        ),
        (None, Some(kind)) => {
            let kind = run::phantom_kind(kind)?;
            (
                run::phantoms(
                    kind,
                    true,
                    file.train_count.unwrap_or(run::PHANTOM_TRAIN),
                    cfg.label_size,
                ),
                run::phantoms(
                    kind,
                    false,
                    file.val_count.unwrap_or(run::PHANTOM_VAL),
                    cfg.label_size,
                ),
            )
        }
        (Some(_), Some(_)) => bail!("both data and phantoms are set; choose one"),
        (None, None) => {
            bail!("no data: pass --data DIR, --phantoms ct|cxr or --volumes DIR (or set data, phantoms or [volumes] in run.toml)")
        }
    };
    if train_ds.is_empty() || val_ds.is_empty() {
        bail!(
            "empty dataset: {} training and {} validation images",
            train_ds.len(),
            val_ds.len()
        );
    }
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    let record = RunRecord {
        clip_weights: clip_spec.clone(),
        data: data.clone(),
        phantoms: phantoms.clone(),
        volumes: volumes.clone(),
        model: cfg.clone(),
        train: tc.clone(),
    };
    let rec_path = out.join("run.json");
    std::fs::write(&rec_path, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("cannot write {}", rec_path.display()))?;

    let pre = preprocess_of(&cfg);
    println!(
        "preset {preset}: {} train / {} val images ({}; {}), out {}",
        train_ds.len(),
        val_ds.len(),
        train_ds.name(),
        val_ds.name(),
        out.display()
    );
    let model = build_model(cfg, &run::weight_source(&clip_spec), dev)?;
    let counts = model.param_counts();
    println!(
        "trainable parameters: {} ({:?}); frozen towers: {}",
        counts.trainable, counts.per_module, counts.frozen
    );
    let mut trainer = Trainer::new(&model, tc, train_ds, val_ds, pre, &out)?;
    if a.resume {
        let last = trainer.last_checkpoint();
        if last.exists() {
            trainer
                .resume(&last)
                .with_context(|| format!("resuming from {}", last.display()))?;
            println!("resumed from {} (step {})", last.display(), trainer.steps());
        } else {
            println!("no {} yet; starting fresh", last.display());
        }
    }
    let summary = trainer.fit()?;
    if summary.best_checkpoint.is_file() && summary.best_val_dice.is_finite() {
        println!(
            "steps {}; best checkpoint {}",
            summary.steps,
            summary.best_checkpoint.display()
        );
        println!("best val Dice: {:.4}", summary.best_val_dice);
    } else {
        // max_steps stopped training inside the first epoch, before any validation:
        // validate the last weights and save them on their own.
        let (m, _) = trainer.validate()?;
        let path = out.join("final.safetensors");
        model
            .save_weights(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!(
            "steps {}; stopped by max_steps before the end of an epoch (no best checkpoint \
             yet); last weights {}",
            summary.steps,
            path.display()
        );
        println!("best val Dice: {:.4} (last weights)", m.dice);
    }
    Ok(())
}

fn checkpoint_config(path: &Path) -> Result<TgcConfig> {
    if !path.is_file() {
        bail!("checkpoint {} not found", path.display());
    }
    let ck = tgc_train::load_checkpoint(path, &Device::Cpu)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let json = ck.meta(CONFIG_METADATA_KEY)?;
    let cfg = TgcConfig::from_json(json).with_context(|| {
        format!(
            "checkpoint {}: invalid model config in metadata `{CONFIG_METADATA_KEY}`",
            path.display()
        )
    })?;
    cfg.validate()
        .with_context(|| format!("checkpoint {}", path.display()))?;
    Ok(cfg)
}

/// `--clip-weights`, else the `run.json` next to the checkpoint, else random.
fn clip_for_checkpoint(flag: Option<&str>, checkpoint: &Path) -> String {
    if let Some(s) = flag {
        return s.to_string();
    }
    let rec = checkpoint
        .parent()
        .map(|d| d.join("run.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("clip_weights")?.as_str().map(String::from));
    rec.unwrap_or_else(|| "random".into())
}

/// A `--checkpoint` argument as a file: a run folder stands for its best.safetensors
/// (final.safetensors when max_steps ended the run inside its first epoch).
fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    ["best.safetensors", "final.safetensors"]
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "run folder {} holds no best.safetensors or final.safetensors",
                path.display()
            )
        })
}

fn load_trained(checkpoint: &Path, clip_flag: Option<&str>, dev: &Device) -> Result<TgcNet> {
    let checkpoint = &resolve_checkpoint(checkpoint)?;
    let cfg = checkpoint_config(checkpoint)?;
    let clip = clip_for_checkpoint(clip_flag, checkpoint);
    let model = build_model(cfg, &run::weight_source(&clip), dev)?;
    model
        .load_weights(checkpoint)
        .with_context(|| format!("loading weights from {}", checkpoint.display()))?;
    Ok(model)
}

/// The checkpoints of an ensemble (one or more), each with its own frozen CLIP weights
/// (`--clip-weights`, else its run.json); they must read the same input sizes.
fn load_ensemble(
    checkpoints: &[PathBuf],
    clip_flag: Option<&str>,
    dev: &Device,
) -> Result<Vec<TgcNet>> {
    let mut models: Vec<TgcNet> = Vec::with_capacity(checkpoints.len());
    for path in checkpoints {
        let model = load_trained(path, clip_flag, dev)?;
        if let Some(first) = models.first() {
            let sizes = |c: &TgcConfig| (c.clip_size, c.cnn_size, c.label_size);
            let (want, got) = (sizes(first.config()), sizes(model.config()));
            if want != got {
                bail!(
                    "checkpoint {} reads (clip, cnn, label) sizes {got:?}, but {} reads \
                     {want:?}: the members of an ensemble must share the input sizes",
                    path.display(),
                    checkpoints[0].display()
                );
            }
        }
        models.push(model);
    }
    Ok(models)
}

fn eval(a: EvalArgs, dev: &Device) -> Result<()> {
    // clap's `requires` gives way to the conflict with --data / --phantoms.
    if a.volumes.is_none() && (a.layout.is_some() || !a.organs.is_empty()) {
        bail!("--layout and --organs apply to --volumes only");
    }
    if a.volumes.is_some() && (a.by_size || a.threshold != [0.5]) {
        bail!(
            "--by-size and --threshold apply to 2D images only: --volumes labels each voxel \
             with the organ of highest probability above 0.5"
        );
    }
    let models = load_ensemble(&a.checkpoint, a.clip_weights.as_deref(), dev)?;
    let cfg = models[0].config().clone();
    if let Some(root) = &a.volumes {
        return eval_volumes(&a, root, &models);
    }
    let ds: Arc<dyn SegDataset> = match (&a.data, &a.phantoms) {
        (Some(root), _) => {
            let ds = run::lvit(root, run::split(&a.split)?)?;
            match a.sample {
                Some(0) => bail!("--sample 0: sample at least one image"),
                Some(n) => run::evenly_spaced(ds, n),
                None => run::head(ds, a.count),
            }
        }
        (None, Some(kind)) => run::phantoms(
            run::phantom_kind(kind)?,
            false,
            a.count.unwrap_or(run::PHANTOM_VAL),
            cfg.label_size,
        ),
        (None, None) => bail!("pass --data DIR, --phantoms ct|cxr or --volumes DIR"),
    };
    if ds.is_empty() {
        bail!("the dataset {} has no images", ds.name());
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    if let Some(t) = a.threshold.iter().find(|t| !(0.0..=1.0).contains(*t)) {
        bail!("--threshold {t}: a threshold is a probability in [0, 1]");
    }
    let pre = preprocess_of(&cfg);
    // Every threshold is scored on the same probability maps, so a sweep costs one pass.
    let mut sweep: Vec<SegMetrics> = a
        .threshold
        .iter()
        .map(|&t| SegMetrics::with_threshold(t))
        .collect();
    let mut by_size = LesionSizeBreakdown::new(a.threshold[0]);
    let mut scores = vec![];
    let mut shares = vec![];
    let members: Vec<&TgcNet> = models.iter().collect();
    evaluate_ensemble(
        &members,
        ds.clone(),
        pre,
        a.batch_size,
        a.progress,
        a.tta,
        |batch, probs| {
            for m in sweep.iter_mut() {
                m.update(probs, &batch.masks)?;
            }
            by_size.update(probs, &batch.masks)?;
            shares.extend(LesionSizeBreakdown::shares(&batch.masks)?);
            for i in 0..batch.len() {
                let mut one = SegMetrics::with_threshold(a.threshold[0]);
                one.update(&probs.narrow(0, i, 1)?, &batch.masks.narrow(0, i, 1)?)?;
                let s = one.summary();
                scores.push(ImageScore {
                    id: batch.ids[i].clone(),
                    dice: s.dice,
                    iou: s.iou,
                });
            }
            Ok(())
        },
    )?;
    println!("dataset   {} ({} images)", ds.name(), ds.len());
    if models.len() > 1 {
        println!("ensemble  {} checkpoints", models.len());
    }
    if let [m] = sweep.as_slice() {
        let m = m.summary();
        println!("threshold {}", a.threshold[0]);
        println!("metric    value");
        println!("Dice      {:.4}", m.dice);
        println!("mIoU      {:.4}", m.iou);
        println!("microDice {:.4}", m.micro_dice);
        println!("n         {}", m.n_images);
    } else {
        println!("threshold Dice   mIoU   microDice");
        for (t, m) in a.threshold.iter().zip(&sweep) {
            let m = m.summary();
            println!("{:<9} {:.4} {:.4} {:.4}", t, m.dice, m.iou, m.micro_dice);
        }
        println!("n         {}", sweep[0].summary().n_images);
    }
    if a.by_size {
        println!(
            "by lesion share of the image (threshold {}):",
            a.threshold[0]
        );
        println!("lesion      images Dice   mIoU   lost");
        for g in by_size.groups() {
            if g.summary.n_images == 0 {
                continue;
            }
            println!(
                "{:<11} {:<6} {:.4} {:.4} {:.4}",
                g.label, g.summary.n_images, g.summary.dice, g.summary.iou, g.dice_lost
            );
        }
    }
    if let Some(path) = &a.csv {
        let mut w = csv::Writer::from_path(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_record(["id", "dice", "iou", "lesion_share"])?;
        for (s, share) in scores.iter().zip(&shares) {
            w.write_record([
                s.id.clone(),
                format!("{:.6}", s.dice),
                format!("{:.6}", s.iou),
                format!("{share:.6}"),
            ])?;
        }
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("per-image scores: {}", path.display());
    }
    Ok(())
}

/// `tgc eval --volumes`: 3D Dice per volume and organ of the reassembled label maps.
fn eval_volumes(a: &EvalArgs, root: &Path, models: &[TgcNet]) -> Result<()> {
    let layout = a.layout.clone().unwrap_or_else(|| "msd".into());
    let suffix = match (layout.as_str(), a.split.as_str()) {
        ("word", "train") => "Tr",
        ("word", "val") => "Val",
        ("word", "test") => "Ts",
        ("word", other) => bail!("--split {other}: expected train, val or test"),
        _ => "Tr",
    };
    if a.organs.iter().any(|o| o.trim().is_empty()) {
        bail!("--organs: an empty organ name");
    }
    let spec = run::VolumesSpec {
        root: Some(root.to_path_buf()),
        layout,
        organs: (!a.organs.is_empty()).then(|| a.organs.iter().map(|o| o.trim().into()).collect()),
        val_volumes: None,
        window_level: a.window_level,
        window_width: a.window_width,
    };
    let ds = run::open_volumes(&spec, suffix)?;
    let first = match a.last_volumes {
        Some(0) => bail!("--last-volumes must be positive"),
        Some(n) if n > ds.num_volumes() => bail!(
            "--last-volumes {n}: {} holds {} volumes",
            root.display(),
            ds.num_volumes()
        ),
        Some(n) => ds.num_volumes() - n,
        None => 0,
    };
    let end = a
        .count
        .map_or(ds.num_volumes(), |c| (first + c).min(ds.num_volumes()));
    if end == first {
        bail!("{} holds no labelled volumes", root.display());
    }
    let n_volumes = end - first;
    let organs: Vec<(u8, String)> = ds.organs().to_vec();
    let prompts: Vec<&str> = organs.iter().map(|(_, n)| n.as_str()).collect();
    let pre = preprocess_of(models[0].config());
    let s = pre.label_size;
    let slices: usize = (first..end)
        .map(|v| {
            ds.volume_meta(v)
                .map_or(0, |(_, d, o)| o.display_dims(d)[2])
        })
        .sum();
    let bar = if a.progress {
        indicatif::ProgressBar::new(slices as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Samples run volume by volume, slice by slice, organ by organ: the first organ's
    // sample of a slice carries its image, and all organs are prompted on it at once.
    let mut volumes: Vec<VolumeAssembler> = vec![];
    for i in 0..ds.len() {
        let (v, k, o) = ds.locate(i).context("sample index out of range")?;
        if v >= end {
            break;
        }
        if v < first || o != 0 {
            continue;
        }
        if v - first == volumes.len() {
            volumes.push(VolumeAssembler::new(&ds, v)?);
        }
        let sample = ds.get(i)?;
        let probs = predict_sample(models, &pre, &sample, &prompts, &prompts, a.tta)?;
        for o in 0..organs.len() {
            volumes[v - first].add_slice(k, o, &probs[o * s * s..(o + 1) * s * s], s, s)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "dataset   {} ({n_volumes} volumes, {} organs)",
        root.display(),
        organs.len()
    );
    println!("volume organ 3D-Dice predicted-voxels true-voxels");
    let mut metrics = SegMetrics::new();
    let mut rows = vec![];
    for (v, asm) in (first..end).zip(&volumes) {
        let pred = asm.label_map();
        let truth = ds.label_volume(v)?;
        let scores = asm.score(&ds, v, &mut metrics)?;
        let name = ds
            .volume_paths(v)
            .and_then(|(img, _)| img.file_name())
            .map_or_else(
                || format!("volume{v}"),
                |f| f.to_string_lossy().into_owned(),
            );
        for (id, organ) in &organs {
            let np = pred.iter().filter(|&&x| x == *id).count();
            let nt = truth.iter().filter(|&&x| x == *id).count();
            // Absent from both: not scored (and not in the means).
            let dice = scores.get(organ).copied().flatten();
            let shown = dice.map_or("absent".to_string(), |d| format!("{d:.4}"));
            println!("{name} {organ} {shown} {np} {nt}");
            rows.push([
                name.clone(),
                organ.clone(),
                shown,
                np.to_string(),
                nt.to_string(),
            ]);
        }
    }
    let m = metrics.summary();
    for (organ, d) in &m.organ_dice {
        println!("mean 3D Dice {organ}: {d:.4}");
    }
    if let Some(d) = m.mean_organ_dice {
        println!("mean 3D Dice: {d:.4}");
    }
    if let Some(path) = &a.csv {
        let mut w = csv::Writer::from_path(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_record(["volume", "organ", "dice", "predicted_voxels", "true_voxels"])?;
        for r in &rows {
            w.write_record(r)?;
        }
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("per-volume scores: {}", path.display());
    }
    Ok(())
}

/// Nearest-neighbour resize of a row-major `h x w` plane (pixel centres).
fn resize_nearest(v: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let sy = (((y as f64 + 0.5) * h as f64 / oh as f64) as usize).min(h - 1);
        for x in 0..ow {
            let sx = (((x as f64 + 0.5) * w as f64 / ow as f64) as usize).min(w - 1);
            out.push(v[sy * w + sx]);
        }
    }
    out
}

fn predict(a: PredictArgs, dev: &Device) -> Result<()> {
    if let Some(vol) = &a.volume {
        return predict_volume(&a, vol, dev);
    }
    if let Some(list) = &a.list {
        return predict_list(&a, list, dev);
    }
    let (Some(image_path), Some(text)) = (&a.image, &a.text) else {
        bail!("pass --image and --text (or --volume and --organs, or --list)");
    };
    if text.trim().is_empty() {
        bail!("--text is empty: give the report sentence that describes the finding");
    }
    if a.aux_text.as_deref().is_some_and(|t| t.trim().is_empty()) {
        bail!("--aux-text is empty: leave it out to derive it from --text");
    }
    if !image_path.is_file() {
        bail!("image {} not found", image_path.display());
    }
    let image = read_image(image_path)
        .with_context(|| format!("cannot read image {}", image_path.display()))?;
    let models = load_ensemble(&a.checkpoint, a.clip_weights.as_deref(), dev)?;
    let job = PredictJob {
        image_path,
        text,
        aux_text: a.aux_text.as_deref(),
        out: &a.out,
        overlay: a.overlay.as_deref(),
    };
    let (ow, oh, fg) = predict_image(&a, &models, image, &job)?;
    println!(
        "mask {}x{} ({} foreground pixels, {:.2}%) -> {}",
        ow,
        oh,
        fg,
        100.0 * fg as f64 / (oh * ow) as f64,
        a.out.display()
    );
    if let Some(ov) = &a.overlay {
        println!("overlay -> {}", ov.display());
    }
    Ok(())
}

/// One image of `tgc predict`: what to segment and where the results go.
struct PredictJob<'a> {
    image_path: &'a Path,
    text: &'a str,
    aux_text: Option<&'a str>,
    out: &'a Path,
    overlay: Option<&'a Path>,
}

/// Segments `image` as `job` says with the ensemble `models` and writes its mask (and
/// overlay); returns the mask's width, height and foreground pixel count.
fn predict_image(
    a: &PredictArgs,
    models: &[TgcNet],
    image: tgc_data::ImageF32,
    job: &PredictJob,
) -> Result<(usize, usize, usize)> {
    let cfg = models[0].config();
    let pre = preprocess_of(cfg);
    let (h, w) = (image.height, image.width);
    let aux = job
        .aux_text
        .map_or_else(|| radiology_rewrite(job.text, &a.modality), String::from);
    // The same resampling and normalisation as the training loader (no augmentation).
    let sample = Sample {
        id: job.image_path.display().to_string(),
        image,
        mask: Mask::zeros(h, w),
        caption: job.text.to_string(),
        aux_caption: Some(aux.clone()),
    };
    let probs = predict_sample(models, &pre, &sample, &[job.text], &[aux.as_str()], a.tta)?;
    let s = cfg.label_size;
    let (oh, ow, plane) = if a.label_size_output {
        (s, s, probs)
    } else {
        (h, w, resize_nearest(&probs, s, s, h, w))
    };
    let mask: Vec<u8> = plane
        .iter()
        .map(|&v| if v > a.threshold { 255 } else { 0 })
        .collect();
    let fg = mask.iter().filter(|&&v| v > 0).count();
    image::GrayImage::from_raw(ow as u32, oh as u32, mask)
        .context("mask buffer size")?
        .save(job.out)
        .with_context(|| format!("cannot write {}", job.out.display()))?;
    if let Some(ov) = job.overlay {
        // The overlay is drawn at the mask's size on the grey image.
        let c = sample.image.channels;
        let grey: Vec<f32> = (0..h * w)
            .map(|i| {
                (0..c)
                    .map(|k| sample.image.data[k * h * w + i])
                    .sum::<f32>()
                    / c as f32
            })
            .collect();
        let grey = if (oh, ow) == (h, w) {
            grey
        } else {
            resize_nearest(&grey, h, w, oh, ow)
        };
        let img_t = Tensor::from_vec(grey, (oh, ow), &Device::Cpu)?;
        let m_t = Tensor::from_vec(plane, (oh, ow), &Device::Cpu)?;
        tgc_train::write_overlay(&img_t, &m_t, None, job.text, ov)
            .with_context(|| format!("cannot write overlay {}", ov.display()))?;
    }
    Ok((ow, oh, fg))
}

/// One row of a `tgc predict --list` file.
#[derive(serde::Deserialize)]
struct ListRow {
    image: PathBuf,
    text: String,
    #[serde(default)]
    aux_text: Option<String>,
    #[serde(default)]
    out: Option<PathBuf>,
}

/// The rows of a `--list` file, checked before any model loads: every image exists,
/// every prompt is non-empty and no two rows write the same mask. Returns (image path,
/// row, mask file name), the image resolved against the file's folder.
fn read_list(list: &Path) -> Result<Vec<(PathBuf, ListRow, PathBuf)>> {
    let base = list.parent().unwrap_or(Path::new("."));
    let mut reader = csv::Reader::from_path(list)
        .with_context(|| format!("cannot read the list {}", list.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("cannot read the header of {}", list.display()))?
        .clone();
    let mut rows = vec![];
    let mut seen: std::collections::HashMap<PathBuf, u64> = Default::default();
    for record in reader.records() {
        let record = record.with_context(|| format!("cannot read {}", list.display()))?;
        // The line the record starts on, as an editor numbers it (the header is line 1).
        let line = record.position().map_or(0, |p| p.line());
        let row: ListRow = record.deserialize(Some(&headers)).with_context(|| {
            format!(
                "{} line {line}: expected the columns image,text[,aux_text][,out]",
                list.display()
            )
        })?;
        if row.text.trim().is_empty() {
            bail!("{} line {line}: the text is empty", list.display());
        }
        if row.aux_text.as_deref().is_some_and(|t| t.trim().is_empty()) {
            bail!(
                "{} line {line}: aux_text is empty (leave the column out to derive it)",
                list.display()
            );
        }
        let image = base.join(&row.image);
        if !image.is_file() {
            bail!(
                "{} line {line}: image {} not found",
                list.display(),
                image.display()
            );
        }
        // An empty field reads as None: the default name.
        let name = match &row.out {
            Some(o) => o.clone(),
            None => {
                let stem = row.image.file_stem().with_context(|| {
                    format!("{} line {line}: the image has no file name", list.display())
                })?;
                let mut name = stem.to_os_string();
                name.push(".png");
                PathBuf::from(name)
            }
        };
        if let Some(first) = seen.insert(name.clone(), line) {
            bail!(
                "{} lines {first} and {line} both write {}: give one of them an out column",
                list.display(),
                name.display()
            );
        }
        rows.push((image, row, name));
    }
    if rows.is_empty() {
        bail!("{} lists no images", list.display());
    }
    Ok(rows)
}

/// `tgc predict --list`: every row of the CSV file with one loaded model.
fn predict_list(a: &PredictArgs, list: &Path, dev: &Device) -> Result<()> {
    let rows = read_list(list)?;
    let models = load_ensemble(&a.checkpoint, a.clip_weights.as_deref(), dev)?;
    let bar = indicatif::ProgressBar::new(rows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("predict {bar:30} {pos}/{len} [{elapsed}<{eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut foreground = 0usize;
    for (image_path, row, name) in &rows {
        let image = read_image(image_path)
            .with_context(|| format!("cannot read image {}", image_path.display()))?;
        let out = a.out.join(name);
        let overlay = a.overlay.as_ref().map(|d| d.join(name));
        // An out name may hold a subfolder.
        for file in std::iter::once(&out).chain(&overlay) {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
        }
        let job = PredictJob {
            image_path,
            text: &row.text,
            aux_text: row.aux_text.as_deref(),
            out: &out,
            overlay: overlay.as_deref(),
        };
        let (_, _, fg) = predict_image(a, &models, image, &job)?;
        foreground += (fg > 0) as usize;
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{} masks ({} with foreground) -> {}",
        rows.len(),
        foreground,
        a.out.display()
    );
    if let Some(ov) = &a.overlay {
        println!("overlays -> {}", ov.display());
    }
    Ok(())
}

/// Probabilities `K x S x S` (flat, `S` the label size) of `sample` for the `K` prompts,
/// preprocessed as the training loader does, averaged over the ensemble `models`. With
/// [`Tta::Flip`] the mirrored image is segmented too, with "left" and "right" swapped in
/// the prompts, and its maps are mirrored back and averaged in (as `tgc eval --tta flip`
/// does).
fn predict_sample(
    models: &[TgcNet],
    pre: &Preprocess,
    sample: &Sample,
    prompts: &[&str],
    aux: &[&str],
    tta: Tta,
) -> Result<Vec<f32>> {
    let pass = |params: &AugmentParams, prompts: &[&str], aux: &[&str]| -> Result<Vec<f32>> {
        let p = pre.apply(sample, params);
        let mut mean = vec![0f32; prompts.len() * pre.label_size * pre.label_size];
        for model in models {
            let dev = model.device();
            let clip = Tensor::from_vec(p.clip.clone(), (3, pre.clip_size, pre.clip_size), dev)?;
            let cnn = Tensor::from_vec(p.cnn.clone(), (3, pre.cnn_size, pre.cnn_size), dev)?;
            let probs = model.predict(&clip, &cnn, prompts, Some(aux))?;
            let probs = probs.flatten_all()?.to_vec1::<f32>()?;
            for (m, v) in mean.iter_mut().zip(probs) {
                *m += v / models.len() as f32;
            }
        }
        Ok(mean)
    };
    let mut probs = pass(&AugmentParams::default(), prompts, aux)?;
    if tta == Tta::Flip {
        let swap = |v: &[&str]| v.iter().map(|t| swap_left_right(t)).collect::<Vec<_>>();
        let (prompts, aux) = (swap(prompts), swap(aux));
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let aux: Vec<&str> = aux.iter().map(String::as_str).collect();
        let flip = AugmentParams {
            hflip: true,
            ..AugmentParams::default()
        };
        let mirrored = pass(&flip, &prompts, &aux)?;
        let s = pre.label_size;
        for (row, back) in probs.chunks_mut(s).zip(mirrored.chunks(s)) {
            for (x, v) in row.iter_mut().enumerate() {
                *v = 0.5 * (*v + back[s - 1 - x]);
            }
        }
    }
    Ok(probs)
}

/// Segments every axial slice of a volume once per organ and writes the label map.
fn predict_volume(a: &PredictArgs, path: &Path, dev: &Device) -> Result<()> {
    if a.organs.is_empty() || a.organs.iter().any(|o| o.trim().is_empty()) {
        bail!("--organs needs a comma-separated list of organ names");
    }
    if a.organs.len() > 255 {
        bail!("at most 255 organs fit a u8 label map");
    }
    let vol =
        Volume::read(path).with_context(|| format!("cannot read volume {}", path.display()))?;
    let models = load_ensemble(&a.checkpoint, a.clip_weights.as_deref(), dev)?;
    let cfg = models[0].config().clone();
    let pre = preprocess_of(&cfg);
    let window = HuWindow {
        level: a.window_level,
        width: a.window_width,
    };
    let [w, h, n] = vol.display_dims();
    let organs: Vec<&str> = a.organs.iter().map(|o| o.trim()).collect();
    let k = organs.len();
    let s = cfg.label_size;
    let mut labels = vec![0u8; w * h * n];
    let bar = indicatif::ProgressBar::new(n as u64);
    for z in 0..n {
        let grey: Vec<f32> = vol.slice(z).iter().map(|&hu| window.apply(hu)).collect();
        let sample = Sample {
            id: format!("slice{z}"),
            image: tgc_data::ImageF32::grey(h, w, grey)?,
            mask: Mask::zeros(h, w),
            caption: String::new(),
            aux_caption: None,
        };
        // The organ name is both prompts, as NiftiVolumeDataset's samples have it.
        let probs = predict_sample(&models, &pre, &sample, &organs, &organs, a.tta)?;
        let planes: Vec<Vec<f32>> = (0..k)
            .map(|o| resize_nearest(&probs[o * s * s..(o + 1) * s * s], s, s, h, w))
            .collect();
        let dst = &mut labels[z * w * h..(z + 1) * w * h];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut best = (0u8, a.threshold);
            for (o, plane) in planes.iter().enumerate() {
                if plane[i] > best.1 {
                    best = (o as u8 + 1, plane[i]);
                }
            }
            *d = best.0;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Display order back to the file's voxel order.
    let mut vox = vec![0u8; labels.len()];
    for z in 0..n {
        for r in 0..h {
            for c in 0..w {
                vox[vol.orientation.voxel_index(vol.dims, [c, r, z])] = labels[(z * h + r) * w + c];
            }
        }
    }
    write_volume_u8(&a.out, &vol.header, vol.dims, &vox)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    for (o, name) in organs.iter().enumerate() {
        let count = vox.iter().filter(|&&v| v as usize == o + 1).count();
        println!("label {} {name}: {count} voxels", o + 1);
    }
    println!(
        "label map {}x{}x{} -> {}",
        vol.dims[0],
        vol.dims[1],
        vol.dims[2],
        a.out.display()
    );
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let (cfg, what) = match &a.checkpoint {
        Some(path) => {
            let path = resolve_checkpoint(path)?;
            let what = format!("checkpoint {}", path.display());
            (checkpoint_config(&path)?, what)
        }
        None => {
            let file = match &a.config {
                Some(p) => RunFile::read(p)?,
                None => RunFile::default(),
            };
            let preset = a
                .preset
                .or(file.preset.clone())
                .unwrap_or_else(|| "cpu".into());
            let cfg = run::model_config(&preset, file.model.as_ref())?;
            (cfg, format!("preset {preset}"))
        }
    };
    // Counting needs no weights: the frozen towers get deterministic random values.
    let model = build_model(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu)?;
    let c = model.param_counts();
    println!("{what} (frozen towers built with random weights: counting only)");
    println!(
        "inputs: CLIP {0}x{0}, CNN {1}x{1}, labels {2}x{2}, prompts {3} tokens",
        cfg.clip_size, cfg.cnn_size, cfg.label_size, cfg.max_text_len
    );
    println!(
        "modes: sse {:?}, text {:?}, vlcm {:?}, image_only {}",
        cfg.sse.mode, cfg.text_mode, cfg.vlcm.variant, cfg.image_only
    );
    println!("{:<12} {:>12}", "module", "trainable");
    for (k, v) in &c.per_module {
        println!("{k:<12} {v:>12}");
    }
    println!("{:<12} {:>12}", "total", c.trainable);
    println!("{:<12} {:>12}", "frozen", c.frozen);
    Ok(())
}

fn similarity(a: SimilarityArgs, dev: &Device) -> Result<()> {
    if !a.image.is_file() {
        bail!("image {} not found", a.image.display());
    }
    let img = image::open(&a.image)
        .with_context(|| format!("cannot read image {}", a.image.display()))?;
    let cfg = TgcConfig::preset(&a.preset)?;
    let towers = tgc_model::FrozenTowers::load(&cfg, &run::weight_source(&a.clip_weights), dev)
        .context("loading CLIP")?;
    let pixels = tgc_clip::preprocess(&img, cfg.clip_size, dev)?;
    let (ids, mask) = towers.tokenizer().encode_padded(&a.text)?;
    let n = ids.len();
    let ids = Tensor::from_vec(ids, n, dev)?;
    let mask = Tensor::from_vec(mask, n, dev)?;
    let map = tgc_clip::similarity_map(towers.clip(), &pixels, &ids, Some(&mask))?;
    tgc_clip::write_heatmap_png(&map, &a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let (gh, gw) = map.dims2()?;
    let v = map.flatten_all()?.to_vec1::<f32>()?;
    let lo = v.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    println!(
        "similarity map {gh}x{gw} (cosine {lo:.3} .. {hi:.3}) -> {}",
        a.out.display()
    );
    if matches!(
        run::weight_source(&a.clip_weights),
        WeightSource::Random { .. }
    ) {
        println!("note: random CLIP weights; pass --clip-weights for a meaningful map");
    }
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn cache(a: CacheArgs, dev: &Device) -> Result<()> {
    let cfg = TgcConfig::preset(&a.preset)?;
    let ds: Arc<dyn SegDataset> = match (&a.data, &a.phantoms) {
        (Some(root), _) => run::lvit(root, run::split(&a.split)?)?,
        (None, Some(kind)) => run::phantoms(
            run::phantom_kind(kind)?,
            true,
            run::PHANTOM_TRAIN,
            cfg.label_size,
        ),
        (None, None) => bail!("pass --data DIR or --phantoms ct|cxr"),
    };
    if a.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let model = build_model(cfg.clone(), &run::weight_source(&a.clip_weights), dev)?;
    let pre = preprocess_of(&cfg);
    // The same model id as the trainer's disk cache, so `train.cache_dir` finds it.
    let disk = FeatureCache::open(&a.out, &cfg.frozen_id(""))
        .with_context(|| format!("cannot open cache {}", a.out.display()))?;
    let mut store = FeatureStore::new(Some(disk), &pre, true);
    let mut passes = vec![Augment::off()];
    if a.flip {
        passes.push(Augment::always_flip());
    }
    for aug in passes {
        let loader = DataLoader::new(ds.clone(), pre, a.batch_size, None, aug, dev.clone());
        let bar = indicatif::ProgressBar::new(loader.num_batches() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("cache {bar:30} {pos}/{len} [{elapsed}<{eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        for (i, batch) in loader.epoch(0).enumerate() {
            let batch = batch?;
            store.images(&model, &batch)?;
            // Bound the memory of pending features.
            if i % 32 == 31 {
                store.flush()?;
            }
            bar.inc(1);
        }
        store.flush()?;
        bar.finish_and_clear();
    }
    let bytes = dir_size(&a.out);
    println!(
        "cached {} images{} of {} in {} ({:.1} MiB on disk)",
        ds.len(),
        if a.flip { " (and their flips)" } else { "" },
        ds.name(),
        a.out.display(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    std::io::stdout().flush().ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{predict_sample, resize_nearest};
    use candle_core::Device;
    use tgc_data::{swap_left_right, PhantomKind, SegDataset, SyntheticPhantoms};
    use tgc_model::{TgcConfig, TgcNet, WeightSource};
    use tgc_train::Tta;

    #[test]
    fn flip_tta_prediction_is_the_mean_with_the_mirrored_sample() {
        let cfg = TgcConfig::tiny();
        let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 5 }, &Device::Cpu)
            .expect("model");
        let pre = super::preprocess_of(&cfg);
        let s = cfg.label_size;
        let ds = SyntheticPhantoms::new(PhantomKind::ChestXray, 1, 4, 96);
        let sample = ds.get(0).expect("phantom");
        let (text, aux) = ("opacity in the left lung", "upper right zone");
        let plain = predict_sample(
            std::slice::from_ref(&model),
            &pre,
            &sample,
            &[text],
            &[aux],
            Tta::None,
        )
        .unwrap();
        let tta = predict_sample(
            std::slice::from_ref(&model),
            &pre,
            &sample,
            &[text],
            &[aux],
            Tta::Flip,
        )
        .unwrap();
        // The oracle: the sample mirrored by hand, its prompts swapped, a plain pass.
        let mut mirrored = sample.clone();
        for row in mirrored.image.data.chunks_mut(sample.image.width) {
            row.reverse();
        }
        let (mt, ma) = (swap_left_right(text), swap_left_right(aux));
        let back = predict_sample(
            std::slice::from_ref(&model),
            &pre,
            &mirrored,
            &[&mt],
            &[&ma],
            Tta::None,
        )
        .unwrap();
        let mut worst = 0f32;
        for k in 0..s * s {
            let (y, x) = (k / s, k % s);
            let want = 0.5 * (plain[k] + back[y * s + (s - 1 - x)]);
            worst = worst.max((tta[k] - want).abs());
        }
        assert!(worst < 1e-4, "flip TTA differs from the oracle by {worst}");
        let moved = plain.iter().zip(&tta).map(|(a, b)| (a - b).abs());
        assert!(moved.fold(0f32, f32::max) > 1e-3, "TTA changed nothing");
    }

    #[test]
    fn ensemble_prediction_is_the_mean_of_the_members() {
        let cfg = TgcConfig::tiny();
        let load = |seed| TgcNet::load(cfg.clone(), &WeightSource::Random { seed }, &Device::Cpu);
        let both = [load(5).expect("model"), load(6).expect("model")];
        let (a, b) = (&both[0], &both[1]);
        let pre = super::preprocess_of(&cfg);
        let sample = SyntheticPhantoms::new(PhantomKind::ChestXray, 1, 4, 96)
            .get(0)
            .expect("phantom");
        let (text, aux) = ("opacity in the left lung", "upper right zone");
        for tta in [Tta::None, Tta::Flip] {
            let one = |m: &TgcNet| {
                predict_sample(std::slice::from_ref(m), &pre, &sample, &[text], &[aux], tta)
                    .unwrap()
            };
            let (pa, pb) = (one(a), one(b));
            let pe = predict_sample(&both, &pre, &sample, &[text], &[aux], tta).unwrap();
            let worst = (0..pe.len())
                .map(|k| (pe[k] - 0.5 * (pa[k] + pb[k])).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{tta:?}: off the members' mean by {worst}");
            let spread = (0..pa.len())
                .map(|k| (pa[k] - pb[k]).abs())
                .fold(0f32, f32::max);
            assert!(spread > 1e-3, "{tta:?}: the members agree to {spread}");
        }
    }

    #[test]
    fn nearest_resize_by_hand() {
        // 2x2 -> 4x4: each source pixel becomes a 2x2 block.
        let v = [1.0, 2.0, 3.0, 4.0];
        let up = resize_nearest(&v, 2, 2, 4, 4);
        #[rustfmt::skip]
        let want = [1.0, 1.0, 2.0, 2.0,
                    1.0, 1.0, 2.0, 2.0,
                    3.0, 3.0, 4.0, 4.0,
                    3.0, 3.0, 4.0, 4.0];
        assert_eq!(up, want);
        // 4x4 -> 2x2 samples the pixel centres 1 and 3 (0-based: indices 1 and 3).
        let v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        assert_eq!(resize_nearest(&v, 4, 4, 2, 2), vec![5.0, 7.0, 13.0, 15.0]);
        // 3 wide -> 2 wide: centres 0.75 and 2.25 -> columns 0 and 2.
        assert_eq!(resize_nearest(&[1.0, 2.0, 3.0], 1, 3, 1, 2), vec![1.0, 3.0]);
    }
}
