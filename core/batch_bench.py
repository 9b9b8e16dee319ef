"""Benchmark of strategy ``batched``: total tok/s per batch size, interleaved in one process, with
mlx-lm's own ``BatchGenerator`` on the same rows for comparison. Import it as
``moedec.batch.bench_batch_sizes``."""

from __future__ import annotations

from typing import Any, Sequence

from .batch import BatchDecoder, make_rows
from .errors import MoedecError


def _stock_run(model, rows: list[list[int]], batch_size: int, max_tokens: int) -> tuple[int, float]:
    """mlx-lm's own ``BatchGenerator`` on the same rows: (generated tokens, generation seconds)."""
    from mlx_lm.generate import BatchGenerator

    from moedec.kernels import patch

    patch(model, "stock")
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=None,
                         completion_batch_size=batch_size, prefill_batch_size=batch_size)
    try:
        gen.insert([list(r) for r in rows])
        with gen.stats() as stats:
            while gen.next_generated():
                pass
    finally:
        gen.close()
    return stats.generation_tokens, stats.generation_time


def bench_batch_sizes(
    model: Any,
    prompts: Sequence[Any],
    batch_sizes: Sequence[int],
    max_tokens: int,
    rounds: int = 3,
    *,
    tokenizer: Any = None,
    warmup: bool = True,
    stock: bool = False,
    kernel: str = "auto",
) -> list[dict[str, Any]]:
    """Total decode tok/s of strategy ``batched`` at each batch size, and its ratio to B=1.

    Every B decodes the same workload: ``prompts`` repeated cyclically to ``max(batch_sizes)`` rows
    (at least ``len(prompts)``), greedy, ``max_tokens`` each with EOS ignored, so the work is
    identical and only the batching differs. The sizes are run interleaved, ``rounds`` times (the
    order rotates each round), after one short warm-up run each. B=1 is always measured.

    One dict per B, in the order given: ``batch_size``, ``tokens`` (made by batch forwards, summed
    over rounds), ``seconds`` (wall time minus prefills, summed), ``tok_s`` (= tokens / seconds),
    ``ratio_vs_b1``, and ``tok_s_rounds``, ``prefill_seconds``, ``steps``, ``rows``. With ``stock``
    also ``stock_tok_s``, ``stock_ratio_vs_b1`` and ``vs_stock``: mlx-lm's ``BatchGenerator`` on the
    same rows in the same rounds (its ``generation_tps`` definition: tokens / (wall - prompt time)),
    always on mlx-lm's stock expert path, while ours runs with ``kernel`` (see ``moedec.kernels``).
    """
    from moedec.kernels import patch

    from .api import _prepare

    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise MoedecError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if max_tokens < 2 or rounds < 1:
        raise MoedecError("bench needs max_tokens >= 2 and rounds >= 1")
    if not prompts:
        raise MoedecError("bench needs at least one prompt")
    if 1 not in sizes:
        sizes = [1] + sizes
    model, _, tokenizer = _prepare(model, prompts[0], tokenizer)
    ids = [_prepare(model, p, tokenizer)[1] for p in prompts]
    n = max(max(sizes), len(ids))
    work = [ids[i % len(ids)] for i in range(n)]

    def ours(b: int, m: int) -> dict[str, float]:
        patch(model, kernel)
        rows = make_rows(work, max_tokens=m, temperature=0.0, top_p=1.0, top_k=0, seed=0)
        dec = BatchDecoder(model, rows, batch_size=b)
        for _ in dec:
            pass
        return dec.summary()

    if warmup:
        for b in sizes:
            ours(b, min(max_tokens, 4))
            if stock:
                _stock_run(model, work, b, min(max_tokens, 4))
    acc = {b: {"tokens": 0, "seconds": 0.0, "prefill": 0.0, "steps": 0, "rates": [], "st": 0, "ss": 0.0}
           for b in sizes}
    for r in range(rounds):
        for b in sizes[r % len(sizes):] + sizes[: r % len(sizes)]:
            s, a = ours(b, max_tokens), acc[b]
            a["tokens"] += s["decode_tokens"]
            a["seconds"] += s["decode_seconds"]
            a["prefill"] += s["prefill_seconds"]
            a["steps"] += s["steps"]
            a["rates"].append(s["decode_tok_s"])
            if stock:
                t, sec = _stock_run(model, work, b, max_tokens)
                a["st"] += t
                a["ss"] += sec
    if stock:
        patch(model, kernel)  # leave the model on the kernel it was benchmarked with
    out = []
    for b in sizes:
        a = acc[b]
        row = {"batch_size": b, "tokens": a["tokens"], "seconds": a["seconds"],
               "tok_s": a["tokens"] / a["seconds"] if a["seconds"] > 0 else 0.0,
               "tok_s_rounds": a["rates"], "prefill_seconds": a["prefill"], "steps": a["steps"], "rows": n}
        if stock:
            row["stock_tok_s"] = a["st"] / a["ss"] if a["ss"] > 0 else 0.0
        out.append(row)
    base = out[0]
    for row in out:
        row["ratio_vs_b1"] = row["tok_s"] / base["tok_s"] if base["tok_s"] else 0.0
        if stock:
            row["stock_ratio_vs_b1"] = row["stock_tok_s"] / base["stock_tok_s"] if base["stock_tok_s"] else 0.0
            row["vs_stock"] = row["tok_s"] / row["stock_tok_s"] if row["stock_tok_s"] else 0.0
    order = [int(b) for b in batch_sizes]
    return sorted(out, key=lambda r: order.index(r["batch_size"]) if r["batch_size"] in order else -1)
