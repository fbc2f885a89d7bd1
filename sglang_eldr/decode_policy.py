"""Decode worker choice by policy name: one Rust-router decision per request. The Rust router
owns the decoder set (membership, loads, health, breaker counts); this module adds what Python
does around it: the policy's configuration, the centroid file in use, and the refits."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np

from sglang_eldr.centroids import CentroidFileError, CentroidSet
from sglang_eldr.refit import Refitter
from sglang_eldr.router_rs import (BASELINES, DEFAULT_BREAKER_FAILURES, DEFAULT_SHARPNESS, BaselineRouter, LocalityBandRouter,
                                   MarginalCostRouter, Router)

if TYPE_CHECKING:
    from sglang_eldr.router_rs import Receipt

# `eldr-static` is `eldr` with the online refit off (`--refit off`), kept as an accepted name.
# `marginal` needs no centroids: it predicts each decoder's step-time increase from the prefill
# counts of the requests it runs.
DECODE_POLICIES = ("eldr", "eldr-static", "marginal", *BASELINES)
DEFAULT_DECODE_POLICY = "marginal"  # the figures: bench/RESULTS.md §5b
# a + b·batch + c·distinct (layer, expert) pairs. With b = 0 the choice is the same for every c > 0:
# the fewest new expert reads, weighted by the requests that would wait for them.
DEFAULT_STEP_COST = (0.0, 0.0, 1.0)
NO_CENTROIDS_ROUTING = "least-loaded (no centroids)"

logger = logging.getLogger(__name__)


class DecodeChooser:
    def __init__(
        self,
        policy: str,
        decoders: list[str],
        centroid_set: CentroidSet | None = None,
        tau: float = 0.1,
        seed: int = 0,
        refit_window_s: float = 5.0,
        refit_interval_s: float = 2.5,
        refit_min_samples: int | None = None,
        max_imbalance: int | None = 2,
        online_refit: bool | None = None,
        breaker_failures: int = DEFAULT_BREAKER_FAILURES,
        imbalance_fraction: float = 0.0,
        refit_every: int | None = None,
        step_cost: tuple[float, float, float] = DEFAULT_STEP_COST,
        batch_cap: int | None = None,
        sharpness: float | None = None,
    ):
        """`decoders`: the decoders' keys (their URLs), in order."""
        if policy not in DECODE_POLICIES:
            raise ValueError(f"policy: unknown {policy!r} (expected one of {', '.join(DECODE_POLICIES)})")
        if online_refit is not None and not policy.startswith("eldr"):
            raise ValueError(f"--refit is for the eldr policy (it refits centroids); {policy} has none")
        if batch_cap is not None and policy != "marginal":
            raise ValueError(f"--batch-cap is for the marginal policy; {policy} balances load itself")
        if sharpness is not None and policy != "marginal":
            raise ValueError(f"--sharpness is for the marginal policy; {policy} predicts no expert frequencies")
        if policy == "eldr-static" and online_refit:
            raise ValueError("policy eldr-static is eldr with the online refit off; use --policy eldr --refit online")
        self.policy = policy
        # The periodic refit: on for eldr unless turned off, never for eldr-static or the baselines.
        self.online_refit = policy == "eldr" and online_refit is not False
        self.seed = seed
        self.router: Router
        if policy == "marginal":
            self.router = MarginalCostRouter(*step_cost, keys=list(decoders), breaker_failures=breaker_failures,
                                             batch_cap=batch_cap,
                                             sharpness=DEFAULT_SHARPNESS if sharpness is None else sharpness)
        elif self.locality:
            self.router = LocalityBandRouter(None, tau, keys=list(decoders), max_imbalance=max_imbalance,
                                             imbalance_fraction=imbalance_fraction, breaker_failures=breaker_failures)
        else:
            self.router = BaselineRouter(policy, keys=list(decoders), seed=seed, breaker_failures=breaker_failures)
        self._refitter_for = functools.partial(
            Refitter, self.router, window_s=refit_window_s, interval_s=refit_interval_s,
            min_samples=refit_min_samples, periodic=self.online_refit, every=refit_every, seed=seed)
        # Set once centroids are loaded: refits on membership changes, and periodically with eldr.
        self.refitter: Refitter | None = None
        # The last centroid file loaded (IDF, layer mask, geometry; the router holds the centroids as
        # refits move them). An eldr policy without one routes least-loaded.
        self.centroid_set: CentroidSet | None = None
        self._counts_shape: tuple[int, int] | None = None  # of the counts seen before centroids arrived
        self._geometry_known = False  # marginal: the router has the MoE shape
        if centroid_set is not None:  # refused (CentroidFileError) for a policy that takes none
            self.load_centroids(centroid_set)

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
        if self.policy == "marginal":
            return "expected experts"
        if not self.locality:
            return "load-only"
        return "locality" if self.has_centroids else NO_CENTROIDS_ROUTING

    @property
    def num_decoders(self) -> int:
        return self.router.num_workers

    @property
    def membership_refits(self) -> int:
        return self.refitter.membership_refits if self.refitter is not None else 0

    def choose(self, counts: np.ndarray | None, prompt_tokens: int | None = None) -> Receipt:
        """Acquires a decoder; returns the Rust receipt {worker, id, policy, scores, band, loads,
        ticket, costs}. `prompt_tokens` (the counts report's) lets the marginal policy learn the
        model's top-k from its first counts."""
        if self.policy == "marginal":
            if counts is not None and not self._geometry_known:
                self._learn_geometry(counts, prompt_tokens)
            return self.router.acquire_with_receipt(counts)
        if not self.has_centroids:
            if counts is not None:
                self._counts_shape = (int(counts.shape[0]), int(counts.shape[1]))
            return self.router.acquire_with_receipt(None)
        receipt = self.router.acquire_with_receipt(counts)
        if counts is not None and self.refitter is not None:
            self.refitter.observe(counts)
        return receipt

    def _learn_geometry(self, counts: np.ndarray, prompt_tokens: int | None) -> None:
        """Every prompt token picks top-k experts per layer, so a layer's counts sum to
        tokens × top-k. ValueError (the request goes least-loaded as bad-counts) when they do not."""
        if counts.ndim != 2 or not prompt_tokens or prompt_tokens <= 0:
            raise ValueError(f"marginal: cannot learn top-k from counts of shape {list(counts.shape)} "
                             f"over {prompt_tokens} prompt tokens")
        per_layer = counts.sum(axis=1)
        top_k = int(per_layer[0]) // prompt_tokens
        if top_k < 1 or not (per_layer == top_k * prompt_tokens).all():
            raise ValueError(f"marginal: counts per layer {per_layer.tolist()} are not one multiple of the "
                             f"{prompt_tokens} prompt tokens")
        self.router.set_geometry(int(counts.shape[0]), int(counts.shape[1]), top_k)
        self._geometry_known = True
        logger.info("marginal: model geometry %d layers x %d experts, top-%d (from the first counts)",
                    counts.shape[0], counts.shape[1], top_k)

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
        """Routes by `cs` from now on (row k is decoder k), keeping loads, health and membership;
        the old state stays when it does not fit (CentroidFileError, or ValueError from the Rust
        router)."""
        self.check_centroids(cs)
        self.router.load_centroids(cs.centroids, idf=cs.idf, layer_mask=cs.layer_mask)
        self.centroid_set = cs
        if self.refitter is None:
            self.refitter = self._refitter_for(cs.idf, cs.layer_mask)
        else:
            self.refitter.retarget(cs.idf, cs.layer_mask)
        logger.info("centroids loaded: %d decoders, %d of %d layers kept", cs.num_workers,
                    int(cs.layer_mask.sum()), len(cs.layer_mask))

    # ------------------------------------------------------------------ membership
    def membership_changed(self) -> None:
        """A decoder was added to or removed from `router` (a new one has its old centroid back
        if its key was removed before, else the mean direction of the others): refit as soon as
        the window allows, off the event loop."""
        if self.refitter is not None:
            self.refitter.request()
