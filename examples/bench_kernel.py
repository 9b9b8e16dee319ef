"""Stock vs fused MoE kernels, side by side in one run on one device.

1. copy bandwidth of this device, measured here: MLX's own ``x + 1`` and a plain uint4 copy kernel,
   read + write bytes over time; the larger is the reference;
2. per T = 1, 2, 4, 8, 16 on the synthetic GLM model's MoE layers (77 experts, 4096 -> 1536, 4-bit
   g64, bf16): the routed-expert op (experts + routing-weight combine) and the whole MoE block
   (its input norm, router, experts, combine, shared expert), stock vs fused: time, mean union U, bytes of the active
   experts, GB/s and % of copy bandwidth, time(T)/time(1) against U(T)/U(1), and the max difference;
3. where one T=1 decode step's time goes: Python graph building, MLX's encoding of the ops, and the
   rest (the GPU finishing), stock vs fused, and for the compiled step (the default) the compiled
   call, the encoding, the rest, and pipelined steps per token; then the time per decode token of
   mlx-lm's step and of the default with 16 chained tokens queued behind a busy kernel, and their
   quotient (not yet a clean GPU-only figure: mlx-lm's exceeded its decode wall time per token on
   fast hosts in session 16, see ``gpu_per_token``);
4. end to end: greedy decode tok/s with mlx-lm's ``generate_step`` (stock model), moedec ``single``
   with ``--kernel stock``, ``--kernel fused`` (both ``--no-compile-step``), and fused with the
   compiled step (moedec's default on CUDA), interleaved rounds (medians, and the default's ratio to
   mlx-lm round by round), plus how long the greedy
   outputs agree, and for one single-token forward the top-2 logit margin against the largest
   stock/fused logit difference (a random bf16 model has near-ties).

Timings are steady state: every measured batch of calls is first run twice with the same shape of
graph, so MLX's CUDA-graph cache is warm, and every call uses another routing, cycling over the
layers, so that no call finds the previous one's experts in L2. Each call takes the previous call's
output as its input, so the calls run one after another as a forward's layers do (MLX's CUDA graphs
run calls without a data dependency concurrently, which would time throughput, not the layer's
latency that a decode step pays). Layer times are GPU times
(the calls wait behind a busy kernel while the host queues them; the busy time is subtracted), the
bandwidth figures use them; "wall" is the plain back-to-back time, host included.

    python examples/bench_kernel.py [--scale 1.0] [--rounds 3] [--tokens 64] [--reps 36] [--cuda-cores] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU

import moedec
from moedec import kernels
from moedec.bench import mlx_lm_decode
from moedec.compiled import CompiledSteps
from moedec.kernels import fused, ops
from moedec.synthetic import nbytes, synthetic_glm
from moedec.testing import agreeing_prefix


def timed(fn, reps: int) -> float:
    """Seconds per call of ``fn`` in steady state: ``reps`` calls per graph, warmed up twice."""
    for _ in range(2):
        mx.eval([fn() for _ in range(reps)])
        mx.synchronize()
    t = time.perf_counter()
    mx.eval([fn() for _ in range(reps)])
    mx.synchronize()
    return (time.perf_counter() - t) / reps


def gpu_timed(fn, reps: int, spin_ms: float = 40.0) -> float:
    """GPU seconds per call of ``fn`` in steady state, without the host's share: the calls are queued
    behind a ``spin_ms`` busy kernel, and the spin alone is timed the same way and subtracted (medians
    of 3). Where the host took longer to build and queue the calls than the spin lasted, the spin is
    doubled and the timing taken again (up to 4 times), so the host's share does not leak in."""
    if kernels.device_backend() != "cuda":
        return timed(fn, reps)
    queued = []  # seconds from the spin's start until the calls were queued, per run

    def run(calls: int, ns: int) -> float:
        t = time.perf_counter()
        mx.async_eval(ops.spin(ns))
        mx.async_eval([fn() for _ in range(calls)])
        queued.append(time.perf_counter() - t)
        mx.synchronize()
        return time.perf_counter() - t

    timed(fn, reps)  # warm: compiled, CUDA graphs cached
    for _ in range(4):
        ns = int(spin_ms * 1e6)
        run(0, ns), run(reps, ns)
        alone = statistics.median(run(0, ns) for _ in range(3))
        queued.clear()
        took = statistics.median(run(reps, ns) for _ in range(3))
        if max(queued) < 0.8 * spin_ms / 1e3:
            break
        spin_ms *= 2
    return max(took - alone, 0.0) / reps


