"""Upper bound on val Dice from the logit resolution alone.

Downsamples each QaTa-COV19 val mask (224 px) to g x g by area averaging, upsamples it
back bilinearly (align_corners=False, as tgc_nn::resize_bilinear) and thresholds at 0.5:
the mean LViT Dice of that reconstruction is the best a model whose logits live on a
g x g grid can score. Usage (repo root; needs torch, pillow, numpy):

    python3 crates/tgc-decoder/benches/logit_resolution_bound.py [N_IMAGES=400]

Measured 2026-12-02 on the first 400 val masks: 14 -> 0.8097, 16 -> 0.8512, 20 -> 0.9005,
28 -> 0.9461, 40 -> 0.9707, 56 -> 0.9831, 224 -> 1.0. With all 1429 (argument 1429),
2026-12-03, also per lesion size: 40 -> 0.9721 (lesions under 2% of the image 0.9404,
2-5% 0.9653, over 5% 0.9828), 56 -> 0.9838 (0.9677, 0.9801, 0.9894).
"""
import glob
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
files = sorted(glob.glob("../shared/data/qata-cov19/Val_Folder/labelcol/*"))[:n]
if not files:
    sys.exit("no masks under ../shared/data/qata-cov19/Val_Folder/labelcol (run from the repo root)")
masks = [np.array(Image.open(f).convert("L").resize((224, 224), Image.NEAREST)) > 127 for f in files]
share = np.array([m.mean() for m in masks])
buckets = [(0, 0.02), (0.02, 0.05), (0.05, 1.01)]
for g in [14, 16, 20, 28, 40, 56, 224]:
    scores = []
    for m in masks:
        t = torch.tensor(m, dtype=torch.float32)[None, None]
        low = F.adaptive_avg_pool2d(t, g)
        up = F.interpolate(low, size=(224, 224), mode="bilinear", align_corners=False)[0, 0] > 0.5
        p = up.numpy()
        inter, total = (p & m).sum(), p.sum() + m.sum()
        scores.append(1.0 if total == 0 else 2 * inter / total)
    scores = np.array(scores)
    by_size = ", ".join(
        f"lesions {lo:.0%}-{min(hi, 1):.0%} of the image: {scores[(share >= lo) & (share < hi)].mean():.4f}"
        for lo, hi in buckets
        if ((share >= lo) & (share < hi)).any()
    )
    print(f"{g}x{g} logits: mean Dice upper bound {scores.mean():.4f} over {len(files)} masks ({by_size})")
