"""How much of the QaTa-COV19 val Dice the caption alone gives, without looking at the image.

For each of the training split's captions (63 distinct ones: which of the six lung zones
are infected), the mean of its training masks at 224 x 224 is a per-caption prior; a val
image is predicted as that prior of its own caption (or of the all-caption mean when the
caption never occurs in training), thresholded. Also the same with captions shuffled
across the val images, and the prior of all masks (no caption). The LViT per-image Dice
(mean over images, empty vs empty = 1) is reported for a few thresholds.

Usage (repo root; needs numpy and pillow):

    python3 scripts/caption_prior.py [DATA=../shared/data/qata-cov19]

Measured 2026-12-03 (62 distinct training captions; every val caption occurs in training):
best over thresholds 0.1-0.5, own caption 43.09 (threshold 0.2), shuffled captions 26.94,
no caption 35.76 (threshold 0.3). The trained models score 77-78 with their captions and
53-54 with shuffled ones: the caption says which zones, the image where they are.
"""
import csv
import os
import sys

import numpy as np
from PIL import Image

root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/qata-cov19"


def load(folder, csv_name):
    d = os.path.join(root, folder)
    with open(os.path.join(d, csv_name), newline="") as f:
        rows = list(csv.DictReader(f))
    masks, caps = [], []
    for r in rows:
        m = Image.open(os.path.join(d, "labelcol", r["Image"])).convert("L")
        masks.append(np.asarray(m.resize((224, 224), Image.NEAREST)) > 127)
        caps.append(r["Description"].strip())
    return np.stack(masks), caps


def dice(pred, gt):
    inter = (pred & gt).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + gt.sum(axis=(1, 2))
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1)).mean()


train_m, train_c = load("Train_Folder", "Train_text.csv")
val_m, val_c = load("Val_Folder", "Val_text.csv")
mean_all = train_m.mean(axis=0)
prior = {c: train_m[[i for i, x in enumerate(train_c) if x == c]].mean(axis=0) for c in set(train_c)}
unseen = sum(c not in prior for c in val_c)
print(f"{len(train_c)} train masks, {len(prior)} distinct captions; {len(val_c)} val, {unseen} with an unseen caption")
rng = np.random.default_rng(0)
shuffled = list(val_c)
rng.shuffle(shuffled)
for t in [0.1, 0.2, 0.3, 0.4, 0.5]:
    own = np.stack([prior.get(c, mean_all) for c in val_c]) > t
    shuf = np.stack([prior.get(c, mean_all) for c in shuffled]) > t
    none = np.broadcast_to(mean_all > t, val_m.shape)
    print(
        f"threshold {t}: own caption {100 * dice(own, val_m):.2f}, "
        f"shuffled captions {100 * dice(shuf, val_m):.2f}, no caption {100 * dice(none, val_m):.2f}"
    )
