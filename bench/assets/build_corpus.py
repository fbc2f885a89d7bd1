#!/usr/bin/env python3
"""Build the six-domain text corpus used to train the tiny Qwen3-MoE (models/tiny-qwen3-moe).

Every source is something any machine of this kind has; nothing is read from this repository or from a
virtual environment's site-packages:

  python    Python stdlib sources of the base interpreter (sysconfig stdlib dir, site-packages excluded)
  c         C headers under /usr/include
  json      JSON files under /usr/share, /usr/lib and the stdlib dir (parsed and re-serialised, indent 2)
  markdown  Markdown files (.md, .md.gz) under /usr/share and /usr/lib
  man       man pages under /usr/share/man/man[1-8] (gcloud pages subsampled 1/8), rendered to plain text
            (man -P cat; fallback groff; fallback stripped roff source)
  math      generated arithmetic ("Solve 9x + 324 = 6246. Then x = 658.")

Determinism: candidate lists are sorted; every 10th file of a domain's sorted list (index % 10 == 9) is held
out; train and held-out lists are then shuffled with a fixed per-domain seed and taken, each file truncated to
--file-cap characters (at a line boundary), until the domain's character budget is met.

Output (default /tmp/eldr-corpus): <domain>.jsonl with one record per file
{"domain", "source", "split": "train"|"heldout", "text"} and manifest.json with counts and a digest.

Only the standard library is used.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time

DOMAINS = ["python", "c", "json", "markdown", "man", "math"]
HELDOUT_EVERY = 10  # index % 10 == 9 -> held out

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERSTRIKE = re.compile(r".\x08")


def _excluded(path: str) -> bool:
    p = path.replace(os.sep, "/")
    bad = ("/site-packages/", "/dist-packages/", "/__pycache__/", "/node_modules/.cache/")
    return any(b in p for b in bad)


def _walk(roots, suffixes, skip_dirs=()):
    out = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in skip_dirs and not _excluded(os.path.join(dirpath, d) + "/"))
            for fn in filenames:
                if fn.endswith(suffixes):
                    full = os.path.join(dirpath, fn)
                    if os.path.isfile(full) and not os.path.islink(full) and not _excluded(full):
                        out.append(full)
    return sorted(set(out))


def _read_text(path: str) -> str | None:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read(4_000_000)
        else:
            with open(path, "rb") as f:
                raw = f.read(4_000_000)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    if "\x00" in text:
        return None
    return text.replace("\r\n", "\n")


def _cap(text: str, cap: int) -> str:
    text = text.strip("\n")
    if len(text) <= cap:
        return text
    cut = text.rfind("\n", 0, cap)
    if cut < cap // 2:
        cut = cap
    return text[:cut]


# ---------------------------------------------------------------- domain readers (path -> text or None)

def read_plain(path: str) -> str | None:
    return _read_text(path)


def read_json(path: str) -> str | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, (dict, list)):
        return None
    return json.dumps(obj, indent=2, ensure_ascii=False)


_MAN_TOOL = None


def _man_tool() -> str:
    global _MAN_TOOL
    if _MAN_TOOL is None:
        if shutil.which("man"):
            _MAN_TOOL = "man"
        elif shutil.which("groff"):
            _MAN_TOOL = "groff"
        else:
            _MAN_TOOL = "raw"
        print(f"[corpus] man pages rendered with: {_MAN_TOOL}", file=sys.stderr)
    return _MAN_TOOL


def _strip_roff(src: str) -> str:
    lines = []
    for line in src.split("\n"):
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            line = parts[1] if len(parts) > 1 else ""
            line = line.replace('"', "")
        line = re.sub(r"\\f[BIRP]|\\f\([A-Z]{2}|\\s[+-]?\d", "", line)
        line = line.replace("\\-", "-").replace("\\(em", "--").replace("\\e", "\\").replace("\\&", "")
        lines.append(line)
    return "\n".join(lines)


def read_man(path: str) -> str | None:
    src = _read_text(path)
    if src is None or src.lstrip().startswith(".so ") or len(src) < 200:
        return None  # unreadable, or a redirect to another page (would duplicate it)
    tool = _man_tool()
    env = dict(os.environ, MANWIDTH="80", COLUMNS="80", LANG="C.UTF-8", LC_ALL="C.UTF-8",
               GROFF_NO_SGR="1", MAN_KEEP_FORMATTING="", MANPAGER="cat", PAGER="cat")
    text = None
    try:
        if tool == "man":
            r = subprocess.run(["man", "-l", "-P", "cat", path], env=env, capture_output=True, timeout=30)
            text = r.stdout.decode("utf-8", "replace") if r.returncode == 0 else None
        elif tool == "groff":
            r = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=80n"], input=src.encode(),
                               env=env, capture_output=True, timeout=30)
            text = r.stdout.decode("utf-8", "replace") if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        text = None
    if text is None:
        text = _strip_roff(src)
    text = _OVERSTRIKE.sub("", _ANSI.sub("", text))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text if len(text.strip()) >= 200 else None


# ---------------------------------------------------------------- generated arithmetic

def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        a, x = rng.randint(2, 99), rng.randint(-999, 999)
        b = rng.randint(-999, 999)
        c = a * x + b
        sign = "+" if b >= 0 else "-"
        return f"Solve {a}x {sign} {abs(b)} = {c}. Then x = {x}."
    if kind == 1:
        a, b = rng.randint(0, 99999), rng.randint(0, 99999)
        return f"Compute {a} + {b}. The sum is {a + b}."
    if kind == 2:
        a, b = rng.randint(0, 99999), rng.randint(0, 99999)
        return f"Compute {a} - {b}. The difference is {a - b}."
    if kind == 3:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        return f"Multiply {a} by {b}: {a} * {b} = {a * b}."
    if kind == 4:
        b = rng.randint(2, 99)
        a = rng.randint(b, 99999)
        return f"Divide {a} by {b}. The quotient is {a // b} and the remainder is {a % b}."
    if kind == 5:
        p = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75])
        n = rng.randint(1, 400) * 20
        return f"What is {p}% of {n}? {p}% of {n} is {p * n // 100}."
    if kind == 6:
        x, y = rng.randint(-30, 30), rng.randint(-30, 30)
        a, b, c, d = (rng.randint(1, 9) for _ in range(4))
        return (f"Solve the system {a}x + {b}y = {a * x + b * y} and {c}x - {d}y = {c * x - d * y}. "
                f"Then x = {x} and y = {y}.")
    a, b = rng.randint(2, 40), rng.randint(2, 12)
    return f"Evaluate {a}^{b % 4 + 2}. The result is {a ** (b % 4 + 2)}."


def math_docs(n_docs: int, doc_chars: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        lines, size = [], 0
        while size < doc_chars:
            line = _math_problem(rng)
            lines.append(line)
            size += len(line) + 1
        docs.append((f"generated:math/{i:05d}", "\n".join(lines)))
    return docs


# ---------------------------------------------------------------- assembly

def candidates(domain: str):
    stdlib = sysconfig.get_paths()["stdlib"]
    if domain == "python":
        return _walk([stdlib], (".py",), skip_dirs=("site-packages", "dist-packages")), read_plain
    if domain == "c":
        return _walk(["/usr/include"], (".h",)), read_plain
    if domain == "json":
        return _walk(["/usr/share", "/usr/lib", stdlib], (".json",),
                     skip_dirs=("site-packages", "dist-packages")), read_json
    if domain == "markdown":
        return _walk(["/usr/share", "/usr/lib"], (".md", ".md.gz", ".markdown"),
                     skip_dirs=("site-packages", "dist-packages")), read_plain
    if domain == "man":
        files = []
        base = "/usr/share/man"
        if os.path.isdir(base):
            for sec in sorted(os.listdir(base)):
                if re.fullmatch(r"man[1-8]", sec):
                    files += _walk([os.path.join(base, sec)], ("",))
        # gcloud reference pages are ~84 % of all pages here; keep every 8th so other tools are represented
        files = sorted(files)
        gcloud = [p for p in files if os.path.basename(p).startswith("gcloud")]
        keep = set(gcloud[::8])
        return [p for p in files if not os.path.basename(p).startswith("gcloud") or p in keep], read_man
    raise ValueError(domain)


def take(items, reader, budget: int, cap: int, min_chars: int = 200):
    out, total = [], 0
    for path in items:
        if total >= budget:
            break
        text = reader(path)
        if text is None:
            continue
        text = _cap(text, cap)
        if len(text) < min_chars:
            continue
        text = text[: budget - total] if total + len(text) > budget and budget - total > 2000 else text
        out.append((path, text))
        total += len(text)
    return out, total


def build(out_dir: str, seed: int, train_chars: int, heldout_chars: int, file_cap: int) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"seed": seed, "train_chars_budget": train_chars, "heldout_chars_budget": heldout_chars,
                "file_cap": file_cap, "heldout_rule": "sorted index % 10 == 9",
                "stdlib": sysconfig.get_paths()["stdlib"], "domains": {}}
    digest_all = hashlib.sha256()
    for di, domain in enumerate(DOMAINS):
        t0 = time.time()
        if domain == "math":
            n_docs = (train_chars + heldout_chars) * 12 // (10 * (file_cap // 2)) + 20
            docs = math_docs(n_docs, file_cap // 2, seed + 1000)
            cands = [p for p, _ in docs]
            lookup = dict(docs)
            reader = lookup.get
        else:
            cands, reader = candidates(domain)
        train_c = [p for i, p in enumerate(cands) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        held_c = [p for i, p in enumerate(cands) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        rng = random.Random(seed * 100 + di)
        rng.shuffle(train_c)
        rng.shuffle(held_c)
        train, ntr = take(train_c, reader, train_chars, file_cap)
        held, nho = take(held_c, reader, heldout_chars, file_cap)
        assert not set(p for p, _ in train) & set(p for p, _ in held)
        h = hashlib.sha256()
        with open(os.path.join(out_dir, f"{domain}.jsonl"), "w", encoding="utf-8") as f:
            for split, docs_ in (("train", train), ("heldout", held)):
                for path, text in docs_:
                    line = json.dumps({"domain": domain, "source": path, "split": split, "text": text},
                                      ensure_ascii=False)
                    f.write(line + "\n")
                    h.update(line.encode())
        digest_all.update(h.digest())
        manifest["domains"][domain] = {
            "candidates": len(cands), "train_files": len(train), "train_chars": ntr,
            "heldout_files": len(held), "heldout_chars": nho, "sha256": h.hexdigest()}
        print(f"[corpus] {domain:9s} candidates={len(cands):6d} train={len(train):4d} files {ntr:8d} chars  "
              f"heldout={len(held):4d} files {nho:7d} chars  ({time.time() - t0:.1f}s)", file=sys.stderr)
    manifest["sha256"] = digest_all.hexdigest()
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def load_corpus(corpus_dir: str, split: str | None = None) -> dict[str, list[dict]]:
    """Read <domain>.jsonl back: {domain: [record, ...]} (records in file order)."""
    out = {}
    for domain in DOMAINS:
        recs = []
        with open(os.path.join(corpus_dir, f"{domain}.jsonl"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if split is None or r["split"] == split:
                    recs.append(r)
        out[domain] = recs
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/eldr-corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train-chars", type=int, default=1_400_000, help="per domain")
    ap.add_argument("--heldout-chars", type=int, default=300_000, help="per domain")
    ap.add_argument("--file-cap", type=int, default=8000, help="max chars kept from one file")
    a = ap.parse_args()
    m = build(a.out, a.seed, a.train_chars, a.heldout_chars, a.file_cap)
    print(json.dumps({k: v for k, v in m.items() if k != "domains"}, indent=1))


if __name__ == "__main__":
    main()
