//! The `run.toml` file of `tgc train` and the shared resolution of models, weights and
//! datasets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tgc_data::{
    HuWindow, LvitDataset, NiftiLayout, NiftiOptions, NiftiVolumeDataset, PhantomKind, SegDataset,
    Split, SyntheticPhantoms,
};
use tgc_model::{TgcConfig, WeightSource};
use tgc_train::TrainConfig;

/// Training images of the synthetic phantom set (seed 1).
pub const PHANTOM_TRAIN: usize = 640;
/// Validation images of the synthetic phantom set (seed 2).
pub const PHANTOM_VAL: usize = 128;

/// `run.toml`: every field is optional; command-line flags win over the file.
///
/// ```toml
/// preset = "cpu"               # paper | cpu | tiny
/// data = "../shared/data/qata-cov19"   # LViT folder (relative to the working directory)
/// # phantoms = "ct"            # or synthetic phantoms: ct | cxr
/// # [volumes] root = "..."     # or labelled CT volumes (see VolumesSpec)
/// out = "runs/qata"
/// clip_weights = "random"      # random | file.safetensors | dir | hub:<repo>
/// train_count = 640            # phantom images for training (default 640), or the first N real ones
/// val_count = 128              # phantom (or first N real) validation images
/// # train_sample = 1000        # real data: N training images spread evenly over the split
/// # val_sample = 200           # real data: N validation images spread evenly over the split
/// [model]                      # any TgcConfig field, merged into the preset
/// text_mode = "main_only"
/// sse = { mode = "clip_only" }
/// clip_finetune = "query_value" # frozen (default) | query_value | full
/// [train]                      # any TrainConfig field
/// epochs = 10
/// lr = 2e-5
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunFile {
    /// Model preset.
    pub preset: Option<String>,
    /// LViT dataset folder.
    pub data: Option<PathBuf>,
    /// Synthetic phantoms instead of `data`: `ct` or `cxr`.
    pub phantoms: Option<String>,
    /// Labelled CT volumes instead of `data`.
    pub volumes: Option<VolumesSpec>,
    /// Output folder.
    pub out: Option<PathBuf>,
    /// Frozen CLIP weights.
    pub clip_weights: Option<String>,
    /// Training images (phantoms: how many; real data: the first N of the split).
    pub train_count: Option<usize>,
    /// Validation images (phantoms: how many; real data: the first N of the split).
    pub val_count: Option<usize>,
    /// Real data only: N training images spread evenly over the split (image
    /// `k * len / N`) instead of the first N, which keeps a folder's sources in
    /// proportion (QaTa-COV19 lists its 2,951 `covid_*` images before its 2,765 `sub-*`
    /// ones). Excludes `train_count`.
    pub train_sample: Option<usize>,
    /// Real data only: N validation images spread evenly over the split. Excludes
    /// `val_count`.
    pub val_sample: Option<usize>,
    /// Overrides merged into the preset's `TgcConfig`.
    pub model: Option<toml::Table>,
    /// Overrides merged into the dataset's default `TrainConfig`.
    pub train: Option<toml::Table>,
}

impl RunFile {
    /// Reads and parses a run file; errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
    }
}

/// `[volumes]` of `run.toml` (or `tgc train --volumes DIR`): labelled CT volumes, one
/// sample per axial slice and organ with the organ's name as the prompt. The volumes are
/// split by volume, never by slice: the last `val_volumes` (in the folder's sorted order)
/// validate, the others train.
///
/// ```toml
/// [volumes]
/// root = "data/Task09_Spleen"  # or --volumes DIR
/// layout = "msd"               # msd | word | abdomenct1k (the image/label folders, Tr)
/// organs = ["spleen"]          # default: every labelled organ
/// val_volumes = 8              # default: a fifth of the volumes, at least 1
/// window_level = 40.0          # HU window (abdomen)
/// window_width = 400.0
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumesSpec {
    /// The folder.
    pub root: Option<PathBuf>,
    /// msd, word or abdomenct1k.
    pub layout: String,
    /// Organs to prompt (names from the label table); None = all.
    pub organs: Option<Vec<String>>,
    /// How many of the last volumes validate (default: a fifth, at least 1).
    pub val_volumes: Option<usize>,
    /// HU window level.
    pub window_level: f32,
    /// HU window width.
    pub window_width: f32,
}

