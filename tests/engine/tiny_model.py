"""Build a tiny random-weights Qwen3-MoE checkpoint (with a byte-level BPE tokenizer) on the fly.

Used by the engine tests until/alongside the trained model in ``models/tiny-qwen3-moe/``; the random
twin stays useful as a negative control. Also builds a tiny *dense* Qwen3 for the "not a MoE" error path.

    python -m tests.engine.tiny_model OUT_DIR [--dense] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINED_DIR = REPO / "models" / "tiny-qwen3-moe"

# Shape from the notes / issue: vocab 4096, hidden 128, 4 layers, 64 experts, top-4.
MOE_SHAPE = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=64,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus_lines(limit_chars: int = 2_000_000):
    """Text that every machine of this kind has: Python stdlib sources + generated arithmetic."""
    import random
    import sysconfig

    rng = random.Random(0)
    total = 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py"))[:400]:
        try:
            text = p.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        for line in text.splitlines():
            total += len(line)
            yield line
        if total > limit_chars // 2:
            break
    while total < limit_chars:
        a, b = rng.randint(1, 99), rng.randint(1, 999)
        x = rng.randint(1, 999)
        line = f"Solve {a}x + {b} = {a * x + b}. Then x = {x}."
        total += len(line)
        yield line


def build_tokenizer(out_dir: Path, vocab_size: int = 4096):
    """Reuse the trained model's tokenizer when present, else train a byte-level BPE (a few seconds)."""
    from transformers import PreTrainedTokenizerFast

    if (TRAINED_DIR / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(TRAINED_DIR))
        tok.save_pretrained(str(out_dir))
        return tok
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(_corpus_lines(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    tok.save_pretrained(str(out_dir))
    return tok


def build(out_dir: str | os.PathLike, *, dense: bool = False, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer into out_dir (idempotent)."""
    import torch
    from transformers import Qwen3Config, Qwen3MoeConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    shape = dict(MOE_SHAPE)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    common = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    if dense:
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers"):
            shape.pop(k)
        cfg = Qwen3Config(**shape, **common)
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = Qwen3MoeConfig(**shape, output_router_logits=False, **common)
        model = Qwen3MoeForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    # Older engine config conventions: keep num_experts / rope_theta next to transformers-5 names.
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    if not dense:
        data.setdefault("num_experts", shape["num_experts"])
    data.setdefault("rope_theta", shape["rope_theta"])
    data["torch_dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.out_dir, dense=a.dense, seed=a.seed))


if __name__ == "__main__":
    main()
