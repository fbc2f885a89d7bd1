"""ELDR engine settings, passed from ``sglang_eldr.launch_server`` to every SGLang process by environment.

SGLang starts its scheduler and detokenizer as separate processes and loads plugins in each; the
environment is the one channel that reaches all of them before any hook runs. The plugin does nothing
unless ``SGLANG_ELDR=1``, so a stock ``python -m sglang.launch_server`` with this package installed
behaves exactly as stock SGLang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_ENABLE = "SGLANG_ELDR"
ENV_CAPTURE = "SGLANG_ELDR_CAPTURE"
ENV_CPU_GUARDS = "SGLANG_ELDR_CPU_GUARDS"
ENV_STATS_FILE = "SGLANG_ELDR_STATS_FILE"
ENV_COUNTS_PORT = "SGLANG_ELDR_COUNTS_PORT"
ENV_COUNTS_HOST = "SGLANG_ELDR_COUNTS_HOST"
ENV_COUNTS_PORT_FILE = "SGLANG_ELDR_COUNTS_PORT_FILE"
ENV_STEP_STATS_FILE = "SGLANG_ELDR_STEP_STATS_FILE"
ENV_STEP_TRACE_FILE = "SGLANG_ELDR_STEP_TRACE_FILE"


def _flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EldrSettings:
    enabled: bool
    capture: bool
    cpu_guards: bool
    stats_file: str | None
    counts_port: int | None = None  # PD prefill: publish each request's counts here (ZMQ PUB)
    counts_host: str | None = None  # the address the counts publisher binds; None: the server's --host
    counts_port_file: str | None = None  # port 0: the OS picks the port; the publisher writes it here
    step_stats_file: str | None = None  # decode: distinct experts per step, for benchmarks
    step_trace_file: str | None = None  # decode: one JSON line per step (tokens, pairs, forward time)

    @classmethod
    def from_env(cls) -> "EldrSettings":
        enabled = _flag(ENV_ENABLE, False)
        return cls(
            enabled=enabled,
            capture=enabled and _flag(ENV_CAPTURE, True),
            cpu_guards=enabled and _flag(ENV_CPU_GUARDS, False),
            stats_file=os.environ.get(ENV_STATS_FILE) or None,
            counts_port=int(os.environ[ENV_COUNTS_PORT]) if os.environ.get(ENV_COUNTS_PORT) else None,
            counts_host=os.environ.get(ENV_COUNTS_HOST) or None,
            counts_port_file=os.environ.get(ENV_COUNTS_PORT_FILE) or None,
            step_stats_file=os.environ.get(ENV_STEP_STATS_FILE) or None,
            step_trace_file=os.environ.get(ENV_STEP_TRACE_FILE) or None,
        )
