#!/usr/bin/env python3
"""PyTorch + PEFT peer of benches/combine.rs: the time of `add_weighted_adapter`.

    HF_HUB_OFFLINE=1 python3 benches/peer/combine_peft.py [--threads 2] [--repeats 3] [--json FILE]

Cases (the same as the Rust bench):

* `minilm_r8_qv`: all-MiniLM-L6-v2 from the Hugging Face cache, two random r 8 LoRA adapters on
  query / value, weights 0.7 / 0.3; types linear, cat, svd, ties, ties_svd (density 0.5).
* `llama1b_r16`: a Llama-3.2-1B-shaped model (hidden 2048, intermediate 8192, 32 heads, 8 kv
  heads) with random weights and two random r 16 adapters on all seven projections. PEFT needs
  the base layers, so the model has `--llama-layers` (2) of the 16 layers and the time is scaled
  to 16 (layers are
  combined one module at a time, independently); types linear, cat, svd, ties. PEFT's svd runs
  `torch.linalg.svd(delta, full_matrices=True)` on every full delta.

Prints the median time per case and type (and the ratio to `linear`), and the load average.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()


def timed(model, kind, repeats):
    kw = {"density": 0.5} if kind not in ("linear", "cat", "svd") else {}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type=kind, **kw)
        times.append(time.perf_counter() - start)
        model.delete_adapter("mix")
    return statistics.median(times)


def with_adapters(base, r, targets):
    model = None
    for name in ("a", "b"):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=str)
    parser.add_argument("--llama-layers", type=int, default=2,
                        help="layers of the Llama-1B-shaped model actually built (times are scaled to 16)")
    parser.add_argument("--only", choices=["minilm", "llama"], help="run one case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    results = {}

    if args.only != "llama":
        base = AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        model = with_adapters(base, 8, ["query", "value"])
        for kind in ("linear", "cat", "svd", "ties", "ties_svd"):
            results[f"minilm_r8_qv/{kind}"] = timed(model, kind, args.repeats)
            print(f"minilm_r8_qv/{kind}: {results[f'minilm_r8_qv/{kind}'] * 1e3:.1f} ms", flush=True)
    if args.only == "minilm":
        report(results, args)
        return

    layers, full = args.llama_layers, 16
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=layers, vocab_size=256)
    base = LlamaForCausalLM(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = with_adapters(base, 16, targets)
    for kind in ("linear", "cat", "svd", "ties"):
        # svd on 8192 x 2048 deltas takes long: one run is enough
        repeats = 1 if kind == "svd" else args.repeats
        t = timed(model, kind, repeats) * full / layers
        results[f"llama1b_r16/{kind}"] = t
        print(f"llama1b_r16/{kind}: {t * 1e3:.1f} ms ({layers} layers x {full / layers:g})", flush=True)
    report(results, args)


def report(results, args):
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"\nload average at the end: {load}; torch threads {args.threads}\n")
    print("| benchmark | type | median | vs linear |")
    print("| --- | --- | --- | --- |")
    for key, t in results.items():
        group, kind = key.split("/")
        ratio = t / results[f"{group}/linear"]
        print(f"| {group} | {kind} | {t * 1e3:.2f} ms | {ratio:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": results, "load_average": load, "threads": args.threads,
                       "torch": torch.__version__, "peft": __import__("peft").__version__}, f, indent=2)


if __name__ == "__main__":
    main()
