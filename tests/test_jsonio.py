"""The router's JSON fast path gives exactly what the stdlib gives, and falls back to it (same
values, same errors) where msgspec would differ; `first_done` waits like asyncio.wait."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_eldr.jsonio import dumps_json, loads_json
from sglang_eldr.dispatch import first_done

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text())
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
                      max_leaves=20)


@given(v=values, ascii_only=st.booleans())
def test_fast_path_equals_the_stdlib(v, ascii_only):
    data = json.dumps(v, ensure_ascii=ascii_only).encode()
    got, fast = loads_json(data)
    assert got == json.loads(data)
    assert json.loads(dumps_json(got, fast)) == json.loads(data)


@pytest.mark.parametrize("data", [b'{"x": NaN}', b'{"x": Infinity}', b'"\\ud800"', b'[1e400]'])
def test_inputs_msgspec_reads_differently_take_the_stdlib(data):
    got, fast = loads_json(data)
    want = json.loads(data)
    assert json.dumps(got) == json.dumps(want)
    assert json.dumps(json.loads(dumps_json(got, fast))) == json.dumps(want)
    if isinstance(want, dict):
        assert not fast and math.isnan(got["x"]) == math.isnan(want["x"])


@pytest.mark.parametrize("data", [b'{"x": 1', b"\xef\xbb\xbf{}", b"\xff\xfe", b"", b"[1,]"])
def test_errors_are_the_stdlibs(data):
    try:
        json.loads(data)
    except Exception as e:  # noqa: BLE001
        want: type[BaseException] | None = type(e)
    else:
        want = None
    if want is None:
        assert loads_json(data)[0] == json.loads(data)
    else:
        with pytest.raises(want):
            loads_json(data)


def test_first_done_wakes_on_the_first_and_on_timeout_and_cancels_nothing():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = loop.create_future(), loop.create_future()
        loop.call_later(0.02, a.set_result, 1)
        await asyncio.wait_for(first_done((a, b), timeout=5), 1)
        assert a.done() and not b.done()
        c = loop.create_future()
        t0 = loop.time()
        await first_done((b, c), timeout=0.05)
        assert not b.done() and not c.done() and loop.time() - t0 >= 0.04
        waiter = asyncio.ensure_future(first_done((b, c)))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not b.cancelled() and not c.cancelled()

    asyncio.run(main())
