"""SGLang PD disaggregation on CPU (Mooncake over TCP, 127.0.0.1) in the order the ELDR router uses it.

With `--disaggregation-decode-allocation-policy prefill_complete` on both servers, a request goes to the
prefill server first; only once its prefill forward has run (the request is parked in the prefill
server's inflight queue, KV held, waiting for a decoder) is the same body posted to the decode server.
The decoder's greedy output must be token-identical to a plain (non-PD) server's. See docs/pd-on-cpu.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time

import pytest

from tests.pd.client import Background, generate_body, get_json, post, post_stream, prefill_load
from tests.pd.conftest import BOOTSTRAP_TIMEOUT_S, LOOPBACK_PRELOAD, MAX_NEW_TOKENS, PROMPTS

LOGPROB_TOL = 1e-3  # same kernels, same chunking, batch of one: observed bit-identical


def wait_parked(pair, pending: Background, timeout: float = 60.0) -> float:
    """Wait until the prefill server holds the request's KV for a decoder; return seconds since the POST."""
    deadline = time.monotonic() + timeout
    while True:
        load = prefill_load(pair.prefill.url)
        if load["prefill_inflight_queue_reqs"] >= 1:
            return pending.elapsed
        if pending.done():
            status, body = pending.result()
            raise AssertionError(f"prefill answered before any decoder came: {status} {body}")
        if time.monotonic() > deadline:
            raise AssertionError(f"prefill forward not done after {timeout}s: {load}")
        time.sleep(0.05)


def wait_prefill_idle(pair, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = prefill_load(pair.prefill.url)
        if load["prefill_inflight_queue_reqs"] == 0 and load["prefill_bootstrap_queue_reqs"] == 0:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"prefill server still holds requests: {load}")
        time.sleep(0.1)


def logprobs(body: dict) -> list[float]:
    return [x[0] for x in body["meta_info"]["output_token_logprobs"]]


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"{len(p)}chars")
def test_prefill_first_then_decode_matches_plain(pd_pair, prompt):
    ref = pd_pair.reference[prompt]
    body = generate_body(prompt, max_new_tokens=MAX_NEW_TOKENS, bootstrap_port=pd_pair.bootstrap_port)

    pre = Background(post, pd_pair.prefill.url, body)
    parked_s = wait_parked(pd_pair, pre)
    time.sleep(0.5)  # the decoder comes a little later, as the router's would
    assert not pre.done(), "the prefill server answered before a decoder took the KV"

    status, out = post(pd_pair.decode.url, body)
    assert status == 200, out
    assert out["output_ids"] == ref["output_ids"]
    assert len(out["output_ids"]) == MAX_NEW_TOKENS
    diff = max(abs(a - b) for a, b in zip(logprobs(out), logprobs(ref)))
    assert diff <= LOGPROB_TOL, (logprobs(out), logprobs(ref))

    # The prefill server's answer comes once the KV is transferred: the first token, nothing more.
    p_status, p_out = pre.result(timeout=60)
    assert p_status == 200, p_out
    assert p_out["output_ids"] == out["output_ids"][:1]
    assert p_out["meta_info"]["prompt_tokens"] == out["meta_info"]["prompt_tokens"]
    wait_prefill_idle(pd_pair)
    print(f"\n[pd] prompt_tokens={out['meta_info']['prompt_tokens']} prefill parked after {parked_s:.2f}s, "
          f"prefill HTTP answered after {pre.elapsed:.2f}s")


