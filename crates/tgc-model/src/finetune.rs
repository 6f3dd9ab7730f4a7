//! The trainable copy of CLIP's vision tower used when [`ClipFinetune`] is not `Frozen`.
//!
//! `TgcNet` reads the pretrained tensors again from the towers' weight source
//! ([`crate::FrozenTowers::weight_source`]) and builds a [`VisionTransformer`] in
//! [`TowerMode::Trainable`] through a `VarBuilder` backend that turns the parameters
//! chosen by the [`ClipFinetune`] policy into `Var`s of the model's [`VarMap`] (copies:
//! the frozen towers stay untouched),
//! named `clip_vision.` + the Hugging Face name without its `vision_model.` prefix
//! (`clip_vision.encoder.layers.3.self_attn.q_proj.weight`,
//! `clip_vision.visual_projection.weight`). Every other tensor is handed out as the
//! plain pretrained tensor.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use tgc_clip::{TowerMode, VisionTransformer};

use crate::config::{ClipFinetune, TgcConfig};
use crate::towers::FrozenTowers;
use crate::{Error, Result};

/// Prefix of the fine-tuned CLIP vision parameters in the model's `VarMap` (and the
/// module name in [`crate::ParamCounts`]).
pub const CLIP_VISION_PREFIX: &str = "clip_vision";

/// The `VarMap` name of a vision-tower tensor given by its Hugging Face name.
pub fn clip_vision_var_name(hf_name: &str) -> String {
    let short = hf_name.strip_prefix("vision_model.").unwrap_or(hf_name);
    format!("{CLIP_VISION_PREFIX}.{short}")
}

/// Whether the vision-tower tensor `hf_name` (Hugging Face name) trains under `cfg`.
pub fn is_finetuned(cfg: &TgcConfig, hf_name: &str) -> bool {
    match cfg.clip_finetune {
        ClipFinetune::Frozen => false,
        ClipFinetune::QueryValue => {
            hf_name.contains(".self_attn.q_proj.") || hf_name.contains(".self_attn.v_proj.")
        }
        ClipFinetune::Full => {
            // The post-LN and the visual projection only feed the dense joint-space
            // embeddings, which only the decoder's CLIP cost channel reads.
            let head = hf_name.starts_with("vision_model.post_layernorm.")
                || hf_name.starts_with("visual_projection.");
            !head || cfg.decoder.use_clip_cost
        }
    }
}

/// Hands out the pretrained tensors, as fresh `Var`s in `varmap` where the policy says
/// so (an existing `Var` of that name is reused).
struct FinetuneBackend {
    source: VarBuilder<'static>,
    varmap: VarMap,
    cfg: TgcConfig,
}

impl SimpleBackend for FinetuneBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .source
            .get(s.clone(), name)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        if !is_finetuned(&self.cfg, name) {
            return Ok(t);
        }
        let key = clip_vision_var_name(name);
        let mut data = self.varmap.data().lock().expect("varmap lock poisoned");
        if let Some(v) = data.get(&key) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable {key} exists with shape {:?}, requested {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        // `Var::from_tensor` copies the storage: the frozen towers never see updates.
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(key, var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!(
            "the CLIP vision tower asked for `{name}` ({dtype:?} on {dev:?}) without a shape"
        )
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains_tensor(name)
    }
}

/// Builds the trainable vision tower for `cfg.clip_finetune` (not `Frozen`), registering
/// its trained parameters in `varmap`.
pub(crate) fn build_vision_tower(
    cfg: &TgcConfig,
    towers: &FrozenTowers,
    varmap: &VarMap,
) -> Result<VisionTransformer> {
    let clip = &cfg.clip;
    let device = towers.device();
    let source = towers
        .weight_source()
        .var_builder(clip, DType::F32, device)
        .map_err(|e| Error::Config(format!("loading CLIP weights to fine-tune: {e}")))?;
    let backend = FinetuneBackend {
        source,
        varmap: varmap.clone(),
        cfg: cfg.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    VisionTransformer::new_with_mode(&clip.vision, clip.embed_dim, vb, TowerMode::Trainable)
        .map_err(|e| Error::Config(format!("trainable CLIP vision tower: {e}")))
}
