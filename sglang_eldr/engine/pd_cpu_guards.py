"""Guards for SGLang PD disaggregation on CPU, beyond the device guards in ``cpu_guards``.

Registered by the plugin when ELDR serves on CPU (``settings.cpu_guards``), through SGLang's
``HookRegistry`` only. The two PD code paths that assume CUDA (pinning host pools with
``cudaHostRegister``; the prefill side's pinned-memory/``torch.cuda.Event`` path in ``_send_kv_chunk``)
are already guarded by ``cpu_guards``; this module does not guard them again.

* Decode retraction backup. A decode server keeps the KV of a request it retracts (KV pool full) so the
  request can resume. Left unset, SGLang 0.5.23 picks ``host_pool`` for a decode server: a HiCache host
  pool, sized from the machine's available RAM minus a fixed 10 GiB reserve (a GPU-host assumption, where
  the KV pool lives on the device). On a CPU host the KV pool is already in RAM, and when less than about
  10 GiB is available the decode server refuses to start ("No host memory is left for HiCache after the
  10 GiB reserve"). On CPU the guard defaults the choice to ``cpu_tensor`` (per-request copies of the
  retracted KV, taken only when a retraction happens), unless ``--disaggregation-decode-retraction-backup``
  is given. Retraction and resume with ``cpu_tensor`` were checked token-identical on CPU.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

T_RESOLVE_SERVER_ARGS = "sglang.srt.server_args.ServerArgs.resolve_once"
CPU_RETRACTION_BACKUP = "cpu_tensor"


def _is_cpu(device) -> bool:
    return device is not None and str(device).split(":", 1)[0] == "cpu"


def resolve_once_before(server_args, *args, **kwargs):
    """BEFORE ``ServerArgs.resolve_once``: on a CPU decode server, default the retraction backup."""
    if getattr(server_args, "_resolution_finished", False):
        return None  # child processes receive resolved arguments
    if (
        _is_cpu(getattr(server_args, "device", None))
        and getattr(server_args, "disaggregation_mode", None) == "decode"
        and getattr(server_args, "disaggregation_decode_retraction_backup", None) is None
    ):
        server_args.disaggregation_decode_retraction_backup = CPU_RETRACTION_BACKUP
        logger.info("ELDR PD CPU guard: --disaggregation-decode-retraction-backup defaults to %s on CPU "
                    "(SGLang's host_pool default sizes a HiCache pool from free RAM minus 10 GiB)",
                    CPU_RETRACTION_BACKUP)
    return None


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(T_RESOLVE_SERVER_ARGS, resolve_once_before, HookType.BEFORE)
