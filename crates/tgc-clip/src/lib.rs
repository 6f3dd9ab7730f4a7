//! Frozen CLIP vision and text towers for TGC-Net: dense patch tokens, per-token text states, tokenizer, weight loading
