"""Top-level request fields SGLang accepts on each generate endpoint, so the router can refuse an
unknown one with a 400 (SGLang itself ignores unknown top-level fields, which hides typos).

The sets are read from a JSON file written from the installed SGLang, so the router never imports
SGLang (and torch): `python -m sglang_eldr.request_fields` rewrites it; a test checks that it
matches the installed version."""

from __future__ import annotations

import dataclasses
import sys
from functools import cache
from pathlib import Path

import msgspec

FIELDS_FILE = Path(__file__).with_name("request_fields.json")


class RequestFields(msgspec.Struct, frozen=True):
    sglang_version: str
    endpoints: dict[str, list[str]]


@cache
def known_fields() -> RequestFields:
    return msgspec.json.decode(FIELDS_FILE.read_bytes(), type=RequestFields)


@cache
def _allowed(path: str) -> frozenset[str] | None:
    names = known_fields().endpoints.get(path)
    return frozenset(names) if names is not None else None


def unknown_field(path: str, body: dict, extra: frozenset[str] = frozenset()) -> str | None:
    """The first field of `body` the endpoint does not know, or None."""
    allowed = _allowed(path)
    if allowed is None:
        return None
    return next((k for k in body if k not in allowed and k not in extra), None)


def from_installed_sglang() -> RequestFields:
    import sglang
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    from sglang.srt.managers.io_struct import GenerateReqInput

    return RequestFields(
        sglang_version=sglang.__version__,
        endpoints={
            "/generate": sorted(f.name for f in dataclasses.fields(GenerateReqInput)),
            "/v1/completions": sorted(CompletionRequest.model_fields),
            "/v1/chat/completions": sorted(ChatCompletionRequest.model_fields),
        },
    )


def main() -> int:
    FIELDS_FILE.write_bytes(msgspec.json.format(msgspec.json.encode(from_installed_sglang())) + b"\n")
    print(f"wrote {FIELDS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
