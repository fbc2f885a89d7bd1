"""``python -m sglang_eldr.launch_server``: SGLang's server with the ELDR plugin active.

Accepts every ``python -m sglang.launch_server`` argument, plus the ELDR options below. On CPU
(``--device cpu``, or no ``--device`` and no usable CUDA device) it also applies what SGLang needs there,
unless ``--no-eldr-cpu-defaults``: ``--disable-overlap-schedule`` (the overlap scheduler is ~20x slower on
CPU), an explicit ``--max-total-tokens 65536`` when none is given (``--mem-fraction-static`` would be a
fraction of host RAM), ``--sleep-on-idle`` (an idle scheduler otherwise spins a whole core) and
``SGLANG_USE_CPU_ENGINE=1``.

The options reach SGLang's scheduler and tokenizer processes as environment variables read by the
plugin (``sglang_eldr.engine.settings``); hooks are registered through SGLang's ``HookRegistry`` only.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from sglang_eldr.engine import settings as S

PLUGIN_NAME = "eldr"
PLUGIN_GROUP = "sglang.srt.plugins"
CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536


def add_eldr_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "ELDR (expert-locality-aware decode routing)",
        "Options added by sglang_eldr; all other options are SGLang's.",
    )
    g.add_argument(
        "--eldr-capture", action=argparse.BooleanOptionalAction, default=True,
        help="Record every token's routed experts (top-k ids per MoE layer) into a signature table "
             "co-indexed with the KV pool, so requests can ask for their prompt's expert counts with "
             "\"return_eldr_counts\": true (exact with radix-cache prefix hits). Default: on.",
    )
    g.add_argument(
        "--eldr-storage", choices=("auto",) + S.STORAGE_CHOICES, default="auto",
        help="Signature table layout. 'slot': top-k ids per KV slot, [layers, kv_slots, top_k] uint8 "
             "(int16 if more than 256 experts); exact for any --page-size. 'page': per-KV-page expert "
             "count rows [layers, pages, experts] uint8 (needs page size <= 255); smaller only when "
             "page_size * top_k > experts. 'auto' (default): 'slot'.",
    )
    g.add_argument(
        "--eldr-counts-port", type=int, default=None,
        help="PD prefill servers: publish each request's prompt expert counts, as soon as its prefill "
             "forward ends, on a ZMQ PUB socket at tcp://127.0.0.1:PORT for the ELDR router "
             "(python -m sglang_eldr.launch_router). Default: --disaggregation-bootstrap-port + 1 when "
             "--disaggregation-mode prefill, else off.",
    )
    g.add_argument(
        "--eldr-cpu-defaults", action=argparse.BooleanOptionalAction, default=True,
        help="On CPU, default to --disable-overlap-schedule, --max-total-tokens "
             f"{CPU_DEFAULT_MAX_TOTAL_TOKENS} (unless given), --sleep-on-idle (an idle scheduler "
             "otherwise spins a whole core) and SGLANG_USE_CPU_ENGINE=1. Default: on.",
    )


def _has_opt(argv: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in argv)


def _resolve_device(argv: list[str]) -> str | None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default=None)
    known, _ = p.parse_known_args(argv)
    if known.device:
        return known.device
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def _check_plugin_registered() -> None:
    names = {ep.name for ep in entry_points(group=PLUGIN_GROUP)}
    if PLUGIN_NAME not in names:
        sys.exit(
            f"sglang_eldr: entry point '{PLUGIN_NAME}' is not registered in group '{PLUGIN_GROUP}'. "
            "Install the project (pip install -e .) so SGLang's processes load the ELDR plugin."
        )
    allowed = os.environ.get("SGLANG_PLUGINS")
    if allowed:
        items = [x.strip() for x in allowed.split(",") if x.strip()]
        if PLUGIN_NAME not in items:
            os.environ["SGLANG_PLUGINS"] = ",".join(items + [PLUGIN_NAME])


def prepare(argv: list[str]) -> list[str]:
    """Split off the ELDR options, export them for the plugin and return SGLang's argv."""
    eldr = argparse.ArgumentParser(add_help=False)
    add_eldr_args(eldr)
    opts, rest = eldr.parse_known_args(argv)
    device = _resolve_device(rest)
    on_cpu = device == "cpu"
    if on_cpu and opts.eldr_cpu_defaults:
        if not _has_opt(rest, "--device"):
            rest += ["--device", "cpu"]
        if not _has_opt(rest, "--disable-overlap-schedule"):
            rest += ["--disable-overlap-schedule"]
        if not _has_opt(rest, "--max-total-tokens"):
            rest += ["--max-total-tokens", str(CPU_DEFAULT_MAX_TOTAL_TOKENS)]
        if not _has_opt(rest, "--sleep-on-idle"):
            rest += ["--sleep-on-idle"]
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    storage = "slot" if opts.eldr_storage == "auto" else opts.eldr_storage
    counts_port = opts.eldr_counts_port
    pd = argparse.ArgumentParser(add_help=False)
    pd.add_argument("--disaggregation-mode", default="null")
    pd.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    pd_opts, _ = pd.parse_known_args(rest)
    if counts_port is None and pd_opts.disaggregation_mode == "prefill":
        counts_port = pd_opts.disaggregation_bootstrap_port + 1
    if counts_port is not None:
        os.environ[S.ENV_COUNTS_PORT] = str(counts_port)
    else:
        os.environ.pop(S.ENV_COUNTS_PORT, None)
    os.environ[S.ENV_ENABLE] = "1"
    os.environ[S.ENV_CAPTURE] = "1" if opts.eldr_capture else "0"
    os.environ[S.ENV_STORAGE] = storage
    os.environ[S.ENV_CPU_GUARDS] = "1" if on_cpu else "0"
    return rest


def print_help() -> None:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog="python -m sglang_eldr.launch_server",
        description="SGLang server with ELDR expert capture (all sglang.launch_server options accepted).",
    )
    ServerArgs.add_cli_args(parser)
    add_eldr_args(parser)
    parser.print_help()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    rest = prepare(argv)
    _check_plugin_registered()

    # SGLang reads the device environment at import time: import it only now.
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(rest)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
