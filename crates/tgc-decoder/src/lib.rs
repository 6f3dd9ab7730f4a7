//! CAT-Seg cost aggregation decoder for TGC-Net
