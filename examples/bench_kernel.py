"""Stock vs fused MoE kernel, side by side in one run on one device.

1. copy bandwidth of this device, measured here (read + write bytes / time);
2. the MoE expert op alone (one synthetic GLM layer: 77 experts, 4096 -> 1536, 4-bit g64, bf16) for
   T = 1, 2, 4, 8, 16 tokens: time, union U of active experts, bytes of the active experts, GB/s
   and % of copy bandwidth, and time(T)/time(1) against U(T)/U(1);
3. end to end: greedy decode tok/s on the synthetic model (DESIGN.md, ~7.9 GB) with mlx-lm's
   ``generate_step`` (stock), moedec ``single`` with ``--kernel stock`` and with ``--kernel fused``,
   interleaved rounds.

    python examples/bench_kernel.py [--scale 1.0] [--rounds 3] [--tokens 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.switch_layers import SwitchGLU

import moedec
from moedec import kernels
from moedec.kernels.fused import fused_switch_glu
from moedec.synthetic import nbytes, synthetic_glm


def timed(fn, reps: int) -> float:
    """Seconds per call: ``reps`` calls queued, evaluated once (after a warm-up)."""
    mx.eval(fn())
    mx.synchronize()
    t = time.perf_counter()
    mx.eval([fn() for _ in range(reps)])
    mx.synchronize()
    return (time.perf_counter() - t) / reps


def copy_bandwidth() -> float:
    x = mx.random.uniform(shape=(256 * 1024 * 1024,)).astype(mx.bfloat16)  # 512 MB
    mx.eval(x)
    sec = timed(lambda: x + 1, 20)
    return 2 * x.nbytes / sec / 1e9


def expert_bytes(sw) -> int:
    per = 0
    for lin in (sw.gate_proj, sw.up_proj, sw.down_proj):
        for name in ("weight", "scales", "biases"):
            if name in lin:
                per += lin[name].nbytes // lin[name].shape[0]
    return per


def layer_bench(model, bw: float, reps: int) -> list[dict]:
    moe = model.model.layers[1].mlp
    sw = moe.switch_mlp
    per_expert = expert_bytes(sw)
    rows = []
    base = {}
    for t in (1, 2, 4, 8, 16):
        x = (mx.random.normal((1, t, model.args.hidden_size), key=mx.random.key(t)) * 0.5).astype(mx.bfloat16)
        idx, _ = moe.gate(x)  # [1, T, 8] real routing of random inputs
        mx.eval(x, idx)
        union = len(set(np.array(idx).reshape(-1).tolist()))
        row = {"T": t, "union": union, "active_MB": union * per_expert / 1e6}
        for name, fn in (("stock", lambda: SwitchGLU.__call__(sw, x, idx)), ("fused", lambda: fused_switch_glu(sw, x, idx))):
            sec = timed(fn, reps)
            row[f"{name}_us"] = sec * 1e6
            row[f"{name}_GBps"] = union * per_expert / sec / 1e9
            row[f"{name}_pct_copy_bw"] = 100 * row[f"{name}_GBps"] / bw
        if t == 1:
            base = row
        row["union_ratio"] = union / base["union"]
        for name in ("stock", "fused"):
            row[f"{name}_time_ratio"] = row[f"{name}_us"] / base[f"{name}_us"]
        err = mx.abs(SwitchGLU.__call__(sw, x, idx).astype(mx.float32) - fused_switch_glu(sw, x, idx).astype(mx.float32)).max()
        row["max_abs_diff"] = float(err)
        rows.append(row)
    return rows


def mlx_lm_tps(model, ids, n):
    t1 = None
    for i, _ in enumerate(generate_step(mx.array(ids), model, max_tokens=n)):
        if i == 0:
            t1 = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t1)


def e2e_bench(model, tokens: int, rounds: int) -> dict:
    ids = list(range(1, 33))
    res = {"mlx_lm": [], "moedec_stock": [], "moedec_fused": []}
    outs = {}
    for r in range(rounds + 1):  # round 0 is a warm-up
        kernels.patch(model, "stock")
        a = mlx_lm_tps(model, ids, tokens)
        g = moedec.generate(model, ids, max_tokens=tokens, kernel="stock", eos_token_ids=[])
        outs["stock"] = g.tokens
        b = g.stats.decode_tps
        g = moedec.generate(model, ids, max_tokens=tokens, kernel="fused", eos_token_ids=[])
        outs["fused"] = g.tokens
        c = g.stats.decode_tps
        kernels.patch(model, "stock")
        if r:
            res["mlx_lm"].append(a)
            res["moedec_stock"].append(b)
            res["moedec_fused"].append(c)
        print(f"  round {r}{' (warm-up)' if not r else ''}: mlx-lm {a:.1f}  moedec stock {b:.1f}  moedec fused {c:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    med["fused_vs_mlx_lm"] = med["moedec_fused"] / med["mlx_lm"]
    med["stock_vs_mlx_lm"] = med["moedec_stock"] / med["mlx_lm"]
    same = sum(x == y for x, y in zip(outs["stock"], outs["fused"]))
    med["greedy_tokens_equal_prefix"] = next((i for i, (x, y) in enumerate(zip(outs["stock"], outs["fused"])) if x != y), len(outs["stock"]))
    med["greedy_tokens_equal"] = same
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    print(f"device: {mx.default_device()}  backend: {kernels.device_backend()}")
    bw = copy_bandwidth()
    print(f"copy bandwidth (read+write): {bw:.0f} GB/s")
    t = time.perf_counter()
    model = synthetic_glm(scale=args.scale)
    print(f"synthetic model: {nbytes(model) / 1e9:.2f} GB, built in {time.perf_counter() - t:.0f} s")
    rows = layer_bench(model, bw, args.reps)
    print(f"{'T':>3} {'U':>3} {'MB':>6} {'stock us':>9} {'fused us':>9} {'stock %bw':>9} {'fused %bw':>9} {'U/U1':>5} {'fused t/t1':>10} {'stock t/t1':>10} {'maxdiff':>8}")
    for r in rows:
        print(f"{r['T']:>3} {r['union']:>3} {r['active_MB']:>6.1f} {r['stock_us']:>9.1f} {r['fused_us']:>9.1f} "
              f"{r['stock_pct_copy_bw']:>9.1f} {r['fused_pct_copy_bw']:>9.1f} {r['union_ratio']:>5.2f} "
              f"{r['fused_time_ratio']:>10.2f} {r['stock_time_ratio']:>10.2f} {r['max_abs_diff']:>8.4f}", flush=True)
    out = {"device": str(mx.default_device()), "copy_GBps": bw, "layer": rows}
    if not args.skip_e2e:
        print("end to end (decode tok/s, median of rounds):")
        out["e2e"] = e2e_bench(model, args.tokens, args.rounds)
        print(json.dumps(out["e2e"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
