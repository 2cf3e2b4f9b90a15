#!/usr/bin/env python3
"""Build the `debian_sections` text-classification dataset.

Debian package descriptions (synopsis + extended description) labelled with
the package's archive section, for 8 sections with distinct subjects.

Usage (from the repository root, on a Debian machine):

    apt-get update -o Acquire::Languages=en     # once; needs root
    python3 examples/data/gen/debian_sections.py [--baselines]

Pipeline (deterministic for a given apt list state):

1. `apt-cache dumpavail` gives one stanza per available package with
   Package, Section, Description and Description-md5.  Since Debian 6 the
   Packages index only carries the one-line synopsis; the extended
   description lives in the `Translation-en` index and is joined through
   `Description-md5` (exactly what `apt-cache show` does).  The Translation-en
   files are located with `apt-get indextargets -o Acquire::Languages=en` and
   decompressed with `/usr/lib/apt/apt-helper cat-file`.  If a package has no
   Translation-en entry, its Packages-file description is used as is.
2. Text = synopsis + extended description lines; lines that are just "."
   (paragraph separators) are dropped; everything is joined with spaces and
   whitespace collapsed.  The package name is NOT part of the text.
3. Section: component prefix stripped ("contrib/games" -> "games").
4. Filters, in this order: section in KEEP_SECTIONS; package name does not end
   with one of DROP_SUFFIXES; description does not mention "transitional" or
   "dummy package" (case-insensitive); text (before truncation) is at least
   MIN_CHARS characters; text truncated to MAX_CHARS characters; duplicates
   of the (truncated) text are removed: the first package in name order is
   kept, and a text that occurs under two different sections is dropped
   entirely (ambiguous label).
5. Source cap: per section, binaries are grouped by source package (the
   `Source:` field, else the package name); groups larger than
   MAX_PER_SOURCE keep a seeded random MAX_PER_SOURCE of them.  Template
   families (tesseract-ocr-*, freedict-*, hunspell-*, fonts-tlwg-*) would
   otherwise dominate some classes and leak near-identical texts across splits.
   Balance: then `rng.sample(candidates, N)` per section (or all if fewer),
   rng = random.Random(13), sections processed in KEEP_SECTIONS order.
6. Split per section, grouped by source package so siblings never straddle
   splits: source packages in seeded random order fill train up to
   round(0.70 n), then eval up to round(0.15 n), the rest goes to test.  Each
   split file is then shuffled with the same rng (train, eval, test order).
7. Output examples/data/{train,eval,test}.jsonl with {"text", "label"} per
   line (ensure_ascii=False) and examples/data/debian_sections.json with the
   provenance (command, date, release, counts, filters, licence, and the
   package name of every record, in file order).

`--baselines` additionally fits a majority-class baseline and a TF-IDF +
LogisticRegression baseline (scikit-learn) and records the accuracies in the
provenance file.
"""

import argparse
import collections
import datetime
import glob
import json
import os
import random
import re
import subprocess
import sys

SEED = 13
KEEP_SECTIONS = ["games", "science", "sound", "graphics", "net", "text", "fonts", "admin"]
DROP_SUFFIXES = ["-dbg", "-dbgsym", "-doc", "-dev", "-data", "-common"]
DROP_PATTERNS = ["transitional", "dummy package"]
MIN_CHARS = 40
MAX_CHARS = 1000
PER_SECTION = 560
MAX_PER_SOURCE = 2  # binaries kept per (source package, section)
SPLITS = [("train", 0.70), ("eval", 0.15), ("test", 0.15)]

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.dirname(HERE)  # examples/data
APT_HELPER = "/usr/lib/apt/apt-helper"


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def parse_deb822(text):
    """Yield dicts of field -> raw value (continuation lines joined with \n)."""
    for block in re.split(r"\n\s*\n", text):
        fields = {}
        key = None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t":
                if key is not None:
                    fields[key] += "\n" + line
                continue
            if ":" not in line:
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if fields:
            yield fields


