//! Weight sources and checkpoint naming.
//!
//! The model is always built from Hugging Face transformers names (the
//! `CLIPModel` state dict). [`WeightStore`] serves those names from safetensors
//! files written with either Hugging Face names or open_clip names, mapping the
//! latter lazily (splitting the fused `in_proj` q/k/v, transposing `proj` and
//! `text_projection`), and checks every tensor's presence and shape up front so
//! that a bad checkpoint gives a named [`Error`] instead of a deep candle error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use crate::{ClipConfig, Error, Result};

/// Default Hugging Face repository of the paper's CLIP.
pub const DEFAULT_HUB_REPO: &str = "openai/clip-vit-large-patch14-336";
/// Default weight file inside a hub repository.
pub const DEFAULT_HUB_FILE: &str = "model.safetensors";

/// Where `ClipModel::load` reads its frozen weights from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightSource {
    /// A Hugging Face hub repository (`model.safetensors`). The local hub cache is
    /// consulted first (so a warm cache works offline); otherwise the file is
    /// downloaded with `hf-hub`.
    Hub {
        /// Repository id, e.g. `openai/clip-vit-large-patch14-336`.
        repo: String,
        /// Branch, tag or commit (`main`).
        revision: String,
        /// Hub cache directory; `None` uses `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
        cache_dir: Option<PathBuf>,
    },
    /// One safetensors file (Hugging Face or open_clip names).
    File(PathBuf),
    /// A directory: every `*.safetensors` file in it (sharded checkpoints).
    Dir(PathBuf),
    /// Deterministic random weights in the real architecture (see [`random_tensors`]).
    Random {
        /// Seed of the generator; equal seeds give bit-identical weights.
        seed: u64,
    },
}

impl Default for WeightSource {
    /// `openai/clip-vit-large-patch14-336` at `main` from the hub.
    fn default() -> Self {
        Self::hub(DEFAULT_HUB_REPO)
    }
}

impl WeightSource {
    /// A hub repository at revision `main` with the default cache.
    pub fn hub(repo: &str) -> Self {
        Self::Hub {
            repo: repo.to_string(),
            revision: "main".to_string(),
            cache_dir: None,
        }
    }

    /// A `VarBuilder` over this source's tensors with Hugging Face `CLIPModel` names
    /// (the model root), as [`crate::ClipModel::load_with_dtype`] uses: plain tensors,
    /// never `Var`s. File sources are checked against `cfg` first (every tensor present
    /// and well-shaped) and memory-mapped; `Random` generates [`random_tensors`].
    pub fn var_builder(
        &self,
        cfg: &ClipConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<candle_nn::VarBuilder<'static>> {
        match self {
            WeightSource::Random { seed } => {
                let ts = random_tensors(cfg, *seed)?;
                Ok(candle_nn::VarBuilder::from_tensors(ts, dtype, device))
            }
            _ => {
                let files = self.resolve()?;
                let store = WeightStore::open(&files)?;
                store.check(cfg)?;
                Ok(candle_nn::VarBuilder::from_backend(
                    Box::new(store),
                    dtype,
                    device.clone(),
                ))
            }
        }
    }

    /// Resolves the source to local safetensors files (downloading for `Hub`
    /// when the cache is cold). `Random` resolves to no files.
    pub fn resolve(&self) -> Result<Vec<PathBuf>> {
        match self {
            WeightSource::File(p) => {
                if !p.is_file() {
                    return Err(Error::Io {
                        path: p.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                    });
                }
                Ok(vec![p.clone()])
            }
            WeightSource::Dir(d) => {
                let rd = std::fs::read_dir(d).map_err(|e| Error::Io {
                    path: d.clone(),
                    source: e,
                })?;
                let mut files: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(Error::NoWeights(d.clone()));
                }
                Ok(files)
            }
            WeightSource::Hub {
                repo,
                revision,
                cache_dir,
            } => Ok(vec![hub_file(
                repo,
                revision,
                cache_dir.as_deref(),
                DEFAULT_HUB_FILE,
            )?]),
            WeightSource::Random { .. } => Ok(vec![]),
        }
    }
}

