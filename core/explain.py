"""``moedec explain``: the verify wall of a model, as numbers.

For ``K = 1..max_k`` it feeds ``K`` consecutive tokens of real text in one forward (as a verify of
``K - 1`` accepted draft tokens would) at several positions of each prompt, and measures the union
``U(K)`` of experts per layer. From the byte inventory it derives the bytes of that forward relative
to a single step — the tokens per forward a speculative strategy must commit to break even — for
the per-pair kernel (stock gather, reads ``K·k`` expert slices) and the union kernel (reads ``U``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import costmodel
from .accounting import ExpertTrace, ForwardRecord, make_record
from .inventory import KERNELS, expert_modules, kv_bytes, model_bytes
from .bench import device_name, encode_prompts, progress_bar, require_matplotlib
from .errors import MoedecError
from .forward import forward, new_cache, require_trimmable, rewind

SCHEMA = "moedec.explain/1"


def _windows(n: int, max_k: int, windows: int) -> list[int]:
    """Start positions (>= 1) in the second half of a prompt of ``n`` tokens with room for ``max_k``."""
    hi = n - max_k
    if hi < 1:
        return []
    lo = min(max(1, n // 2), hi)
    return sorted({int(round(x)) for x in np.linspace(lo, hi, max(1, windows))})


def measure_unions(
    model: Any, prompts: Sequence[Sequence[int]], max_k: int = 16, windows: int = 4, progress: bool = True
) -> dict[int, list[ForwardRecord]]:
    """``{K: [ForwardRecord per window]}`` for ``K = 1..max_k``."""
    if max_k < 1:
        raise MoedecError(f"max_k must be >= 1, got {max_k}")
    inv = model_bytes(model)
    modules = expert_modules(model)
    plan = [(p, _windows(len(p), max_k, windows)) for p in prompts]
    plan = [(p, ws) for p, ws in plan if ws]
    if not plan:
        raise MoedecError(f"every prompt is too short: explain needs prompts of at least {max_k + 1} tokens")
    out: dict[int, list[ForwardRecord]] = {k: [] for k in range(1, max_k + 1)}
    total = sum(len(ws) for _, ws in plan) * max_k
    with progress_bar(total, "explain", progress) as bar:
        for prompt, starts in plan:
            cache = new_cache(model)
            fed = 0
            for p in starts:
                logits, _ = forward(model, prompt[fed:p], cache)  # context up to the window
                mx.eval(logits, [c.state for c in cache])
                fed = p
                require_trimmable(cache, "explain")
                for k in range(1, max_k + 1):
                    window = prompt[p : p + k]
                    with ExpertTrace(model, modules) as trace:
                        logits, _ = forward(model, window, cache)  # [K, V]
                        mx.eval(logits)
                    out[k].append(make_record(inv, trace.take(), window, kv_bytes(cache)))
                    rewind(cache, k)
                    bar.advance(note=f"K={k}")
    return out


def run_explain(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_k: int = 16,
    windows: int = 4,
    model_label: Optional[str] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure ``U(K)`` and the break-even tokens per forward; returns the JSON-ready result."""
    ids = encode_prompts(prompts, tokenizer)
    inv = model_bytes(model)
    by_k = measure_unions(model, ids, max_k=max_k, windows=windows, progress=progress)
    single = costmodel.ForwardCost.from_records(by_k[1])
    top_k = inv.top_k or int(round(single.selections / max(single.tokens, 1)))
    rows = []
    for k, recs in sorted(by_k.items()):
        cost = costmodel.ForwardCost.from_records(recs)
        row: dict[str, Any] = {
            "tokens": k,
            "samples": len(recs),
            "union_per_layer": cost.union,
            "union_if_random": costmodel.random_union(k, top_k, inv.num_experts),
            "selections_per_layer": cost.selections,
            "bytes": {kern: cost.bytes(kern) for kern in KERNELS},
            "break_even_tokens_per_forward": {},
            "acceptance_needed": {},
        }
        for kern in KERNELS:
            need = costmodel.break_even_tokens(cost.bytes(kern), single.bytes(kern))
            row["break_even_tokens_per_forward"][kern] = need
            row["acceptance_needed"][kern] = costmodel.acceptance_to_break_even(need, k - 1)
        rows.append(row)
    return {
        "schema": SCHEMA,
        "device": device_name(),
        "model": {
            "label": model_label or getattr(model, "moedec_label", None) or type(model).__name__,
            "model_type": inv.model_type,
            "expert_layers": len(inv.layers),
            "experts": inv.num_experts,
            "top_k": top_k,
            "bytes": inv.as_dict(),
        },
        "settings": {"max_k": max_k, "windows": windows, "prompts": len(ids)},
        "single_step": {"bytes": {kern: single.bytes(kern) for kern in KERNELS}, "union_per_layer": single.union},
        "rows": rows,
    }


def validate_explain(result: dict) -> None:
    """Raise ``ValueError`` at the first departure from :data:`SCHEMA`."""
    for key in ("schema", "device", "model", "settings", "single_step", "rows"):
        if key not in result:
            raise ValueError(f"explain: missing {key!r}")
    if result["schema"] != SCHEMA:
        raise ValueError(f"explain.schema: expected {SCHEMA!r}")
    ks = [r["tokens"] for r in result["rows"]]
    if ks != list(range(1, result["settings"]["max_k"] + 1)):
        raise ValueError("explain.rows: expected one row per K = 1..max_k")
    for r in result["rows"]:
        for key in ("union_per_layer", "union_if_random", "selections_per_layer", "samples"):
            if not isinstance(r.get(key), (int, float)):
                raise ValueError(f"explain.rows[K={r['tokens']}].{key}: expected a number")
        for key in ("bytes", "break_even_tokens_per_forward", "acceptance_needed"):
            if set(r.get(key, {})) != set(KERNELS):
                raise ValueError(f"explain.rows[K={r['tokens']}].{key}: expected keys {list(KERNELS)}")


def plot_explain(result: dict, path: str | Path) -> None:
    """Two panels: union per layer vs K (measured, random routing, K·k), and the break-even tokens
    per forward of both kernels against the most a K-token forward can commit (K)."""
    Figure = require_matplotlib()
    rows = result["rows"]
    ks = [r["tokens"] for r in rows]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ks, [r["union_per_layer"] for r in rows], "o-", label="measured U(K)")
    ax1.plot(ks, [r["union_if_random"] for r in rows], "--", label="random routing")
    ax1.plot(ks, [min(r["selections_per_layer"], result["model"]["experts"]) for r in rows], ":", label="K·k (capped at E)")
    ax1.set(xlabel="tokens in the forward (K)", ylabel="experts read per layer", title="expert union")
    ax1.legend()
    for kern, style in (("pair", "s-"), ("union", "o-")):
        ax2.plot(ks, [r["break_even_tokens_per_forward"][kern] for r in rows], style, label=f"break-even, {kern} kernel")
    ax2.plot(ks, ks, "k:", label="tokens/forward if all accepted (K)")
    ax2.set(xlabel="tokens in the forward (K)", ylabel="tokens per forward", title="the verify wall")
    ax2.legend()
    fig.suptitle(f"moedec explain — {result['model']['label'][:80]}", fontsize=9)
    fig.savefig(str(path), dpi=120)
