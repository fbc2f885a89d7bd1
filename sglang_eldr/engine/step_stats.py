"""Decode-step statistics for benchmarks: distinct experts per MoE layer in each decode batch.

An AFTER hook on `ModelRunner.forward` reads the decode batch's top-k ids from the device buffer of
SGLang's routed-experts capturer (written inside the forward, CUDA graphs included) and
accumulates, per decode step, the number of distinct experts per MoE layer. Totals are rewritten to
a JSON file (at most twice a second) that benchmarks read before and after a run. It costs one host
sync per decode step and needs capture on the decoder (`--eldr-capture`), so it is only on when
`SGLANG_ELDR_STEP_STATS_FILE` is set (bench/compare_policies.py does that).

With `SGLANG_ELDR_STEP_TRACE_FILE` also set, every decode step appends one JSON line
`{"tokens", "distinct_pairs", "forward_s"}`: the batch size, the distinct (layer, expert) pairs it
activated and the wall time of `ModelRunner.forward` (a BEFORE hook takes the start; on a GPU both
ends synchronise the device). bench/measure_step_cost.py fits its cost profiles to these lines.
"""

from __future__ import annotations

import json
import os
import time

import torch

from sglang_eldr.engine.moe_shape import moe_layer_ids, moe_shape_from_hf_config

T_FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner.forward"


class _Stats:
    def __init__(self, path: str, trace_path: str | None = None):
        self.path = path
        self.trace = open(trace_path, "a", buffering=1) if trace_path else None
        self.started = 0.0
        self.steps = 0
        self.distinct_sum = 0.0
        self.tokens_sum = 0
        self.last_write = 0.0
        self.layers: torch.Tensor | None = None
        self.num_experts = 0

    def add(self, distinct_per_layer: float, tokens: int) -> None:
        self.steps += 1
        self.distinct_sum += distinct_per_layer
        self.tokens_sum += tokens
        now = time.monotonic()
        if now - self.last_write >= 0.5:
            self.write()
            self.last_write = now

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"decode_steps": self.steps, "distinct_sum": self.distinct_sum, "tokens_sum": self.tokens_sum}, f)
        os.replace(tmp, self.path)


_STATS: _Stats | None = None


def _sync(model_runner) -> None:
    if str(getattr(model_runner, "device", "cpu")).startswith("cuda"):
        torch.cuda.synchronize()


def forward_before(model_runner, forward_batch, *args, **kwargs):
    if _STATS is not None and _STATS.trace is not None:
        _sync(model_runner)
        _STATS.started = time.perf_counter()
    return None


def forward_after(result, model_runner, forward_batch, *args, **kwargs):
    from sglang.srt.state_capturer.routed_experts import get_global_experts_capturer

    if _STATS is not None and _STATS.trace is not None:
        _sync(model_runner)
        elapsed = time.perf_counter() - _STATS.started
    capturer = get_global_experts_capturer()
    mode = getattr(forward_batch, "forward_mode", None)
    if _STATS is None or capturer is None or mode is None or not mode.is_decode():
        return None
    loc = getattr(forward_batch, "out_cache_loc", None)
    if loc is None or loc.numel() == 0:
        return None
    if _STATS.layers is None:
        hf = model_runner.model_config.hf_config
        shape = moe_shape_from_hf_config(hf)
        if shape is None:
            return None
        _STATS.layers = torch.tensor(moe_layer_ids(hf), dtype=torch.int64, device=capturer.device_cache.buffer.device)
        _STATS.num_experts = shape.num_experts
    n = int(loc.numel())
    ids = capturer.device_cache.buffer[:n, :, : capturer.topk_size].index_select(1, _STATS.layers).to(torch.int64)
    layers = ids.shape[1]
    seen = torch.zeros((layers, _STATS.num_experts), dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.permute(1, 0, 2).reshape(layers, -1), True)
    per_layer = seen.sum(dim=1)
    _STATS.add(float(per_layer.float().mean()), n)
    if _STATS.trace is not None:
        _STATS.trace.write(json.dumps({"tokens": n, "distinct_pairs": int(per_layer.sum()),
                                       "forward_s": elapsed}) + "\n")
    return None


def register(path: str, trace_path: str | None = None) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _STATS
    _STATS = _Stats(path, trace_path)
    if trace_path:
        HookRegistry.register(T_FORWARD, forward_before, HookType.BEFORE)
    HookRegistry.register(T_FORWARD, forward_after, HookType.AFTER)
