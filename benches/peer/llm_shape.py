#!/usr/bin/env python3
"""PyTorch + PEFT at SmolLM2-135M's shape, for benches/llm_shape.rs (the peer in the same run).

  python3 benches/peer/llm_shape.py step   --batch 2 --seq 128 --targets qv  --threads 2
  python3 benches/peer/llm_shape.py decode --gguf FILE --batch 1 --new 128 --dtype float32

`step`: LlamaForCausalLM with SmolLM2-135M's config (30 layers, hidden 576, GQA 9/3, vocab
49,152, tied head), transformers' own random initialization, PEFT LoRA r 16 / alpha 32 / no
dropout on q_proj and v_proj (`qv`) or on all seven linears (`all`), AdamW (lr 1e-4, weight
decay 0.01), gradient clipping at 1.0, synthetic tokens; one warm-up step, then `--steps` timed.

`decode`: the real SmolLM2-135M-Instruct weights through transformers' GGUF reader (the file
dequantized, then cast to `--dtype`), `generate(do_sample=False)` with the KV cache, `--batch`
prompts of 24 to 32 tokens (the prompts of benches/llm_shape.rs: `prompt_ids` below), left
padded as transformers pads a batch; one warm-up call, then the timed one. Tokens/s counts new
tokens of every row over the whole call, prompt included, as the Rust side does.

Prints one JSON line: tokens_per_sec, seconds, peak_rss_bytes and what was run.
"""

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=1, eos_token_id=2,
)
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompt_ids(row: int, vocab: int) -> list[int]:
    """Row `row`'s prompt: 32 - (row % 9) tokens, the same formula as benches/llm_shape.rs."""
    length = 32 - row % 9
    return [(row * 7919 + j * 104729 + 11) % (vocab - 2) + 2 for j in range(length)]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cmd_step(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    targets = ["q_proj", "v_proj"] if args.targets == "qv" else ALL_LINEARS
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                             lora_dropout=0.0, target_modules=targets))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    vocab = SMOLLM2["vocab_size"]

    def step(seed: int) -> float:
        ids = torch.tensor([(i * 7919 + seed * 104729) % vocab
                            for i in range(args.batch * args.seq)]).view(args.batch, args.seq)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(0)
    start = time.perf_counter()
    losses = [step(s) for s in range(1, args.steps + 1)]
    seconds = time.perf_counter() - start
    tokens = args.batch * args.seq * args.steps
    return {"tokens_per_sec": tokens / seconds, "step_seconds": seconds / args.steps,
            "losses": losses, "peak_rss_bytes": peak_rss()}


def cmd_decode(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(args.gguf, Path(tmp) / args.gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=args.gguf.name,
                                                     dtype=torch.float32)
    model = model.to(dtype).eval()
    prompts = [prompt_ids(r, model.config.vocab_size) for r in range(args.batch)]
    width = max(map(len, prompts))
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return out[:, width:]

    run(4)
    start = time.perf_counter()
    out = run(args.new)
    seconds = time.perf_counter() - start
    new = out.numel()
    return {"tokens_per_sec": new / seconds, "seconds": seconds, "new_tokens": new,
            "first_ids": out[0, :8].tolist(), "peak_rss_bytes": peak_rss()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--batch", type=int, required=True)
    s.add_argument("--seq", type=int, required=True)
    s.add_argument("--targets", choices=["qv", "all"], required=True)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--threads", type=int, default=2)
    d = sub.add_parser("decode")
    d.add_argument("--gguf", type=Path, required=True)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--new", type=int, default=128)
    d.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    d.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    out = cmd_step(args) if args.cmd == "step" else cmd_decode(args)
    import torch
    import transformers
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
