"""Tokenizer-manager hooks: the ``return_eldr_counts`` request field and the ``meta_info`` keys.

``/generate`` parses its body into SGLang's ``GenerateReqInput``, which drops fields it does not know. The
AROUND hook on ``TokenizerManager.generate_request`` reads the flag from the raw JSON body (Starlette
caches the body that ``/generate`` already parsed) and forwards it to the scheduler inside
``sampling_params.custom_params`` (a JSON dict that SGLang carries to the scheduler's ``Req`` untouched;
Python ``Engine`` users can set ``custom_params={"return_eldr_counts": True}`` themselves). A request that
asks for counts when they cannot be produced (capture off, dense model) fails with HTTP 400.

The scheduler sends the counts back through SGLang's ``customized_info`` channel; the AROUND hook on
``TokenizerManager.update_request_meta_info`` places them in ``meta_info`` as a string and a shape
instead of SGLang's default per-token list accumulation.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_eldr.wire import META_KEY, META_SHAPE_KEY, REQUEST_FIELD
from sglang_eldr.engine.moe_shape import moe_shape_from_hf_config
from sglang_eldr.engine.settings import EldrSettings

logger = logging.getLogger(__name__)

T_GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
T_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"

_SETTINGS: Optional[EldrSettings] = None
_OUR_KEYS = (META_KEY, META_SHAPE_KEY)


class EldrRequestError(ValueError):
    """A request asked for ELDR counts that this server cannot produce (HTTP 400)."""

    status_code = 400


async def _raw_flag(request) -> Any:
    if request is None:
        return None
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - not a JSON body (e.g. an OpenAI route with its own parser)
        return None
    return body.get(REQUEST_FIELD) if isinstance(body, dict) else None


def _custom_flag(obj) -> Optional[bool]:
    sp = getattr(obj, "sampling_params", None)
    for d in (sp if isinstance(sp, list) else [sp]):
        cp = d.get("custom_params") if isinstance(d, dict) else None
        if isinstance(cp, dict) and cp.get(REQUEST_FIELD) is True:
            return True
    return None


def _inject(obj) -> None:
    sp = obj.sampling_params
    if sp is None:
        obj.sampling_params = sp = {}
    for d in (sp if isinstance(sp, list) else [sp]):
        cp = dict(d.get("custom_params") or {})
        cp[REQUEST_FIELD] = True
        d["custom_params"] = cp


def _why_unavailable(tokenizer_manager) -> Optional[str]:
    if _SETTINGS is None or not _SETTINGS.capture:
        return "expert capture is off on this server (started with --no-eldr-capture)"
    hf = getattr(getattr(tokenizer_manager, "model_config", None), "hf_config", None)
    if moe_shape_from_hf_config(hf) is None:
        return "the served model is not a mixture-of-experts model"
    return None


def generate_request_around(original, tokenizer_manager, obj, request=None, *args, **kwargs):
    async def _gen():
        from sglang.srt.managers.io_struct import GenerateReqInput

        if isinstance(obj, GenerateReqInput):
            flag = await _raw_flag(request)
            if flag is not None and not isinstance(flag, bool):
                raise EldrRequestError(f"'{REQUEST_FIELD}' must be a boolean, got {type(flag).__name__}")
            want = flag is True or _custom_flag(obj) is True
            if want:
                why = _why_unavailable(tokenizer_manager)
                if why is not None:
                    raise EldrRequestError(f"'{REQUEST_FIELD}' cannot be served: {why}")
                _inject(obj)
        async for out in original(tokenizer_manager, obj, request, *args, **kwargs):
            yield out

    return _gen()


def update_meta_around(original, tokenizer_manager, meta_info, state, customized_info, index,
                       *args, **kwargs):
    if not any(k in customized_info for k in _OUR_KEYS):
        return original(tokenizer_manager, meta_info, state, customized_info, index, *args, **kwargs)
    for key in _OUR_KEYS:
        values = customized_info.get(key)
        v = values[index] if values is not None and index < len(values) else None
        if v:  # request-level: a one-element list for the request that asked, [] otherwise
            meta_info[key] = v[0]
    rest = {k: v for k, v in customized_info.items() if k not in _OUR_KEYS}
    if rest:
        return original(tokenizer_manager, meta_info, state, rest, index, *args, **kwargs)
    return None


def register(settings: EldrSettings) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _SETTINGS
    _SETTINGS = settings
    HookRegistry.register(T_GENERATE, generate_request_around, HookType.AROUND)
    HookRegistry.register(T_META, update_meta_around, HookType.AROUND)
