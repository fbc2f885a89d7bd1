"""`python -m sglang_eldr.launch_cluster`: a local PD cluster behind the ELDR router.

Starts `--num-prefill` prefill and `--num-decode` decode servers of one model (via
`sglang_eldr.launch_server`, Mooncake over TCP on 127.0.0.1, `prefill_complete` allocation so
prefill runs before the decoder is known), optionally calibrates centroids on them, then starts
the router and waits until everything is healthy. All children are stopped on exit, Ctrl-C or
SIGTERM. Servers are pinned round-robin to the CPUs this process may use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from sglang_eldr.decode_policy import DECODE_POLICIES

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pd_env(core: int | None) -> dict[str, str]:
    """Environment for one SGLang server of the CPU PD cluster."""
    env = dict(os.environ)
    env.update({
        "MOONCAKE_PROTOCOL": "tcp",
        "MC_FORCE_TCP": "1",
        "SGLANG_HOST_IP": HOST,  # never let the transfer engine bind a non-loopback address
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    })
    # A prefill holds a request's KV until a decoder bootstraps; free it after a minute, not five.
    env.setdefault("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "60")
    if core is not None:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = str(core)
    # Built by scripts/install_pd_cpu.sh: turns the transfer engine's wildcard binds into loopback ones.
    loopback = Path(sys.prefix) / "lib" / "eldr-loopback" / "libeldr_loopback_bind.so"
    if loopback.exists():
        env["LD_PRELOAD"] = ":".join(filter(None, [str(loopback), env.get("LD_PRELOAD", "")]))
    return env


@dataclass
class Server:
    role: str
    port: int
    bootstrap_port: int | None = None
    counts_port: int | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class Cluster:
    model_path: str
    num_prefill: int = 1
    num_decode: int = 2
    policy: str = "eldr"
    centroids: str | None = None
    tau: float = 0.1
    router_port: int = 0
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="eldr-cluster-")))
    extra_server_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    max_total_tokens: int = 16384
    startup_timeout_s: float = 300.0
    step_stats: bool = False  # decoders write distinct-experts-per-step statistics (benchmarks)
    servers: list[Server] = field(default_factory=list)
    router: Server | None = None

    # ------------------------------------------------------------------ servers
    def _server_cmd(self, s: Server) -> list[str]:
        cmd = [
            sys.executable, "-m", "sglang_eldr.launch_server", "--model-path", self.model_path,
            "--host", HOST, "--port", str(s.port), "--device", "cpu",
            "--max-total-tokens", str(self.max_total_tokens),
            "--disaggregation-mode", s.role, "--disaggregation-transfer-backend", "mooncake",
            "--disaggregation-decode-allocation-policy", "prefill_complete",
        ]
        if s.role == "prefill":
            cmd += ["--disaggregation-bootstrap-port", str(s.bootstrap_port), "--eldr-counts-port", str(s.counts_port)]
        else:
            # The default "host_pool" backup sizes a host pool after a fixed 10 GiB reserve, which a
            # small CPU box does not have; on CPU the KV already lives in host memory.
            cmd += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
        return cmd + self.extra_server_args

    def _spawn(self, s: Server, core: int) -> None:
        env = pd_env(core)
        if self.step_stats and s.role == "decode":
            env["SGLANG_ELDR_STEP_STATS_FILE"] = str(self.log_dir / f"step-stats-{s.port}.json")
        assert s.log is not None
        with open(s.log, "ab") as log:
            # cwd outside the repo: a source folder named like a package would shadow it.
            s.proc = subprocess.Popen(self._server_cmd(s), stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=self.log_dir, start_new_session=True)

    def kill(self, s: Server) -> None:
        """SIGKILL a server's whole process group (fault injection)."""
        if s.proc is not None and s.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()

    def restart(self, s: Server) -> None:
        """Starts a stopped or killed server again on the same port and waits until it is ready."""
        self.kill(s)
        assert s.log is not None
        s.log.write_bytes(b"")  # readiness is read from the log
        cores = sorted(os.sched_getaffinity(0))
        self._spawn(s, cores[self.servers.index(s) % len(cores)])
        self.wait_healthy([s])

    def start_servers(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        for _ in range(self.num_prefill):
            self.servers.append(Server("prefill", free_port(), bootstrap_port=free_port(), counts_port=free_port()))
        for _ in range(self.num_decode):
            self.servers.append(Server("decode", free_port()))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(self.servers):
            s.log = self.log_dir / f"{s.role}-{s.port}.log"
            s.log.write_bytes(b"")
            self._spawn(s, cores[i % len(cores)])

    def wait_healthy(self, servers: list[Server], path: str = "/health") -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(servers)
        while pending:
            for s in list(pending):
                if s.proc is not None and s.proc.poll() is not None:
                    tail = s.log.read_text(errors="replace")[-3000:] if s.log else ""
                    raise RuntimeError(f"{s.role} server on port {s.port} exited with {s.proc.returncode}:\n{tail}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(s.url + path, timeout=2).status_code == 200 and _warmed_up(s):
                        pending.remove(s)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {self.startup_timeout_s:.0f} s: {[s.url for s in pending]}")
            if pending:
                time.sleep(0.5)

    @property
    def prefills(self) -> list[Server]:
        return [s for s in self.servers if s.role == "prefill"]

    @property
    def decoders(self) -> list[Server]:
        return [s for s in self.servers if s.role == "decode"]

    # ------------------------------------------------------------------ router
    def start_router(self, policy: str | None = None, centroids: str | None = None, extra: list[str] | None = None,
                     prefill_counts_port: int | None = None) -> Server:
        """(Re)starts the router; `prefill_counts_port` overrides where it listens for counts (tests)."""
        self.stop_router()
        port = self.router_port or free_port()
        cmd = [sys.executable, "-m", "sglang_eldr.launch_router", "--host", HOST, "--port", str(port),
               "--policy", policy or self.policy, "--tau", str(self.tau), "--log-level", "warning"]
        for p in self.prefills:
            cmd += ["--prefill", p.url, str(p.bootstrap_port), str(prefill_counts_port or p.counts_port)]
        for d in self.decoders:
            cmd += ["--decode", d.url]
        c = centroids or self.centroids
        if c and (policy or self.policy).startswith("eldr"):
            cmd += ["--centroids", str(c)]
        cmd += self.router_args + (extra or [])
        r = Server("router", port)
        r.log = self.log_dir / f"router-{port}.log"
        with open(r.log, "wb") as log:
            r.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_dir,
                                      start_new_session=True)
        self.router = r
        self.wait_healthy([r])
        return r

    def calibrate(self, prompts: Path, out: Path | None = None) -> Path:
        """Fits centroids for this cluster's decoders by running `prompts` through a JSQ router."""
        from sglang_eldr import calibrate

        out = out or self.log_dir / "centroids.eldr"
        r = self.start_router(policy="jsq")
        try:
            code = calibrate.main(["--url", r.url, "--model-path", self.model_path, "--prompts", str(prompts),
                                   "--decoders", str(self.num_decode), "--out", str(out)])
        finally:
            self.stop_router()
        if code != 0:
            raise RuntimeError(f"calibration failed (exit {code})")
        return out

    def stop_router(self) -> None:
        if self.router is not None:
            _stop(self.router)
            self.router = None

    def stop(self) -> None:
        self.stop_router()
        for s in self.servers:
            _stop(s)

    def __enter__(self) -> "Cluster":
        try:
            self.start_servers()
            self.wait_healthy(self.servers)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _warmed_up(s: Server) -> bool:
    """SGLang logs "fired up" once its warm-up request has run; /health can answer earlier."""
    if s.role == "router" or s.log is None:
        return True
    return b"fired up" in s.log.read_bytes()


def _stop(s: Server, grace_s: float = 10.0) -> None:
    if s.proc is None or s.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(s.proc.pid, signal.SIGTERM)
    try:
        s.proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sglang_eldr.launch_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="model directory (e.g. models/tiny-qwen3-moe)")
    ap.add_argument("--num-prefill", type=int, default=1, help="prefill servers (default: 1)")
    ap.add_argument("--num-decode", type=int, default=2, help="decode servers (default: 2)")
    ap.add_argument("--policy", choices=DECODE_POLICIES, default="eldr", help="decode policy (default: eldr)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--centroids", help="centroid file for the eldr policies")
    src.add_argument("--calibrate", metavar="PROMPTS_JSONL",
                     help="calibrate on these prompts first (writes centroids into the log directory)")
    ap.add_argument("--tau", type=float, default=0.1, help="locality band width (default: 0.1)")
    ap.add_argument("--port", type=int, default=30000, help="router port (default: 30000)")
    ap.add_argument("--max-total-tokens", type=int, default=16384, help="KV budget per server (default: 16384)")
    ap.add_argument("--log-dir", type=Path, default=None, help="server and router logs (default: a temp dir)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_prefill < 1 or args.num_decode < 1:
        print("launch_cluster: need at least one prefill and one decode server", file=sys.stderr)
        return 2
    cluster = Cluster(model_path=args.model_path, num_prefill=args.num_prefill, num_decode=args.num_decode,
                      policy=args.policy, centroids=args.centroids, tau=args.tau, router_port=args.port,
                      max_total_tokens=args.max_total_tokens,
                      **({"log_dir": args.log_dir} if args.log_dir else {}))
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with cluster:
            print(f"servers healthy: {[s.url for s in cluster.servers]} (logs in {cluster.log_dir})", flush=True)
            if args.calibrate:
                cluster.centroids = str(cluster.calibrate(Path(args.calibrate)))
            r = cluster.start_router()
            print(f"ELDR router ready on {r.url} (policy {args.policy}); Ctrl-C to stop", flush=True)
            while not stop["flag"]:
                time.sleep(0.5)
                for s in cluster.servers + [r]:
                    if s.proc is not None and s.proc.poll() is not None:
                        print(f"{s.role} on port {s.port} exited ({s.proc.returncode}); stopping", file=sys.stderr)
                        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
