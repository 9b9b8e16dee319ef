"""Prototype for the next engine step: the whole single-token decode step under ``mx.compile``.

mlx-lm's KV cache writes at a Python-int offset, so a compiled step would be retraced every token.
Here each layer gets a fixed-capacity cache whose offset is an array shared by all layers (RoPE,
the cache write and the attention mask all take it as an array), so one compiled graph serves every
step: no Python graph building per token, and MLX fuses the elementwise ops. Prefill stays
uncompiled on mlx-lm's own cache, which is then copied into the fixed-capacity one.

Prints greedy tok/s side by side in one process — mlx-lm ``generate_step``, the uncompiled step and
the compiled step, each with the stock and (on CUDA) the fused MoE kernels — and checks that the
compiled step's greedy tokens equal the uncompiled step's.

    python examples/bench_compiled_step.py [--tokens 64] [--rounds 3] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from moedec import kernels


class StaticKVCache:
    """One layer's cache with mlx-lm's interface: ``keys``/``values`` ``[B, H, C, D]`` of fixed
    capacity ``C`` and an ``offset`` array shared by every layer (``pos["offset"]``)."""

    def __init__(self, keys: mx.array, values: mx.array, pos: dict):
        self.state = {"keys": keys, "values": values}
        self.pos = pos

    @property
    def offset(self) -> mx.array:
        return self.pos["offset"]

    def update_and_fetch(self, keys, values):
        start = self.pos["offset"].reshape(1)
        self.state["keys"] = mx.slice_update(self.state["keys"], keys, start, axes=(2,))
        self.state["values"] = mx.slice_update(self.state["values"], values, start, axes=(2,))
        return self.state["keys"], self.state["values"]  # all C positions; the mask hides the rest

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise ValueError("sliding-window attention is not supported by this prototype")
        cap = self.state["keys"].shape[2]
        rows = self.pos["offset"] + mx.arange(n)[:, None]  # [N, 1]: each query's position
        return mx.arange(cap)[None] <= rows  # [N, C]


def static_caches(cache: list, capacity: int) -> tuple[list, dict]:
    """Copy mlx-lm ``KVCache``s (after prefill) into fixed-capacity caches sharing one offset."""
    offset = cache[0].offset
    pos = {"offset": mx.array(offset, dtype=mx.int32)}
    out = []
    for c in cache:
        k, v = c.keys[..., :offset, :], c.values[..., :offset, :]
        pad = capacity - offset
        out.append(StaticKVCache(
            mx.concatenate([k, mx.zeros((*k.shape[:2], pad, k.shape[3]), k.dtype)], axis=2),
            mx.concatenate([v, mx.zeros((*v.shape[:2], pad, v.shape[3]), v.dtype)], axis=2),
            pos,
        ))
    mx.eval([c.state for c in out], pos)
    return out, pos


def compiled_step(model, caches: list, pos: dict):
    """``step(tokens [1, 1]) -> logits [1, V]`` for the next position, compiled once."""
    state = [c.state for c in caches] + [pos]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens):
        logits = model(tokens, cache=caches)[:, -1, :]
        pos["offset"] = pos["offset"] + tokens.shape[1]
        return logits

    return step


def greedy(model, prompt: list[int], n: int, compiled: bool) -> tuple[list[int], float]:
    """Greedy tokens and decode tok/s (first token excluded), pipelined as mlx-lm does."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    if compiled:
        caches, pos = static_caches(cache, -(-(len(prompt) + n + 1) // 256) * 256)
        step = compiled_step(model, caches, pos)
    else:
        def step(tokens):
            return model(tokens, cache=cache)[:, -1, :]
    y = mx.argmax(logits, axis=-1)
    mx.async_eval(y)
    out, t1 = [], None
    for i in range(n):
        nxt = mx.argmax(step(y[:, None]), axis=-1)
        mx.async_eval(nxt)
        out.append(y.item())
        if i == 0:
            t1 = time.perf_counter()
        y = nxt
    return out, (n - 1) / (time.perf_counter() - t1)


def mlx_lm_tps(model, prompt, n):
    t1 = None
    for i, _ in enumerate(generate_step(mx.array(prompt), model, max_tokens=n)):
        if i == 0:
            t1 = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny float32 glm4_moe model (CPU check)")
    args = ap.parse_args()
    if args.tiny:
        from moedec.testing import tiny_moe

        model = tiny_moe("glm4_moe")
    else:
        from moedec.synthetic import synthetic_glm

        model = synthetic_glm()
    prompt = list(range(1, 33))
    kinds = ["stock", "fused"] if kernels.device_backend() in kernels.BACKENDS else ["stock"]
    res: dict[str, list] = {"mlx-lm": []}
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
        kernels.patch(model, "stock")
        tps = {"mlx-lm": mlx_lm_tps(model, prompt, args.tokens)}
        for kind in kinds:
            kernels.patch(model, kind)
            plain, tps[f"{kind}"] = greedy(model, prompt, args.tokens, compiled=False)
            comp, tps[f"{kind} compiled"] = greedy(model, prompt, args.tokens, compiled=True)
            agree = next((i for i, (a, b) in enumerate(zip(plain, comp)) if a != b), len(plain))
            print(f"  {kind}: compiled greedy tokens equal the uncompiled ones for {agree}/{len(plain)}", flush=True)
        kernels.patch(model, "stock")
        print(f"round {r}{' (warm-up)' if not r else ''}: " + ", ".join(f"{k} {v:.1f}" for k, v in tps.items()) + " tok/s", flush=True)
        if r:
            for k, v in tps.items():
                res.setdefault(k, []).append(v)
    base = statistics.median(res["mlx-lm"])
    print("median tok/s (× mlx-lm): " + ", ".join(f"{k} {statistics.median(v):.1f} ({statistics.median(v) / base:.2f}×)" for k, v in res.items()))


if __name__ == "__main__":
    main()
