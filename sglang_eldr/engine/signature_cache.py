"""Signature cache: each KV slot's top-k expert ids per MoE layer, co-indexed with SGLang's KV pool.

Layout ``ids[layer_id, kv_slot, k]`` (uint8 when E <= 256, int16 otherwise) on the engine's device, one
row per KV slot exactly like SGLang's per-layer ``k_buffer[layer_id][kv_slot]``. A forward writes the ids
of every token whose KV it writes (through ``forward_batch.out_cache_loc``); a request's counts are read
back through ``req_to_token[req_pool_idx, :prompt_len]``, so a prompt prefix served from the radix cache
contributes exactly what the request that computed it wrote, and eviction/reuse come with the KV
allocator (a reused slot is overwritten by the forward that reuses it).

Storage layouts (``--eldr-storage``):

* ``slot``: the table above. With ``--page-size P`` the same tensor *is* the per-page table
  ``[L, num_pages, P, k]`` (slot = page * P + offset), so it is exact for every page size.
* ``page``: per-page expert *count* rows ``counts[layer_id, page, E]`` (uint8, P <= 255), as in the ELDR
  artifact. A forward first zeroes the rows of pages whose offset 0 it writes, then adds its tokens'
  picks. A request's counts are the sum of its pages' rows. Exact too: the radix cache shares only whole
  pages, and at prefill completion the prompt's last (partial) page holds only prompt tokens. It uses
  ``L * E / P`` bytes per token instead of ``L * k``, so it is only smaller when ``P * k > E``.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch

from sglang_eldr.engine.moe_shape import MoeShape

logger = logging.getLogger(__name__)


class SignatureTable:
    """Per-KV-slot (or per-page) record of routed experts; see the module docstring."""

    def __init__(self, shape: MoeShape, num_slots: int, device, *, page_size: int = 1,
                 storage: str = "slot"):
        if storage not in ("slot", "page"):
            raise ValueError(f"unknown storage {storage!r}")
        if storage == "page" and page_size < 2:
            storage = "slot"  # a page of one token is a slot
        if storage == "page" and page_size > 255:
            raise ValueError("page storage needs page_size <= 255 (uint8 counts)")
        self.shape = shape
        self.storage = storage
        self.page_size = int(page_size)
        self.num_slots = int(num_slots)
        self.device = torch.device(device)
        L, E, K = shape.num_layers, shape.num_experts, shape.top_k
        self.ids: Optional[torch.Tensor]  # [L, slots, k] expert ids (slot storage)
        self.page_counts: Optional[torch.Tensor]  # [L, pages, E] counts (page storage)
        if storage == "slot":
            dtype = torch.uint8 if E <= 256 else torch.int16
            self.ids = torch.zeros((L, self.num_slots, K), dtype=dtype, device=self.device)
            self.page_counts = None
        else:
            num_pages = (self.num_slots + self.page_size - 1) // self.page_size
            self.ids = None
            self.page_counts = torch.zeros((L, num_pages, E), dtype=torch.uint8, device=self.device)
        # MoE layer ids in forward order, learnt from the capture calls of the first forward
        # (SGLang's warm-up request runs before any user request).
        self._seen_layers: set[int] = set()
        self.moe_layers: Optional[List[int]] = None
        self._layer_index: Optional[torch.Tensor] = None
        # per-forward scratch for page storage
        self._fwd_pages: Optional[torch.Tensor] = None
        self._fwd_reset_pages: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ sizes
    @property
    def data(self) -> torch.Tensor:
        """The table itself: `ids` (slot storage) or `page_counts` (page storage)."""
        t = self.ids if self.ids is not None else self.page_counts
        assert t is not None
        return t

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    # ------------------------------------------------------------------ write path
    def begin_forward(self, out_cache_loc: torch.Tensor) -> torch.Tensor:
        """Prepare a forward that writes KV at ``out_cache_loc``; returns the index tensor to pass to
        :meth:`write`. Page storage zeroes the count rows of pages started at offset 0 by this forward."""
        loc = out_cache_loc.to(torch.int64)
        if self.storage == "page":
            P = self.page_size
            pages = torch.div(loc, P, rounding_mode="floor")
            starts = pages[(loc % P) == 0]
            # zero rows of pages that this forward starts (reuse of a freed page)
            assert self.page_counts is not None
            self.page_counts.index_fill_(1, starts, 0)
            self._fwd_pages = pages
        return loc

    def write(self, layer_id: int, loc: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Record the top-k ids of the tokens written at ``loc`` for one MoE layer (no host sync)."""
        n = loc.shape[0]
        if n == 0 or topk_ids.dim() != 2 or topk_ids.shape[0] < n:
            return
        if self.moe_layers is None:
            self._seen_layers.add(int(layer_id))
        ids = topk_ids[:n]
        if self.storage == "slot":
            assert self.ids is not None
            k = min(ids.shape[1], self.ids.shape[2])
            self.ids[layer_id].index_copy_(0, loc, ids[:, :k].to(self.ids.dtype))
        else:
            E = self.shape.num_experts
            assert self.page_counts is not None and self._fwd_pages is not None
            flat = (self._fwd_pages.unsqueeze(1) * E + ids.to(torch.int64).clamp(0, E - 1)).reshape(-1)
            valid = ((ids >= 0) & (ids < E)).reshape(-1).to(torch.uint8)
            self.page_counts[layer_id].view(-1).index_add_(0, flat, valid)

    def end_forward(self) -> None:
        self._fwd_pages = None
        if self.moe_layers is None and self._seen_layers:
            self.moe_layers = sorted(self._seen_layers)
            self._layer_index = torch.tensor(self.moe_layers, dtype=torch.int64, device=self.device)
            logger.info("ELDR: MoE layers %s (E=%d, top_k=%d)", self.moe_layers,
                        self.shape.num_experts, self.shape.top_k)

    # ------------------------------------------------------------------ read path
    def counts(self, slot_lists: Sequence[torch.Tensor]) -> torch.Tensor:
        """Expert counts of several requests at once: int32 ``[R, L_moe, E]`` on the table's device.

        ``slot_lists[r]`` are the KV slots of request r's prompt tokens, in order (one gather + one
        bincount for the whole batch)."""
        if self.moe_layers is None:
            raise RuntimeError("no MoE forward has been captured yet")
        R = len(slot_lists)
        L = len(self.moe_layers)
        E = self.shape.num_experts
        if R == 0:
            return torch.zeros((0, L, E), dtype=torch.int32, device=self.device)
        lens = [int(s.shape[0]) for s in slot_lists]
        slots = torch.cat([s.to(device=self.device, dtype=torch.int64) for s in slot_lists])
        req_of = torch.repeat_interleave(
            torch.arange(R, device=self.device), torch.tensor(lens, device=self.device))
        assert self._layer_index is not None
        if self.storage == "slot":
            assert self.ids is not None
            ids = self.ids.index_select(0, self._layer_index).index_select(1, slots)  # [L, T, k]
            ids = ids.to(torch.int64)
            valid = (ids >= 0) & (ids < E)
            layer = torch.arange(L, device=self.device).view(L, 1, 1)
            flat = (req_of.view(1, -1, 1) * L + layer) * E + ids.clamp(0, E - 1)
            flat = torch.where(valid, flat, torch.full_like(flat, R * L * E))  # trash bin
            out = torch.bincount(flat.reshape(-1), minlength=R * L * E + 1)[: R * L * E]
            return out.view(R, L, E).to(torch.int32)
        # page storage: sum the count rows of each request's pages (first slot of each page run)
        P = self.page_size
        pages = torch.div(slots, P, rounding_mode="floor")
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        first = (pos % P) == 0  # a prompt starts at a page boundary; one entry per page
        assert self.page_counts is not None
        rows = self.page_counts.index_select(0, self._layer_index)  # [L, pages, E]
        picked = rows.index_select(1, pages[first]).to(torch.int32)  # [L, npages_total, E]
        out = torch.zeros((R, L, E), dtype=torch.int32, device=self.device)
        out.index_add_(0, req_of[first], picked.permute(1, 0, 2))
        return out
