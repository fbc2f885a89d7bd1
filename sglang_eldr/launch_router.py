"""`python -m sglang_eldr.launch_router`: the ELDR PD load balancer.

Mirrors `sglang_router.launch_router --pd-disaggregation`: `--prefill URL [BOOTSTRAP_PORT
[COUNTS]]` (repeatable) and `--decode URL` (repeatable). The decoder of each request is chosen
after its prefill, from the expert counts the prefill server publishes. By default the router asks
each prefill where its publisher listens (GET URL/eldr/info, which `sglang_eldr.launch_server`
serves); COUNTS (PORT or HOST:PORT) overrides that. Servers may be on any hosts: the router
connects to the addresses in the URLs and to the advertised counts endpoints.

Endpoints: POST /generate, /v1/completions, /v1/chat/completions; GET /health, /metrics
(Prometheus), /workers, /server_info, /v1/models; POST /flush_cache; POST /workers and
DELETE /workers/{url} to add or remove servers while serving (see the README's operations section);
POST /centroids to load a centroid file while serving.

The default policy, marginal, needs nothing but the servers: it learns the MoE shape from the first
counts report and routes by each decoder's expected experts. The eldr policies route by centroids.
An eldr policy started without --centroids serves at once, least-loaded (receipts say
`fallback: "no-centroids"`; /health and /workers say `routing: "least-loaded (no centroids)"`),
until a file arrives: `curl --data-binary @m.eldr localhost:30000/centroids` validates it like
--centroids (checksum, geometry, one centroid per current decoder; a bad file gets a 400 and
routing stays as it was) and swaps it in without cutting any request.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from urllib.parse import urlparse

from aiohttp import web

from sglang_eldr import centroids as centroid_file
from sglang_eldr.decode_policy import DECODE_POLICIES, DEFAULT_DECODE_POLICY, DEFAULT_STEP_COST, DecodeChooser
from sglang_eldr.fleet import LBConfig, Worker
from sglang_eldr.load_balancer import LoadBalancer
from sglang_eldr.paths import local_path
from sglang_eldr.prefill_policy import PREFILL_POLICIES, PrefillPicker
from sglang_eldr.router_rs import DEFAULT_SHARPNESS

DEFAULT_BOOTSTRAP_PORT = 8998


def parse_counts(spec: str) -> tuple[str | None, int]:
    """COUNTS of `--prefill`: PORT, HOST:PORT or [IPv6]:PORT."""
    head, sep, port = spec.rpartition(":")
    host = head.strip("[]") if sep else None
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
        raise ValueError(f"counts endpoint {spec!r}: expected PORT or HOST:PORT")
    return host, int(port)


def parse_prefill(spec: list[str]) -> Worker:
    if not 1 <= len(spec) <= 3:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT [COUNTS]], got {' '.join(spec)}")
    url = spec[0].rstrip("/")
    if not url.startswith(("http://", "https://")) or not urlparse(url).hostname:
        raise ValueError(f"--prefill: {url!r} is not an http(s)://HOST:PORT URL")
    try:
        bootstrap = int(spec[1]) if len(spec) > 1 and spec[1].lower() != "none" else DEFAULT_BOOTSTRAP_PORT
    except ValueError:
        raise ValueError(f"--prefill {url}: the bootstrap port must be an integer, got {spec[1]!r}") from None
    counts_host, counts_port = parse_counts(spec[2]) if len(spec) > 2 else (None, None)
    return Worker(url=url, role="prefill", bootstrap_port=bootstrap, counts_port=counts_port, counts_host=counts_host)


def step_cost(text: str) -> tuple[float, float, float]:
    try:
        a, b, c = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three numbers A,B,C (seconds), e.g. 0.007,0.0008,0.0015") from None
    if min(a, b, c) < 0 or not all(math.isfinite(x) for x in (a, b, c)) or (b == 0 and c == 0):
        raise argparse.ArgumentTypeError(f"{text!r}: A, B, C must be finite and >= 0, and B or C > 0")
    return a, b, c


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sglang_eldr.launch_router", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--prefill", nargs="+", action="append", required=True, metavar="URL [BOOTSTRAP [COUNTS]]",
                    help="prefill server URL, optional bootstrap port (default 8998) and counts endpoint "
                         "(PORT or HOST:PORT; default: what the prefill advertises at GET /eldr/info); "
                         "repeat for several prefill servers")
    ap.add_argument("--decode", action="append", required=True, metavar="URL", help="decode server URL; repeat")
    ap.add_argument("--policy", choices=DECODE_POLICIES, default=DEFAULT_DECODE_POLICY,
                    help="decode policy: eldr (locality band, online refit), eldr-static (no refit), marginal "
                         "(the decoder where the request adds the least predicted step time, from the prefill "
                         "counts of the requests each decoder runs; no centroids), or a load-only baseline "
                         f"(default: {DEFAULT_DECODE_POLICY})")
    ap.add_argument("--step-cost", type=step_cost, default=DEFAULT_STEP_COST, metavar="A,B,C",
                    help="marginal: the decode step time it predicts, A + B x requests in the batch + C x distinct "
                         "(layer, expert) pairs read, in seconds (bench/measure_step_cost.py measures them). Only "
                         "the ratio B/C matters; with B = 0 the choice is the fewest new expert reads weighted by "
                         "the requests that wait for them (default: 0,0,1)")
    ap.add_argument("--batch-cap", type=int, default=None, metavar="N",
                    help="marginal: a decoder with N requests in flight is passed over while another has room (a "
                         "newcomer there would queue for a slot before its first token); set it to the decoders' "
                         "--max-running-requests (default: no cap)")
    ap.add_argument("--sharpness", type=float, default=None, metavar="GAMMA",
                    help="marginal: each request's expected expert frequencies are its prefill counts raised to "
                         "GAMMA, normalised per layer; above 1 they lean on the experts the prompt uses most, which "
                         f"predict its decode tokens' experts better than raw counts (default: {DEFAULT_SHARPNESS:g}, "
                         "from the simulator on the tiny model's traces; 1 = raw counts)")
    ap.add_argument("--prefill-policy", choices=PREFILL_POLICIES, default="prefix-hash",
                    help="prefill choice: prefix-hash with a load gate (cache affinity) or rr (default: prefix-hash)")
    ap.add_argument("--prefill-load-gate", type=int, default=4,
                    help="prefix-hash yields to the least-loaded prefill when its choice has more than this "
                         "many extra requests in flight (default: 4)")
    ap.add_argument("--centroids", type=local_path,
                    help="centroid file from `python -m sglang_eldr.calibrate` (eldr policies; without it they "
                         "route least-loaded until one is POSTed to /centroids)")
    ap.add_argument("--tau", type=float, default=0.1,
                    help="locality band width: 0 = pure locality, 1 = pure least-loaded (default: 0.1)")
    ap.add_argument("--max-imbalance", type=int, default=2,
                    help="starvation guard for the eldr policies: never send a request to a decoder that already "
                         "has more than this many requests in flight above the least-loaded healthy decoder, "
                         "whatever the locality says (default: 2; -1 turns the guard off)")
    ap.add_argument("--imbalance-fraction", type=float, default=0.0,
                    help="eldr: make the starvation guard relative to load: a decoder may be up to "
                         "max(--max-imbalance, floor(F x mean in-flight)) above the least loaded (default: 0, the "
                         "absolute guard; 0.25 lets locality act at high load too)")
    ap.add_argument("--counts-deadline", type=float, default=5.0,
                    help="seconds to wait for a prefill's expert counts, counted from when the prefill server starts the "
                         "request (time queued there does not count; from sending it when its publisher is silent), "
                         "before routing least-loaded with fallback counts-timeout. A report the prefill's heartbeat "
                         "says was sent but never arrived is routed least-loaded at once (counts-lost). Default: 5")
    ap.add_argument("--early-first-token", action=argparse.BooleanOptionalAction, default=True,
                    help="streaming OpenAI requests (/v1/chat/completions, /v1/completions): the prefill streams "
                         "the first token (SGLang's own chunk, sent the moment its prefill batch is processed) and "
                         "the client gets it without waiting for the handoff to the decoder (its admission, the KV "
                         "transfer, its first step); the decoder's stream continues without "
                         "repeating it. Not for /generate, tool calls or echo, nor for a first token that could "
                         "end the request (stop strings, EOS). The receipt's first_token says where it came "
                         "from (default: on)")
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="seconds without data from an upstream server before the request fails (default: 600)")
    ap.add_argument("--health-interval", type=float, default=2.0,
                    help="seconds between health checks of every server; 0 disables them (default: 2)")
    ap.add_argument("--health-failures", type=int, default=3,
                    help="consecutive failed checks that take a server out of routing; the next passing check "
                         "puts it back (default: 3)")
    ap.add_argument("--health-timeout", type=float, default=5.0,
                    help="seconds one health check may take before it counts as failed (default: 5)")
    ap.add_argument("--orphan-grace", type=float, default=10.0,
                    help="seconds a decode may go on after its prefill call failed before the router aborts "
                         "it with a 502 (default: 10)")
    ap.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                    help="largest request body accepted; larger ones get 413 (default: 16 MiB)")
    ap.add_argument("--allow-unknown-fields", action="store_true",
                    help="pass request fields the installed SGLang version does not define on to the servers "
                         "(by default they get a 400 naming the field)")
    ap.add_argument("--refit", choices=("online", "off"), default=None,
                    help="eldr: refit the centroids periodically on recent requests (online, the default) or keep "
                         "the loaded ones (off; --policy eldr-static is the same as --policy eldr --refit off)")
    ap.add_argument("--refit-window", type=float, default=5.0, help="online refit window, seconds (default: 5)")
    ap.add_argument("--refit-interval", type=float, default=2.5, help="online refit period, seconds (default: 2.5)")
    ap.add_argument("--refit-min-samples", type=int, default=None,
                    help="requests a refit needs: it fits on the last --refit-window seconds, or on the last this "
                         "many requests when fewer arrived in that time (default: max(64, 16 per decoder), at most "
                         "the 4096 the window keeps)")
    ap.add_argument("--refit-every", type=int, default=None,
                    help="online refit: also refit after this many new requests, not only every --refit-interval "
                         "seconds (default: time only)")
    ap.add_argument("--seed", type=int, default=0, help="seed for random/p2c and the refit (default: 0)")
    ap.add_argument("--host", default="0.0.0.0",
                    help="address the router's HTTP port binds: clients on other hosts reach the router there "
                         "(default: 0.0.0.0, every interface; give one address, e.g. 127.0.0.1, to restrict it)")
    ap.add_argument("--port", type=int, default=30000, help="bind port (default: 30000)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def build_balancer(args: argparse.Namespace) -> LoadBalancer:
    prefills = [parse_prefill(spec) for spec in args.prefill]
    decoders = [Worker(url=u.rstrip("/"), role="decode") for u in args.decode]
    cs = centroid_file.load(args.centroids) if args.centroids else None
    chooser = DecodeChooser(
        args.policy, [d.url for d in decoders], cs, breaker_failures=args.health_failures, tau=args.tau, seed=args.seed, refit_window_s=args.refit_window,
        refit_interval_s=args.refit_interval, refit_min_samples=args.refit_min_samples,
        max_imbalance=None if args.max_imbalance < 0 else args.max_imbalance,
        imbalance_fraction=args.imbalance_fraction, refit_every=args.refit_every,
        online_refit=None if args.refit is None else args.refit == "online", step_cost=args.step_cost,
        batch_cap=args.batch_cap, sharpness=args.sharpness,
    )
    return LoadBalancer(
        prefills=prefills, decoders=decoders, decode=chooser,
        prefill_picker=PrefillPicker(args.prefill_policy, load_gate=args.prefill_load_gate),
        config=LBConfig(counts_deadline_s=args.counts_deadline, request_timeout_s=args.request_timeout,
                        health_interval_s=args.health_interval, health_failures=args.health_failures,
                        health_timeout_s=args.health_timeout, orphan_grace_s=args.orphan_grace,
                        max_body_bytes=args.max_body_bytes, allow_unknown_fields=args.allow_unknown_fields,
                        early_first_token=args.early_first_token),
        policy_name=args.policy,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lb = build_balancer(args)
    except (ValueError, centroid_file.CentroidFileError) as e:
        print(f"launch_router: {e}", file=sys.stderr)
        return 2
    logging.getLogger("sglang_eldr").info(
        "ELDR router on http://%s:%d policy=%s prefills=%s decoders=%s",
        args.host, args.port, args.policy, [p.url for p in lb.prefills], [d.url for d in lb.decoders],
    )
    web.run_app(lb.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
