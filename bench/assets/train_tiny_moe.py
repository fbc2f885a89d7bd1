#!/usr/bin/env python3
"""Train the tiny Qwen3-MoE (models/tiny-qwen3-moe) on CPU from the corpus of build_corpus.py.

1. byte-level BPE tokenizer (vocab 4096, `tokenizers`), trained on the train split only, wrapped as
   PreTrainedTokenizerFast and saved with the model;
2. Qwen3MoeForCausalLM, 64 experts top-4, every layer sparse, trained with a fixed seed and a fixed step count
   (AdamW, lr 3e-3, warmup + cosine, batch 16 x 256 tokens, each row from a uniformly drawn domain,
   router aux loss 0.01 with output_router_logits=True);
3. export in bf16 safetensors with a config that both transformers 5 and SGLang read.

Usage:
  python bench/assets/build_corpus.py --out /tmp/eldr-corpus
  OMP_NUM_THREADS=1 python bench/assets/train_tiny_moe.py --corpus /tmp/eldr-corpus --out models/tiny-qwen3-moe

Imports only torch, transformers, tokenizers, safetensors, numpy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: single core, deterministic
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_corpus import DOMAINS, load_corpus  # noqa: E402

EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}\n{% endfor %}")


def model_config_kwargs(vocab_size: int, eos_id: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_local_experts=64, num_experts_per_tok=4, moe_intermediate_size=64, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
        router_aux_loss_coef=0.01, output_router_logits=False, attention_bias=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True,
    )


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(train_texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None,
                                   unk_token=None, model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_stream(tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    ids = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


# ---------------------------------------------------------------- batches

def sample_batch(rng: np.random.Generator, streams: list[np.ndarray], rows: int, seq: int) -> torch.Tensor:
    out = np.empty((rows, seq), dtype=np.int64)
    for r in range(rows):
        s = streams[int(rng.integers(len(streams)))]
        start = int(rng.integers(0, len(s) - seq))
        out[r] = s[start:start + seq]
    return torch.from_numpy(out)


def fixed_eval_batches(streams: list[np.ndarray], rows_per_domain: int, seq: int) -> list[torch.Tensor]:
    """Deterministic, evenly spaced windows of each domain's stream: one [rows, seq] tensor per domain."""
    out = []
    for s in streams:
        n = min(rows_per_domain, len(s) // seq)
        starts = np.linspace(0, len(s) - seq, n).astype(np.int64)
        out.append(torch.from_numpy(np.stack([s[a:a + seq] for a in starts]).astype(np.int64)))
    return out


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor]) -> dict:
    model.eval()
    per = {}
    for name, b in zip(DOMAINS, batches):
        losses = [float(model(input_ids=c, labels=c).loss) for c in torch.split(b, 16)]
        per[name] = float(np.mean(losses))
    model.train()
    per["mean"] = float(np.mean([per[d] for d in DOMAINS]))
    return per


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------- export

