"""Where a decode step's time goes on this device (stock vs fused, compiled MoE blocks or not).

Prints: the per-op dispatch cost (a chain of tiny adds), the MoE op alone split into routing sort
and kernels, and one full T=1 forward of the synthetic model under each configuration.

    python examples/profile_step.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU

from moedec import kernels
from moedec.kernels.fused import fused_switch_glu
from moedec.kernels.grouping import sort_pairs
from moedec.synthetic import synthetic_glm


def per_call(fn, reps=50):
    mx.eval(fn())
    mx.synchronize()
    t = time.perf_counter()
    mx.eval([fn() for _ in range(reps)])
    mx.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def step_time(model, reps=30):
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(1, 33))]), cache=cache))
    y = mx.array([[5]])
    times = []
    for i in range(reps + 3):
        t = time.perf_counter()
        out = model(y, cache=cache)
        mx.eval(out)
        times.append(time.perf_counter() - t)
        trim_prompt_cache(cache, 1)
    return float(np.median(times[3:]) * 1e6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    a = mx.zeros((16,))
    mx.eval(a)

    def chain():
        x = a
        for _ in range(100):
            x = x + 1
        return x

    print(f"dispatch: 100 chained tiny adds = {per_call(chain, 10):.0f} us -> {per_call(chain, 10) / 100:.1f} us/op")
    model = synthetic_glm(scale=args.scale)
    moe = model.model.layers[1].mlp
    sw = moe.switch_mlp
    x = (mx.random.normal((1, 1, model.args.hidden_size)) * 0.5).astype(mx.bfloat16)
    idx, scores = moe.gate(x)
    mx.eval(idx, scores)
    print(f"router (gate)           {per_call(lambda: moe.gate(x)[0]):8.1f} us")
    print(f"sort_pairs              {per_call(lambda: sort_pairs(idx)[0]):8.1f} us")
    print(f"stock SwitchGLU         {per_call(lambda: SwitchGLU.__call__(sw, x, idx)):8.1f} us")
    cuda = kernels.device_backend() == "cuda"
    if cuda:
        print(f"fused SwitchGLU         {per_call(lambda: fused_switch_glu(sw, x, idx)):8.1f} us")
    kernels.patch(model, "stock")
    print(f"MoE block stock         {per_call(lambda: moe(x)):8.1f} us")
    print(f"decoder layer stock (no cache) {per_call(lambda: model.model.layers[1](x[None][0], None, None)):8.1f} us")
    t_stock = step_time(model)
    kernels.patch(model, "fused" if cuda else "stock")
    print(f"MoE block {'fused' if cuda else 'stock'}         {per_call(lambda: moe(x)):8.1f} us")
    t_fused = step_time(model)
    # compile each MoE block (weights captured as constants; the KV cache stays outside)
    t_fused_c = t_stock_c = float("nan")
    try:
        for layer in model.model.layers:
            layer.mlp = _Compiled(layer.mlp)
        t_fused_c = step_time(model)
        kernels.patch(model, "stock")
        t_stock_c = step_time(model)
    except Exception as e:  # report and go on
        print(f"compiled MoE blocks failed: {type(e).__name__}: {e}")
    print(f"T=1 forward: stock {t_stock:.0f} us, fused {t_fused:.0f} us, stock+compiled MoE {t_stock_c:.0f} us, fused+compiled MoE {t_fused_c:.0f} us")


class _Compiled:
    def __init__(self, f):
        self.f = f
        self.c = mx.compile(lambda x: f(x))

    def __call__(self, x):
        return self.c(x)


if __name__ == "__main__":
    main()
