#!/usr/bin/env python3
"""Measure expert locality of the tiny Qwen3-MoE (and of a random-weights twin, as a control).

transformers, float32, one request at a time: prefill the prompt with output_router_logits=True, then decode
--decode-tokens greedy tokens (EOS ignored), taking every MoE layer's top-k experts from the router logits.

Figures (calibration = bench/data/prompts_calib.jsonl, evaluation = bench/data/prompts_eval.jsonl):
  * domain accuracy from the prefill signature: counts [L,E] x IDF (fitted on calib), flattened, L2-normalised,
    nearest domain centroid (centroid = normalised mean of the calib signatures of that domain);
  * prefill<->decode cosine (normalised count profiles): same request, same domain other request, other domain;
  * Spearman rho between pairwise cosine distance of prefill signatures and of decode count profiles (all eval
    pairs), as in ELDR's layer-selection criterion;
  * distinct experts per layer per decode step for a batch of --batch requests decoding together:
    random batches, batches from one true domain, batches from one k-means cluster of prefill signatures
    (k-means fitted on calib signatures, eval requests assigned to the nearest centroid), for each k in --kmeans.
    Reference: uniform independent routing gives E * (1 - (1 - k/E)^batch).

Usage:
  OMP_NUM_THREADS=1 python bench/assets/measure_locality.py --model models/tiny-qwen3-moe \
      --out models/tiny-qwen3-moe/locality.json

Imports only torch, transformers, numpy, scikit-learn.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

DOMAINS_DEFAULT = ["python", "c", "json", "markdown", "man", "math"]


def load_prompts(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def trace(model, tok, text: str, decode_tokens: int, top_k: int, max_prompt: int):
    """Return (prefill counts [L,E] int64, decode picks [T,L,k] int16, n_prompt_tokens, generated ids)."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_prompt]
    out = model(input_ids=ids, use_cache=True, output_router_logits=True)
    L = len(out.router_logits)
    E = out.router_logits[0].shape[-1]
    counts = np.zeros((L, E), dtype=np.int64)
    for l, lg in enumerate(out.router_logits):
        picks = torch.topk(lg.float(), top_k, dim=-1).indices.reshape(-1).numpy()
        counts[l] = np.bincount(picks, minlength=E)
    assert (counts.sum(1) == ids.shape[1] * top_k).all()
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    dec = np.zeros((decode_tokens, L, top_k), dtype=np.int16)
    gen = []
    for t in range(decode_tokens):
        gen.append(int(nxt))
        o = model(input_ids=nxt, past_key_values=past, use_cache=True, output_router_logits=True)
        for l, lg in enumerate(o.router_logits):
            dec[t, l] = torch.topk(lg.float().reshape(-1, E)[-1], top_k).indices.numpy()
        past = o.past_key_values
        nxt = o.logits[:, -1].argmax(-1, keepdim=True)
    return counts, dec, ids.shape[1], gen


