"""The early first token of a streaming OpenAI request: the prefill's chunks first, then the decoder's.

The router asks the prefill server to stream its first token at once (`wire.EARLY_FIELD`, see
`engine/early_token.py`): SGLang's own serving layer on the prefill then writes the role chunk and
the first token's chunk (detokenised, with logprobs and usage as asked) without waiting for the
handoff to the decoder. `EarlyStream` forwards those chunks to the client as
they arrive and notes what they carried; from the decoder's first line on, the decoder's stream is
forwarded instead, minus what the client already has (the role, the first token's text and its
logprob entries). Decoder and prefill run the same SGLang detokeniser from the same prompt tokens,
so the decoder's text starts with what the prefill sent; if it ever does not, the mismatch is
logged, counted (`eldr_first_token_total{source="mismatch"}`) and shown in the receipt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from typing import Any

import msgspec
from aiohttp import web

from sglang_eldr.wire import EARLY_FIELD

logger = logging.getLogger(__name__)

EARLY_PATHS = ("/v1/chat/completions", "/v1/completions")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def early_eligible(path: str, body: dict) -> bool:
    """A request whose first token the prefill can stream: streaming OpenAI text generation without
    tool-call parsing (its streamed form depends on later tokens) or an echoed prompt."""
    return (path in EARLY_PATHS and body.get("stream") is True and not body.get("tools")
            and not (path == "/v1/completions" and body.get("echo")))


def ask_early(pd_body: dict) -> None:
    """Marks the PD request body: the prefill streams the first token, and both servers use one
    request id, so the prefill's chunks and the decoder's carry the same `id`."""
    custom = pd_body.get("custom_params")
    pd_body["custom_params"] = {**(custom if isinstance(custom, dict) else {}), EARLY_FIELD: True}
    if pd_body.get("rid") is None:
        pd_body["rid"] = secrets.token_hex(16)


def parse_chunk(line: bytes) -> dict | None:
    data = line[5:].strip() if line.startswith(b"data:") else b""
    if not data or data == b"[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _choice(chunk: dict) -> dict | None:
    choices = chunk.get("choices")
    if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
        return choices[0]
    return None


def _lp_entries(choice: dict, chat: bool) -> int:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return 0
    entries = lp.get("content") if chat else lp.get("tokens")
    return len(entries) if isinstance(entries, list) else 0


def _drop_lp(choice: dict, chat: bool, n: int) -> int:
    """Removes up to `n` leading logprob entries; returns how many it removed."""
    lp = choice.get("logprobs")
    if n <= 0 or not isinstance(lp, dict):
        return 0
    keys = ("content",) if chat else ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    removed = 0
    for k in keys:
        v = lp.get(k)
        if isinstance(v, list):
            removed = max(removed, min(n, len(v)))
            lp[k] = v[n:]
    return removed


class EarlyStream:
    """One streaming request's client response, written first by the prefill's chunks and then by
    the decoder's. The lock makes the hand-over atomic: once `take_over` has run, nothing more from
    the prefill reaches the client."""

    def __init__(self, request: web.Request, chat: bool):
        self.request = request
        self.chat = chat
        self.out = web.StreamResponse(headers=SSE_HEADERS)
        self.lock = asyncio.Lock()
        self.open = True
        self.forwarded = 0  # prefill chunks the client got
        self.role = False  # ... among them the assistant role (chat)
        self.text = ""  # ... the text they carried, not yet seen again from the decoder
        self.reasoning = ""
        self.logprobs = 0  # ... their logprob entries, likewise
        self.mismatch = False
        self.client_gone = False

    @property
    def source(self) -> str:
        return "mismatch" if self.mismatch else ("prefill" if self.forwarded else "decoder")

    async def from_prefill(self, line: bytes) -> None:
        """One line of the prefill's SSE body: forwarded while the decoder has not taken over, if it
        is a chunk of unfinished generation (never the prefill's own finish, usage or errors)."""
        if not self.open:
            return
        chunk = parse_chunk(line)
        choice = _choice(chunk) if chunk is not None else None
        if choice is None or chunk is None or "error" in chunk or choice.get("finish_reason") is not None:
            return
        async with self.lock:
            if not self.open:
                return
            try:
                if not self.out.prepared:
                    await self.out.prepare(self.request)
                await self.out.write(b"data: " + line[5:].strip() + b"\n\n")
            except (ConnectionError, RuntimeError):
                self.open, self.client_gone = False, True
                return
            self.forwarded += 1
            if self.chat:
                delta = choice.get("delta")
                if not isinstance(delta, dict):
                    delta = {}
                self.role = self.role or bool(delta.get("role"))
                self.text += delta.get("content") or ""
                self.reasoning += delta.get("reasoning_content") or ""
            else:
                self.text += choice.get("text") or ""
            self.logprobs += _lp_entries(choice, self.chat)

    def take_over(self) -> None:
        """Called under `lock` by the decoder's stream before its first write."""
        self.open = False

    @property
    def pending(self) -> bool:
        return self.role or bool(self.text) or bool(self.reasoning) or self.logprobs > 0

    def _strip(self, have: str, field: str, room: int) -> tuple[str, str]:
        """(what of the decoder's `have` the client still needs, what remains expected)."""
        expected = getattr(self, field)
        if not expected or not have:
            return have, expected
        if have.startswith(expected):
            return have[len(expected):], ""
        if expected.startswith(have):
            return "", expected[len(have):]
        common = len(os.path.commonprefix([have, expected]))
        logger.error("room %d: the decoder's %s %r does not continue what the prefill streamed %r", room,
                     field, have[:80], expected[:80])
        self.mismatch = True
        return have[common:], ""

    def dedup(self, chunk: dict, room: int) -> bool:
        """Removes from one decoder chunk what the client already has; False when nothing is left to
        send (the decoder's role chunk, or a chunk with only the first token)."""
        choice = _choice(chunk)
        if choice is None:
            return True
        # Per-chunk usage (continuous_usage_stats) does not keep a repeat: the prefill's chunk had it.
        keep = choice.get("finish_reason") is not None
        if self.chat:
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if self.role and delta.get("role"):
                    del delta["role"]
                    self.role = False
                for key, field in (("content", "text"), ("reasoning_content", "reasoning")):
                    if isinstance(delta.get(key), str):
                        delta[key], rest = self._strip(delta[key], field, room)
                        setattr(self, field, rest)
                keep = keep or any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls"))
        elif isinstance(choice.get("text"), str):
            choice["text"], self.text = self._strip(choice["text"], "text", room)
            keep = keep or bool(choice["text"])
        self.logprobs -= _drop_lp(choice, self.chat, self.logprobs)
        return keep or _lp_entries(choice, self.chat) > 0


def encode_chunk(chunk: dict[str, Any]) -> bytes:
    """A modified chunk as SGLang writes its chunks: compact JSON, UTF-8 as is."""
    return b"data: " + msgspec.json.encode(chunk) + b"\n"
