"""`python -m sglang_eldr.launch_cluster`: a local PD cluster behind the ELDR router.

Starts `--num-prefill` prefill and `--num-decode` decode servers of one model (via
`sglang_eldr.launch_server`, Mooncake over TCP on `--host`, `prefill_complete` allocation so
prefill runs before the decoder is known), then starts the router and waits until everything is
healthy. With `--calibrate` the router serves from the start (least-loaded), the calibration runs
through it, and the fitted centroids are loaded into it in place (POST /centroids, no restart).
All children are stopped on exit, Ctrl-C or SIGTERM. Servers are pinned round-robin to the CPUs
this process may use.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from sglang_eldr.decode_policy import DECODE_POLICIES, DEFAULT_DECODE_POLICY
from sglang_eldr.paths import local_path, model_path
from sglang_eldr.server_process import PortTaken, ServerProcess, free_port, pd_env, wait_all

__all__ = ["Cluster", "Server", "free_port", "pd_env"]


Server = ServerProcess  # the name the tests and benchmarks use


@dataclass
class Cluster:
    model_path: str
    num_prefill: int = 1
    num_decode: int = 2
    policy: str = DEFAULT_DECODE_POLICY
    centroids: str | None = None
    tau: float = 0.1
    router_port: int = 0
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="eldr-cluster-")))
    extra_server_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    max_total_tokens: int = 16384
    startup_timeout_s: float = 300.0
    step_stats: bool = False  # decoders write distinct-experts-per-step statistics (benchmarks)
    # What ELDR needs: the prefill computes at once and holds the KV for a decoder chosen later. None:
    # SGLang's own default, for a stock-PD baseline (bench/ttft_vs_stock.py).
    decode_allocation_policy: str | None = "prefill_complete"
    host: str = ""  # the address of every server and the router, unless `hosts` / `router_host` say otherwise
    hosts: list[str] = field(default_factory=list)  # per server (prefills, then decoders)
    router_host: str = ""
    servers: list[Server] = field(default_factory=list)
    router: Server | None = None
    router_policy: str | None = None  # the running router's policy

    def __post_init__(self) -> None:
        self.router_host = self.router_host or self.host
        if not self.router_host or not (self.hosts or self.host):
            raise ValueError("Cluster: give host (or hosts and router_host): the addresses the servers and the "
                             "router listen on and advertise")
        # Servers run with the log directory as working directory: relative paths must not reach them.
        self.model_path = model_path(self.model_path)
        self.centroids = local_path(self.centroids) if self.centroids else None
        self.log_dir = Path(local_path(self.log_dir))

    # ------------------------------------------------------------------ servers
    def free_port(self, host: str) -> int:
        return free_port(host)

    def _server_cmd(self, s: Server) -> list[str]:
        cmd = [
            sys.executable, "-m", "sglang_eldr.launch_server", "--model-path", self.model_path,
            "--host", s.host, "--port", str(s.port), "--device", "cpu",
            "--max-total-tokens", str(self.max_total_tokens),
            "--disaggregation-mode", s.role, "--disaggregation-transfer-backend", "mooncake",
        ]
        if self.decode_allocation_policy is not None:
            cmd += ["--disaggregation-decode-allocation-policy", self.decode_allocation_policy]
        if s.role == "prefill":
            cmd += ["--disaggregation-bootstrap-port", str(s.bootstrap_port), "--eldr-counts-port", str(s.counts_port)]
        elif self.step_stats:
            cmd += ["--eldr-capture"]  # decoders capture only when a benchmark reads their steps
        # (On CPU the plugin's PD guard already gives decode servers the cpu_tensor retraction backup.)
        return cmd + self.extra_server_args

    def _env(self, s: Server, core: int) -> dict[str, str]:
        env = pd_env(core, host=s.host)
        if self.step_stats and s.role == "decode":
            env["SGLANG_ELDR_STEP_STATS_FILE"] = str(self.log_dir / f"step-stats-{s.port}.json")
            env["SGLANG_ELDR_STEP_TRACE_FILE"] = str(self._step_trace(s))
        return env

    def _step_trace(self, s: Server) -> Path:
        return self.log_dir / f"step-trace-{s.port}.jsonl"

    def step_marks(self) -> list[int]:
        """Per decoder, where its step trace ends now (a cluster with step_stats)."""
        return [self._step_trace(d).stat().st_size if self._step_trace(d).exists() else 0 for d in self.decoders]

    def steps_since(self, marks: list[int]) -> list[list[dict]]:
        """Per decoder, its decode steps since `marks`: {"tokens", "distinct_pairs", "forward_s"}."""
        out: list[list[dict]] = []
        for d, mark in zip(self.decoders, marks):
            path = self._step_trace(d)
            if not path.exists():
                out.append([])
                continue
            with path.open() as f:
                f.seek(mark)
                out.append([json.loads(line) for line in f if line.endswith("\n")])
        return out

    def kill(self, s: Server) -> None:
        """SIGKILL a server's whole process group (fault injection)."""
        s.kill()

    def restart(self, s: Server) -> None:
        """Starts a stopped or killed server again on the same port and waits until it is ready."""
        s.kill()
        s.start()
        self.wait_healthy([s])

    def start_servers(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        n = self.num_prefill + self.num_decode
        if self.hosts and len(self.hosts) != n:
            raise ValueError(f"hosts: {len(self.hosts)} addresses for {n} servers")
        hosts = self.hosts or [self.host] * n
        for i in range(self.num_prefill):
            h = hosts[i]
            self.servers.append(Server("prefill", 0, Path(), host=h, bootstrap_port=self.free_port(h),
                                       counts_port=self.free_port(h)))
        for h in hosts[self.num_prefill:]:
            self.servers.append(Server("decode", 0, Path(), host=h))
        for i, s in enumerate(self.servers):
            self._launch(s, cores[i % len(cores)])

    def _launch(self, s: Server, core: int) -> None:
        """Starts `s` on a newly chosen HTTP port, with its log, command and environment for it."""
        s.port = self.free_port(s.host)
        s.log = self.log_dir / f"{s.role}-{s.host}-{s.port}.log"
        s.cmd, s.env = self._server_cmd(s), self._env(s, core)
        s.start()

    def wait_healthy(self, servers: list[Server], path: str = "/health") -> None:
        wait_all(servers, self.startup_timeout_s, path)

    def wait_started(self, attempts: int = 3) -> None:
        """Waits for the servers start_servers() started; one whose port another process took in the
        meantime starts again on a new port (its URL is not yet known to anyone)."""
        for attempt in range(attempts):
            try:
                self.wait_healthy(self.servers)
                return
            except PortTaken as e:
                s = e.server
                if attempt == attempts - 1 or s not in self.servers or s.role not in ("prefill", "decode"):
                    raise
                s.stop()
                cores = sorted(os.sched_getaffinity(0))
                self._launch(s, cores[self.servers.index(s) % len(cores)])

    @property
    def prefills(self) -> list[Server]:
        return [s for s in self.servers if s.role == "prefill"]

    @property
    def decoders(self) -> list[Server]:
        return [s for s in self.servers if s.role == "decode"]

    # ------------------------------------------------------------------ router
    def start_router(self, policy: str | None = None, centroids: str | None = None, extra: list[str] | None = None,
                     prefill_counts_port: int | None = None, with_centroids: bool = True) -> Server:
        """(Re)starts the router; `prefill_counts_port` overrides where it listens for counts (tests).
        `with_centroids=False` starts an eldr policy without a file: least-loaded until `install_centroids`."""
        self.stop_router()
        port = self.router_port or self.free_port(self.router_host)
        cmd = [sys.executable, "-m", "sglang_eldr.launch_router", "--host", self.router_host, "--port", str(port),
               "--policy", policy or self.policy, "--tau", str(self.tau), "--log-level", "warning"]
        for p in self.prefills:
            # The router asks each prefill for its counts endpoint (GET /eldr/info) unless overridden.
            cmd += ["--prefill", p.url, str(p.bootstrap_port)] + ([str(prefill_counts_port)] if prefill_counts_port else [])
        for d in self.decoders:
            cmd += ["--decode", d.url]
        c = (centroids or self.centroids) if with_centroids else None
        if c and (policy or self.policy).startswith("eldr"):
            cmd += ["--centroids", str(c)]
        cmd += self.router_args + (extra or [])
        r = Server("router", port, self.log_dir / f"router-{port}.log", host=self.router_host, cmd=cmd).start()
        self.router, self.router_policy = r, policy or self.policy
        self.wait_healthy([r])
        return r

    def calibrate(self, prompts: Path, out: Path | None = None, max_new_tokens: int = 32) -> Path:
        """Fits centroids for this cluster's decoders by running `prompts` through the router
        (the running one, else one started with the cluster's policy, or eldr when that takes no
        centroids, and no centroids: it serves least-loaded meanwhile) and, when that router is an
        eldr one, installs them there with POST /centroids: no restart, no request cut. Later
        `start_router` calls for an eldr policy use the file."""
        from sglang_eldr import calibrate

        out = out or self.log_dir / "centroids.eldr"
        if self.router is None:
            self.start_router(policy=self.policy if self.policy.startswith("eldr") else "eldr", with_centroids=False)
        r = self.router
        assert r is not None
        code = calibrate.main(["--url", r.url, "--model-path", self.model_path, "--prompts", str(prompts),
                               "--decoders", str(len(self.decoders)), "--out", str(out),
                               "--max-new-tokens", str(max_new_tokens)])
        if code != 0:
            raise RuntimeError(f"calibration failed (exit {code})")
        if (self.router_policy or "").startswith("eldr"):
            self.install_centroids(out)
        self.centroids = str(out)
        return out

    def install_centroids(self, path: str | Path) -> dict:
        """POSTs a centroid file to the running router; returns its summary, raises on refusal."""
        import requests

        assert self.router is not None, "the router is not running"
        r = requests.post(self.router.url + "/centroids", data=Path(path).read_bytes(),
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"the router refused {path} ({r.status_code}): {r.text[:500]}")
        return r.json()

    def stop_router(self) -> None:
        if self.router is not None:
            self.router.stop(grace_s=10)
            self.router, self.router_policy = None, None

    def stop(self) -> None:
        self.stop_router()
        for s in self.servers:
            s.stop(grace_s=10)

    def __enter__(self) -> "Cluster":
        try:
            self.start_servers()
            self.wait_started()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sglang_eldr.launch_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, type=model_path,
                    help="model directory (e.g. models/tiny-qwen3-moe) or hub id")
    ap.add_argument("--num-prefill", type=int, default=1, help="prefill servers (default: 1)")
    ap.add_argument("--num-decode", type=int, default=2, help="decode servers (default: 2)")
    ap.add_argument("--policy", choices=DECODE_POLICIES, default=DEFAULT_DECODE_POLICY,
                    help=f"decode policy (default: {DEFAULT_DECODE_POLICY})")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--centroids", type=local_path, help="centroid file for the eldr policies")
    src.add_argument("--calibrate", metavar="PROMPTS_JSONL", type=local_path,
                     help="calibrate on these prompts through the router, which serves least-loaded meanwhile, "
                          "then load the centroids into it (written into the log directory)")
    ap.add_argument("--tau", type=float, default=0.1, help="locality band width (default: 0.1)")
    ap.add_argument("--port", type=int, default=30000, help="router port (default: 30000)")
    ap.add_argument("--host", required=True,
                    help="the address every server and the router listen on, and the transfer engine and "
                         "counts publisher advertise (127.0.0.1 keeps the cluster on this machine's loopback); "
                         "for servers on several hosts, start "
                         "each with python -m sglang_eldr.launch_server and the router with launch_router")
    ap.add_argument("--max-total-tokens", type=int, default=16384, help="KV budget per server (default: 16384)")
    ap.add_argument("--log-dir", type=lambda p: Path(local_path(p)), default=None,
                    help="server and router logs (default: a temp dir)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_prefill < 1 or args.num_decode < 1:
        print("launch_cluster: need at least one prefill and one decode server", file=sys.stderr)
        return 2
    if (args.calibrate or args.centroids) and not args.policy.startswith("eldr"):
        print(f"launch_cluster: --calibrate/--centroids are for the eldr policies, not {args.policy}", file=sys.stderr)
        return 2
    cluster = Cluster(model_path=args.model_path, num_prefill=args.num_prefill, num_decode=args.num_decode,
                      policy=args.policy, centroids=args.centroids, tau=args.tau, router_port=args.port,
                      max_total_tokens=args.max_total_tokens,
                      host=args.host,
                      **({"log_dir": args.log_dir} if args.log_dir else {}))
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with cluster:
            print(f"servers healthy: {[s.url for s in cluster.servers]} (logs in {cluster.log_dir})", flush=True)
            if args.calibrate:
                r = cluster.start_router(with_centroids=False)
                print(f"ELDR router ready on {r.url} (policy {args.policy}), least-loaded while it calibrates "
                      f"on {args.calibrate}", flush=True)
                print(f"centroids {cluster.calibrate(Path(args.calibrate))} loaded: routing by locality; "
                      "Ctrl-C to stop", flush=True)
            else:
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
