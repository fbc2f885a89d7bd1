"""The PD load balancer: prefill first, decoder chosen from the prefill's expert counts.

Protocol (docs/protocol.md has the full design):
1. Pick a prefill worker (prefix-hash with a load gate, or rr); give the request a bootstrap
   room and POST it to the prefill server only. Prefill servers run with
   `--disaggregation-decode-allocation-policy prefill_complete`, so prefill computes at once and
   holds the request's KV until a decoder bootstraps for that room (SGLang's bootstrap timeout
   frees it if none ever does).
2. The ELDR plugin on the prefill server publishes the prompt's expert counts over ZMQ as soon
   as the prefill forward ends; the counts inbox resolves the future for that room.
3. One Rust-router decision picks the decoder (JSQ fallback if counts do not arrive by the
   deadline, or are malformed); the same request, same room, goes to that decoder, which pulls
   the KV from the prefill server and decodes. Its response is returned with a route receipt.
4. The decoder's in-flight count is released exactly once, however the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp
import msgspec
import numpy as np
from aiohttp import web

from sglang_eldr import centroids as centroid_file
from sglang_eldr.counts_inbox import CountsInbox
from sglang_eldr.decode_policy import DecodeChooser
from sglang_eldr.metrics import RouterMetrics
from sglang_eldr.prefill_policy import PrefillPicker, prompt_key
from sglang_eldr.jsonio import JSON_HEADERS, dumps_json, json_body_response, loads_json, read_json
from sglang_eldr.request_validation import validate_body
from sglang_eldr.wire import REQUEST_FIELD, RouteReceipt, WorkerSpec, counts_meta

logger = logging.getLogger(__name__)

COUNTS_FIELD = REQUEST_FIELD
GENERATE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
async def first_done(futures: tuple[asyncio.Future, ...], timeout: float | None = None) -> None:
    """Returns once one of `futures` is done, or after `timeout` seconds; the caller reads `.done()`.
    What `asyncio.wait(..., return_when=FIRST_COMPLETED)` does, without the sets, the ensure_future
    pass and the result sets it builds on every call (it showed in the request path's profile).
    Cancelling the caller does not cancel `futures`, as with asyncio.wait."""
    if any(f.done() for f in futures):
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for f in futures:
        f.add_done_callback(wake)
    timer = loop.call_later(timeout, wake) if timeout is not None else None
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for f in futures:
            f.remove_done_callback(wake)


@dataclass(eq=False)  # identity: a re-added URL is a new worker, old requests keep the old one
class Worker:
    url: str
    role: str  # "prefill" | "decode"
    bootstrap_port: int | None = None
    counts_port: int | None = None  # None: not known yet, asked from the prefill's GET /eldr/info
    counts_host: str | None = None  # None: the host of `url`
    healthy: bool = True
    in_flight: int = 0

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


class DecoderUnreachable(Exception):
    """The decoder could not be connected to: the request never reached it."""


class UpstreamError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


@dataclass
class LoadBalancer:
    prefills: list[Worker]
    decoders: list[Worker]
    decode: DecodeChooser
    prefill_picker: PrefillPicker
    config: LBConfig = field(default_factory=LBConfig)
    policy_name: str = ""

    def __post_init__(self) -> None:
        self.metrics = RouterMetrics([d.url for d in self.decoders])
        self.inbox = CountsInbox()
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()
        self._refit_task: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None
        self._failures: dict[str, int] = {}
        self._draining: dict[str, asyncio.Task] = {}  # removed prefills' counts endpoints
        self.policy_name = self.policy_name or self.decode.policy

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the load balancer has not started"
        return self._session

    # ------------------------------------------------------------------ lifecycle
    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.config.request_timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
        )
        self.inbox.start()
        await asyncio.gather(*(self._connect_counts(p) for p in self.prefills))
        self._start_refit()
        if self.config.health_interval_s > 0:
            self._health_task = asyncio.create_task(self._health_loop(), name="eldr-health")

    def _start_refit(self) -> None:
        """The periodic online refit, once the policy has one (eldr, when centroids are loaded)."""
        if self.decode.refit is not None and self._refit_task is None:
            self._refit_task = asyncio.create_task(self.decode.refit.run(), name="eldr-refit")

    async def stop(self, app: web.Application) -> None:
        for t in (self._refit_task, self._health_task):
            if t is not None:
                t.cancel()
        for t in list(self._background) + list(self._draining.values()):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.inbox.close()
        if self._session is not None:
            await self._session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        for path in GENERATE_PATHS:
            app.router.add_post(path, self.handle_generate)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/workers", self.handle_workers)
        app.router.add_post("/workers", self.handle_add_worker)
        app.router.add_delete("/workers", self.handle_remove_worker)
        app.router.add_delete("/workers/{url:.+}", self.handle_remove_worker)
        app.router.add_post("/centroids", self.handle_centroids)
        app.router.add_post("/flush_cache", self.handle_flush_cache)
        app.router.add_get("/server_info", self.handle_server_info)
        app.router.add_get("/get_server_info", self.handle_server_info)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/model_info", self.handle_models)
        return app

    async def _connect_counts(self, prefill: Worker) -> None:
        """Subscribes to a prefill's counts; an endpoint not given is asked from the prefill, which
        advertises where its publisher listens (GET /eldr/info). Retried by the health loop."""
        if prefill.counts_port is None:
            (status, info), = await self._fan_out("GET", "/eldr/info", [prefill], timeout_s=self.config.health_timeout_s)
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

    # ------------------------------------------------------------------ health
    async def _health_loop(self) -> None:
        """Circuit breaker per worker: `health_failures` failed checks in a row take it out of
        every policy's choice; the next passing check (the half-open probe) puts it back."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            workers = self.prefills + self.decoders
            results = await self._fan_out("GET", "/health", workers, timeout_s=self.config.health_timeout_s)
            await asyncio.gather(*(self._connect_counts(p) for p in self.prefills if p.counts_port is None))
            for w, (status, _) in zip(workers, results):
                if w not in self.prefills and w not in self.decoders:
                    continue  # removed while the checks ran
                ok = status == 200
                self._failures[w.url] = 0 if ok else self._failures.get(w.url, 0) + 1
                healthy = ok or (w.healthy and self._failures[w.url] < self.config.health_failures)
                if w.role == "decode":
                    self.mark_decoder(self.decoders.index(w), healthy)
                elif w.healthy != healthy:
                    logger.warning("prefill %s marked %s", w.url, "healthy" if healthy else "unhealthy")
                    w.healthy = healthy

    # ------------------------------------------------------------------ small endpoints
    async def handle_health(self, request: web.Request) -> web.Response:
        ok = any(p.healthy for p in self.prefills) and any(self.decode.healthy())
        return web.json_response({"status": "ok" if ok else "unavailable", "routing": self.decode.routing},
                                 status=200 if ok else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        self._show_loads()
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _row(self, w: Worker) -> dict:
        row = {"url": w.url, "role": w.role, "healthy": w.healthy, "in_flight": w.in_flight}
        if w.role == "prefill":
            row.update(bootstrap_port=w.bootstrap_port,
                       counts_endpoint=w.counts_endpoint if w.counts_port is not None else None)
        return row

    async def handle_workers(self, request: web.Request) -> web.Response:
        rows = [self._row(w) for w in self.prefills + self.decoders]
        for row, load, healthy in zip(rows[len(self.prefills):], self.decode.loads(), self.decode.healthy()):
            row.update(in_flight=load, healthy=healthy)  # the Rust router's view, which routing uses
        return web.json_response({"policy": self.policy_name, "routing": self.decode.routing, "workers": rows,
                                  "centroids": self.decode.num_decoders if self.decode.has_centroids else None,
                                  "centroid_file": self._centroid_summary(),
                                  "membership_refits": self.decode.membership_refits})

    def _centroid_summary(self) -> dict | None:
        cs = self.decode.centroid_set
        if cs is None:
            return None
        return {"decoders": cs.num_workers, "layers_kept": int(cs.layer_mask.sum()), "layers": cs.geometry.layers,
                "experts": cs.geometry.experts, "fit_requests": cs.fit.num_requests,
                "created_unix": cs.fit.created_unix, "source": cs.fit.source}

    async def handle_centroids(self, request: web.Request) -> web.Response:
        """POST /centroids (body: a centroid file): validated like the file given at startup and
        swapped into the decode router atomically, loads and health kept; a file that does not
        fit is refused with a 400 and the current centroids (or none) stay."""
        if not self.decode.locality:
            return error_response(409, f"POST /centroids: policy {self.policy_name} routes by load only and takes "
                                       "no centroids; start the router with --policy eldr or eldr-static")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"POST /centroids: body larger than {self.config.max_body_bytes} bytes "
                                       "(the router's --max-body-bytes)")
        try:
            self.decode.load_centroids(centroid_file.loads(data, source="the request body"))
        except ValueError as e:  # CentroidFileError, or the Rust router refusing the arrays
            self.metrics.centroid_updates.labels("refused").inc()
            return error_response(400, f"POST /centroids: {e}; the current centroids stay")
        self._start_refit()
        self.metrics.centroid_updates.labels("loaded").inc()
        logger.warning("centroids loaded from POST /centroids: %s", self._centroid_summary())
        return web.json_response({"routing": self.decode.routing, "centroid_file": self._centroid_summary()})

    async def handle_add_worker(self, request: web.Request) -> web.Response:
        """POST /workers {"url", "role": "prefill"|"decode", "bootstrap_port"?, "counts_port"?}.
        The worker is probed once; if its /health fails it joins unhealthy and the health checks
        put it in service when it passes."""
        try:
            spec = msgspec.json.decode(await request.read(), type=WorkerSpec)
            worker = Worker(**msgspec.structs.asdict(spec.checked()))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            return error_response(400, f"POST /workers: {e}")
        if any(w.url == worker.url for w in self.prefills + self.decoders):
            return error_response(409, f"worker {worker.url} is already registered; DELETE it first")
        (status, _), = await self._fan_out("GET", "/health", [worker], timeout_s=self.config.health_timeout_s)
        if any(w.url == worker.url for w in self.prefills + self.decoders):  # added while we probed
            return error_response(409, f"worker {worker.url} is already registered; DELETE it first")
        worker.healthy = status == 200
        self._failures.pop(worker.url, None)
        if worker.role == "decode":
            self.decode.add(worker.url, healthy=worker.healthy)
            self.decoders.append(worker)
        else:
            self.prefills.append(worker)
            task = self._draining.pop(worker.counts_endpoint, None)
            if task is not None:
                task.cancel()
            await self._connect_counts(worker)
        self.metrics.membership.labels(worker.role, "added").inc()
        logger.warning("%s %s added (%s)", worker.role, worker.url, "healthy" if worker.healthy else "unhealthy")
        return web.json_response(self._row(worker), status=201)

    async def handle_remove_worker(self, request: web.Request) -> web.Response:
        """DELETE /workers/{url} (URL-encoded) or DELETE /workers?url=...: no new requests go to it;
        its requests in flight finish."""
        url = (request.match_info.get("url") or request.query.get("url") or "").rstrip("/")
        found = [w for w in self.prefills + self.decoders if w.url == url]
        if not found:
            return error_response(404, f"no worker {url!r} is registered (GET /workers lists them)")
        worker = found[0]
        pool = self.decoders if worker.role == "decode" else self.prefills
        if len(pool) == 1:
            return error_response(409, f"{worker.url} is the last {worker.role} worker; add another first")
        if worker.role == "decode":
            idx = self.decoders.index(worker)
            self.decode.remove(idx, worker.url)
            del self.decoders[idx]
        else:
            self.prefills.remove(worker)
            # Its requests in flight still wait for their counts: unsubscribe once they are done.
            task = asyncio.create_task(self._unsubscribe_when_drained(worker))
            self._draining[worker.counts_endpoint] = task
        self.metrics.membership.labels(worker.role, "removed").inc()
        logger.warning("%s %s removed (%d request(s) still in flight finish there)", worker.role, worker.url,
                       worker.in_flight)
        return web.json_response({"removed": self._row(worker)})

    async def _unsubscribe_when_drained(self, prefill: Worker) -> None:
        deadline = time.monotonic() + self.config.request_timeout_s
        while prefill.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        self._draining.pop(prefill.counts_endpoint, None)
        self.inbox.disconnect(prefill.counts_endpoint)

    async def _fan_out(self, method: str, path: str, workers: list[Worker],
                       timeout_s: float = 30.0) -> list[tuple[int, object]]:

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

    async def handle_flush_cache(self, request: web.Request) -> web.Response:
        results = await self._fan_out("POST", "/flush_cache", self.prefills + self.decoders)
        bad = [(w.url, st, body) for w, (st, body) in zip(self.prefills + self.decoders, results) if st != 200]
        if bad:
            return error_response(502, f"flush_cache failed on {bad}", "upstream_error")
        return web.json_response({"flushed": len(results)})

    async def handle_server_info(self, request: web.Request) -> web.Response:
        pre = await self._fan_out("GET", "/server_info", self.prefills)
        dec = await self._fan_out("GET", "/server_info", self.decoders)
        return web.json_response({"prefill": [b for _, b in pre], "decode": [b for _, b in dec],
                                  "router": {"policy": self.policy_name}})

    async def handle_models(self, request: web.Request) -> web.Response:
        for w in self.decoders:
            (status, body), = await self._fan_out("GET", request.path, [w])
            if status == 200:
                return web.json_response(body)
        return error_response(502, "no decoder answered " + request.path, "upstream_error")

    # ------------------------------------------------------------------ the request path
    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        path = request.path
        try:
            body, fast = await read_json(request)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.metrics.count_request(path, 400)
            return error_response(400, f"request body is not valid JSON: {e}")
        except web.HTTPRequestEntityTooLarge:
            self.metrics.count_request(path, 413)
            return error_response(413, f"request body is larger than {self.config.max_body_bytes} bytes "
                                       "(the router's --max-body-bytes)")
        problem = validate_body(path, body, check_fields=not self.config.allow_unknown_fields)
        if problem:
            self.metrics.count_request(path, 400)
            return error_response(400, problem)
        assert isinstance(body, dict)  # validate_body refuses anything else
        try:
            response = await self._serve(request, path, body, fast, started)
        except UpstreamError as e:
            self.metrics.count_request(path, e.status)
            return error_response(e.status, e.message, "upstream_error")
        self.metrics.count_request(path, response.status)
        return response

    def _pick_prefill(self, body: dict) -> Worker:
        try:
            i = self.prefill_picker.pick(
                prompt_key(body), [p.in_flight for p in self.prefills], [p.healthy for p in self.prefills],
                [p.url for p in self.prefills],
            )
        except LookupError as e:
            raise UpstreamError(503, str(e)) from None
        return self.prefills[i]

    async def _serve(self, request: web.Request, path: str, body: dict, fast: bool,
                     started: float) -> web.StreamResponse:
        prefill = self._pick_prefill(body)
        room = secrets.randbits(63)
        want_counts = body.get(COUNTS_FIELD) is True
        pd_body = {k: v for k, v in body.items() if k != COUNTS_FIELD}
        pd_body.update(bootstrap_host=prefill.host, bootstrap_port=prefill.bootstrap_port, bootstrap_room=room)
        pd_data = dumps_json(pd_body, fast)  # encoded once, for the prefill and the decoder
        counts_future = self.inbox.expect(room)
        prefill.in_flight += 1
        prefill_task = asyncio.create_task(self._call_prefill(prefill, path, pd_data))
        self._background.add(prefill_task)
        prefill_task.add_done_callback(self._background.discard)
        try:
            if prefill.counts_port is None:  # it advertised no counts endpoint (yet): nothing to wait for
                counts, fallback = None, "no-counts-endpoint"
            else:
                counts, fallback = await self._await_counts(counts_future, prefill_task)
            stream = bool(body.get("stream", False))
            extra = counts_meta(counts) if want_counts and counts is not None else {}
            for attempt in range(self.config.decode_attempts):
                decoder, route = self._route(prefill, counts, fallback, room)
                try:
                    if stream:
                        return await self._stream_decode(request, decoder, path, pd_data, route, prefill_task)
                    return await self._unary_decode(decoder, path, pd_data, route, prefill_task, extra)
                except DecoderUnreachable as e:
                    # Nothing reached the decoder, and the prefill still holds the KV for this room:
                    # another decoder can bootstrap it. Open the breaker on this one and retry.
                    logger.warning("decoder %s unreachable (%s); re-routing room %d", decoder.url, e, room)
                    self._mark(decoder, healthy=False)
                    fallback = "decoder-unreachable"
                    if attempt + 1 == self.config.decode_attempts or not any(self.decode.healthy()):
                        prefill_task.cancel()
                        raise UpstreamError(502, f"no reachable decoder for this request (last: {decoder.url}: {e})") from None
                finally:
                    self._release(decoder)
            raise AssertionError("unreachable")
        except ValueError as e:  # the Rust router refused (e.g. all decoders unhealthy)
            prefill_task.cancel()
            raise UpstreamError(503, str(e)) from None
        finally:
            self.inbox.forget(room)
            # The prefill response arrives after the KV transfer; let it finish in the background
            # (its in-flight count drops then). A failed decode has cancelled it already.
            prefill_task.add_done_callback(functools.partial(_dec, prefill))
            self.metrics.request_seconds.observe(time.perf_counter() - started)

    def _route(self, prefill: Worker, counts: np.ndarray | None, fallback: str | None, room: int) -> tuple[Worker, dict]:
        """One Rust-router decision (counts the request in flight) and its receipt."""
        route_started = time.perf_counter()
        try:
            receipt = self.decode.choose(counts)
        except ValueError as e:
            if counts is None:
                raise
            logger.warning("room %d: counts rejected by the router (%s); routing least-loaded", room, e)
            fallback = "bad-counts"
            receipt = self.decode.choose(None)
        self.metrics.route_seconds.observe(time.perf_counter() - route_started)
        locality = self.decode.has_centroids
        if self.decode.locality and not locality and fallback != "decoder-unreachable":
            fallback = "no-centroids"  # whatever the counts did: there is nothing to compare them to yet
        elif fallback is None and locality and receipt["scores"] is None:
            fallback = "zero-signature"
        if fallback is not None:
            self.metrics.count_fallback(fallback)
        decoder = self.decoders[receipt["worker"]]
        decoder.in_flight += 1
        self.metrics.count_routed(decoder.url)
        route = RouteReceipt(
            policy=self.policy_name, prefill=prefill.url, decoder=decoder.url, loads=receipt["loads"],
            fallback=fallback, scores=receipt["scores"] if locality else None,
            band=receipt["band"] if locality else None,
        )
        return decoder, msgspec.to_builtins(route)

    def _release(self, decoder: Worker) -> None:
        """Ends one request on `decoder`; if it was removed meanwhile, only its own count drops.
        (The in-flight gauge is read from the router when /metrics is scraped, not here.)"""
        decoder.in_flight -= 1
        try:
            idx = self.decoders.index(decoder)
        except ValueError:
            return  # removed: the router no longer counts it
        self.decode.release(idx)

    def _show_loads(self) -> None:
        self.metrics.set_in_flight({d.url: l for d, l in zip(self.decoders, self.decode.loads())})

    def _request_failed(self, decoder: Worker) -> None:
        """A request broke on this decoder after it was accepted: counts toward its breaker like a
        failed health check (a passing check resets the count)."""
        self._failures[decoder.url] = self._failures.get(decoder.url, 0) + 1
        if self._failures[decoder.url] >= self.config.health_failures:
            self._mark(decoder, healthy=False)

    def _mark(self, decoder: Worker, healthy: bool) -> None:
        if decoder in self.decoders:
            self.mark_decoder(self.decoders.index(decoder), healthy)

    def mark_decoder(self, idx: int, healthy: bool) -> None:
        if self.decode.healthy()[idx] != healthy:
            logger.warning("decoder %s marked %s", self.decoders[idx].url, "healthy" if healthy else "unhealthy")
        self.decode.set_healthy(idx, healthy)
        self.decoders[idx].healthy = healthy

    async def _await_counts(self, counts_future: asyncio.Future, prefill_task: asyncio.Task):
        await first_done((counts_future, prefill_task), self.config.counts_deadline_s)
        if counts_future.done():
            report = counts_future.result()
            if report.unavailable is not None:
                logger.info("prefill has no counts for room %d: %s", report.room, report.unavailable)
                return None, "counts-unavailable"
            try:
                return report.array(), None
            except ValueError as e:
                logger.warning("malformed counts report: %s", e)
                return None, "bad-counts"
        if prefill_task.done():
            status, text = prefill_task.result()
            if status != 200:
                raise UpstreamError(502 if status >= 500 else status, f"prefill server failed ({status}): {text[:500]}")
            error = stream_error(text)
            if error is not None:  # SGLang reports a refused streaming request inside a 200 stream
                raise UpstreamError(*error)
            # Prefill answered without publishing counts (capture off on that server).
            return None, "no-counts"
        return None, "counts-timeout"

    async def _call_prefill(self, prefill: Worker, path: str, body: bytes) -> tuple[int, str]:
        try:
            async with self.session.post(prefill.url + path, data=body, headers=JSON_HEADERS) as resp:
                text = await resp.text()
                return resp.status, text
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return 599, f"{type(e).__name__}: {e}"

    async def _watch_prefill(self, decode_call, prefill_task: asyncio.Task):
        """Runs the decode call; if the prefill call fails meanwhile, the decoder can never get the KV
        (SGLang would keep its request queued), so give it `orphan_grace_s` and then abort it."""
        task = asyncio.ensure_future(decode_call)
        try:
            await first_done((task, prefill_task))
            if not task.done() and not prefill_task.cancelled() and prefill_task.result()[0] != 200:
                status, text = prefill_task.result()
                # asyncio.wait, not wait_for: a timeout of the decode call itself must surface as the
                # decoder's failure, not be taken for the end of the grace period.
                done, _ = await asyncio.wait({task}, timeout=self.config.orphan_grace_s)
                if task not in done:
                    raise UpstreamError(502, f"prefill server failed ({status}) before the KV transfer: "
                                             f"{text[:300]}")
            return await task
        finally:
            if not task.done():
                task.cancel()

    async def _unary_decode(self, decoder: Worker, path: str, body: bytes, route: dict,
                            prefill_task: asyncio.Task, extra_meta: dict) -> web.Response:

        async def call() -> tuple[int, bytes]:
            async with self.session.post(decoder.url + path, data=body, headers=JSON_HEADERS) as resp:
                return resp.status, await resp.read()

        try:
            status, raw = await self._watch_prefill(call(), prefill_task)
        except aiohttp.ClientConnectorError as e:
            raise DecoderUnreachable(str(e)) from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            prefill_task.cancel()
            self._request_failed(decoder)
            raise UpstreamError(502, f"decode server {decoder.url} failed: {type(e).__name__}: {e}") from None
        try:
            payload, fast = loads_json(raw)
        except ValueError:
            prefill_task.cancel()
            raise UpstreamError(502, f"decode server {decoder.url} returned non-JSON ({status}): {raw[:300]!r}") from None
        if status != 200:
            prefill_task.cancel()
        attach_receipt(payload, route, path)
        if extra_meta and isinstance(payload, dict) and isinstance(payload.get("meta_info"), dict):
            payload["meta_info"].update(extra_meta)
        # The receipt and counts added are plain JSON types with finite floats, as msgspec writes them.
        return json_body_response(dumps_json(payload, fast), status=status, headers={"X-ELDR-Route": json.dumps(route)})

    async def _stream_decode(self, request: web.Request, decoder: Worker, path: str, body: bytes, route: dict,
                             prefill_task: asyncio.Task) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                          "X-ELDR-Route": json.dumps(route)})
        async def pump() -> None:
            async with self.session.post(decoder.url + path, data=body, headers=JSON_HEADERS) as resp:
                if resp.status != 200:
                    prefill_task.cancel()
                    text = await resp.text()
                    raise UpstreamError(resp.status, f"decode server {decoder.url} failed ({resp.status}): {text[:500]}")
                await out.prepare(request)
                async for line in resp.content:
                    if line.startswith(b"data:") and path == "/generate":
                        line = inject_stream_receipt(line, route)
                    await out.write(line)

        try:
            await self._watch_prefill(pump(), prefill_task)
        except UpstreamError as e:
            if not out.prepared:
                raise
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(f"data: {json.dumps({'error': {'message': e.message, 'type': 'upstream_error', 'code': e.status}})}\n\n".encode())
        except aiohttp.ClientConnectorError as e:
            raise DecoderUnreachable(str(e)) from None
        except ConnectionResetError:
            # The client went away: leaving the `async with` closed the decoder connection, which
            # makes SGLang abort the request; the caller's `finally` releases its load.
            prefill_task.cancel()
            return out
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            prefill_task.cancel()
            self._request_failed(decoder)
            if not out.prepared:
                raise UpstreamError(502, f"decode server {decoder.url} failed: {type(e).__name__}: {e}") from None
            error = {"error": {"message": f"decode server {decoder.url} failed mid-stream: {type(e).__name__}: {e}",
                               "type": "upstream_error", "code": 502}}
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(f"data: {json.dumps(error)}\n\n".encode())
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write_eof()
        return out


def stream_error(text: str) -> tuple[int, str] | None:
    """(status, message) of the first error event in an SSE body, if it has one."""
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("error"), dict):
            err = event["error"]
            code = err.get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 502
            return status, f"prefill server refused the request: {err.get('message', err)}"
    return None


def _dec(worker: Worker, _task: object = None) -> None:
    worker.in_flight = max(0, worker.in_flight - 1)


def attach_receipt(payload: object, route: dict, path: str) -> None:
    if not isinstance(payload, dict):
        return
    if path == "/generate":
        meta = payload.get("meta_info")
        if isinstance(meta, dict):
            meta["eldr_route"] = route
            return
    payload["eldr_route"] = route


def inject_stream_receipt(line: bytes, route: dict) -> bytes:
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return line
    try:
        chunk = json.loads(data)
    except ValueError:
        return line
    attach_receipt(chunk, route, "/generate")
    return b"data: " + json.dumps(chunk).encode() + b"\n"


