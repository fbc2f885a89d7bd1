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
        self.first_token = Counter("eldr_first_token", "Streaming requests by where the client's first token came "
                                   "from (prefill: early; decoder; mismatch: see the log; off)", ["source"],
                                   registry=self.registry)
        # Label children of the per-request counters, looked up once per label set (`.labels()` takes
        # a lock and builds a key each call). These counters never drop a label set.
        self._requests: dict[tuple[str, int], Counter] = {}
        self._fallbacks: dict[str, Counter] = {}
        self._routed: dict[str, Counter] = {}
        self._first_token: dict[str, Counter] = {}
        self.set_in_flight(dict.fromkeys(decoders, 0))

    def count_request(self, endpoint: str, status: int) -> None:
        """One request answered on `endpoint` with HTTP `status` (eldr_requests_total)."""
        child = self._requests.get((endpoint, status))
        if child is None:
            child = self._requests[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        child.inc()

    def count_fallback(self, reason: str) -> None:
        child = self._fallbacks.get(reason)
        if child is None:
            child = self._fallbacks[reason] = self.fallbacks.labels(reason)
        child.inc()

    def count_first_token(self, source: str) -> None:
        child = self._first_token.get(source)
        if child is None:
            child = self._first_token[source] = self.first_token.labels(source)
        child.inc()

    def count_routed(self, decoder: str) -> None:
        child = self._routed.get(decoder)
        if child is None:
            child = self._routed[decoder] = self.routed.labels(decoder)
        child.inc()

    def set_in_flight(self, loads: dict[str, int]) -> None:
        """In-flight count per decoder URL; decoders no longer listed are dropped from the gauge."""
        for url in self._shown - loads.keys():
            self.in_flight.remove(url)
        for url, n in loads.items():
            self.in_flight.labels(url).set(n)
        self._shown = set(loads)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
