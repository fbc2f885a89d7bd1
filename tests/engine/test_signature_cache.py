"""Unit tests of the signature table and wire format (no server): slot and page storage against a
brute-force reference, with paged allocation, chunked writes, prefix sharing and slot reuse."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sglang_eldr.engine.counts_wire import decode_counts, encode_counts  # noqa: E402
from sglang_eldr.engine.moe_shape import MoeShape, moe_shape_from_hf_config  # noqa: E402
from sglang_eldr.engine.signature_cache import SignatureTable  # noqa: E402


def _brute(ids_by_slot, slots, L, E):
    c = np.zeros((L, E), np.int32)
    for s in slots:
        for layer in range(L):
            for e in ids_by_slot[s][layer]:
                c[layer, e] += 1
    return c


@pytest.mark.parametrize("storage,page", [("slot", 1), ("slot", 16), ("page", 4), ("page", 16)])
def test_table_matches_brute_force(storage, page):
    rng = np.random.default_rng(0)
    L, E, K = 3, 40, 4
    pages_total = 64
    table = SignatureTable(MoeShape(L, E, K), pages_total * page, "cpu", page_size=page, storage=storage)
    truth = {}  # slot -> [L][K] ids currently held there
    free_pages = list(range(1, pages_total))
    requests = []
    for round_ in range(30):
        # a request: maybe share a prefix (whole pages) of an earlier one, then write its own tokens
        prefix_slots = []
        if requests and rng.random() < 0.5:
            base = requests[rng.integers(len(requests))]
            n_pages_shared = int(rng.integers(0, len(base) // page + 1)) if page > 1 else 0
            n_shared = n_pages_shared * page if page > 1 else int(rng.integers(0, len(base) + 1))
            prefix_slots = base[:n_shared]
        n_new = int(rng.integers(1, 3 * max(page, 8)))
        slots = list(prefix_slots)
        while len(slots) < len(prefix_slots) + n_new:
            if len(slots) % page == 0:
                if not free_pages:  # evict: reuse pages of the oldest request
                    requests.clear()
                    free_pages = list(range(1, pages_total))
                pg = free_pages.pop(int(rng.integers(len(free_pages))))
            slots.append(pg * page + len(slots) % page)
        new = slots[len(prefix_slots):]
        # chunked prefill: write new tokens in 1-3 forwards, all layers per forward
        cuts = sorted(set(rng.integers(1, len(new), size=2).tolist())) if len(new) > 2 else []
        for chunk in np.split(np.array(new), cuts):
            loc = table.begin_forward(torch.tensor(chunk, dtype=torch.int64))
            for layer in range(L):
                ids = np.stack([rng.choice(E, K, replace=False) for _ in chunk])
                for s, row in zip(chunk, ids):
                    truth.setdefault(int(s), [[0] * K for _ in range(L)])[layer] = list(row)
                table.write(layer, loc, torch.tensor(ids))
            table.end_forward()
        requests.append(slots)
        got = table.counts([torch.tensor(slots)])[0].numpy()
        np.testing.assert_array_equal(got, _brute(truth, slots, L, E))
        assert (got.sum(1) == len(slots) * K).all()
    # batched read = per-request reads
    some = requests[-3:]
    batch = table.counts([torch.tensor(s) for s in some]).numpy()
    for s, b in zip(some, batch):
        np.testing.assert_array_equal(b, table.counts([torch.tensor(s)])[0].numpy())


def test_table_dtype_and_size():
    small = SignatureTable(MoeShape(4, 64, 4), 1000, "cpu")
    assert small.ids.dtype == torch.uint8 and small.nbytes == 4 * 1000 * 4
    big = SignatureTable(MoeShape(2, 300, 8), 10, "cpu")
    assert big.ids.dtype == torch.int16


def test_wire_roundtrip():
    c = np.arange(12, dtype=np.int32).reshape(3, 4) * 1000
    text, shape = encode_counts(c)
    assert shape == [3, 4]
    np.testing.assert_array_equal(decode_counts(text, shape), c)
    with pytest.raises(ValueError):
        decode_counts(text, [4, 4])


def test_moe_shape_from_config():
    class Cfg:
        num_hidden_layers = 4
        num_experts = 64
        num_experts_per_tok = 4

    class Dense:
        num_hidden_layers = 4

    assert moe_shape_from_hf_config(Cfg()) == MoeShape(4, 64, 4)
    assert moe_shape_from_hf_config(Dense()) is None
