"""The request path: prefill first, decoder chosen from the prefill's expert counts.

Protocol (docs/protocol.md has the full design):
1. Pick a prefill worker (prefix-hash with a load gate, or rr); give the request a bootstrap
   room and POST it to the prefill server only. Prefill servers run with
   `--disaggregation-decode-allocation-policy prefill_complete`, so prefill computes at once and
   holds the request's KV until a decoder bootstraps for that room (SGLang's bootstrap timeout
   frees it if none ever does).
2. The ELDR plugin on the prefill server publishes the prompt's expert counts over ZMQ as soon
   as the prefill forward ends; the counts inbox settles the future for that room (with the
   report, or with a fallback reason: lost, or past the deadline counted from the prefill's start).
3. One Rust-router decision picks the decoder (JSQ fallback without usable counts); the same
   request, same room, goes to that decoder, which pulls the KV from the prefill server and
   decodes. Its response is returned with a route receipt.
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

import aiohttp
import msgspec
import numpy as np
from aiohttp import web

from sglang_eldr.decode_policy import DecodeChooser
from sglang_eldr.early_stream import SSE_HEADERS, EarlyStream, ask_early, early_eligible, encode_chunk, parse_chunk
from sglang_eldr.fleet import Fleet, LBConfig, Pool, StatusError, Worker
from sglang_eldr.jsonio import JSON_HEADERS, dumps_json, json_body_response, loads_json
from sglang_eldr.metrics import RouterMetrics
from sglang_eldr.prefill_policy import PrefillPicker, prompt_key
from sglang_eldr.wire import REQUEST_FIELD, RouteReceipt, counts_meta

logger = logging.getLogger(__name__)

COUNTS_FIELD = REQUEST_FIELD


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


class DecoderUnreachable(Exception):
    """The decoder could not be connected to: the request never reached it."""


class UpstreamError(StatusError):
    """No response from the servers for this request: the web app answers `status` (an upstream_error)."""


class Dispatcher:
    """Serves one validated generate request: prefill call, counts, decoder choice, decode call."""

    def __init__(self, fleet: Fleet, decode: DecodeChooser, prefill_picker: PrefillPicker,
                 metrics: RouterMetrics, config: LBConfig, policy_name: str):
        self.fleet = fleet
        self.decode = decode
        self.prefill_picker = prefill_picker
        self.metrics = metrics
        self.config = config
        self.policy_name = policy_name
        self._background: set[asyncio.Task] = set()

    async def stop(self) -> None:
        """Cancels the prefill calls still running in the background and waits for them to end."""
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _pick_prefill(self, body: dict) -> Worker:
        pool = self.fleet.prefills
        prefills = pool.workers
        try:
            i = self.prefill_picker.pick(prompt_key(body), pool.loads(), pool.healthy(), [p.url for p in prefills])
        except LookupError as e:
            raise UpstreamError(503, str(e)) from None
        return prefills[i]

    async def serve(self, request: web.Request, path: str, body: dict, fast: bool,
                    started: float) -> web.StreamResponse:
        """The response to a validated request body (`fast`: how it was decoded, see jsonio);
        UpstreamError where no response came from the servers."""
        prefill = self._pick_prefill(body)
        room = secrets.randbits(63)
        want_counts = body.get(COUNTS_FIELD) is True
        stream = bool(body.get("stream", False))
        pd_body = {k: v for k, v in body.items() if k != COUNTS_FIELD}
        pd_body.update(bootstrap_host=prefill.host, bootstrap_port=prefill.bootstrap_port, bootstrap_room=room)
        early = None
        if stream and self.config.early_first_token and early_eligible(path, body):
            early = EarlyStream(request, chat=path == "/v1/chat/completions")
            ask_early(pd_body)
        pd_data = dumps_json(pd_body, fast)  # encoded once, for the prefill and the decoder
        counts_future = (self.fleet.inbox.expect(room, prefill.counts_endpoint)
                         if prefill.counts_port is not None else None)
        sent = time.perf_counter()
        self.fleet.prefills.hold(prefill)
        prefill_task = asyncio.create_task(self._call_prefill(prefill, path, pd_data, early))
        self._background.add(prefill_task)
        prefill_task.add_done_callback(self._background.discard)
        try:
            tokens = None
            if counts_future is None:  # it advertised no counts endpoint (yet): nothing to wait for
                counts, fallback = None, "no-counts-endpoint"
            else:
                counts, fallback, tokens = await self._await_counts(counts_future, prefill_task)
            wait_ms = round((time.perf_counter() - sent) * 1e3, 3)
            extra = counts_meta(counts) if want_counts and counts is not None else {}
            for attempt in range(self.config.decode_attempts):
                decoder, route, ticket = self._route(prefill, counts, tokens, fallback, room, wait_ms)
                if stream:
                    route["first_token"] = "off" if not self.config.early_first_token else "decoder"
                try:
                    if stream:
                        return await self._stream_decode(request, decoder, path, pd_data, route, prefill_task, early)
                    return await self._unary_decode(decoder, path, pd_data, route, prefill_task, extra)
                except DecoderUnreachable as e:
                    # Nothing reached the decoder, and the prefill still holds the KV for this room:
                    # another decoder can bootstrap it. Open the breaker on this one and retry.
                    logger.warning("decoder %s unreachable (%s); re-routing room %d", decoder.url, e, room)
                    self.fleet.decoders.set_healthy(decoder, False)
                    fallback = "decoder-unreachable"
                    if attempt + 1 == self.config.decode_attempts or not any(self.fleet.decoders.healthy()):
                        prefill_task.cancel()
                        raise UpstreamError(502, f"no reachable decoder for this request (last: {decoder.url}: {e})") from None
                finally:
                    self.fleet.decoders.release(decoder, ticket)
            raise AssertionError("unreachable")
        except ValueError as e:  # the Rust router refused (e.g. all decoders unhealthy)
            prefill_task.cancel()
            return await _end_early(early, UpstreamError(503, str(e)))
        except UpstreamError as e:
            return await _end_early(early, e)
        finally:
            self.fleet.inbox.forget(room)
            # The prefill response arrives after the KV transfer; let it finish in the background
            # (its in-flight count drops then). A failed decode has cancelled it already.
            prefill_task.add_done_callback(functools.partial(_release, self.fleet.prefills, prefill))
            self.metrics.request_seconds.observe(time.perf_counter() - started)

    def _route(self, prefill: Worker, counts: np.ndarray | None, prompt_tokens: int | None, fallback: str | None,
               room: int, wait_ms: float) -> tuple[Worker, dict, int | None]:
        """One Rust-router decision (counts the request in flight), its receipt, and the ticket its
        release hands back (marginal policy; None for the others)."""
        route_started = time.perf_counter()
        try:
            receipt = self.decode.choose(counts, prompt_tokens)
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
        decoder = self.fleet.decoders.by_id(receipt["id"])
        self.metrics.count_routed(decoder.url)
        route = RouteReceipt(
            policy=self.policy_name, prefill=prefill.url, decoder=decoder.url, loads=receipt["loads"],
            room=room, counts_wait_ms=wait_ms, fallback=fallback, scores=receipt["scores"] if locality else None,
            score_error=receipt["score_error"] if locality else None, band=receipt["band"] if locality else None,
            costs=receipt["costs"],
        )
        return decoder, msgspec.to_builtins(route), receipt["ticket"]

    async def _await_counts(self, counts_future: asyncio.Future, prefill_task: asyncio.Task):
        """(counts, fallback reason, prompt tokens); the inbox owns the deadline and the loss detection."""
        await first_done((counts_future, prefill_task))
        if counts_future.done():
            report = counts_future.result()
            if isinstance(report, str):
                logger.info("routing without counts: %s", report)
                return None, report, None
            if report.unavailable is not None:
                logger.info("prefill has no counts for room %d: %s", report.room, report.unavailable)
                return None, "counts-unavailable", None
            try:
                return report.array(), None, report.prompt_tokens
            except ValueError as e:
                logger.warning("malformed counts report: %s", e)
                return None, "bad-counts", None
        if prefill_task.done():
            status, text = prefill_task.result()
            if status != 200:
                raise UpstreamError(502 if status >= 500 else status, f"prefill server failed ({status}): {text[:500]}")
            error = stream_error(text)
            if error is not None:  # SGLang reports a refused streaming request inside a 200 stream
                raise UpstreamError(*error)
            # Prefill answered without publishing counts (capture off on that server).
            return None, "no-counts", None
        raise AssertionError("first_done returned with nothing done")

    async def _call_prefill(self, prefill: Worker, path: str, body: bytes,
                            early: EarlyStream | None = None) -> tuple[int, str]:
        try:
            async with self.fleet.session.post(prefill.url + path, data=body, headers=JSON_HEADERS) as resp:
                if early is None or resp.status != 200:
                    return resp.status, await resp.text()
                lines = []
                async for line in resp.content:
                    lines.append(line)
                    await early.from_prefill(line)
                return resp.status, b"".join(lines).decode("utf-8", errors="replace")
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
            async with self.fleet.session.post(decoder.url + path, data=body, headers=JSON_HEADERS) as resp:
                return resp.status, await resp.read()

        try:
            status, raw = await self._watch_prefill(call(), prefill_task)
        except aiohttp.ClientConnectorError as e:
            raise DecoderUnreachable(str(e)) from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            prefill_task.cancel()
            self.fleet.request_failed(decoder)
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
                             prefill_task: asyncio.Task, early: EarlyStream | None) -> web.StreamResponse:
        out = early.out if early is not None else web.StreamResponse(headers=SSE_HEADERS)

        async def pump() -> None:
            async with self.fleet.session.post(decoder.url + path, data=body, headers=JSON_HEADERS) as resp:
                if resp.status != 200:
                    prefill_task.cancel()
                    text = await resp.text()
                    raise UpstreamError(resp.status, f"decode server {decoder.url} failed ({resp.status}): {text[:500]}")
                if early is None:
                    self.metrics.count_first_token(route["first_token"])
                    out.headers["X-ELDR-Route"] = json.dumps(route)
                    await out.prepare(request)
                    async for line in resp.content:
                        if line.startswith(b"data:") and path == "/generate":
                            line = inject_stream_receipt(line, route)
                        await out.write(line)
                    return
                await self._continue_early(request, early, resp, route)

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
            self.fleet.request_failed(decoder)
            if not out.prepared:
                raise UpstreamError(502, f"decode server {decoder.url} failed: {type(e).__name__}: {e}") from None
            error = {"error": {"message": f"decode server {decoder.url} failed mid-stream: {type(e).__name__}: {e}",
                               "type": "upstream_error", "code": 502}}
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(f"data: {json.dumps(error)}\n\n".encode())
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write_eof()
        return out


    async def _continue_early(self, request: web.Request, early: EarlyStream, resp: aiohttp.ClientResponse,
                              route: dict) -> None:
        """The decoder's stream after what the prefill sent: from its first line on the prefill's chunks
        stop, its repeats of them are dropped, and its first chunk sent carries the receipt."""
        out = early.out
        receipt_sent = started = False
        skip_blank = False
        async for line in resp.content:
            if not started:
                started = True
                async with early.lock:
                    early.take_over()
                route["first_token"] = early.source
                self.metrics.count_first_token(early.source)
                if not out.prepared:
                    out.headers["X-ELDR-Route"] = json.dumps(route)
                    await out.prepare(request)
            if skip_blank and line.strip() == b"":
                skip_blank = False
                continue
            skip_blank = False
            if (early.pending or not receipt_sent) and line.startswith(b"data:"):
                chunk = parse_chunk(line)
                if chunk is not None:
                    if early.pending and not early.dedup(chunk, route["room"]):
                        skip_blank = True
                        continue
                    if early.mismatch and route["first_token"] != "mismatch":
                        route["first_token"] = "mismatch"
                        self.metrics.count_first_token("mismatch")
                    if not receipt_sent:
                        chunk["eldr_route"] = route
                        receipt_sent = True
                    line = encode_chunk(chunk)
            await out.write(line)


async def _end_early(early: EarlyStream | None, e: UpstreamError) -> web.StreamResponse:
    """Raises `e`, unless the client already has the prefill's first chunks: then the error is the
    stream's last event (as for a decoder failing mid-stream)."""
    if early is None or not early.out.prepared:
        raise e
    async with early.lock:
        early.take_over()
    with contextlib.suppress(ConnectionError, RuntimeError):
        error = {"error": {"message": e.message, "type": "upstream_error", "code": e.status}}
        await early.out.write(f"data: {json.dumps(error)}\n\n".encode())
        await early.out.write_eof()
    return early.out


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


def _release(pool: Pool, worker: Worker, _task: object = None) -> None:
    pool.release(worker)


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
    chunk = parse_chunk(line)
    if chunk is None:
        return line
    attach_receipt(chunk, route, "/generate")
    return b"data: " + json.dumps(chunk).encode() + b"\n"
