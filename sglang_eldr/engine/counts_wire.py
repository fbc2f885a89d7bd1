"""Wire format of a request's expert counts: base64 of little-endian int32, row-major ``[L, E]``.

``meta_info["eldr_counts"]`` holds the base64 text and ``meta_info["eldr_counts_shape"] = [L, E]``, where
L is the number of MoE layers (in layer order) and E the number of routed experts.
"""

from __future__ import annotations

import base64

import numpy as np

META_KEY = "eldr_counts"
META_SHAPE_KEY = "eldr_counts_shape"
REQUEST_FIELD = "return_eldr_counts"


def encode_counts(counts) -> tuple[str, list[int]]:
    """int array [L, E] -> (base64 text, [L, E])."""
    a = np.ascontiguousarray(np.asarray(counts), dtype="<i4")
    if a.ndim != 2:
        raise ValueError(f"counts must be 2-D [L, E], got shape {a.shape}")
    return base64.b64encode(a.tobytes()).decode("ascii"), [int(a.shape[0]), int(a.shape[1])]


def decode_counts(text: str, shape) -> np.ndarray:
    """(base64 text, [L, E]) -> int32 array [L, E]."""
    raw = base64.b64decode(text)
    l, e = (int(x) for x in shape)
    if len(raw) != 4 * l * e:
        raise ValueError(f"eldr_counts holds {len(raw)} bytes, expected 4*{l}*{e}")
    return np.frombuffer(raw, dtype="<i4").reshape(l, e).astype(np.int32)
