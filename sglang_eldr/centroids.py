"""The versioned centroid file: model geometry, IDF, layer mask, centroids and fit metadata.

Stored as msgpack (msgspec) with arrays as little-endian bytes plus a SHA-256 over the whole
payload, so a truncated or garbled file is refused with a clear message instead of routing on
garbage, and a file fitted for another model is refused by geometry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

FORMAT = "sglang-eldr/centroids"
VERSION = 1


class CentroidFileError(ValueError):
    """A centroid file that cannot be used: unreadable, corrupt, wrong version or geometry."""


class Geometry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    layers: int
    experts: int
    top_k: int
    model: str = ""


class FitInfo(msgspec.Struct, frozen=True):
    num_requests: int
    seed: int
    iterations: int
    cluster_sizes: list[int]
    spearman_rho: float | None = None
    spearman_rho_all_layers: float | None = None
    created_unix: float = 0.0
    source: str = ""


class Array(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, a: npt.ArrayLike, dtype: str) -> "Array":
        arr = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
        return cls(dtype=dtype, shape=list(arr.shape), data=arr.tobytes())

    def array(self, name: str) -> np.ndarray:
        dt = np.dtype(self.dtype).newbyteorder("<")
        expected = int(np.prod(self.shape)) * dt.itemsize
        if len(self.data) != expected:
            raise CentroidFileError(f"{name}: {len(self.data)} bytes for shape {self.shape} of {self.dtype}")
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape).astype(np.dtype(self.dtype))


class Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    geometry: Geometry
    idf: Array
    layer_mask: Array
    centroids: Array
    fit: FitInfo


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    version: int
    sha256: str
    body: bytes


class CentroidSet(msgspec.Struct, frozen=True):
    """Decoded, validated content of a centroid file."""

    geometry: Geometry
    idf: np.ndarray  # float32 [L, E]
    layer_mask: np.ndarray  # bool [L]
    centroids: np.ndarray  # float32 [W, kept_layers * E]
    fit: FitInfo

    @property
    def num_workers(self) -> int:
        return int(self.centroids.shape[0])


def validate(cs: CentroidSet) -> CentroidSet:
    g = cs.geometry
    if g.layers <= 0 or g.experts <= 0 or not 0 < g.top_k <= g.experts:
        raise CentroidFileError(f"geometry: invalid {g}")
    if cs.idf.shape != (g.layers, g.experts):
        raise CentroidFileError(f"idf: shape {cs.idf.shape} does not match geometry [{g.layers}, {g.experts}]")
    if cs.layer_mask.shape != (g.layers,) or not cs.layer_mask.any():
        raise CentroidFileError(f"layer_mask: expected a non-empty bool[{g.layers}], got shape {cs.layer_mask.shape}")
    dim = int(cs.layer_mask.sum()) * g.experts
    if cs.centroids.ndim != 2 or cs.centroids.shape[1] != dim or cs.centroids.shape[0] == 0:
        raise CentroidFileError(f"centroids: expected [W, {dim}], got {cs.centroids.shape}")
    for name, a in (("idf", cs.idf), ("centroids", cs.centroids)):
        if not np.isfinite(a).all():
            raise CentroidFileError(f"{name}: contains NaN or inf")
    if (cs.idf < 0).any():
        raise CentroidFileError("idf: contains negative weights")
    if (np.linalg.norm(cs.centroids, axis=1) == 0).any():
        raise CentroidFileError("centroids: a row is all zeros")
    return cs


def dumps(cs: CentroidSet) -> bytes:
    validate(cs)
    body = msgspec.msgpack.encode(
        Body(
            geometry=cs.geometry,
            idf=Array.of(cs.idf, "float32"),
            layer_mask=Array.of(cs.layer_mask, "bool"),
            centroids=Array.of(cs.centroids, "float32"),
            fit=cs.fit,
        )
    )
    env = Envelope(format=FORMAT, version=VERSION, sha256=hashlib.sha256(body).hexdigest(), body=body)
    return msgspec.msgpack.encode(env)


def loads(data: bytes, expect: Geometry | None = None, source: str = "centroid file") -> CentroidSet:
    try:
        env = msgspec.msgpack.decode(data, type=Envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CentroidFileError(f"{source}: not a readable centroid file ({e})") from None
    if env.format != FORMAT:
        raise CentroidFileError(f"{source}: format {env.format!r} is not {FORMAT!r}")
    if env.version != VERSION:
        raise CentroidFileError(f"{source}: version {env.version} is not supported (this build reads {VERSION})")
    if hashlib.sha256(env.body).hexdigest() != env.sha256:
        raise CentroidFileError(f"{source}: checksum mismatch, the file is corrupt")
    try:
        body = msgspec.msgpack.decode(env.body, type=Body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CentroidFileError(f"{source}: corrupt body ({e})") from None
    cs = validate(
        CentroidSet(
            geometry=body.geometry,
            idf=body.idf.array("idf"),
            layer_mask=body.layer_mask.array("layer_mask").astype(bool),
            centroids=body.centroids.array("centroids"),
            fit=body.fit,
        )
    )
    if expect is not None:
        g = cs.geometry
        if (g.layers, g.experts, g.top_k) != (expect.layers, expect.experts, expect.top_k):
            raise CentroidFileError(
                f"{source}: fitted for layers={g.layers} experts={g.experts} top_k={g.top_k}"
                f"{' (' + g.model + ')' if g.model else ''}, but the model has layers={expect.layers}"
                f" experts={expect.experts} top_k={expect.top_k}"
            )
    return cs


def save(cs: CentroidSet, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(dumps(cs))
    tmp.replace(path)


def load(path: str | Path, expect: Geometry | None = None) -> CentroidSet:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CentroidFileError(f"{path}: cannot read ({e.strerror})") from None
    return loads(data, expect=expect, source=str(path))
