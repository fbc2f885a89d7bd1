"""Unit tests of the counts reduction on SGLang's routed-experts host cache (no server): against a
brute-force reference with shared prefixes and dense layers, on a DP-gathered batch sliced by
SGLang's own capturer, and the publisher's one-socket-per-server layout."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import zmq

torch = pytest.importorskip("torch")

from sglang_eldr.engine import counts_publisher  # noqa: E402
from sglang_eldr.engine.capture import reduce_counts  # noqa: E402
from sglang_eldr.engine.moe_shape import MoeShape, moe_layer_ids, moe_shape_from_hf_config  # noqa: E402
from sglang_eldr.wire import (COUNTS_TOPIC, CountsReport, Heartbeat, decode_counts, decode_message,  # noqa: E402
                              encode_counts, encode_report, encode_started)


def _brute(rows: np.ndarray, slots, layers, E: int) -> np.ndarray:
    c = np.zeros((len(layers), E), np.int32)
    for s in slots:
        for i, layer in enumerate(layers):
            for e in rows[s, layer]:
                c[i, e] += 1
    return c


def test_reduction_matches_brute_force_with_shared_prefixes_and_dense_layers():
    rng = np.random.default_rng(0)
    slots_total, hidden, E, K = 500, 5, 40, 4
    rows = rng.integers(0, E, size=(slots_total, hidden, K), dtype=np.int32)
    rows[:, 0] = -7  # a dense layer: never written by the capturer, must be left out
    layers = [1, 2, 4]
    prefix = rng.choice(slots_total, 30, replace=False)
    reqs = [np.concatenate([prefix, rng.choice(slots_total, n, replace=False)]) for n in (1, 17, 200)]
    reqs.append(rng.choice(slots_total, 1, replace=False))
    out = reduce_counts(torch.from_numpy(rows), [torch.from_numpy(r).to(torch.int32) for r in reqs],
                        torch.tensor(layers), E).numpy()
    assert out.shape == (len(reqs), len(layers), E) and out.dtype == np.int32
    for r, c in zip(reqs, out):
        np.testing.assert_array_equal(c, _brute(rows, r, layers, E))
        assert (c.sum(axis=1) == len(r) * K).all()


def test_reduction_refuses_out_of_range_ids():
    rows = torch.zeros((10, 2, 2), dtype=torch.int32)
    rows[3, 1, 0] = 64
    with pytest.raises(ValueError, match="out of range"):
        reduce_counts(rows, [torch.tensor([1, 3])], torch.tensor([0, 1]), 64)
    assert reduce_counts(rows, [], torch.tensor([0, 1]), 64).shape == (0, 2, 64)


def test_dp_gathered_batch_counts_the_local_ranks_tokens(monkeypatch):
    """With DP attention the capturer's device buffer holds the DP-gathered batch; SGLang's own
    `_get_local_slice` keeps this rank's rows, so the host cache, and the counts reduced from it, are
    this rank's. (SGLang cannot start DP attention on CPU here, so the DP helpers are the only stand-ins.)"""
    from sglang.srt.state_capturer import routed_experts as re_mod
    from sglang.srt.state_capturer.base import BaseDeviceCache

    L, E, K = 3, 16, 2
    n0, n1 = 5, 7  # tokens of DP rank 0 and rank 1 in the gathered batch
    rng = np.random.default_rng(1)
    gathered = torch.from_numpy(rng.integers(0, E, size=(n0 + n1, L, K), dtype=np.int32))
    cap = re_mod.RoutedExpertsCapturer.__new__(re_mod.RoutedExpertsCapturer)
    cap.num_layers, cap.topk_size, cap.num_fused_shared_experts = L, K, 0
    cap.device_cache = BaseDeviceCache(64, L, K, "cpu", name="test")
    cap.host_cache = types.SimpleNamespace(buffer=torch.full((100, L, K), -1, dtype=torch.int32))
    cap.device_cache.buffer[: n0 + n1] = gathered
    monkeypatch.setattr(re_mod, "is_dp_attention_enabled", lambda: True)
    monkeypatch.setattr(re_mod, "_is_scattered_a2a_backend", lambda: False)
    monkeypatch.setattr(re_mod, "get_dp_local_slice_cpu", lambda fb, graph, bs: (n0, n1))  # we are rank 1
    local_slots = torch.tensor([40 + 3 * i for i in range(n1)], dtype=torch.int64)
    batch = types.SimpleNamespace(out_cache_loc=local_slots, out_cache_loc_virtual=None)
    assert cap.on_forward_end(batch, can_run_graph=False, cuda_graph_batch=None) is None
    counts = reduce_counts(cap.host_cache.buffer, [local_slots], torch.arange(L), E)[0].numpy()
    expect = _brute(gathered.numpy(), range(n0, n0 + n1), range(L), E)
    np.testing.assert_array_equal(counts, expect)
    assert not np.array_equal(counts, _brute(gathered.numpy(), range(n1), range(L), E))


