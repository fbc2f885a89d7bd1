"""Messages that cross process boundaries (msgspec structs).

`CountsReport` goes from a prefill server's scheduler to the load balancer over ZMQ (PUB/SUB,
topic = b"eldr-counts") as soon as the prefill forward of a PD request ends: the expert
counts of its whole prompt, keyed by bootstrap room.
"""

from __future__ import annotations

import msgspec
import numpy as np

COUNTS_TOPIC = b"eldr-counts"


class CountsReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    room: int
    rid: str
    layers: int
    experts: int
    counts: bytes  # little-endian int32, row-major [layers, experts]
    prompt_tokens: int

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


def encode_report(room: int, rid: str, counts: np.ndarray, prompt_tokens: int) -> bytes:
    a = np.ascontiguousarray(counts, dtype="<i4")
    return _ENCODER.encode(
        CountsReport(room=int(room), rid=str(rid), layers=int(a.shape[0]), experts=int(a.shape[1]),
                     counts=a.tobytes(), prompt_tokens=int(prompt_tokens))
    )


def decode_report(data: bytes) -> CountsReport:
    """Raises msgspec.DecodeError / ValidationError on malformed input."""
    return _DECODER.decode(data)


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
