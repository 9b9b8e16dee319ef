"""``moedec bench`` and ``moedec explain``: typer commands over :mod:`moedec.bench` and
:mod:`moedec.explain`, the rich tables they print, and the batch-size benchmark's wiring.

``register(app)`` adds the commands to an app (``moedec.cli`` calls it on its own app).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

import typer

from .bench import device_name, encode_prompts
from .errors import MoedecError

BATCH_SCHEMA = "moedec.bench-batch/1"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _x(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}×"


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def bench_table(result: dict):
    """The rich table ``moedec bench`` prints."""
    from rich.table import Table

    m = result["model"]
    t = Table(title=f"moedec bench — {m['label']}", caption=(
        f"{result['device']} · {result['settings']['prompts']} prompts × {result['settings']['max_tokens']} tokens, "
        f"greedy · read/token and predictions: per-pair kernel | union kernel"
        + ("" if m["accounting"] == "ok" else f" · no accounting: {m['accounting']}")
        + "".join(f" · {r['name']}: no accounting: {r['accounting_error']}" for r in result["strategies"] if r.get("accounting_error"))))
    for col in ("strategy", "tok/s", "speedup", "tok/fwd", "accept", "union/layer", "read/token",
                "predicted", "lossless"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for r in result["strategies"]:
        a = r["accounting"] or {}
        per_tok = a.get("bytes_per_token") or {}
        pred = r["predicted_speedup"] or {}
        ll = r["lossless"]
        if ll["ok"] is None:
            lossless = "ref"
        elif ll["ok"]:
            lossless = "✓" + (f" ({ll['near_tie']} near-tie)" if ll["near_tie"] else "")
        else:
            d = ll["first_divergence"] or {}
            lossless = f"✗ (at {d.get('position')})"
        name = r["name"] + ("".join(f" {k}={v}" for k, v in r["options"].items()))
        t.add_row(
            name, f"{r['tok_s']:.1f}", _x(r["speedup"]), f"{r['tokens_per_forward']:.2f}",
            "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
            _f(a.get("mean_union_per_layer"), "{:.1f}"),
            f"{fmt_bytes(per_tok.get('pair'))} | {fmt_bytes(per_tok.get('union'))}" if per_tok else "-",
            f"{_x(pred.get('pair'))} | {_x(pred.get('union'))}" if pred else "-",
            lossless,
        )
    return t


def explain_table(result: dict):
    """The rich table ``moedec explain`` prints."""
    from rich.table import Table

    m = result["model"]
    single = result["single_step"]["bytes"]
    t = Table(title=f"moedec explain — {m['label']}", caption=(
        f"{result['device']} · {m['model_type']}: {m['expert_layers']} expert layers, {m['experts']} experts, top-{m['top_k']} · "
        f"single step reads {fmt_bytes(single['pair'])} · break-even = bytes of a K-token forward / a single step's = "
        "the tokens per forward a strategy must commit to win; accept needed = per-token acceptance rate that "
        "gives it with K-1 drafted tokens (pair = stock gather, union = each active expert once)"))
    for col in ("K", "union/layer", "if random", "break-even pair", "break-even union", "accept needed pair",
                "accept needed union"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        be, acc = r["break_even_tokens_per_forward"], r["acceptance_needed"]
        t.add_row(
            str(r["tokens"]), f"{r['union_per_layer']:.1f}", f"{r['union_if_random']:.1f}",
            f"{be['pair']:.2f}", f"{be['union']:.2f}",
            "impossible" if acc["pair"] is None else f"{acc['pair']:.0%}",
            "impossible" if acc["union"] is None else f"{acc['union']:.0%}",
        )
    return t


def batch_table(result: dict):
    from rich.table import Table

    t = Table(title=f"moedec bench --strategy batched — {result['model']['label']}", caption=result["device"])
    for col in ("batch size", "tokens", "seconds", "tok/s", "vs B=1"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        t.add_row(str(r["batch_size"]), str(r["tokens"]), f"{r['seconds']:.2f}", f"{r['tok_s']:.1f}", _x(r["ratio_vs_b1"]))
    return t


# -- batch sizes ----------------------------------------------------------------------------------


def run_batch_sizes(model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], batch_sizes: Sequence[int],
                    max_tokens: int, options: Optional[dict[str, str]] = None, progress: bool = True,
                    model_label: Optional[str] = None, kernel: Optional[str] = None) -> dict[str, Any]:
    """``moedec bench --strategy batched --batch-sizes ...``: total tok/s per batch size, from
    :func:`moedec.batch.bench_batch_sizes`."""
    import importlib
    import inspect

    try:
        mod = importlib.import_module("moedec.batch")
    except ModuleNotFoundError as e:
        if e.name != "moedec.batch":
            raise
        raise MoedecError("--batch-sizes needs the batched strategy (moedec.batch), which this build lacks") from None
    fn = getattr(mod, "bench_batch_sizes", None)
    if fn is None:
        raise MoedecError("moedec.batch has no bench_batch_sizes(); cannot benchmark batch sizes")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise MoedecError(f"batch sizes must be >= 1, got {sizes}")
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if "tokenizer" in params:
        kwargs["tokenizer"] = tokenizer
    if "progress" in params:
        kwargs["progress"] = progress
    if kernel is not None:
        if "kernel" not in params:
            raise MoedecError("bench_batch_sizes takes no kernel choice")
        kwargs["kernel"] = kernel
    if options:
        if "options" in params:
            kwargs["options"] = dict(options)
        elif var_kw:
            kwargs.update(options)
        else:
            raise MoedecError("bench_batch_sizes takes no strategy options")
    rows = fn(model, encode_prompts(prompts, tokenizer), sizes, max_tokens, **kwargs)
    need = ("batch_size", "tokens", "seconds", "tok_s", "ratio_vs_b1")
    clean = []
    for r in rows:
        missing = [k for k in need if k not in r]
        if missing:
            raise MoedecError(f"bench_batch_sizes returned a row without {missing[0]!r}")
        clean.append({k: r[k] for k in r})
    return {
        "schema": BATCH_SCHEMA, "device": device_name(),
        "model": {"label": model_label or getattr(model, "moedec_label", None) or type(model).__name__},
        "settings": {"max_tokens": max_tokens, "prompts": len(prompts), "batch_sizes": sizes, "kernel": kernel},
        "rows": clean,
    }


# -- commands -------------------------------------------------------------------------------------


def _load(model: Optional[str]):
    from .models import load

    m, tok = load(model)
    return m, tok, getattr(m, "moedec_label", None) or str(model)


def _write_json(result: dict, dest: str) -> None:
    text = json.dumps(result, indent=2)
    if dest == "-":
        print(text)
        return
    try:
        Path(dest).expanduser().write_text(text + "\n", encoding="utf-8")
    except OSError as e:
        raise MoedecError(f"cannot write {dest!r}: {e.strerror or e}") from None


def _print(table, to_stderr: bool) -> None:
    from rich.console import Console

    Console(stderr=to_stderr, width=max(120, Console().width)).print(table)


def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Local mlx-lm model directory (default: the built-in model)."),
    strategies: Optional[str] = typer.Option(None, "--strategies", "--strategy", "-s", help="Comma-separated strategies (default: every registered one that runs); single is always the baseline."),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="JSONL ({\"prompt\": ...} a line) or plain text (a prompt a line); default: a built-in set."),
    option: List[str] = typer.Option([], "--option", "-o", help="Strategy option STRATEGY.KEY=VALUE (repeatable)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", min=1),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Timed runs per (strategy, prompt)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="With --strategy batched: total tok/s per batch size, e.g. 1,2,4,8."),
    account: bool = typer.Option(True, "--account/--no-account", help="Trace expert traffic (an extra untimed run each)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Near-tie tolerance of the lossless check (default: 1e-4 for float32, 2 ulps for 16-bit)."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="MoE expert kernel: auto, stock or fused (default: generate's)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON to this file ('-': stdout)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Draw speedups and union curves to this PNG (needs matplotlib)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run strategies side by side on the same prompts (interleaved, one process) and explain them."""
    from moedec.cli import _warn_plugin_failures

    from .bench import load_prompts, parse_bench_options, require_matplotlib, run_bench, strategy_list
    from .bench_report import plot_bench

    _warn_plugin_failures()
    if plot:
        require_matplotlib()
    texts = load_prompts(prompts)
    if batch_sizes is not None:
        names = [s.strip() for s in (strategies or "").split(",") if s.strip()]
        if names != ["batched"]:
            raise MoedecError("--batch-sizes goes with --strategy batched alone")
        try:
            sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
        except ValueError:
            raise MoedecError(f"--batch-sizes: expected integers like 1,2,4,8, got {batch_sizes!r}") from None
        opts = parse_bench_options(option, ["batched"])["batched"]
        m, tok, label = _load(model)
        result = run_batch_sizes(m, tok, texts, sizes, max_tokens, opts, progress=progress, model_label=label, kernel=kernel)
        _print(batch_table(result), to_stderr=json_out == "-")
        if json_out:
            _write_json(result, json_out)
        return
    explicit = strategies is not None
    if explicit:
        names = strategy_list(strategies)
    else:
        from moedec.plugins import get_manager

        names = strategy_list(sorted(get_manager().strategies))
    opts = parse_bench_options(option, names)
    if explicit:
        from .api import resolve_strategy

        for n in names:
            resolve_strategy(n, dict(opts[n]))  # fail before loading the model
    m, tok, label = _load(model)
    result = run_bench(m, tok, names, texts, options=opts, max_tokens=max_tokens, repeats=repeats,
                       account=account, atol=atol, model_label=label, progress=progress, skip_failing=not explicit,
                       kernel=kernel)
    for s in result.get("skipped", []):
        print(f"moedec: warning: skipped strategy {s['name']!r}: {s['error']}", file=sys.stderr)
    _print(bench_table(result), to_stderr=json_out == "-")
    if json_out:
        _write_json(result, json_out)
    if plot:
        plot_bench(result, plot)


def explain(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Local mlx-lm model directory (default: the built-in model)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="JSONL or plain-text prompts (default: a built-in set)."),
    max_k: int = typer.Option(16, "--max-k", min=1, max=256, help="Largest verify forward measured (K tokens)."),
    windows: int = typer.Option(4, "--windows", min=1, help="Positions measured per prompt."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON to this file ('-': stdout)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Draw the union and break-even curves to this PNG (needs matplotlib)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Measure the expert union of K-token verify forwards and the tokens per forward needed to win."""
    from .bench import load_prompts, require_matplotlib
    from .explain import plot_explain, run_explain

    if plot:
        require_matplotlib()
    texts = load_prompts(prompts)
    m, tok, label = _load(model)
    result = run_explain(m, tok, texts, max_k=max_k, windows=windows, model_label=label, progress=progress)
    _print(explain_table(result), to_stderr=json_out == "-")
    if json_out:
        _write_json(result, json_out)
    if plot:
        plot_explain(result, plot)


def register(app: typer.Typer) -> None:
    """Add ``bench`` and ``explain`` to ``app`` (with moedec's one-line error handling)."""
    from moedec.cli import one_line_errors

    app.command("bench")(one_line_errors(bench))
    app.command("explain")(one_line_errors(explain))
