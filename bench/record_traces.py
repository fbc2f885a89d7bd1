"""Records simulator traces from the tiny trained MoE: for each prompt, its prefill expert counts
[L, E] and the top-k expert ids of every greedy decode step [T, L, k] (transformers, float32,
top-k from the router logits — the same selection SGLang makes), up to --decode-tokens, ending
early where the model emits its EOS token. The prompt's token ids and the token fed at every decode
step are stored too, so bench/step_replay.py can put a real server at any point of a request.

    python bench/record_traces.py --model models/tiny-qwen3-moe --out bench/results/traces_tiny_moe.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "assets"))
from measure_locality import trace  # noqa: E402  (the tiny-model tracer, shared with the model card)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-qwen3-moe")
    ap.add_argument("--prompts", nargs="+", default=["bench/data/prompts_calib.jsonl", "bench/data/prompts_eval.jsonl"])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts (0 = all)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/traces_tiny_moe.npz"))
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    top_k = int(model.config.num_experts_per_tok)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    rows = [json.loads(l) for p in args.prompts for l in Path(p).read_text().splitlines() if l.strip()]
    if args.limit:
        rows = rows[: args.limit]
    domains = sorted({r["domain"] for r in rows})
    pre, dec, dom, prompt_ids, fed = [], [], [], [], []
    t0 = time.time()
    for i, r in enumerate(rows):
        c, d, n, gen = trace(model, tok, r["text"], args.decode_tokens, top_k, args.max_prompt)
        # gen[t] is fed at decode step t; a request that emits EOS at gen[t] ran steps 0..t-1.
        end = next((t for t, g in enumerate(gen) if g in eos_ids), len(gen))
        pre.append(c.astype(np.int32))
        dec.append(d[: max(end, 1)])
        fed.append(np.array(gen[: max(end, 1)], dtype=np.int32))
        prompt_ids.append(np.array(tok(r["text"], add_special_tokens=False)["input_ids"][:n], dtype=np.int32))
        dom.append(domains.index(r["domain"]))
        if (i + 1) % 50 == 0:
            print(f"traced {i + 1}/{len(rows)} ({time.time() - t0:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, prefill=np.stack(pre), decode=np.concatenate(dec),
                        decode_lengths=np.array([len(d) for d in dec]), domain=np.array(dom),
                        tokens=np.concatenate(fed), prompt_ids=np.concatenate(prompt_ids),
                        prompt_lengths=np.array([len(q) for q in prompt_ids]),
                        domain_names=np.array(domains))
    lens = np.array([len(d) for d in dec])
    print(f"wrote {len(rows)} traces to {args.out} in {time.time() - t0:.0f} s; decode lengths "
          f"min {lens.min()} median {int(np.median(lens))} max {lens.max()} ({int((lens < args.decode_tokens).sum())} ended at EOS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
