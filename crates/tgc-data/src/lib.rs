//! Datasets, transforms, metrics and the frozen-feature cache for TGC-Net
