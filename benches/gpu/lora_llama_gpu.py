#!/usr/bin/env python3
"""LoRA training steps on a Llama-shaped model: burn-peft on Vulkan vs PyTorch + PEFT on CUDA,
on the same card. Prints tokens/s, peak GPU memory and the ratios.

    python3 lora_llama_gpu.py --burn-peft ./burn-peft [--shape 1b] [--dtype f32 f16]
        [--batch 4] [--seq 512] [--steps 10] [--warmup 3] [--r 16] [--json results.json]

Everything is generated here: a `config.json` of the chosen shape (`1b`: Llama-3.2-1B's,
hidden 2048, 16 layers, 32 query / 8 key-value heads, vocab 128256, tied embeddings; `tiny`
for a smoke test), random weights (each framework initialises its own; throughput does not
depend on the values) and random tokens. No network, no Rust toolchain: the burn-peft binary is
built elsewhere (`benches/gpu/pack.sh`) and carried over.

Both sides run the same step: forward, next-token cross-entropy over all tokens, backward,
global-norm clipping to 1.0, AdamW (PyTorch defaults, lr 1e-4) on LoRA r=16, alpha=32 on
q_proj/v_proj, and one read of the loss. `--dtype f16` keeps the frozen base in float16 and the
adapters in float32 on both sides (PEFT's `autocast_adapter_dtype`); PyTorch then also runs its
activations in float16 while burn-peft keeps f32 activations (see README.md).

Peak memory: each side's own allocator peak (torch.cuda.max_memory_reserved; burn-peft's memory
pool `bytes_reserved`) and, where `nvidia-smi` exists, the peak device memory in use while the
side ran, minus what was in use before it started (context included).

Testing without a GPU: `--torch-device cpu --burn-device vulkan --shape tiny` runs both halves
on the CPU (lavapipe for burn-peft); `--skip-torch` / `--skip-burn` run one half.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {
    # meta-llama/Llama-3.2-1B's shape (default RoPE instead of llama3 scaling: same cost).
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    # For measuring on a software device (lavapipe) in minutes.
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        vocab_size=2048,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # Smoke test shape.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def write_config(folder: Path, shape: str, vocab: int | None) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": False,
        **SHAPES[shape],
    }
    if vocab:
        config["vocab_size"] = vocab
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config


class GpuMemorySampler:
    """Peak of `nvidia-smi`'s memory.used (MiB) while running, minus the level before."""

    def __init__(self, gpu_index: int) -> None:
        self.gpu = str(gpu_index)
        self.available = shutil.which("nvidia-smi") is not None
        self.base = self.read() if self.available else None
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> int | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "-i", self.gpu, "--query-gpu=memory.used",
                 "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            return int(out.strip().splitlines()[0])
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            v = self.read()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def used_mib(self) -> int | None:
        if self.base is None or self.peak is None:
            return None
        return self.peak - self.base


def run_burn(args, model_dir: Path, dtype: str, out_dir: Path) -> dict:
    out = out_dir / f"burn-{dtype}.json"
    cmd = [
        str(args.burn_peft), "bench", "--model", str(model_dir),
        "--device", args.burn_device, "--dtype", dtype,
        "--batch-size", str(args.batch), "--seq-len", str(args.seq),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--r", str(args.r), "--lora-alpha", str(2 * args.r),
        "--target-modules", "q_proj,v_proj", "--learning-rate", "1e-4",
        "--json", str(out),
    ]
    log("$", " ".join(cmd))
    started = time.time()
    with GpuMemorySampler(args.gpu) as mem:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    if proc.returncode != 0:
        return {"framework": "burn-peft", "dtype": dtype, "error": f"exit code {proc.returncode}"}
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.time() - started
    result["nvidia_smi_peak_mib"] = mem.used_mib()
    return result


def run_torch(args, model_dir: Path, dtype: str, out_dir: Path) -> dict:
    """In a child process, so its CUDA context and allocator do not outlive the measurement."""
    out = out_dir / f"torch-{dtype}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--torch-worker",
        "--model-dir", str(model_dir), "--dtype", dtype, "--json", str(out),
        "--torch-device", args.torch_device, "--batch", str(args.batch),
        "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--r", str(args.r), "--attn", args.attn,
    ]
    log("$", " ".join(cmd))
    started = time.time()
    with GpuMemorySampler(args.gpu) as mem:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        return {"framework": "pytorch+peft", "dtype": dtype, "error": f"exit code {proc.returncode}"}
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.time() - started
    result["nvidia_smi_peak_mib"] = mem.used_mib()
    return result


