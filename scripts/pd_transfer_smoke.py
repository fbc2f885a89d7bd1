"""Loopback smoke test of Mooncake's transfer engine over TCP, as SGLang's PD backend uses it.

Two TransferEngine instances in one process, both on 127.0.0.1 with P2PHANDSHAKE metadata and the TCP
protocol; the first writes a registered buffer into the second's registered buffer. Exit status 0 and a
one-line summary on success. Run with the venv's python (scripts/install_pd_cpu.sh does).
"""

from __future__ import annotations

import ctypes
import os
import sys


def main() -> int:
    os.environ.setdefault("MC_FORCE_TCP", "1")
    from mooncake.engine import TransferEngine  # noqa: PLC0415

    n = 1 << 20
    src = (ctypes.c_ubyte * n).from_buffer(bytearray(os.urandom(n)))
    dst = (ctypes.c_ubyte * n)()
    engines = []
    for _ in range(2):
        e = TransferEngine()
        if e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            print("pd_transfer_smoke: TransferEngine.initialize(127.0.0.1, tcp) failed", file=sys.stderr)
            return 1
        engines.append(e)
    a, b = engines
    pa, pb = ctypes.addressof(src), ctypes.addressof(dst)
    if a.register_memory(pa, n) != 0 or b.register_memory(pb, n) != 0:
        print("pd_transfer_smoke: register_memory failed", file=sys.stderr)
        return 1
    peer = f"127.0.0.1:{b.get_rpc_port()}"
    ret = a.transfer_sync_write(peer, pa, pb, n)
    if ret < 0 or bytes(dst) != bytes(src):
        print(f"pd_transfer_smoke: transfer to {peer} failed (ret={ret})", file=sys.stderr)
        return 1
    print(f"pd_transfer_smoke: ok, {n} bytes over tcp 127.0.0.1 -> {peer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
