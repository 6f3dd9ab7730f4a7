//! How much a model's output depends on its prompt: runs one image with several prompts
//! and prints, per stage, how far apart the prompts' representations are.
//!
//! `cargo run --release --example text_sensitivity -- --checkpoint runs/qata/best.safetensors`
//! (one QaTa-COV19 val image; `--index` picks another).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use tgc::data::{AugmentParams, LvitDataset, Preprocess, SegDataset, Split};
use tgc::model::{TgcConfig, TgcNet, WeightSource, CONFIG_METADATA_KEY};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// A checkpoint written by the trainer (the config travels in its metadata); none
    /// uses a fresh `--preset` model.
    #[arg(long)]
    checkpoint: Option<std::path::PathBuf>,
    /// Preset for a fresh model.
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// QaTa-COV19 root in LViT layout.
    #[arg(long, default_value = "../shared/data/qata-cov19")]
    data: std::path::PathBuf,
    /// Val image index.
    #[arg(long, default_value_t = 0)]
    index: usize,
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn main() -> Result<()> {
    tgc::train::tune_cpu_threads();
    tgc::train::retain_freed_memory();
    let args = Args::parse();
    let dev = Device::Cpu;
    let cfg = match &args.checkpoint {
        Some(p) => {
            let c = tgc::train::load_checkpoint(p, &dev)
                .with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(c.meta(CONFIG_METADATA_KEY)?)
                .context("invalid model config in the checkpoint metadata")?
        }
        None => TgcConfig::preset(&args.preset)?,
    };
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &dev)?;
    if let Some(p) = &args.checkpoint {
        model.load_weights(p)?;
    }
    let pre = Preprocess {
        clip_size: cfg.clip_size,
        cnn_size: cfg.cnn_size,
        label_size: cfg.label_size,
    };
    let ds = LvitDataset::open(&args.data, Split::Val)?;
    let sample = ds.get(args.index)?;
    let p = pre.apply(&sample, &AugmentParams::default());
    let clip = Tensor::from_vec(p.clip, (3, cfg.clip_size, cfg.clip_size), &dev)?;
    let cnn = Tensor::from_vec(p.cnn, (3, cfg.cnn_size, cfg.cnn_size), &dev)?;
    let prompts = [
        "Bilateral pulmonary infection, two infected areas, all left lung and all right lung.",
        "Unilateral pulmonary infection, one infected area, lower left lung.",
        "Normal lungs.",
    ];
    let (primary, _) = model.encode_prompts(
        &prompts
            .iter()
            .map(|p| vec![p.to_string()])
            .collect::<Vec<_>>(),
        None,
    )?;
    let pooled = primary
        .states
        .broadcast_mul(&primary.pool.unsqueeze(2)?)?
        .sum(1)?;
    println!(
        "pooled frozen text states, prompt 0 vs 1: max |diff| {:.3e}, |p0| max {:.3e}",
        max_abs_diff(&pooled.get(0)?, &pooled.get(1)?)?,
        pooled.get(0)?.abs()?.max(0)?.to_scalar::<f32>()?
    );
    let mut logits = Vec::new();
    for p in prompts {
        let l = model.predict(&clip, &cnn, &[p], None)?;
        logits.push(l);
    }
    for (i, j) in [(0, 1), (0, 2)] {
        println!(
            "probabilities, prompt {i} vs {j}: max |diff| {:.3e}",
            max_abs_diff(&logits[i], &logits[j])?
        );
    }
    Ok(())
}
