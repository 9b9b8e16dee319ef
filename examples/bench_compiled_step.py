"""The compiled single-token step (``compile_step=True``, :mod:`moedec.compiled`) against the plain
one and against mlx-lm, side by side in one process.

Greedy decode tok/s with mlx-lm's ``generate_step`` and moedec ``single`` with the step plain and
compiled, each with the stock and (on CUDA) the fused MoE kernels; interleaved rounds after a
warm-up (which also pays the one-off trace). Checks that compiled and plain greedy tokens agree.

    python examples/bench_compiled_step.py [--tokens 128] [--rounds 3] [--tiny | --model DIR]
"""

from __future__ import annotations

import argparse
import statistics

import moedec
from moedec import kernels
from moedec.bench import mlx_lm_decode
from moedec.testing import agreeing_prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny float32 glm4_moe model")
    ap.add_argument("--model", help="a local mlx-lm model directory (default: the synthetic GLM model)")
    args = ap.parse_args()
    if args.tiny:
        from moedec.testing import tiny_moe

        model = tiny_moe("glm4_moe")
    elif args.model:
        model = moedec.load(args.model)[0]
    else:
        from moedec.synthetic import synthetic_glm

        model = synthetic_glm()
    prompt = list(range(1, 33))
    kinds = ["stock", "fused"] if kernels.device_backend() in kernels.BACKENDS else ["stock"]
    res: dict[str, list] = {}
    for r in range(args.rounds + 1):
        kernels.patch(model, "stock")
        tps = {"mlx-lm": mlx_lm_decode(model, prompt, args.tokens)[0]}
        for kind in kinds:
            out = {}
            for on in (False, True):
                g = moedec.generate(model, prompt, max_tokens=args.tokens, kernel=kind, eos_token_ids=[], compile_step=on)
                out[on] = g.tokens
                tps[f"{kind}{' compiled' if on else ''}"] = g.stats.decode_tps
            agree = agreeing_prefix(out[False], out[True])
            print(f"  {kind}: compiled and plain greedy tokens agree for {agree}/{len(out[False])}", flush=True)
        kernels.patch(model, "stock")
        print(f"round {r}{' (warm-up)' if not r else ''}: " + ", ".join(f"{k} {v:.1f}" for k, v in tps.items()) + " tok/s", flush=True)
        if r:
            for k, v in tps.items():
                res.setdefault(k, []).append(v)
    base = statistics.median(res["mlx-lm"])
    print("median tok/s (x mlx-lm): " + ", ".join(f"{k} {statistics.median(v):.1f} ({statistics.median(v) / base:.2f}x)" for k, v in res.items()))


if __name__ == "__main__":
    main()
