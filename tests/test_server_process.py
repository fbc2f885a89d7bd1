"""Server start-up supervision (sglang_eldr.server_process): a server whose port was taken between
choosing and binding is reported at once, not after the start-up timeout."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from sglang_eldr.server_process import BIND_FAILED, PortTaken, ServerProcess, free_port, wait_all


def test_a_taken_port_is_reported_at_once(tmp_path):
    host = "127.0.0.1"
    with socket.socket() as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Binds the way uvicorn does and, like SGLang's server, logs the failure and stays up.
        script = (f"import socket, sys, time\ns = socket.socket()\ntry:\n    s.bind(({host!r}, {port}))\n"
                  f"except OSError as e:\n    print('ERROR:    [Errno 98] {BIND_FAILED} ({host!r}, {port}): ' + str(e), "
                  f"flush=True)\ntime.sleep(60)\n")
        server = ServerProcess(role="plain", port=port, log=tmp_path / "s.log", host=host,
                               cmd=[sys.executable, "-c", script], env=None)
        server.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(PortTaken, match=f"could not bind port {port}"):
                wait_all([server], timeout_s=60)
            assert time.monotonic() - t0 < 20
        finally:
            server.stop()
    assert not server.running() and free_port(host) > 0
