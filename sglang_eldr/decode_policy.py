"""Decode worker choice by policy name, one Rust-router decision per request."""

from __future__ import annotations

import numpy as np

from sglang_eldr.centroids import CentroidSet
from sglang_eldr.refit import OnlineRefit
from sglang_eldr.router_rs import BASELINES, BaselineRouter, LocalityBandRouter

DECODE_POLICIES = ("eldr", "eldr-static", *BASELINES)


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
        self.refit: OnlineRefit | None = None
        if policy.startswith("eldr"):
            if centroid_set is None:
                raise ValueError(f"policy {policy}: needs a centroid file (--centroids), e.g. from sglang_eldr.calibrate")
            if centroid_set.num_workers != num_decoders:
                raise ValueError(
                    f"centroids: the file has {centroid_set.num_workers} centroids but {num_decoders} decoders are "
                    "configured; recalibrate with --decoders matching the cluster"
                )
            self.router = LocalityBandRouter(
                centroid_set.centroids, tau, idf=centroid_set.idf, layer_mask=centroid_set.layer_mask,
                max_imbalance=max_imbalance,
            )
            if policy == "eldr":
                self.refit = OnlineRefit(
                    self.router, centroid_set.idf, centroid_set.layer_mask, window_s=refit_window_s,
                    interval_s=refit_interval_s, min_samples=refit_min_samples, seed=seed,
                )
        else:
            self.router = BaselineRouter(policy, num_decoders, seed=seed)

    @property
    def locality(self) -> bool:
        return self.policy.startswith("eldr")

    def choose(self, counts: np.ndarray | None) -> dict:
        """Acquires a decoder; returns the Rust receipt {worker, policy, scores, band, loads}."""
        receipt = self.router.acquire_with_receipt(counts if self.locality else None)
        if counts is not None and self.refit is not None:
            self.refit.observe(counts)
        return receipt

    def release(self, worker: int) -> None:
        self.router.release(worker)

    def loads(self) -> list[int]:
        return self.router.loads().tolist()

    def set_healthy(self, worker: int, healthy: bool) -> None:
        self.router.set_healthy(worker, healthy)

    def healthy(self) -> list[bool]:
        return self.router.healthy()
