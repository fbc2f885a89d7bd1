"""ELDR inside SGLang: expert capture, KV-co-indexed signature cache, ``return_eldr_counts``.

Loaded by SGLang through the ``sglang.srt.plugins`` entry point ``eldr = sglang_eldr.engine.plugin:load``;
active only in servers started by ``python -m sglang_eldr.launch_server``.
"""
