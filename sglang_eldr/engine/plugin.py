"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``eldr``).

SGLang's ``load_plugins()`` calls :func:`load` with no arguments in every process (HTTP/tokenizer,
scheduler, detokenizer), then applies the registered hooks. Without ``SGLANG_ELDR=1`` (set by
``python -m sglang_eldr.launch_server``) it registers nothing, so stock SGLang stays stock.
"""

from __future__ import annotations

import logging

from sglang_eldr.engine.settings import EldrSettings

logger = logging.getLogger(__name__)

_loaded = False


def load() -> None:
    global _loaded
    settings = EldrSettings.from_env()
    if not settings.enabled or _loaded:
        return
    _loaded = True
    from sglang_eldr.engine import capture, cpu_guards, request_api

    if settings.cpu_guards:
        cpu_guards.register()
    request_api.register(settings)
    if settings.capture:
        capture.register(settings)
    logger.info("ELDR plugin loaded: capture=%s storage=%s cpu_guards=%s",
                settings.capture, settings.storage, settings.cpu_guards)