def test_streaming_from_decode(pd_pair):
    prompt = PROMPTS[1]
    ref = pd_pair.reference[prompt]
    body = generate_body(prompt, max_new_tokens=MAX_NEW_TOKENS, bootstrap_port=pd_pair.bootstrap_port,
                         stream=True)
    pre = Background(post_stream, pd_pair.prefill.url, body)
    wait_parked(pd_pair, pre)

    status, events = post_stream(pd_pair.decode.url, body)
    assert status == 200
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= MAX_NEW_TOKENS // 2, "expected the tokens to arrive in many events"
    final = chunks[-1]["output_ids"]
    assert final == ref["output_ids"]
    for c in chunks:  # cumulative ids: every event's ids are a prefix of the final ones
        assert final[: len(c["output_ids"])] == c["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"

    p_status, p_events = pre.result(timeout=60)
    assert p_status == 200 and p_events[-1] == "[DONE]"
    wait_prefill_idle(pd_pair)


def test_decoder_never_comes_prefill_frees_kv(pd_pair):
    """The KV a prefill server holds for a decoder is freed SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT seconds
    after its prefill ended; the prefill request then fails (500) and a late decoder gets an error at once."""
    baseline = wait_prefill_idle(pd_pair)["used_tokens"]
    body = generate_body(PROMPTS[0] + " (never decoded)", max_new_tokens=MAX_NEW_TOKENS,
                         bootstrap_port=pd_pair.bootstrap_port)
    pre = Background(post, pd_pair.prefill.url, body)
    parked_s = wait_parked(pd_pair, pre)
    assert prefill_load(pd_pair.prefill.url)["used_tokens"] > baseline

    status, out = pre.result(timeout=BOOTSTRAP_TIMEOUT_S + 60)
    held_s = pre.elapsed - parked_s
    assert status == 500, out
    assert "timed out" in json.dumps(out), out
    assert BOOTSTRAP_TIMEOUT_S - 1.5 <= held_s <= BOOTSTRAP_TIMEOUT_S + 15, held_s
    assert wait_prefill_idle(pd_pair)["used_tokens"] == baseline

    t0 = time.monotonic()
    late_status, late = post(pd_pair.decode.url, body, timeout=60)
    assert late_status != 200, late
    assert time.monotonic() - t0 < 30
    print(f"\n[pd] orphan: prefill parked after {parked_s:.2f}s, KV released and HTTP {status} after "
          f"{held_s:.1f}s more; late decoder got HTTP {late_status} in {time.monotonic() - t0:.2f}s")


def test_cpu_decode_retraction_backup_defaults_to_cpu_tensor(pd_pair):
    """sglang_eldr.engine.pd_cpu_guards: no HiCache host pool (sized from free RAM minus 10 GiB) on CPU."""
    info = get_json(pd_pair.decode.url, "/server_info")
    assert info["disaggregation_decode_retraction_backup"] == "cpu_tensor"
    log = pd_pair.decode.log_text()
    assert "HiCache auto-sizing" not in log and "hierarchical KV host pool" not in log


def _listen_addresses(pid: int) -> set[str]:
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    out = set()
    for p in procs:
        conns = p.net_connections(kind="inet") if hasattr(p, "net_connections") else p.connections(kind="inet")
        out |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.skipif(not LOOPBACK_PRELOAD.exists(), reason=f"{LOOPBACK_PRELOAD} not built "
                    "(scripts/install_pd_cpu.sh): Mooncake and torch listen on wildcard addresses without it")
def test_servers_listen_on_loopback_only(pd_pair):
    for s in (pd_pair.prefill, pd_pair.decode):
        addrs = _listen_addresses(s.proc.pid)
        assert addrs, f"no listening sockets found for {s.url}"
        assert all(_is_loopback(a) for a in addrs), f"{s.url} listens on {sorted(addrs)}"


def test_zz_servers_stop_and_leave_nothing(pd_pair):
    """Runs last in this module: stopping the pair ends every process of both servers and frees the ports."""
    pd_pair.stop()
    for s in pd_pair.all_servers():
        assert s.proc.returncode is not None
        deadline = time.monotonic() + 30
        while True:
            try:
                os.killpg(s.proc.pid, 0)  # the server's own process group (start_new_session)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"processes of {s.url} still running"
            time.sleep(0.2)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pd_pair.bootstrap_port), timeout=1).close()
