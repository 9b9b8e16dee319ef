"""The ``moedec`` command line: thin typer wrappers around plain functions.

Every :class:`~moedec.MoedecError` is printed as one line on stderr with a non-zero exit; set
``MOEDEC_DEBUG=1`` to see tracebacks instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, List, Optional

import typer

from .errors import MoedecError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Decoding strategies for MoE LLMs on MLX.")


def _err(msg: str) -> None:
    print(f"moedec: error: {msg}", file=sys.stderr)


def one_line_errors(fn):
    """Turn MoedecErrors into a single stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoedecError as e:
            if os.environ.get("MOEDEC_DEBUG"):
                raise
            _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise typer.Exit(2)

    return wrapper


def _warn_plugin_failures() -> None:
    from moedec.plugins import get_manager
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        host = get_manager()
    for f in host.failures:
        print(f"moedec: warning: {f.message()}", file=sys.stderr)


# -- strategies -----------------------------------------------------------------------------------


def strategy_rows(verbose: bool = False) -> list[dict[str, Any]]:
    """One dict per registered strategy: name, package, version, options (and hooks if verbose)."""
    from moedec.options import describe_option, option_fields
    from moedec.plugins import get_manager, strategy_hooks

    rows = []
    for name, info in sorted(get_manager().strategies.items()):
        row = {
            "name": name,
            "package": info.package,
            "version": info.version,
            "plugin": info.plugin,
            "options": [describe_option(info.cls, f) for f in option_fields(info.cls)],
            "doc": (info.cls.__doc__ or "").strip().splitlines()[0] if info.cls.__doc__ else "",
        }
        if verbose:
            row["hooks"] = strategy_hooks(info.cls)
        rows.append(row)
    return rows


@app.command()
@one_line_errors
def strategies(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show hooks and plugin module."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the available decoding strategies, where they come from, and their options."""
    _warn_plugin_failures()
    rows = strategy_rows(verbose)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="moedec strategies")
    table.add_column("strategy", style="bold")
    table.add_column("source")
    table.add_column("options")
    if verbose:
        table.add_column("hooks")
        table.add_column("plugin")
    for r in rows:
        cells = [r["name"], f"{r['package']} {r['version']}", "\n".join(r["options"]) or "-"]
        if verbose:
            cells += [", ".join(r["hooks"]) or "(engine defaults)", r["plugin"]]
        table.add_row(*cells)
    Console(width=max(100, Console().width)).print(table)


# -- generate -------------------------------------------------------------------------------------


def run_generate(
    prompt: Optional[str],
    model: Optional[str],
    strategy: str,
    options: List[str],
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    seed: Optional[int],
    stop: List[str],
    as_json: bool,
    kernel: str = "auto",
    out=None,
    err=None,
    prompts_file: Optional[str] = None,
    compile_step: Optional[bool] = None,
) -> dict[str, Any]:
    """What ``moedec generate`` does; returns the result dict (tokens, text, stats). With
    ``prompts_file``: one JSON result a line for every prompt in it (see :mod:`moedec.batch_cli`)."""
    out = out or sys.stdout
    err = err or sys.stderr
    from moedec.api import resolve_strategy, stream_generate
    from moedec.models import load
    from moedec.options import parse_cli_options

    instance, _ = resolve_strategy(strategy, parse_cli_options(options))  # fail fast, before loading
    if prompts_file is not None:
        if prompt is not None:
            raise MoedecError("give a PROMPT or --prompts FILE, not both")
        from moedec.batch_cli import run_prompts_file

        return run_prompts_file(prompts_file, model, strategy, parse_cli_options(options), max_tokens, temp,
                                top_p, top_k, seed, stop, kernel=kernel, out=out, err=err)
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise MoedecError("no prompt given (pass it as an argument or on stdin)")
        prompt = sys.stdin.read()
    m, tok = load(model)
    label = getattr(m, "moedec_label", None)
    if label:
        print(f"[model: {label}]", file=err)
    dec = stream_generate(
        m, prompt, instance, max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k,
        seed=seed, tokenizer=tok, stop=stop, kernel=kernel, compile_step=compile_step,
    )
    for chunk in dec:
        if not as_json and chunk.text:
            out.write(chunk.text)
            out.flush()
    result = dec.result.as_dict()
    if label:
        result["model"] = label
    if as_json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write("\n")
        s = dec.result.stats
        print(
            f"[{s.strategy}] {s.generated_tokens} tokens, {s.forwards} forwards "
            f"({s.tokens_per_forward:.2f} tokens/forward, acceptance {s.acceptance_rate:.0%}), "
            f"{s.decode_tps:.1f} tok/s decode, prefill {s.prefill_time * 1000:.0f} ms, "
            f"finish: {s.finish_reason}",
            file=err,
        )
    return result


@app.command()
@one_line_errors
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text (read from stdin if omitted)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Local mlx-lm model directory (default: the built-in model)."),
    strategy: str = typer.Option("single", "--strategy", "-s", help="Decoding strategy (see `moedec strategies`)."),
    option: List[str] = typer.Option([], "--option", "-o", help="Strategy option key=value (repeatable)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", min=0),
    temp: float = typer.Option(0.0, "--temp", "-t", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: List[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: tokens, text, stats."),
    kernel: str = typer.Option("auto", "--kernel", help="MoE expert kernel: auto, stock or fused (CUDA)."),
    compile_step: Optional[bool] = typer.Option(None, "--compile-step/--no-compile-step", help="Run single-token steps as one mx.compile'd graph (same output). Default: on with MLX's CUDA backend only."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="File of prompts (JSONL {\"prompt\": ...} or one a line; - for stdin): one JSON result a line."),
) -> None:
    """Generate text with a decoding strategy, streaming it as it is decoded."""
    _warn_plugin_failures()
    run_generate(prompt, model, strategy, option, max_tokens, temp, top_p, top_k, seed, stop, as_json, kernel,
                 prompts_file=prompts, compile_step=compile_step)


from .cli_bench import register as _register_bench; _register_bench(app)  # noqa: E402,E702  bench, explain


def main() -> None:
    app()


if __name__ == "__main__":
    main()
