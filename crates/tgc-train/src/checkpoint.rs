//! Checkpoints: safetensors with string metadata, written atomically.
//!
//! A checkpoint holds the trainable parameters and the optimiser state
//! ([`crate::optim::AdamW::state_tensors`]) as tensors, and the run's context as
//! metadata: [`META_CONFIG`] (config JSON), [`META_STEP`], [`META_EPOCH`], [`META_RNG`],
//! [`META_BEST_METRIC`] and [`META_FORMAT_VERSION`] (added by [`save_checkpoint`]).
//!
//! Writing goes to `<path>.tmp-<pid>`, which is fsynced, renamed over `path` and the
//! directory fsynced: a kill at any moment leaves either the previous checkpoint or the
//! new one, never a mix. A stray `.tmp-*` file from a killed run is ignored by
//! [`load_checkpoint`] and overwritten or left alone by later saves.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// Version of the checkpoint layout written by this crate.
pub const FORMAT_VERSION: &str = "1";
/// Metadata key of the format version.
pub const META_FORMAT_VERSION: &str = "tgc.format_version";
/// Metadata key of the run's config (JSON).
pub const META_CONFIG: &str = "tgc.config";
/// Metadata key of the number of optimiser steps taken.
pub const META_STEP: &str = "tgc.step";
/// Metadata key of the number of completed epochs.
pub const META_EPOCH: &str = "tgc.epoch";
/// Metadata key of the serialised RNG state.
pub const META_RNG: &str = "tgc.rng";
/// Metadata key of the best validation metric so far.
pub const META_BEST_METRIC: &str = "tgc.best_metric";

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Every tensor of the file, by name.
    pub tensors: HashMap<String, Tensor>,
    /// The string metadata, [`META_FORMAT_VERSION`] included.
    pub metadata: HashMap<String, String>,
    /// The file it came from (for messages).
    pub path: PathBuf,
}

impl Checkpoint {
    /// A metadata entry, or an error naming the key and the file.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::Metadata {
                key: key.to_string(),
                reason: format!("absent from {}", self.path.display()),
            })
    }

    /// A metadata entry parsed with `FromStr`, or an error naming the key and the value.
    pub fn meta_parse<T>(&self, key: &str) -> Result<T>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let s = self.meta(key)?;
        s.parse().map_err(|e| Error::Metadata {
            key: key.to_string(),
            reason: format!("cannot parse {s:?} in {}: {e}", self.path.display()),
        })
    }

    /// A tensor by name, or an error naming it and the file.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::CheckpointCorrupt {
                path: self.path.clone(),
                reason: format!("no tensor named `{name}`"),
            })
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `tensors` and `metadata` to `path` as safetensors, atomically (temp file,
/// fsync, rename, directory fsync). [`META_FORMAT_VERSION`] is set to [`FORMAT_VERSION`];
/// a caller-supplied different version is an error.
pub fn save_checkpoint(
    path: impl AsRef<Path>,
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut meta = metadata.clone();
    match meta.get(META_FORMAT_VERSION) {
        Some(v) if v != FORMAT_VERSION => {
            return Err(Error::InvalidArgument(format!(
                "save_checkpoint {}: metadata sets {META_FORMAT_VERSION} = {v}, this build writes {FORMAT_VERSION}",
                path.display()
            )))
        }
        _ => {
            meta.insert(META_FORMAT_VERSION.into(), FORMAT_VERSION.into());
        }
    }
    // Sorted for a deterministic file (same state -> same bytes).
    let sorted: BTreeMap<&str, &Tensor> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let bytes = safetensors::serialize(sorted, Some(meta)).map_err(|e| {
        Error::InvalidArgument(format!(
            "save_checkpoint {}: cannot serialise: {e}",
            path.display()
        ))
    })?;
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("writing", &tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("renaming to", path, e));
    }
    // Make the rename itself durable.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    #[cfg(unix)]
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing directory", &dir, e))?;
    Ok(())
}

/// Reads a checkpoint written by [`save_checkpoint`], tensors on `device`. Errors say
/// whether the file is missing, truncated/corrupt (naming the path) or of another format
/// version.
pub fn load_checkpoint(path: impl AsRef<Path>, device: &Device) -> Result<Checkpoint> {
    let path = path.as_ref();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::CheckpointMissing(path.to_path_buf()))
        }
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    let corrupt = |reason: String| Error::CheckpointCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    match metadata.get(META_FORMAT_VERSION) {
        Some(v) if v == FORMAT_VERSION => {}
        other => {
            return Err(Error::FormatVersion {
                path: path.to_path_buf(),
                found: other.cloned().unwrap_or_else(|| "none".into()),
                expected: FORMAT_VERSION.into(),
            })
        }
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut tensors = HashMap::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let t = view
            .load(device)
            .map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, t);
    }
    Ok(Checkpoint {
        tensors,
        metadata,
        path: path.to_path_buf(),
    })
}

fn diff_json(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (ma.get(k), mb.get(k)) {
                    (Some(x), Some(y)) => diff_json(&p, x, y, out),
                    (Some(x), None) => out.push(format!("{p} {x} vs (absent)")),
                    (None, Some(y)) => out.push(format!("{p} (absent) vs {y}")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(xa), Value::Array(xb)) if xa.len() == xb.len() => {
            for (i, (x, y)) in xa.iter().zip(xb).enumerate() {
                diff_json(&format!("{prefix}[{i}]"), x, y, out);
            }
        }
        _ if a != b => {
            let p = if prefix.is_empty() { "(root)" } else { prefix };
            out.push(format!("{p} {a} vs {b}"));
        }
        _ => {}
    }
}

/// Compares the config stored in a checkpoint (`found_json`) with the current one
/// (`expected_json`), both JSON. Equal (as JSON values, key order ignored): `Ok`.
/// Otherwise an [`Error::ConfigMismatch`] listing every differing field as a dotted path,
/// checkpoint value first: `checkpoint from another config (checkpoint vs current):
/// d_model 256 vs 128; sse.layers 6 vs 3`.
pub fn check_config_compatible(expected_json: &str, found_json: &str) -> Result<()> {
    let parse = |s: &str, what: &str| -> Result<serde_json::Value> {
        serde_json::from_str(s).map_err(|e| Error::Json {
            context: what.to_string(),
            source: e,
        })
    };
    let expected = parse(expected_json, "current config")?;
    let found = parse(found_json, "checkpoint config")?;
    let mut diffs = Vec::new();
    diff_json("", &found, &expected, &mut diffs);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::ConfigMismatch(diffs.join("; ")))
    }
}