impl Default for VolumesSpec {
    fn default() -> Self {
        Self {
            root: None,
            layout: "msd".into(),
            organs: None,
            val_volumes: None,
            window_level: 40.0,
            window_width: 400.0,
        }
    }
}

/// Parses a volume layout name.
pub fn nifti_layout(s: &str) -> Result<NiftiLayout> {
    match s {
        "msd" => Ok(NiftiLayout::Msd),
        "word" => Ok(NiftiLayout::Word),
        "abdomenct1k" => Ok(NiftiLayout::AbdomenCt1k),
        o => bail!("unknown volume layout {o:?} (expected msd, word or abdomenct1k)"),
    }
}

/// Opens every slice of the volumes of `spec` (WORD: the `suffix` folders, `Tr`, `Val` or
/// `Ts`), with errors naming the folder.
pub fn open_volumes(spec: &VolumesSpec, suffix: &str) -> Result<NiftiVolumeDataset> {
    let root = spec
        .root
        .as_ref()
        .context("[volumes] needs a root folder (or pass --volumes DIR)")?;
    let opts = NiftiOptions {
        window: HuWindow {
            level: spec.window_level,
            width: spec.window_width,
        },
        organs: spec.organs.clone(),
        suffix: suffix.into(),
        only_slices_with_organ: false,
        cached_volumes: 1,
    };
    NiftiVolumeDataset::open(root, nifti_layout(&spec.layout)?, opts)
        .with_context(|| format!("cannot open the volumes in {}", root.display()))
}

/// The result of [`volume_split`].
pub struct VolumeSplit {
    /// Slices of the training volumes.
    pub train: Arc<dyn SegDataset>,
    /// Slices of the validation volumes (the last `val_volumes`).
    pub val: Arc<dyn SegDataset>,
    /// How many volumes validate.
    pub val_volumes: usize,
}

/// Training and validation slices of `spec`, split by volume. Both keep only the slices
/// where the prompted organ is present (the 2D validation Dice of training; `tgc eval
/// --volumes` gives the 3D Dice).
pub fn volume_split(spec: &VolumesSpec) -> Result<VolumeSplit> {
    let all = open_volumes(spec, "Tr")?;
    let n = all.num_volumes();
    let n_val = spec.val_volumes.unwrap_or((n / 5).max(1));
    if n_val == 0 || n_val >= n {
        bail!(
            "{}: {n} volumes cannot give {n_val} validation volumes and at least one for training",
            spec.root.as_deref().unwrap_or(Path::new("")).display()
        );
    }
    let pairs: Vec<(PathBuf, PathBuf)> = (0..n)
        .filter_map(|v| all.volume_paths(v))
        .map(|(a, b)| (a.to_path_buf(), b.to_path_buf()))
        .collect();
    let opts = NiftiOptions {
        window: HuWindow {
            level: spec.window_level,
            width: spec.window_width,
        },
        organs: None,
        suffix: "Tr".into(),
        only_slices_with_organ: true,
        cached_volumes: 2,
    };
    let part = |name: String, pairs: &[(PathBuf, PathBuf)]| -> Result<Arc<dyn SegDataset>> {
        let ds = NiftiVolumeDataset::from_pairs(
            name,
            pairs.to_vec(),
            all.organs().to_vec(),
            opts.clone(),
        )?;
        Ok(Arc::new(ds))
    };
    let (train, val) = pairs.split_at(n - n_val);
    Ok(VolumeSplit {
        train: part(format!("{}-train", all.name()), train)?,
        val: part(format!("{}-val", all.name()), val)?,
        val_volumes: n_val,
    })
}

/// Merges `over` into `base` recursively (tables merge, everything else replaces).
fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Applies a TOML table of overrides to a serializable default, field by field.
pub fn apply_overrides<T>(base: &T, over: Option<&toml::Table>, what: &str) -> Result<T>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let mut v = serde_json::to_value(base)?;
    if let Some(t) = over {
        let o = serde_json::to_value(t).with_context(|| format!("[{what}] table"))?;
        if let (serde_json::Value::Object(bm), serde_json::Value::Object(om)) = (&v, &o) {
            if let Some(k) = om.keys().find(|k| !bm.contains_key(*k)) {
                let known: Vec<_> = bm.keys().map(String::as_str).collect();
                bail!(
                    "[{what}] has an unknown field `{k}` (known: {})",
                    known.join(", ")
                );
            }
        }
        merge(&mut v, o);
    }
    let parsed: T =
        serde_json::from_value(v.clone()).with_context(|| format!("invalid [{what}] settings"))?;
    // A misspelt nested field (`sse = { mod = "cnn_only" }`) would otherwise be dropped.
    let unknown = tgc_model::unknown_fields(&v, &serde_json::to_value(&parsed)?);
    if !unknown.is_empty() {
        bail!("[{what}] has unknown fields: {}", unknown.join(", "));
    }
    Ok(parsed)
}

