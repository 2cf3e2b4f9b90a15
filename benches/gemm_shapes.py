"""PyTorch's GEMM at the shapes of an all-MiniLM-L6-v2 step, next to the `gemm` crate's
(`cargo bench --bench gemm_shapes`). Same operands and layouts: `W` stored
`[in, out]`, transposed operands as strided views.

    python3 benches/gemm_shapes.py --threads 2
"""

import argparse
import statistics
import time

import torch

SHAPES = [
    ("fwd  x[1024,384]·W[384,1536]", 1024, 384, 1536, False, False),
    ("fwd  x[1024,1536]·W[1536,384]", 1024, 1536, 384, False, False),
    ("fwd  x[1024,384]·W[384,384]", 1024, 384, 384, False, False),
    ("dX   g[1024,1536]·Wᵀ (W[384,1536])", 1024, 1536, 384, False, True),
    ("dX   g[1024,384]·Wᵀ (W[1536,384])", 1024, 384, 1536, False, True),
    ("dX   g[1024,384]·Wᵀ (W[384,384])", 1024, 384, 384, False, True),
    ("dW   xᵀ·g (x[1024,384], g[1024,1536])", 384, 1024, 1536, True, False),
    ("dW   xᵀ·g (x[1024,1536], g[1024,384])", 1536, 1024, 384, True, False),
    ("dW   xᵀ·g (x[1024,384], g[1024,384])", 384, 1024, 384, True, False),
]

# A LoRA step at SmolLM2-135M's shape (`--set llm`, as `GEMM_SET=llm` for the Rust side).
LLM_SHAPES = [
    ("fwd  x[256,576]·W[576,576] (q, o)", 256, 576, 576, False, False),
    ("fwd  x[256,576]·W[576,192] (k, v)", 256, 576, 192, False, False),
    ("fwd  x[256,576]·W[576,1536] (gate, up)", 256, 576, 1536, False, False),
    ("fwd  x[256,1536]·W[1536,576] (down)", 256, 1536, 576, False, False),
    ("fwd  x[256,576]·Eᵀ (head, E[49152,576])", 256, 576, 49152, False, True),
    ("dX   g[256,576]·Wᵀ (W[576,576])", 256, 576, 576, False, True),
    ("dX   g[256,192]·Wᵀ (W[576,192])", 256, 192, 576, False, True),
    ("dX   g[256,1536]·Wᵀ (W[576,1536])", 256, 1536, 576, False, True),
    ("dX   g[256,576]·Wᵀ (W[1536,576])", 256, 576, 1536, False, True),
    ("dX   g[256,49152]·E (head)", 256, 49152, 576, False, False),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--set", choices=["minilm", "llm"], default="minilm")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, f32, {a.threads} thread(s), median of {a.iters}")
    with torch.no_grad():
        for name, m, k, n, lhs_t, rhs_t in LLM_SHAPES if a.set == "llm" else SHAPES:
            lhs = torch.randn(k, m).t() if lhs_t else torch.randn(m, k)
            rhs = torch.randn(n, k).t() if rhs_t else torch.randn(k, n)
            out = torch.empty(m, n)
            times = []
            for i in range(a.iters + 3):
                t = time.perf_counter()
                torch.matmul(lhs, rhs, out=out)
                if i >= 3:
                    times.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(times)
            print(f"{name:<42} {ms:>8.3f} ms {2 * m * n * k / ms / 1e6:>7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
