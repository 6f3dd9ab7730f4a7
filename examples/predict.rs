//! Minimal library use: segment a synthetic CT phantom with its caption and save the
//! mask.
//!
//! ```sh
//! cargo run --release --example predict                       # tiny model, random weights
//! cargo run --release --example predict -- --checkpoint runs/mosmed/text/best.safetensors
//! ```
//!
//! With a checkpoint the model config comes from its metadata; without one the `tiny`
//! preset with random weights is used (the mask is then meaningless, but every step of
//! the pipeline runs).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Parser;
use tgc::data::{AugmentParams, PhantomKind, Preprocess, SegDataset, SyntheticPhantoms};
use tgc::model::{TgcConfig, TgcNet, WeightSource, CONFIG_METADATA_KEY};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Segment a synthetic CT phantom with its caption")]
struct Args {
    /// Trained weights (best.safetensors); none: the tiny preset with random weights.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Which validation phantom (seed 2) to segment.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Output mask PNG (0 / 255, at the label size).
    #[arg(long, default_value = "mask.png")]
    out: PathBuf,
}

fn main() -> Result<()> {
    tgc::train::tune_cpu_threads();
    tgc::train::retain_freed_memory();
    let args = Args::parse();
    // `auto`: a CUDA or Metal GPU when built with that feature, else the CPU.
    let dev = tgc::model::select_device("auto")?;
    // The model config travels in the checkpoint's metadata.
    let cfg = match &args.checkpoint {
        Some(ck) => {
            let c = tgc::train::load_checkpoint(ck, &dev)
                .with_context(|| format!("reading {}", ck.display()))?;
            serde_config(c.meta(CONFIG_METADATA_KEY)?)?
        }
        None => TgcConfig::tiny(),
    };
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &dev)?;
    if let Some(ck) = &args.checkpoint {
        model.load_weights(ck)?;
    }

    // One phantom: image, ground-truth mask and the caption naming the target lesions.
    let phantoms = SyntheticPhantoms::new(PhantomKind::CtSlice, args.index + 1, 2, cfg.label_size);
    let sample = phantoms.get(args.index)?;
    println!("caption: {}", sample.caption);

    // The training preprocessing (resample to the CLIP, CNN and label sizes).
    let pre = Preprocess {
        clip_size: cfg.clip_size,
        cnn_size: cfg.cnn_size,
        label_size: cfg.label_size,
    };
    let p = pre.apply(&sample, &AugmentParams::default());
    let clip = Tensor::from_vec(p.clip, (3, cfg.clip_size, cfg.clip_size), &dev)?;
    let cnn = Tensor::from_vec(p.cnn, (3, cfg.cnn_size, cfg.cnn_size), &dev)?;
    let probs = model.predict(
        &clip,
        &cnn,
        &[p.caption.as_str()],
        Some(&[p.aux_caption.as_str()]),
    )?;

    // K x S x S probabilities -> a 0/255 PNG; Dice against the phantom's mask.
    let s = cfg.label_size;
    let v = probs.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?;
    let pred: Vec<bool> = v.iter().map(|&x| x > 0.5).collect();
    let gt: Vec<bool> = p.mask.iter().map(|&x| x > 0.5).collect();
    let inter = pred.iter().zip(&gt).filter(|(a, b)| **a && **b).count() as f64;
    let total = (pred.iter().filter(|x| **x).count() + gt.iter().filter(|x| **x).count()) as f64;
    println!(
        "Dice vs the phantom's mask: {:.4}",
        2.0 * inter / (total + 1e-5)
    );
    let px: Vec<u8> = pred.iter().map(|&b| if b { 255 } else { 0 }).collect();
    image::GrayImage::from_raw(s as u32, s as u32, px)
        .context("mask buffer")?
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("mask {s}x{s} -> {}", args.out.display());
    Ok(())
}

/// The model config from its JSON metadata.
fn serde_config(json: &str) -> Result<TgcConfig> {
    TgcConfig::from_json(json).context("invalid model config in the checkpoint metadata")
}
