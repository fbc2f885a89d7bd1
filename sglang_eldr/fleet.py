"""The workers behind the load balancer: who they are, whether they are healthy, how loaded.

The Rust router of each pool owns its members' order, in-flight counts, health and circuit-breaker
failure counts (the decode pool's is the `DecodeChooser`'s router; the prefill pool's keeps state
only, since `PrefillPicker` chooses). `Worker` records keep what Python needs to reach a worker.
`Fleet` owns both pools, membership changes (POST/DELETE /workers without the HTTP), the periodic
health checks, the HTTP session to the workers and the subscriptions to the prefills' counts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import aiohttp

from sglang_eldr.counts_inbox import CountsInbox
from sglang_eldr.decode_policy import DecodeChooser
from sglang_eldr.metrics import RouterMetrics
from sglang_eldr.router_rs import BaselineRouter, Router

if TYPE_CHECKING:
    from sglang_eldr.router_rs import Member

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: a re-added URL is a new worker, old requests keep the old one
class Worker:
    url: str
    role: str  # "prefill" | "decode"
    bootstrap_port: int | None = None
    counts_port: int | None = None  # None: not known yet, asked from the prefill's GET /eldr/info
    counts_host: str | None = None  # None: the host of `url`
    id: int = -1  # member id in its pool's Rust router (a re-added URL gets a new one)

    @functools.cached_property  # the URL never changes (a re-added URL is a new Worker)
    def host(self) -> str:
        host = urlparse(self.url).hostname
        if host is None:
            raise ValueError(f"worker URL {self.url!r} has no host")
        return host

    @property
    def counts_endpoint(self) -> str:
        host = self.counts_host or self.host
        return f"tcp://[{host}]:{self.counts_port}" if ":" in host else f"tcp://{host}:{self.counts_port}"


@dataclass
class LBConfig:
    counts_deadline_s: float = 5.0
    request_timeout_s: float = 600.0
    max_body_bytes: int = 16 * 1024 * 1024
    decode_attempts: int = 2  # a request whose decoder is unreachable is re-routed this many times - 1
    orphan_grace_s: float = 10.0  # decode time allowed after its prefill call failed
    health_interval_s: float = 2.0  # 0 disables the periodic checks
    health_failures: int = 3  # consecutive failed checks that take a worker out
    health_timeout_s: float = 5.0
    allow_unknown_fields: bool = False  # pass fields this SGLang version does not know to the servers
    early_first_token: bool = True  # streaming OpenAI requests get their first token from the prefill


class StatusError(Exception):
    """An error the web app answers with HTTP `status` and `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class MembershipError(StatusError):
    """A worker cannot be added or removed; `status` says why (404, 409)."""


class Pool:
    """One role's workers: records by member id over the Rust router that holds their state."""

    def __init__(self, role: str, router: Router, workers: list[Worker]):
        keys = [m["key"] for m in router.members()]
        if keys != [w.url for w in workers]:
            raise ValueError(f"{role} pool: the router's members {keys} are not the workers {[w.url for w in workers]}")
        self.role = role
        self.router = router
        for w, worker_id in zip(workers, router.ids()):
            w.id = worker_id
        self._by_id = {w.id: w for w in workers}

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.workers)

    def __len__(self) -> int:
        return self.router.num_workers

    @property
    def workers(self) -> list[Worker]:
        """In member order (the order loads and health are reported in)."""
        return [self._by_id[i] for i in self.router.ids()]

    def by_id(self, worker_id: int) -> Worker:
        return self._by_id[worker_id]

    def find(self, url: str) -> Worker | None:
        return next((w for w in self._by_id.values() if w.url == url), None)

    def __contains__(self, worker: Worker) -> bool:
        return self._by_id.get(worker.id) is worker

    def loads(self) -> list[int]:
        return self.router.loads().tolist()

    def healthy(self) -> list[bool]:
        return self.router.healthy()

    def members(self) -> dict[int, Member]:
        return {m["id"]: m for m in self.router.members()}

    def in_flight(self, worker: Worker) -> int:
        """Its requests in flight, also after it was removed."""
        return self.router.in_flight(worker.id)

    def add(self, worker: Worker, healthy: bool) -> None:
        worker.id = self.router.add(worker.url, healthy)
        self._by_id[worker.id] = worker

    def remove(self, worker: Worker) -> None:
        self.router.remove(worker.id)
        del self._by_id[worker.id]

    def hold(self, worker: Worker) -> None:
        """Counts a request on a worker chosen outside the router's policy."""
        self.router.hold(worker.id)

    def release(self, worker: Worker, ticket: int | None = None) -> None:
        """Ends one request on `worker` (with its receipt's ticket under the marginal policy);
        after its removal only its own retired count drops."""
        self.router.release(worker.id, ticket)

    def report(self, worker: Worker, ok: bool) -> None:
        """One circuit-breaker observation; logs a change of health."""
        if worker in self:
            changed = self.router.report(worker.id, ok)
            if changed is not None:
                logger.warning("%s %s marked %s", self.role, worker.url, "healthy" if changed else "unhealthy")

    def set_healthy(self, worker: Worker, healthy: bool) -> None:
        if worker in self and self.router.set_healthy(worker.id, healthy):
            logger.warning("%s %s marked %s", self.role, worker.url, "healthy" if healthy else "unhealthy")


class Fleet:
    def __init__(self, prefills: list[Worker], decoders: list[Worker], decode: DecodeChooser,
                 metrics: RouterMetrics, config: LBConfig):
        self.prefills = Pool("prefill", BaselineRouter("jsq", keys=[p.url for p in prefills],
                                                        breaker_failures=config.health_failures), prefills)
        self.decoders = Pool("decode", decode.router, decoders)
        self.decode = decode
        self.metrics = metrics
        self.config = config
        self.inbox = CountsInbox(config.counts_deadline_s)
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self._draining: dict[str, asyncio.Task] = {}  # removed prefills' counts endpoints

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the load balancer has not started"
        return self._session

    @property
    def workers(self) -> list[Worker]:
        """Every registered worker, prefills first."""
        return self.prefills.workers + self.decoders.workers

    def pool(self, worker: Worker) -> Pool:
        return self.decoders if worker.role == "decode" else self.prefills

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Opens the session to the workers, subscribes to the prefills' counts and starts the
        health checks (unless `health_interval_s` is 0)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.config.request_timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
        )
        self.inbox.start()
        await asyncio.gather(*(self._connect_counts(p) for p in self.prefills))
        if self.config.health_interval_s > 0:
            self._health_task = asyncio.create_task(self._health_loop(), name="eldr-health")

    def cancel_tasks(self) -> None:
        """Stops the health checks and the pending unsubscribes of removed prefills."""
        if self._health_task is not None:
            self._health_task.cancel()
        for t in list(self._draining.values()):
            t.cancel()

    async def close(self) -> None:
        await self.inbox.close()
        if self._session is not None:
            await self._session.close()

    def available(self) -> bool:
        """Some prefill and some decoder are healthy."""
        return any(self.prefills.healthy()) and any(self.decoders.healthy())

    # ------------------------------------------------------------------ health
    async def _health_loop(self) -> None:
        """Circuit breaker per worker: `health_failures` failed checks in a row take it out of
        every policy's choice; the next passing check (the half-open probe) puts it back."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            workers = self.workers
            results = await self.fan_out("GET", "/health", workers, timeout_s=self.config.health_timeout_s)
            await asyncio.gather(*(self._connect_counts(p) for p in self.prefills if p.counts_port is None))
            for w, (status, _) in zip(workers, results):
                self.pool(w).report(w, status == 200)  # a worker removed while the checks ran is skipped

    def request_failed(self, decoder: Worker) -> None:
        """A request broke on this decoder after it was accepted: counts toward its breaker like a
        failed health check (a passing check resets the count)."""
        self.decoders.report(decoder, False)

    async def fan_out(self, method: str, path: str, workers: list[Worker],
                      timeout_s: float = 30.0) -> list[tuple[int, object]]:
        """One request to each of `workers`: (status, JSON body or text); 599 where it failed."""

        async def one(w: Worker) -> tuple[int, object]:
            try:
                async with self.session.request(method, w.url + path,
                                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                    text = await r.text()
                    try:
                        return r.status, json.loads(text)
                    except ValueError:
                        return r.status, text
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                return 599, f"{type(e).__name__}: {e}"

        return list(await asyncio.gather(*(one(w) for w in workers)))

    # ------------------------------------------------------------------ membership
    def find(self, url: str) -> Worker | None:
        return self.prefills.find(url) or self.decoders.find(url)

    async def add(self, worker: Worker) -> bool:
        """Registers `worker`; returns whether it joined healthy. It is probed once; if its
        /health fails it joins unhealthy and the health checks put it in service when it passes.
        MembershipError (409) if its URL is taken."""
        if self.find(worker.url) is not None:
            raise MembershipError(409, f"worker {worker.url} is already registered; DELETE it first")
        (status, _), = await self.fan_out("GET", "/health", [worker], timeout_s=self.config.health_timeout_s)
        if self.find(worker.url) is not None:  # added while we probed
            raise MembershipError(409, f"worker {worker.url} is already registered; DELETE it first")
        healthy = status == 200
        self.pool(worker).add(worker, healthy)
        if worker.role == "decode":
            self.decode.membership_changed()
        else:
            task = self._draining.pop(worker.counts_endpoint, None)
            if task is not None:
                task.cancel()
            await self._connect_counts(worker)
        self.metrics.membership.labels(worker.role, "added").inc()
        logger.warning("%s %s added (%s)", worker.role, worker.url, "healthy" if healthy else "unhealthy")
        return healthy

    def remove(self, url: str) -> Worker:
        """Unregisters the worker at `url`: no new requests go to it; its requests in flight
        finish. MembershipError: 404 if none is registered there, 409 if it is the last of its role."""
        worker = self.find(url)
        if worker is None:
            raise MembershipError(404, f"no worker {url!r} is registered (GET /workers lists them)")
        pool = self.pool(worker)
        if len(pool) == 1:
            raise MembershipError(409, f"{worker.url} is the last {worker.role} worker; add another first")
        pool.remove(worker)
        if worker.role == "decode":
            self.decode.membership_changed()
        else:
            # Its requests in flight still wait for their counts: unsubscribe once they are done.
            task = asyncio.create_task(self._unsubscribe_when_drained(worker))
            self._draining[worker.counts_endpoint] = task
        self.metrics.membership.labels(worker.role, "removed").inc()
        logger.warning("%s %s removed (%d request(s) still in flight finish there)", worker.role, worker.url,
                       pool.in_flight(worker))
        return worker

    # ------------------------------------------------------------------ counts endpoints
    async def _connect_counts(self, prefill: Worker) -> None:
        """Subscribes to a prefill's counts; an endpoint not given is asked from the prefill, which
        advertises where its publisher listens (GET /eldr/info). Retried by the health loop."""
        if prefill.counts_port is None:
            (status, info), = await self.fan_out("GET", "/eldr/info", [prefill], timeout_s=self.config.health_timeout_s)
            counts = info.get("counts") if status == 200 and isinstance(info, dict) else None
            if isinstance(counts, dict) and counts.get("port") is None:
                return  # its scheduler has not bound the publisher yet: asked again next health round
            if not isinstance(counts, dict) or not isinstance(counts.get("port"), int):
                if status == 200:
                    logger.warning("prefill %s advertises no counts endpoint (capture off, or not a PD prefill "
                                   "server): its requests are routed least-loaded", prefill.url)
                return
            prefill.counts_host = counts.get("host") if isinstance(counts.get("host"), str) else None
            prefill.counts_port = counts["port"]
            logger.info("prefill %s publishes counts on %s", prefill.url, prefill.counts_endpoint)
        self.inbox.connect(prefill.counts_endpoint)

    async def _unsubscribe_when_drained(self, prefill: Worker) -> None:
        deadline = time.monotonic() + self.config.request_timeout_s
        while self.prefills.in_flight(prefill) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        self._draining.pop(prefill.counts_endpoint, None)
        self.inbox.disconnect(prefill.counts_endpoint)
