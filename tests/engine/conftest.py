"""Fixtures for the engine tests: tiny models and one real server per configuration (session-scoped).

Servers take 35-55 s to start on a 2-core CPU machine, so every configuration starts once and is
shared by all tests that need it. The engine tests are skipped when SGLang is not installed in the
running interpreter (set ELDR_REQUIRE_ENGINE=1 to make that an error instead).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.engine.servers import Server
from tests.engine.tiny_model import TRAINED_DIR, build


def _engine_missing() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return "SGLang is not installed (scripts/install_engine.sh VENV)"
    return None


def pytest_collection_modifyitems(config, items):
    why = _engine_missing()
    if why is None:
        return
    if os.environ.get("ELDR_REQUIRE_ENGINE") == "1":
        raise pytest.UsageError(why)
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if Path(str(item.fspath)).parent == here and "needs_engine" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_engine: starts a real SGLang server")


def _trained_present() -> bool:
    return (TRAINED_DIR / "config.json").exists() and any(TRAINED_DIR.glob("*.safetensors"))


@pytest.fixture(scope="package")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="package")
def random_moe_dir(models_dir) -> Path:
    """Random-weights twin of the tiny MoE (negative controls; stand-in until the trained one lands)."""
    return build(models_dir / "random-moe", seed=0)


@pytest.fixture(scope="package")
def moe_dir(random_moe_dir) -> Path:
    """The model under test: the trained tiny MoE when committed, else the random twin."""
    return TRAINED_DIR if _trained_present() else random_moe_dir


@pytest.fixture(scope="package")
def dense_dir(models_dir) -> Path:
    return build(models_dir / "dense", dense=True, seed=0)


@pytest.fixture(scope="package")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def _serve(request, model_dir, logs, name, **kw) -> Server:
    srv = Server(model_dir, logs / f"{name}.log", **kw)
    request.addfinalizer(srv.stop)
    return srv.wait_ready()


@pytest.fixture(scope="package")
def eldr_server(request, moe_dir, server_logs) -> Server:
    """ELDR defaults: radix cache, page size 1, slot storage."""
    return _serve(request, moe_dir, server_logs, "eldr-default")


@pytest.fixture(scope="package")
def eldr_paged_server(request, moe_dir, server_logs) -> Server:
    """Chunked prefill smaller than the prompts, page size 16, a KV pool small enough to
    evict."""
    return _serve(request, moe_dir, server_logs, "eldr-paged", args=(
        "--chunked-prefill-size", "64", "--page-size", "16",
        "--max-total-tokens", "1024", "--max-running-requests", "4"))


@pytest.fixture(scope="package")
def stock_server(request, moe_dir, server_logs) -> Server:
    """Stock ``python -m sglang.launch_server`` (ELDR package installed, plugin inactive)."""
    return _serve(request, moe_dir, server_logs, "stock", eldr=False)


@pytest.fixture(scope="package")
def dense_server(request, dense_dir, server_logs) -> Server:
    return _serve(request, dense_dir, server_logs, "eldr-dense")


@pytest.fixture(scope="package")
def capture_off_server(request, moe_dir, server_logs) -> Server:
    return _serve(request, moe_dir, server_logs, "eldr-capture-off", args=("--no-eldr-capture",))
