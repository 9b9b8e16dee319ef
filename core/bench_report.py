"""The ``moedec bench`` result: :func:`validate_bench` checks it against :data:`~moedec.bench.SCHEMA`
and :func:`plot_bench` draws it (speedup measured vs predicted; the expert union against the tokens
of a verify forward)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import costmodel
from .inventory import KERNELS
from .bench import BASELINE, SCHEMA, require_matplotlib


# -- the JSON schema ------------------------------------------------------------------------------

_NUM = (int, float)
_ROW_KEYS = {
    "name": str, "options": dict, "generated_tokens": int, "decoded_tokens": int, "forwards": int,
    "decode_time": _NUM, "tok_s": _NUM, "tokens_per_forward": _NUM, "acceptance": (*_NUM, type(None)),
    "drafted": int, "accepted": int, "accounting": (dict, type(None)), "accounting_error": (str, type(None)), "lossless": dict,
    "speedup": (*_NUM, type(None)), "predicted_speedup": (dict, type(None)),
    "measured_over_predicted": (dict, type(None)),
}
_ACCT_KEYS = {
    "forwards": int, "mean_tokens_fed": _NUM, "mean_union_per_layer": _NUM, "mean_selections_per_layer": _NUM,
    "bytes_per_forward": dict, "bytes_per_token": (dict, type(None)), "union_by_tokens": list,
}


def _check(obj: Any, keys: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object")
    for k, t in keys.items():
        if k not in obj:
            raise ValueError(f"{where}: missing {k!r}")
        types, v = (t if isinstance(t, tuple) else (t,)), obj[k]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise ValueError(f"{where}.{k}: unexpected type {type(obj[k]).__name__}")


def validate_bench(result: dict) -> None:
    """Raise ``ValueError`` naming the first place ``result`` departs from :data:`SCHEMA`."""
    _check(result, {"schema": str, "device": str, "model": dict, "settings": dict, "strategies": list, "skipped": list}, "bench")
    if result["schema"] != SCHEMA:
        raise ValueError(f"bench.schema: expected {SCHEMA!r}, got {result['schema']!r}")
    _check(result["model"], {"label": str, "accounting": str, "bytes": (dict, type(None))}, "bench.model")
    _check(result["settings"], {"max_tokens": int, "prompts": int, "repeats": int, "temperature": _NUM}, "bench.settings")
    if not result["strategies"] or result["strategies"][0].get("name") != BASELINE:
        raise ValueError("bench.strategies: the first row must be the baseline 'single'")
    for i, row in enumerate(result["strategies"]):
        where = f"bench.strategies[{i}]"
        _check(row, _ROW_KEYS, where)
        _check(row["lossless"], {"ok": (bool, type(None)), "exact": int, "near_tie": int, "diverged": int}, f"{where}.lossless")
        if row["accounting"] is not None:
            _check(row["accounting"], _ACCT_KEYS, f"{where}.accounting")
            for u in row["accounting"]["union_by_tokens"]:
                _check(u, {"tokens": int, "union": _NUM, "forwards": int}, f"{where}.accounting.union_by_tokens")
        for key in ("predicted_speedup", "measured_over_predicted"):
            if row[key] is not None and set(row[key]) != set(KERNELS):
                raise ValueError(f"{where}.{key}: expected keys {list(KERNELS)}")
    json.dumps(result)  # must serialise


# -- plot -----------------------------------------------------------------------------------------


def plot_bench(result: dict, path: str | Path) -> None:
    """Two panels: speedup over ``single`` per strategy, measured vs predicted (both kernels); and
    the mean expert union per layer against the tokens fed per verify forward, per strategy, with
    the per-pair (T·k) and random-routing references."""
    Figure = require_matplotlib()
    rows = result["strategies"]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = list(range(len(rows)))
    width = 0.27
    series = [("measured", [r["speedup"] or 0.0 for r in rows])]
    for k in KERNELS:
        series.append((f"predicted, {k} kernel", [(r["predicted_speedup"] or {}).get(k) or 0.0 for r in rows]))
    for j, (label, ys) in enumerate(series):
        ax1.bar([xi + (j - 1) * width for xi in x], ys, width, label=label)
    ax1.axhline(1.0, color="k", lw=0.8, ls=":")
    ax1.set_ylim(0, 1.25 * max([1.0, *(y for _, ys in series for y in ys)]))
    ax1.set_xticks(x, [r["name"] for r in rows], rotation=20)
    ax1.set(ylabel="speedup over single", title="measured vs predicted")
    ax1.legend()
    inv = result["model"].get("bytes") or {}
    top_k, experts = inv.get("top_k"), inv.get("num_experts")
    tmax = 1
    for r in rows:
        pts = (r["accounting"] or {}).get("union_by_tokens") or []
        if pts:
            ax2.plot([p["tokens"] for p in pts], [p["union"] for p in pts], "o-", label=r["name"])
            tmax = max(tmax, max(p["tokens"] for p in pts))
    if top_k and experts:
        ts = list(range(1, tmax + 1))
        ax2.plot(ts, [min(t * top_k, experts) for t in ts], "k:", label="T·k, capped at E")
        ax2.plot(ts, [costmodel.random_union(t, top_k, experts) for t in ts], "k--", lw=0.8, label="random routing")
    ax2.set(xlabel="tokens per verify forward (T)", ylabel="experts read per layer (union)", title="union vs tokens per forward")
    ax2.legend()
    fig.suptitle(f"moedec bench — {result['model']['label'][:80]} — {result['device']}", fontsize=9)
    fig.savefig(str(path), dpi=120)
