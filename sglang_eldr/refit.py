"""Refits of the ELDR centroids: balanced spherical K-means on a window of recent requests' counts,
aligned to decoder identities (Hungarian) and swapped into the Rust router in one step.

The window is a ring buffer in shared memory that the request path writes one row into; fits run
in a separate process that reads it there, so neither a fit (OR-Tools holds the GIL through each
min-cost-flow solve) nor shipping the window to it ever stalls the event loop. Fits happen
periodically (the online refit) and as soon as possible after a membership change. A fit
computed while the members or the centroid file changed is dropped, not applied to the wrong rows."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import mmap
import multiprocessing
import os
import threading
import time
import weakref
from multiprocessing import shared_memory

import numpy as np

from sglang_eldr import fitting
from sglang_eldr.router_rs import Router
from sglang_eldr.signature import build_signatures

logger = logging.getLogger(__name__)


COUNT_MAX = np.iinfo(np.uint16).max  # counts are kept as uint16 (a larger count is clipped)
MIN_CAPACITY = 256


class CountsWindow:
    """The last `capacity` requests' counts `[layers, experts]` with their arrival times, in one
    shared-memory block (written by one thread, read by a fit process). Where /dev/shm cannot
    hold `capacity` rows (a container's 64 MiB default, a large model), it keeps as many as fit
    and says so."""

    def __init__(self, layers: int, experts: int, capacity: int = 4096):
        row = 8 + 2 * layers * experts
        while True:
            try:
                self._shm = shared_memory.SharedMemory(create=True, size=capacity * row)
                break
            except OSError as e:
                if capacity // 2 < MIN_CAPACITY:
                    raise OSError(f"refit window: /dev/shm cannot hold {capacity} requests' counts "
                                  f"({capacity * row} bytes): {e}") from e
                logger.warning("refit window: /dev/shm cannot hold %d requests' counts (%s); keeping %d",
                               capacity, e, capacity // 2)
                capacity //= 2
        self.shape = (capacity, layers, experts)
        self._free = weakref.finalize(self, _unlink, self._shm)
        self.stamps, self.counts = _views(self._shm.buf, self.shape)
        self.stamps[:] = -np.inf  # empty slots are older than any cutoff
        self._next = 0

    @property
    def name(self) -> str:
        return self._shm.name

    def observe(self, counts: np.ndarray) -> None:
        """Keeps one request's counts (refused shapes are the router's to report, not ours)."""
        if counts.shape != self.shape[1:]:
            return
        slot = self._next % self.shape[0]
        self.stamps[slot] = -np.inf  # a reader that sees this slot mid-write drops it
        np.minimum(counts, COUNT_MAX, out=self.counts[slot], casting="unsafe")
        self.stamps[slot] = time.monotonic()
        self._next += 1

    def since(self, cutoff: float) -> np.ndarray:
        return _rows_since(self.stamps, self.counts, cutoff)

    def close(self) -> None:
        del self.stamps, self.counts  # the views must go before the block can close
        self._free()


def _unlink(shm: shared_memory.SharedMemory) -> None:
    shm.unlink()
    with contextlib.suppress(BufferError):  # a view still alive somewhere: the mapping goes with it
        shm.close()


def _views(buf, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    n = shape[0]
    stamps = np.ndarray((n,), dtype=np.float64, buffer=buf)
    counts = np.ndarray(shape, dtype=np.uint16, buffer=buf, offset=8 * n)
    return stamps, counts


def _rows_since(stamps: np.ndarray, counts: np.ndarray, cutoff: float, at_least: int = 0) -> np.ndarray:
    """Copies the rows newer than `cutoff` (CLOCK_MONOTONIC is system-wide), or the newest
    `at_least` rows if that is more; a row rewritten while it was copied is dropped."""
    before = stamps.copy()
    keep = np.flatnonzero(before >= cutoff)
    if len(keep) < at_least:
        filled = np.flatnonzero(before > -np.inf)
        keep = filled[np.argsort(before[filled])[-at_least:]]
    rows = counts[keep].copy()
    return rows[stamps[keep] == before[keep]]


def read_window(name: str, shape: tuple[int, int, int], cutoff: float, at_least: int = 0) -> np.ndarray:
    """`CountsWindow.since` from another process. Maps the block read-only by its /dev/shm path,
    so this process never registers it with the resource tracker (which would unlink it when
    this process ends, on Python < 3.13)."""
    with open(f"/dev/shm/{name.lstrip('/')}", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        stamps, counts = _views(m, shape)
        try:
            return _rows_since(stamps, counts, cutoff, at_least)
        finally:
            del stamps, counts


def fit_window(name: str, shape: tuple[int, int, int], cutoff: float, idf: np.ndarray, layer_mask: np.ndarray,
               k: int, min_samples: int, seed: int) -> np.ndarray | None:
    """Runs in the fit process: balanced spherical K-means with `k` centroids on the window rows
    newer than `cutoff`, or the newest `min_samples` rows if that is more; None when there are
    too few (fewer than `min_samples`, or than `k` with a non-zero signature)."""
    samples = read_window(name, shape, cutoff, at_least=min_samples)
    if len(samples) < max(min_samples, k):
        return None
    sigs = build_signatures(samples, idf, layer_mask)
    sigs = sigs[sigs.any(axis=1)]
    if len(sigs) < k:
        return None
    centroids, _, _ = fitting.balanced_spherical_kmeans(sigs, k, seed=seed)
    return centroids


def _exit_with(parent: int) -> None:
    """Fit-process initializer: end when the router process is gone (a killed router must not
    leave its fit process behind)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="eldr-fit-parent-watch", daemon=True).start()


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
        every: int | None = None,
        seed: int = 0,
    ):
        """Fits on the last `window_s` seconds of requests, or on the last `min_samples` requests
        when fewer arrived in that time (so a low request rate or a large fleet still refits);
        with `periodic`, every `interval_s` seconds and also, with `every`, after that many new
        requests."""
        if window_s <= 0 or interval_s <= 0:
            raise ValueError("refit window and interval must be positive")
        if every is not None and every <= 0:
            raise ValueError("refit every: must be a positive number of requests")
        self.every = every
        self._since = 0  # requests observed since the last fit began
        self.router = router
        self.window_s = window_s
        self.interval_s = interval_s
        self.periodic = periodic
        # A handful of samples per centroid makes K-means chase noise (measured: online eldr lost to
        # eldr-static on the CPU cluster with the old default of 4 per decoder).
        self._min_samples = min_samples
        self.seed = seed
        layers, experts = idf.shape
        self._window = CountsWindow(layers, experts, capacity=max_samples)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        # The calibration space (IDF, layer mask) and its generation, changed by `retarget` on the
        # event loop and read by fits in the worker thread.
        self._lock = threading.Lock()
        self._space = (idf, layer_mask)
        self._generation = 0
        self._wake = asyncio.Event()  # set on the event loop only
        self._again = False  # set by a fit that found the members changed
        self._membership = False  # a membership change asked for the next fit
        self.refits = 0  # periodic swaps
        self.membership_refits = 0  # swaps after a membership change
        self.skipped = 0  # too few samples
        self.dropped = 0  # the members or the file changed while fitting
        self.last_error: str | None = None

    def min_samples(self, k: int) -> int:
        """Requests a fit for `k` centroids needs (never more than the window holds)."""
        wanted = self._min_samples if self._min_samples is not None else max(64, 16 * k)
        return min(wanted, self._window.shape[0])

    def retarget(self, idf: np.ndarray, layer_mask: np.ndarray) -> None:
        """Fits in the space of a new centroid file (same geometry) from now on; the window's raw
        counts stay valid, a fit under way in the old space is dropped."""
        with self._lock:
            self._space = (idf, layer_mask)
            self._generation += 1

    def observe(self, counts: np.ndarray) -> None:
        self._window.observe(counts)
        self._since += 1
        if self.periodic and self.every is not None and self._since >= self.every:
            self._wake.set()

    def request(self) -> None:
        """Refit as soon as possible (a decoder was added or removed)."""
        self._membership = True
        self._wake.set()

    def window(self) -> np.ndarray:
        """The requests a fit now would use."""
        return self._window.since(time.monotonic() - self.window_s)

    def fit(self, k: int, space: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
        """`k` centroids fitted on the window in `space` by the fit process (started on first
        use), or None when the window holds too few requests."""
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with, initargs=(os.getpid(),))
        job = self._pool.submit(fit_window, self._window.name, self._window.shape, time.monotonic() - self.window_s,
                                *space, k, self.min_samples(k), self.seed)
        return job.result()

    def refit_once(self, membership: bool = False) -> bool:
        """Fits for the current members and swaps if the window holds enough requests and
        nothing changed meanwhile; returns whether it swapped. Blocks while the fit process
        works (the event loop runs it in a thread)."""
        with self._lock:
            space, generation = self._space, self._generation
        self._since = 0
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
            membership, self._membership = self._membership, False
            self._wake.clear()
            try:
                await asyncio.to_thread(self.refit_once, membership)
                self.last_error = None
                if self._again:
                    self._again = False
                    self.request()
            except Exception as e:  # noqa: BLE001 - a failed refit keeps the old centroids
                self.last_error = str(e)
                logger.warning("refit failed, keeping the current centroids: %s", e)

    def close(self) -> None:
        """Stops the fit process and frees the window."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._window.close()
