"""JSON bodies on the router's request path: msgspec where it gives exactly what the stdlib `json`
gives (several times faster), the stdlib otherwise, so every input the fast path does not take,
and every error, is what `json` makes of it."""

from __future__ import annotations

import json

import msgspec
from aiohttp import web

JSON_HEADERS = {"Content-Type": "application/json"}
_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


def loads_json(data: bytes) -> tuple[object, bool]:
    """`(json.loads(data), fast)`, decoded by msgspec where it accepts the input (UTF-8 JSON without
    NaN/Infinity or lone surrogates: it then gives exactly what json.loads gives, several times
    faster) and by json.loads itself otherwise, so every other input, and every error, is what
    json.loads makes of it. `fast`: msgspec decoded it, so `dumps_json` may write it with msgspec."""
    try:
        return _DECODER.decode(data), True
    except (msgspec.DecodeError, ValueError):  # ValueError: UnicodeDecodeError
        return json.loads(data), False


def dumps_json(value: object, fast: bool) -> bytes:
    """`value` as JSON: msgspec for what `loads_json` decoded fast (plain JSON types, finite floats:
    lossless), json.dumps (which writes NaN/Infinity back as json.loads read them) otherwise."""
    return _ENCODER.encode(value) if fast else json.dumps(value).encode()


def json_body_response(body: bytes, status: int = 200, headers: dict | None = None) -> web.Response:
    """What web.json_response sends (status, headers, `application/json; charset=utf-8`), for a body
    already encoded."""
    return web.Response(body=body, status=status, headers=headers, content_type="application/json", charset="utf-8")


async def read_json(request: web.Request) -> tuple[object, bool]:
    """The body as `request.json(loads=json.loads)` reads it, and `loads_json`'s `fast`; raises what
    that raises (JSONDecodeError, UnicodeDecodeError, HTTPRequestEntityTooLarge)."""
    data = await request.read()
    if request.charset is None or request.charset.lower() in ("utf-8", "utf8"):
        return loads_json(data)
    return json.loads(await request.text()), False
