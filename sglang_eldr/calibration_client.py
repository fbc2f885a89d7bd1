"""Collects calibration data over HTTP from an ELDR server or router.

For each prompt: the prefill counts (`return_eldr_counts`), then `max_new_tokens` greedy tokens,
then the decode counts. The decode counts come from a second request on prompt + output with one
new token: a token's expert choice depends only on its causal context, so prefilling the output
tokens routes them exactly as decoding did; counts(prompt+output) - counts(prompt) is the decode
profile (the radix cache usually serves this second prefill from the first one's KV).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from sglang_eldr.wire import META_KEY, counts_from_meta


@dataclass
class Sample:
    domain: str
    prefill: np.ndarray  # int32 [L, E]
    decode: np.ndarray  # int32 [L, E]


def read_prompts(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with a 'text' string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _counts(meta: dict) -> np.ndarray:
    if META_KEY not in meta:
        raise RuntimeError("the server returned no eldr_counts: is it an ELDR server with capture on?")
    return counts_from_meta(meta)


def _generate(url: str, payload: dict, timeout: float) -> dict:
    r = requests.post(url + "/generate", json=payload, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"{url}/generate answered {r.status_code}: {r.text[:300]}")
    return r.json()


def collect_one(url: str, row: dict, tokenize, max_new_tokens: int, timeout: float) -> Sample:
    prompt_ids = list(tokenize(row["text"]))
    params = {"temperature": 0, "max_new_tokens": max_new_tokens}
    first = _generate(url, {"input_ids": prompt_ids, "return_eldr_counts": True, "sampling_params": params}, timeout)
    prefill = _counts(first["meta_info"])
    output_ids = first.get("output_ids")
    if not output_ids:
        raise RuntimeError("the server returned no output_ids")
    second = _generate(url, {"input_ids": prompt_ids + list(output_ids[:-1]), "return_eldr_counts": True,
                             "sampling_params": {"temperature": 0, "max_new_tokens": 1}}, timeout)
    decode = _counts(second["meta_info"]) - prefill
    if (decode < 0).any():
        raise RuntimeError("decode profile went negative: the second prompt does not extend the first")
    return Sample(domain=str(row.get("domain", "")), prefill=prefill, decode=decode)


def load_tokenizer(model_path: str):
    """The model's own tokenizer, so prompt + output ids extend exactly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return lambda text: tok.encode(text)


def collect(url: str, rows: list[dict], tokenize, max_new_tokens: int = 32, concurrency: int = 4,
            timeout: float = 300.0, progress: bool = True) -> list[Sample]:
    url = url.rstrip("/")
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(collect_one, url, row, tokenize, max_new_tokens, timeout) for row in rows]
        it = tqdm(futures, desc="calibration prompts", unit="req", disable=None if progress else True)
        return [f.result() for f in it]
