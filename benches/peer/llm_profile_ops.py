#!/usr/bin/env python3
"""PyTorch + PEFT side of benches/llm_profile.rs: the ops of a LoRA training step at
SmolLM2-135M's shape (batch 2 x 128, hidden 576, GQA 9/3 heads of 64, MLP 1536, vocabulary
49,152, tied head; LoRA r 16 / alpha 32 / no dropout), each alone, then the real step.

  python3 benches/peer/llm_profile_ops.py [--threads 2] [--iters 10] [--steps 6] [--rounds 3]

Same ops, shapes and measurement as `profile_ops` in llm_profile.rs: best of `--rounds` rounds
over the op list of at least `--iters` runs each (small ops: as many as fit in 0.5 s), forward
only under no_grad, and forward + backward of the output's sum with the inputs requiring a
gradient and frozen weights. Each op is what transformers' Llama runs: `F.linear` (PEFT's
`lora.Linear` on the LoRA rows), `LlamaRMSNorm`, `rotate_half` RoPE on the split-heads view,
`sdpa_attention_forward` (causal, no mask, as an all-ones attention mask gives),
`silu(gate) * up`, the tied head and `ForCausalLMLoss`. The step: `LlamaForCausalLM` of that
shape (random init), PEFT LoRA on q_proj, v_proj, AdamW (lr 1e-4, weight decay 0.01),
clipping at 1.0; one warm-up step, then `--steps` timed, spread over the rounds of ops, each
phase (forward + loss, backward, clip, AdamW + zero_grad) best of the steps.

Prints one JSON object: {"ops": {key: {"fwd": ms, "fwd_bwd": ms}}, "step": {...}, "versions"}.
"""

import argparse
import json
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

B, S, H, HEADS, KV, HD, INTER, VOCAB = 2, 128, 576, 9, 3, 64, 1536, 49152
SMOLLM2 = dict(
    vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=30,
    num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=1, eos_token_id=2,
)
# key, in, out, LoRA (the keys of llm_profile.rs's LINEARS)
LINEARS = [
    ("q_lora", H, H, True), ("v_lora", H, KV * HD, True), ("k", H, KV * HD, False),
    ("o", H, H, False), ("gate_up", H, INTER, False), ("down", INTER, H, False),
    ("k_lora", H, KV * HD, True), ("o_lora", H, H, True), ("gate_up_lora", H, INTER, True),
    ("down_lora", INTER, H, True),
]


def timed(iters, f):
    """Best of at least `iters` runs, and of as many more as fit in 0.5 s (at most 200): other
    load on the machine only adds time, and small ops get many draws."""
    for _ in range(2):
        f()
    v = []
    start = time.perf_counter()
    while len(v) < iters or (time.perf_counter() - start < 0.5 and len(v) < 200):
        t = time.perf_counter()
        f()
        v.append((time.perf_counter() - t) * 1e3)
    return min(v)


def lora_config(targets):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)


def ops(iters):
    from peft import get_peft_model
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

    out = {}

    def both(key, op, *inputs):
        def fwd():
            with torch.no_grad():
                op(*inputs)

        def fwd_bwd():
            xs = [x.clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
            op(*xs).sum().backward()

        out[key] = {"fwd": timed(iters, fwd), "fwd_bwd": timed(iters, fwd_bwd)}

    x_h, x_i = torch.randn(B, S, H), torch.randn(B, S, INTER)
    for key, d_in, d_out, lora in LINEARS:
        x = x_h if d_in == H else x_i
        if lora:
            one = nn.Module()
            one.proj = nn.Linear(d_in, d_out, bias=False)
            layer = get_peft_model(one, lora_config(["proj"])).base_model.model.proj
            layer.train()
            both(key, layer, x)
        else:
            w = (torch.randn(d_out, d_in) * 0.02).requires_grad_(False)
            both(key, lambda x, w=w: F.linear(x, w), x)

    norm = LlamaRMSNorm(H, eps=1e-5).requires_grad_(False)
    both("rms_norm", norm, x_h)

    # RoPE on the split-heads view of a projection, cos/sin [b, 1, s, d] as transformers'.
    inv = 1.0 / (100000.0 ** (torch.arange(0, HD, 2).float() / HD))
    freqs = torch.outer(torch.arange(S).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos()[None].expand(B, S, HD).unsqueeze(1)
    sin = emb.sin()[None].expand(B, S, HD).unsqueeze(1)

    def rope(x, heads):
        x = x.view(B, S, heads, HD).transpose(1, 2)
        return x * cos + rotate_half(x) * sin

    both("rope_q", lambda x: rope(x, HEADS), torch.randn(B, S, HEADS * HD))
    both("rope_k", lambda x: rope(x, KV), torch.randn(B, S, KV * HD))

    module = SimpleNamespace(num_key_value_groups=HEADS // KV, is_causal=True, training=True)

    def attention(q, k, v3):
        v = v3.view(B, S, KV, HD).transpose(1, 2)
        o, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=HD**-0.5)
        return o.reshape(B, S, -1).contiguous()

    both("attention", attention, torch.randn(B, HEADS, S, HD), torch.randn(B, KV, S, HD),
         torch.randn(B, S, KV * HD))
    both("swiglu", lambda g, u: F.silu(g) * u, x_i, torch.randn(B, S, INTER))
    both("residual", lambda a, b: a + b, x_h, torch.randn(B, S, H))

    # The frozen table: no gradient flows into it, so both columns time the lookup.
    table = torch.randn(VOCAB, H) * 0.02
    ids = torch.randint(0, VOCAB, (B, S))
    look = timed(iters, lambda: F.embedding(ids, table))
    out["embedding"] = {"fwd": look, "fwd_bwd": look}
    both("lm_head_ce", lambda h: ForCausalLMLoss(F.linear(h, table), ids, VOCAB), x_h)
    return out


def stepper():
    """The real step, warmed up: `one(seed)` runs a step and returns its phases in ms."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    model = get_peft_model(model, lora_config(["q_proj", "v_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def one(seed):
        ids = torch.tensor([(i * 7919 + seed * 104729) % VOCAB for i in range(B * S)]).view(B, S)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return [(b - a) * 1e3 for a, b in [(t0, t4), (t0, t1), (t1, t2), (t2, t3), (t3, t4)]]

    one(0)
    return one


def summary(runs):
    best = [min(r[i] for r in runs) for i in range(5)]
    return {"step_ms": best[0], "forward_loss_ms": best[1], "backward_ms": best[2],
            "clip_ms": best[3], "optim_ms": best[4], "steps_ms": [r[0] for r in runs]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # Rounds over the whole op list, the best of each op kept (as llm_profile.rs does), each
    # followed by its share of the real steps: PyTorch's threads stall whenever another
    # process takes a core, so samples spread over the run catch the quiet moments.
    one, best, runs = stepper(), {}, []
    for r in range(a.rounds):
        for key, again in ops(a.iters).items():
            best[key] = {k: min(v, best.get(key, again)[k]) for k, v in again.items()}
        while len(runs) < a.steps * (r + 1) // a.rounds:
            runs.append(one(len(runs) + 1))
    result = {"ops": best, "step": summary(runs)}
    import peft
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
