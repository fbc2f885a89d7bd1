"""Prompt construction and count decoding shared by the engine tests."""

from __future__ import annotations

import numpy as np

from sglang_eldr.wire import counts_from_meta

NEAR_TIE = 0.05  # logit gap between the k-th and (k+1)-th expert below which a flip is tolerated


def counts_of(resp: dict) -> np.ndarray:
    return counts_from_meta(resp["meta_info"])


def token_ids(n: int, seed: int, vocab: int = 4096, low: int = 10) -> list[int]:
    """Deterministic pseudo-random token ids (avoids special tokens at the bottom of the vocab)."""
    return np.random.default_rng(seed).integers(low, vocab, size=n).tolist()


def text_ids(tokenizer_dir, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_counts(model, ids):
    """transformers float32 top-k counts [L, E] of a prompt, and per layer the near-tied tokens."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    cfg = model.config
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    counts, ties = [], []
    for logits in out.router_logits:  # one [tokens, E] per MoE layer
        logits = logits.reshape(-1, E).float()
        top = torch.topk(logits, k + 1, dim=-1)
        picks = top.indices[:, :k]
        counts.append(torch.bincount(picks.reshape(-1), minlength=E).numpy())
        gap = top.values[:, k - 1] - top.values[:, k]
        ties.append(int((gap < NEAR_TIE).sum()))
    return np.stack(counts).astype(np.int32), np.array(ties)
