"""Framework overhead: ``moedec`` single-token decoding vs mlx-lm, side by side in one process.

Runs mlx-lm's ``generate_step`` (the loop inside ``mlx_lm.generate``, without its detokeniser, so
the baseline is the strictest one) and ``moedec.generate(strategy="single")`` (with text streaming)
on the same model and prompt, interleaved for several rounds, and prints decode tok/s of each and
their ratio (median over rounds). Greedy outputs are checked equal.

    python examples/bench_overhead.py            # the built-in model
    python examples/bench_overhead.py --size large --tokens 128 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics

import mlx.core as mx

import moedec
from moedec.bench import mlx_lm_decode
from moedec.models import random_moe
from moedec.tokenizer import ByteTokenizer

SIZES = {
    "small": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_routed_experts=8, num_experts_per_tok=2),
    "default": None,  # the model moedec uses without --model (the bundled one)
    "large": dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=384, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, n_routed_experts=32, num_experts_per_tok=4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    args = ap.parse_args()

    if SIZES[args.size] is None:
        model, tok = moedec.load()
    else:
        tok = ByteTokenizer()
        model = random_moe("glm4_moe", seed=0, vocab_size=tok.vocab_size, **SIZES[args.size])
    ids = tok.encode(args.prompt)
    mlx_lm_decode(model, ids, 8)  # warm-up both paths (compilation, allocator)
    moedec.generate(model, ids, "single", max_tokens=8, tokenizer=tok)

    ratios = []
    print(f"device: {mx.default_device()}  model: {args.size}  tokens: {args.tokens}")
    print(f"{'round':>5} {'mlx-lm tok/s':>13} {'moedec tok/s':>13} {'ratio':>7}")
    for r in range(args.rounds):
        base, ref = mlx_lm_decode(model, ids, args.tokens)
        g = moedec.generate(model, ids, "single", max_tokens=args.tokens, tokenizer=tok, eos_token_ids=[])
        assert list(g.tokens) == ref, "moedec single differs from mlx-lm greedy"
        ours = g.stats.decode_tps
        ratios.append(ours / base)
        print(f"{r:>5} {base:>13.1f} {ours:>13.1f} {ours / base:>7.3f}")
    print(f"median ratio moedec/mlx-lm: {statistics.median(ratios):.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
