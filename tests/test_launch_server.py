"""`python -m sglang_eldr.launch_server` before any model load: ELDR defaults per role, and layouts
that cannot work refused with one line naming SGLang's own limit (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from sglang_eldr import launch_server
from sglang_eldr.engine import settings as S
from sglang_eldr.engine.info_route import ENV_INFO, ServerInfo

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-qwen3-moe"


@pytest.fixture
def clean_env():
    """prepare() exports its settings for SGLang's processes; give this process its environment back."""
    saved = dict(os.environ)
    for k in (S.ENV_ENABLE, S.ENV_CAPTURE, S.ENV_COUNTS_PORT, S.ENV_COUNTS_HOST, S.ENV_COUNTS_PORT_FILE,
              S.ENV_CPU_GUARDS, ENV_INFO):
        os.environ.pop(k, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_capture_is_on_for_prefill_and_off_for_decode_unless_asked(clean_env):
    rest, launch = launch_server.prepare(["--model-path", str(MODEL), "--host", "127.0.0.7",
                                          "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "8998"])
    assert launch.capture and "--enable-return-routed-experts" in rest
    assert rest[rest.index("--disaggregation-decode-allocation-policy") + 1] == "prefill_complete"
    # No counts host given: the publisher binds, and /eldr/info advertises, the address SGLang serves on.
    assert launch.counts_host is None and S.ENV_COUNTS_HOST not in os.environ
    # No port given: the publisher binds port 0 and reports the port the OS gave it through a file.
    assert launch.counts_port is None and os.environ[S.ENV_COUNTS_PORT] == "0"
    assert os.environ[S.ENV_COUNTS_PORT_FILE] == launch.counts_port_file
    assert launch.info("127.0.0.7")["counts"] == {"host": "127.0.0.7", "port": None}  # not bound yet
    Path(launch.counts_port_file).write_text("41234")
    assert launch.info("127.0.0.7")["counts"] == {"host": "127.0.0.7", "port": 41234}
    assert launch.info("0.0.0.0")["counts"] == {"host": None, "port": 41234}  # wildcard: the router's URL host

    assert msgspec.json.decode(os.environ[ENV_INFO], type=ServerInfo) == launch  # what GET /eldr/info serves
    rest, launch = launch_server.prepare(["--model-path", str(MODEL), "--disaggregation-mode", "decode"])
    assert not launch.capture and "--enable-return-routed-experts" not in rest
    assert launch.info("127.0.0.7")["counts"] is None and os.environ[S.ENV_CAPTURE] == "0"
    rest, launch = launch_server.prepare(["--model-path", str(MODEL), "--disaggregation-mode", "decode", "--eldr-capture"])
    assert launch.capture and "--enable-return-routed-experts" in rest

    rest, launch = launch_server.prepare(["--model-path", str(MODEL), "--host", "0.0.0.0", "--disaggregation-mode",
                                          "prefill", "--eldr-counts-host", "0.0.0.0", "--eldr-counts-port", "9111",
                                          "--eldr-counts-advertise-host", "10.1.2.3"])
    assert (launch.counts_host, launch.counts_port, launch.advertise_host) == ("0.0.0.0", 9111, "10.1.2.3")
    assert os.environ[S.ENV_COUNTS_HOST] == "0.0.0.0"
    assert launch.info("0.0.0.0")["counts"] == {"host": "10.1.2.3", "port": 9111}


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sglang_eldr.launch_server", "--model-path", str(MODEL), *args],
                          capture_output=True, text=True, timeout=180, env=env, cwd="/")


def refusal(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith("launch_server: refused:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Load weight" not in r.stderr + r.stdout  # refused before any model load
    return lines[0]


def test_allocation_policy_other_than_prefill_complete_is_refused():
    t0 = time.monotonic()
    line = refusal(run("--disaggregation-mode", "prefill", "--disaggregation-decode-allocation-policy", "early"))
    assert "prefill_complete" in line and time.monotonic() - t0 < 60


@pytest.mark.parametrize("args,limit", [
    (("--disaggregation-mode", "prefill", "--tp", "2"), "attention tensor parallelism"),
    (("--disaggregation-mode", "prefill", "--pp-size", "2"), "pipeline"),
    (("--disaggregation-mode", "decode", "--disaggregation-decode-enable-radix-cache"), "decode radix cache"),
])
def test_layouts_sglang_cannot_serve_are_refused_with_its_reason(args, limit):
    line = refusal(run("--disaggregation-transfer-backend", "mooncake", *args))
    assert limit in line, line
