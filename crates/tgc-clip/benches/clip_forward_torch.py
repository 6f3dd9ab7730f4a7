#!/usr/bin/env python3
"""PyTorch side-by-side for benches/clip_forward.rs: ViT-B/16 vision forward at 224 px,
batch 1, random weights, the same outputs as tgc-clip's encode_image_dense (all tokens,
post-LN + visual projection on every token), 2 threads, f32, eager attention.

Run from the repository root:  python3 crates/tgc-clip/benches/clip_forward_torch.py [ITERS] [eager|sdpa]
"""
import sys
import time

import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPVisionModelWithProjection

torch.set_num_threads(2)
torch.manual_seed(0)
cfg = CLIPVisionConfig(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu",
)
ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
IMPLS = sys.argv[2:] or ["eager", "sdpa"]
for impl in IMPLS:
    cfg._attn_implementation = impl
    model = CLIPVisionModelWithProjection(cfg).eval()
    x = torch.randn(1, 3, 224, 224)

    def fwd():
        out = model.vision_model(pixel_values=x)
        dense = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state))
        return dense

    with torch.inference_mode():
        for _ in range(3):
            fwd()
        times = []
        for _ in range(ITERS):
            t = time.perf_counter()
            fwd()
            times.append(time.perf_counter() - t)
    times.sort()
    print(f"torch {torch.__version__} attn={impl}: median {1e3 * times[len(times) // 2]:.1f} ms, "
          f"min {1e3 * times[0]:.1f} ms over {len(times)} runs (2 threads)")
