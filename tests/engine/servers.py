"""Real SGLang servers for the engine and PD tests: `sglang_eldr.server_process` plus the HTTP
helpers these tests use."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from sglang_eldr.server_process import ServerProcess, free_port

__all__ = ["Server", "free_port", "post_json"]

STARTUP_TIMEOUT_S = float(os.environ.get("ELDR_SERVER_STARTUP_TIMEOUT", "240"))


def post_json(url: str, payload: Any, timeout: float = 300) -> tuple[int, Any]:
    """POST `payload` as JSON; (status, decoded JSON body, or its text when it is not JSON)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return r.status, (json.loads(body) if body else None)
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, body.decode(errors="replace")


HOST = "127.0.0.1"  # these tests' own address: every engine server on this machine's loopback


class Server(ServerProcess):
    """``python -m sglang_eldr.launch_server`` (eldr=True) or stock ``python -m sglang.launch_server``,
    started at once; `wait_ready()` blocks until it has warmed up."""

    def __init__(self, model_dir: str | Path, log_path: Path, *, eldr: bool = True, args: tuple = (),
                 env: Optional[dict] = None):
        port = free_port(HOST)
        module = "sglang_eldr.launch_server" if eldr else "sglang.launch_server"
        cmd = [sys.executable, "-m", module, "--model-path", str(model_dir),
               "--host", HOST, "--port", str(port), *args]
        e = dict(os.environ)
        e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        if not eldr:  # stock SGLang on CPU needs these by hand
            e["SGLANG_USE_CPU_ENGINE"] = "1"
            if "--device" not in args:
                cmd += ["--device", "cpu"]
            if "--disable-overlap-schedule" not in args:
                cmd += ["--disable-overlap-schedule"]
            if "--max-total-tokens" not in args:
                cmd += ["--max-total-tokens", "65536"]
            if "--sleep-on-idle" not in args:
                cmd += ["--sleep-on-idle"]
        for k in ("SGLANG_ELDR", "SGLANG_ELDR_CAPTURE", "SGLANG_ELDR_CPU_GUARDS", "SGLANG_ELDR_INFO"):
            e.pop(k, None)
        e.update(env or {})
        super().__init__(role="plain", port=port, log=Path(log_path), host=HOST, cmd=cmd, env=e)
        self.model_dir = str(model_dir)
        self.start()

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S, path: str = "/model_info") -> "Server":
        super().wait_ready(timeout_s, path)
        return self

    # ------------------------------------------------------------------ HTTP
    def post(self, path: str, payload: Any, timeout: float = 300) -> tuple[int, Any]:
        return post_json(self.url + path, payload, timeout)

    def generate(self, input_ids, *, max_new_tokens: int = 1, counts: Optional[bool] = True,
                 **extra) -> dict:
        payload = {"input_ids": list(map(int, input_ids)),
                   "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                       "ignore_eos": True}}
        if counts is not None:
            payload["return_eldr_counts"] = counts
        payload.update(extra)
        status, body = self.post("/generate", payload)
        if status != 200:
            raise AssertionError(f"/generate -> {status}: {body}")
        return body

