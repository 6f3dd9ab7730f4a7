#!/usr/bin/env python3
"""Which side do QaTa-COV19's one-sided captions name, and which side does the model pick?

    python3 scripts/postprocess_probe.py list --out /tmp/val.csv
    ./target/release/tgc predict --checkpoint CK --list /tmp/val.csv \
        --out /tmp/valmasks --label-size-output
    python3 scripts/laterality.py --masks /tmp/valmasks     # val: captions, masks, predictions
    python3 scripts/laterality.py --split train             # captions against masks only

For every "unilateral" caption (it names one lung, "left" or "right") the side of the
image (left or right half) that holds most of the ground-truth mask is compared with the
word, and, given --masks (label-size masks written by `tgc predict --list`), with the
half that holds most of the predicted mask. Prints the counts of each pairing and the
mean Dice of the images whose caption names the other half than their mask, and of the
others. Needs numpy
and pillow (PyPI); the library never runs it.
"""
import argparse
import collections
import csv
import os

import numpy as np
from PIL import Image

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "qata-cov19")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--masks", help="predicted masks (val only), named as the images")
    a = ap.parse_args()
    folder = os.path.join(a.data, {"train": "Train_Folder", "val": "Val_Folder"}[a.split])
    csv_name = {"train": "Train_text.csv", "val": "Val_text.csv"}[a.split]
    pairs = collections.Counter()
    followed = collections.Counter()
    off_dice = []
    on_dice = []
    n_all = 0
    with open(os.path.join(folder, csv_name), newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        caption = r["Description"]
        n_all += 1
        if not caption.startswith("unilateral"):
            continue
        word = "left" if " left lung" in caption else "right"
        g = np.array(Image.open(os.path.join(folder, "labelcol", r["Image"])).convert("L")) > 127
        if a.masks:
            p = np.array(Image.open(os.path.join(a.masks, r["Image"][len("mask_"):])).convert("L")) > 127
            g = np.array(Image.fromarray(g).resize(p.shape[::-1], Image.NEAREST))
        half = g.shape[1] // 2
        g_side = "right" if g[:, half:].sum() > g[:, :half].sum() else "left"
        pairs[(word, g_side)] += 1
        if a.masks:
            p_side = "right" if p[:, half:].sum() > p[:, :half].sum() else "left"
            followed[(word == g_side, p_side == word)] += 1
            s = p.sum() + g.sum()
            (on_dice if word == g_side else off_dice).append(2.0 * (p & g).sum() / s if s else 1.0)
    total = sum(pairs.values())
    print(f"{a.split}: {n_all} images, {total} with a unilateral caption")
    for (word, side), n in sorted(pairs.items()):
        print(f"  caption '{word} lung', mask mostly in the image's {side} half: {n}")
    if a.masks:
        for (agree, follows), n in sorted(followed.items()):
            what = "caption and mask agree" if agree else "caption names the other half"
            pred = "the caption's half" if follows else "the other half"
            print(f"  {what}, prediction in {pred}: {n}")
        print(f"  mean Dice where caption and mask agree: {100 * np.mean(on_dice):.2f}")
        if off_dice:
            print(f"  mean Dice where the caption names the other half: {100 * np.mean(off_dice):.2f}"
                  f" ({len(off_dice)} images, {100 * len(off_dice) / n_all:.2f}% of the split)")


if __name__ == "__main__":
    main()
