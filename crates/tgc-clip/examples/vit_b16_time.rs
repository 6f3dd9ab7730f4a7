//! Plain timing loop of the ViT-B/16 vision forward (224 px, batch 1, random
//! weights), for interleaving with `benches/clip_forward_torch.py` on a shared
//! machine: `cargo run --release -p tgc-clip --example vit_b16_time -- 10`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use tgc_clip::{ClipConfig, ClipModel, WeightSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dev = Device::Cpu;
    let model = ClipModel::load(
        &ClipConfig::vit_b16(),
        &WeightSource::Random { seed: 0 },
        &dev,
    )?;
    let img = Tensor::randn(0f32, 1f32, (1, 3, 224, 224), &dev)?;
    for _ in 0..2 {
        model.encode_image_dense(&img)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        model.encode_image_dense(&img)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "candle tgc-clip: median {:.1} ms, min {:.1} ms over {iters} runs",
        1e3 * times[iters / 2],
        1e3 * times[0]
    );
    Ok(())
}
