#!/usr/bin/env python3
"""The PyTorch + Hugging Face PEFT peer of burn-peft's chat fine-tuning, on the CPU.

    chat_sft.py [--gguf FILE] [--train examples/data/chat/train.jsonl]
        [--test examples/data/chat/test.jsonl] [--threads 2] [--limit-train N] [--limit-test N]
        [--out benches/peer/results/chat_sft.json] [--predictions FILE.jsonl] [...]

LoRA supervised fine-tuning of SmolLM2-135M-Instruct (read from its GGUF file and dequantized to
f32 by transformers) on chat conversations ({"messages": [{"role", "content"}, ...]} per line),
with the loss on the assistant turns only, then greedy generation on the test conversations
before and after training. A plain PyTorch loop, not the HF Trainer. See benches/peer/README.md.

Encoding (burn-peft does the same):
- ids = tok.apply_chat_template(messages, tokenize=True): the template's own text, including
  SmolLM2's default system message; no other special tokens are added.
- For each assistant message i, the tokens from len(template(messages[:i],
  add_generation_prompt=True)) to len(template(messages[:i+1])) are trained (labels = ids): the
  answer, `<|im_end|>` and the "\\n" after it. Every other label is -100. The script asserts that
  the generation-prompt ids are a prefix of the full ids (and those of messages[:i+1] too).
- Rows longer than --max-length keep their first max_length ids and labels (counted and printed).
- Batches are right-padded to their longest row with the pad id (the tokenizer's pad, else eos),
  attention mask 0 and label -100 there. The loss is transformers' own causal-LM loss
  (model(..., labels=...)): shifted, mean cross-entropy over the batch's targets other than -100.

Training: LoRA (r 16, alpha 32, dropout 0.05 on q/k/v/o_proj); torch.optim.AdamW (lr 5e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every trainable parameter: LoRA's are all
matrices); burn-peft's linear schedule (lr_at: (step+1)/warmup during warmup, then
1 - (step-warmup)/(total-warmup)), warmup = ceil(warmup_ratio * total); global-norm clipping
at 1.0; batch 8, 1 epoch. One torch.Generator seeded with --seed gives each epoch's permutation
(torch.randperm); torch.manual_seed(--seed) is set before the model is loaded and again right
before the adapter is created (its initialization), then drives LoRA dropout.

Evaluation: for each test row, batch 1, the prompt is template(messages[:-1],
add_generation_prompt=True); greedy decoding (do_sample=False), at most --max-new-tokens, stops
at eos (`<|im_end|>`). The new tokens are decoded with skip_special_tokens=True. normalize():
lowercase, then strip from both ends whitespace, quotes (" and ') and backticks, and "." from
the end, repeated until nothing changes. exact: normalize(reply) == normalize(reference);
contains: normalize(reference) occurs in normalize(reply) as a whole word (regex \\b...\\b).

Runs offline: HF_HUB_OFFLINE=1 is set unless the environment already sets it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

IGNORE_INDEX = -100
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = os.path.join(
    os.environ.get("BURN_PEFT_MODELS", os.path.expanduser("~/.cache/burn-peft/models")),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)


def log(*args) -> None:
    print(*args, flush=True)


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:  # only possible before any inter-op work has started
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise SystemExit(f"{path}:{n}: expected {{\"messages\": [...]}}")
            rows.append(obj)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise SystemExit(f"{path}: no conversations")
    return rows


class ChatEncoder:
    def __init__(self, tok, max_length: int):
        self.tok = tok
        self.max_length = max_length
        pad = tok.pad_token_id
        self.pad_id = pad if pad is not None else tok.eos_token_id
        self.truncated = 0

    def ids(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        r = self.tok.apply_chat_template(messages, tokenize=True,
                                         add_generation_prompt=generation_prompt)
        if hasattr(r, "keys"):  # transformers 5 returns a BatchEncoding
            r = r["input_ids"]
        return [int(x) for x in r]

    def train_example(self, messages: list[dict]) -> dict:
        ids = self.ids(messages)
        labels = [IGNORE_INDEX] * len(ids)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.ids(messages[:i], generation_prompt=True)
            upto = self.ids(messages[:i + 1])
            assert ids[:len(head)] == head, "generation-prompt ids are not a prefix of the ids"
            assert ids[:len(upto)] == upto, "ids up to the assistant turn are not a prefix"
            assert len(upto) > len(head)
            spans.append((len(head), len(upto)))
            labels[len(head):len(upto)] = ids[len(head):len(upto)]
        trained = sum(b - a for a, b in spans)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return {"ids": ids, "labels": labels, "spans": spans, "trained_full": trained,
                "trained": sum(1 for x in labels if x != IGNORE_INDEX)}


def collate(batch: list[dict], pad_id: int) -> dict:
    b = len(batch)
    s = max(len(e["ids"]) for e in batch)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["ids"])
        ids[row, :n] = torch.tensor(e["ids"], dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "tokens": sum(len(e["ids"]) for e in batch)}


_STRIP_BOTH = " \t\r\n\"'`"


def normalize(s: str) -> str:
    s = s.lower()
    while True:
        t = s.strip(_STRIP_BOTH).rstrip(".")
        if t == s:
            return s
        s = t


def contains_word(reply: str, ref: str) -> bool:
    return bool(ref) and re.search(r"\b" + re.escape(ref) + r"\b", reply) is not None


@torch.no_grad()
def evaluate(model, enc: ChatEncoder, rows: list[dict], max_new_tokens: int, label: str):
    was_training = model.training
    model.eval()
    eos = enc.tok.eos_token_id
    preds = []
    new_tokens = 0
    t0 = time.perf_counter()
    for index, row in enumerate(rows):
        msgs = row["messages"]
        assert msgs[-1]["role"] == "assistant", "the last message of a test row is the reference"
        prompt = enc.ids(msgs[:-1], generation_prompt=True)
        input_ids = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=enc.pad_id)
        gen = out[0, len(prompt):].tolist()
        new_tokens += len(gen)
        reply = enc.tok.decode(gen, skip_special_tokens=True)
        ref = msgs[-1]["content"]
        nr, nref = normalize(reply), normalize(ref)
        preds.append({"index": index, "reference": ref, "reply": reply,
                      "exact": nr == nref, "contains": contains_word(nr, nref)})
        if (index + 1) % 50 == 0:
            log(f"  [{label}] {index + 1}/{len(rows)} "
                f"({time.perf_counter() - t0:.0f} s)")
    secs = time.perf_counter() - t0
    model.train(was_training)
    n = len(preds)
    res = {
        "exact_match": sum(p["exact"] for p in preds) / n,
        "contains": sum(p["contains"] for p in preds) / n,
        "n": n,
        "eval_seconds": round(secs, 3),
        "generated_tokens": new_tokens,
    }
    return res, preds


def lr_lambda(total: int, warmup: int):
    """burn-peft's schedule::lr_at (linear), as a multiplier of the base learning rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 1.0 - min((step - warmup) / max(total - warmup, 1), 1.0)

    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help=f"the model file (default {DEFAULT_GGUF})")
    ap.add_argument("--train", default=str(ROOT / "examples/data/chat/train.jsonl"))
    ap.add_argument("--test", default=str(ROOT / "examples/data/chat/test.jsonl"))
    ap.add_argument("--limit-train", type=int, help="use only the first N training rows")
    ap.add_argument("--limit-test", type=int, help="use only the first N test rows")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-ratio", type=float, default=0.06)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0: no clipping")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benches/peer/results/chat_sft.json"),
                    help="result JSON ('-' = stdout, nothing else there; '' = none)")
    ap.add_argument("--predictions", help="per-example predictions (jsonl), before and after")
    args = ap.parse_args(argv)
    global log
    if args.out == "-":
        def log(*a):  # noqa: E306
            print(*a, file=sys.stderr, flush=True)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    gguf = Path(os.path.expanduser(args.gguf)).resolve()
    if not gguf.is_file():
        raise SystemExit(f"{gguf}: not found (scripts/fetch-smollm2.sh fetches it)")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_mb()  # GGUF dequantization included

    enc = ChatEncoder(tok, args.max_length)
    train_rows = read_jsonl(Path(args.train), args.limit_train)
    test_rows = read_jsonl(Path(args.test), args.limit_test)
    t0 = time.perf_counter()
    train_ex = [enc.train_example(r["messages"]) for r in train_rows]
    tokenize_s = time.perf_counter() - t0
    lens = [len(e["ids"]) for e in train_ex]
    no_target = sum(1 for e in train_ex if e["trained"] == 0)

    torch.manual_seed(args.seed)  # adapter initialization, then dropout
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    pcfg = LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, target_modules=targets)
    model = get_peft_model(model, pcfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in model.parameters())

    n = len(train_ex)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = max(steps_per_epoch * args.epochs, 1)
    warmup = math.ceil(args.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                            weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))

    v = versions()
    log(f"chat peer: PyTorch {v['torch']} + transformers {v['transformers']} + PEFT {v['peft']}, "
        f"{args.threads} thread(s)")
    log(f"model {gguf.name} (dequantized to f32, loaded in {load_s:.1f} s, peak RSS "
        f"{rss_load:.0f} MB), LoRA r {args.r} alpha {args.lora_alpha:g} dropout "
        f"{args.lora_dropout:g} on {','.join(targets)}: {trainable:,} trainable of "
        f"{all_params:,} parameters")
    log(f"data: {n} train / {len(test_rows)} test conversations; train tokens min {min(lens)}, "
        f"median {statistics.median(lens):g}, max {max(lens)} (after truncation); "
        f"{enc.truncated} truncated to max_length {args.max_length}, {no_target} left with no "
        f"trained token; pad id {enc.pad_id}, eos id {tok.eos_token_id} ({tok.eos_token}); "
        f"tokenized in {tokenize_s:.1f} s; prefix property holds for every assistant turn")
    log(f"{args.epochs} epoch(s) x {steps_per_epoch} steps = {total} steps, batch "
        f"{args.batch_size}, lr {args.lr:g} (linear, warmup {warmup}), max_grad_norm "
        f"{args.max_grad_norm:g}, weight_decay {args.weight_decay:g}, seed {args.seed}")

    log("evaluating before training ...")
    before, before_preds = evaluate(model, enc, test_rows, args.max_new_tokens, "before")
    log(f"before: exact {before['exact_match']:.4f}, contains {before['contains']:.4f} "
        f"({before['eval_seconds']:.1f} s)")

    model.train()
    g = torch.Generator().manual_seed(args.seed)
    step, tokens, trained_tokens = 0, 0, 0
    losses, grad_norms = [], []
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, args.batch_size):
            chunk = [train_ex[j] for j in order[i:i + args.batch_size]]
            batch = collate(chunk, enc.pad_id)
            tokens += batch["tokens"]
            trained_tokens += sum(e["trained"] for e in chunk)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], use_cache=False)
            loss = out.loss
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"non-finite loss {value} at step {step}")
            loss.backward()
            if args.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params
                                                      if p.grad is not None])
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(value, 6))
            grad_norms.append(round(float(norm), 6))
            if step % 10 == 0 or step == total or step == 1:
                el = time.perf_counter() - t_start
                log(f"  step {step}/{total}  loss {value:.4f}  lr {lr:.2e}  grad_norm "
                    f"{float(norm):.3f}  {step / el:.3f} steps/s  {tokens / el:.0f} tokens/s")
    train_s = time.perf_counter() - t_start
    log(f"trained {step} steps in {train_s:.1f} s ({step / train_s:.3f} steps/s, "
        f"{tokens / train_s:.0f} tokens/s over {tokens} non-pad tokens; {trained_tokens} "
        f"trained tokens)")

    log("evaluating after training ...")
    after, after_preds = evaluate(model, enc, test_rows, args.max_new_tokens, "after")
    log(f"after: exact {after['exact_match']:.4f}, contains {after['contains']:.4f} "
        f"({after['eval_seconds']:.1f} s)")
    rss = peak_rss_mb()
    log(f"peak RSS {rss:.0f} MB")

    result = {
        "framework": "pytorch+peft",
        **v,
        "python": platform.python_version(),
        "threads": args.threads,
        "model": str(gguf),
        "dtype": "float32",
        "train_file": args.train,
        "test_file": args.test,
        "n_train": n,
        "n_test": len(test_rows),
        "method": "LORA",
        "lora": {"r": args.r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                 "target_modules": targets},
        "trainable_params": trainable,
        "all_params": all_params,
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [args.beta1, args.beta2],
                      "eps": args.eps, "weight_decay": args.weight_decay},
        "schedule": "linear",
        "warmup_ratio": args.warmup_ratio,
        "warmup_steps": warmup,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "max_grad_norm": args.max_grad_norm,
        "max_length": args.max_length,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "truncated_rows": enc.truncated,
        "rows_without_trained_tokens": no_target,
        "train_token_lengths": {"min": min(lens), "median": statistics.median(lens),
                                "max": max(lens)},
        "steps": step,
        "train_seconds": round(train_s, 3),
        "steps_per_sec": round(step / train_s, 4),
        "train_tokens": tokens,
        "trained_tokens": trained_tokens,
        "tokens_per_sec": round(tokens / train_s, 1),
        "losses": losses,
        "grad_norms": grad_norms,
        "before": before,
        "after": after,
        "load_seconds": round(load_s, 3),
        "peak_rss_mb": round(rss, 1),
        "peak_rss_after_load_mb": round(rss_load, 1),
    }
    if args.predictions:
        p = Path(args.predictions)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            for stage, preds in (("before", before_preds), ("after", after_preds)):
                for x in preds:
                    f.write(json.dumps({"stage": stage, **x}, ensure_ascii=False) + "\n")
        log(f"wrote {p}")
    if args.out == "-":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
