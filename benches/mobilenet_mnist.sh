#!/usr/bin/env bash
# The image demo's comparison: torchvision's ImageNet MobileNetV2 -> 4,000 MNIST digits (the fixed
# split of scripts/fetch-vision.sh), LoRA on the convolutions vs the head alone vs full
# fine-tuning, burn-peft (examples/{lora,head,full}-mobilenet-mnist.yaml) and PyTorch + PEFT
# (benches/peer/mobilenet_mnist.py, same split and settings) in the same invocation, one after
# the other on the same threads. Writes benches/results/mobilenet_mnist.{md,json}.
#
#   benches/mobilenet_mnist.sh [PYTHON]     # PYTHON: with torch, torchvision, peft (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/burn-peft-target}"
scripts/fetch-vision.sh > /dev/null
cargo build --release -q -p peft-cli
bin="$CARGO_TARGET_DIR/release/burn-peft"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for method in lora head full; do
  echo "== burn-peft: $method" >&2
  "$bin" train "examples/$method-mobilenet-mnist.yaml" --output "$work/ours-$method" --quiet >&2
  lr=$([[ $method == full ]] && echo 5e-4 || echo 2e-3)
  echo "== PyTorch + PEFT: $method" >&2
  "$python" benches/peer/mobilenet_mnist.py --method "$method" --lr "$lr" --threads 2 \
    --out "$work/peer-$method.json" > /dev/null
done
"$python" - "$work" <<'PY'
import json, sys, platform, os
work = sys.argv[1]
rows = []
for method in ["lora", "head", "full"]:
    ours = json.load(open(f"{work}/ours-{method}/results.json"))
    peer = json.load(open(f"{work}/peer-{method}.json"))
    rows.append({
        "method": method,
        "trainable_params": ours["trainable_params"],
        "ours": {"test_accuracy": ours["test"]["accuracy"], "best_eval_accuracy": ours["best"]["value"],
                 "step_seconds": ours["step_seconds"], "steps": ours["steps"]},
        "peer": {"test_accuracy": peer["test_accuracy"], "best_eval_accuracy": peer["best_eval_accuracy"],
                 "step_seconds": peer["step_seconds"], "steps": peer["steps"],
                 "trainable_params": peer["trainable_params"]},
    })
names = {"lora": "LoRA r 8 on every ungrouped conv + new head", "head": "new head alone (linear probe)",
         "full": "full fine-tuning"}
lines = [
    "# MobileNetV2 (ImageNet) -> MNIST 5k: LoRA vs head alone vs full fine-tuning",
    "",
    "torchvision's ImageNet MobileNetV2 (real weights) learns 4,000 real MNIST digits (64x64, gray",
    "repeated to RGB), 2 epochs, batch 32, AdamW, linear schedule, best epoch by eval accuracy, then",
    "the 500 held-out test digits. burn-peft (`examples/*-mobilenet-mnist.yaml`, flex CPU backend)",
    "and PyTorch + PEFT (`benches/peer/mobilenet_mnist.py`) ran one after the other in the same",
    f"invocation of `benches/mobilenet_mnist.sh` on the same 2 threads ({platform.machine()}).",
    "",
    "| method | trainable params | test acc. ours | test acc. PyTorch | train time ours | train time PyTorch | speed ratio (PyTorch / ours time) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for r in rows:
    o, p = r["ours"], r["peer"]
    lines.append(
        f"| {names[r['method']]} | {r['trainable_params']:,} | {o['test_accuracy']:.3f} | {p['test_accuracy']:.3f} "
        f"| {o['step_seconds']:.0f} s | {p['step_seconds']:.0f} s | {p['step_seconds'] / o['step_seconds']:.2f}x |"
    )
lines += ["", "Trainable parameters count the new head's 12,810 in every row (PyTorch counts the same:",
          ", ".join(f"{r['method']} {r['peer']['trainable_params']:,}" for r in rows) + ").",
          "Train time is the optimizer steps alone (250 of them), without loading or evaluation."]
os.makedirs("benches/results", exist_ok=True)
open("benches/results/mobilenet_mnist.md", "w").write("\n".join(lines) + "\n")
json.dump(rows, open("benches/results/mobilenet_mnist.json", "w"), indent=2)
print("\n".join(lines))
PY
