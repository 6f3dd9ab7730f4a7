//! Multi-scale deformable attention (Deformable DETR) for Candle: fused CPU kernel, CUDA kernel, composite oracle, encoder layers
