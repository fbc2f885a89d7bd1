"""Refits of the ELDR centroids: balanced spherical K-means on a window of recent requests' counts,
aligned to decoder identities (Hungarian) and swapped into the Rust router in one step. Fits run
in a worker thread, never on the event loop: periodically (the online refit) and as soon as
possible after a membership change. A fit computed while the members or the centroid file
changed is dropped, not applied to the wrong rows."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import numpy as np

from sglang_eldr import fitting
from sglang_eldr.router_rs import Router
from sglang_eldr.signature import build_signatures

logger = logging.getLogger(__name__)


class Refitter:
    def __init__(
        self,
        router: Router,
        idf: np.ndarray,
        layer_mask: np.ndarray,
        window_s: float = 5.0,
        interval_s: float = 2.5,
        min_samples: int | None = None,
        max_samples: int = 4096,
        periodic: bool = True,
        seed: int = 0,
    ):
        if window_s <= 0 or interval_s <= 0:
            raise ValueError("refit window and interval must be positive")
        self.router = router
        self.window_s = window_s
        self.interval_s = interval_s
        self.periodic = periodic
        # A handful of samples per centroid makes K-means chase noise (measured: online eldr lost to
        # eldr-static on the CPU cluster with the old default of 4 per decoder).
        self._min_samples = min_samples
        self.seed = seed
        self._recent: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=max_samples)
        # The calibration space (IDF, layer mask) and its generation, changed by `retarget` on the
        # event loop and read by fits in the worker thread.
        self._lock = threading.Lock()
        self._space = (idf, layer_mask)
        self._generation = 0
        self._wake = asyncio.Event()  # set on the event loop only
        self._again = False  # set by a fit that found the members changed
        self.refits = 0  # periodic swaps
        self.membership_refits = 0  # swaps after a membership change
        self.skipped = 0  # too few samples
        self.dropped = 0  # the members or the file changed while fitting
        self.last_error: str | None = None

    def min_samples(self, k: int) -> int:
        return self._min_samples if self._min_samples is not None else max(64, 16 * k)

    def retarget(self, idf: np.ndarray, layer_mask: np.ndarray) -> None:
        """Fits in the space of a new centroid file from now on (the window's raw counts stay
        valid); a fit under way in the old space is dropped."""
        with self._lock:
            self._space = (idf, layer_mask)
            self._generation += 1

    def observe(self, counts: np.ndarray) -> None:
        self._recent.append((time.monotonic(), counts))

    def request(self) -> None:
        """Refit as soon as possible (a decoder was added or removed)."""
        self._wake.set()

    def window(self) -> list[np.ndarray]:
        cutoff = time.monotonic() - self.window_s
        return [c for t, c in list(self._recent) if t >= cutoff]

    def fit(self, k: int, space: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
        """Balanced spherical K-means with `k` centroids on the window in `space`, or None when it
        holds too few requests (fewer than `min_samples`, or than `k` with a non-zero signature)."""
        samples = self.window()
        if len(samples) < max(self.min_samples(k), k):
            return None
        sigs = build_signatures(np.stack(samples), *space)
        sigs = sigs[sigs.any(axis=1)]
        if len(sigs) < k:
            return None
        centroids, _, _ = fitting.balanced_spherical_kmeans(sigs, k, seed=self.seed)
        return centroids

    def refit_once(self, membership: bool = False) -> bool:
        """Fits for the current members and swaps if the window holds enough requests and
        nothing changed meanwhile; returns whether it swapped. Safe to run in a thread."""
        with self._lock:
            space, generation = self._space, self._generation
        ids, current = self.router.centroid_snapshot()
        new = self.fit(len(ids), space)
        if new is None:
            self.skipped += 1
            return False
        aligned = fitting.align_centroids(current, new)
        with self._lock:
            if generation != self._generation:
                self.dropped += 1
                return False
            try:
                self.router.swap_centroids(aligned, fitted_for=ids)
            except ValueError:
                if self.router.ids() == ids:
                    raise
                self.dropped += 1  # the members changed while fitting: fit again for the new ones
                self._again = True
                return False
        if membership:
            self.membership_refits += 1
        else:
            self.refits += 1
        return True

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s if self.periodic else None)
            except TimeoutError:
                pass
            membership = self._wake.is_set()
            self._wake.clear()
            try:
                await asyncio.to_thread(self.refit_once, membership)
                self.last_error = None
                if self._again:
                    self._again = False
                    self._wake.set()
            except Exception as e:  # noqa: BLE001 - a failed refit keeps the old centroids
                self.last_error = str(e)
                logger.warning("refit failed, keeping the current centroids: %s", e)
