//! The main job: train TGC-Net on MosMedData+ (lung CT slices with reports).
//!
//! With no arguments it trains the `tiny` preset on built-in synthetic CT phantoms whose
//! captions decide which lesions are the target, then compares against the image-only
//! variant trained the same number of steps; it finishes in minutes on two cores:
//!
//! ```sh
//! cargo run --release --example train_mosmed
//! ```
//!
//! With `--data DIR` (a MosMedData+ folder in LViT layout: `Train_Folder`,
//! `Val_Folder`, each with `img/`, `labelcol/` and `*_text.xlsx`) it trains with the
//! paper's settings for MosMedData+ (lr 5e-4, batch 8) on the chosen preset
//! (`--preset cpu` by default, `paper` on a GPU with `--clip-weights`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use tgc::data::{LvitDataset, PhantomKind, Preprocess, SegDataset, Split, SyntheticPhantoms};
use tgc::model::{FrozenTowers, TgcConfig, TgcNet, WeightSource};
use tgc::train::{TrainConfig, Trainer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Train TGC-Net on MosMedData+ (or on synthetic CT phantoms with no --data)")]
struct Args {
    /// Where to train: auto (a CUDA or Metal GPU when built with `--features cuda` or
    /// `--features metal` and one answers, else the CPU), cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: String,
    /// MosMedData+ root in LViT layout; none trains on synthetic CT phantoms.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model preset: tiny, cpu or paper (default: tiny on phantoms, cpu on real data).
    #[arg(long)]
    preset: Option<String>,
    /// CLIP weights: a safetensors file or folder, `hub:<repo>`, or `random` (no
    /// pretrained CLIP is reachable offline).
    #[arg(long, default_value = "random")]
    clip_weights: String,
    /// Epochs (default: 10 on phantoms, `TrainConfig::for_phantoms`; 100 with early
    /// stopping on real data).
    #[arg(long)]
    epochs: Option<usize>,
    /// Peak learning rate (default: the paper's 5e-4 for MosMedData+; 1e-3 on phantoms,
    /// where 3e-3 left half of the seeds on the "segment every lesion" plateau).
    #[arg(long)]
    lr: Option<f64>,
    /// Output folder for checkpoints, metrics, plots and overlays.
    #[arg(long, default_value = "runs/mosmed")]
    out: PathBuf,
    /// Skip the image-only comparison run on phantoms.
    #[arg(long)]
    no_baseline: bool,
    /// Train only the image-only variant (prompts replaced by the empty string).
    #[arg(long)]
    image_only: bool,
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
    /// Seed of the trainable modules' initialisation and of the data order
    /// (`TgcNet::new_seeded`, `TrainConfig::seed`). Without it: 0 for the initialisation
    /// and `TrainConfig::seed`'s default for the data.
    #[arg(long)]
    seed: Option<u64>,
}

fn weights(spec: &str) -> WeightSource {
    match spec {
        "random" => WeightSource::Random { seed: 0 },
        s if s.starts_with("hub:") => WeightSource::hub(&s[4..]),
        s if std::path::Path::new(s).is_dir() => WeightSource::Dir(s.into()),
        s => WeightSource::File(s.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    cfg: TgcConfig,
    tc: TrainConfig,
    train: Arc<dyn SegDataset>,
    val: Arc<dyn SegDataset>,
    clip: &WeightSource,
    out: &std::path::Path,
    resume: bool,
    dev: &candle_core::Device,
    seed: u64,
) -> Result<f64> {
    let pre = Preprocess {
        clip_size: cfg.clip_size,
        cnn_size: cfg.cnn_size,
        label_size: cfg.label_size,
    };
    let towers = FrozenTowers::load(&cfg, clip, dev).context("loading the frozen towers")?;
    let model = TgcNet::new_seeded(cfg, towers, seed).context("building the model")?;
    let counts = model.param_counts();
    println!(
        "trainable parameters: {} ({:?}); frozen CLIP: {}",
        counts.trainable, counts.per_module, counts.frozen
    );
    let mut trainer = Trainer::new(&model, tc, train, val, pre, out)?;
    if resume && trainer.last_checkpoint().exists() {
        let last = trainer.last_checkpoint();
        trainer
            .resume(&last)
            .with_context(|| format!("resuming from {}", last.display()))?;
    }
    let summary = trainer.fit()?;
    Ok(summary.best_val_dice)
}

fn main() {
    tgc::train::tune_cpu_threads();
    tgc::train::retain_freed_memory();
    if let Err(e) = train() {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn train() -> Result<()> {
    let args = Args::parse();
    let clip = weights(&args.clip_weights);
    let dev = tgc::model::select_device(&args.device)?;
    let init_seed = args.seed.unwrap_or(0);
    let data_parallel = match args.data_parallel {
        0 => tgc::train::default_data_parallel(),
        n => n,
    };
    match &args.data {
        None => {
            let cfg = TgcConfig::preset(args.preset.as_deref().unwrap_or("tiny"))?;
            let size = cfg.label_size;
            let train: Arc<dyn SegDataset> =
                Arc::new(SyntheticPhantoms::new(PhantomKind::CtSlice, 640, 1, size));
            let val: Arc<dyn SegDataset> =
                Arc::new(SyntheticPhantoms::new(PhantomKind::CtSlice, 128, 2, size));
            let recipe = TrainConfig::for_phantoms();
            let tc = TrainConfig {
                epochs: args.epochs.unwrap_or(recipe.epochs),
                lr: args.lr.unwrap_or(recipe.lr),
                data_parallel,
                micro_batches: args.micro_batches,
                seed: args.seed.unwrap_or(recipe.seed),
                ..recipe
            };
            println!("training on synthetic CT phantoms (the caption names the target lesions)");
            let image_only = |cfg: &TgcConfig| -> Result<f64> {
                let mut c = cfg.clone();
                c.image_only = true;
                let out = args.out.join("image_only");
                run(
                    c,
                    tc.clone(),
                    train.clone(),
                    val.clone(),
                    &clip,
                    &out,
                    args.resume,
                    &dev,
                    init_seed,
                )
            };
            if args.image_only {
                println!("held-out Dice image-only: {:.2}", 100.0 * image_only(&cfg)?);
                return Ok(());
            }
            let out = args.out.join("text");
            let full = run(
                cfg.clone(),
                tc.clone(),
                train.clone(),
                val.clone(),
                &clip,
                &out,
                args.resume,
                &dev,
                init_seed,
            )?;
            println!("held-out Dice with text: {:.2}", 100.0 * full);
            if !args.no_baseline {
                let base = image_only(&cfg)?;
                println!(
                    "held-out Dice: text-guided {:.2} vs image-only {:.2} (+{:.2})",
                    100.0 * full,
                    100.0 * base,
                    100.0 * (full - base)
                );
            }
        }
        Some(root) => {
            let cfg = TgcConfig::preset(args.preset.as_deref().unwrap_or("cpu"))?;
            let train: Arc<dyn SegDataset> = Arc::new(LvitDataset::open(root, Split::Train)?);
            let val: Arc<dyn SegDataset> = Arc::new(LvitDataset::open(root, Split::Val)?);
            println!("MosMedData+: {} train, {} val", train.len(), val.len());
            let mut tc = TrainConfig::for_dataset("mosmed");
            if let Some(e) = args.epochs {
                tc.epochs = e;
            }
            if let Some(lr) = args.lr {
                tc.lr = lr;
            }
            tc.cache_dir = Some(args.out.join("feature-cache"));
            tc.data_parallel = data_parallel;
            tc.micro_batches = args.micro_batches;
            if let Some(seed) = args.seed {
                tc.seed = seed;
            }
            let best = run(
                cfg,
                tc,
                train,
                val,
                &clip,
                &args.out,
                args.resume,
                &dev,
                init_seed,
            )?;
            println!("best val Dice: {:.2}", 100.0 * best);
        }
    }
    Ok(())
}
