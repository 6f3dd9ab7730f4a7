//! Wall and CPU time of one training step (forward + backward of the trainable modules on
//! frozen features, batch 8) for a preset or a JSON config, and the memory the step
//! allocates. For sizing presets to a machine; the criterion bench
//! (`cargo bench --bench forward`) is the reference measurement.
//!
//! ```sh
//! cargo run --release --example step_timing -- --preset cpu --steps 3
//! cargo run --release --example step_timing -- --config my_config.json
//! cargo run --release --example step_timing -- --preset paper --batch 1 --steps 1
//! ```
//!
//! The memory lines count the bytes the step allocates through the global allocator
//! (every CPU tensor), above what was live before it: what the forward pass keeps for
//! the backward pass, and the step's peak. On a GPU the same tensors live in device
//! memory, so these are what a training step needs there beside the weights (less the
//! allocator's and the CUDA context's own overhead, plus cuBLAS workspaces).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use tgc::model::{TgcConfig, TgcNet, WeightSource};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// mimalloc (as the training binaries use) with a count of the live bytes and their
/// peak, for the memory lines.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to mimalloc; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = mimalloc::MiMalloc.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = mimalloc::MiMalloc.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = mimalloc::MiMalloc.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Bytes live now, and restarts the peak from here.
fn reset_peak() -> usize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[derive(Parser)]
struct Args {
    /// Preset: paper, cpu or tiny.
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// A TgcConfig as JSON (overrides --preset).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Print the configuration as JSON and exit.
    #[arg(long)]
    dump: bool,
}

/// Process CPU time (user + system, all threads) in seconds, from /proc/self/stat.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() -> Result<()> {
    tgc::train::tune_cpu_threads();
    tgc::train::retain_freed_memory();
    let args = Args::parse();
    let cfg = match &args.config {
        Some(p) => TgcConfig::from_json(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => TgcConfig::preset(&args.preset)?,
    };
    if args.dump {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let dev = Device::Cpu;
    let b = args.batch;
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &dev)?;
    println!(
        "preset {}: {} trainable parameters",
        cfg.preset,
        model.param_counts().trainable
    );
    let clip = Tensor::randn(0f32, 1.0, (b, 3, cfg.clip_size, cfg.clip_size), &dev)?;
    let cnn = Tensor::randn(0f32, 1.0, (b, 3, cfg.cnn_size, cfg.cnn_size), &dev)?;
    let image = model.towers().encode_images(&clip)?;
    let prompts: Vec<Vec<String>> = (0..b)
        .map(|i| {
            vec![format!(
                "one infected area, lower {} lung.",
                ["left", "right"][i % 2]
            )]
        })
        .collect();
    let (primary, aux) = model.encode_prompts(&prompts, None)?;
    let target = Tensor::zeros((b, 1, cfg.label_size, cfg.label_size), DType::F32, &dev)?;
    let step = || -> Result<()> {
        let logits = model.forward_features(&image, &cnn, &primary, aux.as_ref(), 1, true)?;
        let loss = tgc::train::dice_bce(&logits, &target, 0.5, 0.5)?;
        loss.backward()?;
        Ok(())
    };
    // The first step, measured for memory; it also warms up the timed ones.
    let before = reset_peak();
    let logits = model.forward_features(&image, &cnn, &primary, aux.as_ref(), 1, true)?;
    let loss = tgc::train::dice_bce(&logits, &target, 0.5, 0.5)?;
    let kept = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let fwd_peak = PEAK.load(Ordering::Relaxed) - before;
    let grads = loss.backward()?;
    let step_peak = PEAK.load(Ordering::Relaxed) - before;
    let with_grads = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    drop((grads, loss, logits));
    println!(
        "memory, batch {b}: {:.0} MiB of weights, features and inputs live before the step; \
         the forward pass keeps {:.0} MiB for the backward pass (peak {:.0} MiB); \
         step peak {:.0} MiB above the weights, {:.0} MiB live with the gradients",
        mib(before),
        mib(kept),
        mib(fwd_peak),
        mib(step_peak),
        mib(with_grads)
    );
    let (t0, c0) = (Instant::now(), cpu_s());
    for _ in 0..args.steps {
        step()?;
    }
    let n = args.steps as f64;
    let wall = t0.elapsed().as_secs_f64() / n;
    println!(
        "fwd+bwd batch {b}: {wall:.3} s wall, {:.3} s CPU per step ({:.1} img/s)",
        (cpu_s() - c0) / n,
        b as f64 / wall
    );
    // What an uncached step adds: the frozen CLIP image features of the batch, one image
    // at a time as the trainer's feature store computes them, and as one batch.
    let (t0, c0) = (Instant::now(), cpu_s());
    for _ in 0..args.steps {
        for i in 0..b {
            model.towers().encode_images(&clip.narrow(0, i, 1)?)?;
        }
    }
    let one = t0.elapsed().as_secs_f64() / n;
    let one_cpu = (cpu_s() - c0) / n;
    let t0 = Instant::now();
    for _ in 0..args.steps {
        model.towers().encode_images(&clip)?;
    }
    let batched = t0.elapsed().as_secs_f64() / n;
    println!(
        "frozen CLIP image features for {b} images: {one:.3} s wall, {one_cpu:.3} s CPU \
         one at a time; {batched:.3} s wall as one batch"
    );
    Ok(())
}