def torch_worker(args) -> None:
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    device = torch.device(args.torch_device)
    config = transformers.AutoConfig.from_pretrained(args.model_dir)
    config._attn_implementation = args.attn
    base_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=base_dtype)
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    # autocast_adapter_dtype (default True) keeps the adapters in float32 over a half base.
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    everything = sum(p.numel() for p in model.parameters())
    optim = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    step_ms, losses = [], []
    timed_start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            timed_start = time.perf_counter()
        t0 = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
        ids = ids.to(device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(out.loss.item())  # one read per step, as burn-peft's trainer
        if step >= args.warmup:
            step_ms.append((time.perf_counter() - t0) * 1e3)
    sync()
    timed = time.perf_counter() - timed_start
    result = {
        "framework": "pytorch+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "batch_size": args.batch,
        "seq_len": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "trainable_params": trainable,
        "all_params": everything,
        "tokens_per_sec": args.batch * args.seq * args.steps / timed,
        "step_ms": step_ms,
        "losses": losses,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    Path(args.json).write_text(json.dumps(result, indent=2))


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def report(rows: list[tuple[str, dict, dict]]) -> None:
    head = ("dtype", "burn tok/s", "torch tok/s", "burn/torch", "burn peak MiB (pool / smi)",
            "torch peak MiB (reserved / smi)", "mem burn/torch (smi)")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for dtype, burn, torch_ in rows:
        bt, tt = burn.get("tokens_per_sec"), torch_.get("tokens_per_sec")
        bs, ts = burn.get("nvidia_smi_peak_mib"), torch_.get("nvidia_smi_peak_mib")
        print(" | ".join([
            dtype,
            f"{bt:,.0f}" if bt else burn.get("error", "-"),
            f"{tt:,.0f}" if tt else torch_.get("error", "-"),
            ratio(bt, tt),
            f"{mib(burn.get('peak_reserved_bytes'))} / {bs if bs is not None else '-'}",
            f"{mib(torch_.get('peak_reserved_bytes'))} / {ts if ts is not None else '-'}",
            ratio(bs, ts),
        ]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burn-peft", type=Path, default=Path(__file__).with_name("burn-peft"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--vocab", type=int, help="override the vocabulary size")
    p.add_argument("--dtype", nargs="+", default=["f32", "f16"], choices=["f32", "f16", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--burn-device", default="vulkan")
    p.add_argument("--torch-device", default="cuda")
    p.add_argument("--gpu", type=int, default=0, help="nvidia-smi index of the card")
    p.add_argument("--skip-burn", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--work", type=Path, help="folder for the config and results (default: temp)")
    p.add_argument("--json", type=Path, help="write all results here")
    # Internal: the PyTorch half in its own process.
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        args.dtype = args.dtype[0]
        torch_worker(args)
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="burn-peft-gpu-"))
    model_dir = work / f"llama-{args.shape}"
    config = write_config(model_dir, args.shape, args.vocab)
    log(f"model: {model_dir}/config.json ({args.shape}: hidden {config['hidden_size']}, "
        f"{config['num_hidden_layers']} layers, {config['num_attention_heads']}/"
        f"{config['num_key_value_heads']} heads, vocab {config['vocab_size']}); "
        f"batch {args.batch} x {args.seq} tokens, {args.warmup} warm-up + {args.steps} timed steps")
    if not args.skip_burn:
        if not os.access(args.burn_peft, os.X_OK):
            sys.exit(f"{args.burn_peft}: not an executable; pass --burn-peft PATH (see pack.sh)")
        subprocess.run([str(args.burn_peft), "devices"], stdout=sys.stderr, check=False)

    rows, everything = [], []
    for dtype in args.dtype:
        burn = {} if args.skip_burn else run_burn(args, model_dir, dtype, work)
        torch_ = {} if args.skip_torch else run_torch(args, model_dir, dtype, work)
        rows.append((dtype, burn, torch_))
        everything.extend(r for r in (burn, torch_) if r)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "config": config,
                                         "results": everything}, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
