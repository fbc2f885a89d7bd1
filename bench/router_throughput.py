"""Throughput and added latency of the ELDR PD load balancer ALONE, against stand-in endpoints.

What runs: the real router (`python -m sglang_eldr.launch_router --policy eldr` with the shipped
centroid file), pinned to one core, in front of MINIMAL STAND-IN prefill and decode endpoints
(started by this script, in one process on another core, together with the load generator). The
stand-ins are not SGLang and do no model work: they exist only so that the router's own cost can
be measured. They answer at once and follow the PD protocol closely enough that the router runs
its real request path:

* the stand-in prefill serves `GET /eldr/info` (capture on, its counts endpoint) and `/health`; on
  `POST /generate` with a `bootstrap_room` it publishes a `CountsReport` for that room on its ZMQ
  PUB socket (topic `wire.COUNTS_TOPIC`, `wire.publisher_frames` around `wire.encode_report`, counts of the centroid file's
  geometry), then holds its HTTP response until the decode side has been called for that room
  (SGLang's `prefill_complete`: the prefill answers after the KV transfer), or 5 s;
* each stand-in decode answers `/generate` at once with a small SGLang-shaped JSON
  (`text`, `output_ids`, `meta_info`) and marks the room as bootstrapped.

So for every request the router picks the prefill, registers the room in its counts inbox, POSTs
the prefill, awaits the counts over ZMQ, makes one Rust-router decision, POSTs the decoder, attaches
the receipt, and drains the prefill response in the background.

Measured (non-streaming `/generate`):
  (a) maximum sustained requests/s: closed loop, `--concurrency` (64) clients, through the router;
      the same against a stand-in decode directly shows what the client side alone sustains;
  (b) latency added by the router at a fixed open-loop rate (`--rate`, 500 req/s): p50/p99 through
      the router minus p50/p99 of the same open loop sent to a stand-in decode directly.
Also the router's CPU time per request (from /proc), which does not depend on what else the
machine runs, and every response's receipt is checked (fallback reasons are counted and printed:
they must be none, or the path measured is not the locality path).

Targets (issue 10): >= 1000 req/s on one core; p99 added <= 5 ms at 500 req/s.

    python bench/router_throughput.py            # ~55 s
    python bench/router_throughput.py --quick    # < 20 s (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CENTROIDS = ROOT / "models" / "tiny-qwen3-moe" / "eldr-centroids-2d.eldr"
NOTE = ("router measured ALONE: the prefill/decode endpoints are minimal stand-ins started by this "
        "benchmark (no SGLang, no model work); they exist only to measure the router")
UVLOOP_ROUTER = ("import runpy, uvloop; uvloop.install(); "
                 "runpy.run_module('sglang_eldr.launch_router', run_name='__main__', alter_sys=True)")
PROMPT = ("def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
          "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n# Explain what this function does.")


# ---------------------------------------------------------------------------------- stand-ins
def run_standins(args: argparse.Namespace) -> int:
    """The stand-in prefill and decode servers (one process, one event loop)."""
    import orjson
    import zmq
    from aiohttp import web

    from sglang_eldr import wire

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 0)
    counts_port = pub.bind_to_random_port(f"tcp://{args.host}")
    rng = np.random.default_rng(0)
    # Prompt-like counts: each of 64 tokens picks top-k distinct experts per layer.
    pool = []
    for _ in range(64):
        c = np.zeros((args.layers, args.experts), dtype=np.int32)
        for layer in range(args.layers):
            picks = np.argsort(rng.random((64, args.experts)), axis=1)[:, : args.top_k]
            c[layer] = np.bincount(picks.ravel(), minlength=args.experts)
        pool.append(c)
    waiting: dict[int, asyncio.Future] = {}
    stats = Counter()

    def json_response(obj: object) -> web.Response:
        return web.Response(body=orjson.dumps(obj), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def info(request: web.Request) -> web.Response:
        return json_response({"eldr": True, "mode": "prefill", "capture": True, "bootstrap_port": args.bootstrap_port,
                              "counts": {"host": args.host, "port": counts_port}})

    async def prefill_generate(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        room = body.get("bootstrap_room")
        stats["prefill"] += 1
        if isinstance(room, int):
            fut = asyncio.get_running_loop().create_future()
            waiting[room] = fut
            stats["seq"] += 1  # a stand-in without heartbeats: the router treats it as a silent publisher
            pub.send_multipart(wire.publisher_frames(1, stats["seq"], "counts",
                                                     wire.encode_report(room, f"r{room}", pool[room % len(pool)], 64)),
                               flags=zmq.NOBLOCK)
            try:
                await asyncio.wait_for(fut, args.hold_s)
            except asyncio.TimeoutError:
                stats["prefill_hold_timeout"] += 1
            finally:
                waiting.pop(room, None)
        return json_response({"text": "", "meta_info": {"id": f"r{room}", "finish_reason": {"type": "length"},
                                                        "prompt_tokens": 64, "completion_tokens": 0}})

    async def decode_generate(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        fut = waiting.get(body.get("bootstrap_room"))
        if fut is not None and not fut.done():
            fut.set_result(None)  # "the decoder bootstrapped": the prefill call may answer
        stats["decode"] += 1
        return json_response({"text": " It returns the n-th Fibonacci number.", "output_ids": [1, 2, 3, 4, 5, 6, 7, 8],
                              "meta_info": {"id": f"r{body.get('bootstrap_room')}", "prompt_tokens": 64,
                                            "completion_tokens": 8, "cached_tokens": 0, "e2e_latency": 0.0,
                                            "finish_reason": {"type": "length", "length": 8}}})

    async def serve() -> None:
        runners = []
        for port, role in [(args.prefill_port, "prefill")] + [(p, "decode") for p in args.decode_ports]:
            app = web.Application()
            app.router.add_get("/health", health)
            app.router.add_post("/generate", prefill_generate if role == "prefill" else decode_generate)
            if role == "prefill":
                app.router.add_get("/eldr/info", info)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, args.host, port, backlog=1024).start()
            runners.append(runner)
        # ServerProcess.ready() looks for this line in the log.
        print(f"stand-ins fired up on {args.host}: prefill {args.prefill_port} (counts {counts_port}), "
              f"decode {args.decode_ports}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            print(f"stand-in requests: {dict(stats)}", flush=True)
            for r in runners:
                await r.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        pub.close(0)
        ctx.term()
    return 0


# ---------------------------------------------------------------------------------- load generator
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class Client:
    def __init__(self, session, url: str, body: bytes, check_receipt: bool):
        self.session, self.url, self.body, self.check = session, url, body, check_receipt
        self.latencies: list[float] = []
        self.errors: Counter = Counter()
        self.fallbacks: Counter = Counter()
        self.decoders: Counter = Counter()

    async def one(self, t_start: float) -> None:
        import orjson
        try:
            async with self.session.post(self.url, data=self.body,
                                         headers={"Content-Type": "application/json"}) as r:
                raw = await r.read()
                status = r.status
        except Exception as e:  # noqa: BLE001 - counted, shown in the report
            self.errors[type(e).__name__] += 1
            return
        elapsed = time.perf_counter() - t_start
        if status != 200:
            self.errors[f"http {status}"] += 1
            return
        if self.check:
            route = orjson.loads(raw)["meta_info"]["eldr_route"]
            self.fallbacks[route["fallback"]] += 1
            self.decoders[route["decoder"]] += 1
        self.latencies.append(elapsed)

    def summary(self, wall_s: float) -> dict:
        lat = [x * 1e3 for x in self.latencies]
        out = {"completed": len(lat), "wall_s": round(wall_s, 3), "req_per_s": round(len(lat) / wall_s, 1),
               "p50_ms": round(pct(lat, 50), 3), "p90_ms": round(pct(lat, 90), 3), "p99_ms": round(pct(lat, 99), 3),
               "max_ms": round(max(lat), 3) if lat else None, "errors": dict(self.errors)}
        if self.check:
            out["fallbacks"] = {str(k): v for k, v in self.fallbacks.items()}
            out["decoders"] = dict(self.decoders)
        return out


async def closed_loop(session, url: str, body: bytes, concurrency: int, duration_s: float, check: bool) -> dict:
    client = Client(session, url, body, check)
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await client.one(time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return client.summary(time.perf_counter() - started)


async def open_loop(session, url: str, body: bytes, rate: float, duration_s: float, check: bool) -> dict:
    """Request i is due at t0 + i / rate; its latency counts from that instant (no coordinated
    omission). `late_p99_ms`: how late the client itself started requests."""
    client = Client(session, url, body, check)
    n = int(rate * duration_s)
    tasks = []
    late: list[float] = []
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        late.append(max(0.0, time.perf_counter() - due) * 1e3)
        tasks.append(asyncio.create_task(client.one(due)))
    await asyncio.gather(*tasks)
    out = client.summary(n / rate)
    out.update(rate=rate, sent=n, late_p99_ms=round(pct(late, 99), 3))
    return out


async def measure(args: argparse.Namespace, router_url: str, direct_url: str, router_pid: int) -> dict:
    import aiohttp

    body = json.dumps({"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}).encode()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    results: dict = {}
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        warm = await closed_loop(session, router_url, body, 8, args.warmup, check=True)
        if warm["completed"] == 0:
            raise RuntimeError(f"no request succeeded through the router during warm-up: {warm}")

        def with_cpu(fn):
            async def run() -> dict:
                c0, t0 = cpu_seconds(router_pid), time.perf_counter()
                r = await fn()
                c1, t1 = cpu_seconds(router_pid), time.perf_counter()
                r["router_cpu_util"] = round((c1 - c0) / (t1 - t0), 3)
                r["router_cpu_us_per_req"] = round((c1 - c0) / max(1, r["completed"]) * 1e6, 1)
                return r
            return run

        results["closed_router"] = await with_cpu(
            lambda: closed_loop(session, router_url, body, args.concurrency, args.closed_s, True))()
        results["closed_direct"] = await closed_loop(session, direct_url, body, args.concurrency, args.direct_closed_s,
                                                     False)
        results["open_router"] = await with_cpu(
            lambda: open_loop(session, router_url, body, args.rate, args.open_s, True))()
        results["open_direct"] = await open_loop(session, direct_url, body, args.rate, args.open_s, False)
    return results


def pin_self(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short phases (whole run < 20 s)")
    ap.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (default: 64)")
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop rate, req/s (default: 500)")
    ap.add_argument("--closed-s", type=float, default=None, help="closed-loop phase through the router, s (default: 12, quick 3)")
    ap.add_argument("--open-s", type=float, default=None, help="each open-loop phase, s (default: 12, quick 3)")
    ap.add_argument("--host", default="127.0.0.2", help="loopback address of the router (default: 127.0.0.2)")
    ap.add_argument("--standin-host", default="127.0.0.3", help="loopback address of the stand-ins (default: 127.0.0.3)")
    ap.add_argument("--centroids", type=Path, default=CENTROIDS)
    ap.add_argument("--router-arg", action="append", default=[], help="extra launch_router argument (repeatable)")
    ap.add_argument("--router-uvloop", action="store_true",
                    help="experiment: run the router on uvloop's event loop (installed before launch_router starts)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "router_throughput.json")
    # internal: run the stand-in endpoints
    ap.add_argument("--standins", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prefill-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--decode-ports", type=int, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap-port", type=int, default=8998, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--experts", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--top-k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hold-s", type=float, default=5.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.standins:
        return run_standins(args)

    from sglang_eldr import centroids as centroid_file
    from sglang_eldr.server_process import ServerProcess, free_port, wait_all

    args.closed_s = args.closed_s or (3.0 if args.quick else 12.0)
    args.open_s = args.open_s or (3.0 if args.quick else 12.0)
    args.direct_closed_s = 2.0 if args.quick else 5.0
    args.warmup = 1.0 if args.quick else 3.0
    args.centroids = args.centroids.resolve()
    cs = centroid_file.load(args.centroids)
    g = cs.geometry
    cpus = sorted(os.sched_getaffinity(0))
    router_cpu, other_cpu = cpus[0], cpus[1] if len(cpus) > 1 else cpus[0]
    taskset = shutil.which("taskset")

    def pinned(cpu: int, cmd: list[str]) -> list[str]:
        return [taskset, "-c", str(cpu), *cmd] if taskset else cmd

    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"eldr-router-throughput-{os.getpid()}"
    sh = args.standin_host
    prefill_port, bootstrap_port = free_port(sh), free_port(sh)
    decode_ports = [free_port(sh) for _ in range(cs.num_workers)]
    standins = ServerProcess(
        role="standins", host=sh, port=decode_ports[0], log=logs / "standins.log",
        cmd=pinned(other_cpu, [sys.executable, str(Path(__file__).resolve()), "--standins", "--standin-host", sh,
                               "--host", sh, "--prefill-port", str(prefill_port), "--decode-ports",
                               *map(str, decode_ports), "--bootstrap-port", str(bootstrap_port),
                               "--layers", str(g.layers), "--experts", str(g.experts), "--top-k", str(g.top_k)]),
    )
    router_port = free_port(args.host)
    router = ServerProcess(
        role="router", host=args.host, port=router_port, log=logs / "router.log",
        cmd=pinned(router_cpu, [sys.executable, *(["-c", UVLOOP_ROUTER] if args.router_uvloop else
                                                  ["-m", "sglang_eldr.launch_router"]), "--host", args.host,
                                "--port", str(router_port), "--prefill", f"http://{sh}:{prefill_port}",
                                str(bootstrap_port), *[a for p in decode_ports for a in ("--decode", f"http://{sh}:{p}")],
                                "--policy", "eldr", "--centroids", str(args.centroids), *args.router_arg]),
    )
    print(f"NOTE: {NOTE}.")
    print(f"router pinned to CPU {router_cpu} ({'taskset' if taskset else 'not pinned: no taskset'}); stand-ins and "
          f"load generator on CPU {other_cpu}; centroids {args.centroids.name}: {cs.num_workers} decoders, "
          f"counts [{g.layers}, {g.experts}]")
    started = time.perf_counter()
    procs = [standins, router]
    try:
        standins.start()
        wait_all([standins], timeout_s=30)
        router.start()
        wait_all([router], timeout_s=60)
        assert router.proc is not None
        pin_self({other_cpu})
        results = asyncio.run(measure(args, router.url + "/generate", f"http://{sh}:{decode_ports[0]}/generate",
                                      router.proc.pid))
    finally:
        for p in procs:  # each in its own process group, ended by its PID
            p.stop(grace_s=10)
    elapsed = time.perf_counter() - started

    cr, cd, orr, od = (results[k] for k in ("closed_router", "closed_direct", "open_router", "open_direct"))
    added = {"p50_ms": round(orr["p50_ms"] - od["p50_ms"], 3), "p99_ms": round(orr["p99_ms"] - od["p99_ms"], 3)}
    targets = {"req_per_s": 1000, "p99_added_ms": 5.0}
    met = {"req_per_s": cr["req_per_s"] >= targets["req_per_s"], "p99_added_ms": added["p99_ms"] <= targets["p99_added_ms"]}
    report = {
        "note": NOTE, "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                  "loadavg_at_end": os.getloadavg()},
        "router_cpu": router_cpu, "client_and_standins_cpu": other_cpu, "policy": "eldr",
        "router_args": args.router_arg, "router_uvloop": args.router_uvloop,
        "centroids": args.centroids.name, "decoders": cs.num_workers, "counts_shape": [g.layers, g.experts],
        "quick": args.quick, "concurrency": args.concurrency, "rate": args.rate,
        **results, "added_at_rate": added, "targets": targets, "met": met, "elapsed_s": round(elapsed, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{'phase':<34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'router CPU':>10} {'µs/req':>7}  errors / fallbacks")
    for name, r in (("closed loop C=%d, router" % args.concurrency, cr), ("closed loop C=%d, direct" % args.concurrency, cd),
                    ("open loop %g/s, router" % args.rate, orr), ("open loop %g/s, direct" % args.rate, od)):
        util = f"{r['router_cpu_util'] * 100:.0f} %" if "router_cpu_util" in r else ""
        us = f"{r['router_cpu_us_per_req']:.0f}" if "router_cpu_us_per_req" in r else ""
        extra = f"{r['errors'] or '-'} / {r.get('fallbacks', '-')}"
        print(f"{name:<34} {r['req_per_s']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {util:>10} {us:>7}  {extra}")
    print(f"\nadded by the router at {args.rate:g} req/s: p50 {added['p50_ms']:+.2f} ms, p99 {added['p99_ms']:+.2f} ms"
          f" (client lateness p99 {orr['late_p99_ms']:.2f} ms router / {od['late_p99_ms']:.2f} ms direct)")
    print(f"targets: >= {targets['req_per_s']} req/s on one core: {'met' if met['req_per_s'] else 'NOT met'} "
          f"({cr['req_per_s']:.0f}; CPU-bound estimate {1e6 / cr['router_cpu_us_per_req']:.0f} req/s at "
          f"{cr['router_cpu_us_per_req']:.0f} µs/req); p99 added <= {targets['p99_added_ms']} ms: "
          f"{'met' if met['p99_added_ms'] else 'NOT met'}")
    print(f"NOTE: {NOTE}; shared machine, load average {os.getloadavg()[0]:.2f} at the end.")
    print(f"{elapsed:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
