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
import tempfile
from importlib.metadata import entry_points

import msgspec

from sglang_eldr.engine import settings as S
from sglang_eldr.engine.info_route import ServerInfo

PLUGIN_NAME = "eldr"
PLUGIN_GROUP = "sglang.srt.plugins"
CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536


def add_eldr_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "ELDR (expert-locality-aware decode routing)",
        "Options added by sglang_eldr; all other options are SGLang's.",
    )
    g.add_argument(
        "--eldr-capture", action=argparse.BooleanOptionalAction, default=None,
        help="Turn on SGLang's routed-experts capturer (--enable-return-routed-experts) and reduce each "
             "request's prompt expert counts from it when its prefill ends, for the ELDR router (PD "
             "prefill) and for requests with \"return_eldr_counts\": true (exact with radix-cache prefix "
             "hits and CUDA graphs). Default: on, except on decode servers (--disaggregation-mode decode), "
             "where nothing reads the counts unless a benchmark asks.",
    )
    g.add_argument(
        "--eldr-counts-host", default=None,
        help="PD prefill servers: the address the expert-counts publisher (ZMQ PUB) binds. Default: "
             "--host. The router learns the endpoint from GET /eldr/info on this server.",
    )
    g.add_argument(
        "--eldr-counts-port", type=int, default=None,
        help="PD prefill servers: the port of the expert-counts publisher. Default: port 0, i.e. the OS "
             "picks a free port when the publisher binds, so it can never collide with a bootstrap, HTTP "
             "or other port; GET /eldr/info advertises the port it got.",
    )
    g.add_argument(
        "--eldr-counts-advertise-host", default=None,
        help="The host the router must connect to for counts, when it differs from the bind address "
             "(e.g. the publisher binds 0.0.0.0). Default: the counts host, or for a wildcard bind the "
             "host the router reaches this server's HTTP port at.",
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


def _is_moe(model_path: str | None, trust_remote_code: bool) -> bool:
    if not model_path:
        return False
    try:
        from transformers import AutoConfig

        from sglang_eldr.engine.moe_shape import moe_shape_from_hf_config

        return moe_shape_from_hf_config(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)) is not None
    except Exception:  # noqa: BLE001 - SGLang reports an unreadable model itself
        return True


def _server_opts(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model-path", "--model", dest="model_path", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--disaggregation-mode", default="null")
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    p.add_argument("--disaggregation-decode-allocation-policy", default=None)
    known, _ = p.parse_known_args(argv)
    return known


def prepare(argv: list[str]) -> tuple[list[str], ServerInfo]:
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
    srv = _server_opts(rest)
    mode = srv.disaggregation_mode
    if mode in ("prefill", "decode"):
        policy = srv.disaggregation_decode_allocation_policy
        if policy is None:
            # The ELDR router sends a request to the prefill alone and picks the decoder afterwards.
            rest += ["--disaggregation-decode-allocation-policy", "prefill_complete"]
        elif policy != "prefill_complete":
            raise LayoutError(f"--disaggregation-decode-allocation-policy {policy}: ELDR PD serving needs "
                              "prefill_complete (the decoder is chosen after prefill)")
    capture = opts.eldr_capture if opts.eldr_capture is not None else mode != "decode"
    # SGLang's capturer assumes a MoE config; a dense model keeps it off (requests for counts get a 400).
    if capture and _is_moe(srv.model_path, srv.trust_remote_code) and not _has_opt(rest, "--enable-return-routed-experts"):
        rest += ["--enable-return-routed-experts"]
    launch = ServerInfo(mode=mode, capture=capture,
                        bootstrap_port=srv.disaggregation_bootstrap_port if mode == "prefill" else None)
    os.environ.pop(S.ENV_COUNTS_PORT, None)
    os.environ.pop(S.ENV_COUNTS_HOST, None)
    os.environ.pop(S.ENV_COUNTS_PORT_FILE, None)
    if mode == "prefill" and capture:
        port = opts.eldr_counts_port
        if port is not None and port == srv.disaggregation_bootstrap_port:
            raise LayoutError(f"--eldr-counts-port {port} is this server's bootstrap port")
        # No port given: the publisher binds port 0 and the OS picks a free one at that moment.
        port_file = None if port is not None else os.path.join(tempfile.mkdtemp(prefix="eldr-counts-"), "port")
        # The counts host defaults to the server's own --host, as SGLang resolves it (read where it serves).
        launch = msgspec.structs.replace(launch, counts_host=opts.eldr_counts_host, counts_port=port,
                                        counts_port_file=port_file, advertise_host=opts.eldr_counts_advertise_host)
        os.environ[S.ENV_COUNTS_PORT] = str(port or 0)
        if opts.eldr_counts_host is not None:
            os.environ[S.ENV_COUNTS_HOST] = opts.eldr_counts_host
        if port_file:
            os.environ[S.ENV_COUNTS_PORT_FILE] = port_file
    os.environ[S.ENV_ENABLE] = "1"
    os.environ[S.ENV_CAPTURE] = "1" if capture else "0"
    os.environ[S.ENV_CPU_GUARDS] = "1" if on_cpu else "0"
    launch.export()  # GET /eldr/info (engine/info_route.py)
    return rest, launch


class LayoutError(ValueError):
    """A server layout ELDR (or SGLang's PD mode it relies on) cannot serve; refused before any model load."""


def check_layout(server_args) -> None:
    """Runs SGLang's own argument resolution (its PD limits: prefill_complete with attention TP > 1,
    PP, CP, a decode radix cache...) so a refused layout ends here, before any model load."""
    try:
        server_args.resolve_once()
    except ValueError as e:
        raise LayoutError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None


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
    try:
        rest, launch = prepare(argv)
    except LayoutError as e:
        print(f"launch_server: refused: {e}", file=sys.stderr)
        sys.exit(2)
    _check_plugin_registered()

    # SGLang reads the device environment at import time: import it only now.
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(rest)
    try:
        check_layout(server_args)
    except LayoutError as e:
        print(f"launch_server: refused: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
