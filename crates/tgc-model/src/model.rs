//! [`TgcNet`]: the frozen towers and the four trainable modules, composed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use tgc_clip::{VisionTransformer, WeightSource};
use tgc_date::{Date, TextFusion};
use tgc_decoder::CostAggregationDecoder;
use tgc_sse::Sse;
use tgc_vlcm::{Calibrator, Vlcm};

use crate::config::{TextMode, TgcConfig};
use crate::finetune::{build_vision_tower, CLIP_VISION_PREFIX};
use crate::towers::{FrozenTowers, ImageFeatures, PromptFeatures};
use crate::{Error, Result};

/// Metadata key under which checkpoints store the model config (JSON).
pub const CONFIG_METADATA_KEY: &str = "tgc_config";

/// Raw model input for `B` images with `K` prompts each.
#[derive(Clone, Debug)]
pub struct TgcInput {
    /// CLIP input `B x 3 x S_c x S_c` (CLIP mean/std).
    pub clip_images: Tensor,
    /// CNN input `B x 3 x S_n x S_n` (values in [-1, 1]).
    pub cnn_images: Tensor,
    /// `B` rows of `K` primary prompts (the report sentences).
    pub prompts: Vec<Vec<String>>,
    /// Auxiliary prompts of the same layout (domain knowledge for DATE); `None` uses the
    /// primary prompts.
    pub aux_prompts: Option<Vec<Vec<String>>>,
}

/// Trainable-parameter counts per module, and the frozen towers apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamCounts {
    /// Trainable parameters per module (`sse`, `date`, `vlcm`, `decoder`, and
    /// `clip_vision` when the CLIP vision tower is fine-tuned).
    pub per_module: BTreeMap<String, usize>,
    /// Sum of the trainable parameters.
    pub trainable: usize,
    /// Parameters of the frozen towers: CLIP's vision and text towers (both loaded,
    /// also when a BERT tower replaces CLIP's text tower) and the BERT text tower if
    /// any. Fine-tuned CLIP vision parameters count as trainable instead.
    pub frozen: usize,
}

/// TGC-Net.
///
/// The frozen towers ([`FrozenTowers`]) give [`ImageFeatures`] and [`PromptFeatures`]; the
/// trainable modules turn them into mask logits:
/// `SSE -> (DATE) -> VLCM -> CAT-Seg decoder`. The trainable parameters live in one
/// [`VarMap`] under the prefixes `sse.`, `date.`, `vlcm.` and `decoder.`; the frozen
/// weights are plain tensors.
///
/// With [`TgcConfig::clip_finetune`] other than `Frozen`, the model also holds a
/// trainable copy of CLIP's vision tower (initialised from the loaded weights, with
/// gradient-correct kernels) whose fine-tuned parameters are `Var`s under `clip_vision.`
/// (see [`crate::ClipFinetune`]). Image features then always come from that tower:
/// [`Self::forward`] and [`Self::forward_images`] compute them with gradients, and
/// [`Self::forward_features`] refuses precomputed ones. The text tower stays frozen.
pub struct TgcNet {
    cfg: TgcConfig,
    towers: FrozenTowers,
    clip_vision: Option<VisionTransformer>,
    sse: Sse,
    fusion: Option<Box<dyn TextFusion>>,
    calibrator: Box<dyn Calibrator>,
    decoder: CostAggregationDecoder,
    varmap: VarMap,
    device: Device,
}

impl std::fmt::Debug for TgcNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TgcNet")
            .field("preset", &self.cfg.preset)
            .finish()
    }
}

impl TgcNet {
    /// Builds the model with freshly initialised trainable modules around `towers`
    /// (initialisation seed 0).
    pub fn new(cfg: TgcConfig, towers: FrozenTowers) -> Result<Self> {
        Self::new_seeded(cfg, towers, 0)
    }

