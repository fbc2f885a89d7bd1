"""Request signatures: expert counts [L, E] -> IDF weights -> kept layers -> unit float32 [D].

The Rust router builds the same vector from raw counts; this module is the reference and the
tool for calibration. A zero signature (all kept counts zero) is returned as zeros: routers treat
it as "no locality signal" and fall back to least-loaded.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


def check_counts(counts: npt.ArrayLike, name: str = "counts") -> npt.NDArray[np.integer]:
    """Validates an integer, non-negative, 2-D counts array and returns it as an ndarray."""
    c = np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [layers, experts], got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {c.dtype}")
    if c.size and c.min() < 0:
        raise ValueError(f"{name}: contains negative values")
    return c


def weighted(
    counts: npt.ArrayLike,
    idf: npt.ArrayLike | None = None,
    layer_mask: npt.ArrayLike | None = None,
) -> FloatArray:
    """counts × idf restricted to kept layers, flattened, not yet normalised."""
    c = check_counts(counts)
    x = c.astype(np.float32)
    if idf is not None:
        w = np.asarray(idf, dtype=np.float32)
        if w.shape != c.shape:
            raise ValueError(f"idf: expected shape {c.shape}, got {w.shape}")
        x = x * w
    if layer_mask is not None:
        m = np.asarray(layer_mask, dtype=bool)
        if m.shape != (c.shape[0],):
            raise ValueError(f"layer_mask: expected shape ({c.shape[0]},), got {m.shape}")
        if not m.any():
            raise ValueError("layer_mask: keeps no layer")
        x = x[m]
    return np.ascontiguousarray(x.reshape(-1), dtype=np.float32)


def l2_normalise(x: npt.ArrayLike) -> FloatArray:
    """Unit-length float32 copy of `x`; zeros stay zeros."""
    v = np.asarray(x, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v.astype(np.float64)))
    if norm == 0.0:
        return np.zeros_like(v)
    return (v / np.float32(norm)).astype(np.float32)


def build_signature(
    counts: npt.ArrayLike,
    idf: npt.ArrayLike | None = None,
    layer_mask: npt.ArrayLike | None = None,
) -> FloatArray:
    """The ELDR signature of one request: unit float32 [kept_layers * experts] (or zeros)."""
    return l2_normalise(weighted(counts, idf, layer_mask))


def build_signatures(
    counts: npt.ArrayLike,
    idf: npt.ArrayLike | None = None,
    layer_mask: npt.ArrayLike | None = None,
) -> FloatArray:
    """Signatures of a batch of requests, counts [N, L, E] -> float32 [N, D]."""
    batch = np.asarray(counts)
    if batch.ndim != 3:
        raise ValueError(f"counts: expected [N, layers, experts], got shape {batch.shape}")
    if len(batch) == 0:
        raise ValueError("counts: empty batch")
    return np.stack([build_signature(c, idf, layer_mask) for c in batch])
