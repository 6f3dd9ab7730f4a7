//! Loader throughput (images/s) on 256 QaTa-COV19 train images.
//!
//! cargo bench -p tgc-data --bench loader
//!
//! Baseline in the same run: sequential decode only (`get`, PNG -> f32), against the full
//! loader (parallel decode + resize to both model sizes + tensors, prefetching).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tgc_data::*;

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/qata-cov19");
    let full = LvitDataset::open(&root, Split::Train).expect("QaTa train folder");
    let n = 256;
    let ds: Arc<dyn SegDataset> = Arc::new(Subset::new(full, (0..n).collect()));
    let mut g = c.benchmark_group("qata_loader_256");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("decode_sequential_baseline", |b| {
        b.iter(|| {
            for i in 0..n {
                std::hint::black_box(ds.get(i).unwrap());
            }
        })
    });
    for (name, pre, aug) in [
        ("loader_cpu_112_224", Preprocess::cpu(), Augment::off()),
        (
            "loader_cpu_112_224_full_aug",
            Preprocess::cpu(),
            Augment::full(),
        ),
        (
            "loader_paper_336_768",
            Preprocess::default(),
            Augment::off(),
        ),
    ] {
        let l = DataLoader::new(ds.clone(), pre, 8, Some(0), aug, Device::Cpu);
        g.bench_function(name, |b| {
            b.iter(|| {
                for batch in l.epoch(0) {
                    std::hint::black_box(batch.unwrap());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
