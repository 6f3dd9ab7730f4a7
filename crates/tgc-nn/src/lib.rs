//! Gradient-correct building blocks shared by the TGC-Net crates.
