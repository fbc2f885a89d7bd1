"""Two hosts for real: network namespaces the test creates (a veth pair, addresses only inside the
namespaces) and removes. Host A (10.231.0.1) runs the prefill and a plain reference server; host B
(10.231.0.2) runs both decoders, the router and the test's own HTTP client, so prefill requests, the
expert counts and the KV transfer all cross from A to B. Needs root and `ip netns`; skipped otherwise."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import pytest

from sglang_eldr.launch_cluster import Cluster, Server, free_port, pd_env
from tests.cluster.conftest import MODEL, _missing

T = TypeVar("T")
HOST_A, HOST_B = "10.231.0.1", "10.231.0.2"
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"eldr-probe-{os.getpid()}"
    r = _ip("netns", "add", probe)
    if r.returncode != 0:
        return f"ip netns does not work here: {r.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Runs `fn` in a thread that has entered network namespace `name` (namespaces are per thread;
    processes it starts are born there)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            with open(f"/run/netns/{name}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({name})")
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class TwoHosts:
    tag: str
    ns: dict[str, str] = field(default_factory=dict)  # host address -> namespace

    def up(self) -> None:
        a, b = f"eldr-a-{self.tag}", f"eldr-b-{self.tag}"
        va, vb = f"eldra{self.tag}"[:15], f"eldrb{self.tag}"[:15]
        steps = [("netns", "add", a), ("netns", "add", b), ("link", "add", va, "type", "veth", "peer", "name", vb),
                 ("link", "set", va, "netns", a), ("link", "set", vb, "netns", b),
                 ("-n", a, "addr", "add", f"{HOST_A}/24", "dev", va), ("-n", b, "addr", "add", f"{HOST_B}/24", "dev", vb),
                 ("-n", a, "link", "set", va, "up"), ("-n", b, "link", "set", vb, "up"),
                 ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")]
        self.ns = {HOST_A: a, HOST_B: b}
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                raise RuntimeError(f"ip {' '.join(step)}: {r.stderr.strip()}")

    def down(self) -> None:
        for name in self.ns.values():
            _ip("netns", "del", name)  # removes the veth end inside it, and so the pair


class NetnsCluster(Cluster):
    """A Cluster whose servers live in the namespaces of their hosts."""

    hosts_ns: TwoHosts

    def free_port(self, host: str) -> int:
        return in_netns(self.hosts_ns.ns[host], lambda: free_port(host))

    def _server_cmd(self, s: Server) -> list[str]:
        return ["ip", "netns", "exec", self.hosts_ns.ns[s.host]] + super()._server_cmd(s)


@pytest.fixture(scope="package")
def two_hosts():
    why = netns_usable() or _missing()
    if why:
        pytest.skip(why)
    h = TwoHosts(tag=str(os.getpid() % 100000))
    try:
        h.up()
        yield h
    finally:
        h.down()
        assert not [n for n in h.ns.values() if n in _ip("netns", "list").stdout], "namespaces left behind"


@pytest.fixture(scope="package")
def netns_cluster(two_hosts, tmp_path_factory):
    """Started and used from a thread inside host B (see `in_netns`)."""
    c = NetnsCluster(model_path=str(MODEL), num_prefill=1, num_decode=2, max_total_tokens=8192, policy="eldr",
                     hosts=[HOST_A, HOST_B, HOST_B], router_host=HOST_B, log_dir=tmp_path_factory.mktemp("netns"))
    c.hosts_ns = two_hosts
    b = two_hosts.ns[HOST_B]

    def start() -> Server:
        c.start_servers()
        port = c.free_port(HOST_A)
        cmd = ["ip", "netns", "exec", two_hosts.ns[HOST_A], sys.executable, "-m", "sglang_eldr.launch_server",
               "--model-path", str(MODEL), "--host", HOST_A, "--port", str(port), "--device", "cpu",
               "--max-total-tokens", "8192"]
        plain = Server("plain", port, c.log_dir / "plain.log", host=HOST_A, cmd=cmd, env=pd_env(0, host=HOST_A)).start()
        c.servers.append(plain)
        c.wait_healthy(c.servers)
        return plain

    try:
        plain = in_netns(b, start)
        yield c, plain, b
    finally:
        c.stop()
