//! Datasets, transforms, metrics and the frozen-feature cache for TGC-Net.
//!
//! Independent of the model crates: everything here produces or consumes plain candle
//! tensors and strings.
//!
//! - [`SegDataset`]: the common dataset trait ([`Sample`] = image, mask, caption, aux
//!   caption), implemented by [`LvitDataset`] (QaTa-COV19, MosMedData+ folders),
//!   [`NiftiVolumeDataset`] (MSD, WORD, AbdomenCT-1k; axial slices, one prompt per
//!   organ) and [`SyntheticPhantoms`] (captions decide which lesion is the target).
//! - [`Preprocess`] + [`Augment`] + [`DataLoader`]: batched, parallel, prefetching loading
//!   into [`Batch`] tensors; text-aware flips swap "left"/"right" in the prompts.
//! - [`AuxPromptSource`]: auxiliary prompts for DATE (column, side file, built-in
//!   [`radiology_rewrite`]).
//! - [`SegMetrics`]: LViT-convention per-image Dice/IoU, pixel-pooled Dice/IoU, 3D Dice.
//! - [`FeatureCache`]: f16 safetensors shards of frozen CLIP features.
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::Device;
//! use tgc_data::*;
//!
//! # fn main() -> tgc_data::Result<()> {
//! let ds = SyntheticPhantoms::new(PhantomKind::CtSlice, 8, 42, 64);
//! let pre = Preprocess { clip_size: 32, cnn_size: 64, label_size: 64 };
//! let loader = DataLoader::new(Arc::new(ds), pre, 4, Some(0), Augment::flip_only(), Device::Cpu);
//! let mut metrics = SegMetrics::new();
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     assert_eq!(batch.clip_images.dims(), &[4, 3, 32, 32]);
//!     assert_eq!(batch.cnn_images.dims(), &[4, 3, 64, 64]);
//!     // A perfect prediction scores Dice ~1.
//!     metrics.update(&batch.masks, &batch.masks)?;
//! }
//! assert!(metrics.summary().dice > 0.99);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod cache;
pub mod error;
pub mod loader;
pub mod lvit;
pub mod metrics;
pub mod phantom;
pub mod sample;
pub mod text;
pub mod transform;
pub mod volume;

pub use cache::{CacheKey, FeatureCache, Features, CACHE_FORMAT, CACHE_VERSION};
pub use error::{Error, Result};
pub use loader::{Batch, BatchIter, DataLoader};
pub use lvit::{read_image, read_mask, LvitDataset, LvitOptions, Split};
pub use metrics::{
    dice_3d, LesionSizeBreakdown, LesionSizeGroup, MetricsSummary, SegMetrics, LESION_SHARE_EDGES,
};
pub use phantom::{PhantomDetail, PhantomKind, SyntheticPhantoms};
pub use sample::{ImageF32, Mask, Sample, SegDataset, SplitMix64, Subset};
pub use text::{
    radiology_rewrite, read_captions, swap_left_right, AuxPromptSource, LvitCaption, Zone,
};
pub use transform::{Augment, AugmentParams, Prepared, Preprocess, CLIP_MEAN, CLIP_STD};
pub use volume::{
    header_affine, write_volume_u8, HuWindow, NiftiLayout, NiftiOptions, NiftiVolumeDataset,
    Orientation, Volume, VolumeAssembler, ABDOMENCT1K_LABELS, WORD_LABELS,
};
