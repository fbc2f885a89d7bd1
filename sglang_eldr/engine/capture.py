"""Scheduler-process hooks: capture routed experts into the signature table, reduce counts per request.

* ``ModelRunner.forward`` (AROUND): allocates the table on first use (sized like the KV pool, on the
  model's device) and exposes the forward's ``out_cache_loc`` to the capture hook for KV-writing
  forwards (extend, mixed, decode). Decode tokens are captured too: the radix cache also caches output
  tokens, so a later prompt can hit slots that were written by a decode step.
* ``capture_routed_experts_if_allowed`` (AFTER): SGLang's single top-k capture site for every MoE
  backend; writes the layer's ids into the table rows of the forward's KV slots. Device ops only.
* ``SchedulerBatchResultProcessor.process_batch_result_prefill`` and, on a PD prefill server,
  ``SchedulerDisaggregationPrefillMixin.process_batch_result_disagg_prefill`` (BEFORE): for every request whose
  prefill completes in this batch and that asked for counts, gathers its prompt's KV slots from
  ``req_to_token`` and reduces the table into ``[L, E]`` counts (one bincount for the batch), before
  SGLang may release the request's KV.
* ``SchedulerOutputStreamer.is_request_level_customized_info_key`` (AFTER): marks the counts keys as
  request-level so SGLang's ``customized_info`` channel carries them once to the tokenizer manager.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import torch

from sglang_eldr.engine.counts_wire import META_KEY, META_SHAPE_KEY, REQUEST_FIELD, encode_counts
from sglang_eldr.engine.moe_shape import moe_shape_from_hf_config
from sglang_eldr.engine.settings import EldrSettings
from sglang_eldr.engine.signature_cache import SignatureTable

logger = logging.getLogger(__name__)

T_FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
T_CAPTURE = "sglang.srt.layers.moe.topk.capture_routed_experts_if_allowed"
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


class _CaptureState:
    def __init__(self, settings: EldrSettings):
        self.settings = settings
        self.table: Optional[SignatureTable] = None
        self.unavailable_reason: Optional[str] = None  # dense model, unknown pool...
        self.loc: Optional[torch.Tensor] = None  # out_cache_loc of the running forward
        self._warned_shape = False


_STATE: Optional[_CaptureState] = None


def get_table() -> Optional[SignatureTable]:
    return _STATE.table if _STATE is not None else None


def _kv_pool_rows_and_bytes(model_runner) -> tuple[Optional[int], Optional[int]]:
    pool = getattr(model_runner, "token_to_kv_pool", None)
    if pool is None:
        return None, None
    rows = None
    kb = getattr(pool, "k_buffer", None)
    if isinstance(kb, (list, tuple)) and kb and isinstance(kb[0], torch.Tensor):
        rows = int(kb[0].shape[0])
    if rows is None and getattr(pool, "size", None) is not None:
        rows = int(pool.size) + int(getattr(model_runner, "page_size", 1) or 1)
    nbytes = None
    try:
        k, v = pool.get_kv_size_bytes()
        nbytes = int(k) + int(v)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return rows, nbytes


def _ensure_table(model_runner) -> Optional[SignatureTable]:
    st = _STATE
    assert st is not None, "ELDR capture used before it was installed"
    if st.table is not None or st.unavailable_reason is not None:
        return st.table
    shape = moe_shape_from_hf_config(getattr(model_runner.model_config, "hf_config", None))
    if shape is None:
        st.unavailable_reason = "the model is not a mixture-of-experts model"
        logger.info("ELDR: %s; expert capture disabled", st.unavailable_reason)
        return None
    rows, kv_bytes = _kv_pool_rows_and_bytes(model_runner)
    if rows is None:
        st.unavailable_reason = "the KV pool layout is not supported by ELDR capture"
        logger.warning("ELDR: %s; expert capture disabled", st.unavailable_reason)
        return None
    st.table = SignatureTable(shape, rows, model_runner.device,
                              page_size=int(getattr(model_runner, "page_size", 1) or 1),
                              storage=st.settings.storage)
    ratio = (st.table.nbytes / kv_bytes) if kv_bytes else None
    logger.info(
        "ELDR signature table: storage=%s shape=%s dtype=%s bytes=%d kv_pool_bytes=%s ratio=%s",
        st.table.storage,
        tuple(st.table.data.shape), st.table.data.dtype,
        st.table.nbytes, kv_bytes, f"{ratio:.5f}" if ratio is not None else "n/a",
    )
    if st.settings.stats_file:
        try:
            with open(st.settings.stats_file, "w") as f:
                json.dump({
                    "storage": st.table.storage,
                    "table_bytes": st.table.nbytes,
                    "kv_pool_bytes": kv_bytes,
                    "kv_slots": rows,
                    "page_size": st.table.page_size,
                    "num_layers": shape.num_layers,
                    "num_experts": shape.num_experts,
                    "top_k": shape.top_k,
                }, f)
        except OSError as e:
            logger.warning("ELDR: cannot write stats file: %s", e)
    return st.table


def _writes_kv(forward_batch) -> bool:
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is None:
        return False
    try:
        if mode.is_target_verify() or mode.is_idle():
            return False
        return bool(mode.is_extend() or mode.is_decode())
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------- hooks
def forward_around(original, model_runner, forward_batch, *args, **kwargs):
    st = _STATE
    loc = getattr(forward_batch, "out_cache_loc", None)
    if st is None or loc is None or not _writes_kv(forward_batch):
        return original(model_runner, forward_batch, *args, **kwargs)
    table = _ensure_table(model_runner)
    if table is None:
        return original(model_runner, forward_batch, *args, **kwargs)
    st.loc = table.begin_forward(loc)
    try:
        return original(model_runner, forward_batch, *args, **kwargs)
    finally:
        st.loc = None
        table.end_forward()


def capture_after(result, topk_config, layer_id, topk_ids, *args, **kwargs):
    st = _STATE
    if st is None or st.loc is None or layer_id is None or st.table is None:
        return None
    if not getattr(topk_config, "allow_routed_experts_capture", True):
        return None
    if topk_ids.shape[0] < st.loc.shape[0]:
        if not st._warned_shape:
            st._warned_shape = True
            logger.warning("ELDR: top-k rows (%d) < KV writes (%d); not captured",
                           topk_ids.shape[0], st.loc.shape[0])
        return None
    st.table.write(int(layer_id), st.loc, topk_ids)
    return None


def _wants_counts(req) -> bool:
    cp = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    return isinstance(cp, dict) and cp.get(REQUEST_FIELD) is True


def prefill_result_before(processor, batch, result, *args, **kwargs):
    st = _STATE
    if st is None or st.table is None or not getattr(processor, "is_generation", True):
        return None
    decoding = getattr(batch, "decoding_reqs", None) or ()
    todo = []
    for req in batch.reqs:
        if not _wants_counts(req) or getattr(req, "_eldr_counts_done", False):
            continue
        if getattr(req, "inflight_middle_chunks", 0) > 0 or req.finished() or getattr(req, "is_retracted", False):
            continue
        if req in decoding:
            continue
        todo.append(req)
    if not todo:
        return None
    copy_done = getattr(result, "copy_done", None)
    if copy_done is not None:  # overlap scheduler: the forward may still be running
        copy_done.synchronize()
    r2t = processor.req_to_token_pool.req_to_token
    slot_lists = [r2t[req.kv.req_pool_idx, : len(req.origin_input_ids)] for req in todo]
    counts = st.table.counts(slot_lists).cpu().numpy()
    for req, c in zip(todo, counts):
        text, shape = encode_counts(c)
        if req.customized_info is None:
            req.customized_info = {}
        req.customized_info[META_KEY] = [text]
        req.customized_info[META_SHAPE_KEY] = [shape]
        req._eldr_counts_done = True
    return None


def request_level_key_after(result, streamer, key, *args, **kwargs):
    if key in (META_KEY, META_SHAPE_KEY):
        return True
    return None


def register(settings: EldrSettings) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _STATE
    _STATE = _CaptureState(settings)
    HookRegistry.register(T_FORWARD, forward_around, HookType.AROUND)
    HookRegistry.register(T_CAPTURE, capture_after, HookType.AFTER)
    HookRegistry.register(T_PREFILL_RESULT, prefill_result_before, HookType.BEFORE)
    HookRegistry.register(T_DISAGG_PREFILL_RESULT, prefill_result_before, HookType.BEFORE)
    HookRegistry.register(T_REQUEST_LEVEL_KEY, request_level_key_after, HookType.AFTER)
