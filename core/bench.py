"""``moedec bench``: strategies side by side on the same prompts, in one process, interleaved.

For every strategy: decode tok/s and the speedup over ``single`` (measured), tokens per forward,
acceptance, the mean expert union per layer, bytes read per token, the cost model's predicted
speedup for both kernels, and whether its greedy output equals ``single``'s (lossless). Timed runs
carry no observer (``single`` keeps the engine's pipelined loop); the expert traffic comes from a
separate accounted run of each (strategy, prompt) with :class:`~moedec.accounting.ExpertAccounting`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import mlx.core as mx

from . import costmodel
from .accounting import ExpertAccounting, ForwardRecord
from .inventory import KERNELS, ModelBytes, expert_modules, model_bytes
from .errors import MoedecError

SCHEMA = "moedec.bench/1"
BASELINE = "single"

BUILTIN_PROMPTS = (
    "The mixture-of-experts layer sends every token to a few experts. Each expert is a small "
    "feed-forward network, and the router picks the experts with the highest scores. When many "
    "tokens pick the same experts, the layer reads fewer weights; when they pick different experts, "
    "the layer reads more weights. The router picks the experts with the highest scores, and",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result = result * i\n"
    "    return result\n\n\ndef triangular(n):\n    result = 0\n    for i in range(1, n + 1):\n",
    "Shopping list for the week: apples, bread, butter, cheese, eggs, milk, rice, tomatoes. "
    "Monday: apples, bread and cheese. Tuesday: eggs, milk and rice. Wednesday: apples, bread and "
    "butter. Thursday: eggs, milk and tomatoes. Friday: apples, bread and",
    "Memory bandwidth limits decoding on large models: every generated token reads the active "
    "weights once. Speculative decoding verifies several drafted tokens in one forward pass, which "
    "pays off when the drafts are accepted and the forward pass costs little more than a single "
    "step. On a mixture-of-experts model the verify pass reads the union of the experts",
    "Q: What is the capital of France?\nA: The capital of France is Paris.\nQ: What is the capital "
    "of Italy?\nA: The capital of Italy is Rome.\nQ: What is the capital of Spain?\nA: The capital "
    "of Spain is Madrid.\nQ: What is the capital of Germany?\nA:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his "
    "granddaughter. Every morning they walked down to the harbour, checked the nets, and listened "
    "to the gulls. One morning the nets were empty, and the old fisherman said",
)


# -- inputs ---------------------------------------------------------------------------------------


def load_prompts(path: Optional[str | Path]) -> list[str]:
    """Prompts from a file — JSONL (``{"prompt": ...}`` a line) or plain text (one prompt a line) —
    or the built-in set when ``path`` is ``None``."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    p = Path(path).expanduser()
    if not p.is_file():
        raise MoedecError(f"prompts file {str(path)!r} does not exist")
    lines = [l for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise MoedecError(f"prompts file {str(path)!r} is empty")
    if not lines[0].lstrip().startswith("{"):
        return lines
    out = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoedecError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise MoedecError(f'{path}:{n}: expected an object with a string "prompt"')
        out.append(obj["prompt"])
    return out


def strategy_list(spec: str | Sequence[str]) -> list[str]:
    """Names from ``"a,b,c"`` (or a list), without duplicates, ``single`` first (added if absent)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for s in items:
        s = s.strip()
        if s and s not in names:
            names.append(s)
    if not names:
        raise MoedecError("no strategies given")
    if BASELINE in names:
        names.remove(BASELINE)
    return [BASELINE, *names]


def parse_bench_options(pairs: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["prompt-lookup.num_draft=4"]`` -> ``{"prompt-lookup": {"num_draft": "4"}}``."""
    from .options import parse_cli_options

    out: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in parse_cli_options(list(pairs)).items():
        strat, dot, opt = key.partition(".")
        if not dot or not opt:
            raise MoedecError(f"bench options name their strategy: -o STRATEGY.KEY=VALUE (got {key}={value})")
        if strat not in out:
            raise MoedecError(f"option {key!r} is for strategy {strat!r}, which is not benchmarked ({', '.join(names)})")
        out[strat][opt] = value
    return out


def encode_prompts(prompts: Sequence[str | Sequence[int]], tokenizer: Any) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise MoedecError("text prompts need a tokenizer")
            out.append([int(t) for t in tokenizer.encode(p)])
        else:
            out.append([int(t) for t in p])
    if not out:
        raise MoedecError("no prompts")
    return out


def device_name() -> str:
    dev = mx.default_device()
    try:
        info = mx.device_info()
        name = info.get("device_name") or info.get("architecture") or ""
    except Exception:
        name = ""
    return f"{dev.type.name if hasattr(dev.type, 'name') else dev.type}: {name}".strip(": ")


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr (``bar.advance(n=1, note=None)``); a no-op when disabled."""

    class _Bar:
        def __init__(self, prog=None, task=None):
            self.prog, self.task = prog, task

        def advance(self, n: int = 1, note: Optional[str] = None) -> None:
            if self.prog is not None:
                self.prog.update(self.task, advance=n, **({"description": f"{description} {note}"} if note else {}))

    if not enabled:
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        yield _Bar(prog, prog.add_task(description, total=total))


def require_matplotlib():
    """``matplotlib.figure.Figure``, or a one-line error telling how to install the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MoedecError("--plot needs matplotlib: pip install moedec[plot]") from None
    return Figure


# -- lossless -------------------------------------------------------------------------------------


def compare_outputs(model, prompt: Sequence[int], ref: Sequence[int], got: Sequence[int], atol: Optional[float]) -> dict:
    """``{"status": exact|near-tie|diverged, ...}``: ``got`` against the reference (``single``'s)
    greedy tokens. At the first difference the reference logits decide: both tokens within ``atol``
    of the maximum is a near-tie (allowed). ``atol`` ``None``: 1e-4 for float32 logits, two ulps of
    the maximum logit for 16-bit ones."""
    from .forward import forward, new_cache

    ref, got = [int(t) for t in ref], [int(t) for t in got]
    for i in range(max(len(ref), len(got))):
        a = ref[i] if i < len(ref) else None
        b = got[i] if i < len(got) else None
        if a == b:
            continue
        if a is None or b is None:
            return {"status": "diverged", "position": i, "expected": a, "got": b, "margin": None}
        logits, _ = forward(model, [*prompt, *ref[:i]], new_cache(model))
        row = logits[-1].astype(mx.float32)
        top = float(row.max().item())
        tol = atol
        if tol is None:
            tol = 1e-4 if logits.dtype == mx.float32 else 2 * float(mx.finfo(logits.dtype).eps) * max(1.0, abs(top))
        margin = top - float(row[b].item())
        near = margin <= tol and top - float(row[a].item()) <= tol
        return {"status": "near-tie" if near else "diverged", "position": i, "expected": a, "got": b, "margin": margin}
    return {"status": "exact"}


# -- the benchmark --------------------------------------------------------------------------------


def mlx_lm_decode(model, prompt: Sequence[int], max_tokens: int) -> tuple[float, list[int]]:
    """mlx-lm's own greedy ``generate_step`` on ``prompt``, the baseline of the benchmark scripts:
    ``(decode tok/s, tokens)``, timed from the first token on (prefill excluded)."""
    import time

    from mlx_lm.generate import generate_step

    tokens, t1 = [], None
    for i, (y, _) in enumerate(generate_step(mx.array(list(prompt)), model, max_tokens=max_tokens)):
        if i == 0:
            t1 = time.perf_counter()
        tokens.append(int(y))
    return (max_tokens - 1) / (time.perf_counter() - t1), tokens


def _accounting_summary(records: list[ForwardRecord], decoded: int) -> dict[str, Any]:
    cost = costmodel.ForwardCost.from_records(records)
    by_t: dict[int, list[ForwardRecord]] = {}
    for r in records:
        by_t.setdefault(r.tokens, []).append(r)
    return {
        "forwards": cost.forwards,
        "mean_tokens_fed": cost.tokens,
        "mean_union_per_layer": cost.union,
        "mean_selections_per_layer": cost.selections,
        "bytes_per_forward": {k: cost.bytes(k) for k in KERNELS},
        "bytes_per_token": {k: costmodel.bytes_per_token(records, decoded, k) for k in KERNELS} if decoded else None,
        "union_by_tokens": [
            {"tokens": t, "union": costmodel.mean(r.mean_union for r in rs), "forwards": len(rs)}
            for t, rs in sorted(by_t.items())
        ],
    }


def run_bench(
    model: Any,
    tokenizer: Any,
    strategies: str | Sequence[str],
    prompts: Sequence[str | Sequence[int]],
    *,
    options: Optional[dict[str, dict[str, Any]]] = None,
    max_tokens: int = 64,
    repeats: int = 1,
    warmup: bool = True,
    account: bool = True,
    atol: Optional[float] = None,
    model_label: Optional[str] = None,
    progress: bool = True,
    skip_failing: bool = False,
    kernel: Optional[str] = None,
) -> dict[str, Any]:
    """Benchmark ``strategies`` (``single`` always included, as the baseline) on ``prompts``;
    returns the JSON-ready result (schema :data:`SCHEMA`, checked by :func:`~moedec.bench_report.validate_bench`).

    ``kernel``: the MoE kernel passed to :func:`moedec.generate` (``None``: its default).
    ``skip_failing``: a strategy that cannot be built or fails its warm-up run (e.g. one that needs
    an option such as a draft model) is left out and listed under ``"skipped"`` instead of raising.
    """
    from .api import generate, resolve_strategy

    names = strategy_list(strategies)
    opts = {n: dict((options or {}).get(n, {})) for n in names}
    extra = set(options or {}) - set(names)
    if extra:
        raise MoedecError(f"options given for {sorted(extra)[0]!r}, which is not benchmarked")
    skipped: list[dict[str, str]] = []

    def skip(name: str, err: MoedecError) -> None:
        if not skip_failing or name == BASELINE:
            raise err
        names.remove(name)
        skipped.append({"name": name, "error": str(err).splitlines()[0]})

    for n in list(names):
        try:
            resolve_strategy(n, dict(opts[n]))  # unknown names and bad options fail before any work
        except MoedecError as e:
            skip(n, e)
    if repeats < 1 or max_tokens < 1:
        raise MoedecError("repeats and max_tokens must be >= 1")
    ids = encode_prompts(prompts, tokenizer)
    eos: list[int] = []  # EOS ignored: every strategy decodes exactly max_tokens of every prompt
    inv: Optional[ModelBytes] = None
    why_not = None
    if account:
        try:
            inv = model_bytes(model)
        except MoedecError as e:
            why_not = str(e)

    def run(name: str, prompt: list[int], n_tokens: int, plugins=()):
        instance, _ = resolve_strategy(name, dict(opts[name]))
        return generate(model, prompt, instance, max_tokens=n_tokens, temperature=0.0,
                        eos_token_ids=eos, plugins=plugins, **({} if kernel is None else {"kernel": kernel}))

    timed: dict[str, list] = {n: [] for n in names}  # [(prompt index, Generation)]
    records: dict[str, list[ForwardRecord]] = {n: [] for n in names}
    acc_decoded = {n: 0 for n in names}
    acct_errors: dict[str, str] = {}
    total = len(names) * len(ids) * (repeats + (inv is not None)) + (len(names) if warmup or skip_failing else 0)
    with progress_bar(total, "bench", progress) as bar:
        if warmup or skip_failing:
            for n in list(names):
                try:
                    run(n, ids[0], min(8, max_tokens) if warmup else 2)
                except MoedecError as e:
                    skip(n, e)
                    timed.pop(n)
                    records.pop(n)
                bar.advance(note=f"warmup {n}")
        for r in range(repeats):
            for i, p in enumerate(ids):
                shift = (i + r) % len(names)
                for n in names[shift:] + names[:shift]:  # rotate who goes first
                    timed[n].append((i, run(n, p, max_tokens)))
                    bar.advance(note=n)
        if inv is not None:
            for i, p in enumerate(ids):
                for n in names:
                    if n not in acct_errors:
                        acct = ExpertAccounting(inv)
                        try:
                            g = run(n, p, max_tokens, plugins=[acct])
                            records[n].extend(acct.records)
                            acc_decoded[n] += max(g.stats.generated_tokens - 1, 0)
                        except MoedecError as e:  # this strategy cannot be traced; the others still are
                            acct_errors[n] = str(e).splitlines()[0]
                            records[n], acc_decoded[n] = [], 0
                    bar.advance(note=f"accounting {n}")

    rows = []
    ref_tokens: dict[int, tuple] = {}
    for i, g in timed[BASELINE]:
        ref_tokens.setdefault(i, g.tokens)
    for n in names:
        gens = [g for _, g in timed[n]]
        decoded = sum(max(g.stats.generated_tokens - 1, 0) for g in gens)
        decode_time = sum(g.stats.decode_time for g in gens)
        forwards = sum(g.stats.forwards for g in gens)
        drafted = sum(g.stats.drafted for g in gens)
        accepted = sum(g.stats.accepted for g in gens)
        row: dict[str, Any] = {
            "name": n,
            "options": {k: str(v) for k, v in opts[n].items()},
            "generated_tokens": sum(g.stats.generated_tokens for g in gens),
            "decoded_tokens": decoded,
            "forwards": forwards,
            "decode_time": decode_time,
            "tok_s": decoded / decode_time if decode_time > 0 else 0.0,
            "tokens_per_forward": decoded / forwards if forwards else 0.0,
            "acceptance": accepted / drafted if drafted else None,
            "drafted": drafted,
            "accepted": accepted,
            "accounting": _accounting_summary(records[n], acc_decoded[n]) if records[n] else None,
            "accounting_error": acct_errors.get(n),
        }
        checks = [] if n == BASELINE else [
            compare_outputs(model, ids[i], ref_tokens[i], g.tokens, atol) for i, g in timed[n] if i in ref_tokens
        ]
        bad = next((c for c in checks if c["status"] == "diverged"), None)
        row["lossless"] = {
            "ok": None if n == BASELINE else bad is None,
            "exact": sum(c["status"] == "exact" for c in checks),
            "near_tie": sum(c["status"] == "near-tie" for c in checks),
            "diverged": sum(c["status"] == "diverged" for c in checks),
            "first_divergence": bad,
        }
        rows.append(row)

    base = rows[0]
    base_cost = costmodel.ForwardCost.from_records(records[BASELINE]) if records[BASELINE] else None
    for row in rows:
        row["speedup"] = costmodel.ratio(row["tok_s"], base["tok_s"])
        pred = None
        if base_cost is not None and records[row["name"]]:
            cost = costmodel.ForwardCost.from_records(records[row["name"]])
            tau = acc_decoded[row["name"]] / cost.forwards
            pred = costmodel.strategy_prediction(tau, cost, base_cost)
        row["predicted_speedup"] = pred
        row["measured_over_predicted"] = (
            {k: costmodel.ratio(row["speedup"], pred[k]) for k in KERNELS} if pred and row["speedup"] is not None else None
        )

    kinds = sorted({type(m).__name__ + (f"({m.moedec_backend})" if getattr(m, "moedec_backend", None) else "")
                    for _, m in expert_modules(model)})
    return {
        "schema": SCHEMA,
        "device": device_name(),
        "model": {
            "label": model_label or getattr(model, "moedec_label", None) or type(model).__name__,
            "model_type": getattr(getattr(model, "args", None), "model_type", None),
            "expert_module": ", ".join(kinds) or None,
            "bytes": inv.as_dict() if inv is not None else None,
            "accounting": "ok" if inv is not None else (why_not or "off"),
        },
        "settings": {
            "max_tokens": max_tokens, "prompts": len(ids), "repeats": repeats, "warmup": warmup,
            "temperature": 0.0, "atol": atol, "kernel": kernel, "eos": "ignored",
        },
        "strategies": rows,
        "skipped": skipped,
    }
