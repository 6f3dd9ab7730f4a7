//! Thread settings for training on small CPU machines.
//!
//! Candle 0.11 runs its element-wise CPU kernels on its own pool of threads that
//! busy-wait (25,000 spins) for work and whose caller busy-waits for them to finish,
//! next to rayon's pool (matrix products and this workspace's fused kernels). On a
//! two-core machine the two pools take turns spinning against each other: `perf` showed
//! 40% of a `cpu`-preset step in candle's `BarrierGuard::drop` and its worker's spin
//! loop. Running candle's element-wise ops on the calling thread alone
//! (`CANDLE_NUM_THREADS=1`; matrix products still use every core) removes that:
//! `cargo run --release --example step_timing -- --preset tiny --steps 10` with and
//! without the variable (docs/results.md has the numbers).
//!
//! Candle also asks for its matrix-product thread count on every product, and unless
//! `RAYON_NUM_THREADS` is set that count comes from `num_cpus::get_physical`, which opens
//! and parses `/proc/cpuinfo` each time: `perf record -g` on a training step showed the
//! kernel's `show_cpuinfo`/`vsnprintf` among the hottest symbols. [`tune_cpu_threads`]
//! therefore fixes `RAYON_NUM_THREADS` to the count candle computes, after building
//! rayon's global pool at its own default size, so neither thread count changes.

/// Cores at or below which [`tune_cpu_threads`] turns candle's element-wise pool off.
pub const SMALL_MACHINE_CORES: usize = 4;

/// Sets `CANDLE_NUM_THREADS=1` on machines with at most [`SMALL_MACHINE_CORES`] cores,
/// unless the variable is already set, and `RAYON_NUM_THREADS` to candle's
/// matrix-product thread count unless that is set (module docs: candle otherwise
/// re-reads `/proc/cpuinfo` on every matrix product). Returns the value of
/// `CANDLE_NUM_THREADS` now in effect, if any.
///
/// Call it first thing in `main`, before any tensor operation and before other threads
/// start: candle reads the variable once, when its pool is created, and changing the
/// environment while other threads run is racy.
///
/// ```
/// let setting = tgc_train::tune_cpu_threads();
/// assert_eq!(setting, std::env::var("CANDLE_NUM_THREADS").ok());
/// let n: usize = std::env::var("RAYON_NUM_THREADS").unwrap().parse().unwrap();
/// assert_eq!(n, candle_core::utils::get_num_threads());
/// ```
pub fn tune_cpu_threads() -> Option<String> {
    pin_matmul_threads();
    if let Ok(v) = std::env::var("CANDLE_NUM_THREADS") {
        return Some(v);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores <= SMALL_MACHINE_CORES {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        return Some("1".into());
    }
    None
}

/// Fixes `RAYON_NUM_THREADS` (if unset) to the thread count candle would compute for its
/// matrix products, after building rayon's global pool with its default size.
fn pin_matmul_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    // Fails only if the global pool already exists, which keeps its size either way.
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    let n = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

/// The `TrainConfig::data_parallel` the examples use by default: 2 on machines with at
/// most [`SMALL_MACHINE_CORES`] cores (where one step leaves a core mostly idle), else 1.
pub fn default_data_parallel() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if (2..=SMALL_MACHINE_CORES).contains(&cores) {
        2
    } else {
        1
    }
}
