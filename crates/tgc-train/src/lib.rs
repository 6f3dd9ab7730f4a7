//! Training and evaluation loops, losses, optimiser and schedules for TGC-Net
