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
        from sglang_eldr.engine import pd_cpu_guards

        cpu_guards.register()
        pd_cpu_guards.register()
    request_api.register(settings)
    from sglang_eldr.engine import early_token

    early_token.register()
    from sglang_eldr.engine import info_route

    info_route.register()
    if settings.capture:
        capture.register(settings)
        if settings.counts_port is not None:
            from sglang_eldr.engine import counts_publisher

            counts_publisher.register(settings.counts_host, settings.counts_port, settings.counts_port_file)
        if settings.step_stats_file:
            from sglang_eldr.engine import step_stats

            step_stats.register(settings.step_stats_file, settings.step_trace_file)
    logger.info("ELDR plugin loaded: capture=%s counts=%s cpu_guards=%s", settings.capture,
                f"{settings.counts_host or '(--host)'}:{settings.counts_port}" if settings.counts_port is not None else "off",
                settings.cpu_guards)