/// Fetches `file` of model repository `repo` at `revision`: from the hub cache
/// when present (no network), else downloaded into it.
pub fn hub_file(
    repo: &str,
    revision: &str,
    cache_dir: Option<&Path>,
    file: &str,
) -> Result<PathBuf> {
    use hf_hub::{Cache, Repo, RepoType};
    let cache = match cache_dir {
        Some(d) => Cache::new(d.to_path_buf()),
        None => Cache::from_env(),
    };
    let r = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    if let Some(p) = cache.repo(r.clone()).get(file) {
        return Ok(p);
    }
    // A revision given as a commit hash has no `refs/` entry: its snapshot
    // folder is named by the hash itself.
    let pinned = cache
        .path()
        .join(r.folder_name())
        .join("snapshots")
        .join(revision)
        .join(file);
    if pinned.is_file() {
        return Ok(pinned);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(false)
        .build()
        .map_err(|e| Error::Hub(format!("{repo}@{revision}: {e}")))?;
    api.repo(r)
        .get(file)
        .map_err(|e| Error::Hub(format!("{repo}@{revision}/{file}: {e}")))
}

/// Naming scheme of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Hugging Face transformers `CLIPModel` (`vision_model.*`, `text_model.*`, ...).
    HuggingFace,
    /// open_clip / OpenAI (`visual.*`, `transformer.resblocks.*`, `ln_final`, ...).
    OpenClip,
}

/// Every tensor the model reads, with Hugging Face names and shapes.
pub fn expected_tensors(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let v = &cfg.vision;
    let t = &cfg.text;
    let e = cfg.embed_dim;
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |n: String, s: &[usize]| out.push((n, s.to_vec()));
    let layers =
        |push: &mut dyn FnMut(String, &[usize]), pre: &str, n: usize, d: usize, m: usize| {
            for i in 0..n {
                let p = format!("{pre}.encoder.layers.{i}");
                for q in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    push(format!("{p}.self_attn.{q}.weight"), &[d, d]);
                    push(format!("{p}.self_attn.{q}.bias"), &[d]);
                }
                for ln in ["layer_norm1", "layer_norm2"] {
                    push(format!("{p}.{ln}.weight"), &[d]);
                    push(format!("{p}.{ln}.bias"), &[d]);
                }
                push(format!("{p}.mlp.fc1.weight"), &[m, d]);
                push(format!("{p}.mlp.fc1.bias"), &[m]);
                push(format!("{p}.mlp.fc2.weight"), &[d, m]);
                push(format!("{p}.mlp.fc2.bias"), &[d]);
            }
        };
    let (dv, p, c) = (v.width, v.patch_size, v.num_channels);
    let npos = v.grid() * v.grid() + 1;
    push(
        "vision_model.embeddings.patch_embedding.weight".into(),
        &[dv, c, p, p],
    );
    push("vision_model.embeddings.class_embedding".into(), &[dv]);
    push(
        "vision_model.embeddings.position_embedding.weight".into(),
        &[npos, dv],
    );
    for ln in ["pre_layrnorm", "post_layernorm"] {
        push(format!("vision_model.{ln}.weight"), &[dv]);
        push(format!("vision_model.{ln}.bias"), &[dv]);
    }
    layers(&mut push, "vision_model", v.layers, dv, v.mlp_dim);
    push("visual_projection.weight".into(), &[e, dv]);
    let dt = t.width;
    push(
        "text_model.embeddings.token_embedding.weight".into(),
        &[t.vocab_size, dt],
    );
    push(
        "text_model.embeddings.position_embedding.weight".into(),
        &[t.context_length, dt],
    );
    layers(&mut push, "text_model", t.layers, dt, t.mlp_dim);
    push("text_model.final_layer_norm.weight".into(), &[dt]);
    push("text_model.final_layer_norm.bias".into(), &[dt]);
    push("text_projection.weight".into(), &[e, dt]);
    out
}

