//! DATE: Domain-Augmented Text Encoder fusion of TGC-Net
