"""PD serving across hosts, on distinct loopback addresses: every listener on its server's own
address, real counts reach a router on another address (no fallback), outputs equal a single
server, and a decoder kill/restart behaves as on one address."""

from __future__ import annotations

import ipaddress

import psutil
import requests

from tests.cluster.conftest import EVAL, rows
from tests.cluster.helpers import all_idle, decode_rows, wait_for

from .conftest import PLAIN, ROUTER

SHIPPED = "eldr-centroids-2d.eldr"


def generate(url: str, text: str) -> dict:
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 8}},
                      timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def listen_addresses(pid: int) -> set[str]:
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    out = set()
    for p in procs:
        out |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    return out


def listen_ports(pid: int) -> set[tuple[str, int]]:
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def as_v4(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def test_every_listener_is_on_its_servers_own_address(spread_cluster):
    """Nothing listens on a wildcard or another server's address. SGLang keeps its process-internal
    ZMQ sockets on 127.0.0.1 on purpose (unauthenticated; only its own processes connect), so those
    are the one exception; every port a peer or the router uses is on the server's own address."""
    router = spread_cluster.start_router(policy="jsq")
    for s in spread_cluster.servers + [router]:
        addrs = {as_v4(a) for a in listen_addresses(s.proc.pid)}
        assert s.host in addrs, f"{s.role} on {s.host} listens on {sorted(addrs)}"
        assert addrs <= {s.host, "127.0.0.1"}, f"{s.role} on {s.host} listens on {sorted(addrs)}"
        ports = {p for a, p in listen_ports(s.proc.pid) if as_v4(a) == s.host}
        public = {s.port} | ({s.bootstrap_port, s.counts_port} if s.role == "prefill" else set())
        assert public <= ports, f"{s.role} on {s.host}: {public - ports} not on its own address"
    info = requests.get(spread_cluster.prefills[0].url + "/eldr/info", timeout=5).json()
    assert info["counts"]["host"] == spread_cluster.prefills[0].host
    assert requests.get(spread_cluster.decoders[0].url + "/eldr/info", timeout=5).json()["capture"] is False


def test_router_on_another_address_routes_with_real_counts(spread_cluster):
    model = spread_cluster.model_path
    router = spread_cluster.start_router(policy="eldr-static", centroids=f"{model}/{SHIPPED}")
    assert router.host == ROUTER
    prefill_row = next(w for w in requests.get(router.url + "/workers", timeout=5).json()["workers"]
                       if w["role"] == "prefill")
    assert prefill_row["counts_endpoint"].startswith(f"tcp://{spread_cluster.prefills[0].host}:")
    plain = next(s for s in spread_cluster.servers if s.role == "plain")
    assert plain.host == PLAIN
    used = set()
    for row in rows(EVAL)[:6]:
        got = generate(router.url, row["text"])
        ref = generate(plain.url, row["text"])
        assert got["output_ids"] == ref["output_ids"], row["domain"]
        route = got["meta_info"]["eldr_route"]
        assert route["fallback"] is None and route["scores"] is not None, route
        used.add(route["decoder"])
    assert used <= {d.url for d in spread_cluster.decoders}
    assert all_idle(router.url)
    assert "eldr_fallbacks_total{" not in requests.get(router.url + "/metrics", timeout=5).text


def test_decoder_kill_and_restart_across_addresses(spread_cluster):
    router = spread_cluster.start_router(policy="rr", extra=["--health-interval", "1", "--health-failures", "1000"])
    victim, survivor = spread_cluster.decoders
    spread_cluster.kill(victim)
    outs = [generate(router.url, rows(EVAL)[i]["text"]) for i in (1, 2)]
    routes = [o["meta_info"]["eldr_route"] for o in outs]
    assert all(r["decoder"] == survivor.url for r in routes), routes
    assert [r["fallback"] for r in routes].count("decoder-unreachable") == 1, routes
    assert [w["healthy"] for w in decode_rows(router.url) if w["url"] == victim.url] == [False]
    spread_cluster.restart(victim)
    wait_for(lambda: all(w["healthy"] for w in decode_rows(router.url)), 30, "the restarted decoder back in service")
    used = {generate(router.url, rows(EVAL)[i]["text"])["meta_info"]["eldr_route"]["decoder"] for i in (3, 4)}
    assert used == {victim.url, survivor.url}
    assert all_idle(router.url)
