"""Fixtures for the PD transport tests: one prefill + one decode server (Mooncake over TCP on 127.0.0.1)
and one plain server for reference outputs, each started once per test session.

All three start together (start-up is 35-55 s each on an idle 2-core machine, dominated by imports); the
plain server is stopped as soon as the reference outputs are taken. Skipped when SGLang or Mooncake's
transfer engine is not importable by the running interpreter (ELDR_REQUIRE_ENGINE=1 makes that an error);
install them with scripts/install_engine.sh and scripts/install_pd_cpu.sh.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sglang_eldr import server_process
from sglang_eldr.server_process import LOOPBACK_PRELOAD  # noqa: F401 - used by the tests
from tests.engine.servers import Server, free_port
from tests.pd import tiny_untied
from tests.engine.helpers import counts_of
from tests.pd.client import generate_body, post

HERE = Path(__file__).parent
# Short prompts plus one long enough (~170 tokens) to be prefilled in several chunks of CHUNK tokens.
PROMPTS = (
    "The quick brown fox jumps over",
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "Solve 3x + 5 = 20. Then x = 5. " * 12,
)
CHUNK = 64
MAX_NEW_TOKENS = 16
# Small, so that the "decoder never comes" test is quick; still far above the ~1 s a decoder takes
# to bootstrap here.
HOST = "127.0.0.1"  # these tests' own address: the PD pair on this machine's loopback
BOOTSTRAP_TIMEOUT_S = 12


def _missing() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return "SGLang is not installed (scripts/install_engine.sh VENV)"
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as e:
        return f"Mooncake's transfer engine does not import ({e}); run scripts/install_pd_cpu.sh VENV"
    return None


def pytest_collection_modifyitems(config, items):
    why = _missing()
    if why is None:
        return
    if os.environ.get("ELDR_REQUIRE_ENGINE") == "1":
        raise pytest.UsageError(why)
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if Path(str(item.fspath)).parent == HERE:
            item.add_marker(skip)


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return [0]


def pd_env(core: int) -> dict[str, str]:
    env = server_process.pd_env(core, HOST, bootstrap_timeout_s=BOOTSTRAP_TIMEOUT_S)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


@dataclass
class PDPair:
    prefill: Server
    decode: Server
    bootstrap_port: int
    plain: Server
    reference: dict = field(default_factory=dict)  # prompt -> plain server's /generate body
    reference_counts: dict = field(default_factory=dict)  # prompt -> plain server's eldr_counts [L, E]

    def all_servers(self) -> list[Server]:
        return [self.prefill, self.decode, self.plain]

    def stop(self) -> None:
        for s in self.all_servers():
            s.stop()


@pytest.fixture(scope="package")
def pd_model_dir(tmp_path_factory) -> Path:
    """The trained tiny MoE when committed (untied lm_head), else its random-weights, untied twin."""
    if tiny_untied.trained_usable():
        return tiny_untied.TRAINED_DIR
    return tiny_untied.build(tmp_path_factory.mktemp("pd-models") / "random-moe-untied")


@pytest.fixture(scope="package")
def pd_pair(request, pd_model_dir, tmp_path_factory) -> PDPair:
    logs = tmp_path_factory.mktemp("pd-logs")
    cores = _cores()
    c_prefill, c_decode = cores[0], cores[-1]
    bootstrap = free_port(HOST)
    common = ("--disaggregation-transfer-backend", "mooncake",
              "--disaggregation-decode-allocation-policy", "prefill_complete",
              "--max-total-tokens", "8192")
    started: list[Server] = []

    def start(name, args, core):
        s = Server(pd_model_dir, logs / f"{name}.log", args=args, env=pd_env(core))
        started.append(s)
        return s

    def ready(s: Server, name, args, core) -> Server:
        """Waits for `s`; once more on a new port when another process took its port between
        free_port() and the bind (the PD servers open many ports while they start)."""
        try:
            return s.wait_ready()
        except server_process.PortTaken:
            s.stop()
            return start(name, args, core).wait_ready()

    specs = {
        "prefill": (common + ("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap),
                              "--chunked-prefill-size", str(CHUNK)), c_prefill),
        "decode": (common + ("--disaggregation-mode", "decode"), c_decode),
        "plain": (("--max-total-tokens", "8192", "--chunked-prefill-size", str(CHUNK)), c_prefill),
    }
    try:
        servers = {name: start(name, *spec) for name, spec in specs.items()}
        for name in ("plain", "prefill", "decode"):
            servers[name] = ready(servers[name], name, *specs[name])
        prefill, decode, plain = servers["prefill"], servers["decode"], servers["plain"]
        pair = PDPair(prefill, decode, bootstrap, plain)
        request.addfinalizer(pair.stop)
    except BaseException:
        for s in started:
            s.stop()
        raise
    # Reference outputs one request at a time (batch of one, as the PD requests below), then free the core.
    for p in PROMPTS:
        status, body = post(plain.url, generate_body(p, max_new_tokens=MAX_NEW_TOKENS))
        assert status == 200, body
        pair.reference[p] = body
        plain.flush_cache()
        status, body = post(plain.url, {**generate_body(p, max_new_tokens=1), "return_eldr_counts": True})
        assert status == 200, body
        pair.reference_counts[p] = counts_of(body)
    plain.stop()
    return pair
