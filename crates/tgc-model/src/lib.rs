//! # tgc-model: TGC-Net, composed
//!
//! [`TgcNet`] puts the frozen CLIP towers ([`FrozenTowers`]) and the four trainable
//! modules of the paper together:
//!
//! ```text
//! image ─ CLIP vision (frozen) ─ patch tokens ─┐
//! image ─ CNN ───────────────────────────────── SSE ─ F_V^{1/8,1/16,1/32}
//! report ─ CLIP text (frozen) ─ F_p ─┐                         │
//! domain ─ CLIP text (frozen) ─ F_a ─ DATE ─ F_T ─ VLCM(F_V^1/32, F_T) ─ F'_V, F'_T
//!                                         CAT-Seg decoder(F'_V, F'_T, F_V^1/16, F_V^1/8)
//!                                         ─ logits B x K x S x S
//! ```
//!
//! [`TgcConfig`] holds every choice, with the presets `paper` (ViT-L/14 at 336, CNN at
//! 768, about 10.3M trainable parameters), `cpu` (TinyCLIP geometry, trains on two
//! cores) and `tiny` (tests). Each ablation row of the paper is one config change:
//! `sse.mode` (`full`, `clip_only` = no SSE / ViT-only, `cnn_only`), `text_mode`
//! (`fused`, `main_only` = no DATE, `aux_only`, `concatenated`), `vlcm.variant`
//! (`gated`, `bi_cross_attn`, `single_cross_attn`, `identity` = no VLCM), and
//! `image_only` (the prompt replaced by the empty string), and `clip_finetune`
//! ([`ClipFinetune`]: `frozen`, `query_value`, `full`). The text tower is CLIP's
//! or a BERT-family encoder ([`TextTower::Bert`], e.g. all-MiniLM-L6-v2).
//!
//! The paper's Table 4 encoder rows:
//!
//! | row | `sse.mode` | `clip_finetune` |
//! |---|---|---|
//! | CNN-only | `cnn_only` | `frozen` (CLIP's image features unused) |
//! | ViT-only frozen (= "no SSE") | `clip_only` | `frozen` |
//! | ViT q,v fine-tune | `clip_only` | `query_value` |
//! | ViT full fine-tune | `clip_only` | `full` |
//! | CNN+ViT full fine-tune | `full` | `full` |
//! | CNN+ViT, CLIP frozen (the paper's model) | `full` | `frozen` |
//!
//! When `clip_finetune` is not `frozen`, [`TgcNet`] holds a trainable copy of CLIP's
//! vision tower (gradient-correct kernels, initialised from the loaded weights; see
//! [`finetune`]) whose trained parameters are `Var`s named `clip_vision.*` in the same
//! `VarMap`, counted as trainable by [`TgcNet::param_counts`] and saved with the other
//! weights. Image features then come from that tower on every forward
//! ([`TgcNet::forward`], [`TgcNet::forward_images`]); [`TgcNet::forward_features`]
//! refuses precomputed ones, since they would bypass the tower being trained.
//!
//! [`select_device`] turns a name (`auto`, `cpu`, `cuda:N`, `metal:N`) into a device,
//! with an error that says which feature to build with when one is missing.
//!
//! No pretrained CLIP is reachable on the development machines, so tests and the CPU
//! demos use CLIP in its real architecture with deterministic random weights
//! (`WeightSource::Random`); real weights load from the hub or a safetensors file.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tgc_model::{TgcConfig, TgcNet, WeightSource};
//!
//! let cfg = TgcConfig::tiny();
//! let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu)?;
//! let clip = Tensor::zeros((3, cfg.clip_size, cfg.clip_size), candle_core::DType::F32, &Device::Cpu)?;
//! let cnn = Tensor::zeros((3, cfg.cnn_size, cfg.cnn_size), candle_core::DType::F32, &Device::Cpu)?;
//! let probs = model.predict(&clip, &cnn, &["left lower lung opacity"], None)?;
//! assert_eq!(probs.dims(), &[1, cfg.label_size, cfg.label_size]);
//! println!("{:?}", model.param_counts());
//! # Ok::<(), tgc_model::Error>(())
//! ```

mod config;
mod device;
mod error;
pub mod finetune;
mod model;
pub mod text;
mod towers;

pub use config::{unknown_fields, ClipFinetune, TextMode, TextTower, TgcConfig};
pub use device::select_device;
pub use error::{Error, Result};
pub use model::{
    clip_cost_map, clip_param_count, ParamCounts, TgcInput, TgcNet, CONFIG_METADATA_KEY,
};
pub use tgc_clip::{TowerMode, WeightSource};
pub use tgc_sse::SseMode;
pub use tgc_vlcm::VlcmVariant;
pub use towers::{FrozenTowers, ImageFeatures, PromptFeatures, CLIP_TOKENIZER_JSON};
