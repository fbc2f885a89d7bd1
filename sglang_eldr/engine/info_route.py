"""`GET /eldr/info` on an ELDR server: its ELDR role and where its counts publisher listens.

`launch_server` describes the server in `SGLANG_ELDR_INFO` (a `ServerInfo`, JSON); in the launcher
process the plugin registers a BEFORE hook on SGLang's `http_server.launch_server` that adds the route
to SGLang's FastAPI app just before it starts serving. The router reads it to find each prefill's
counts endpoint (docs/protocol.md).
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import msgspec

ENV_INFO = "SGLANG_ELDR_INFO"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
T_HTTP_LAUNCH = "sglang.srt.entrypoints.http_server.launch_server"


class ServerInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the ELDR side of one server was given."""

    mode: str  # SGLang's --disaggregation-mode: null | prefill | decode
    capture: bool
    bootstrap_port: int | None = None
    counts_host: str | None = None  # --eldr-counts-host (PD prefill); None: the server's --host
    counts_port: int | None = None  # None with a port file: the OS picks it when the publisher binds
    counts_port_file: str | None = None
    advertise_host: str | None = None  # --eldr-counts-advertise-host

    def info(self, server_host: str | None) -> dict:
        """The description GET /eldr/info serves; `server_host` is the address SGLang serves on. The
        counts host is null for a wildcard bind: the router then uses the host of the URL it has."""
        endpoint = None
        if self.counts_port is not None or self.counts_port_file is not None:
            bound = self.counts_host or server_host
            host = self.advertise_host or (None if bound in WILDCARD_HOSTS or bound is None else bound)
            endpoint = {"host": host, "port": self.counts_port or self._bound_port()}
        return {"eldr": True, "mode": self.mode, "capture": self.capture,
                "bootstrap_port": self.bootstrap_port, "counts": endpoint}

    def _bound_port(self) -> int | None:
        """The port the publisher bound (null until the scheduler has started)."""
        try:
            with open(self.counts_port_file or "") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def export(self) -> None:
        os.environ[ENV_INFO] = msgspec.json.encode(self).decode()


def http_launch_before(server_args: Any, *args: Any, **kwargs: Any) -> None:
    from fastapi.responses import JSONResponse
    from sglang.srt.entrypoints.http_server import app

    described = msgspec.json.decode(os.environ[ENV_INFO], type=ServerInfo)
    host = getattr(server_args, "host", None)

    async def eldr_info() -> JSONResponse:
        return JSONResponse(described.info(host))  # reads the port file until the publisher has bound

    app.add_api_route("/eldr/info", eldr_info, methods=["GET"])
    return None


def register() -> None:
    """Only in the launcher process (the one that serves HTTP), and only for a described server."""
    if multiprocessing.parent_process() is not None or not os.environ.get(ENV_INFO):
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(T_HTTP_LAUNCH, http_launch_before, HookType.BEFORE)