def gpu_per_token(model, reps: int = 16, kernel: str = "fused") -> dict:
    """GPU µs per decode token, the host's share taken out (tokens queued behind a busy kernel): mlx-lm's
    step on the stock model (the graph of its ``generate_step``: forward, log-softmax, argmax) and the
    compiled ``kernel`` step (fused: the default), each on a warm 32-token cache, each token fed from the last.
    Meant as each side's GPU time and their quotient as the speed-up where both are GPU-bound, but not
    yet that: in session 16 (H200s) mlx-lm's figure, 3.5-4.2 ms, was above its own decode wall time per
    token in the same runs (2.6-3.0 ms at 332-378 tok/s), so something in 16 chained tokens queued at
    once costs mlx-lm's graph more than decoding does (the default's, 849-885 us, matched its pipelined
    step). Read the quotient as "chained", not as a bound."""
    cache = _prefilled(model, "stock")
    y = mx.array([5], dtype=mx.uint32)

    def mlx_lm_step():
        nonlocal y
        logits = model(y[None], cache=cache)[:, -1, :]  # [1, V]
        y = mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1)  # [1]
        return y

    stock = gpu_timed(mlx_lm_step, reps, spin_ms=8.0 * reps)  # ~5 ms of host per token on a slow host
    steps = CompiledSteps(model, _prefilled(model, kernel))
    z = mx.array([[5]], dtype=mx.uint32)

    def compiled_step():
        nonlocal z
        z = mx.argmax(steps(z), axis=-1).reshape(1, 1)  # [1, 1]
        return z

    try:
        default = gpu_timed(compiled_step, reps, spin_ms=4.0 * reps)
    finally:
        steps.write_back()
        kernels.patch(model, "stock")
    return {"mlx_lm_gpu_us": stock * 1e6, "compiled_gpu_us": default * 1e6, "chained_ratio": stock / default}


def chained(fn, x: mx.array):
    """Calls of ``fn`` each on the previous call's output (the first on ``x``): they run one after
    another. Independent calls on one input may run at once in MLX's CUDA graphs and then share its
    reads in L2, which inflates a copy's apparent bandwidth (a run measured 5154 GB/s on an H200,
    whose DRAM peaks at 4.8 TB/s)."""
    last = [x]

    def call():
        last[0] = fn(last[0])
        return last[0]

    return call


def copy_bandwidth() -> tuple[float, float]:
    """(read + write) GB/s of MLX's ``x + 1`` on 1 GiB of bf16, and of a uint4 copy kernel (the best of
    three grid sizes), GPU time (the host's share excluded), each copy reading the last one's output."""
    x = mx.random.normal((512 * 1024 * 1024,)).astype(mx.bfloat16)
    mx.eval(x)
    plus = 2 * x.nbytes / gpu_timed(chained(lambda y: y + 1, x), 4, spin_ms=20.0) / 1e9
    src = x.view(mx.uint32)
    wide = 0.0
    if kernels.device_backend() == "cuda":
        for blocks in (None, 132 * 8, 132 * 4):
            wide = max(wide, 2 * src.nbytes / gpu_timed(chained(lambda s: ops.copy(s, blocks), src), 4, spin_ms=20.0) / 1e9)
    return plus, wide


def expert_bytes(sw) -> int:
    return sum(lin[name].nbytes // lin[name].shape[0] for lin in (sw.gate_proj, sw.up_proj, sw.down_proj)
               for name in ("weight", "scales", "biases") if name in lin)


def stock_experts(sw, x, inds, scores):
    """mlx-lm's routed experts and combine (``glm4_moe.MoE`` without router and shared expert)."""
    y = SwitchGLU.__call__(sw, x, inds)
    return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)


def _diff(a: list, b: list) -> float:
    return max(float(mx.abs(p.astype(mx.float32) - q.astype(mx.float32)).max()) for p, q in zip(a, b))


