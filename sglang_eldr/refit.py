"""Online refit of the ELDR centroids: a background task fits balanced spherical K-means on a
recent window of request signatures, aligns the new centroids to decoder identities (Hungarian)
and swaps them into the Rust router atomically. The request path only appends to a deque."""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import numpy as np

from sglang_eldr import fitting
from sglang_eldr.signature import build_signatures

logger = logging.getLogger(__name__)


class OnlineRefit:
    def __init__(
        self,
        router,
        idf: np.ndarray,
        layer_mask: np.ndarray,
        window_s: float = 5.0,
        interval_s: float = 2.5,
        min_samples: int | None = None,
        max_samples: int = 4096,
        seed: int = 0,
    ):
        if window_s <= 0 or interval_s <= 0:
            raise ValueError("refit window and interval must be positive")
        self.router = router
        self.idf = idf
        self.layer_mask = layer_mask
        self.window_s = window_s
        self.interval_s = interval_s
        # A handful of samples per centroid makes K-means chase noise (measured: online eldr lost to
        # eldr-static on the CPU cluster with the old default of 4 per decoder).
        self.min_samples = min_samples if min_samples is not None else max(64, 16 * router.num_workers)
        self.seed = seed
        self._recent: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=max_samples)
        self.refits = 0
        self.skipped = 0
        self.last_error: str | None = None

    def retarget(self, router, idf: np.ndarray, layer_mask: np.ndarray) -> None:
        """Fits for `router` in the space of a new centroid file from now on (the window's raw
        counts stay valid)."""
        self.router, self.idf, self.layer_mask = router, idf, layer_mask

    def observe(self, counts: np.ndarray) -> None:
        self._recent.append((time.monotonic(), counts))

    def window(self) -> list[np.ndarray]:
        cutoff = time.monotonic() - self.window_s
        return [c for t, c in list(self._recent) if t >= cutoff]

    def fit(self, k: int, space: tuple[np.ndarray, np.ndarray] | None = None):
        """Balanced spherical K-means with `k` centroids on the window, in `space` (IDF, layer
        mask; default the current one), or None when it holds too few requests (fewer than
        `min_samples`, or than `k` with a non-zero signature)."""
        idf, layer_mask = space if space is not None else (self.idf, self.layer_mask)
        samples = self.window()
        if len(samples) < max(self.min_samples, k):
            return None
        sigs = build_signatures(np.stack(samples), idf, layer_mask)
        sigs = sigs[sigs.any(axis=1)]
        if len(sigs) < k:
            return None
        centroids, _, _ = fitting.balanced_spherical_kmeans(sigs, k, seed=self.seed)
        return centroids

    def refit_once(self) -> bool:
        """Fits and swaps if the window holds enough requests; returns whether it swapped."""
        # Membership changes and centroid uploads replace the router (and its space) meanwhile:
        # fit for one of them; a swap into a replaced router is simply lost.
        router, space = self.router, (self.idf, self.layer_mask)
        new = self.fit(router.num_workers, space)
        if new is None:
            self.skipped += 1
            return False
        router.swap_centroids(fitting.align_centroids(router.centroids(), new))
        self.refits += 1
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.refit_once)
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - a failed refit keeps the old centroids
                self.last_error = str(e)
                logger.warning("online refit failed, keeping the current centroids: %s", e)
