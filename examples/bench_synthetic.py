"""The GPU benchmarks on the synthetic GLM-shaped MoE (DESIGN.md), in one process.

1. ``batched``: total decode tok/s at B = 1, 2, 4, 8 and the ratio to B=1, against mlx-lm's own
   ``BatchGenerator`` on the same rows in the same rounds (issue 5);
2. ``moedec bench``'s measured vs predicted speedups for single, prompt-lookup and draft-model
   (a small random dense drafter with the same vocabulary), with expert accounting (issue 6).

    python examples/bench_synthetic.py [--scale 1.0] [--tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

from moedec.batch import bench_batch_sizes
from moedec.bench import run_bench
from moedec.models import random_moe
from moedec.synthetic import nbytes, synthetic_glm


def prompts(vocab: int) -> list[list[int]]:
    base = list(range(100, 140))
    return [
        base * 3,  # repetitive: prompt lookup fires
        [7, 8, 9, 10] * 12,
        [(1000 + i) % vocab for i in range(64)],
        [(i * 37) % vocab for i in range(60)],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", help="float32 for CPU smoke runs (bf16 is slow there)")
    args = ap.parse_args()
    out = Path(args.out)
    t = time.perf_counter()
    dtype = getattr(mx, args.dtype)
    model = synthetic_glm(scale=args.scale, dtype=dtype)
    vocab = model.args.vocab_size
    print(f"device {mx.default_device()}; synthetic model {nbytes(model) / 1e9:.2f} GB ({time.perf_counter() - t:.0f} s)", flush=True)
    rows = prompts(vocab)
    if not args.skip_batch:
        res = bench_batch_sizes(model, rows * 2, [1, 2, 4, 8], args.tokens, rounds=args.rounds, stock=True, kernel="stock")
        print(f"{'B':>3} {'tok/s':>9} {'x B=1':>7} {'mlx-lm tok/s':>13} {'mlx-lm x B=1':>13} {'ours/mlx-lm':>12}")
        for r in res:
            print(f"{r['batch_size']:>3} {r['tok_s']:>9.1f} {r['ratio_vs_b1']:>7.2f} {r['stock_tok_s']:>13.1f} "
                  f"{r['stock_ratio_vs_b1']:>13.2f} {r['vs_stock']:>12.2f}", flush=True)
        (out / "batched.json").write_text(json.dumps(res, indent=1))
    if not args.skip_bench:
        draft = random_moe("glm4_moe", seed=1, dtype=dtype, vocab_size=vocab, hidden_size=512,
                           intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=64)
        result = run_bench(
            model, None, ["single", "prompt-lookup", "draft-model"], rows,
            options={"draft-model": {"draft_model": draft}}, max_tokens=args.tokens, repeats=args.rounds,
            model_label="synthetic glm4_moe 77x top-8 4-bit", progress=False, kernel="stock",
        )
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"{'strategy':<14} {'tok/s':>8} {'tok/fwd':>7} {'accept':>6} {'U/layer':>7} {'measured':>8} "
              f"{'pred pair':>9} {'pred union':>10} {'meas/pred pair':>14} {'lossless':>8}")
        for s in result.get("strategies", []):
            acc = s.get("accounting") or {}
            pred = s.get("predicted_speedup") or {}
            mop = s.get("measured_over_predicted") or {}
            print(f"{s['name']:<14} {s['tok_s']:>8.1f} {s['tokens_per_forward']:>7.2f} {s['acceptance'] or 0:>6.2f} "
                  f"{acc.get('mean_union_per_layer', float('nan')):>7.1f} {s['speedup']:>8.2f} {pred.get('pair', float('nan')):>9.2f} "
                  f"{pred.get('union', float('nan')):>10.2f} {mop.get('pair', float('nan')):>14.2f} {str((s.get('lossless') or {}).get('ok')):>8}", flush=True)


if __name__ == "__main__":
    main()
