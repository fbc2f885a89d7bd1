"""Start and stop real SGLang servers for the engine tests (one process group per server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = float(os.environ.get("ELDR_SERVER_STARTUP_TIMEOUT", "240"))


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort (non-Linux)
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m sglang_eldr.launch_server`` (eldr=True) or stock ``python -m sglang.launch_server``."""

    def __init__(self, model_dir: str, log_path: Path, *, eldr: bool = True, args: tuple = (),
                 env: Optional[dict] = None):
        self.model_dir = str(model_dir)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        module = "sglang_eldr.launch_server" if eldr else "sglang.launch_server"
        cmd = [sys.executable, "-m", module, "--model-path", self.model_dir,
               "--host", "127.0.0.1", "--port", str(self.port), *args]
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
        for k in ("SGLANG_ELDR", "SGLANG_ELDR_CAPTURE", "SGLANG_ELDR_STORAGE", "SGLANG_ELDR_CPU_GUARDS"):
            e.pop(k, None)
        e.update(env or {})
        self.cmd = cmd
        self._log = open(self.log_path, "wb")
        # never inherit the repo as cwd: a folder named like a package would shadow it
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=e,
                                     cwd=str(self.log_path.parent), start_new_session=True,
                                     preexec_fn=_die_with_parent)

    # ------------------------------------------------------------------ lifecycle
    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/model_info", timeout=2) as r:
                    if r.status == 200 and "fired up" in self.log_text():
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this Popen created
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ------------------------------------------------------------------ HTTP
    def post(self, path: str, payload: Any, timeout: float = 300) -> tuple[int, Any]:
        data = json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json"})
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

    def flush_cache(self, timeout: float = 30.0) -> None:
        """Flush the radix cache. SGLang refuses (400) until the scheduler has retired the last batch,
        which can lag the HTTP response by one loop iteration: retry briefly."""
        deadline = time.monotonic() + timeout
        while True:
            req = urllib.request.Request(self.url + "/flush_cache", data=b"", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code != 400 or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
