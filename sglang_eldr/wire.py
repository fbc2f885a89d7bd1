"""Every wire format of the expert counts, and the router's other messages (msgspec structs).

* `CountsReport` goes from a prefill server's scheduler to the load balancer over ZMQ (PUB/SUB,
  topic = b"eldr-counts") as soon as the prefill forward of a PD request ends: the expert counts of
  its whole prompt, keyed by bootstrap room.
* In HTTP responses (`return_eldr_counts`), `meta_info["eldr_counts"]` holds base64 of
  little-endian int32, row-major `[L, E]`, and `meta_info["eldr_counts_shape"] = [L, E]`, where L
  is the number of MoE layers (in layer order) and E the number of routed experts.
"""

from __future__ import annotations

import base64
from typing import Literal
from urllib.parse import urlparse

import msgspec
import numpy as np

COUNTS_TOPIC = b"eldr-counts"
META_KEY = "eldr_counts"
META_SHAPE_KEY = "eldr_counts_shape"
REQUEST_FIELD = "return_eldr_counts"


def encode_counts(counts: np.ndarray) -> tuple[str, list[int]]:
    """int array [L, E] -> (base64 text, [L, E])."""
    a = np.ascontiguousarray(np.asarray(counts), dtype="<i4")
    if a.ndim != 2:
        raise ValueError(f"counts must be 2-D [L, E], got shape {a.shape}")
    return base64.b64encode(a.tobytes()).decode("ascii"), [int(a.shape[0]), int(a.shape[1])]


def decode_counts(text: str, shape: list[int]) -> np.ndarray:
    """(base64 text, [L, E]) -> int32 array [L, E]; ValueError when they do not match."""
    raw = base64.b64decode(text)
    l, e = (int(x) for x in shape)
    if len(raw) != 4 * l * e:
        raise ValueError(f"eldr_counts holds {len(raw)} bytes, expected 4*{l}*{e}")
    return np.frombuffer(raw, dtype="<i4").reshape(l, e).astype(np.int32)


def counts_meta(counts: np.ndarray) -> dict:
    """The counts as the `meta_info` entries of an HTTP response."""
    text, shape = encode_counts(counts)
    return {META_KEY: text, META_SHAPE_KEY: shape}


def counts_from_meta(meta: dict) -> np.ndarray:
    """The counts in a response's `meta_info`; KeyError when it has none."""
    return decode_counts(meta[META_KEY], meta[META_SHAPE_KEY])


class CountsReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    room: int
    rid: str
    layers: int
    experts: int
    counts: bytes  # little-endian int32, row-major [layers, experts]
    prompt_tokens: int
    # Why the prefill has no trustworthy counts for this request (then layers = experts = 0 and
    # counts is empty); the router routes it least-loaded at once instead of waiting.
    unavailable: str | None = None

    def array(self) -> np.ndarray:
        """The counts as int32 [layers, experts]; ValueError when the message is inconsistent."""
        if self.layers <= 0 or self.experts <= 0:
            raise ValueError(f"counts report: bad shape [{self.layers}, {self.experts}]")
        if len(self.counts) != 4 * self.layers * self.experts:
            raise ValueError(
                f"counts report: {len(self.counts)} bytes for shape [{self.layers}, {self.experts}]"
            )
        return np.frombuffer(self.counts, dtype="<i4").reshape(self.layers, self.experts)


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CountsReport)


def encode_report(room: int, rid: str, counts: np.ndarray | None, prompt_tokens: int,
                  unavailable: str | None = None) -> bytes:
    """A report with the counts, or (counts None) one that says why there are none."""
    if counts is None:
        return _ENCODER.encode(CountsReport(room=int(room), rid=str(rid), layers=0, experts=0, counts=b"",
                                            prompt_tokens=int(prompt_tokens),
                                            unavailable=unavailable or "no counts"))
    a = np.ascontiguousarray(counts, dtype="<i4")
    return _ENCODER.encode(
        CountsReport(room=int(room), rid=str(rid), layers=int(a.shape[0]), experts=int(a.shape[1]),
                     counts=a.tobytes(), prompt_tokens=int(prompt_tokens))
    )


def decode_report(data: bytes) -> CountsReport:
    """Raises msgspec.DecodeError / ValidationError on malformed input."""
    try:
        return _DECODER.decode(data)
    except UnicodeDecodeError as e:  # msgspec lets this through for invalid UTF-8 in map keys
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {e}") from None


class RouteReceipt(msgspec.Struct):
    """Why a request went where it went; returned in meta_info["eldr_route"]. Every key is always
    present; scores and band are null for the load-only policies and for fallbacks."""

    policy: str
    prefill: str
    decoder: str
    loads: list[int]
    fallback: str | None = None
    scores: list[float] | None = None
    band: list[int] | None = None


class WorkerSpec(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /workers`. A prefill's counts endpoint, when not given, is asked from the
    prefill itself (GET /eldr/info), which advertises where its publisher listens."""

    url: str
    role: Literal["prefill", "decode"]
    bootstrap_port: int | None = None
    counts_port: int | None = None
    counts_host: str | None = None

    def checked(self) -> "WorkerSpec":
        """The spec normalised (URL without a trailing slash); ValueError naming the field when it
        is unusable."""
        url = self.url.rstrip("/")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
            raise ValueError(f"url: {self.url!r} is not http(s)://HOST:PORT")
        if self.role == "decode":
            if self.bootstrap_port is not None or self.counts_port is not None or self.counts_host is not None:
                raise ValueError("bootstrap_port/counts_port/counts_host: only for prefill workers")
            return WorkerSpec(url=url, role="decode")
        if self.bootstrap_port is None:
            raise ValueError("bootstrap_port: required for a prefill worker")
        for name, port in (("bootstrap_port", self.bootstrap_port), ("counts_port", self.counts_port)):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{name}: {port} is not a TCP port")
        if self.counts_host is not None and self.counts_port is None:
            raise ValueError("counts_host: give counts_port with it")
        return WorkerSpec(url=url, role="prefill", bootstrap_port=self.bootstrap_port,
                          counts_port=self.counts_port, counts_host=self.counts_host or None)
