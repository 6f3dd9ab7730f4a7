//! The frozen-feature cache.
//!
//! The CLIP towers are frozen, so their outputs for an (image, preprocessing, augmentation
//! variant) and for a prompt never change. [`FeatureCache`] stores named tensors per key
//! in f16 safetensors shards:
//!
//! ```text
//! dir/shard-<unix-nanos>-<n>.safetensors   tensors "<key hex>/<name>", f16
//!                                           metadata {"format": "tgc-feature-cache",
//!                                                     "version": "1", "model_id": ...}
//! dir/.tmp-*                                 shards being written (ignored)
//! ```
//! Shards are written atomically (temp file in the same folder, fsync, rename, fsync of
//! the folder), memory-mapped on read and validated on open: a shard that is truncated,
//! not safetensors, of another format version or of another model id is an error that
//! names the file; it is never silently used. What goes in is the model crate's choice:
//! the cache only stores named tensors per key and returns them as f32.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::loader::{Batch, DataLoader};
use crate::{Error, Result};

/// The format name in every shard's metadata.
pub const CACHE_FORMAT: &str = "tgc-feature-cache";
/// The format version in every shard's metadata.
pub const CACHE_VERSION: &str = "1";

/// A cache key: a 32-byte BLAKE3 hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(CacheKey(out))
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Named tensors stored under one key.
pub type Features = BTreeMap<String, Tensor>;

#[derive(Debug, Clone)]
struct Loc {
    shard: usize,
    start: usize,
    end: usize,
    shape: Vec<usize>,
}

/// A folder of f16 feature shards for one model id (see the module docs).
#[derive(Debug)]
pub struct FeatureCache {
    dir: PathBuf,
    model_id: String,
    shards: Vec<Arc<Mmap>>,
    shard_paths: Vec<PathBuf>,
    index: HashMap<CacheKey, BTreeMap<String, Loc>>,
    counter: u64,
}

