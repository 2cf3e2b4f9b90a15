#!/usr/bin/env python3
"""The PyTorch + Hugging Face PEFT peer of burn-peft's trainer and benches, on the CPU.

    peft_cpu.py train CONFIG.yaml [--threads 2] [--json OUT.json]
    peft_cpu.py steps --model NAME_OR_PATH --task classification|causal-lm \
        --method lora|lora-all-linear|prefix|full [--num-labels 8] [--batch 16] [--seq 64] \
        [--threads 2] [--warmup 3] [--iters 10] [--r 8] [--virtual-tokens 16] [--json OUT.json]

`train` reads burn-peft's own YAML config (examples/lora-minilm-debian.yaml) and mirrors
crates/peft-train (data loading, label ids, schedule, AdamW, clipping, best-by-eval) with a plain
PyTorch loop. `steps` times one training step and inference on a fixed random batch; its JSON is
read by benches/method_comparison/peer.rs. See benches/peer/README.md.

Runs offline: HF_HUB_OFFLINE=1 is set unless the environment already sets it.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IGNORE_INDEX = -100

# Where messages go: stdout, or stderr when the JSON is written to stdout (`--json -`).
_LOG = sys.stdout


def log(*args) -> None:
    print(*args, file=_LOG, flush=True)


def versions() -> dict:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:  # only possible before any inter-op work has started
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def tf_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def warn_prefix_bert(model_type: str) -> None:
    """transformers 5's BERT takes no past_key_values, so PEFT prefix tuning cannot run there."""
    if tf_major() >= 5 and model_type == "bert":
        raise SystemExit(
            "error: prefix tuning on BERT needs transformers 4.x: transformers "
            f"{__import__('transformers').__version__}'s BERT takes no past_key_values (PEFT "
            "refuses it). Run this under a transformers 4.57 environment (here: "
            "/tmp/venv457/bin/python)."
        )


def resolve_model(name: str, base: Path | None) -> str:
    """A local folder (relative to `base`, then to the working directory) or a hub id."""
    if base is not None and not Path(name).is_absolute() and (base / name).is_dir():
        return str((base / name).resolve())
    return name


def load_model(name: str, task: str, num_labels: int | None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "classification":
        return AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels)
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(name)
    raise SystemExit(f"unknown task `{task}` (classification | causal-lm)")


def task_type(task: str) -> str:
    return {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}[task]


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch.optim.AdamW over the trainable parameters; weight decay on matrices only (ndim >= 2),
    none on biases, norms and other vectors, as burn-peft's optimizer (and HF's Trainer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in (
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


# ------------------------------------------------------------------------------------------------
# train


def canonical_int(s: str) -> int | None:
    if s and s.isascii() and s.isdigit() and (s == "0" or not s.startswith("0")):
        return int(s)
    return None


def label_names(raw: list[str]) -> list[str]:
    """burn-peft's LabelMap::from_labels: all non-negative integers -> "0".."max"; otherwise the
    distinct labels sorted alphabetically (byte order)."""
    distinct = sorted(set(raw), key=lambda s: s.encode("utf-8"))
    ints = [canonical_int(s) for s in distinct]
    if distinct and all(i is not None for i in ints):
        return [str(i) for i in range(max(ints) + 1)]
    return distinct


def raw_label(v) -> str:
    if isinstance(v, bool) or v is None:
        raise ValueError(f"bad label {v!r}")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"negative label {v}")
        return str(v)
    if isinstance(v, str):
        return v
    raise ValueError(f"bad label {v!r}")