def description_to_text(raw):
    """Synopsis + extended description -> one line of plain text."""
    lines = raw.split("\n")
    parts = [lines[0].strip()]
    for line in lines[1:]:
        s = line.strip()
        if s == ".":  # paragraph separator
            continue
        parts.append(s)
    return re.sub(r"\s+", " ", " ".join(parts)).strip()


def load_translations():
    files = run(
        [
            "apt-get",
            "indextargets",
            "-o",
            "Acquire::Languages=en",
            "--format",
            "$(FILENAME)",
            "Identifier: Translations",
            "Language: en",
        ]
    ).split()
    files = [f for f in files if os.path.exists(f)]
    if not files:
        sys.exit(
            "no Translation-en index found; run `apt-get update -o Acquire::Languages=en` "
            "first (or pass --apt-update)"
        )
    by_md5 = {}
    for f in files:
        for st in parse_deb822(run([APT_HELPER, "cat-file", f])):
            md5 = st.get("Description-md5")
            desc = st.get("Description-en")
            if md5 and desc and md5 not in by_md5:
                by_md5[md5] = desc
    return files, by_md5


def release_info():
    info = {}
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                k, _, v = line.strip().partition("=")
                if k in ("PRETTY_NAME", "VERSION_ID", "VERSION_CODENAME"):
                    info[k] = v.strip('"')
    except OSError:
        pass
    policy = run(["apt-cache", "policy"])
    info["apt_cache_policy"] = [
        " ".join(l.split())
        for l in policy.splitlines()
        if ("release " in l or "origin " in l or "://" in l) and "a=now" not in l
    ]
    # Date: field of every InRelease/Release file = archive snapshot time.
    dates = {}
    for f in sorted(glob.glob("/var/lib/apt/lists/*InRelease") + glob.glob("/var/lib/apt/lists/*_Release")):
        with open(f, errors="replace") as fh:
            for line in fh:
                if line.startswith("Date:"):
                    dates[os.path.basename(f)] = line.split(":", 1)[1].strip()
                    break
    info["release_file_dates"] = dates
    return info


