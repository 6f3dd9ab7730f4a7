#!/usr/bin/env python3
"""Does cleaning the predicted masks raise the val Dice? (docs/results.md, "Ensembles")

Two steps around `tgc predict --list`:

    python3 scripts/postprocess_probe.py list --out /tmp/val.csv
    ./target/release/tgc predict --checkpoint CK --list /tmp/val.csv \
        --out /tmp/valmasks --label-size-output
    python3 scripts/postprocess_probe.py score /tmp/valmasks

`list` writes the val split as a `--list` file (absolute image paths, the caption, the
image's own file name as the mask name). `score` reads the label-size masks, scales the
ground truth to their size with nearest neighbour, and prints the mean per-image Dice
(LViT's metric; an empty prediction of an empty mask scores 1) as predicted, with
connected components under N pixels removed (the largest always kept), and with holes
filled. Needs numpy, scipy and pillow (PyPI); the library never runs it.
"""
import argparse
import csv
import os

import numpy as np
from PIL import Image
from scipy import ndimage

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "qata-cov19")


def val_rows(data):
    folder = os.path.join(data, "Val_Folder")
    with open(os.path.join(folder, "Val_text.csv"), newline="") as f:
        for r in csv.DictReader(f):
            mask = r["Image"]
            yield folder, mask, mask[len("mask_"):], r["Description"]


def write_list(data, out):
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "out"])
        n = 0
        for folder, _, name, text in val_rows(data):
            w.writerow([os.path.abspath(os.path.join(folder, "img", name)), text, name])
            n += 1
    print(f"{n} rows -> {out}")


def dice(p, g):
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else 2.0 * (p & g).sum() / s


def drop_small(p, min_size):
    lab, n = ndimage.label(p)
    if n == 0:
        return p
    sizes = ndimage.sum(p, lab, range(1, n + 1))
    keep = 1 + np.nonzero(sizes >= min_size)[0]
    if keep.size == 0:
        keep = [1 + int(np.argmax(sizes))]
    return np.isin(lab, keep)


def score(data, masks):
    pairs = []
    for folder, mask, name, _ in val_rows(data):
        p = np.array(Image.open(os.path.join(masks, name)).convert("L")) > 127
        g = Image.open(os.path.join(folder, "labelcol", mask)).convert("L")
        g = np.array(g.resize(p.shape[::-1], Image.NEAREST)) > 127
        pairs.append((p, g))
    print(f"{len(pairs)} images")
    print(f"as predicted        {100 * np.mean([dice(p, g) for p, g in pairs]):.2f}")
    for n in [10, 25, 50, 100, 200]:
        d = np.mean([dice(drop_small(p, n), g) for p, g in pairs])
        print(f"components >= {n:<4}  {100 * d:.2f}")
    d = np.mean([dice(ndimage.binary_fill_holes(p), g) for p, g in pairs])
    print(f"holes filled        {100 * d:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="QaTa-COV19 root (LViT layout)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list").add_argument("--out", required=True)
    sub.add_parser("score").add_argument("masks")
    a = ap.parse_args()
    if a.cmd == "list":
        write_list(a.data, a.out)
    else:
        score(a.data, a.masks)


if __name__ == "__main__":
    main()
