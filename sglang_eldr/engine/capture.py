"""Prompt expert counts from SGLang's own routed-experts capturer.

SGLang's ``RoutedExpertsCapturer`` (``state_capturer/routed_experts.py``, on with
``--enable-return-routed-experts``, which ``launch_server`` sets when capture is on) writes every MoE
layer's top-k ids into a static device buffer inside the forward (so inside CUDA graphs as well),
keeps this DP rank's tokens, and copies them to a host cache indexed by KV slot
(``host_cache.buffer[out_cache_loc] = topk``), on the overlap scheduler's copy stream. That host
cache is co-indexed with the KV cache: a request's prompt rows are read back through
``req_to_token[req_pool_idx, :prompt_len]``, so a prefix served from the radix cache contributes
exactly what the request that computed it wrote, and a reused slot holds what its new owner wrote.

When a request's prefill ends (``process_batch_result_prefill``, or on a PD prefill server
``process_batch_result_disagg_prefill``; BEFORE hooks, so the KV slots are still the request's),
the counts of every request that asked (``return_eldr_counts``) or that the PD router waits for are
reduced in one gather and one bincount for the whole batch. They go to the client through SGLang's
``customized_info`` channel and, on a PD prefill server, to the router through the counts publisher.

A request whose rows cannot be trusted gets no counts but a reason (``unavailable``): its prefix
was loaded from the hierarchical (host) cache, whose load-back does not restore routed-expert rows,
or the capturer is missing or returned ids out of range. The router then routes it least-loaded
and counts the fallback; stale rows are never reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from sglang_eldr.engine import counts_publisher
from sglang_eldr.engine.moe_shape import MoeShape, moe_layer_ids, moe_shape_from_hf_config
from sglang_eldr.engine.settings import EldrSettings
from sglang_eldr.wire import META_KEY, META_SHAPE_KEY, REQUEST_FIELD, encode_counts

logger = logging.getLogger(__name__)

T_PREFILL_RESULT = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_prefill"
)
# PD prefill servers process results here instead (``self`` is the Scheduler; same arguments).
T_DISAGG_PREFILL_RESULT = (
    "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin.process_batch_result_disagg_prefill"
)
T_REQUEST_LEVEL_KEY = (
    "sglang.srt.managers.scheduler_components.output_streamer."
    "SchedulerOutputStreamer.is_request_level_customized_info_key"
)


def reduce_counts(host_rows: torch.Tensor, slot_lists: Sequence[torch.Tensor], layers: torch.Tensor,
                  num_experts: int) -> torch.Tensor:
    """Counts ``[n, L, E]`` (int32) of ``n`` requests from a per-KV-slot top-k table.

    ``host_rows``: ``[slots, hidden_layers, top_k]`` int32 expert ids (the capturer's host cache);
    ``slot_lists``: each request's KV slots; ``layers``: the MoE layer ids, in order.
    ValueError when an id is out of ``[0, E)`` (the rows cannot be trusted).
    """
    n, L = len(slot_lists), int(layers.numel())
    if n == 0:
        return torch.zeros((0, L, num_experts), dtype=torch.int32)
    lengths = torch.tensor([int(s.numel()) for s in slot_lists], dtype=torch.int64)
    slots = torch.cat([s.reshape(-1) for s in slot_lists]).to(device="cpu", dtype=torch.int64)
    ids = host_rows.index_select(0, slots).index_select(1, layers).to(torch.int64)  # [T, L, k]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"routed-expert ids out of range [0, {num_experts}): "
                         f"min {int(ids.min())}, max {int(ids.max())}")
    owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), lengths)  # [T]
    flat = (owner[:, None, None] * L + torch.arange(L, dtype=torch.int64)[None, :, None]) * num_experts + ids
    return torch.bincount(flat.reshape(-1), minlength=n * L * num_experts).reshape(n, L, num_experts).to(torch.int32)


@dataclass
class ReductionTimer:
    """In-process cost of the reductions (benchmarks read it from the stats file)."""

    batches: int = 0
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    per_batch_ms: list[float] = field(default_factory=list)

    def add(self, requests: int, tokens: int, seconds: float) -> None:
        self.batches += 1
        self.requests += requests
        self.tokens += tokens
        self.seconds += seconds
        if len(self.per_batch_ms) < 10_000:
            self.per_batch_ms.append(seconds * 1e3)


class _Capture:
    def __init__(self, settings: EldrSettings):
        self.settings = settings
        self.shape: Optional[MoeShape] = None
        self.layers: Optional[torch.Tensor] = None
        self.unavailable_reason: Optional[str] = None  # dense model, capturer missing...
        self.timer = ReductionTimer()
        self.unavailable: dict[str, int] = {}

    def geometry(self, owner: Any) -> Optional[tuple[MoeShape, torch.Tensor]]:
        if self.shape is not None and self.layers is not None:
            return self.shape, self.layers
        if self.unavailable_reason is not None:
            return None
        hf = getattr(getattr(owner, "model_config", None), "hf_config", None)
        shape = moe_shape_from_hf_config(hf)
        if shape is None:
            self.unavailable_reason = "the model is not a mixture-of-experts model"
            return None
        self.shape = shape
        self.layers = torch.tensor(moe_layer_ids(hf), dtype=torch.int64)
        logger.info("ELDR counts from SGLang's routed-experts capturer: %d MoE layers of %d, %d experts, top-%d",
                    len(self.layers), shape.num_layers, shape.num_experts, shape.top_k)
        return self.shape, self.layers

    def note_unavailable(self, reason: str) -> None:
        self.unavailable[reason] = self.unavailable.get(reason, 0) + 1


_STATE: Optional[_Capture] = None


def _capturer():
    from sglang.srt.state_capturer.routed_experts import get_global_experts_capturer

    return get_global_experts_capturer()


def _wants_counts(req) -> bool:
    cp = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    return isinstance(cp, dict) and cp.get(REQUEST_FIELD) is True


def _prefill_done(req, batch) -> bool:
    """The request's last prefill chunk ran in this batch (it is not a decode or retracted one)."""
    if getattr(req, "inflight_middle_chunks", 0) > 0 or req.finished() or getattr(req, "is_retracted", False):
        return False
    return req not in (getattr(batch, "decoding_reqs", None) or ())


def _to_publish(req) -> bool:
    return (counts_publisher.active() and getattr(req, "bootstrap_room", None) is not None
            and not getattr(req, "_eldr_published", False))


def _to_return(req) -> bool:
    return _wants_counts(req) and not getattr(req, "_eldr_counts_done", False)


def _host_prefix(req) -> bool:
    """Part of the prefix came from HiCache (host or storage), whose load-back writes no expert rows."""
    return bool(getattr(req, "cached_tokens_host", 0) or getattr(req, "storage_hit_length", 0))


def _ensure_host_rows(result) -> None:
    """With the overlap scheduler, SGLang writes this batch's host rows in the result processor we
    run before: wait for its copy and write them now (SGLang then finds nothing left to do)."""
    pending = getattr(result, "routed_experts_output", None)
    if pending is None:
        return
    copy_done = getattr(result, "copy_done", None)
    if copy_done is not None:
        copy_done.synchronize()
    pending.finalize()
    result.routed_experts_output = None


def prefill_result_before(owner: Any, batch: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE both prefill result processors; ``owner`` is the result processor or the Scheduler."""
    st = _STATE
    if st is None or not getattr(owner, "is_generation", True):
        return None
    todo = [r for r in batch.reqs if (_to_publish(r) or _to_return(r)) and _prefill_done(r, batch)]
    if not todo:
        return None
    started = time.perf_counter()
    geometry = st.geometry(owner)
    capturer = _capturer()
    counts: dict[int, np.ndarray] = {}
    reasons: dict[int, str] = {}
    if geometry is None:
        reasons = {id(r): st.unavailable_reason or "no MoE geometry" for r in todo}
    elif capturer is None:
        reasons = {id(r): "SGLang's routed-experts capturer is not active" for r in todo}
    else:
        shape, layers = geometry
        for r in todo:
            if _host_prefix(r):
                reasons[id(r)] = "prefix loaded from the hierarchical cache"
        good = [r for r in todo if id(r) not in reasons]
        if good:
            try:
                _ensure_host_rows(result)
                r2t = owner.req_to_token_pool.req_to_token
                slot_lists = [r2t[r.kv.req_pool_idx, : len(r.origin_input_ids)] for r in good]
                out = reduce_counts(capturer.host_cache.buffer, slot_lists, layers, shape.num_experts).numpy()
                counts = {id(r): c for r, c in zip(good, out)}
            except Exception as e:  # noqa: BLE001 - never break serving; the request falls back
                logger.warning("ELDR: counts reduction failed (%s) for %d request(s)", e, len(good))
                reasons.update({id(r): f"counts reduction failed: {e}" for r in good})
    st.timer.add(len(todo), sum(len(r.origin_input_ids) for r in todo), time.perf_counter() - started)
    if st.settings.stats_file:
        _write_stats(st.settings.stats_file, capturer)
    for r in todo:
        c = counts.get(id(r))
        if c is None:
            st.note_unavailable(reasons[id(r)])
        if _to_publish(r):
            counts_publisher.publish(r, c, reasons.get(id(r)))
            r._eldr_published = True
        if _to_return(r) and c is not None:
            text, shape_list = encode_counts(c)
            if r.customized_info is None:
                r.customized_info = {}
            r.customized_info[META_KEY] = [text]
            r.customized_info[META_SHAPE_KEY] = [shape_list]
            r._eldr_counts_done = True
    return None


def _write_stats(path: str, capturer: Any) -> None:
    data = stats()
    if capturer is not None:
        buf = capturer.host_cache.buffer
        data["host_cache_shape"] = list(buf.shape)
        data["host_cache_bytes"] = int(buf.numel() * buf.element_size())
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)
    except OSError as e:
        logger.warning("ELDR: cannot write stats file: %s", e)


def request_level_key_after(result, streamer, key, *args, **kwargs):
    if key in (META_KEY, META_SHAPE_KEY):
        return True
    return None


def stats() -> dict:
    """The reduction timings and fallback reasons so far (for the stats file)."""
    st = _STATE
    if st is None:
        return {}
    t = st.timer
    return {"reduce_batches": t.batches, "reduce_requests": t.requests, "reduce_tokens": t.tokens,
            "reduce_seconds": t.seconds, "reduce_ms_per_batch": t.per_batch_ms[-1000:],
            "unavailable": dict(st.unavailable)}


def register(settings: EldrSettings) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _STATE
    _STATE = _Capture(settings)
    HookRegistry.register(T_PREFILL_RESULT, prefill_result_before, HookType.BEFORE)
    HookRegistry.register(T_DISAGG_PREFILL_RESULT, prefill_result_before, HookType.BEFORE)
    HookRegistry.register(T_REQUEST_LEVEL_KEY, request_level_key_after, HookType.AFTER)
