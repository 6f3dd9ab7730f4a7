//! TgcNet: composition of the frozen CLIP towers and the trainable TGC-Net modules.

mod error;
pub mod text;

pub use error::{Error, Result};
