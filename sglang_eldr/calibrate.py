"""`python -m sglang_eldr.calibrate`: fit ELDR centroids from a calibration workload run through an
ELDR server or router (the maths is in `sglang_eldr.fitting`)."""

from __future__ import annotations

import math

import numpy as np

from sglang_eldr.fitting import fit


def build_parser():
    import argparse

    from sglang_eldr.paths import local_path, model_path

    ap = argparse.ArgumentParser(
        prog="python -m sglang_eldr.calibrate",
        description="Fit ELDR centroids from a calibration workload: runs the prompts on an ELDR server "
        "(or through the ELDR router), collects prefill and decode expert counts, fits IDF, the layer mask "
        "and balanced spherical K-means (one centroid per decoder), and writes a centroid file.",
    )
    ap.add_argument("--url", "--prefill-url", dest="url", required=True,
                    help="an sglang_eldr.launch_server (capture on) or sglang_eldr.launch_router URL")
    ap.add_argument("--model-path", required=True, type=model_path,
                    help="the served model (its tokenizer and geometry)")
    ap.add_argument("--prompts", required=True, type=local_path,
                    help='JSONL, one {"text": ..., "domain": ...} per line')
    ap.add_argument("--decoders", type=int, required=True, help="number of decode workers (centroids)")
    ap.add_argument("--out", required=True, type=local_path, help="centroid file to write")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="decode tokens per prompt for the decode profile")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    ap.add_argument("--no-layer-mask", action="store_true", help="keep every layer (skip the Spearman selection)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    import json
    import sys
    from pathlib import Path

    from sglang_eldr import calibration_client, centroids

    args = build_parser().parse_args(argv)
    try:
        rows = calibration_client.read_prompts(Path(args.prompts))
        cfg = json.loads((Path(args.model_path) / "config.json").read_text())
        top_k = int(cfg.get("num_experts_per_tok") or cfg.get("moe_topk") or 0)
        if args.decoders > len(rows):
            raise ValueError(f"--decoders {args.decoders} exceeds the {len(rows)} prompts")
        samples = calibration_client.collect(
            args.url, rows, calibration_client.load_tokenizer(args.model_path),
            max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
        )
    except (OSError, ValueError, RuntimeError) as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    pre = np.stack([s.prefill for s in samples])
    dec = None if args.no_layer_mask else np.stack([s.decode for s in samples])
    cs = fit(pre, args.decoders, top_k=top_k, decode_counts=dec, seed=args.seed,
             model=Path(args.model_path).name, source=str(args.prompts))
    centroids.save(cs, args.out)
    f = cs.fit
    print(f"fitted {f.num_requests} requests, geometry L={cs.geometry.layers} E={cs.geometry.experts} "
          f"top_k={cs.geometry.top_k}, {f.iterations} K-means iterations")
    if f.spearman_rho is not None:
        print(f"layer mask keeps {int(cs.layer_mask.sum())}/{len(cs.layer_mask)} layers: Spearman rho "
              f"{f.spearman_rho:.3f} (all layers {f.spearman_rho_all_layers:.3f})")
    print(f"cluster sizes {f.cluster_sizes} (cap {math.ceil(f.num_requests / args.decoders)})")
    domains = sorted({s.domain for s in samples if s.domain})
    if domains:
        from sglang_eldr.router_rs import LocalityBandRouter

        router = LocalityBandRouter(cs.centroids, 0.0, idf=cs.idf, layer_mask=cs.layer_mask)
        zero = np.zeros(args.decoders, dtype=np.int64)
        for d in domains:
            picks = [router.select_counts(s.prefill, zero) for s in samples if s.domain == d]
            print(f"  {d:>10}: nearest centroid {np.bincount(picks, minlength=args.decoders).tolist()}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