    /// Builds the model with trainable modules initialised from `seed`: equal seeds give
    /// bit-identical weights.
    pub fn new_seeded(cfg: TgcConfig, towers: FrozenTowers, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let device = towers.device().clone();
        let varmap = VarMap::new();
        let vb = tgc_nn::SeededVarMap::new(&varmap, seed).into_var_builder(DType::F32, &device);
        let sse =
            Sse::new(&cfg.sse, vb.pp("sse")).map_err(|e| Error::Config(format!("sse: {e}")))?;
        let fusion: Option<Box<dyn TextFusion>> = if cfg.text_mode.uses_date() {
            Some(Box::new(
                Date::new(&cfg.date, vb.pp("date"))
                    .map_err(|e| Error::Config(format!("date: {e}")))?,
            ))
        } else {
            None
        };
        let calibrator = Box::new(
            Vlcm::new(&cfg.vlcm, vb.pp("vlcm")).map_err(|e| Error::Config(format!("vlcm: {e}")))?,
        );
        let decoder = CostAggregationDecoder::new(&cfg.decoder, vb.pp("decoder"))
            .map_err(|e| Error::Config(format!("decoder: {e}")))?;
        let clip_vision = if cfg.clip_finetune.is_trainable() {
            Some(build_vision_tower(&cfg, &towers, &varmap)?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            towers,
            clip_vision,
            sse,
            fusion,
            calibrator,
            decoder,
            varmap,
            device,
        })
    }

    /// Loads the frozen towers from `clip_weights` and builds fresh trainable modules.
    pub fn load(cfg: TgcConfig, clip_weights: &WeightSource, device: &Device) -> Result<Self> {
        let towers = FrozenTowers::load(&cfg, clip_weights, device)?;
        Self::new(cfg, towers)
    }

    /// Replaces the calibration module (ablation by swapping from Rust code). The new
    /// module's trainable variables must be registered by the caller in
    /// [`Self::varmap`] (build it with [`Self::var_builder`]).
    pub fn with_calibrator(mut self, calibrator: Box<dyn Calibrator>) -> Self {
        self.calibrator = calibrator;
        self
    }

    /// Replaces the text fusion module (DATE) the same way as [`Self::with_calibrator`].
    pub fn with_text_fusion(mut self, fusion: Box<dyn TextFusion>) -> Self {
        self.fusion = Some(fusion);
        self
    }

