#!/usr/bin/env python3
"""Batch-1 greedy decode of a GGUF model by a peer, for benches/gguf_llm.rs.

  python3 benches/peer/gguf_decode.py --backend torch    --gguf FILE --threads 2 --new 64
  python3 benches/peer/gguf_decode.py --backend llamacpp --gguf FILE --threads 2 --new 64

The prompt is the first chat-templated prompt of tests/fixtures/gguf/smollm2_reference.safetensors
(`ids_0`, 37 tokens), as the Rust side uses. `torch`: transformers' GGUF reader (the file
dequantized to float32, `from_pretrained(folder, gguf_file=...)`), `generate(do_sample=False)`
with the KV cache. `llamacpp`: llama.cpp through PyPI's llama-cpp-python (built from source),
the file's own block formats, greedy (`top_k=1`). One warm-up run, then the timed one; tokens/s
counts new tokens over the whole call (prompt included), as the Rust side does. Prints one JSON
line: tokens_per_sec, new_tokens, seconds, peak_rss_bytes.
"""

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]


def torch_decode(path, ids, new, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, torch_dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def run(n):
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    run(4)
    start = time.perf_counter()
    out = run(new)
    return out, time.perf_counter() - start


def llamacpp_decode(path, ids, new, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                verbose=False)

    def run(n):
        llm.reset()
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out

    run(4)
    start = time.perf_counter()
    out = run(new)
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["torch", "llamacpp"], required=True)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    ids = load_file(str(REPO / "tests/fixtures/gguf/smollm2_reference.safetensors"))["ids_0"][0].tolist()
    decode = torch_decode if args.backend == "torch" else llamacpp_decode
    out, seconds = decode(args.gguf, ids, args.new, args.threads)
    print(json.dumps({
        "backend": args.backend, "new_tokens": len(out), "seconds": seconds,
        "tokens_per_sec": len(out) / seconds, "first_ids": out[:8],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
