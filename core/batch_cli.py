"""``moedec generate --prompts FILE``: many prompts in, one JSON result a line out, with a progress
bar (rows done / total, total tok/s) on stderr."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

from .errors import MoedecError

#: Keys a JSONL line may carry besides ``prompt``; the settings override the command-line ones.
LINE_KEYS = ("prompt", "id", "max_tokens", "temperature", "top_p", "top_k", "seed")


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Prompt records from ``path`` (``-``: stdin). JSONL (``{"prompt": ...}`` a line, when the first
    non-blank line starts with ``{``) or plain text, one prompt a line; blank lines are skipped."""
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MoedecError(f"prompts file {path!r} does not exist")
        text = p.read_text(encoding="utf-8")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise MoedecError(f"prompts file {path!r} holds no prompts")
    if not lines[0][1].lstrip().startswith("{"):
        return [{"prompt": line} for _, line in lines]
    out = []
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoedecError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise MoedecError(f'{path}:{n}: expected an object with a "prompt" key')
        unknown = sorted(set(rec) - set(LINE_KEYS))
        if unknown:
            raise MoedecError(f"{path}:{n}: unknown key {unknown[0]!r} (known: {', '.join(LINE_KEYS)})")
        prompt = rec["prompt"]
        ok = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        if not ok or not prompt:
            raise MoedecError(f"{path}:{n}: prompt must be a non-empty string or a list of token ids")
        out.append(rec)
    return out


def run_prompts_file(
    path: str,
    model: Optional[str],
    strategy: str,
    options: dict[str, str],
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    seed: Optional[int],
    stop: List[str],
    *,
    kernel: str = "auto",
    out=None,
    err=None,
) -> dict[str, Any]:
    """Generate for every prompt in ``path``; write one JSON object a line to ``out`` in prompt order
    (as soon as each and all before it are done). Returns ``{"results": [...], "tokens", "seconds",
    "tok_s"}``. A line's ``seed`` overrides; otherwise row ``i`` uses ``seed + i``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moedec.api import generate_batch
    from moedec.models import load

    out = out or sys.stdout
    err = err or sys.stderr
    recs = read_prompts(path)
    m, tok = load(model)
    label = getattr(m, "moedec_label", None)
    if label:
        print(f"[model: {label}]", file=err)

    def setting(key: str, default: Any) -> list:
        return [r.get(key, default) for r in recs]

    seeds = [r.get("seed", None if seed is None else seed + i) for i, r in enumerate(recs)]
    results: list[Optional[dict]] = [None] * len(recs)
    written, total = 0, 0
    t0 = time.perf_counter()
    progress = Progress(
        TextColumn(f"[bold]{strategy}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TextColumn("{task.fields[tps]:.1f} tok/s"), TimeElapsedColumn(),
        console=Console(file=err), transient=False,
    )

    def on_result(i: int, g) -> None:
        nonlocal written, total
        rec = {"index": i, **({"id": recs[i]["id"]} if "id" in recs[i] else {}), "prompt": recs[i]["prompt"],
               **g.as_dict()}
        if label:
            rec["model"] = label
        results[i] = rec
        total += len(g.tokens)
        while written < len(results) and results[written] is not None:
            out.write(json.dumps(results[written]) + "\n")
            written += 1
        out.flush()
        progress.update(task, advance=1, tps=total / max(time.perf_counter() - t0, 1e-9))

    with progress:
        task = progress.add_task("generate", total=len(recs), tps=0.0)
        generate_batch(
            m, [r["prompt"] for r in recs], strategy, max_tokens=setting("max_tokens", max_tokens),
            temperature=setting("temperature", temp), top_p=setting("top_p", top_p), top_k=setting("top_k", top_k),
            seed=seeds, tokenizer=tok, stop=stop, kernel=kernel, on_result=on_result, **options,
        )
    seconds = time.perf_counter() - t0
    print(f"[{strategy}] {len(recs)} prompts, {total} tokens in {seconds:.2f} s, "
          f"{total / seconds if seconds > 0 else 0.0:.1f} tok/s total", file=err)
    return {"results": results, "tokens": total, "seconds": seconds, "tok_s": total / seconds if seconds > 0 else 0.0}
