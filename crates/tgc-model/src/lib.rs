//! TgcNet: composition of the frozen CLIP towers and the trainable TGC-Net modules
