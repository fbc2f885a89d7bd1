"""CPU-only stand-in for ``sgl_kernel`` (SGLang's native kernel package).

SGLang's CPU kernels are only built from source; the PyPI ``sglang-kernel`` wheels hold CUDA code. A few
SGLang modules import names from ``sgl_kernel`` unconditionally when the device is CPU. This shim exports
exactly those names so the imports succeed; it registers no ``torch.ops.sgl_kernel`` operators, so
``cpu_has_amx_support()`` stays False and every layer takes its plain-torch path. Calling a stub raises a
clear error instead of computing anything.

Install it only on CPU-only machines (``scripts/install_engine.sh`` does); a GPU install must keep the
real ``sglang-kernel``. Importing this shim when a CUDA device is usable raises, so it cannot silently
hide the real kernels.
"""

from __future__ import annotations

import os as _os

import torch as _torch

if _torch.cuda.is_available() and _os.environ.get("SGLANG_ELDR_ALLOW_SGL_KERNEL_SHIM") != "1":
    raise ImportError(
        "The ELDR sgl_kernel CPU shim is installed but a CUDA device is usable: install the real "
        "`sglang-kernel` package (pip uninstall sglang-eldr-sgl-kernel-cpu-shim)."
    )

__version__ = "0.0.0+eldr.cpu.shim"
IS_ELDR_CPU_SHIM = True

# Plain-torch implementations of the two helpers SGLang's CPU path *calls* (not just imports).


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len):
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = next (end[i]-start[i]) entries of out_cache_loc."""
    lens = (end_offset - start_offset).to(_torch.int64)
    total = int(lens.sum())
    if total == 0:
        return
    rows = _torch.repeat_interleave(req_pool_indices.to(_torch.int64), lens)
    # position of each element inside its own [start, end) range
    seg_begin = _torch.repeat_interleave(_torch.cumsum(lens, 0) - lens, lens)
    cols = _torch.repeat_interleave(start_offset.to(_torch.int64), lens) + (
        _torch.arange(total, device=lens.device) - seg_begin
    )
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every buffer (raw data pointer, row stride in bytes): copy row src_loc[j] onto row tgt_loc[j]."""
    import ctypes

    tgt = tgt_loc.tolist()
    src = src_loc.tolist()
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        rows = [(ptr + s * stride) for s in src]
        tmp = [ctypes.create_string_buffer(stride) for _ in rows]  # gather first: ranges may overlap
        for buf, addr in zip(tmp, rows):
            ctypes.memmove(buf, addr, stride)
        for buf, t in zip(tmp, tgt):
            ctypes.memmove(ptr + t * stride, buf, stride)


# Names SGLang 0.5.23 imports from sgl_kernel on the CPU path but that the plain-torch path never calls.
# (found by scanning SGLang for `from sgl_kernel import ...` under an is_cpu() condition; speculative decoding
# is not supported by this shim).
_CPU_IMPORT_ONLY_NAMES = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "verify_tree_greedy_cpu",
)


def _make_stub(name: str):
    def _stub(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this is the ELDR CPU import shim, which provides no "
            "native kernels. Build SGLang's sgl-kernel for CPU from source to use this code path."
        )

    _stub.__name__ = name
    _stub.__qualname__ = name
    return _stub


for _n in _CPU_IMPORT_ONLY_NAMES:
    globals()[_n] = _make_stub(_n)
del _n

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu", *_CPU_IMPORT_ONLY_NAMES]
