"""A 1P+2D cluster whose servers and router each listen on their own address (127.0.0.2 ... 127.0.0.5,
nothing on 127.0.0.1), plus a plain reference server on 127.0.0.6. The counts publisher, the
transfer engine and the router all have to use the addresses they are given for it to route."""

from __future__ import annotations

import sys

import pytest

from sglang_eldr.launch_cluster import Cluster, Server, free_port, pd_env
from tests.cluster.conftest import MODEL, _missing

PREFILL, DECODE_1, DECODE_2, ROUTER, PLAIN = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"


@pytest.fixture(scope="package")
def spread_cluster(tmp_path_factory):
    why = _missing()
    if why:
        pytest.fail(why)
    c = Cluster(model_path=str(MODEL), num_prefill=1, num_decode=2, max_total_tokens=8192, policy="eldr",
                hosts=[PREFILL, DECODE_1, DECODE_2], router_host=ROUTER, log_dir=tmp_path_factory.mktemp("spread"))
    with c:
        port = free_port(PLAIN)
        cmd = [sys.executable, "-m", "sglang_eldr.launch_server", "--model-path", str(MODEL), "--host", PLAIN,
               "--port", str(port), "--device", "cpu", "--max-total-tokens", "8192"]
        plain = Server("plain", port, c.log_dir / "plain.log", host=PLAIN, cmd=cmd, env=pd_env(0, host=PLAIN)).start()
        c.servers.append(plain)  # stopped with the cluster
        c.wait_healthy([plain])
        yield c
