//! # tgc-sse: the Semantic-Structural Synergy Encoder of TGC-Net
//!
//! SSE turns an image and CLIP's frozen patch tokens into the pixel pyramid
//! `F_V = {F_V^1/8, F_V^1/16, F_V^1/32}` that the rest of TGC-Net consumes:
//!
//! ```text
//!  image B x 3 x S_n x S_n ──► CnnBranch ──► F_cnn^1/8 ──► Conv1x1+GN ───────────┐
//!                                        ├─► F_cnn^1/16 ─► Conv1x1+GN ───────────┤
//!                                        └─► F_cnn^1/32 ─► P_C (Conv1x1) ─┐      ├─► MSDeformAttn ─► F_V
//!  CLIP tokens B x N_v x D_v ──────────────────────────► P_V (Linear) ──(+)─► LN ┘     encoder
//! ```
//!
//! `F_fused = LN(P_V(F_clip) + P_C(F_cnn^1/32))`: the CLIP grid must equal the CNN 1/32
//! grid, so `S_n = 32 * S_c / patch` (768 px for ViT-L/14 at 336 px; 448 px for a patch-16
//! CLIP at 224 px). The crate takes tensors only: running CLIP is the caller's job.
//!
//! - [`SseConfig`]: widths and the ablation [`SseMode`] (`Full`, `ClipOnly`, `CnnOnly`);
//!   `Default` is the paper preset, [`SseConfig::cpu`] the 2-core CPU preset.
//! - [`Sse`]: built from a [`candle_nn::VarBuilder`]; [`Sse::forward`] returns an
//!   [`SseOutput`]; [`Sse::fuse`] and [`Sse::cnn_features`] expose the intermediate steps.
//! - [`CnnBranch`]: the lightweight CNN (patchify stride-4 stem, three patch-merging
//!   stride-2 stages, GroupNorm, ReLU, residual blocks), built from [`MatmulConv`]s.
//!
//! Parameter budget (paper preset, printed by `tests/sse.rs::parameter_count_paper_and_cpu`):
//! CNN branch + `P_C` + input projections 0.67M, `P_V` (1024 -> 256) 0.26M, the 6-layer
//! MSDeformAttn encoder 4.39M: 5.33M of TGC-Net's 10.3M trainable parameters.
//!
//! Speed (CPU preset, batch 8 at 448 px, 2 shared cores, process CPU seconds from
//! `cargo run --release -p tgc-sse --example profile_sse`): CNN forward 0.44 s, forward +
//! backward 2.75 s; whole SSE forward 3.2 s, forward + backward 18 s, dominated by the
//! MSDeformAttn encoder over the 56 x 56 level. A 3x3 convolution as [`MatmulConv`] took
//! half the CPU time of candle's `conv2d` for forward + backward (0.14 s against 0.28 s,
//! 32 -> 32 channels at 56 x 56, same run).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use tgc_sse::{Sse, SseConfig, SseMode};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // A small configuration: D = 32, CLIP width 48, a 64 px image (2 x 2 CLIP grid).
//! let mut cfg = SseConfig::cpu().with_mode(SseMode::ClipOnly);
//! cfg.d_model = 32;
//! cfg.clip_dim = 48;
//! let varmap = VarMap::new();
//! let sse = Sse::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
//! let image = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev)?;
//! let clip = Tensor::randn(0f32, 1.0, (2, 4, 48), &dev)?; // B x N_v x D_v, N_v = 2 * 2
//! let out = sse.forward(&image, Some(&clip), false)?;
//! assert_eq!(out.f8.dims(), &[2, 32, 8, 8]);
//! assert_eq!(out.f16.dims(), &[2, 32, 4, 4]);
//! assert_eq!(out.f32.dims(), &[2, 32, 2, 2]);
//! // Missing CLIP tokens are a clear error, not a panic.
//! assert!(sse.forward(&image, None, false).is_err());
//! # Ok(())
//! # }
//! ```

mod cnn;
mod config;
mod sse;

pub use cnn::{BasicBlock, CnnBranch, ConvNorm, MatmulConv};
pub use config::{SseConfig, SseMode};
pub use sse::{Sse, SseOutput};

/// The MSDeformAttn encoder configuration (re-exported from `tgc-msda`).
pub use tgc_msda::MsDeformAttnConfig;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An inconsistent configuration.
    #[error("sse config: {0}")]
    Config(String),
    /// An input tensor has the wrong shape.
    #[error("sse input: {0}")]
    Input(String),
    /// The mode fuses CLIP features but no CLIP tokens were given.
    #[error(
        "sse: mode {0:?} needs clip_tokens (B x N_v x D_v, CLIP final-layer patch tokens \
         without CLS) but None was given"
    )]
    MissingClipTokens(SseMode),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from the MSDeformAttn encoder.
    #[error(transparent)]
    Msda(#[from] tgc_msda::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