/// How a Hugging Face tensor is read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
enum Transform {
    Identity,
    /// Rows `start..start+len` of the source (q/k/v out of a fused `in_proj`).
    Rows(usize, usize),
    /// The source is stored transposed (`x @ proj` in open_clip).
    Transpose,
}

/// The source tensor for a Hugging Face name: (source name, source shape, transform).
fn source_of(naming: Naming, hf: &str, shape: &[usize]) -> (String, Vec<usize>, Transform) {
    if naming == Naming::HuggingFace {
        return (hf.to_string(), shape.to_vec(), Transform::Identity);
    }
    let id = |n: String| (n, shape.to_vec(), Transform::Identity);
    let tr = |n: &str| {
        (
            n.to_string(),
            vec![shape[1], shape[0]],
            Transform::Transpose,
        )
    };
    match hf {
        "vision_model.embeddings.patch_embedding.weight" => return id("visual.conv1.weight".into()),
        "vision_model.embeddings.class_embedding" => return id("visual.class_embedding".into()),
        "vision_model.embeddings.position_embedding.weight" => {
            return id("visual.positional_embedding".into())
        }
        "visual_projection.weight" => return tr("visual.proj"),
        "text_projection.weight" => return tr("text_projection"),
        "text_model.embeddings.token_embedding.weight" => {
            return id("token_embedding.weight".into())
        }
        "text_model.embeddings.position_embedding.weight" => {
            return id("positional_embedding".into())
        }
        _ => {}
    }
    let (rest, tower) = if let Some(r) = hf.strip_prefix("vision_model.") {
        (r, "visual.")
    } else if let Some(r) = hf.strip_prefix("text_model.") {
        (r, "")
    } else {
        return id(hf.to_string());
    };
    for (a, b) in [
        ("pre_layrnorm.", "ln_pre."),
        ("post_layernorm.", "ln_post."),
        ("final_layer_norm.", "ln_final."),
    ] {
        if let Some(s) = rest.strip_prefix(a) {
            return id(format!("{tower}{b}{s}"));
        }
    }
    if let Some(r) = rest.strip_prefix("encoder.layers.") {
        let (idx, r) = r.split_once('.').unwrap_or((r, ""));
        let blk = format!("{tower}transformer.resblocks.{idx}");
        let (part, kind) = r.rsplit_once('.').unwrap_or((r, ""));
        let qkv = |k: usize| {
            let d = shape[0];
            let mut s = shape.to_vec();
            s[0] = 3 * d;
            (
                format!("{blk}.attn.in_proj_{kind}"),
                s,
                Transform::Rows(k * d, d),
            )
        };
        return match part {
            "self_attn.q_proj" => qkv(0),
            "self_attn.k_proj" => qkv(1),
            "self_attn.v_proj" => qkv(2),
            "self_attn.out_proj" => id(format!("{blk}.attn.out_proj.{kind}")),
            "layer_norm1" => id(format!("{blk}.ln_1.{kind}")),
            "layer_norm2" => id(format!("{blk}.ln_2.{kind}")),
            "mlp.fc1" => id(format!("{blk}.mlp.c_fc.{kind}")),
            "mlp.fc2" => id(format!("{blk}.mlp.c_proj.{kind}")),
            _ => id(hf.to_string()),
        };
    }
    id(hf.to_string())
}

/// Safetensors files opened (memory-mapped) with their naming scheme detected.
/// Implements candle's [`SimpleBackend`], so a `VarBuilder` over it serves
/// Hugging Face names whatever the file's naming.
pub struct WeightStore {
    files: Vec<PathBuf>,
    st: Vec<MmapedSafetensors>,
    /// source name -> (file index, shape)
    index: HashMap<String, (usize, Vec<usize>)>,
    naming: Naming,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("files", &self.files)
            .field("tensors", &self.index.len())
            .field("naming", &self.naming)
            .finish()
    }
}

