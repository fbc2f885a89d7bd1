"""Guards for SGLang code paths that assume a CUDA device, applied only when ELDR serves on CPU.

* ``mem_cache.pool_host.common._cuda_host_register``: pinning a host pool with ``cudaHostRegister``
  (host KV pools, routed-experts capture) fails with a CPU-only torch; on CPU there is nothing to pin.
* ``SchedulerDisaggregationPrefillMixin._send_kv_chunk``: a sender advertising
  ``supports_host_tensor_indices`` (mooncake) makes the prefill side pin memory and record a
  ``torch.cuda.Event``; on CPU the plain ``kv_to_page_indices`` branch is taken instead.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

T_HOST_REGISTER = "sglang.srt.mem_cache.pool_host.common._cuda_host_register"
T_SEND_KV_CHUNK = "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin._send_kv_chunk"


def host_register_around(original, buffer, *args, **kwargs):
    if not torch.cuda.is_available():
        return None  # CPU-only: nothing to register
    return original(buffer, *args, **kwargs)


def send_kv_chunk_around(original, scheduler, req, *args, **kwargs):
    sender = getattr(req, "disagg_kv_sender", None)
    if sender is not None and getattr(sender, "supports_host_tensor_indices", False):
        try:
            sender.supports_host_tensor_indices = False  # instance attribute shadows the class flag
        except AttributeError:
            logger.warning("ELDR CPU guard: cannot clear supports_host_tensor_indices on %s",
                           type(sender).__name__)
    return original(scheduler, req, *args, **kwargs)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(T_HOST_REGISTER, host_register_around, HookType.AROUND)
    HookRegistry.register(T_SEND_KV_CHUNK, send_kv_chunk_around, HookType.AROUND)
