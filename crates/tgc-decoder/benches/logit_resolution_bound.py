"""Upper bound on val Dice from the logit resolution alone.

Downsamples each QaTa-COV19 val mask (224 px) to g x g by area averaging, upsamples it
back bilinearly (align_corners=False, as tgc_nn::resize_bilinear) and thresholds at 0.5:
the mean LViT Dice of that reconstruction is the best a model whose logits live on a
g x g grid can score. Usage (repo root; needs torch, pillow, numpy):

    python3 crates/tgc-decoder/benches/logit_resolution_bound.py [N_IMAGES=400]

Measured 2026-12-02 on the first 400 val masks: 14 -> 0.8097, 16 -> 0.8512, 20 -> 0.9005,
28 -> 0.9461, 40 -> 0.9707, 56 -> 0.9831, 224 -> 1.0.
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
for g in [14, 16, 20, 28, 40, 56, 224]:
    scores = []
    for f in files:
        m = np.array(Image.open(f).convert("L").resize((224, 224), Image.NEAREST)) > 127
        t = torch.tensor(m, dtype=torch.float32)[None, None]
        low = F.adaptive_avg_pool2d(t, g)
        up = F.interpolate(low, size=(224, 224), mode="bilinear", align_corners=False)[0, 0] > 0.5
        p = up.numpy()
        inter, total = (p & m).sum(), p.sum() + m.sum()
        scores.append(1.0 if total == 0 else 2 * inter / total)
    print(f"{g}x{g} logits: mean Dice upper bound {np.mean(scores):.4f} over {len(files)} masks")