/// The model config: the preset with the `[model]` overrides, validated.
pub fn model_config(preset: &str, over: Option<&toml::Table>) -> Result<TgcConfig> {
    let base = TgcConfig::preset(preset)?;
    let cfg: TgcConfig = apply_overrides(&base, over, "model")?;
    cfg.validate()?;
    Ok(cfg)
}

/// Parses a `--clip-weights` value.
pub fn weight_source(spec: &str) -> WeightSource {
    match spec {
        "random" => WeightSource::Random { seed: 0 },
        s if s.starts_with("hub:") => WeightSource::hub(&s[4..]),
        s if Path::new(s).is_dir() => WeightSource::Dir(s.into()),
        s => WeightSource::File(s.into()),
    }
}

/// Parses a `--phantoms` value.
pub fn phantom_kind(s: &str) -> Result<PhantomKind> {
    match s {
        "ct" => Ok(PhantomKind::CtSlice),
        "cxr" => Ok(PhantomKind::ChestXray),
        o => bail!("unknown phantom kind {o:?} (expected ct or cxr)"),
    }
}

/// The first `n` samples of a dataset (all when `n` is `None` or larger).
struct Head {
    inner: Arc<dyn SegDataset>,
    n: usize,
}

impl SegDataset for Head {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn len(&self) -> usize {
        self.n
    }
    fn get(&self, i: usize) -> tgc_data::Result<tgc_data::Sample> {
        self.inner.get(i)
    }
}

/// Truncates a dataset to its first `n` samples.
pub fn head(ds: Arc<dyn SegDataset>, n: Option<usize>) -> Arc<dyn SegDataset> {
    match n {
        Some(n) if n < ds.len() => Arc::new(Head { inner: ds, n }),
        _ => ds,
    }
}

/// The part of a real split a run file asks for: the first `count` images, `sample`
/// images spread evenly over it, or all of it. `what` (`train` or `val`) names the
/// fields in errors.
pub fn pick(
    ds: Arc<dyn SegDataset>,
    count: Option<usize>,
    sample: Option<usize>,
    what: &str,
) -> Result<Arc<dyn SegDataset>> {
    match (count, sample) {
        (Some(_), Some(_)) => bail!("{what}_count and {what}_sample are both set; choose one"),
        (_, Some(0)) => bail!("{what}_sample = 0: sample at least one image"),
        (None, Some(n)) => Ok(evenly_spaced(ds, n)),
        (count, None) => Ok(head(ds, count)),
    }
}

/// Keeps `n` samples spread evenly over a dataset ([`tgc_data::Subset::evenly_spaced`]).
pub fn evenly_spaced(ds: Arc<dyn SegDataset>, n: usize) -> Arc<dyn SegDataset> {
    Arc::new(tgc_data::Subset::evenly_spaced(ds, n))
}

/// Opens an LViT split, with an error naming the folder.
pub fn lvit(root: &Path, split: Split) -> Result<Arc<dyn SegDataset>> {
    let ds = LvitDataset::open(root, split)
        .with_context(|| format!("cannot open dataset {}", root.display()))?;
    Ok(Arc::new(ds))
}

/// Synthetic phantoms: training (seed 1) or validation (seed 2).
pub fn phantoms(kind: PhantomKind, train: bool, n: usize, size: usize) -> Arc<dyn SegDataset> {
    let seed = if train { 1 } else { 2 };
    Arc::new(SyntheticPhantoms::new(kind, n, seed, size))
}

/// Parses a `--split` value.
pub fn split(s: &str) -> Result<Split> {
    match s {
        "train" => Ok(Split::Train),
        "val" => Ok(Split::Val),
        "test" => Ok(Split::Test),
        o => bail!("unknown split {o:?} (expected train, val or test)"),
    }
}

