"""The inflated twin (bench/inflated_twin.py) is the shipped model with bigger experts and nothing
else: through SGLang its greedy tokens and its prompts' expert counts equal the original's, so
step-cost measurements on it keep the tiny model's routing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.engine.conftest import _serve
from tests.engine.helpers import counts_of, text_ids
from tests.engine.tiny_model import REPO, TRAINED_DIR

sys.path.insert(0, str(REPO / "bench"))
from inflated_twin import DST, inflate  # noqa: E402

pytestmark = pytest.mark.needs_engine


@pytest.fixture(scope="module")
def twin_server(request, server_logs):
    if not (TRAINED_DIR / "config.json").exists():
        pytest.skip("the trained tiny model is not in models/")
    twin = inflate(TRAINED_DIR, DST)
    return _serve(request, twin, server_logs, "eldr-inflated")


def _prompts() -> list[list[int]]:
    rows = [json.loads(l) for l in (REPO / "bench" / "data" / "prompts_eval.jsonl").read_text().splitlines() if l]
    by_domain: dict[str, list[str]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r["text"])
    return [text_ids(TRAINED_DIR, t)[:96] for texts in by_domain.values() for t in texts[:2]]


def test_twin_weights_are_the_original_zero_padded():
    twin = inflate(TRAINED_DIR, DST)
    small, big = (json.loads((d / "config.json").read_text()) for d in (TRAINED_DIR, twin))
    assert big["moe_intermediate_size"] >= 2048 > small["moe_intermediate_size"]
    assert {k: v for k, v in big.items() if k != "moe_intermediate_size"} == \
        {k: v for k, v in small.items() if k != "moe_intermediate_size"}
    from safetensors import safe_open

    with safe_open(str(TRAINED_DIR / "model.safetensors"), "pt") as a, safe_open(str(twin / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        i = small["moe_intermediate_size"]
        for name in ("model.layers.2.mlp.experts.7.gate_proj.weight", "model.layers.2.mlp.experts.7.down_proj.weight"):
            x, y = a.get_tensor(name), b.get_tensor(name)
            real = y[:i] if "gate" in name else y[:, :i]
            pad = y[i:] if "gate" in name else y[:, i:]
            assert (real == x).all() and not pad.any()
        assert (a.get_tensor("model.layers.2.mlp.gate.weight") == b.get_tensor("model.layers.2.mlp.gate.weight")).all()


def test_greedy_tokens_and_counts_identical(eldr_server, twin_server):
    prompts = _prompts()
    assert len(prompts) >= 12
    for ids in prompts:
        a = eldr_server.generate(ids, max_new_tokens=24)
        b = twin_server.generate(ids, max_new_tokens=24)
        assert b["output_ids"] == a["output_ids"]
        np.testing.assert_array_equal(counts_of(b), counts_of(a))
