"""Decode worker choice by policy name, one Rust-router decision per request, over a decoder
set that can change at runtime."""

from __future__ import annotations

import logging

import numpy as np

from sglang_eldr import fitting
from sglang_eldr.centroids import CentroidFileError, CentroidSet
from sglang_eldr.refit import OnlineRefit
from sglang_eldr.router_rs import BASELINES, BaselineRouter, LocalityBandRouter

# `eldr-static` is `eldr` with the online refit off (`--refit off`), kept as an accepted name.
DECODE_POLICIES = ("eldr", "eldr-static", *BASELINES)
NO_CENTROIDS_ROUTING = "least-loaded (no centroids)"

logger = logging.getLogger(__name__)


class DecodeChooser:
    def __init__(
        self,
        policy: str,
        num_decoders: int,
        centroid_set: CentroidSet | None = None,
        tau: float = 0.1,
        seed: int = 0,
        refit_window_s: float = 5.0,
        refit_interval_s: float = 2.5,
        refit_min_samples: int | None = None,
        max_imbalance: int | None = 2,
        online_refit: bool | None = None,
    ):
        if policy not in DECODE_POLICIES:
            raise ValueError(f"policy: unknown {policy!r} (expected one of {', '.join(DECODE_POLICIES)})")
        if policy == "eldr-static" and online_refit:
            raise ValueError("policy eldr-static is eldr with the online refit off; use --policy eldr --refit online")
        self.policy = policy
        # The periodic refit: on for eldr unless turned off, never for eldr-static or the baselines.
        self.online_refit = policy == "eldr" and online_refit is not False
        self.tau = tau
        self.seed = seed
        self.max_imbalance = max_imbalance
        self.refit: OnlineRefit | None = None  # runs periodically (policy eldr)
        self._window: OnlineRefit | None = None  # recent counts, for refits on membership changes
        self._retired: dict[str, np.ndarray] = {}  # centroid rows of removed decoders, by key
        self.membership_refits = 0
        self._refit_window_s, self._refit_interval_s = refit_window_s, refit_interval_s
        self._refit_min_samples = refit_min_samples
        # The last centroid file loaded (IDF, layer mask, geometry; the router holds the centroids as
        # refits move them). An eldr policy without one routes least-loaded.
        self.centroid_set: CentroidSet | None = None
        self._counts_shape: tuple[int, int] | None = None  # of the counts seen before centroids arrived
        self.router = self._build(num_decoders, None)
        if self.locality and centroid_set is not None:
            self.load_centroids(centroid_set)

    def _build(self, workers: int, centroids: np.ndarray | None):
        cs = self.centroid_set
        if cs is None:
            return BaselineRouter(self.policy if not self.locality else "jsq", workers, seed=self.seed)
        return LocalityBandRouter(centroids, self.tau, idf=cs.idf, layer_mask=cs.layer_mask,
                                  max_imbalance=self.max_imbalance)

    @property
    def locality(self) -> bool:
        """The policy routes by locality (once it has centroids)."""
        return self.policy.startswith("eldr")

    @property
    def has_centroids(self) -> bool:
        return self.centroid_set is not None

    @property
    def routing(self) -> str:
        """What decisions are based on now: "locality", "least-loaded (no centroids)" or "load-only"."""
        if not self.locality:
            return "load-only"
        return "locality" if self.has_centroids else NO_CENTROIDS_ROUTING

    @property
    def num_decoders(self) -> int:
        return self.router.num_workers

    def choose(self, counts: np.ndarray | None) -> dict:
        """Acquires a decoder; returns the Rust receipt {worker, policy, scores, band, loads}."""
        if not self.has_centroids:
            if counts is not None:
                self._counts_shape = (int(counts.shape[0]), int(counts.shape[1]))
            return self.router.acquire_with_receipt(None)
        receipt = self.router.acquire_with_receipt(counts)
        if counts is not None and self._window is not None:
            self._window.observe(counts)
        return receipt

    # ------------------------------------------------------------------ centroids
    def check_centroids(self, cs: CentroidSet) -> None:
        """CentroidFileError when `cs` cannot route this decoder set: a baseline policy, another
        number of centroids than decoders, or another model geometry than the current centroids'
        (or, before any, than the counts the prefills reported)."""
        if not self.locality:
            raise CentroidFileError(f"policy {self.policy} routes by load only and takes no centroids; "
                                    "start the router with --policy eldr or eldr-static")
        n = self.num_decoders
        if cs.num_workers != n:
            raise CentroidFileError(f"centroids: the file has {cs.num_workers} centroids but {n} decoders are "
                                    "configured; recalibrate with --decoders matching the cluster")
        g = cs.geometry
        if self.centroid_set is not None:
            old = self.centroid_set.geometry
            if (g.layers, g.experts, g.top_k) != (old.layers, old.experts, old.top_k):
                raise CentroidFileError(
                    f"centroids: fitted for layers={g.layers} experts={g.experts} top_k={g.top_k}, but the "
                    f"centroids in use are for layers={old.layers} experts={old.experts} top_k={old.top_k}")
        elif self._counts_shape is not None and (g.layers, g.experts) != self._counts_shape:
            raise CentroidFileError(
                f"centroids: fitted for layers={g.layers} experts={g.experts}, but the prefill servers report "
                f"counts of shape {list(self._counts_shape)}")

    def load_centroids(self, cs: CentroidSet) -> None:
        """Routes by `cs` from now on (row k is decoder k), keeping loads and health; the old
        state stays when it does not fit (CentroidFileError, or ValueError from the Rust router)."""
        self.check_centroids(cs)
        router = LocalityBandRouter(cs.centroids, self.tau, idf=cs.idf, layer_mask=cs.layer_mask,
                                    max_imbalance=self.max_imbalance)
        router.restore_state(np.asarray(self.loads(), dtype=np.int64), self.healthy())
        self.centroid_set = cs
        self._retired.clear()  # rows of removed decoders belong to the old fit's space
        self.router = router
        if self._window is None:
            self._window = OnlineRefit(router, cs.idf, cs.layer_mask, window_s=self._refit_window_s,
                                       interval_s=self._refit_interval_s, min_samples=self._refit_min_samples,
                                       seed=self.seed)
        else:
            self._window.retarget(router, cs.idf, cs.layer_mask)
        if self.online_refit:
            self.refit = self._window
        logger.info("centroids loaded: %d decoders, %d of %d layers kept", cs.num_workers,
                    int(cs.layer_mask.sum()), len(cs.layer_mask))

    def release(self, worker: int) -> None:
        self.router.release(worker)

    def loads(self) -> list[int]:
        return self.router.loads().tolist()

    def set_healthy(self, worker: int, healthy: bool) -> None:
        self.router.set_healthy(worker, healthy)

    def healthy(self) -> list[bool]:
        return self.router.healthy()

    # ------------------------------------------------------------------ membership
    def add(self, key: str, healthy: bool = True) -> int:
        """Appends a decoder (index = the old count) and gives it a centroid: its own row if `key`
        was removed before, else a refit on the recent window when it holds enough requests,
        else the mean direction of the others (the next online refit then places it)."""
        loads, flags = self.loads() + [0], self.healthy() + [healthy]
        rows = None
        if self.has_centroids:
            current = self.router.centroids()
            row = self._retired.pop(key, None)
            if row is None:
                mean = current.mean(axis=0)
                row = mean / max(float(np.linalg.norm(mean)), 1e-12)
            rows = np.vstack([current, row[None, :]]).astype(np.float32)
            rows = self._refit_for(rows)
        self._replace(rows, loads, flags)
        return len(loads) - 1

    def remove(self, index: int, key: str) -> None:
        """Drops decoder `index`; later indices shift down by one. Its centroid is kept under `key`
        in case it comes back; the others keep theirs (or get a refit on the recent window)."""
        n = self.num_decoders
        if not 0 <= index < n:
            raise IndexError(f"decoder index {index} out of range for {n} decoders")
        if n == 1:
            raise ValueError("cannot remove the last decoder")
        loads, flags = self.loads(), self.healthy()
        del loads[index], flags[index]
        rows = None
        if self.has_centroids:
            current = self.router.centroids()
            self._retired[key] = current[index].copy()
            rows = self._refit_for(np.delete(current, index, axis=0))
        self._replace(rows, loads, flags)

    def _refit_for(self, rows: np.ndarray) -> np.ndarray:
        """`rows` refit on the recent window (aligned to `rows`' identities), or as given when the
        window is too small."""
        assert self._window is not None
        fitted = self._window.fit(len(rows))
        if fitted is None:
            return rows
        self.membership_refits += 1
        return fitting.align_centroids(rows, fitted)

    def _replace(self, rows: np.ndarray | None, loads: list[int], healthy: list[bool]) -> None:
        router = self._build(len(loads), rows)
        router.restore_state(np.asarray(loads, dtype=np.int64), healthy)
        self.router = router
        if self._window is not None:
            self._window.router = router
        logger.info("decoder set now %d (loads %s)", len(loads), loads)