def test_moe_layer_ids_follow_the_model_families_rules():
    def cfg(**kw):
        return types.SimpleNamespace(num_hidden_layers=6, num_experts=8, num_experts_per_tok=2, **kw)

    assert moe_layer_ids(cfg()) == [0, 1, 2, 3, 4, 5]
    assert moe_layer_ids(cfg(mlp_only_layers=[0, 3])) == [1, 2, 4, 5]
    assert moe_layer_ids(cfg(decoder_sparse_step=2)) == [1, 3, 5]
    assert moe_layer_ids(cfg(first_k_dense_replace=3, moe_layer_freq=1)) == [3, 4, 5]
    assert moe_shape_from_hf_config(cfg()) == MoeShape(6, 8, 2)
    assert moe_shape_from_hf_config(types.SimpleNamespace(num_hidden_layers=4)) is None


def test_wire_roundtrip():
    c = np.arange(12, dtype=np.int32).reshape(3, 4) * 1000
    text, shape = encode_counts(c)
    assert shape == [3, 4]
    np.testing.assert_array_equal(decode_counts(text, shape), c)
    with pytest.raises(ValueError):
        decode_counts(text, [4, 4])


def test_publisher_roles_by_rank():
    ns = types.SimpleNamespace
    assert counts_publisher.ranks_role(ns(attn_tp_rank=0, pp_rank=0, attn_dp_rank=0)) == (True, True)
    assert counts_publisher.ranks_role(ns(attn_tp_rank=0, pp_rank=0, attn_dp_rank=3)) == (True, False)
    assert counts_publisher.ranks_role(ns(attn_tp_rank=1, pp_rank=0, attn_dp_rank=0)) == (False, False)
    assert counts_publisher.ranks_role(ns(attn_tp_rank=0, pp_rank=1, dp_rank=0)) == (False, False)


def test_one_pub_socket_per_server_carries_every_ranks_reports():
    """DP rank 0 owns the PUB socket; rank 1 pushes through it: one bind, both ranks heard."""
    from sglang_eldr.server_process import free_port

    host = "127.0.0.1"
    port = free_port(host)
    hub, spoke = counts_publisher.Publisher(host, port, hub=True), counts_publisher.Publisher(host, port, hub=False)
    assert hub.ipc == spoke.ipc != counts_publisher.ipc_endpoint(host, port + 1)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, COUNTS_TOPIC)
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.connect(f"tcp://{host}:{port}")
    hub.socket()
    with pytest.raises(zmq.ZMQError):  # a second process binding the port would fail the same way
        zmq.Context.instance().socket(zmq.PUB).bind(f"tcp://{host}:{port}")
    got: dict[int, object] = {}
    seqs: list[int] = []
    beats: list[Heartbeat] = []
    for _ in range(50):  # PUB/SUB joins asynchronously: resend until both rooms arrive
        hub.send("counts", [1], encode_report(1, "r1", np.ones((2, 3), np.int32), 2))
        spoke.send("started", [2], encode_started([2]))
        spoke.send("counts", [2], encode_report(2, "r2", None, 2, "prefix loaded from the hierarchical cache"))
        try:
            t_end = time.monotonic() + 0.2  # heartbeats arrive every 50 ms: read for a while, then resend
            while time.monotonic() < t_end:
                header, body = decode_message(sub.recv_multipart())
                seqs.append(header.seq)
                if isinstance(body, CountsReport):
                    got[body.room] = body
                elif isinstance(body, Heartbeat):
                    beats.append(body)
        except zmq.Again:
            pass
        if len(got) == 2 and beats and 2 in beats[-1].reported:
            break
    sub.close(0)
    assert set(got) == {1, 2}
    assert got[1].array().sum() == 6 and got[1].unavailable is None  # type: ignore[attr-defined]
    assert got[2].unavailable == "prefix loaded from the hierarchical cache"  # type: ignore[attr-defined]
    # One sequence for the whole server, every message numbered once; heartbeats list both ranks' rooms.
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert {1, 2} <= set(beats[-1].reported) and 2 in beats[-1].started and beats[-1].window_s == 1.0


def test_port_zero_binds_a_free_port_and_reports_it(tmp_path):
    port_file = str(tmp_path / "port")
    pub = counts_publisher.Publisher("127.0.0.1", 0, hub=True, port_file=port_file)
    pub.socket()
    port = int(open(port_file).read())
    assert port > 0 and pub.endpoint == f"tcp://127.0.0.1:{port}"
    other = counts_publisher.Publisher("127.0.0.1", 0, hub=True, port_file=str(tmp_path / "port2"))
    assert other.ipc != pub.ipc  # two servers on one host never share the local endpoint
