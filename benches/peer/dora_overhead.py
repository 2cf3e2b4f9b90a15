#!/usr/bin/env python3
"""PyTorch + PEFT peer of benches/dora_overhead.rs: DoRA's step-time overhead over LoRA.

    python3 benches/peer/dora_overhead.py [--threads 2] [--rounds 7] [--iters 5] [--json OUT.json]

For each shape (the ones of benches/dora_overhead.rs: `tokens x d -> d, r`) one `nn.Linear(d, d)`
gets a LoRA adapter through `get_peft_model` (`init_lora_weights=False`, no dropout), once plain and
once with `use_dora=True`; a training step is forward + backward of `sum(layer(x))` with `x`
requiring a gradient (as inside a network). LoRA and DoRA alternate in rounds of `--iters` steps
(after two warm-up steps each); prints, and writes as JSON, the median step time of each and the
median of the per-round DoRA / LoRA ratios. CPU, float32.
"""

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

SHAPES = [
    ("minilm_16x64_384_r8", 16 * 64, 384, 8),
    ("llama1b_4x128_2048_r16", 4 * 128, 2048, 16),
]


class Wrap(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


def step_time(model, x, iters):
    """Mean seconds of `iters` training steps."""
    start = time.perf_counter()
    for _ in range(iters):
        xi = x.detach().requires_grad_(True)
        model(xi).sum().backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {}
    for name, rows, d, r in SHAPES:
        x = torch.randn(rows, d)
        models = {}
        for variant, use_dora in [("lora", False), ("dora", True)]:
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False,
                             use_dora=use_dora)
            models[variant] = get_peft_model(Wrap(d), cfg)
            models[variant].train()
            step_time(models[variant], x, 2)  # warm-up
        # LoRA and DoRA alternate in rounds; the ratio is the median of the per-round ratios.
        lora, dora, ratios = [], [], []
        for _ in range(args.rounds):
            lora.append(step_time(models["lora"], x, args.iters))
            dora.append(step_time(models["dora"], x, args.iters))
            ratios.append(dora[-1] / lora[-1])
        times = {"lora": statistics.median(lora), "dora": statistics.median(dora),
                 "ratio": statistics.median(ratios)}
        out[name] = times
        print(f"peer {name}: lora {times['lora'] * 1e3:.2f} ms, dora {times['dora'] * 1e3:.2f} ms, "
              f"dora/lora {times['ratio']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "shapes": out}, f, indent=2)


if __name__ == "__main__":
    main()
