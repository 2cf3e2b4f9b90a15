#!/usr/bin/env python3
"""The PyTorch + Hugging Face PEFT peer of burn-peft's image demo, on the CPU.

    mobilenet_mnist.py --method lora|head|full [--data DIR] [--weights FILE.pth] [--threads 2]
        [--epochs 2] [--batch-size 32] [--lr 2e-3] [--image-size 64] [--seed 42] [--out FILE.json]

torchvision's ImageNet MobileNetV2 (the real weights, mobilenet_v2-b0353104.pth) learns 4,000
real MNIST digits (the fixed split scripts/fetch-vision.sh writes: DIR/{train,eval,test}.csv.gz,
one row per digit: 784 pixels 0-255 then the label), with a new 10-class head, as
examples/lora-mobilenet-mnist.yaml does in burn-peft. A plain PyTorch loop, not the HF Trainer.

Preprocessing (burn-peft does the same): each 28x28 digit is resized to --image-size with
bilinear interpolation (F.interpolate, align_corners=False), repeated to 3 channels, divided by
255 and normalized with ImageNet's mean and std.

Methods:
- lora: PEFT LoRA r 8, alpha 16, no dropout, on every convolution with groups == 1 (the regex
  TARGETS), modules_to_save=["classifier.1"] (the new head trains in full).
- head: the backbone frozen, only the new head trains (a linear probe).
- full: every parameter trains.

Training: torch.optim.AdamW (betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every trainable
parameter), burn-peft's linear schedule with warmup ceil(0.05 * total steps) (lr_at: (step+1)/warmup
during warmup, then 1 - (step-warmup)/(total-warmup)), global-norm clipping at 1.0, batch 32,
2 epochs, model.train() (BatchNorm on batch statistics, updating the running ones; dropout 0.2
before the head). After each epoch the eval split is scored in model.eval(); the best epoch by
accuracy is kept and scores the held-out test split. One torch.Generator seeded with --seed gives
each epoch's permutation; torch.manual_seed(--seed) before the head and the adapter are built.
"""

import argparse
import copy
import gzip
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

REPO = Path(__file__).resolve().parents[2]
TARGETS = r"features\.(0\.0|18\.0|1\.conv\.1|([2-9]|1[0-7])\.conv\.(0\.0|2))"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def fetched():
    out = subprocess.run(
        [str(REPO / "scripts" / "fetch-vision.sh")], check=True, capture_output=True, text=True
    ).stdout.split()
    pth = next(p for p in out if p.endswith(".pth"))
    return Path(pth), Path(pth).parent / "mnist"


def read_split(path, size):
    rows = [line.split(",") for line in gzip.open(path, "rt").read().splitlines() if line]
    pixels = torch.tensor([[float(v) for v in r[:-1]] for r in rows]).view(-1, 1, 28, 28)
    labels = torch.tensor([int(r[-1]) for r in rows])
    x = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1) / 255.0
    return (x - MEAN) / STD, labels


def lr_at(base, step, total, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    return base * (1.0 - min((step - warmup) / span, 1.0))


def accuracy(model, x, y, batch=100):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += (model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum().item()
    return correct / len(y)


def build(method, weights, seed):
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    torch.manual_seed(seed)
    model.classifier[1] = torch.nn.Linear(1280, 10)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=["classifier.1"]
        )
        return get_peft_model(model, config)
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.1.")
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["lora", "head", "full"], required=True)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights, data = fetched()
    weights = args.weights or weights
    data = args.data or data
    started = time.perf_counter()
    train_x, train_y = read_split(data / "train.csv.gz", args.image_size)
    eval_x, eval_y = read_split(data / "eval.csv.gz", args.image_size)
    test_x, test_y = read_split(data / "test.csv.gz", args.image_size)
    model = build(args.method, weights, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = math.ceil(0.05 * total)
    gen = torch.Generator().manual_seed(args.seed)
    step, best, best_state, step_seconds = 0, -1.0, None, 0.0
    history = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_y), generator=gen)
        for i in range(0, len(order), args.batch_size):
            t0 = time.perf_counter()
            model.train()
            idx = order[i : i + args.batch_size]
            for g in optimizer.param_groups:
                g["lr"] = lr_at(args.lr, step, total, warmup)
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            step_seconds += time.perf_counter() - t0
        acc = accuracy(model, eval_x, eval_y)
        history.append({"epoch": epoch + 1, "step": step, "eval_accuracy": acc, "loss": loss.item()})
        print(f"epoch {epoch + 1}: step {step}, last loss {loss.item():.4f}, eval accuracy {acc:.4f}", flush=True)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test = accuracy(model, test_x, test_y)
    result = {
        "method": args.method,
        "trainable_params": trainable,
        "steps": step,
        "step_seconds": step_seconds,
        "steps_per_sec": step / step_seconds,
        "total_seconds": time.perf_counter() - started,
        "best_eval_accuracy": best,
        "test_accuracy": test,
        "history": history,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": args.threads,
    }
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