def build(per_section):
    dump = run(["apt-cache", "dumpavail"])
    stanzas = list(parse_deb822(dump))
    trans_files, by_md5 = load_translations()

    stats = collections.Counter()
    stats["stanzas_read"] = len(stanzas)
    cand = {}  # text -> (pkg, section, source) of first occurrence, or None if conflicting
    seen_pkg = set()
    for st in sorted(stanzas, key=lambda s: s.get("Package", "")):
        pkg = st.get("Package")
        if not pkg or pkg in seen_pkg:
            stats["dropped_repeated_package"] += 1
            continue
        seen_pkg.add(pkg)
        section = st.get("Section", "").split("/")[-1]
        if section not in KEEP_SECTIONS:
            stats["dropped_other_section"] += 1
            continue
        stats["in_kept_sections"] += 1
        if any(pkg.endswith(s) for s in DROP_SUFFIXES):
            stats["dropped_name_suffix"] += 1
            continue
        raw = st.get("Description", "")
        md5 = st.get("Description-md5")
        if "\n" not in raw and md5 in by_md5:
            raw = by_md5[md5]
            stats["long_description_from_translation"] += 1
        elif "\n" not in raw:
            stats["synopsis_only"] += 1
        text = description_to_text(raw)
        low = text.lower()
        if any(p in low for p in DROP_PATTERNS):
            stats["dropped_transitional_dummy"] += 1
            continue
        if len(text) < MIN_CHARS:
            stats["dropped_too_short"] += 1
            continue
        if len(text) > MAX_CHARS:
            stats["truncated"] += 1
        text = text[:MAX_CHARS]
        if text in cand:
            prev = cand[text]
            if prev is not None and prev[1] != section:
                cand[text] = None
                stats["dropped_label_conflict"] += 2
            elif prev is None:
                stats["dropped_label_conflict"] += 1
            else:
                stats["dropped_duplicate_text"] += 1
            continue
        source = (st.get("Source") or pkg).split()[0]
        cand[text] = (pkg, section, source)
        comp = [c for c in ("main", "contrib", "non-free", "non-free-firmware")
                if f"/{c}/" in "/" + st.get("Filename", "") + "/"]
        stats[f"component_{(comp or ['unknown'])[0]}"] += 1

    # section -> source package -> [(pkg, text)]
    by_section = {s: collections.defaultdict(list) for s in KEEP_SECTIONS}
    for text, v in cand.items():
        if v is not None:
            by_section[v[1]][v[2]].append((v[0], text))
    available = {s: sum(len(v) for v in g.values()) for s, g in by_section.items()}

    rng = random.Random(SEED)
    # Cap binaries per source package (template families such as
    # tesseract-ocr-*, freedict-*, hunspell-* would otherwise dominate).
    capped = {}
    for s in KEEP_SECTIONS:
        items = []
        for source in sorted(by_section[s]):
            group = sorted(by_section[s][source])
            if len(group) > MAX_PER_SOURCE:
                stats["dropped_source_cap"] += len(group) - MAX_PER_SOURCE
                group = sorted(rng.sample(group, MAX_PER_SOURCE))
            items.extend((pkg, text, source) for pkg, text in group)
        capped[s] = items
    available_capped = {s: len(v) for s, v in capped.items()}

    splits = {name: [] for name, _ in SPLITS}
    for s in KEEP_SECTIONS:
        items = capped[s]
        chosen = rng.sample(items, per_section) if len(items) > per_section else items
        # Group split: all sampled binaries of one source package go to the
        # same split, so sibling packages with near-identical descriptions do
        # not leak between train and eval/test.
        groups = collections.defaultdict(list)
        for pkg, text, source in sorted(chosen):
            groups[source].append((pkg, text))
        order = sorted(groups)
        rng.shuffle(order)
        n = len(chosen)
        n_train = round(SPLITS[0][1] * n)
        n_eval = round(SPLITS[1][1] * n)
        tr, ev, te = [], [], []
        for source in order:
            g = groups[source]
            if len(tr) + len(g) <= n_train:
                tr.extend(g)
            elif len(ev) + len(g) <= n_eval:
                ev.extend(g)
            else:
                te.extend(g)
        for name, part in (("train", tr), ("eval", ev), ("test", te)):
            splits[name].extend((pkg, text, s) for pkg, text in part)
    for name, _ in SPLITS:
        rng.shuffle(splits[name])
    return stanzas, trans_files, stats, {"after_filters": available, "after_source_cap": available_capped}, splits


