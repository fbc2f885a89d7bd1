"""Every wire format of the expert counts, and the router's other messages (msgspec structs).

* A prefill server's publisher sends the load balancer three kinds of message over ZMQ (PUB/SUB),
  each as the frames `[b"eldr-counts", Header, body]`: a `CountsReport` as soon as the prefill
  forward of a PD request ends (the expert counts of its whole prompt, keyed by bootstrap room), a
  `Started` when its scheduler puts PD requests in a prefill batch, and (every 50 ms and after
  each burst it forwards) a `Heartbeat` naming the rooms reported and started in the last second. The header's sequence number is
  per sender, so a gap shows a lost message; the heartbeat says which rooms were in it.
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
# Set by the router in a streaming request's `custom_params`: the prefill streams its first token at once.
EARLY_FIELD = "eldr_early_first_token"


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


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """First frame after the topic. `sender` is drawn at random when a publisher starts (a restart
    is a new sender); `seq` counts that sender's messages from 1, heartbeats included."""

    sender: int
    seq: int
    kind: Literal["counts", "started", "heartbeat"]


class Started(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Rooms in the prefill batch the scheduler has just formed: they left its queues, and a chunked
    prompt is named again with each batch that runs one of its chunks."""

    rooms: list[int]


class Heartbeat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the sender published in the last `window_s` seconds: rooms it sent a counts report
    for, and rooms it reported started. A waiting room listed under `reported` whose report never
    arrived was lost."""

    window_s: float
    reported: list[int]
    started: list[int]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CountsReport)
_HEADER = msgspec.msgpack.Decoder(Header)
_STARTED = msgspec.msgpack.Decoder(Started)
_HEARTBEAT = msgspec.msgpack.Decoder(Heartbeat)


def encode_header(sender: int, seq: int, kind: Literal["counts", "started", "heartbeat"]) -> bytes:
    return _ENCODER.encode(Header(sender=sender, seq=seq, kind=kind))


def encode_started(rooms: list[int]) -> bytes:
    return _ENCODER.encode(Started(rooms=[int(r) for r in rooms]))


def encode_heartbeat(window_s: float, reported: list[int], started: list[int]) -> bytes:
    return _ENCODER.encode(Heartbeat(window_s=float(window_s), reported=reported, started=started))


def publisher_frames(sender: int, seq: int, kind: Literal["counts", "started", "heartbeat"],
                     body: bytes) -> list[bytes]:
    """The frames of one published message."""
    return [COUNTS_TOPIC, encode_header(sender, seq, kind), body]


def decode_message(frames: list[bytes]) -> tuple[Header, CountsReport | Started | Heartbeat]:
    """A published message's header and body; msgspec.DecodeError / ValidationError (ValueError
    for a wrong frame count or topic) when it is malformed. The header is decoded first, so a
    message with a good header and a bad body raises `BodyError` carrying the header."""
    if len(frames) != 3 or frames[0] != COUNTS_TOPIC:
        raise ValueError(f"{len(frames)} frame(s), expected [topic, header, body]")
    header = _decode(_HEADER, frames[1])
    try:
        if header.kind == "counts":
            body: CountsReport | Started | Heartbeat = _decode(_DECODER, frames[2])
        elif header.kind == "started":
            body = _decode(_STARTED, frames[2])
        else:
            body = _decode(_HEARTBEAT, frames[2])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BodyError(header, str(e)) from None
    return header, body


class BodyError(ValueError):
    """A message whose header was readable and whose body was not."""

    def __init__(self, header: Header, message: str):
        super().__init__(message)
        self.header = header


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes):
    try:
        return decoder.decode(data)
    except UnicodeDecodeError as e:  # msgspec lets this through for invalid UTF-8 in map keys
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {e}") from None


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
    return _decode(_DECODER, data)


class RouteReceipt(msgspec.Struct):
    """Why a request went where it went; returned in meta_info["eldr_route"]. Every key is always
    present; scores and band are null for the load-only policies and for fallbacks. `room` is the
    bootstrap room (as in the servers' logs); `counts_wait_ms` the time from sending the request to
    the prefill until its counts (or the reason to go without) were known. `first_token` (streams):
    "prefill" when the client's first chunks came from the prefill's own stream, "decoder" when they
    did not, "mismatch" when the decoder's text did not continue the prefill's (logged), "off" when
    the router does not stream early. `costs` (marginal policy): the predicted step-time increase,
    in seconds, of placing the request on each decoder (member order, as `loads`). `scores`: the
    cosine to each decoder's centroid, exact where the decision needed it and otherwise the
    router's certified estimate, each within `score_error` of the exact value (0 when all are
    exact); the decision itself is always the exact rule's."""

    policy: str
    prefill: str
    decoder: str
    loads: list[int]
    room: int
    counts_wait_ms: float
    fallback: str | None = None
    scores: list[float] | None = None
    score_error: float | None = None
    band: list[int] | None = None
    first_token: str | None = None
    costs: list[float] | None = None


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
