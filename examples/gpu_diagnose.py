"""Is a multi-token verify forward on this device equal to single steps? (GPU correctness probe)

For tiny float32 models (and, if given, a model directory) feed a prefix, then compare the logits
of a T-token forward on the cache with T single-token forwards. Prints the max |difference| per T,
which should be at rounding level (< 1e-3) everywhere.

    python examples/gpu_diagnose.py [--model DIR]
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from moedec.forward import forward, new_cache, rewind
from moedec.testing import tiny_models


def probe(model, label: str) -> None:
    prefix = list(range(3, 40))
    nxt = [5, 9, 11, 2, 7, 1, 4, 8]
    for t in (1, 2, 4, 8):
        cache = new_cache(model)
        forward(model, prefix, cache)
        multi, _ = forward(model, nxt[:t], cache)  # [T, V]
        mx.eval(multi)
        rewind(cache, t)
        singles = []
        for tok in nxt[:t]:
            l, _ = forward(model, [tok], cache)
            singles.append(l[0])
        single = mx.stack(singles)
        diff = float(mx.abs(multi.astype(mx.float32) - single.astype(mx.float32)).max())
        scale = float(mx.abs(single.astype(mx.float32)).max())
        print(f"{label:<28} T={t}: max |multi - singles| = {diff:.3g} (logit scale {scale:.3g})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    args = ap.parse_args()
    print(f"device: {mx.default_device()}")
    for m in tiny_models():
        probe(m, m.args.model_type + " f32")
    if args.model:
        import moedec

        m, _ = moedec.load(args.model)
        probe(m, args.model)


if __name__ == "__main__":
    main()
