"""The early first token on the real cluster: a streaming OpenAI request's first chunks come from the
prefill's own stream, and what the client reads is what stock SGLang PD streams
(the same router with --no-early-first-token passes the decoder's own stream through) and what a
plain SGLang server streams: text byte for byte, multi-byte characters split across tokens
included, logprobs, finish reason and usage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import requests
from transformers import AutoTokenizer

from .conftest import MODEL
from .helpers import all_idle, wait_for

# Prompts whose first greedy tokens are parts of one UTF-8 character ("Größe " starts with the two
# byte tokens of "ä"; "é" with a lone byte that never completes), and plain ASCII ones.
COMPLETION_PROMPTS = ["Größe ", "é", "┌──", "Straße ", "def add(a, b):", "The π ≈ 3.14159 and ∑ "]
CHAT_PROMPTS = ["Größe und Maß: ", "café\n- ", "Write a C function that adds two ints.", "Ωmega "]


@dataclass
class Stream:
    chunks: list[dict]
    route: dict | None  # the receipt, from the X-ELDR-Route header or the chunk that carries it
    done: bool
    carriers: int = 0  # chunks that carry the receipt
    text: str = ""
    role: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish: list = field(default_factory=list)
    usage: list = field(default_factory=list)


def read(url: str, path: str, body: dict) -> Stream:
    with requests.post(url + path, json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        header = r.headers.get("X-ELDR-Route")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith(b"data: ") for l in lines), lines
    done = lines[-1] == b"data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines if l != b"data: [DONE]"]
    s = Stream(chunks=chunks, route=json.loads(header) if header else None, done=done)
    chat = path == "/v1/chat/completions"
    for c in chunks:
        if "eldr_route" in c:
            s.carriers += 1
            s.route = c.pop("eldr_route")
        if c.get("usage"):
            s.usage.append({k: c["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")})
        for ch in c["choices"]:
            if chat:
                s.text += ch["delta"].get("content") or ""
                if ch["delta"].get("role"):
                    s.role.append(ch["delta"]["role"])
                lp = (ch.get("logprobs") or {}).get("content") or []
            else:
                s.text += ch.get("text") or ""
                lp_d = ch.get("logprobs") or {}
                lp = list(zip(*(lp_d.get(k) or [] for k in ("tokens", "token_logprobs", "top_logprobs"))))
            s.logprobs += [json.dumps(e, sort_keys=True) for e in lp]
            if ch.get("finish_reason") is not None:
                s.finish.append(ch["finish_reason"])
    return s


def cases() -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    opts = {"stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
    for p in COMPLETION_PROMPTS:
        out.append(("/v1/completions", {"model": "m", "prompt": p, "max_tokens": 10, "logprobs": 2, **opts}))
    for p in CHAT_PROMPTS:
        out.append(("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": p}],
                                             "max_tokens": 10, "logprobs": True, "top_logprobs": 2, **opts}))
    # One token in all (the prefill's is the whole answer), and a first token left to the decoder
    # because stop strings could end the request on it.
    out.append(("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 1, **opts}))
    out.append(("/v1/completions", {"model": "m", "prompt": "def add(a, b):", "max_tokens": 10, "stop": ["\n\n"],
                                    **opts}))
    return out


def test_first_token_partial_utf8_in_prompts(reference_server):
    """The multi-byte prompts really start with a token that is not a whole character."""
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    partial = []
    for p in COMPLETION_PROMPTS[:2]:
        r = requests.post(reference_server.url + "/generate",
                          json={"text": p, "sampling_params": {"max_new_tokens": 2, "temperature": 0}}, timeout=120)
        assert r.status_code == 200, r.text
        partial.append("\ufffd" in tok.decode(r.json()["output_ids"][:1]))
    assert all(partial), partial


def test_early_first_token_streams_what_stock_streams(cluster, centroids, reference_server):
    early_router = cluster.start_router(policy="eldr", centroids=centroids)
    early = [read(early_router.url, path, body) for path, body in cases()]
    wait_for(lambda: all_idle(early_router.url), 10, "in-flight counts back to zero")
    metrics = requests.get(early_router.url + "/metrics", timeout=5).text
    stock_router = cluster.start_router(policy="eldr", centroids=centroids, extra=["--no-early-first-token"])
    stock = [read(stock_router.url, path, body) for path, body in cases()]
    plain = [read(reference_server.url, path, body) for path, body in cases()]

    sources = []
    for (path, body), e, s, p in zip(cases(), early, stock, plain):
        what = f"{path} {body.get('prompt') or body['messages'][0]['content']!r}"
        assert e.text == s.text == p.text, what
        assert e.text.encode() == p.text.encode(), what
        assert e.logprobs == s.logprobs, what
        assert len(e.logprobs) == len(p.logprobs), what
        assert e.finish == s.finish == p.finish and len(e.finish) == 1, what
        assert e.usage == s.usage == p.usage and len(e.usage) == 1, what
        assert e.role == s.role == p.role, what
        assert e.done and s.done, what
        # One stream, one id (both servers ran the request under the id the router gave it).
        assert len({c["id"] for c in e.chunks}) == 1, what
        assert e.carriers == 1 and e.route is not None and e.route["room"] > 0, what
        assert s.route is not None and s.route["first_token"] == "off" and s.carriers == 0, what
        sources.append(e.route["first_token"])
        if body.get("stop"):
            assert e.route["first_token"] == "decoder", what
    assert "mismatch" not in sources, sources
    early_ones = [src for (path, body), src in zip(cases(), sources) if not body.get("stop")]
    assert early_ones.count("prefill") >= len(early_ones) // 2 + 1, sources
    assert 'eldr_first_token_total{source="mismatch"}' not in metrics
    assert f'eldr_first_token_total{{source="prefill"}} {float(sources.count("prefill"))}' in metrics
    wait_for(lambda: all_idle(stock_router.url), 10, "in-flight counts back to zero")


def test_the_response_starts_with_the_prefills_chunk(cluster, centroids):
    """The response starts with the prefill's chunk: its headers went out before the decoder's stream
    (no receipt header), the first chunk has no receipt, and the receipt says the prefill's came first."""
    router = cluster.start_router(policy="eldr", centroids=centroids)
    body = {"model": "m", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0, "stream": True}
    with requests.post(router.url + "/v1/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200
        assert "X-ELDR-Route" not in r.headers  # sent before the decoder's stream began
        lines = r.iter_lines()
        first = next(l for l in lines if l)
        rest = [l for l in lines if l]
    assert "eldr_route" not in json.loads(first[6:])
    route = next(json.loads(l[6:])["eldr_route"] for l in rest if b"eldr_route" in l)
    assert route["first_token"] == "prefill"
