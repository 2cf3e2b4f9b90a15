#!/usr/bin/env bash
# Build what benches/gpu/lora_llama_gpu.py needs on a GPU machine that has PyTorch, transformers
# and PEFT but no Rust and no network: a release `burn-peft` with the Vulkan backend, stripped,
# next to the script, in one folder under 64 MiB.
#
#   benches/gpu/pack.sh [OUT_DIR]        (default: target/gpu-bench)
#
# FEATURES (default `vulkan`) picks the cargo features of peft-cli: `wgpu` for a binary that
# also runs on lavapipe (the SPIR-V build refuses software adapters), or e.g.
# `vulkan,burn/fusion,burn/autotune` to measure Burn's fusion and autotune.
#
# Then, on the GPU machine: `python3 OUT_DIR/lora_llama_gpu.py --burn-peft OUT_DIR/burn-peft`.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-target/gpu-bench}"
features="${FEATURES:-vulkan}"
# The usual target folder: cargo keeps each feature set's artifacts apart there.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/burn-peft-target}"
cargo build --release -p peft-cli --features "$features"
mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/burn-peft" "$out/burn-peft"
strip "$out/burn-peft"
cp benches/gpu/lora_llama_gpu.py benches/gpu/README.md "$out/"
bytes=$(du -sb "$out" | cut -f1)
echo "$out: $((bytes / 1024 / 1024)) MiB"
ls -l "$out"
if [ "$bytes" -ge $((64 * 1024 * 1024)) ]; then
    echo "over the 64 MiB a GPU machine accepts" >&2
    exit 1
fi
