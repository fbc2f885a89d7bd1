"""Decode worker choice by policy name, one Rust-router decision per request, over a decoder
set that can change at runtime."""

from __future__ import annotations

import logging

import numpy as np

from sglang_eldr import calibrate
from sglang_eldr.centroids import CentroidSet
from sglang_eldr.refit import OnlineRefit
from sglang_eldr.router_rs import BASELINES, BaselineRouter, LocalityBandRouter

DECODE_POLICIES = ("eldr", "eldr-static", *BASELINES)

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
    ):
        if policy not in DECODE_POLICIES:
            raise ValueError(f"policy: unknown {policy!r} (expected one of {', '.join(DECODE_POLICIES)})")
        self.policy = policy
        self.tau = tau
        self.seed = seed
        self.max_imbalance = max_imbalance
        self.refit: OnlineRefit | None = None  # runs periodically (policy eldr)
        self._window: OnlineRefit | None = None  # recent counts, for refits on membership changes
        self._retired: dict[str, np.ndarray] = {}  # centroid rows of removed decoders, by key
        self.membership_refits = 0
        if self.locality:
            if centroid_set is None:
                raise ValueError(f"policy {policy}: needs a centroid file (--centroids), e.g. from sglang_eldr.calibrate")
            if centroid_set.num_workers != num_decoders:
                raise ValueError(
                    f"centroids: the file has {centroid_set.num_workers} centroids but {num_decoders} decoders are "
                    "configured; recalibrate with --decoders matching the cluster"
                )
            self.idf, self.layer_mask = centroid_set.idf, centroid_set.layer_mask
            self.router = self._build(num_decoders, centroid_set.centroids)
            self._window = OnlineRefit(
                self.router, self.idf, self.layer_mask, window_s=refit_window_s,
                interval_s=refit_interval_s, min_samples=refit_min_samples, seed=seed,
            )
            if policy == "eldr":
                self.refit = self._window
        else:
            self.router = self._build(num_decoders, None)

    def _build(self, workers: int, centroids: np.ndarray | None):
        if not self.locality:
            return BaselineRouter(self.policy, workers, seed=self.seed)
        return LocalityBandRouter(centroids, self.tau, idf=self.idf, layer_mask=self.layer_mask,
                                  max_imbalance=self.max_imbalance)

    @property
    def locality(self) -> bool:
        return self.policy.startswith("eldr")

    @property
    def num_decoders(self) -> int:
        return self.router.num_workers

    def choose(self, counts: np.ndarray | None) -> dict:
        """Acquires a decoder; returns the Rust receipt {worker, policy, scores, band, loads}."""
        receipt = self.router.acquire_with_receipt(counts if self.locality else None)
        if counts is not None and self._window is not None:
            self._window.observe(counts)
        return receipt

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
        if self.locality:
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
        if self.locality:
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
        return calibrate.align_centroids(rows, fitted)

    def _replace(self, rows: np.ndarray | None, loads: list[int], healthy: list[bool]) -> None:
        router = self._build(len(loads), rows)
        router.restore_state(np.asarray(loads, dtype=np.int64), healthy)
        self.router = router
        if self._window is not None:
            self._window.router = router
        logger.info("decoder set now %d (loads %s)", len(loads), loads)
