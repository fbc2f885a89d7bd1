"""Read a model's MoE shape (number of layers, experts, top-k) from its Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


@dataclass(frozen=True)
class MoeShape:
    num_layers: int  # hidden layers (table rows are indexed by SGLang's layer_id)
    num_experts: int
    top_k: int


def _first_int(cfg: Any, keys) -> Optional[int]:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def moe_shape_from_hf_config(hf_config: Any) -> Optional[MoeShape]:
    """MoeShape for a MoE checkpoint, None for a dense one."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    e = _first_int(cfg, _EXPERT_KEYS)
    k = _first_int(cfg, _TOPK_KEYS)
    n = _first_int(cfg, ("num_hidden_layers", "num_layers", "n_layer"))
    if e is None or k is None or n is None or e < 2:
        return None
    return MoeShape(num_layers=n, num_experts=e, top_k=k)


def moe_layer_ids(hf_config: Any) -> list[int]:
    """The hidden layers that route to experts, in order (SGLang's ``layer_id``s).

    Dense layers are left out by the rules the model families use: Qwen-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step``, DeepSeek/GLM's ``first_k_dense_replace`` and ``moe_layer_freq``. Other
    MoE configs route in every layer.
    """
    cfg = getattr(hf_config, "text_config", None) or hf_config
    n = _first_int(cfg, ("num_hidden_layers", "num_layers", "n_layer")) or 0
    dense_only = set(getattr(cfg, "mlp_only_layers", None) or ())
    step = getattr(cfg, "decoder_sparse_step", None)
    first_dense = getattr(cfg, "first_k_dense_replace", None)
    freq = getattr(cfg, "moe_layer_freq", None)
    ids = []
    for i in range(n):
        if i in dense_only:
            continue
        if isinstance(step, int) and step > 1 and (i + 1) % step != 0:
            continue
        if isinstance(first_dense, int) and i < first_dense:
            continue
        if isinstance(freq, int) and freq > 1 and i % freq != 0:
            continue
        ids.append(i)
    return ids