impl WeightStore {
    /// Memory-maps `files` and detects the naming scheme.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut st = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // SAFETY: the file is only read; as with every mmap, it must not be
            // truncated by another process while the store is alive.
            let m = unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::Safetensors {
                path: f.clone(),
                msg: e.to_string(),
            })?;
            for (name, view) in m.tensors() {
                index.insert(name, (i, view.shape().to_vec()));
            }
            st.push(m);
        }
        let naming = if index.contains_key("vision_model.embeddings.patch_embedding.weight") {
            Naming::HuggingFace
        } else if index.contains_key("visual.conv1.weight") {
            Naming::OpenClip
        } else {
            return Err(Error::UnknownNaming {
                files: display_files(files),
            });
        };
        Ok(Self {
            files: files.to_vec(),
            st,
            index,
            naming,
        })
    }

    /// The detected naming scheme.
    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// The files backing this store.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Checks that every tensor of `cfg` exists with the right shape; the error
    /// names the tensor as stored in the file, its Hugging Face name and the file.
    pub fn check(&self, cfg: &ClipConfig) -> Result<()> {
        for (hf, shape) in expected_tensors(cfg) {
            let (src, sshape, _) = source_of(self.naming, &hf, &shape);
            match self.index.get(&src) {
                None => {
                    return Err(Error::MissingTensor {
                        name: src,
                        hf_name: hf,
                        files: display_files(&self.files),
                    })
                }
                Some((fi, got)) if *got != sshape => {
                    return Err(Error::ShapeMismatch {
                        name: src,
                        hf_name: hf,
                        file: self.files[*fi].clone(),
                        expected: sshape,
                        got: got.clone(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Loads the tensor with Hugging Face name `hf` (mapped from the file's naming).
    pub fn load(&self, hf: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let (src, sshape, tr) = source_of(self.naming, hf, shape);
        let (fi, got) = self.index.get(&src).ok_or_else(|| Error::MissingTensor {
            name: src.clone(),
            hf_name: hf.to_string(),
            files: display_files(&self.files),
        })?;
        if *got != sshape {
            return Err(Error::ShapeMismatch {
                name: src,
                hf_name: hf.to_string(),
                file: self.files[*fi].clone(),
                expected: sshape,
                got: got.clone(),
            });
        }
        let t = self.st[*fi].load(&src, dev)?;
        Ok(match tr {
            Transform::Identity => t,
            Transform::Rows(s, n) => t.narrow(0, s, n)?.contiguous()?,
            Transform::Transpose => t.t()?.contiguous()?,
        })
    }
}

fn display_files(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl SimpleBackend for WeightStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, s.dims(), dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // Only Hugging Face-named files can be read without a shape to map with.
        let (fi, _) = self
            .index
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}`")))?;
        self.st[*fi].load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // The shape only matters for the q/k/v row split, not for the name.
        let (src, _, _) = source_of(self.naming, name, &[1, 1]);
        self.index.contains_key(&src)
    }
}

/// SplitMix64: tiny, portable, and good enough to seed Box-Muller normals.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: per-tensor streams independent of the order tensors are created in.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic random weights for `cfg` with Hugging Face names, on the CPU in
/// f32: LayerNorm weights 1 and biases 0, linear biases 0, every other tensor
/// (embeddings, patch conv, linears, projections) normal with std 0.02. Each
/// tensor's stream depends only on `seed` and its name.
pub fn random_tensors(cfg: &ClipConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, shape) in expected_tensors(cfg) {
        let n: usize = shape.iter().product();
        let is_ln = ["layer_norm", "layernorm", "layrnorm"]
            .iter()
            .any(|k| name.contains(k));
        let data: Vec<f32> = if is_ln && name.ends_with(".weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let mut rng = SplitMix64(seed ^ name_hash(&name));
            let mut v = Vec::with_capacity(n + 1);
            while v.len() < n {
                let (u1, u2) = (rng.uniform(), rng.uniform());
                let r = (-2.0 * u1.ln()).sqrt() * 0.02;
                let th = std::f64::consts::TAU * u2;
                v.push((r * th.cos()) as f32);
                v.push((r * th.sin()) as f32);
            }
            v.truncate(n);
            v
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}
