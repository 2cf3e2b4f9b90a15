#!/usr/bin/env python3
"""PyTorch timings of the ops of an all-MiniLM-L6-v2 forward at batch 16 x 64, for the op-level
profile of `cargo bench --bench method_comparison -- --profile` (it runs this script and prints
both side by side). Same ops, shapes and measurement as `profile_ops` in method_comparison/profile.rs:
best of N, forward only under no_grad, and forward + backward of `y.sum()` with the input requiring a
gradient and frozen weights. Prints one JSON object {op: {"fwd": ms, "fwd_bwd": ms}}.

    python3 benches/profile_ops.py [--threads 2] [--iters 20]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def timed(iters, f):
    for _ in range(2):
        f()
    v = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        v.append((time.perf_counter() - t) * 1e3)
    return min(v)  # best of N: other load on the machine only adds time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    b, s, h, inter, heads = 16, 64, 384, 1536, 12
    x_h = torch.randn(b, s, h)
    x_i = torch.randn(b, s, inter)
    out = {}

    def both(name, op, *inputs):
        def fwd():
            with torch.no_grad():
                op(*inputs)

        def fwd_bwd():
            xs = [x.clone().requires_grad_(True) for x in inputs]
            op(*xs).sum().backward()

        out[name] = {"fwd": timed(a.iters, fwd), "fwd_bwd": timed(a.iters, fwd_bwd)}

    for name, d_in, d_out, x in [
        ("linear 384->384 (q,k,v,attn-out)", h, h, x_h),
        ("linear 384->1536 (intermediate)", h, inter, x_h),
        ("linear 1536->384 (output)", inter, h, x_i),
    ]:
        w = torch.randn(d_out, d_in) * 0.02
        bias = torch.zeros(d_out)
        both(name, lambda x, w=w, bias=bias: F.linear(x, w, bias), x)

    # LoRA as PEFT: base(x) + B(A(dropout(x))) * scaling, adapter trainable, dropout 0.1.
    w = torch.randn(h, h) * 0.02
    bias = torch.zeros(h)
    la = (torch.randn(8, h) * 0.02).requires_grad_(True)
    lb = (torch.randn(h, 8) * 0.02).requires_grad_(True)

    def lora(x):
        return F.linear(x, w, bias) + F.linear(F.linear(F.dropout(x, 0.1), la), lb) * 2.0

    both("linear 384->384 + LoRA r8 (q,v)", lora, x_h)
    both("gelu (erf) [16,64,1536]", F.gelu, x_i)
    ln_w, ln_b = torch.ones(h), torch.zeros(h)
    both(
        "residual add + layer norm [16,64,384]",
        lambda x, r: F.layer_norm(x + r, (h,), ln_w, ln_b, 1e-12),
        x_h,
        torch.randn(b, s, h),
    )
    both("layer norm [16,64,384]", lambda x: F.layer_norm(x, (h,), ln_w, ln_b, 1e-12), x_h)
    mask = torch.zeros(b, 1, 1, s)

    def attn(q, k, v):
        split = lambda t: t.view(b, s, heads, h // heads).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return o.transpose(1, 2).reshape(b, s, h)

    both(
        "attention: split heads + sdpa + merge [16,12,64,32]",
        attn,
        torch.randn(b, s, h),
        torch.randn(b, s, h),
        torch.randn(b, s, h),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
