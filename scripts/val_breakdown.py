"""Where a QaTa-COV19 checkpoint loses val Dice: per-image scores grouped by the caption's
number of infected areas and by the lesion's share of the image.

First write the per-image scores, then run this on them (repo root; needs numpy, pillow):

    ./target/release/tgc eval --checkpoint runs/RUN/best.safetensors \\
        --data ../shared/data/qata-cov19 --split val --csv scores.csv
    python3 scripts/val_breakdown.py scores.csv [DATA=../shared/data/qata-cov19]

"lost" is a group's share of the points missing from 100 in the mean Dice (the groups'
"lost" values add up to 100 minus the mean Dice).

`tgc eval --by-size` prints the lesion-size part itself (shares measured on the masks at
the model's label size rather than at the files' own size); this script adds the
grouping by caption.
"""
import csv
import os
import sys
from collections import defaultdict

import numpy as np
from PIL import Image

if len(sys.argv) < 2:
    sys.exit(__doc__)
scores_csv = sys.argv[1]
root = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/qata-cov19"
val = os.path.join(root, "Val_Folder")
with open(os.path.join(val, "Val_text.csv"), newline="") as f:
    captions = {r["Image"]: r["Description"] for r in csv.DictReader(f)}
with open(scores_csv, newline="") as f:
    rows = list(csv.DictReader(f))
if not rows:
    sys.exit(f"{scores_csv}: no scores")

by_count = defaultdict(list)
area_dice = []
for r in rows:
    name = os.path.basename(r["id"])
    mask_name = name if name in captions else "mask_" + name
    if mask_name not in captions:
        sys.exit(f"{scores_csv}: {name} is not a val image of {val}")
    areas = captions[mask_name].split(",")[1].strip()
    d = float(r["dice"])
    by_count[areas].append(d)
    m = Image.open(os.path.join(val, "labelcol", mask_name)).convert("L")
    frac = (np.asarray(m.resize((224, 224), Image.NEAREST)) > 127).mean()
    area_dice.append((frac, d))

n = len(rows)
print(f"{n} images, mean Dice {100 * np.mean([d for _, d in area_dice]):.2f}")
print("caption                    images  Dice   lost")
for k, v in sorted(by_count.items(), key=lambda kv: -len(kv[1])):
    print(f"{k:26s} {len(v):6d} {100 * np.mean(v):6.2f} {100 * sum(1 - x for x in v) / n:6.2f}")
a = np.array(area_dice)
print("lesion share of the image  images  Dice   lost")
for lo, hi in [(0, 0.02), (0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 1.01)]:
    s = (a[:, 0] >= lo) & (a[:, 0] < hi)
    if s.any():
        print(f"{lo:.2f}-{min(hi, 1):.2f}{'':16s} {s.sum():6d} {100 * a[s, 1].mean():6.2f} {100 * (1 - a[s, 1]).sum() / n:6.2f}")
