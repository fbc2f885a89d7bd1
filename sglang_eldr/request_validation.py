"""Request validation at the router, before any server work: the body's shape per endpoint, fields
the installed SGLang does not define, one choice per request, and the bootstrap fields the router
owns. Each check returns the problem as a client-facing message (HTTP 400), or None."""

from __future__ import annotations

from sglang_eldr.request_fields import known_fields, unknown_field
from sglang_eldr.wire import REQUEST_FIELD


def validate_body(path: str, body: object, check_fields: bool = True) -> str | None:
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if check_fields:
        unknown = unknown_field(path, body, frozenset({REQUEST_FIELD}))
        if unknown is not None:
            return (f"unknown field {unknown!r} for {path} (not a field of SGLang {known_fields().sglang_version}'s "
                    "request; the router's --allow-unknown-fields passes such fields on)")
    if path == "/generate":
        has = [k for k in ("text", "input_ids") if body.get(k) is not None]
        if not has:
            return "/generate needs 'text' or 'input_ids'"
        v = body[has[0]]
        if has[0] == "text" and not isinstance(v, str):
            return "'text' must be a string (batched requests are not supported through the PD router; send one request per prompt)"
        if has[0] == "input_ids" and not (isinstance(v, list) and all(isinstance(t, int) for t in v)):
            return "'input_ids' must be a flat list of integers (one request per call)"
    elif path == "/v1/completions":
        if not isinstance(body.get("prompt"), str):
            return "'prompt' must be a string (one prompt per request through the PD router)"
    elif path == "/v1/chat/completions":
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return "'messages' must be a non-empty list"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be a boolean"
    problem = single_choice_problem(path, body)
    if problem:
        return problem
    for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        if k in body:
            return f"'{k}' is set by the router; do not send it"
    return None


def single_choice_problem(path: str, body: dict) -> str | None:
    """Why `body` asks for more than one choice, or None. SGLang expands n > 1 into n requests that
    share the one bootstrap room the router gave, so the decode handshake fails (a 500): refuse it."""
    if path == "/generate":
        params = body.get("sampling_params")
        where, fields = "sampling_params.", params if isinstance(params, dict) else {}
    else:
        where, fields = "", body
    for name in ("n", "best_of"):
        v = fields.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"'{where}{name}' must be a positive integer, got {v!r}"
        if v > 1:
            return (f"'{where}{name}' = {v}: the PD router serves one choice per request; send {v} requests "
                    f"(the prefix cache makes the repeated prefill cheap) or leave '{name}' at 1")
    return None