    /// A `VarBuilder` over the model's trainable variables, for swapped-in modules.
    pub fn var_builder(&self) -> VarBuilder<'_> {
        VarBuilder::from_varmap(&self.varmap, DType::F32, &self.device)
    }

    /// The configuration.
    pub fn config(&self) -> &TgcConfig {
        &self.cfg
    }

    /// The frozen towers.
    pub fn towers(&self) -> &FrozenTowers {
        &self.towers
    }

    /// The trainable copy of CLIP's vision tower (`None` when `clip_finetune` is
    /// `frozen`).
    pub fn clip_vision(&self) -> Option<&VisionTransformer> {
        self.clip_vision.as_ref()
    }

    /// Whether image features must be computed by the model on every forward (the CLIP
    /// vision tower is fine-tuned), so they cannot be cached or precomputed.
    pub fn finetunes_clip(&self) -> bool {
        self.clip_vision.is_some()
    }

    /// Image features of preprocessed images `B x 3 x S_c x S_c` (CLIP mean/std): from
    /// the trainable vision tower (with gradients) when CLIP is fine-tuned, else from the
    /// frozen towers (no graph).
    pub fn encode_images(&self, clip_images: &Tensor) -> Result<ImageFeatures> {
        match &self.clip_vision {
            Some(tower) => {
                let out = tower
                    .forward(clip_images, &[])
                    .map_err(|e| Error::Input(format!("CLIP vision tower (fine-tuned): {e}")))?;
                Ok(ImageFeatures {
                    patch_tokens: out.patch_tokens,
                    dense_embeds: out.dense_embeds,
                })
            }
            None => self.towers.encode_images(clip_images),
        }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable variables.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The trainable variables sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock poisoned");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Trainable parameters per module and the frozen towers' size (fine-tuned CLIP
    /// parameters count as trainable, module `clip_vision`, not as frozen).
    pub fn param_counts(&self) -> ParamCounts {
        let mut per_module = BTreeMap::new();
        let mut trainable = 0;
        for (name, var) in self.trainable_vars() {
            let module = name.split('.').next().unwrap_or("other").to_string();
            let n = var.elem_count();
            *per_module.entry(module).or_insert(0) += n;
            trainable += n;
        }
        let finetuned = per_module.get(CLIP_VISION_PREFIX).copied().unwrap_or(0);
        ParamCounts {
            per_module,
            trainable,
            frozen: clip_param_count(&self.cfg).saturating_sub(finetuned)
                + self.towers.bert_param_count().unwrap_or(0),
        }
    }

    /// The prompts the model actually sees for a sample, after the text mode and the
    /// image-only switch: `(primary, aux)`; `aux` is `Some` only when DATE runs.
    pub fn effective_prompts(&self, primary: &str, aux: &str) -> (String, Option<String>) {
        if self.cfg.image_only {
            return (String::new(), self.fusion.as_ref().map(|_| String::new()));
        }
        match self.cfg.text_mode {
            TextMode::Fused => (primary.to_string(), Some(aux.to_string())),
            TextMode::MainOnly => (primary.to_string(), None),
            TextMode::AuxOnly => (aux.to_string(), None),
            TextMode::Concatenated => (format!("{primary} {aux}"), None),
        }
    }

    /// Whether the model needs auxiliary prompt features.
    pub fn needs_aux(&self) -> bool {
        self.fusion.is_some()
    }

    /// Runs the trainable modules on frozen features.
    ///
    /// - `image`: features of `B` images
    /// - `cnn_images`: `B x 3 x S_n x S_n`
    /// - `primary`: features of `B*K` prompts, ordered `b*K + k`
    /// - `aux`: auxiliary prompt features in the same order (required when DATE runs)
    /// - `k`: prompts per image
    ///
    /// Returns logits `B x K x label_size x label_size`.
    ///
    /// Fails when the CLIP vision tower is fine-tuned (`clip_finetune` not `frozen`):
    /// precomputed features would bypass the tower being trained (no gradient, stale
    /// after the first update). Use [`Self::forward_images`] (cached prompts, raw
    /// images) or [`Self::forward`] then.
    pub fn forward_features(
        &self,
        image: &ImageFeatures,
        cnn_images: &Tensor,
        primary: &PromptFeatures,
        aux: Option<&PromptFeatures>,
        k: usize,
        train: bool,
    ) -> Result<Tensor> {
        if self.finetunes_clip() {
            return Err(Error::Input(format!(
                "forward_features: clip_finetune is {}, so image features must come from \
                 the model's trainable CLIP vision tower, not from precomputed or cached \
                 features; call forward_images (raw CLIP images) or forward instead",
                self.cfg.clip_finetune
            )));
        }
        self.run_modules(image, cnn_images, primary, aux, k, train)
    }

    /// Runs the model on raw CLIP images and precomputed prompt features: image features
    /// come from [`Self::encode_images`] (the fine-tuned vision tower with gradients when
    /// `clip_finetune` is set, else the frozen one), then as [`Self::forward_features`].
    ///
    /// - `clip_images`: `B x 3 x S_c x S_c` (CLIP mean/std); other arguments as in
    ///   [`Self::forward_features`].
    ///
    /// Returns logits `B x K x label_size x label_size`.
    pub fn forward_images(
        &self,
        clip_images: &Tensor,
        cnn_images: &Tensor,
        primary: &PromptFeatures,
        aux: Option<&PromptFeatures>,
        k: usize,
        train: bool,
    ) -> Result<Tensor> {
        let (b, bc) = (cnn_images.dim(0)?, clip_images.dim(0)?);
        if b != bc {
            return Err(Error::Input(format!(
                "{bc} CLIP images but {b} CNN images in one batch"
            )));
        }
        let image = self.encode_images(clip_images)?;
        self.run_modules(&image, cnn_images, primary, aux, k, train)
    }

    /// The trainable modules on image and prompt features (no fine-tuning check).
    fn run_modules(
        &self,
        image: &ImageFeatures,
        cnn_images: &Tensor,
        primary: &PromptFeatures,
        aux: Option<&PromptFeatures>,
        k: usize,
        train: bool,
    ) -> Result<Tensor> {
        let b = cnn_images.dim(0)?;
        let p = primary.states.dim(0)?;
        if k == 0 || p != b * k {
            return Err(Error::Input(format!(
                "{p} prompt rows for {b} images with {k} prompts each (expected {})",
                b * k
            )));
        }
        let pyramid = self
            .sse
            .forward(cnn_images, Some(&image.patch_tokens), train)
            .map_err(|e| Error::Input(format!("sse: {e}")))?;
        let (text, mask) = match &self.fusion {
            Some(fusion) => {
                let aux = aux.ok_or_else(|| {
                    Error::Input("DATE needs auxiliary prompt features (got none)".into())
                })?;
                fusion
                    .fuse(
                        &primary.states,
                        &primary.mask,
                        &aux.states,
                        &aux.mask,
                        train,
                    )
                    .map_err(|e| Error::Input(format!("date: {e}")))?
            }
            None => (primary.states.clone(), primary.mask.clone()),
        };
        let cal = self
            .calibrator
            .calibrate(&pyramid.f32, &text, &mask, k)
            .map_err(|e| Error::Input(format!("vlcm: {e}")))?;
        // Text vector per prompt: pooled calibrated tokens.
        let text_vec = cal
            .text
            .broadcast_mul(&primary.pool.unsqueeze(D::Minus1)?)?
            .sum(1)?;
        let d = text_vec.dim(1)?;
        let text_vec = text_vec.reshape((b, k, d))?;
        let clip_cost = if self.cfg.decoder.use_clip_cost {
            let embeds = primary.embeds.as_ref().ok_or_else(|| {
                Error::Input("the CLIP cost channel needs CLIP text embeddings".into())
            })?;
            Some(clip_cost_map(&image.dense_embeds, embeds, k)?)
        } else {
            None
        };
        let logits = self
            .decoder
            .forward_with_guidance(
                &cal.vision,
                &text_vec,
                &pyramid.f16,
                &pyramid.f8,
                pyramid
                    .f4
                    .as_ref()
                    .filter(|_| self.cfg.decoder.quarter.is_some()),
                Some(cnn_images).filter(|_| self.cfg.decoder.half.is_some()),
                clip_cost.as_ref(),
                train,
            )
            .map_err(|e| Error::Input(format!("decoder: {e}")))?;
        let s = self.cfg.label_size;
        Ok(tgc_nn::resize_bilinear(&logits, s, s)?)
    }

    /// Encodes the prompts of `B` images with `K` prompts each, applying the text mode.
    /// Returns `(primary, aux)` features ordered `b*K + k`.
    pub fn encode_prompts(
        &self,
        prompts: &[Vec<String>],
        aux_prompts: Option<&[Vec<String>]>,
    ) -> Result<(PromptFeatures, Option<PromptFeatures>)> {
        let k = prompts.first().map(|r| r.len()).unwrap_or(0);
        if k == 0 || prompts.iter().any(|r| r.len() != k) {
            return Err(Error::Input(
                "every image needs the same, non-zero number of prompts".into(),
            ));
        }
        let mut prim = Vec::new();
        let mut aux = Vec::new();
        for (i, row) in prompts.iter().enumerate() {
            for (j, p) in row.iter().enumerate() {
                if p.trim().is_empty() && !self.cfg.image_only {
                    return Err(Error::Input(format!("prompt {j} of image {i} is empty")));
                }
                let a = aux_prompts
                    .and_then(|a| a.get(i))
                    .and_then(|r| r.get(j))
                    .unwrap_or(p);
                let (pp, aa) = self.effective_prompts(p, a);
                prim.push(pp);
                if let Some(aa) = aa {
                    aux.push(aa);
                }
            }
        }
        let primary = self.towers.encode_prompts(&prim)?;
        let aux = if aux.is_empty() {
            None
        } else {
            Some(self.towers.encode_prompts(&aux)?)
        };
        Ok((primary, aux))
    }

    /// Runs the whole model (towers included) on raw input; a fine-tuned CLIP vision
    /// tower runs with gradients. Returns logits `B x K x label_size x label_size`.
    pub fn forward(&self, input: &TgcInput, train: bool) -> Result<Tensor> {
        let (primary, aux) = self.encode_prompts(&input.prompts, input.aux_prompts.as_deref())?;
        let k = input.prompts[0].len();
        self.forward_images(
            &input.clip_images,
            &input.cnn_images,
            &primary,
            aux.as_ref(),
            k,
            train,
        )
    }

    /// Segments one preprocessed image with `prompts`.
    ///
    /// - `clip_image`: `3 x S_c x S_c`, `cnn_image`: `3 x S_n x S_n`
    ///
    /// Returns probabilities `K x label_size x label_size` (sigmoid of the logits).
    pub fn predict(
        &self,
        clip_image: &Tensor,
        cnn_image: &Tensor,
        prompts: &[&str],
        aux_prompts: Option<&[&str]>,
    ) -> Result<Tensor> {
        let input = TgcInput {
            clip_images: clip_image.unsqueeze(0)?,
            cnn_images: cnn_image.unsqueeze(0)?,
            prompts: vec![prompts.iter().map(|s| s.to_string()).collect()],
            aux_prompts: aux_prompts.map(|a| vec![a.iter().map(|s| s.to_string()).collect()]),
        };
        let logits = self.forward(&input, false)?;
        Ok(candle_nn::ops::sigmoid(&logits.squeeze(0)?)?)
    }

    /// The trainable weights by name (a snapshot).
    pub fn trainable_tensors(&self) -> HashMap<String, Tensor> {
        self.trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// Saves the trainable weights (fine-tuned CLIP parameters included) to a safetensors
    /// file with the config in its metadata, atomically (temporary file, then rename).
    pub fn save_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut meta = HashMap::new();
        meta.insert(
            CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&self.cfg).map_err(|e| Error::Config(e.to_string()))?,
        );
        let tensors = self.trainable_tensors();
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        safetensors::serialize_to_file(tensors.iter(), Some(meta), &tmp)
            .map_err(|e| Error::Config(format!("writing {}: {e}", tmp.display())))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Loads trainable weights saved by [`Self::save_weights`] or by a training
    /// checkpoint (extra tensors such as optimiser moments are ignored).
    ///
    /// Fails with an error naming the file when it is unreadable, when it was written for
    /// another configuration (naming the differing fields) or when a tensor is missing or
    /// mis-shaped.
    pub fn load_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::MissingFile {
            path: path.to_path_buf(),
            hint: format!("cannot read checkpoint: {e}"),
        })?;
        let corrupt =
            |e: String| Error::Config(format!("{}: not a valid checkpoint: {e}", path.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if let Some(json) = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CONFIG_METADATA_KEY))
        {
            let found: serde_json::Value =
                serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))?;
            // Fields added since the checkpoint was written (e.g. `clip_finetune`) take
            // their defaults, as deserialising the stored config would give; fields this
            // version does not know (a checkpoint from a newer tgc) are refused by name
            // rather than dropped. A config that does not parse at all is compared as
            // stored, so the error lists what differs.
            let found = match serde_json::from_value::<TgcConfig>(found.clone()) {
                Ok(c) => {
                    let known =
                        serde_json::to_value(c).map_err(|e| Error::Config(e.to_string()))?;
                    let unknown = crate::unknown_fields(&found, &known);
                    if !unknown.is_empty() {
                        return Err(Error::Config(format!(
                            "{}: its model config has fields this version of tgc does not \
                             know: {} (written by a newer version?)",
                            path.display(),
                            unknown.join(", ")
                        )));
                    }
                    known
                }
                Err(_) => found,
            };
            let ours = serde_json::to_value(&self.cfg).map_err(|e| Error::Config(e.to_string()))?;
            let diffs = config_diff(&ours, &found);
            if !diffs.is_empty() {
                return Err(Error::Config(format!(
                    "{} was written for another config: {}",
                    path.display(),
                    diffs.join("; ")
                )));
            }
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &self.device)
            .map_err(|e| corrupt(e.to_string()))?;
        // Without a stored config, at least refuse fine-tuned CLIP weights this model
        // would silently ignore.
        if !self.finetunes_clip() {
            let prefix = format!("{CLIP_VISION_PREFIX}.");
            if let Some(n) = tensors.keys().find(|n| n.starts_with(&prefix)) {
                return Err(Error::Config(format!(
                    "{} holds fine-tuned CLIP vision weights ({n}, ...) but this model's \
                     clip_finetune is frozen",
                    path.display()
                )));
            }
        }
        for (name, var) in self.trainable_vars() {
            let t = tensors
                .get(&name)
                .ok_or_else(|| Error::Config(format!("{}: missing tensor {name}", path.display())))?
                .to_dtype(DType::F32)?;
            if t.dims() != var.dims() {
                return Err(Error::Config(format!(
                    "{}: tensor {name} has shape {:?}, the model expects {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t)?;
        }
        Ok(())
    }
}

/// The parameter-free CLIP zero-shot cost: cosine of CLIP's dense projected patch
/// embeddings (`B x N x E`) with the projected text embeddings (`B*K x E`), as
/// `B x K x h x w` (the paper's Fig. 1a map).
pub fn clip_cost_map(dense: &Tensor, text: &Tensor, k: usize) -> Result<Tensor> {
    let (b, n, e) = dense.dims3()?;
    let side = (n as f64).sqrt().round() as usize;
    if side * side != n {
        return Err(Error::Input(format!(
            "{n} patch tokens do not form a square grid"
        )));
    }
    let norm = |x: &Tensor| -> candle_core::Result<Tensor> {
        x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)
    };
    let v = norm(dense)?; // B x N x E
    let t = norm(text)?.reshape((b, k, e))?; // B x K x E
    let cos = t.matmul(&v.transpose(1, 2)?.contiguous()?)?; // B x K x N
    Ok(cos.reshape((b, k, side, side))?)
}

/// Parameters of the frozen CLIP towers of `cfg` (both towers and projections).
pub fn clip_param_count(cfg: &TgcConfig) -> usize {
    let v = &cfg.clip.vision;
    let t = &cfg.clip.text;
    let e = cfg.clip.embed_dim;
    let block = |w: usize, mlp: usize| 4 * (w * w + w) + 2 * (w * mlp) + mlp + w + 4 * w;
    let grid = (v.image_size / v.patch_size).pow(2);
    let vision = v.num_channels * v.patch_size * v.patch_size * v.width
        + v.width
        + (grid + 1) * v.width
        + 4 * v.width
        + v.layers * block(v.width, v.mlp_dim)
        + v.width * e;
    let text = t.vocab_size * t.width
        + t.context_length * t.width
        + t.layers * block(t.width, t.mlp_dim)
        + 2 * t.width
        + t.width * e;
    vision + text
}

/// Differences between two config JSON values, as `path: ours vs found` lines
/// (the informational `preset` name is ignored).
fn config_diff(ours: &serde_json::Value, found: &serde_json::Value) -> Vec<String> {
    fn walk(p: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                for (k, va) in x {
                    if p.is_empty() && k == "preset" {
                        continue;
                    }
                    let q = if p.is_empty() {
                        k.clone()
                    } else {
                        format!("{p}.{k}")
                    };
                    match y.get(k) {
                        Some(vb) => walk(&q, va, vb, out),
                        None => out.push(format!("{q}: {va} vs (absent)")),
                    }
                }
                for (k, vb) in y {
                    let skip = x.contains_key(k) || (p.is_empty() && k == "preset");
                    if !skip {
                        let q = if p.is_empty() {
                            k.clone()
                        } else {
                            format!("{p}.{k}")
                        };
                        out.push(format!("{q}: (absent) vs {vb}"));
                    }
                }
            }
            _ if a != b => out.push(format!("{p}: {a} (this model) vs {b} (checkpoint)")),
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", ours, found, &mut out);
    out
}
