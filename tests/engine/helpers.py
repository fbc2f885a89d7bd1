"""Prompt construction and count decoding shared by the engine tests."""

from __future__ import annotations

import numpy as np

from sglang_eldr.engine.counts_wire import decode_counts


def counts_of(resp: dict) -> np.ndarray:
    m = resp["meta_info"]
    return decode_counts(m["eldr_counts"], m["eldr_counts_shape"])


def token_ids(n: int, seed: int, vocab: int = 4096, low: int = 10) -> list[int]:
    """Deterministic pseudo-random token ids (avoids special tokens at the bottom of the vocab)."""
    return np.random.default_rng(seed).integers(low, vocab, size=n).tolist()


def text_ids(tokenizer_dir, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return tok(text, add_special_tokens=False)["input_ids"]