def baselines(splits):
    import sklearn
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    tr_x = [t for _, t, _ in splits["train"]]
    tr_y = [l for _, _, l in splits["train"]]
    counts = collections.Counter(tr_y)
    majority = sorted(counts, key=lambda l: (-counts[l], l))[0]
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(vec.fit_transform(tr_x), tr_y)
    out = {
        "sklearn_version": sklearn.__version__,
        "majority_label_from_train": majority,
        "tfidf_logreg": "TfidfVectorizer(ngram_range=(1,2), sublinear_tf=True, min_df=2) + "
        "LogisticRegression(C=10.0, max_iter=2000), fit on train",
    }
    for name in ("eval", "test"):
        xs = [t for _, t, _ in splits[name]]
        ys = [l for _, _, l in splits[name]]
        pred = clf.predict(vec.transform(xs))
        out[f"majority_acc_{name}"] = round(sum(y == majority for y in ys) / len(ys), 4)
        out[f"tfidf_logreg_acc_{name}"] = round(sum(p == y for p, y in zip(pred, ys)) / len(ys), 4)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-section", type=int, default=PER_SECTION)
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--apt-update", action="store_true",
                    help="run `apt-get update -o Acquire::Languages=en` first (root)")
    ap.add_argument("--baselines", action="store_true", help="compute scikit-learn baselines")
    args = ap.parse_args()

    if args.apt_update:
        subprocess.run(["apt-get", "update", "-o", "Acquire::Languages=en"], check=True)

    stanzas, trans_files, stats, available, splits = build(args.per_section)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, _ in SPLITS:
        with open(os.path.join(args.out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as fh:
            for _, text, label in splits[name]:
                fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")

    per_split = {
        name: {s: sum(1 for _, _, l in splits[name] if l == s) for s in KEEP_SECTIONS}
        for name, _ in SPLITS
    }
    prov = {
        "name": "debian_sections",
        "description": "Debian package descriptions (synopsis + extended description) labelled "
        "with their archive section; 8 classes.",
        "generator": "python3 examples/data/gen/debian_sections.py",
        "commands": [
            "apt-get update -o Acquire::Languages=en",
            "apt-cache dumpavail",
            "apt-get indextargets -o Acquire::Languages=en --format '$(FILENAME)' "
            "'Identifier: Translations' 'Language: en'",
            "/usr/lib/apt/apt-helper cat-file <Translation-en file>",
        ],
        "generated_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "release": release_info(),
        "apt_version": run(["apt-cache", "--version"]).splitlines()[0],
        "translation_files": [os.path.basename(f) for f in trans_files],
        "stanzas_read": len(stanzas),
        "filter_stats": dict(sorted(stats.items())),
        "available_per_section": available,
        "max_binaries_per_source_package": MAX_PER_SOURCE,
        "per_section_cap": args.per_section,
        "counts": per_split,
        "totals": {name: len(splits[name]) for name, _ in SPLITS},
        "labels": KEEP_SECTIONS,
        "filters": {
            "sections": KEEP_SECTIONS,
            "section_component_prefix_stripped": True,
            "drop_package_name_suffixes": DROP_SUFFIXES,
            "drop_if_description_contains_case_insensitive": DROP_PATTERNS,
            "min_chars_before_truncation": MIN_CHARS,
            "truncate_to_chars": MAX_CHARS,
            "dedupe": "exact truncated text; first package in name order kept; texts seen "
            "under two different sections dropped entirely",
            "max_binaries_per_source_package_per_section": MAX_PER_SOURCE,
            "text": "synopsis + extended description, ' .' separator lines dropped, whitespace "
            "collapsed; package name not included",
        },
        "sampling": {
            "seed": SEED,
            "rng": "random.Random(13): cap binaries per source package, sample up to "
            "per_section_cap per section (KEEP_SECTIONS order), group split by source package "
            "~70/15/15 (shuffled source order, greedy fill of train then eval, rest test), then "
            "shuffle train, eval, test",
        },
        "format": {
            "files": [f"{name}.jsonl" for name, _ in SPLITS],
            "record": {"text": "str (<= 1000 chars)", "label": "str, one of labels"},
        },
        "license": "Package descriptions are part of the Debian archive metadata and were "
        "written by the Debian package maintainers (often adapted from upstream). Each "
        "package's description is distributed under that package's licence (DFSG-free for "
        "packages in main; all records here come from main). This dataset is a small derived "
        "sample used for research/demo purposes only, with attribution to the Debian project "
        "(https://www.debian.org/) and the maintainers of the packages listed in `packages`.",
        "packages": {name: [pkg for pkg, _, _ in splits[name]] for name, _ in SPLITS},
    }
    if args.baselines:
        prov["baselines"] = baselines(splits)
        print(json.dumps(prov["baselines"], indent=2))
    with open(os.path.join(args.out_dir, "debian_sections.json"), "w", encoding="utf-8") as fh:
        json.dump(prov, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    print(json.dumps({k: prov[k] for k in ("stanzas_read", "filter_stats", "available_per_section", "counts", "totals")}, indent=1))


if __name__ == "__main__":
    main()
