#!/usr/bin/env python3
"""Build the chat version of `debian_sections` (examples/data/chat/).

Each record of the parent dataset (examples/data/{train,eval,test}.jsonl,
`{"text", "label"}`) becomes a two-turn conversation:

    {"messages": [{"role": "user", "content": PROMPT},
                  {"role": "assistant", "content": LABEL}]}

where

    PROMPT = QUESTION + "\\n\\n" + description
    QUESTION = "Which Debian archive section does this package belong to: admin, fonts, "
               "games, graphics, net, science, sound or text? Answer with the section name only."

`description` is the record's `text` cut to at most MAX_DESC_CHARS (500)
characters at a word boundary: if the text is longer, it is cut before the
last space at or before character 500 and trailing whitespace is removed (no
ellipsis is added). A text without any space in its first 500 characters would
be cut hard at 500 (none of the records needs this). LABEL is the record's
`label`, one of the 8 section names, unchanged.

Only the first rows of each parent split are used, in file order (the parent
files are already in a seeded random order): train 480, eval 64, test 200.
Output: examples/data/chat/{train,eval,test}.jsonl, one JSON object per line,
`ensure_ascii=False`, UTF-8, "\\n" line ends. No randomness: running it twice
gives byte-identical files.

Usage (from anywhere; needs only the Python standard library):

    python3 examples/data/gen/chat_debian.py
    python3 examples/data/gen/chat_debian.py --stats GGUF_FILE   # also token lengths

`--stats` (needs `transformers` and `gguf`) loads the tokenizer from the given
GGUF file (e.g. ~/.cache/burn-peft/models/SmolLM2-135M-Instruct.Q4_1.gguf)
and prints the token lengths of the conversations rendered with its chat
template (`apply_chat_template(messages, tokenize=True)`; SmolLM2's template
adds its default system message), plus the number of rows over `--max-length`.
"""

import argparse
import json
import os
import statistics
import sys

QUESTION = (
    "Which Debian archive section does this package belong to: admin, fonts, games, "
    "graphics, net, science, sound or text? Answer with the section name only."
)
MAX_DESC_CHARS = 500
SPLITS = [("train", 480), ("eval", 64), ("test", 200)]

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.dirname(HERE)  # examples/data
OUT_DIR = os.path.join(DATA_DIR, "chat")


def cut_words(text, limit=MAX_DESC_CHARS):
    """`text` if it has at most `limit` characters, else its longest prefix of whole words
    (cut at a space) within `limit` characters, without trailing whitespace."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]  # the character after the limit tells whether a word ends there
    if head[limit] == " ":
        return head[:limit].rstrip()
    space = head.rfind(" ", 0, limit)
    if space <= 0:
        return text[:limit]
    return head[:space].rstrip()


def conversation(row):
    prompt = QUESTION + "\n\n" + cut_words(row["text"])
    return {"messages": [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": row["label"]},
    ]}


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build(out_dir):
    out = {}
    os.makedirs(out_dir, exist_ok=True)
    for name, n in SPLITS:
        rows = read_jsonl(os.path.join(DATA_DIR, f"{name}.jsonl"))
        if len(rows) < n:
            sys.exit(f"{name}.jsonl has {len(rows)} rows, need {n}")
        convs = [conversation(r) for r in rows[:n]]
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8",
                  newline="\n") as fh:
            for c in convs:
                fh.write(json.dumps(c, ensure_ascii=False) + "\n")
        cut = sum(1 for r in rows[:n] if len(r["text"]) > MAX_DESC_CHARS)
        labels = {}
        for c in convs:
            lab = c["messages"][1]["content"]
            labels[lab] = labels.get(lab, 0) + 1
        print(f"{name}: {len(convs)} conversations ({cut} descriptions cut to "
              f"<= {MAX_DESC_CHARS} chars); labels "
              + ", ".join(f"{k} {labels[k]}" for k in sorted(labels)))
        out[name] = convs
    return out


def stats(convs_by_split, gguf_file, max_length):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    gguf_file = os.path.expanduser(gguf_file)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_file)),
                                        gguf_file=os.path.basename(gguf_file))

    def ids_of(messages):
        r = tok.apply_chat_template(messages, tokenize=True)
        return list(r["input_ids"] if hasattr(r, "keys") else r)

    every = []
    for name, convs in convs_by_split.items():
        lens = [len(ids_of(c["messages"])) for c in convs]
        every += lens
        over = sum(1 for x in lens if x > max_length)
        print(f"{name}: tokens min {min(lens)}, median {statistics.median(lens):g}, "
              f"mean {statistics.mean(lens):.1f}, max {max(lens)}; over {max_length}: {over}")
    print(f"all: median {statistics.median(every):g}, max {max(every)}, "
          f"over {max_length}: {sum(1 for x in every if x > max_length)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--stats", metavar="GGUF_FILE",
                    help="print token lengths with this GGUF file's tokenizer and chat template")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    convs = build(args.out_dir)
    if args.stats:
        stats(convs, args.stats, args.max_length)


if __name__ == "__main__":
    main()
