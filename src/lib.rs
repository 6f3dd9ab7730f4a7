//! # tgc: text-guided medical image segmentation (TGC-Net) on Candle
//!
//! Facade crate re-exporting the workspace crates, one per module of the paper
//! "TGC-Net: A Structure-Aware and Semantically-Aligned Framework for Text-Guided
//! Medical Image Segmentation". See the workspace README for the layout.

pub use tgc_clip as clip;
pub use tgc_data as data;
pub use tgc_date as date;
pub use tgc_decoder as decoder;
pub use tgc_model as model;
pub use tgc_msda as msda;
pub use tgc_sse as sse;
pub use tgc_train as train;
pub use tgc_vlcm as vlcm;