def layer_bench(model, bw: float, reps: int) -> list[dict]:
    blocks = [l.mlp for l in model.model.layers if hasattr(l.mlp, "switch_mlp")]
    norm = {id(l.mlp): l.post_attention_layernorm for l in model.model.layers}

    def block(b, x, i, s):  # the MoE block after its input norm, as in the layer (a chained input stays in scale)
        return b(norm[id(b)](x))
    per_expert = expert_bytes(blocks[0].switch_mlp)
    fixed = sum(v.nbytes for _, v in tree_flatten(blocks[0].shared_experts.parameters())) + blocks[0].gate.weight.nbytes
    rows, base = [], {}
    kernels.patch(model, "stock")
    for t in (1, 2, 4, 8, 16):
        cases = []
        for i in range(2 * len(blocks)):
            blk = blocks[i % len(blocks)]
            x = (mx.random.normal((1, t, model.args.hidden_size), key=mx.random.key(100 * t + i)) * 0.5).astype(mx.bfloat16)
            inds, scores = blk.gate(x)  # the layer's own routing of random inputs
            cases.append((blk, x, inds, scores))
        mx.eval([c[1:] for c in cases])
        union = statistics.mean(len(set(np.array(c[2]).reshape(-1).tolist())) for c in cases)
        row = {"T": t, "union": union, "experts_MB": union * per_expert / 1e6, "block_MB": (union * per_expert + fixed) / 1e6}
        counter = iter(range(10**9))

        def cycle(fn):
            """Calls of ``fn`` on the next case, each fed the previous call's output as its input: a
            chain, as the layers of a forward are (MLX's CUDA graphs run independent calls at once)."""
            last = {}

            def call():
                b, x, i, s = cases[next(counter) % len(cases)]
                last["y"] = fn(b, last.get("y", x), i, s)
                return last["y"]

            return call

        stock_e = cycle(lambda b, x, i, s: stock_experts(b.switch_mlp, x, i, s))
        fused_e = cycle(lambda b, x, i, s: fused.fused_moe(b.switch_mlp, x, i, s))
        row["experts_stock_us"] = 1e6 * gpu_timed(stock_e, reps)
        row["experts_fused_us"] = 1e6 * gpu_timed(fused_e, reps)
        row["experts_stock_wall_us"] = 1e6 * timed(stock_e, reps)
        row["experts_fused_wall_us"] = 1e6 * timed(fused_e, reps)
        row["block_stock_us"] = 1e6 * gpu_timed(cycle(block), reps)
        some = cases[:3]
        ref_e = [stock_experts(b.switch_mlp, x, i, s) for b, x, i, s in some]
        got_e = [fused.fused_moe(b.switch_mlp, x, i, s) for b, x, i, s in some]
        ref_b = [b(x) for b, x, _, _ in some]
        kernels.patch(model, "fused")
        row["block_fused_us"] = 1e6 * gpu_timed(cycle(block), reps)
        got_b = [b(x) for b, x, _, _ in some]
        kernels.patch(model, "stock")
        row["experts_max_abs_diff"], row["block_max_abs_diff"] = _diff(ref_e, got_e), _diff(ref_b, got_b)
        base = base or row
        row["union_ratio"] = union / base["union"]
        for name in ("experts_stock", "experts_fused", "block_stock", "block_fused"):
            mb = row["experts_MB" if name.startswith("experts") else "block_MB"]
            row[f"{name}_GBps"] = mb / row[f"{name}_us"] * 1e3
            row[f"{name}_pct_copy_bw"] = 100 * row[f"{name}_GBps"] / bw
            row[f"{name}_time_ratio"] = row[f"{name}_us"] / base[f"{name}_us"]
        print(f"{t:>3} {union:>5.1f} {row['experts_MB']:>6.1f} | {row['experts_stock_us']:>7.1f} {row['experts_fused_us']:>7.1f} "
              f"{row['experts_stock_pct_copy_bw']:>5.1f} {row['experts_fused_pct_copy_bw']:>5.1f} "
              f"{row['experts_stock_time_ratio']:>5.2f} {row['experts_fused_time_ratio']:>5.2f} {row['union_ratio']:>5.2f} | "
              f"{row['experts_stock_wall_us']:>7.1f} {row['experts_fused_wall_us']:>7.1f} | "
              f"{row['block_stock_us']:>7.1f} {row['block_fused_us']:>7.1f} | "
              f"{row['experts_max_abs_diff']:.4f} {row['block_max_abs_diff']:.4f}", flush=True)
        rows.append(row)
    return rows


def _prefilled(model, kernel: str) -> list:
    """``model`` patched with ``kernel`` and a cache holding a 32-token prompt (the step profiles' start)."""
    kernels.patch(model, kernel)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(1, 33))]), cache=cache))
    return cache


