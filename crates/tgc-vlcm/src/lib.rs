//! VLCM: Vision-Language Calibration Module of TGC-Net and its ablation variants
