"""The tiny random-weights Qwen3-MoE for the PD tests, with an *untied* lm_head.

``tests/engine/tiny_model.py`` saves ``tie_word_embeddings=True``; SGLang 0.5.23's ``Qwen3MoeForCausalLM``
never ties, so it leaves ``lm_head`` unloaded (zeros on CPU): every logit is equal, greedy decoding emits
token 0 forever and "token-identical" would hold vacuously. Here the same shape is saved with its own
``lm_head.weight``, and weights are drawn with a wider init (std 0.2 instead of 0.02) so greedy outputs
vary from token to token instead of repeating one token: a corrupted KV transfer then shows in the ids.

    python -m tests.pd.tiny_untied OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.engine.tiny_model import MOE_SHAPE, TRAINED_DIR, build_tokenizer


def trained_usable() -> bool:
    """The committed trained model, when present and untied."""
    cfg = TRAINED_DIR / "config.json"
    if not cfg.exists() or not any(TRAINED_DIR.glob("*.safetensors")):
        return False
    return not json.loads(cfg.read_text()).get("tie_word_embeddings", False)


INIT_STD = 0.2


def build(out_dir, *, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    shape = dict(MOE_SHAPE, tie_word_embeddings=False)
    cfg = Qwen3MoeConfig(**shape, output_router_logits=False, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos, initializer_range=INIT_STD)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    path = out / "config.json"
    data = json.loads(path.read_text())
    data.update(num_experts=shape["num_experts"], rope_theta=shape["rope_theta"], torch_dtype="bfloat16",
                tie_word_embeddings=False, initializer_range=INIT_STD)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