impl FeatureCache {
    /// Opens (creating the folder if needed) the cache in `dir` for `model_id` and
    /// validates every shard. Files whose name starts with `.tmp-` are leftovers of
    /// interrupted writes and are ignored.
    pub fn open(dir: impl AsRef<Path>, model_id: &str) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                !n.starts_with(".tmp-") && n.ends_with(".safetensors")
            })
            .collect();
        paths.sort();
        let mut cache = Self {
            dir,
            model_id: model_id.to_string(),
            shards: Vec::new(),
            shard_paths: Vec::new(),
            index: HashMap::new(),
            counter: 0,
        };
        for p in paths {
            cache.load_shard(p)?;
        }
        Ok(cache)
    }

    fn load_shard(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: shards are immutable once renamed into place (writers only ever create
        // new files), so the mapping is not modified underneath us.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |m: String| Error::file(&path, format!("invalid feature-cache shard: {m}"));
        let (hlen, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(format!("{e}")))?;
        // Full validation (offsets inside the buffer, no truncation).
        SafeTensors::deserialize(&mmap).map_err(|e| bad(format!("{e}")))?;
        let md = meta
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("no metadata header (foreign safetensors file)".into()))?;
        if md.get("format").map(String::as_str) != Some(CACHE_FORMAT) {
            return Err(bad(format!(
                "format is {:?}, expected {CACHE_FORMAT:?}",
                md.get("format")
            )));
        }
        if md.get("version").map(String::as_str) != Some(CACHE_VERSION) {
            return Err(bad(format!(
                "version is {:?}, expected {CACHE_VERSION:?}",
                md.get("version")
            )));
        }
        if md.get("model_id").map(String::as_str) != Some(self.model_id.as_str()) {
            return Err(bad(format!(
                "model id is {:?}, this cache is for {:?}",
                md.get("model_id"),
                self.model_id
            )));
        }
        let shard = self.shards.len();
        let base = 8 + hlen;
        for (name, info) in meta.tensors() {
            if info.dtype != Dtype::F16 {
                return Err(bad(format!(
                    "tensor {name} is {:?}, expected F16",
                    info.dtype
                )));
            }
            let (k, n) = name
                .split_once('/')
                .and_then(|(k, n)| CacheKey::from_hex(k).map(|k| (k, n)))
                .ok_or_else(|| bad(format!("tensor name {name:?} is not <key>/<name>")))?;
            self.index.entry(k).or_default().insert(
                n.to_string(),
                Loc {
                    shard,
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                    shape: info.shape.clone(),
                },
            );
        }
        self.shards.push(Arc::new(mmap));
        self.shard_paths.push(path);
        Ok(())
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model id all shards must carry.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The shard files in use.
    pub fn shard_paths(&self) -> &[PathBuf] {
        &self.shard_paths
    }

    /// The key of an image's features: `content_hash` is the hash of the source image
    /// (e.g. [`crate::ImageF32::content_hash`] or BLAKE3 of the file bytes),
    /// `preprocess_id` e.g. [`crate::Preprocess::id`], `variant` the augmentation variant
    /// ([`crate::AugmentParams::variant`]). The model id is part of the key too.
    pub fn key_for_image(
        &self,
        content_hash: &[u8],
        preprocess_id: &str,
        variant: u64,
    ) -> CacheKey {
        let mut h = blake3::Hasher::new();
        h.update(b"image\0");
        h.update(self.model_id.as_bytes());
        h.update(b"\0");
        h.update(content_hash);
        h.update(b"\0");
        h.update(preprocess_id.as_bytes());
        h.update(&variant.to_le_bytes());
        CacheKey(*h.finalize().as_bytes())
    }

    /// The key of a prompt's features, from its token ids (preferred: independent of
    /// text normalisation) ...
    pub fn key_for_tokens(&self, token_ids: &[u32]) -> CacheKey {
        let mut h = blake3::Hasher::new();
        h.update(b"tokens\0");
        h.update(self.model_id.as_bytes());
        h.update(b"\0");
        for t in token_ids {
            h.update(&t.to_le_bytes());
        }
        CacheKey(*h.finalize().as_bytes())
    }

    /// ... or from the caption text.
    pub fn key_for_text(&self, caption: &str) -> CacheKey {
        let mut h = blake3::Hasher::new();
        h.update(b"text\0");
        h.update(self.model_id.as_bytes());
        h.update(b"\0");
        h.update(caption.as_bytes());
        CacheKey(*h.finalize().as_bytes())
    }

    /// True when `key` is cached.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.index.contains_key(key)
    }

    /// The tensors under `key` as f32 CPU tensors, or None.
    pub fn get(&self, key: &CacheKey) -> Result<Option<Features>> {
        let Some(entry) = self.index.get(key) else {
            return Ok(None);
        };
        let mut out = BTreeMap::new();
        for (name, loc) in entry {
            let bytes = &self.shards[loc.shard][loc.start..loc.end];
            let t = Tensor::from_raw_buffer(bytes, DType::F16, &loc.shape, &Device::Cpu)?
                .to_dtype(DType::F32)?;
            out.insert(name.clone(), t);
        }
        Ok(Some(out))
    }

    /// Writes `entries` as one new shard (atomically) and indexes them. Keys already
    /// present (or repeated) are skipped. Tensors may be of any float dtype and on any
    /// device; they are stored as f16. Returns the number of keys written.
    pub fn insert_many(
        &mut self,
        entries: Vec<(CacheKey, Vec<(String, Tensor)>)>,
    ) -> Result<usize> {
        let mut seen = HashSet::new();
        let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (key, tensors) in entries {
            if self.index.contains_key(&key) || !seen.insert(key) {
                continue;
            }
            for (name, t) in tensors {
                if name.contains('/') || name.is_empty() {
                    return Err(Error::Msg(format!(
                        "feature name {name:?} must be non-empty without '/'"
                    )));
                }
                let shape = t.dims().to_vec();
                let v = t
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F16)?
                    .flatten_all()?
                    .to_vec1::<half::f16>()?;
                let mut bytes = Vec::with_capacity(v.len() * 2);
                for x in v {
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
                named.push((format!("{}/{name}", key.hex()), shape, bytes));
            }
        }
        let n = seen.len();
        if named.is_empty() {
            return Ok(n);
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = named
            .iter()
            .map(|(n, s, b)| {
                safetensors::tensor::TensorView::new(Dtype::F16, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Msg(format!("feature {n}: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [
            ("format".to_string(), CACHE_FORMAT.to_string()),
            ("version".to_string(), CACHE_VERSION.to_string()),
            ("model_id".to_string(), self.model_id.clone()),
        ]
        .into_iter()
        .collect();
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Msg(format!("serialising cache shard: {e}")))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.counter += 1;
        let name = format!(
            "shard-{nanos:020}-{}-{:04}.safetensors",
            std::process::id(),
            self.counter
        );
        let final_path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".tmp-{name}"));
        write_atomic(&tmp, &final_path, &bytes)?;
        self.load_shard(final_path)?;
        Ok(n)
    }

    /// Bytes an entry of the given tensor shapes takes in a shard (f16 data plus an
    /// approximate header share).
    pub fn estimate_entry_bytes(shapes: &[Vec<usize>]) -> u64 {
        shapes
            .iter()
            .map(|s| 2 * s.iter().product::<usize>() as u64 + 120)
            .sum()
    }

    /// Fills the cache from `loader` (one epoch, epoch 0): `encode_fn` gets each batch and
    /// returns the keyed tensors to store (it decides the keys, e.g. with
    /// [`FeatureCache::key_for_image`] of `batch.image_hashes[i]` and `batch.variants[i]`).
    /// After the first batch the total size is estimated and printed to stderr. Batches
    /// are written as shards of at least `shard_bytes` (256 MiB). With `progress`, an
    /// indicatif bar is shown. Returns the number of keys added.
    pub fn build(
        &mut self,
        loader: &DataLoader,
        mut encode_fn: impl FnMut(&Batch) -> Result<Vec<(CacheKey, Vec<(String, Tensor)>)>>,
        progress: bool,
    ) -> Result<usize> {
        const SHARD_BYTES: u64 = 256 << 20;
        let total = loader.num_batches();
        let bar = if progress {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "caching {bar:40} {pos}/{len} batches [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut pending = Vec::new();
        let mut pending_bytes = 0u64;
        let mut added = 0;
        for (bi, batch) in loader.iter().enumerate() {
            let batch = batch?;
            let entries = encode_fn(&batch)?;
            let bytes: u64 = entries
                .iter()
                .map(|(_, ts)| {
                    Self::estimate_entry_bytes(
                        &ts.iter()
                            .map(|(_, t)| t.dims().to_vec())
                            .collect::<Vec<_>>(),
                    )
                })
                .sum();
            if bi == 0 {
                let per_sample = bytes as f64 / batch.len().max(1) as f64;
                let est = per_sample * loader.dataset().len() as f64;
                eprintln!(
                    "feature cache {}: about {:.1} MiB for {} samples ({:.1} KiB each) in {}",
                    self.model_id,
                    est / (1 << 20) as f64,
                    loader.dataset().len(),
                    per_sample / 1024.0,
                    self.dir.display()
                );
            }
            pending_bytes += bytes;
            pending.extend(entries);
            if pending_bytes >= SHARD_BYTES {
                added += self.insert_many(std::mem::take(&mut pending))?;
                pending_bytes = 0;
            }
            bar.inc(1);
        }
        added += self.insert_many(pending)?;
        bar.finish_and_clear();
        Ok(added)
    }
}

fn write_atomic(tmp: &Path, final_path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
    f.sync_all().map_err(|e| Error::io(tmp, e))?;
    drop(f);
    std::fs::rename(tmp, final_path).map_err(|e| Error::io(final_path, e))?;
    // Make the rename durable (best effort: not every platform can open a folder).
    if let Some(dir) = final_path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