def step_profile(model, kernel: str, reps: int = 20) -> dict:
    """One T=1 forward on a warm 32-token cache, split into Python graph building, MLX encoding
    (``async_eval`` until it returns) and the rest until the result is ready; medians over reps."""
    cache = _prefilled(model, kernel)
    y = mx.array([[5]])
    parts = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        out = model(y, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        trim_prompt_cache(cache, 1)
        if i >= 3:
            parts.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    kernels.patch(model, "stock")
    med = np.median(np.array(parts), axis=0) * 1e6
    return dict(zip(("build_us", "encode_us", "rest_us", "total_us"), med.tolist()))


def compiled_step_profile(model, kernel: str = "fused", reps: int = 20) -> dict:
    """The compiled T=1 step (the engine's default on CUDA) on a warm 32-token cache, host against GPU:
    the compiled call (Python, and MLX rebuilding the traced graph), ``async_eval`` until it returns
    (MLX's encoding of every node), the rest until the token is ready, each step started on an idle
    GPU; then steps pipelined as the engine runs them (the next step queued before the last token is
    read), per token. Medians over ``reps``."""
    steps = CompiledSteps(model, _prefilled(model, kernel))
    y = mx.array([[5]], dtype=mx.uint32)

    def step(y):
        return mx.argmax(steps(y), axis=-1).reshape(1, 1)  # [1, 1] uint32

    for _ in range(3):  # traced, compiled, warm
        y = step(y)
        mx.eval(y)
    parts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        nxt = step(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        mx.eval(nxt)
        t3 = time.perf_counter()
        parts.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
        y = nxt
    t = time.perf_counter()
    for _ in range(reps):
        nxt = step(y)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    pipelined = (time.perf_counter() - t) / reps * 1e6
    steps.write_back()
    kernels.patch(model, "stock")
    med = np.median(np.array(parts), axis=0) * 1e6
    return {**dict(zip(("call_us", "encode_us", "rest_us", "total_us"), med.tolist())), "pipelined_us": pipelined,
            "traces": steps.traces}


def e2e_bench(model, tokens: int, rounds: int) -> dict:
    ids = list(range(1, 33))
    res = {"mlx_lm": [], "moedec_stock": [], "moedec_fused": [], "moedec_fused_compiled": []}
    outs = {}
    for r in range(rounds + 1):  # round 0 is a warm-up
        kernels.patch(model, "stock")
        tps = [mlx_lm_decode(model, ids, tokens)[0]]
        for name, kernel, compiled in (("stock", "stock", False), ("fused", "fused", False), ("compiled", "fused", True)):
            g = moedec.generate(model, ids, max_tokens=tokens, kernel=kernel, eos_token_ids=[], compile_step=compiled)
            outs[name] = g.tokens
            tps.append(g.stats.decode_tps)
        kernels.patch(model, "stock")
        if r:
            for k, v in zip(res, tps):
                res[k].append(v)
        print(f"  round {r}{' (warm-up)' if not r else ''}: mlx-lm {tps[0]:.1f}  moedec stock {tps[1]:.1f}  "
              f"fused {tps[2]:.1f}  fused + compiled step {tps[3]:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    med["rounds"] = res
    med["fused_vs_mlx_lm"] = med["moedec_fused"] / med["mlx_lm"]
    med["fused_compiled_vs_mlx_lm"] = med["moedec_fused_compiled"] / med["mlx_lm"]
    med["stock_vs_mlx_lm"] = med["moedec_stock"] / med["mlx_lm"]
    med["fused_compiled_vs_mlx_lm_by_round"] = paired_ratios(res["moedec_fused_compiled"], res["mlx_lm"])
    med["compiled_equal_prefix"] = agreeing_prefix(outs["fused"], outs["compiled"])
    med["greedy_equal_prefix"] = agreeing_prefix(outs["stock"], outs["fused"])
    logits = {}
    for kernel in ("stock", "fused"):  # one single-token forward (prefill keeps the stock path)
        kernels.patch(model, kernel)
        logits[kernel] = model(mx.array([ids[:1]]))[0, -1].astype(mx.float32)
    kernels.patch(model, "stock")
    top2 = mx.sort(logits["stock"])[-2:]
    med["one_token_margin"] = float(top2[1] - top2[0])
    med["one_token_max_logit_diff"] = float(mx.abs(logits["stock"] - logits["fused"]).max())
    return med


def paired_ratios(ours: list, theirs: list) -> dict:
    """Each round's ratio ``ours / theirs`` (both measured in that round, so a host that slows down
    between rounds slows both) and their median, min and max: steadier than the ratio of the two
    medians when the host's load drifts over the run."""
    per = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"per_round": per, "median": statistics.median(per), "min": min(per), "max": max(per)}


def acceptance(out: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 7's three speed criteria from one run's figures: (criterion, figures, met), ``None`` where
    the run has no figure for it (no T=8 row, ``--skip-e2e``)."""
    rows = {r["T"]: r for r in out["layer"]}
    one, eight, e2e = rows.get(1), rows.get(8), out.get("e2e")
    first = ("no T=1 row", None)
    if one:
        first = (f"{one['experts_fused_pct_copy_bw']:.1f} % ({one['experts_fused_us']:.1f} us)",
                 one["experts_fused_pct_copy_bw"] >= 50.0)
    second = ("no T=1 and T=8 rows", None)
    if one and eight:
        t, u = eight["experts_fused_time_ratio"], eight["union_ratio"]
        second = (f"{t:.2f} against {1.2 * u:.2f} (U(8)/U(1) {u:.2f})", t <= 1.2 * u)
    third = ("not measured (--skip-e2e)", None)
    if e2e:
        by = e2e["fused_compiled_vs_mlx_lm_by_round"]
        third = (f"{by['median']:.2f}x (median of rounds; lowest {by['min']:.2f}x; "
                 f"{e2e['moedec_fused_compiled']:.0f} vs {e2e['mlx_lm']:.0f} tok/s)", by["median"] >= 3.0)
    return [("1: T=1 fused experts >= 50 % of the copy bandwidth", *first),
            ("2: t(8)/t(1) <= 1.2 x U(8)/U(1)", *second), ("3: end to end >= 3x mlx-lm", *third)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=96, help="calls per GPU timing of a layer (more: steadier T=1 figures)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--cuda-cores", action="store_true", help="4-bit experts on the CUDA-core kernels too")
    ap.add_argument("--json")
    args = ap.parse_args()
    fused.TENSOR_CORES = not args.cuda_cores

    print(f"device: {mx.default_device()}  backend: {kernels.device_backend()}")
    plus, wide = copy_bandwidth()
    bw = max(plus, wide)
    print(f"copy bandwidth (read+write): MLX x+1 {plus:.0f} GB/s, uint4 copy kernel {wide:.0f} GB/s; reference {bw:.0f}")
    t = time.perf_counter()
    model = synthetic_glm(scale=args.scale)
    print(f"synthetic model: {nbytes(model) / 1e9:.2f} GB, built in {time.perf_counter() - t:.0f} s")
    print("GPU time per call (the host's share excluded: calls queued behind a busy kernel); wall: calls back to back")
    print("  T     U     MB | experts GPU: stock us  fused us  stock%bw fused%bw  t/t1 stock fused  U/U1 "
          "| experts wall: stock fused | block GPU: stock us fused us | maxdiff experts block")
    out = {"device": str(mx.default_device()), "copy_GBps": bw, "copy_plus_one_GBps": plus, "copy_kernel_GBps": wide,
           "layer": layer_bench(model, bw, args.reps)}
    out["step"] = {k: step_profile(model, k) for k in ("stock", "fused")}
    out["step"]["fused_compiled"] = compiled_step_profile(model)
    for k, v in out["step"].items():
        print(f"T=1 step, {k}: " + ", ".join(f"{n} {x:.0f}" for n, x in v.items()), flush=True)
    g = out["gpu_per_token"] = gpu_per_token(model)
    print(f"time per decode token, 16 chained tokens queued behind a busy kernel: mlx-lm {g['mlx_lm_gpu_us']:.0f} us, "
          f"fused + compiled step {g['compiled_gpu_us']:.0f} us: {g['chained_ratio']:.2f}x (not a GPU-bound figure yet: "
          "see gpu_per_token)", flush=True)
    if not args.skip_e2e:
        print("end to end (decode tok/s, median of rounds):")
        out["e2e"] = e2e_bench(model, args.tokens, args.rounds)
        print(json.dumps({k: v for k, v in out["e2e"].items() if k not in ("rounds", "fused_compiled_vs_mlx_lm_by_round")}, indent=1))
        by = out["e2e"]["fused_compiled_vs_mlx_lm_by_round"]
        print(f"fused + compiled step vs mlx-lm, round by round: {', '.join(f'{r:.2f}x' for r in by['per_round'])} "
              f"(median {by['median']:.2f}x)")
    print("acceptance (issue 7), this run:")
    for what, figures, met in acceptance(out):
        print(f"  {what}: {figures}: {'met' if met else 'not met' if met is False else 'no figure'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
