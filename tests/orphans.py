"""Shared check: a helper process started by a parent process ends when that parent is killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def assert_child_ends_with_parent(script: Path, *args: str, what: str, within_s: float = 10.0) -> None:
    """Runs `script` (which prints its helper's PID, then sleeps), checks the helper is alive,
    SIGKILLs the script and waits up to `within_s` for the helper to be gone."""
    parent = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # alive while its parent is
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise AssertionError(f"{what} {child} still runs {within_s:.0f} s after its parent was killed")
    finally:
        if parent.poll() is None:
            parent.kill()
