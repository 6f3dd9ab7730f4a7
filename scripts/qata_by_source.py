#!/usr/bin/env python3
"""Split QaTa-COV19's Train_Folder by image source, as symlinks (no copies).

QaTa-COV19 pools two sources: `covid_*.png` images and BIMCV `sub-*.png` images. The
LViT val split (Val_Folder) holds only `sub-*` images, while Train_Folder holds 2951
`covid_*` and 2765 `sub-*`; as `tgc eval --count N` takes the first N names in sorted
order, `--split train --count 1429` scores `covid_*` images only. This writes
OUT/qata-sub and OUT/qata-covid, each with a Train_Folder holding one source (img,
labelcol and a filtered Train_text.csv) and Val_Folder linked to the original, so that
`--data OUT/qata-sub --split train` measures the fit on training images of the val
split's own source.

    python3 scripts/qata_by_source.py [--data ../shared/data/qata-cov19] [--out /tmp]
"""
import argparse
import csv
import os
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
here = os.path.dirname(os.path.abspath(__file__))
ap.add_argument("--data", default=os.path.join(here, "../../shared/data/qata-cov19"))
ap.add_argument("--out", default="/tmp")
a = ap.parse_args()
src_root = os.path.abspath(a.data)
train = os.path.join(src_root, "Train_Folder")
if not os.path.isdir(train):
    sys.exit(f"{train}: not found (expected the LViT layout)")
rows = list(csv.reader(open(os.path.join(train, "Train_text.csv"), newline="")))
for source in ("sub", "covid"):
    root = os.path.join(a.out, f"qata-{source}")
    tf = os.path.join(root, "Train_Folder")
    for d in ("img", "labelcol"):
        os.makedirs(os.path.join(tf, d), exist_ok=True)
    val = os.path.join(root, "Val_Folder")
    if not os.path.lexists(val):
        os.symlink(os.path.join(src_root, "Val_Folder"), val)
    n = 0
    with open(os.path.join(tf, "Train_text.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        for row in rows[1:]:
            mask = row[0]
            if not mask.startswith(f"mask_{source}"):
                continue
            image = mask[len("mask_"):]
            for d, name in (("img", image), ("labelcol", mask)):
                target = os.path.join(train, d, name)
                if not os.path.exists(target):
                    sys.exit(f"{target}: listed in Train_text.csv but missing")
                link = os.path.join(tf, d, name)
                if not os.path.lexists(link):
                    os.symlink(target, link)
            w.writerow(row)
            n += 1
    print(f"{root}: {n} training images ({source}*)")
