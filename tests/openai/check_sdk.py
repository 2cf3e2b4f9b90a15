#!/usr/bin/env python3
"""Client-compatibility check of `burn-peft serve` with the official OpenAI Python SDK.

Run with the interpreter of scripts/openai-venv.sh (the pinned `openai` package):

    PY=$(scripts/openai-venv.sh)
    "$PY" tests/openai/check_sdk.py --chat-url http://ADDR/v1 --embed-url http://ADDR/v1 \
        --adapter tuned --reference tests/fixtures/chat/smollm2_replies.json

--chat-url: a server of the real SmolLM2-135M-Instruct Q4_1 GGUF (the model of the reference,
tests/fixtures/gen/smollm2_chat.py) with a LoRA adapter named --adapter; --embed-url: a server of
all-MiniLM-L6-v2 (384-dimensional sentence embeddings). Both are addressed through the SDK with
`model="base"` for the base model and `model=<adapter>` for the adapter.

Each check is a named step that prints `ok: <step>`, or `FAIL: <step>: <why>` (stderr); every step
runs even after a failure. Exit status 0 and a final `all N checks passed` when all passed, else 1.
"""

import argparse
import base64
import json
import math
import struct
import sys
import traceback
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[2]
COMPLETION_PROMPT = "The capital of France is"


class CheckFailed(Exception):
    pass


def expect(cond, message):
    if not cond:
        raise CheckFailed(message)


def short(value, limit=300):
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def expect_eq(got, want, what):
    if got != want:
        raise CheckFailed(f"{what}: got {short(got)}, expected {short(want)}")


def expect_api_error(cls, call, what):
    """`call()` must raise the SDK's `cls` with an OpenAI error body {message, type, ...}."""
    try:
        call()
    except cls as e:
        body = e.body
        expect(isinstance(body, dict), f"{what}: error body is not an object: {body!r}")
        expect(isinstance(body.get("message"), str) and body["message"],
               f"{what}: error body has no message: {body!r}")
        expect(isinstance(body.get("type"), str), f"{what}: error body has no type: {body!r}")
        return e
    except openai.APIStatusError as e:
        raise CheckFailed(f"{what}: expected {cls.__name__}, got {type(e).__name__} "
                          f"(HTTP {e.status_code}): {e.body!r}")
    raise CheckFailed(f"{what}: expected {cls.__name__}, but the request succeeded")


