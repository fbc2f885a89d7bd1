"""Prometheus metrics of the load balancer (its own registry, so several routers can share a
process in tests)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RouterMetrics:
    def __init__(self, decoders: list[str]):
        self.registry = CollectorRegistry()
        self._shown: set[str] = set()
        self.in_flight = Gauge("eldr_decoder_in_flight", "Requests in flight per decoder", ["decoder"],
                               registry=self.registry)
        self.routed = Counter("eldr_routed", "Requests routed per decoder", ["decoder"], registry=self.registry)
        self.fallbacks = Counter("eldr_fallbacks", "Decisions made without usable counts, by reason", ["reason"],
                                 registry=self.registry)
        self.requests = Counter("eldr_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=self.registry)
        self.route_seconds = Histogram(
            "eldr_route_seconds", "Time to choose a decoder (Rust router call)", registry=self.registry,
            buckets=(1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2),
        )
        self.request_seconds = Histogram("eldr_request_seconds", "End-to-end request time", registry=self.registry)
        self.membership = Counter("eldr_membership_changes", "Workers added or removed at runtime",
                                  ["role", "change"], registry=self.registry)
        self.centroid_updates = Counter("eldr_centroid_updates", "POST /centroids by result (loaded, refused)",
                                        ["result"], registry=self.registry)
        self.set_in_flight(dict.fromkeys(decoders, 0))

    def set_in_flight(self, loads: dict[str, int]) -> None:
        """In-flight count per decoder URL; decoders no longer listed are dropped from the gauge."""
        for url in self._shown - loads.keys():
            self.in_flight.remove(url)
        for url, n in loads.items():
            self.in_flight.labels(url).set(n)
        self._shown = set(loads)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
