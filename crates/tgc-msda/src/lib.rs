//! Multi-scale deformable attention (Deformable DETR) for Candle.
//!
//! - [`ms_deform_attn`]: the sampling core, with a fused multi-threaded CPU kernel
//!   (forward and backward), a CUDA kernel (feature `cuda`) and a composite
//!   implementation from plain candle ops (test oracle and fallback on other devices).
//! - [`MsDeformAttn`], [`MsDeformEncoderLayer`], [`MsDeformEncoder`]: the layers of the
//!   Deformable DETR pixel encoder, configured by [`MsDeformAttnConfig`].
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use tgc_msda::{MsDeformAttnConfig, MsDeformEncoder};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cfg = MsDeformAttnConfig { d_model: 32, n_heads: 4, n_layers: 1, ffn_dim: 64, ..Default::default() };
//! let varmap = VarMap::new();
//! let enc = MsDeformEncoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
//! // One feature map per level: B x d_model x H_l x W_l.
//! let srcs = [(8, 8), (4, 4), (2, 2)]
//!     .iter()
//!     .map(|&(h, w)| Tensor::randn(0f32, 1.0, (2, 32, h, w), &dev))
//!     .collect::<candle_core::Result<Vec<_>>>()?;
//! let out = enc.forward(&srcs, false)?;
//! assert_eq!(out[1].dims(), &[2, 32, 4, 4]);
//! # Ok(())
//! # }
//! ```

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod layer;
mod op;

pub use layer::{
    position_embedding_sine, reference_points, MsDeformAttn, MsDeformAttnConfig, MsDeformEncoder,
    MsDeformEncoderLayer,
};
pub use op::{has_fused_kernel, ms_deform_attn, ms_deform_attn_backward, Geometry, MsdaImpl};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or argument has the wrong shape.
    #[error("ms_deform_attn: bad shape: {0}")]
    Shape(String),
    /// A tensor has an unsupported dtype.
    #[error("ms_deform_attn: bad dtype: {0}")]
    DType(String),
    /// The requested implementation is not available on this device.
    #[error("ms_deform_attn: unsupported: {0}")]
    Unsupported(String),
    /// A bad configuration value.
    #[error("ms_deform_attn config: {0}")]
    Config(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