class Checks:
    def __init__(self):
        self.passed = []
        self.failed = []

    def run(self, name, fn):
        try:
            fn()
        except CheckFailed as e:
            self.failed.append(name)
            print(f"FAIL: {name}: {e}", file=sys.stderr, flush=True)
        except openai.APIStatusError as e:
            self.failed.append(name)
            print(f"FAIL: {name}: {type(e).__name__} (HTTP {e.status_code}): {e.body!r}",
                  file=sys.stderr, flush=True)
        except openai.APIError as e:  # connection errors, timeouts, malformed responses
            self.failed.append(name)
            cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
            print(f"FAIL: {name}: {type(e).__name__}: {e}{cause}", file=sys.stderr, flush=True)
        except Exception as e:  # SDK-side validation errors, bugs in this script
            self.failed.append(name)
            print(f"FAIL: {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
        else:
            self.passed.append(name)
            print(f"ok: {name}", flush=True)


def expect_reply(got, case, what):
    """`got` must equal transformers' greedy reply; on a mismatch say where the texts part and how
    close transformers' own greedy choices were there (a near-tie can flip with float rounding)."""
    want = case["reply"]
    if got == want:
        return
    got = got or ""
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    margins = case.get("logit_margins") or []
    close = ", ".join(f"token {k}: {m}" for k, m in enumerate(margins) if m < 0.1)
    raise CheckFailed(f"{what}: got {short(got)}, expected {short(want)}; they part at character {at} "
                      f"(common prefix {short(want[:at])})"
                      + (f"; transformers' greedy steps with a logit margin < 0.1: {close}" if close else ""))


def chat_text(resp, what):
    expect(len(resp.choices) == 1, f"{what}: {len(resp.choices)} choices, expected 1")
    return resp.choices[0]


def check_usage(usage, what):
    expect(usage is not None, f"{what}: no usage")
    expect_eq(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens,
              f"{what}: usage.total_tokens (prompt {usage.prompt_tokens} + completion "
              f"{usage.completion_tokens})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chat-url", required=True, help="base URL of the chat server, http://ADDR/v1")
    ap.add_argument("--embed-url", required=True, help="base URL of the embedding server, http://ADDR/v1")
    ap.add_argument("--adapter", default="tuned", help="adapter name on the chat server")
    ap.add_argument("--reference", type=Path,
                    default=REPO / "tests" / "fixtures" / "chat" / "smollm2_replies.json",
                    help="greedy replies of transformers (tests/fixtures/gen/smollm2_chat.py)")
    args = ap.parse_args()

    ref = json.loads(args.reference.read_text())
    cases, max_tokens = ref["cases"], ref["max_tokens"]
    print(f"openai {openai.__version__}; chat {args.chat_url}; embeddings {args.embed_url}; "
          f"adapter {args.adapter!r}; {len(cases)} reference conversations", flush=True)
    chat = openai.OpenAI(base_url=args.chat_url, api_key="unused", max_retries=0, timeout=120)
    emb = openai.OpenAI(base_url=args.embed_url, api_key="unused", max_retries=0, timeout=120)
    adapter = args.adapter
    checks = Checks()

    # --- models ---------------------------------------------------------------------------------
    def models_list():
        ids = [m.id for m in chat.models.list()]
        for want in ("base", adapter):
            expect(want in ids, f"models.list() ids {ids} lack {want!r}")
    checks.run("models.list has base and the adapter", models_list)

    # --- completions ----------------------------------------------------------------------------
    def greedy_completion():
        r = chat.completions.create(model=adapter, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0)
        expect(len(r.choices) == 1, f"{len(r.choices)} choices, expected 1")
        return r

    def completion():
        r = greedy_completion()
        c = r.choices[0]
        expect(isinstance(c.text, str) and c.text != "", f"empty text: {c.text!r}")
        expect(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
        check_usage(r.usage, "completion")
        expect(r.usage.completion_tokens > 0, f"usage.completion_tokens {r.usage.completion_tokens}")
        expect(r.usage.completion_tokens <= 8, f"usage.completion_tokens {r.usage.completion_tokens} > max_tokens 8")
        if c.finish_reason == "length":
            expect_eq(r.usage.completion_tokens, 8, "usage.completion_tokens with finish_reason length")
        print(f"   completion {c.text!r} ({c.finish_reason})", flush=True)
    checks.run("completion (adapter, greedy)", completion)

    def completion_stream():
        want = greedy_completion().choices[0]
        pieces, finishes = [], []
        for chunk in chat.completions.create(model=adapter, prompt=COMPLETION_PROMPT, max_tokens=8,
                                             temperature=0, stream=True):
            for c in chunk.choices:
                pieces.append(c.text or "")
                if c.finish_reason is not None:
                    finishes.append(c.finish_reason)
        expect_eq("".join(pieces), want.text, "joined streamed text vs the non-streamed text")
        expect_eq(finishes, [want.finish_reason], "finish_reasons in the stream")
    checks.run("completion streaming equals non-streamed", completion_stream)

    def completion_seed():
        def sample():
            r = chat.completions.create(model="base", prompt=COMPLETION_PROMPT, max_tokens=8,
                                        temperature=0.9, top_p=0.95, seed=1234)
            return r.choices[0].text
        a, b = sample(), sample()
        expect_eq(b, a, "second sample with the same seed")
    checks.run("completion sampling with a seed is reproducible", completion_seed)

    # --- chat against the reference -------------------------------------------------------------
    def chat_reference(case):
        def step():
            r = chat.chat.completions.create(model="base", messages=case["messages"],
                                             max_tokens=max_tokens, temperature=0)
            c = chat_text(r, "chat")
            expect_eq(c.message.role, "assistant", "message.role")
            expect_reply(c.message.content, case, "message.content vs transformers' reply")
            expect_eq(c.finish_reason, case["finish_reason"], "finish_reason")
            check_usage(r.usage, "chat")
            expect_eq(r.usage.prompt_tokens, case["prompt_tokens"], "usage.prompt_tokens (templated prompt)")
            n = len(case["reply_ids"])
            if case["finish_reason"] == "length":
                expect_eq(r.usage.completion_tokens, max_tokens, "usage.completion_tokens")
            else:  # whether the eos counts differs between servers
                expect(r.usage.completion_tokens in (n, n + 1),
                       f"usage.completion_tokens {r.usage.completion_tokens}, expected {n} or {n + 1}")
        return step

    def chat_stream(case):
        def step():
            chunks = list(chat.chat.completions.create(
                model="base", messages=case["messages"], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}))
            expect(len(chunks) >= 3, f"only {len(chunks)} chunks")
            first = chunks[0]
            expect(first.choices, "the first chunk has no choices")
            expect_eq(first.choices[0].delta.role, "assistant", "the first chunk's delta.role")
            last = chunks[-1]
            expect_eq(last.choices, [], "the last (usage) chunk's choices")
            expect(last.usage is not None, "the last chunk has no usage")
            check_usage(last.usage, "stream usage")
            expect_eq(last.usage.prompt_tokens, case["prompt_tokens"], "the last chunk's usage.prompt_tokens")
            for i, ch in enumerate(chunks[:-1]):
                expect(ch.usage is None, f"chunk {i} (not the last) carries usage {ch.usage}")
            text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
            expect_reply(text, case, "joined delta.content vs transformers' reply")
            finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason is not None]
            expect_eq(finishes, [case["finish_reason"]], "finish_reasons in the stream")
            ids = {ch.id for ch in chunks}
            expect(len(ids) == 1, f"chunks carry several ids: {sorted(ids)}")
        return step

    for i, case in enumerate(cases):
        checks.run(f"chat reference {i} ({case['finish_reason']})", chat_reference(case))
        checks.run(f"chat streaming reference {i} with include_usage", chat_stream(case))

    def chat_max_completion_tokens():
        case = max(cases, key=lambda c: len(c["reply_ids"]))
        n = max(1, min(max_tokens // 3, len(case["reply_ids"]) - 1))
        r = chat.chat.completions.create(model="base", messages=case["messages"],
                                         max_completion_tokens=n, temperature=0)
        c = chat_text(r, "chat")
        expect_eq(c.finish_reason, "length", f"finish_reason with max_completion_tokens={n}")
        expect_eq(r.usage.completion_tokens, n, "usage.completion_tokens")
        expect(c.message.content and case["reply"].startswith(c.message.content),
               f"content {c.message.content!r} is not a non-empty prefix of the reference reply {case['reply']!r}")
    checks.run("chat max_completion_tokens", chat_max_completion_tokens)

    def chat_stop():
        case = cases[0]
        words = case["reply"].split()
        stop = words[len(words) // 2] if len(words) > 1 else words[0]
        want = case["reply"][:case["reply"].index(stop)]
        r = chat.chat.completions.create(model="base", messages=case["messages"], max_tokens=max_tokens,
                                         temperature=0, stop=[stop])
        c = chat_text(r, "chat")
        expect_eq(c.message.content, want, f"content with stop={[stop]!r}")
        expect_eq(c.finish_reason, "stop", "finish_reason")
    checks.run("chat stop sequence", chat_stop)

    def chat_adapter():
        r = chat.chat.completions.create(model=adapter, messages=cases[0]["messages"],
                                         max_tokens=max_tokens, temperature=0)
        c = chat_text(r, "chat")
        expect_eq(c.message.role, "assistant", "message.role")
        expect(c.message.content or c.finish_reason == "length",
               f"empty reply with finish_reason {c.finish_reason!r}")
        expect(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
        check_usage(r.usage, "chat")
        print(f"   adapter reply {c.message.content!r} ({c.finish_reason})", flush=True)
    checks.run("chat with the adapter", chat_adapter)

    # --- embeddings -----------------------------------------------------------------------------
    sentences = ["a sentence", "another one"]

    def embeddings():
        ids = [m.id for m in emb.models.list()]
        expect("base" in ids, f"embedding server's models.list() ids {ids} lack 'base'")
        raw = emb.embeddings.with_raw_response.create(model="base", input=sentences)
        sent = json.loads(raw.http_request.content)
        expect_eq(sent.get("encoding_format"), "base64", "the SDK's default encoding_format")
        wire = raw.http_response.json()["data"]
        expect(all(isinstance(d["embedding"], str) for d in wire),
               "the server did not answer base64 strings to encoding_format=base64")
        default = raw.parse()
        expect_eq(len(default.data), 2, "number of embeddings")
        expect_eq([d.index for d in default.data], [0, 1], "embedding indices")
        for d, w in zip(default.data, wire):
            expect_eq(len(d.embedding), 384, "embedding length")
            expect(all(math.isfinite(x) for x in d.embedding), f"embedding {d.index} has non-finite values")
            norm = math.sqrt(sum(x * x for x in d.embedding))
            expect(abs(norm - 1.0) < 1e-3, f"embedding {d.index} has L2 norm {norm}")
            expect(struct.pack("<384f", *d.embedding) == base64.b64decode(w["embedding"]),
                   f"embedding {d.index}: the SDK's decoding differs from the little-endian f32 bytes sent")
        expect(default.data[0].embedding != default.data[1].embedding, "both sentences got the same vector")
        floats = emb.embeddings.create(model="base", input=sentences, encoding_format="float")
        expect_eq(len(floats.data), 2, "number of float embeddings")
        for a, b in zip(default.data, floats.data):
            expect(all(isinstance(x, (int, float)) for x in b.embedding), "encoding_format=float gave non-floats")
            expect_eq(len(b.embedding), 384, "float embedding length")
            diff = max(abs(x - y) for x, y in zip(a.embedding, b.embedding))
            expect(diff < 1e-6, f"base64 and float embeddings {a.index} differ by {diff}")
    checks.run("embeddings base64 (SDK default) and float", embeddings)

    # --- errors ---------------------------------------------------------------------------------
    msgs = cases[0]["messages"]
    checks.run("unknown model is NotFoundError", lambda: expect_api_error(
        openai.NotFoundError, lambda: chat.chat.completions.create(
            model="no-such-adapter", messages=msgs, max_tokens=4), "model=no-such-adapter"))
    checks.run("temperature -1 is BadRequestError", lambda: expect_api_error(
        openai.BadRequestError, lambda: chat.chat.completions.create(
            model="base", messages=msgs, max_tokens=4, temperature=-1), "temperature=-1"))

    def empty_messages():
        try:
            expect_api_error(openai.BadRequestError, lambda: chat.chat.completions.create(
                model="base", messages=[], max_tokens=4), "messages=[]")
        except (TypeError, ValueError) as e:  # refused by the SDK before sending
            print(f"   the SDK refused messages=[] itself: {e}", flush=True)
    checks.run("empty messages is BadRequestError", empty_messages)
    checks.run("completion max_tokens 0 is BadRequestError", lambda: expect_api_error(
        openai.BadRequestError, lambda: chat.completions.create(
            model="base", prompt=COMPLETION_PROMPT, max_tokens=0), "max_tokens=0"))

    n = len(checks.passed) + len(checks.failed)
    if checks.failed:
        print(f"{len(checks.failed)} of {n} checks failed: {', '.join(checks.failed)}", file=sys.stderr)
        sys.exit(1)
    print(f"all {n} checks passed")


if __name__ == "__main__":
    main()