/// The default training recipe for a dataset folder (the paper's learning rate by its
/// name) or for phantoms (the main job's recipe, [`TrainConfig::for_phantoms`]: lr 1e-3,
/// 10 epochs, no early stopping, which left the "segment every lesion" plateau in every
/// draw tried); batches split over two threads on machines with at most 4 cores
/// ([`tgc_train::default_data_parallel`]).
pub fn default_train(data: Option<&Path>) -> TrainConfig {
    match data {
        None => TrainConfig::for_phantoms(),
        Some(d) => {
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            let key = if name.contains("mosmed") {
                "mosmed"
            } else if name.contains("qata") {
                "qata"
            } else {
                name.as_str()
            };
            TrainConfig {
                data_parallel: tgc_train::default_data_parallel(),
                ..TrainConfig::for_dataset(key)
            }
        }
    }
}

/// The default training recipe for labelled CT volumes: the paper's abdominal CT learning
/// rate (2e-4), with the data-parallel split of [`default_train`].
pub fn default_train_volumes() -> TrainConfig {
    TrainConfig {
        data_parallel: tgc_train::default_data_parallel(),
        ..TrainConfig::for_dataset("ct")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_table_overrides_only_the_named_fields() {
        let t: toml::Table =
            toml::from_str("text_mode = \"main_only\"\nsse = { mode = \"clip_only\" }\n").unwrap();
        let cfg = model_config("tiny", Some(&t)).unwrap();
        let mut want = TgcConfig::tiny();
        want.text_mode = tgc_model::TextMode::MainOnly;
        want.sse.mode = tgc_model::SseMode::ClipOnly;
        assert_eq!(cfg, want);
    }

    #[test]
    fn clip_finetune_is_a_model_setting_and_round_trips() {
        let t: toml::Table =
            toml::from_str("clip_finetune = \"query_value\"\nsse = { mode = \"clip_only\" }\n")
                .unwrap();
        let cfg = model_config("tiny", Some(&t)).unwrap();
        let want = TgcConfig::tiny()
            .with_clip_finetune(tgc_model::ClipFinetune::QueryValue)
            .with_sse_mode(tgc_model::SseMode::ClipOnly);
        assert_eq!(cfg, want);
        // As written to run.json and checkpoint metadata, and as TOML.
        let back: TgcConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let back: TgcConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let t: toml::Table = toml::from_str("clip_finetune = \"qv\"").unwrap();
        assert!(model_config("tiny", Some(&t)).is_err());
        // Fine-tuning CLIP with the CNN-only encoder is rejected by validation.
        let t: toml::Table =
            toml::from_str("clip_finetune = \"full\"\nsse = { mode = \"cnn_only\" }\n").unwrap();
        let e = model_config("tiny", Some(&t)).unwrap_err();
        assert!(format!("{e:#}").contains("clip_finetune"), "{e:#}");
    }

    #[test]
    fn unknown_and_mistyped_fields_are_errors() {
        let t: toml::Table = toml::from_str("epoch = 3").unwrap();
        let e = apply_overrides(&TrainConfig::default(), Some(&t), "train").unwrap_err();
        assert!(format!("{e:#}").contains("`epoch`"), "{e:#}");
        // A misspelt field inside a nested table is caught too.
        let t: toml::Table = toml::from_str("sse = { mod = \"cnn_only\" }").unwrap();
        let e = model_config("tiny", Some(&t)).unwrap_err();
        assert!(format!("{e:#}").contains("`sse.mod`"), "{e:#}");
        let t: toml::Table = toml::from_str("epochs = \"many\"").unwrap();
        assert!(apply_overrides(&TrainConfig::default(), Some(&t), "train").is_err());
        let t: toml::Table = toml::from_str("epochs = 3\nmax_steps = 20").unwrap();
        let tc = apply_overrides(&TrainConfig::default(), Some(&t), "train").unwrap();
        assert_eq!(
            tc,
            TrainConfig {
                epochs: 3,
                max_steps: Some(20),
                ..TrainConfig::default()
            }
        );
    }

    #[test]
    fn default_recipe_follows_the_dataset_name() {
        assert_eq!(default_train(Some(Path::new("data/MosMedData+"))).lr, 5e-4);
        assert_eq!(default_train(Some(Path::new("x/qata-cov19"))).lr, 2e-5);
        // Phantoms train with the main job's recipe, so `tgc train --phantoms ct` and
        // `train_mosmed` give the same model.
        assert_eq!(default_train(None), TrainConfig::for_phantoms());
    }
}
