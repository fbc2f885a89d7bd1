"""One server process (an SGLang server or the router) in its own process group: start, readiness,
signals, stop. Used by the cluster launcher, the benchmarks and the tests, so that every server of
this project is started, watched and ended the same way."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

# Built by scripts/install_pd_cpu.sh: turns the transfer engine's wildcard binds into binds to the
# server's own address (ELDR_BIND_ADDR).
LOOPBACK_PRELOAD = Path(sys.prefix) / "lib" / "eldr-loopback" / "libeldr_loopback_bind.so"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def pd_env(core: int | None, host: str, bootstrap_timeout_s: int | None = None) -> dict[str, str]:
    """Environment for one SGLang server of a CPU PD cluster (Mooncake over TCP) on address `host`:
    the transfer engine advertises `host`, and the preload keeps its wildcard listeners there."""
    env = dict(os.environ)
    env.update({
        "MOONCAKE_PROTOCOL": "tcp",
        "MC_FORCE_TCP": "1",
        "SGLANG_HOST_IP": host,  # never let the transfer engine bind or advertise another address
        "ELDR_BIND_ADDR": host,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    })
    # A prefill holds a request's KV until a decoder bootstraps; free it after a minute, not five.
    if bootstrap_timeout_s is not None:
        env["SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT"] = str(bootstrap_timeout_s)
    else:
        env.setdefault("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "60")
    if core is not None:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = str(core)
    if LOOPBACK_PRELOAD.exists():
        env["LD_PRELOAD"] = ":".join(filter(None, [str(LOOPBACK_PRELOAD), env.get("LD_PRELOAD", "")]))
    return env


def _die_with_parent() -> None:  # runs in the child before exec
    with contextlib.suppress(Exception):  # best effort (non-Linux)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(eq=False)
class ServerProcess:
    role: str  # "prefill" | "decode" | "plain" | "router"
    port: int
    log: Path
    host: str  # the address it listens on; nothing here assumes one
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    bootstrap_port: int | None = None
    counts_port: int | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    def start(self) -> ServerProcess:
        """Starts (or starts again) the command, appending to a fresh log."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")  # readiness is read from the log
        # The kernel's parent-death signal follows the forking *thread*: only ask for it from the
        # main thread, or a server restarted from a worker thread would die when that thread ends.
        on_main = threading.current_thread() is threading.main_thread()
        with open(self.log, "ab") as out:
            # cwd outside the repo: a source folder named like a package would shadow it.
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.log.parent, start_new_session=True,
                                         preexec_fn=_die_with_parent if on_main else None)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self, path: str = "/health") -> bool:
        """Answers `path` with 200 and, for an SGLang server, has logged "fired up" (its warm-up
        request ran; /health can answer earlier)."""
        if not self.running():
            return False
        try:
            if requests.get(self.url + path, timeout=5).status_code != 200:
                return False
        except requests.RequestException:
            return False
        return self.role == "router" or "fired up" in self.log_text()

    def wait_ready(self, timeout_s: float = 300.0, path: str = "/health") -> ServerProcess:
        wait_all([self], timeout_s, path)
        return self

    def flush_cache(self, timeout_s: float = 30.0) -> None:
        """Empties an SGLang server's radix cache. SGLang answers 400 while a batch is still running
        (its warm-up request right after start-up; the last batch's retirement, which can lag the
        HTTP response by a loop iteration), so retry on 400 for up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = requests.post(self.url + "/flush_cache", timeout=60)
            if r.status_code == 200:
                return
            if r.status_code != 400 or time.monotonic() > deadline:
                raise RuntimeError(f"flush_cache on {self.url}: {r.status_code} {r.text[:200]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        """Sends `sig` to the server's whole process group (SGLang runs several processes)."""
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL (fault injection); returns when the process is gone."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`."""
        if not self.running():
            return
        assert self.proc is not None
        self.signal(signal.SIGCONT)  # a stopped group cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


class PortTaken(RuntimeError):
    """A server could not bind its HTTP port: another process took it after it was chosen."""

    def __init__(self, server: ServerProcess, message: str):
        super().__init__(message)
        self.server = server


BIND_FAILED = "error while attempting to bind on address"  # uvicorn's message; the server then hangs


def wait_all(servers: list[ServerProcess], timeout_s: float = 300.0, path: str = "/health") -> None:
    """Waits until every server is ready; fails at once, with its log, when one exits or cannot
    bind its port (PortTaken: the caller may start it again on another port)."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for s in list(pending):
            if s.proc is not None and s.proc.poll() is not None:
                raise RuntimeError(f"{s.role} server on port {s.port} exited with {s.proc.returncode}:\n"
                                   f"{s.log_tail()}")
            if s.ready(path):
                pending.remove(s)
            elif BIND_FAILED in s.log_text():
                raise PortTaken(s, f"{s.role} server could not bind port {s.port}:\n{s.log_tail(5)}")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s:.0f} s: {[s.url for s in pending]}\n"
                               f"{pending[0].log_tail()}")
        if pending:
            time.sleep(0.5)
