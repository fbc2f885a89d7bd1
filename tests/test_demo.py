"""`make demo` end to end on a smaller batch: a real 1P+4D cluster, every policy's table, the
equal-batch comparison, identical outputs, no fallback, and every in-flight counter back at zero."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_shows_locality():
    proc = subprocess.run([sys.executable, "-m", "sglang_eldr.demo", "--host", "127.0.0.1", "--requests", "12",
                           "--concurrency", "8", "--max-new-tokens", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for policy in ("marginal", "eldr", "jsq"):
        assert f"{policy}: requests decoded per decoder, by kind of text" in out
    assert out.count("in flight after the run [0, 0, 0, 0]") == 3, out
    assert out.count("fallbacks {'none': 12}") == 3, out
    assert len(re.findall(r"outputs identical to jsq's 12/12", out)) == 2, out
    assert re.search(r"eldr: centroids models/tiny-qwen3-moe/eldr-centroids-4d\.eldr", out)
    assert "at equal batch size" in out
