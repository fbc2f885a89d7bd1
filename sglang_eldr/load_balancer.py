"""The PD load balancer's web app: the aiohttp application, its route table and lifecycle, and
thin HTTP handlers over the fleet (`fleet.py`: membership, health, circuit breaker, counts
endpoints) and the request path (`dispatch.py`: prefill first, decoder chosen from the prefill's
expert counts; its docstring describes the protocol)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import msgspec
from aiohttp import web

from sglang_eldr import centroids as centroid_file
from sglang_eldr.decode_policy import DecodeChooser
from sglang_eldr.dispatch import Dispatcher, UpstreamError
from sglang_eldr.fleet import Fleet, LBConfig, MembershipError, Worker
from sglang_eldr.jsonio import read_json
from sglang_eldr.metrics import RouterMetrics
from sglang_eldr.prefill_policy import PrefillPicker
from sglang_eldr.request_validation import validate_body
from sglang_eldr.wire import WorkerSpec

logger = logging.getLogger(__name__)

GENERATE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class LoadBalancer:
    def __init__(self, prefills: list[Worker], decoders: list[Worker], decode: DecodeChooser,
                 prefill_picker: PrefillPicker, config: LBConfig | None = None, policy_name: str = ""):
        """`decoders` in the order of `decode`'s router members (their URLs are its keys)."""
        self.decode = decode
        self.prefill_picker = prefill_picker
        self.config = config or LBConfig()
        self.metrics = RouterMetrics([d.url for d in decoders])
        self.policy_name = policy_name or decode.policy
        self.fleet = Fleet(prefills, decoders, decode, self.metrics, self.config)
        self.prefills, self.decoders = self.fleet.prefills, self.fleet.decoders
        self.dispatch = Dispatcher(self.fleet, self.decode, self.prefill_picker, self.metrics, self.config,
                                   self.policy_name)
        self._refit_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, app: web.Application) -> None:
        await self.fleet.start()
        self._start_refit()

    def _start_refit(self) -> None:
        """The refits (after membership changes; periodically with eldr), once centroids are loaded."""
        if self.decode.refitter is not None and self._refit_task is None:
            self._refit_task = asyncio.create_task(self.decode.refitter.run(), name="eldr-refit")

    async def stop(self, app: web.Application) -> None:
        if self._refit_task is not None:
            self._refit_task.cancel()
        if self.decode.refitter is not None:
            self.decode.refitter.close()
        self.fleet.cancel_tasks()
        await self.dispatch.stop()
        await self.fleet.close()

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

    # ------------------------------------------------------------------ small endpoints
    async def handle_health(self, request: web.Request) -> web.Response:
        ok = self.fleet.available()
        return web.json_response({"status": "ok" if ok else "unavailable", "routing": self.decode.routing},
                                 status=200 if ok else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        self.metrics.set_in_flight({d.url: l for d, l in zip(self.decoders.workers, self.decoders.loads())})
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _row(self, w: Worker) -> dict:
        """A worker as the router sees it (`healthy` is None once it was removed)."""
        pool = self.fleet.pool(w)
        member = pool.members().get(w.id) if w in pool else None
        row = {"url": w.url, "role": w.role, "healthy": member["healthy"] if member else None,
               "in_flight": pool.in_flight(w), "failures": member["failures"] if member else None}
        if w.role == "prefill":
            row.update(bootstrap_port=w.bootstrap_port,
                       counts_endpoint=w.counts_endpoint if w.counts_port is not None else None)
        return row

    async def handle_workers(self, request: web.Request) -> web.Response:
        rows = [self._row(w) for w in self.fleet.workers]
        expected = self.decode.router.expected_distinct()  # marginal: per decoder, in member order
        if expected is not None:
            by_url = {w.url: e for w, e in zip(self.decoders.workers, expected)}
            for row in rows:
                if row["role"] == "decode" and row["url"] in by_url:
                    row["expected_distinct_pairs"] = round(by_url[row["url"]], 3)
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
        try:
            await self.fleet.add(worker)
        except MembershipError as e:
            return error_response(e.status, e.message)
        return web.json_response(self._row(worker), status=201)

    async def handle_remove_worker(self, request: web.Request) -> web.Response:
        """DELETE /workers/{url} (URL-encoded) or DELETE /workers?url=...: no new requests go to it;
        its requests in flight finish."""
        url = (request.match_info.get("url") or request.query.get("url") or "").rstrip("/")
        try:
            worker = self.fleet.remove(url)
        except MembershipError as e:
            return error_response(e.status, e.message)
        return web.json_response({"removed": self._row(worker)})

    async def handle_flush_cache(self, request: web.Request) -> web.Response:
        results = await self.fleet.fan_out("POST", "/flush_cache", self.fleet.workers)
        bad = [(w.url, st, body) for w, (st, body) in zip(self.fleet.workers, results) if st != 200]
        if bad:
            return error_response(502, f"flush_cache failed on {bad}", "upstream_error")
        return web.json_response({"flushed": len(results)})

    async def handle_server_info(self, request: web.Request) -> web.Response:
        pre = await self.fleet.fan_out("GET", "/server_info", self.prefills.workers)
        dec = await self.fleet.fan_out("GET", "/server_info", self.decoders.workers)
        return web.json_response({"prefill": [b for _, b in pre], "decode": [b for _, b in dec],
                                  "router": {"policy": self.policy_name}})

    async def handle_models(self, request: web.Request) -> web.Response:
        for w in self.decoders:
            (status, body), = await self.fleet.fan_out("GET", request.path, [w])
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
            response = await self.dispatch.serve(request, path, body, fast, started)
        except UpstreamError as e:
            self.metrics.count_request(path, e.status)
            return error_response(e.status, e.message, "upstream_error")
        self.metrics.count_request(path, response.status)
        return response
