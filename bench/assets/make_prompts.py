#!/usr/bin/env python3
"""Make the held-out prompt sets bench/data/prompts_calib.jsonl and bench/data/prompts_eval.jsonl.

Prompts come only from the corpus' held-out files (build_corpus.py, split == "heldout"), never from training
files. A domain's held-out files are split by position (even -> calib, odd -> eval), so the two sets share no
source file. Each prompt is a window of one file starting at a line start, `--min-tokens`..`--max-tokens` tokens
long under the model's tokenizer (the text is stored, not ids). Files are used round-robin; a file used more than
once gives windows that do not overlap. Deterministic for a given corpus, tokenizer and seed.

Usage:
  python bench/assets/make_prompts.py --corpus /tmp/eldr-corpus --model models/tiny-qwen3-moe --out-dir bench/data

Line format: {"domain": "...", "text": "..."}; lines are grouped by domain in build_corpus.DOMAINS order.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_corpus import DOMAINS, load_corpus  # noqa: E402


def _line_starts(text: str) -> list[int]:
    starts = [0]
    i = text.find("\n")
    while i != -1:
        if i + 1 < len(text):
            starts.append(i + 1)
        i = text.find("\n", i + 1)
    return starts


def make_window(tok, text: str, start: int, n_tokens: int) -> tuple[str, int] | None:
    """Text of the first n_tokens tokens of text[start:], cut back to a whitespace boundary."""
    piece = text[start:start + n_tokens * 12]
    ids = tok(piece, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        return None
    out = tok.decode(ids[:n_tokens])
    out = out.rstrip("\ufffd")
    cut = max(out.rfind("\n"), out.rfind(" "))
    if cut > len(out) * 0.8:
        out = out[:cut]
    out = out.rstrip()
    if len(out.strip()) < 40:
        return None
    return out, len(tok(out, add_special_tokens=False)["input_ids"])


def prompts_for(tok, files: list[str], n: int, rng: random.Random, lo: int, hi: int) -> list[str]:
    used: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(files))}
    starts = [_line_starts(t) for t in files]
    out, seen = [], set()
    attempts = 0
    fi = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n:
            raise RuntimeError(f"could not make {n} prompts from {len(files)} files ({len(out)} made)")
        i = fi % len(files)
        fi += 1
        text = files[i]
        target = rng.randint(lo + 10, hi - 10)
        ok = [s for s in starts[i] if all(s >= b or s + target * 3 <= a for a, b in used[i])]
        if not ok:
            continue
        s = ok[rng.randrange(len(ok))]
        w = make_window(tok, text, s, target)
        if w is None or not (lo <= w[1] <= hi) or w[0] in seen:
            continue
        seen.add(w[0])
        used[i].append((s, s + len(w[0])))
        out.append(w[0])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/eldr-corpus")
    ap.add_argument("--model", default="models/tiny-qwen3-moe", help="folder holding the tokenizer")
    ap.add_argument("--out-dir", default="bench/data")
    ap.add_argument("--per-domain", type=int, default=40)
    ap.add_argument("--min-tokens", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=4321)
    a = ap.parse_args()

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model)
    corpus = load_corpus(a.corpus, split="heldout")
    sets = {"calib": [], "eval": []}
    for di, d in enumerate(DOMAINS):
        files = [r["text"] for r in corpus[d]]
        assert all(r["split"] == "heldout" for r in corpus[d])
        for si, name in enumerate(("calib", "eval")):
            part = files[si::2]
            rng = random.Random(a.seed * 1000 + di * 10 + si)
            ps = prompts_for(tok, part, a.per_domain, rng, a.min_tokens, a.max_tokens)
            sets[name] += [{"domain": d, "text": p} for p in ps]
            print(f"[prompts] {name:5s} {d:9s} {len(ps)} prompts from {len(part)} held-out files", file=sys.stderr)
    calib_texts = {r["text"] for r in sets["calib"]}
    assert not any(r["text"] in calib_texts for r in sets["eval"]), "calib/eval overlap"
    os.makedirs(a.out_dir, exist_ok=True)
    for name, rows in sets.items():
        path = os.path.join(a.out_dir, f"prompts_{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        lens = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
        print(f"[prompts] wrote {path}: {len(rows)} prompts, tokens min {min(lens)} "
              f"mean {sum(lens) / len(lens):.0f} max {max(lens)}", file=sys.stderr)


if __name__ == "__main__":
    main()