class Encoder:
    """Encodes as burn-peft does: the tokenizer.json pipeline with its special tokens, no
    padding or truncation of its own, then the first `max_length` ids are kept."""

    def __init__(self, name: str, max_length: int):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
        self.fast = tok.backend_tokenizer if getattr(tok, "is_fast", False) else None
        if self.fast is not None:
            self.fast = copy.deepcopy(self.fast)
            self.fast.no_padding()
            self.fast.no_truncation()
        self.tok = tok
        self.max_length = max_length
        pad = None
        if self.fast is not None and self.fast.padding is not None:
            pad = self.fast.padding.get("pad_id")
        if pad is None:
            for t in ("[PAD]", "<pad>", "<|endoftext|>"):
                i = self.token_id(t)
                if i is not None:
                    pad = i
                    break
        self.pad_id = pad if pad is not None else 0
        self._specials = None

    def token_id(self, t: str) -> int | None:
        if self.fast is not None:
            return self.fast.token_to_id(t)
        i = self.tok.convert_tokens_to_ids(t)
        return None if i == self.tok.unk_token_id and t != self.tok.unk_token else i

    def encode_full(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        if self.fast is not None:
            enc = self.fast.encode(text, pair) if pair is not None else self.fast.encode(text)
            return list(enc.ids), list(enc.type_ids)
        enc = self.tok(text, pair, add_special_tokens=True, return_token_type_ids=True)
        ids = enc["input_ids"]
        return ids, enc.get("token_type_ids") or [0] * len(ids)

    def encode(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        ids, types = self.encode_full(text, pair)
        return ids[: self.max_length], types[: self.max_length]

    def specials(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix): the special tokens around every single text."""
        if self._specials is None:
            empty = self.encode_full("")[0]
            found = (empty, [])
            for probe in ("a", "hello", "0", "."):
                ids = self.encode_full(probe)[0]
                if len(ids) <= len(empty):
                    continue
                for k in range(len(empty) + 1):
                    if ids[:k] == empty[:k] and ids[len(ids) - (len(empty) - k):] == empty[k:]:
                        found = (empty[:k], empty[k:])
                        break
                else:
                    continue
                break
            self._specials = found
        return self._specials

    def prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        pre, suf = self.specials()

        def strip(ids):
            p, s = len(pre), len(suf)
            if len(ids) >= p + s and ids[:p] == pre and ids[len(ids) - s:] == suf:
                return ids[p:len(ids) - s]
            return ids

        head = pre + strip(self.encode_full(prompt)[0])
        tail = strip(self.encode_full(completion)[0]) + suf
        ids = (head + tail)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(head) + tail)[: self.max_length]
        return ids, labels


def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            for r in csv.DictReader(f):
                if all(v == "" for v in r.values()):
                    continue
                rows.append({k: v for k, v in r.items() if v != ""})
        return rows
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise SystemExit(f"{path}:{n}: expected a JSON object")
                rows.append(obj)
    if not rows:
        raise SystemExit(f"{path}: no examples")
    return rows


def load_examples(path: Path, task: str, enc: Encoder, data_cfg: dict, names: list[str] | None):
    """Examples as dicts {ids, types, label | labels}; returns (examples, label names)."""
    text_f = data_cfg.get("text_field", "text")
    pair_f = data_cfg.get("text_pair_field", "text_pair")
    label_f = data_cfg.get("label_field", "label")
    prompt_f = data_cfg.get("prompt_field", "prompt")
    compl_f = data_cfg.get("completion_field", "completion")
    rows = read_rows(path)
    out = []
    if task == "classification":
        raws = []
        for r in rows:
            pair = r.get(pair_f) if pair_f else None
            ids, types = enc.encode(str(r[text_f]), pair if pair else None)
            raws.append(raw_label(r[label_f]))
            out.append({"ids": ids, "types": types})
        if names is None:
            names = label_names(raws)
        index = {n: i for i, n in enumerate(names)}
        for e, raw in zip(out, raws):
            if raw not in index:
                raise SystemExit(f"{path}: unknown label `{raw}`; known: {', '.join(names)}")
            e["label"] = index[raw]
        return out, names
    for r in rows:
        if prompt_f in r or compl_f in r:
            ids, labels = enc.prompt_completion(str(r[prompt_f]), str(r[compl_f]))
        else:
            ids = enc.encode(str(r[text_f]))[0]
            labels = list(ids)
        out.append({"ids": ids, "types": [0] * len(ids), "labels": labels})
    return out, None


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example of the batch (dynamic padding)."""
    b = len(batch)
    s = max(1, max(len(e["ids"]) for e in batch))
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    types = torch.zeros((b, s), dtype=torch.long)
    lm = torch.full((b, s), IGNORE_INDEX, dtype=torch.long) if "labels" in batch[0] else None
    tokens = 0
    for row, e in enumerate(batch):
        n = len(e["ids"])
        tokens += n
        ids[row, :n] = torch.tensor(e["ids"], dtype=torch.long)
        mask[row, :n] = 1
        types[row, :n] = torch.tensor(e["types"][:n], dtype=torch.long)
        if lm is not None:
            lm[row, :n] = torch.tensor(e["labels"][:n], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "tokens": tokens}
    if "label" in batch[0]:
        out["labels"] = torch.tensor([e["label"] for e in batch], dtype=torch.long)
    if lm is not None:
        out["lm_labels"] = lm
    return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over targets != -100, shifted as transformers does."""
    s = labels.shape[1]
    logits = logits[:, -s:, :]  # prompt-style methods prepend virtual positions
    target = labels[:, 1:]
    count = int((target != IGNORE_INDEX).sum().clamp_min(1))
    loss = F.cross_entropy(
        logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    ) / count
    return loss, count


def macro_f1(pred: list[int], gold: list[int]) -> float:
    """scikit-learn's f1_score(average="macro", zero_division=0) over the classes present in gold
    or pred, as burn-peft's metrics::macro_f1."""
    classes = set(pred) | set(gold)
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = sum(1 for p, g in zip(pred, gold) if p == g == c)
        predicted = sum(1 for p in pred if p == c)
        actual = sum(1 for g in gold if g == c)
        total += 2.0 * tp / (predicted + actual)
    return total / len(classes)


class Runner:
    def __init__(self, model, task: str, pad_id: int, pass_types: bool):
        self.model = model
        self.task = task
        self.pad_id = pad_id
        self.pass_types = pass_types

    def forward(self, batch: dict):
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.pass_types:
            kw["token_type_ids"] = batch["token_type_ids"]
        return self.model(**kw)

    def loss(self, batch: dict) -> torch.Tensor:
        out = self.forward(batch)
        if self.task == "classification":
            return F.cross_entropy(out.logits.float(), batch["labels"])
        return causal_lm_loss(out.logits, batch["lm_labels"])[0]

    @torch.no_grad()
    def evaluate(self, examples: list[dict], batch_size: int) -> dict:
        was_training = self.model.training
        self.model.eval()
        loss_sum, count = 0.0, 0
        pred, gold = [], []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = collate(chunk, self.pad_id)
            out = self.forward(batch)
            if self.task == "classification":
                logits = out.logits.float()
                loss_sum += F.cross_entropy(logits, batch["labels"]).item() * len(chunk)
                count += len(chunk)
                pred.extend(logits.argmax(1).tolist())
                gold.extend(e["label"] for e in chunk)
            else:
                l, n = causal_lm_loss(out.logits, batch["lm_labels"])
                loss_sum += l.item() * n
                count += n
        self.model.train(was_training)
        mean = loss_sum / count if count else float("nan")
        if self.task == "classification":
            acc = sum(p == g for p, g in zip(pred, gold)) / len(pred) if pred else 0.0
            return {"loss": mean, "accuracy": acc, "macro_f1": macro_f1(pred, gold)}
        return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else float("inf")}


def lr_lambda(schedule: str, total: int, warmup: int):
    """burn-peft's schedule::lr_at, as a multiplier of the base learning rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise SystemExit(f"unknown schedule `{schedule}` (linear | cosine | constant)")

    return f


def cmd_train(args) -> dict:
    import yaml
    from peft import get_peft_config, get_peft_model

    set_threads(args.threads)
    cfg_path = Path(args.config)
    cfg = yaml.safe_load(cfg_path.read_text())
    base = cfg_path.resolve().parent
    mcfg = cfg.get("model", {})
    task = mcfg.get("task", "classification").replace("_", "-")
    name = resolve_model(mcfg["name_or_path"], base)
    dcfg = cfg.get("data", {})
    tcfg = cfg.get("train", {}) or {}
    max_length = int(dcfg.get("max_length", 128))
    seed = int(tcfg.get("seed", 42))
    epochs = int(tcfg.get("epochs", 3))
    batch_size = int(tcfg.get("batch_size", 16))
    grad_accum = int(tcfg.get("grad_accum", 1))
    lr = float(tcfg.get("learning_rate", 5e-4))
    schedule = str(tcfg.get("schedule", "linear")).lower()
    max_grad_norm = tcfg.get("max_grad_norm", 1.0)
    weight_decay = float((tcfg.get("adamw") or {}).get("weight_decay", 0.01))
    max_steps = tcfg.get("max_steps")
    eval_every = tcfg.get("eval_every")
    patience = tcfg.get("early_stopping_patience")
    eval_bs = int(tcfg.get("eval_batch_size") or batch_size)
    metric = tcfg.get("metric") or ("accuracy" if task == "classification" else "loss")
    higher = metric in ("accuracy", "macro_f1")

    def data_path(key):
        p = dcfg.get(key)
        return None if p is None else (base / p if not Path(p).is_absolute() else Path(p))

    # Model load and tokenization: not timed.
    enc = Encoder(name, max_length)
    t0 = time.perf_counter()
    train_ex, names = load_examples(data_path("train"), task, enc, dcfg, None)
    eval_ex = load_examples(data_path("eval"), task, enc, dcfg, names)[0] if dcfg.get("eval") else None
    test_ex = load_examples(data_path("test"), task, enc, dcfg, names)[0] if dcfg.get("test") else None
    tokenize_s = time.perf_counter() - t0
    num_labels = int(mcfg.get("num_labels") or (len(names) if names else 0)) or None

    torch.manual_seed(seed)  # classifier head and adapter initialization, then dropout
    model = load_model(name, task, num_labels)
    pass_types = accepts(model, "token_type_ids")
    model_type = getattr(model.config, "model_type", "?")
    method = cfg.get("method", "full")
    if isinstance(method, str):
        if method.lower() != "full":
            raise SystemExit(f"method: `{method}`: a PEFT adapter_config block or `full`")
        method_name = "FULL"
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        mc = dict(method)
        mc.setdefault("task_type", task_type(task))
        method_name = str(mc["peft_type"]).upper()
        if method_name == "PREFIX_TUNING":
            warn_prefix_bert(model_type)
        model = get_peft_model(model, get_peft_config(mc))
    trainable, all_params = count_params(model)
    model.train()

    n = len(train_ex)
    batches_per_epoch = math.ceil(n / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    total = max(int(max_steps) if max_steps is not None else steps_per_epoch * epochs, 1)
    if tcfg.get("warmup_steps") is not None:
        warmup = int(tcfg["warmup_steps"])
    else:
        warmup = round(float(tcfg.get("warmup_ratio", 0.0)) * total)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(model, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, total, warmup))
    runner = Runner(model, task, enc.pad_id, pass_types)

    v = versions()
    log(f"peer: PyTorch {v['torch']} + transformers {v['transformers']} + PEFT {v['peft']}, "
        f"{args.threads} thread(s)")
    log(f"model {name} ({model_type}, {task}), method {method_name}: "
        f"{trainable:,} trainable of {all_params:,} parameters")
    log(f"data: {n} train / {len(eval_ex or [])} eval / {len(test_ex or [])} test examples, "
        f"max_length {max_length}, {len(names or [])} labels (tokenized in {tokenize_s:.1f} s)")
    log(f"{epochs} epoch(s) x {steps_per_epoch} steps = {total} steps, batch {batch_size}, "
        f"grad_accum {grad_accum}, lr {lr:g} ({schedule}, warmup {warmup}), "
        f"max_grad_norm {max_grad_norm}, weight_decay {weight_decay:g}, seed {seed}")

    step, tokens = 0, 0
    best_metric, best_step, best_state = None, None, None
    evals_without, stopped_early = 0, False
    history, losses = [], []
    train_s = 0.0  # the loop without evaluations
    loop_start = time.perf_counter()
    seg = loop_start
    for epoch in range(max(epochs, 1)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        micro, micro_loss = 0, 0.0
        done = False
        for index, chunk in enumerate(chunks):
            batch = collate([train_ex[i] for i in chunk], enc.pad_id)
            tokens += batch["tokens"]
            loss = runner.loss(batch)
            loss.backward()
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"non-finite loss {value} at step {step}")
            micro_loss += value
            micro += 1
            end_of_epoch = index + 1 == len(chunks)
            if micro < grad_accum and not end_of_epoch:
                continue
            if micro > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(micro)
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm))
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(micro_loss / micro)
            micro, micro_loss = 0, 0.0
            if step % 25 == 0 or step == total:
                el = train_s + time.perf_counter() - seg
                log(f"  step {step}/{total}  loss {losses[-1]:.4f}  lr "
                    f"{opt.param_groups[0]['lr']:.2e}  grad_norm {float(norm):.3f}  "
                    f"{step / el:.2f} steps/s")
            at_end = end_of_epoch or (max_steps is not None and step >= int(max_steps))
            if eval_ex is not None and (at_end or (eval_every and step % int(eval_every) == 0)):
                train_s += time.perf_counter() - seg
                report = runner.evaluate(eval_ex, eval_bs)
                value = report[metric] if metric != "perplexity" else report["perplexity"]
                improved = best_metric is None or (value > best_metric if higher else value < best_metric)
                if improved:
                    best_metric, best_step, evals_without = value, step, 0
                    best_state = {k: p.detach().clone() for k, p in model.named_parameters()
                                  if p.requires_grad}
                else:
                    evals_without += 1
                history.append({"step": step, "epoch": epoch + 1, **report})
                log(f"  eval @ step {step} (epoch {epoch + 1}): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in report.items())
                    + ("  (best)" if improved else ""))
                if patience is not None and evals_without >= int(patience):
                    stopped_early = True
                seg = time.perf_counter()
            if stopped_early or (max_steps is not None and step >= int(max_steps)):
                done = True
                break
        if done:
            break
    train_s += time.perf_counter() - seg
    total_s = time.perf_counter() - loop_start

    if best_state is not None:
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in best_state:
                    p.copy_(best_state[k])
    final_eval = runner.evaluate(eval_ex, eval_bs) if eval_ex is not None else None
    final_test = runner.evaluate(test_ex, eval_bs) if test_ex is not None else None

    log(f"done: {step} steps in {train_s:.1f} s training ({step / train_s:.2f} steps/s, "
        f"{tokens / train_s:.0f} tokens/s); {total_s:.1f} s with the epoch-end evaluations")
    if best_step is not None:
        log(f"best by eval {metric}: step {best_step} ({best_metric:.4f})")
    for label, rep in (("eval", final_eval), ("test", final_test)):
        if rep is not None:
            log(f"{label} (best state): " + ", ".join(f"{k} {v:.4f}" for k, v in rep.items()))

    out = {
        "framework": "pytorch+peft",
        **v,
        "threads": args.threads,
        "config": str(args.config),
        "method": method_name,
        "trainable_params": trainable,
        "all_params": all_params,
        "steps": step,
        "train_seconds": round(train_s, 3),
        "steps_per_sec": round(step / train_s, 4),
        "eval_accuracy": final_eval.get("accuracy") if final_eval else None,
        "test_accuracy": final_test.get("accuracy") if final_test else None,
        "test_macro_f1": final_test.get("macro_f1") if final_test else None,
        # Beyond the keys above:
        "total_seconds": round(total_s, 3),
        "tokens_per_sec": round(tokens / train_s, 1),
        "eval_macro_f1": final_eval.get("macro_f1") if final_eval else None,
        "eval_loss": final_eval["loss"] if final_eval else None,
        "test_loss": final_test["loss"] if final_test else None,
        "best_step": best_step,
        "metric": metric,
        "evals": history,
        "model": name,
        "python": platform.python_version(),
    }
    return out


# ------------------------------------------------------------------------------------------------
# steps


def lora_targets(model_type: str) -> list[str] | None:
    if model_type in ("bert", "roberta", "xlm-roberta"):
        return ["query", "value"]
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo"):
        return ["q_proj", "v_proj"]
    if model_type == "gpt2":
        return ["c_attn"]
    return None  # PEFT's default mapping for the model type


def timed(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def cmd_steps(args) -> dict:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    set_threads(args.threads)
    task = args.task.replace("_", "-")
    torch.manual_seed(0)
    model = load_model(args.model, task, args.num_labels if task == "classification" else None)
    model_type = getattr(model.config, "model_type", "?")
    pass_types = accepts(model, "token_type_ids")

    g = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if pass_types:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    if task == "classification":
        labels = torch.randint(0, args.num_labels, (args.batch,), generator=g)
    else:
        labels = ids.clone()

    def infer(m):
        def f():
            with torch.no_grad():
                m(**inputs)
        return f

    model.eval()
    infer_ms = {"base": statistics.median(timed(infer(model), args.warmup, args.iters)),
                "unmerged": None, "merged": None}

    lora = args.method in ("lora", "lora-all-linear")
    if lora:
        targets = "all-linear" if args.method == "lora-all-linear" else lora_targets(model_type)
        pcfg = LoraConfig(task_type=task_type(task), r=args.r, lora_alpha=2 * args.r,
                          lora_dropout=0.1, target_modules=targets)
        model = get_peft_model(model, pcfg)
    elif args.method == "prefix":
        warn_prefix_bert(model_type)
        model = get_peft_model(model, PrefixTuningConfig(task_type=task_type(task),
                                                         num_virtual_tokens=args.virtual_tokens))
    elif args.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise SystemExit(f"unknown method `{args.method}`")
    trainable, _ = count_params(model)

    opt = adamw(model, 1e-4, 0.01)
    model.train()

    def train_step():
        out = model(**inputs)
        if task == "classification":
            loss = F.cross_entropy(out.logits.float(), labels)
        else:
            loss = causal_lm_loss(out.logits, labels)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps_ms = timed(train_step, args.warmup, args.iters)
    del opt

    model.eval()
    if args.method != "full":
        # With the adapter applied (for prefix tuning there is no merge: only "unmerged").
        infer_ms["unmerged"] = statistics.median(timed(infer(model), args.warmup, args.iters))
    if lora:
        merged = model.merge_and_unload()
        merged.eval()
        infer_ms["merged"] = statistics.median(timed(infer(merged), args.warmup, args.iters))

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    out = {
        "framework": "pytorch+peft",
        "method": args.method,
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "train_step_ms_median": round(statistics.median(steps_ms), 3),
        "train_step_ms_all": [round(x, 3) for x in steps_ms],
        "infer_ms": {k: (None if v is None else round(v, 3)) for k, v in infer_ms.items()},
        "peak_rss_mb": round(rss_mb, 1),
        "trainable_params": trainable,
    }
    v = versions()
    log(f"peer steps: PyTorch {v['torch']} + transformers {v['transformers']} + PEFT {v['peft']}; "
        f"{args.model} ({model_type}, {task}), method {args.method}, batch {args.batch} x seq "
        f"{args.seq}, {args.threads} thread(s)")
    log(f"  train step: median {out['train_step_ms_median']:.1f} ms over {args.iters} "
        f"(after {args.warmup} warmup); trainable params {trainable:,}")
    log("  inference: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out["infer_ms"].items()
                                     if v is not None)
        + f"; peak RSS {out['peak_rss_mb']:.0f} MB")
    return out


# ------------------------------------------------------------------------------------------------


def write_json(obj: dict, dest: str | None) -> None:
    if dest is None:
        return
    text = json.dumps(obj, indent=2) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    p = Path(dest)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    log(f"wrote {p}")


def main(argv=None) -> int:
    global _LOG
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train as a burn-peft YAML config says")
    t.add_argument("config")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--json", help="write the result JSON here ('-' = stdout, nothing else there)")

    s = sub.add_parser("steps", help="time training steps and inference on a random batch")
    s.add_argument("--model", required=True)
    s.add_argument("--task", required=True, choices=["classification", "causal-lm"])
    s.add_argument("--method", required=True, choices=["lora", "lora-all-linear", "prefix", "full"])
    s.add_argument("--num-labels", type=int, default=8)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--seq", type=int, default=64)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--iters", type=int, default=10)
    s.add_argument("--r", type=int, default=8)
    s.add_argument("--virtual-tokens", type=int, default=16)
    s.add_argument("--json", help="write the result JSON here ('-' = stdout, nothing else there)")

    args = ap.parse_args(argv)
    if args.json == "-":
        _LOG = sys.stderr
    if args.cmd == "train":
        out = cmd_train(args)
    else:
        if args.iters < 1:
            raise SystemExit("--iters must be at least 1")
        out = cmd_steps(args)
    write_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
