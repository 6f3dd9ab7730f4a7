//! Frozen CLIP vision and text towers for TGC-Net.
//!
//! TGC-Net (Lin et al., arXiv 2512.21135) starts from frozen CLIP features. This
//! crate provides them in the form the rest of the model consumes:
//!
//! * vision: final-layer (and any intermediate) **patch tokens** B x N x D_v
//!   without CLS, the **dense joint-space features** `proj(post_LN(token))`
//!   B x N x E for every patch, the pooled image embedding B x E, for any image
//!   size that is a multiple of the patch size (position embeddings resampled
//!   bicubically exactly as transformers' `interpolate_pos_encoding=True`);
//! * text: **per-token states** B x 77 x D_t after the final LayerNorm, the
//!   key-padding mask, the EOS-pooled state and the projected text embedding;
//! * [`ClipTokenizer`]: CLIP BPE ids (B x 77 u32) and masks (B x 77 f32);
//! * weight loading from Hugging Face transformers or open_clip safetensors
//!   (a file, a directory or the `hf-hub` cache/download), or deterministic
//!   random weights in the real architecture ([`WeightSource::Random`]);
//! * [`preprocess`], [`similarity_map`] (the zero-shot map of the paper's
//!   Fig. 1a) and [`write_heatmap_png`].
//!
//! [`ClipModel`] holds plain tensors (never `Var`s) and runs the fast fused candle
//! kernels, which have no backward pass: nothing in it is trainable. For fine-tuning
//! (the paper's Table 4 "ViT q,v / full fine-tune" rows) build a
//! [`VisionTransformer`] with [`TowerMode::Trainable`] from a `VarBuilder` that hands
//! out `Var`s ([`WeightSource::var_builder`] gives the pretrained tensors to start
//! from): it swaps in tgc-nn's gradient-correct LayerNorm and softmax and reads its
//! weights live, with the same outputs as the frozen tower.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tgc_clip::{ClipConfig, ClipModel, WeightSource};
//!
//! # fn main() -> tgc_clip::Result<()> {
//! let dev = Device::Cpu;
//! let cfg = ClipConfig::tiny(); // 32 px, patch 8; use ClipConfig::default() for the paper
//! let model = ClipModel::load(&cfg, &WeightSource::Random { seed: 0 }, &dev)?;
//!
//! // A 48 x 64 image: not the training size, the position embeddings are resampled.
//! let img = Tensor::zeros((1, 3, 48, 64), candle_core::DType::F32, &dev)?;
//! let v = model.encode_image_dense(&img)?;
//! assert_eq!(v.grid, (6, 8));
//! assert_eq!(v.patch_tokens.dims(), &[1, 48, 32]);
//! assert_eq!(v.dense_embeds.dims(), &[1, 48, 16]);
//!
//! // Text: normally from ClipTokenizer::from_file("weights/clip-tokenizer.json").
//! let ids = Tensor::new(&[[49406u32, 320, 1125, 539, 320, 2368, 49407, 0]], &dev)?;
//! let mask = Tensor::new(&[[1f32, 1., 1., 1., 1., 1., 1., 0.]], &dev)?;
//! let t = model.encode_text(&ids, Some(&mask))?;
//! assert_eq!(t.token_states.dims(), &[1, 8, 16]);
//! assert_eq!(t.text_embeds.dims(), &[1, 16]);
//!
//! let map = tgc_clip::similarity_map(&model, &img, &ids, Some(&mask))?; // 6 x 8 cosines
//! assert_eq!(map.dims(), &[6, 8]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::path::PathBuf;

pub mod encoder;
pub mod interp;
pub mod model;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod viz;
pub mod weights;

pub use encoder::{Activation, TowerMode};
pub use model::{ClipConfig, ClipModel};
pub use text::{TextConfig, TextOutput, TextTransformer};
pub use tokenizer::{ClipTokenizer, Padding, BOS_ID, CONTEXT_LENGTH, EOS_ID};
pub use vision::{VisionConfig, VisionOutput, VisionTransformer};
pub use viz::{normalize, preprocess, similarity_map, write_heatmap_png, CLIP_MEAN, CLIP_STD};
pub use weights::{Naming, WeightSource, WeightStore, DEFAULT_HUB_FILE, DEFAULT_HUB_REPO};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A tensor the configuration needs is not in the checkpoint.
    #[error("tensor `{name}` (model name `{hf_name}`) is missing from {files}")]
    MissingTensor {
        /// Name as it would appear in the file.
        name: String,
        /// Hugging Face name the model asked for.
        hf_name: String,
        /// The file(s) searched.
        files: String,
    },
    /// A tensor has a shape other than the configuration implies.
    #[error("tensor `{name}` (model name `{hf_name}`) in {} has shape {got:?}, expected {expected:?} (wrong config for this checkpoint?)", file.display())]
    ShapeMismatch {
        /// Name in the file.
        name: String,
        /// Hugging Face name the model asked for.
        hf_name: String,
        /// The file holding it.
        file: PathBuf,
        /// Shape implied by the configuration.
        expected: Vec<usize>,
        /// Shape found.
        got: Vec<usize>,
    },
    /// Neither Hugging Face nor open_clip names were recognised.
    #[error("{files}: not a CLIP checkpoint (neither `vision_model.embeddings.patch_embedding.weight` nor `visual.conv1.weight` found)")]
    UnknownNaming {
        /// The file(s) opened.
        files: String,
    },
    /// A directory source holds no safetensors file.
    #[error("no .safetensors file in directory {}", .0.display())]
    NoWeights(PathBuf),
    /// A safetensors file could not be opened or parsed.
    #[error("cannot read safetensors file {}: {msg}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// File system error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `hf-hub` could not provide the file (offline with a cold cache, unknown repo...).
    #[error("hf-hub: {0}")]
    Hub(String),
    /// The tokenizer file is invalid or encoding failed.
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// Image encoding/decoding failed.
    #[error("image {}: {source}", path.display())]
    Image {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: image::ImageError,
    },
    /// Bad input shapes or values.
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
