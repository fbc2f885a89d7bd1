"""One real 1P+2D PD cluster of the tiny trained MoE for this test package (torn down before the next package starts its servers, to bound memory), plus a plain single
server as the output reference. Routers are started per test (about a second each)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sglang_eldr.launch_cluster import Cluster, Server, free_port, pd_env

HOST = "127.0.0.1"  # these tests' own address: the whole cluster on this machine's loopback
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-qwen3-moe"
CALIB = ROOT / "bench" / "data" / "prompts_calib.jsonl"
EVAL = ROOT / "bench" / "data" / "prompts_eval.jsonl"


def _missing() -> str | None:
    for mod in ("sglang", "mooncake"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (run `make test`, which installs the engine)"
    if not (MODEL / "config.json").exists():
        return f"the tiny model is missing at {MODEL}"
    return None


def rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    why = _missing()
    if why:
        pytest.fail(why)  # the suite installs everything; a missing piece is a failure, not a skip
    # A relative model path, as users type it: the servers run in the log directory, so this
    # exercises the Cluster's path resolution for real.
    with contextlib.chdir(ROOT):
        c = Cluster(model_path=str(MODEL.relative_to(ROOT)), num_prefill=1, num_decode=2, max_total_tokens=8192, policy="eldr",
                    host=HOST, log_dir=tmp_path_factory.mktemp("cluster"))
    with c:
        yield c


@pytest.fixture(scope="package")
def centroids(cluster) -> str:
    shipped = MODEL / "eldr-centroids-2d.eldr"
    if shipped.exists():
        return str(shipped)
    return str(cluster.calibrate(CALIB))


@pytest.fixture(scope="package")
def reference_server(cluster):
    """A plain (non-PD) ELDR server of the same model: greedy outputs to compare against."""
    port = free_port(HOST)
    cmd = [sys.executable, "-m", "sglang_eldr.launch_server", "--model-path", str(MODEL), "--host", HOST,
           "--port", str(port), "--device", "cpu", "--max-total-tokens", "8192"]
    s = Server("plain", port, cluster.log_dir / "plain.log", host=HOST, cmd=cmd, env=pd_env(0, host=HOST)).start()
    cluster.servers.append(s)  # stopped with the cluster
    cluster.wait_healthy([s])
    return s