def run_model(model, tok, prompts: list[dict], decode_tokens: int, top_k: int, max_prompt: int, label: str):
    C, D, n_tok = [], [], []
    t0 = time.time()
    for i, p in enumerate(prompts):
        c, d, n, _ = trace(model, tok, p["text"], decode_tokens, top_k, max_prompt)
        C.append(c)
        D.append(d)
        n_tok.append(n)
        if (i + 1) % 60 == 0:
            print(f"[{label}] traced {i + 1}/{len(prompts)} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    return np.stack(C), np.stack(D), np.asarray(n_tok)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def decode_profiles(dec: np.ndarray, E: int) -> np.ndarray:
    """[N,T,L,k] picks -> [N, L*E] decode count profiles."""
    N, T, L, k = dec.shape
    prof = np.zeros((N, L, E), dtype=np.float64)
    for l in range(L):
        for n in range(N):
            prof[n, l] = np.bincount(dec[n, :, l].reshape(-1).astype(np.int64), minlength=E)
    return prof.reshape(N, L * E)


def rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def distinct_per_step(dec: np.ndarray, members: np.ndarray, E: int) -> float:
    """Mean over decode steps and layers of |union of top-k sets| across the batch members."""
    sub = dec[members]  # [B,T,L,k]
    B, T, L, k = sub.shape
    x = np.transpose(sub, (1, 2, 0, 3)).reshape(T * L, B * k).astype(np.int64)
    onehot = np.zeros((T * L, E), dtype=bool)
    np.put_along_axis(onehot, x, True, axis=1)
    return float(onehot.sum(1).mean())


def analyse(calib, evals, labels_c, labels_e, domains, top_k, batch, n_batches, kmeans_ks, seed):
    from sklearn.cluster import KMeans

    Cc, _, _ = calib
    Ce, De, ntok = evals
    N, L, E = Cc.shape
    df = (Cc > 0).sum(0)
    idf = np.log((N + 1) / (df + 1))
    sig_c = unit((Cc * idf).reshape(N, -1).astype(np.float64))
    sig_e = unit((Ce * idf).reshape(len(Ce), -1).astype(np.float64))
    res = {"layers": L, "experts": E, "top_k": top_k, "n_calib": int(N), "n_eval": int(len(Ce)),
           "eval_prompt_tokens_mean": float(ntok.mean()), "decode_tokens": int(De.shape[1])}

    # domain accuracy (nearest centroid)
    lc, le = np.asarray(labels_c), np.asarray(labels_e)
    cent = unit(np.stack([sig_c[lc == d].mean(0) for d in domains]))
    pred = np.asarray(domains)[np.argmax(sig_e @ cent.T, axis=1)]
    res["domain_accuracy"] = float((pred == le).mean())
    res["domain_accuracy_per_domain"] = {d: float((pred[le == d] == d).mean()) for d in domains}
    res["chance"] = 1.0 / len(domains)

    # prefill <-> decode similarity (normalised raw count profiles)
    pre = unit(Ce.reshape(len(Ce), -1).astype(np.float64))
    dp = unit(decode_profiles(De, E))
    S = pre @ dp.T
    same = le[:, None] == le[None, :]
    eye = np.eye(len(le), dtype=bool)
    res["prefill_decode_cos_self"] = float(S[eye].mean())
    res["prefill_decode_cos_same_domain_other_request"] = float(S[same & ~eye].mean())
    res["prefill_decode_cos_other_domain"] = float(S[~same].mean())
    iu = np.triu_indices(len(le), 1)
    res["spearman_sig_vs_decode_distance"] = spearman(1 - (sig_e @ sig_e.T)[iu], 1 - (dp @ dp.T)[iu])

    # distinct experts per layer per decode step, batches of `batch`
    rng = np.random.default_rng(seed)
    allidx = np.arange(len(le))
    rand = [distinct_per_step(De, rng.choice(allidx, batch, replace=False), E) for _ in range(n_batches)]
    dom = []
    for i in range(n_batches):
        members = allidx[le == domains[i % len(domains)]]
        dom.append(distinct_per_step(De, rng.choice(members, batch, replace=False), E))
    per_dom = {d: float(np.mean(dom[i::len(domains)])) for i, d in enumerate(domains)}
    res["uniform_routing_expectation"] = float(E * (1 - (1 - top_k / E) ** batch))
    res["batch"] = batch
    res["distinct_random"] = float(np.mean(rand))
    res["distinct_true_domain"] = float(np.mean(dom))
    res["distinct_true_domain_per_domain"] = per_dom
    res["kmeans"] = {}
    for k in kmeans_ks:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(sig_c)
        kc = unit(km.cluster_centers_)
        assign = np.argmax(sig_e @ kc.T, axis=1)
        sizes = np.bincount(assign, minlength=k)
        ok = [c for c in range(k) if sizes[c] >= batch]
        weights = np.asarray([sizes[c] for c in ok], dtype=float)
        weights /= weights.sum()
        vals = []
        for _ in range(n_batches):
            c = ok[int(rng.choice(len(ok), p=weights))]
            vals.append(distinct_per_step(De, rng.choice(allidx[assign == c], batch, replace=False), E))
        dom_idx = np.asarray([domains.index(x) for x in le])
        purity = float(sum(np.bincount(dom_idx[assign == c], minlength=len(domains)).max()
                           for c in range(k) if sizes[c]) / len(le))
        res["kmeans"][str(k)] = {"distinct": float(np.mean(vals)), "cluster_sizes": sizes.tolist(),
                                 "purity": purity,
                                 "reduction_vs_random": 1 - float(np.mean(vals)) / res["distinct_random"]}
    res["true_domain_reduction_vs_random"] = 1 - res["distinct_true_domain"] / res["distinct_random"]
    return res


def build_random_twin(model_dir: str, seed: int):
    from transformers import AutoConfig, Qwen3MoeForCausalLM
    cfg = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    m = Qwen3MoeForCausalLM._from_config(cfg, dtype=torch.float32)
    return m.eval()


def fmt(res: dict) -> str:
    lines = [f"  domain accuracy (prefill signature, nearest centroid): {res['domain_accuracy'] * 100:.1f} % "
             f"(chance {res['chance'] * 100:.0f} %)  "
             + " ".join(f"{d}={v * 100:.0f}" for d, v in res["domain_accuracy_per_domain"].items()),
             f"  prefill<->decode cosine: self {res['prefill_decode_cos_self']:.3f}, same domain other request "
             f"{res['prefill_decode_cos_same_domain_other_request']:.3f}, other domain "
             f"{res['prefill_decode_cos_other_domain']:.3f}",
             f"  Spearman rho (signature distance vs decode distance, all eval pairs): "
             f"{res['spearman_sig_vs_decode_distance']:.3f}",
             f"  distinct experts / layer / decode step, batch {res['batch']} (uniform routing would give "
             f"{res['uniform_routing_expectation']:.1f} of {res['experts']}):",
             f"    random batches        {res['distinct_random']:.2f}",
             f"    one true domain       {res['distinct_true_domain']:.2f} "
             f"({-res['true_domain_reduction_vs_random'] * 100:+.1f} %)  "
             + " ".join(f"{d}={v:.1f}" for d, v in res["distinct_true_domain_per_domain"].items())]
    for k, v in res["kmeans"].items():
        lines.append(f"    one k-means({k}) cluster {v['distinct']:.2f} ({-v['reduction_vs_random'] * 100:+.1f} %)  "
                     f"sizes {v['cluster_sizes']} purity {v['purity'] * 100:.0f} %")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-qwen3-moe")
    ap.add_argument("--calib", default="bench/data/prompts_calib.jsonl")
    ap.add_argument("--eval", default="bench/data/prompts_eval.jsonl")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-batches", type=int, default=600)
    ap.add_argument("--kmeans", default="4,6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-control", action="store_true", help="skip the random-weights twin")
    ap.add_argument("--out", default=None, help="JSON output (default: <model>/locality.json)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model)
    calib, evals = load_prompts(a.calib), load_prompts(a.eval)
    domains = [d for d in DOMAINS_DEFAULT if any(p["domain"] == d for p in calib)]
    domains += sorted({p["domain"] for p in calib} - set(domains))
    lab_c = [p["domain"] for p in calib]
    lab_e = [p["domain"] for p in evals]
    ks = [int(x) for x in a.kmeans.split(",") if x]

    models = [("trained", lambda: AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval())]
    if not a.no_control:
        models.append(("random_twin", lambda: build_random_twin(a.model, a.seed)))
    report = {"command": " ".join(["python"] + sys.argv), "model": a.model, "calib": a.calib, "eval": a.eval,
              "domains": domains, "results": {}}
    for name, make in models:
        t0 = time.time()
        model = make()
        top_k = model.config.num_experts_per_tok
        c = run_model(model, tok, calib, a.decode_tokens, top_k, a.max_prompt_tokens, name + "/calib")
        e = run_model(model, tok, evals, a.decode_tokens, top_k, a.max_prompt_tokens, name + "/eval")
        res = analyse(c, e, lab_c, lab_e, domains, top_k, a.batch, a.n_batches, ks, a.seed)
        res["seconds"] = round(time.time() - t0, 1)
        report["results"][name] = res
        print(f"== {name} ({res['seconds']:.0f}s): {res['n_calib']} calib / {res['n_eval']} eval prompts, "
              f"{res['eval_prompt_tokens_mean']:.0f} prompt tokens mean, {res['decode_tokens']} greedy tokens")
        print(fmt(res), flush=True)
    out = a.out or os.path.join(a.model, "locality.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