def export(model, tokenizer, out_dir: str, meta: dict) -> None:
    """bf16 safetensors, untied lm_head (a copy of the embedding: SGLang's Qwen3MoeForCausalLM never ties),
    config with both transformers-5 and older key names."""
    from safetensors.torch import load_file

    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if f.endswith((".safetensors", ".json", ".jinja")) or f == "tokenizer.json":
            os.remove(os.path.join(out_dir, f))
    model = model.to(torch.bfloat16)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="100MB")
    tokenizer.save_pretrained(out_dir)

    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rp = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
    n_exp = cfg.get("num_local_experts", cfg.get("num_experts"))
    cfg.update({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "num_experts": n_exp, "num_local_experts": n_exp,
        "rope_parameters": rp, "rope_theta": rp["rope_theta"],
        "dtype": "bfloat16", "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg["num_hidden_layers"],
    })
    with open(cfg_path, "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")
    # transformers 5 writes tokenizer_class "TokenizersBackend"; older loaders only know PreTrainedTokenizerFast
    # (an alias of it in transformers 5), and older ones read the chat template from tokenizer_config.json.
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2)
        f.write("\n")
    gen = {"bos_token_id": meta["eos_id"], "eos_token_id": meta["eos_id"], "pad_token_id": meta["eos_id"],
           "transformers_version": cfg.get("transformers_version")}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "training_log.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    # the checkpoint must hold per-expert tensors (mlp.experts.<e>.gate_proj.weight ...) and lm_head.weight
    keys = set()
    for fn in os.listdir(out_dir):
        if fn.endswith(".safetensors"):
            keys |= set(load_file(os.path.join(out_dir, fn)).keys())
    assert "lm_head.weight" in keys, "lm_head.weight missing"
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys, sorted(keys)[:20]


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/eldr-corpus")
    ap.add_argument("--out", default="models/tiny-qwen3-moe")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--lr-floor", type=float, default=0.1, help="final lr as a fraction of --lr")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--experts-impl", default="grouped_mm", help="transformers experts_implementation")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    t_start = time.time()

    corpus = load_corpus(a.corpus)
    train_texts = {d: [r["text"] for r in corpus[d] if r["split"] == "train"] for d in DOMAINS}
    held_texts = {d: [r["text"] for r in corpus[d] if r["split"] == "heldout"] for d in DOMAINS}
    with open(os.path.join(a.corpus, "manifest.json")) as f:
        corpus_sha = json.load(f)["sha256"]

    t0 = time.time()
    all_train = [t for d in DOMAINS for t in train_texts[d]]
    tokenizer = train_tokenizer(all_train, a.vocab)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    assert len(tokenizer) == a.vocab, len(tokenizer)
    train_streams = [encode_stream(tokenizer, train_texts[d], eos_id) for d in DOMAINS]
    held_streams = [encode_stream(tokenizer, held_texts[d], eos_id) for d in DOMAINS]
    t_tok = time.time() - t0
    for d, s, h in zip(DOMAINS, train_streams, held_streams):
        print(f"[data] {d:9s} train {len(s):8d} tokens ({sum(map(len, train_texts[d])) / len(s):.2f} chars/token)"
              f"  heldout {len(h):7d} tokens", flush=True)
    print(f"[tok] trained in {t_tok:.1f}s", flush=True)

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**model_config_kwargs(a.vocab, eos_id))
    torch.manual_seed(a.seed)
    try:
        model = Qwen3MoeForCausalLM._from_config(cfg, experts_implementation=a.experts_impl)
    except Exception as e:  # older/newer transformers without this implementation
        print(f"[model] experts_implementation={a.experts_impl} unavailable ({e}); using eager", flush=True)
        model = Qwen3MoeForCausalLM._from_config(cfg)
    impl = getattr(model.config, "_experts_implementation", "eager")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params / 1e6:.2f} M parameters, experts implementation {impl}", flush=True)
    model.train()

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(a.seed)
    eval_train = fixed_eval_batches(train_streams, 16, a.seq)
    eval_held = fixed_eval_batches(held_streams, 16, a.seq)
    history = []
    init_held = evaluate(model, eval_held)
    print(f"[eval] step 0 heldout {init_held['mean']:.3f}", flush=True)

    t_train0 = time.time()
    ce_ema, aux_ema = None, None
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup, a.lr_floor)
        x = sample_batch(rng, train_streams, a.batch, a.seq)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = float(out.aux_loss.detach())
        ce = float(out.loss) - cfg.router_aux_loss_coef * aux
        ce_ema = ce if ce_ema is None else 0.95 * ce_ema + 0.05 * ce
        aux_ema = aux if aux_ema is None else 0.95 * aux_ema + 0.05 * aux
        if step % 10 == 0 or step == a.steps - 1:
            el = time.time() - t_train0
            print(f"[train] step {step:5d} ce {ce:.3f} (ema {ce_ema:.3f}) aux {aux:.3f} gnorm {float(gn):.2f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {el:7.1f}s ({el / (step + 1):.2f}s/step)", flush=True)
        if (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
            ev = evaluate(model, eval_held)
            history.append({"step": step + 1, "train_ce_ema": ce_ema, "aux_ema": aux_ema, "heldout_ce": ev["mean"]})
            print(f"[eval] step {step + 1} heldout {ev['mean']:.3f} "
                  + " ".join(f"{d}={ev[d]:.2f}" for d in DOMAINS), flush=True)
    train_s = time.time() - t_train0

    final_train = evaluate(model, eval_train)
    final_held = evaluate(model, eval_held)
    history.append({"step": a.steps, "train_ce_ema": ce_ema, "aux_ema": aux_ema, "heldout_ce": final_held["mean"]})
    print(f"[final] train-split ce {final_train['mean']:.3f}  heldout ce {final_held['mean']:.3f}  "
          f"aux(ema) {aux_ema:.3f}  train time {train_s:.0f}s", flush=True)
    print("[final] heldout per domain " + " ".join(f"{d}={final_held[d]:.2f}" for d in DOMAINS), flush=True)

    meta = {
        "command": " ".join(sys.argv), "seed": a.seed, "steps": a.steps, "batch": a.batch, "seq": a.seq,
        "lr": a.lr, "warmup": a.warmup, "lr_floor": a.lr_floor, "weight_decay": a.weight_decay,
        "experts_implementation": impl, "threads": a.threads, "params": n_params, "eos_id": eos_id,
        "corpus_sha256": corpus_sha, "tokenizer_seconds": round(t_tok, 1), "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "train_tokens_per_domain": {d: int(len(s)) for d, s in zip(DOMAINS, train_streams)},
        "final_train_split_ce": final_train, "final_heldout_ce": final_held, "initial_heldout_ce": init_held,
        "final_train_ce_ema": ce_ema, "final_aux_loss_ema": aux_ema, "history": history,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
    }
    export(model, tokenizer, a.out, meta)
    print(f"[export] wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
