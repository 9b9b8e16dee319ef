"""Evaluate the default model on the held-out split of its corpus (the acceptance figures of issue 8).

1. held-out next-token accuracy and perplexity of the target (and of its MTP layer on token i+2, and
   of the draft model), on the exported (quantized) weights;
2. greedy continuations of held-out function headers, trimmed to the last complete line, parsed
   with ``ast`` (fraction that parse);
3. greedy acceptance of every speculative strategy on held-out code (mtp, draft-model, eagle, and
   any other registered one that runs with default options), and prompt-lookup's tokens per forward
   on an "edit this code" prompt that contains the code;
4. lossless: each strategy's greedy tokens vs ``single``'s (exact) and vs mlx-lm's own greedy
   decode (identical, or a near-tie at the first difference, as moedec.testing defines it).

Strategies that are not registered are reported as missing, never silently skipped.

    python examples/default-model/evaluate.py --model core/default_model --corpus /tmp/dm/corpus --out eval.json
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import moedec  # noqa: E402
from build_corpus import read_split  # noqa: E402
from moedec.errors import MoedecError  # noqa: E402

EXPECTED = ("single", "mtp", "draft-model", "eagle", "prompt-lookup")
EDIT_INTRO = "# Before:\n"
EDIT_ASK = "\n\n# After (the same code, with the docstring kept and nothing else changed):\n"


# -- held-out material -----------------------------------------------------------------------------

def functions(corpus: Path) -> list[dict[str, Any]]:
    """Held-out functions with a one-line signature: ``{file, line, header, source}`` (dedented)."""
    out = []
    for rel, text in read_split(corpus, "valid"):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno is None:
                continue
            head = lines[node.lineno - 1]
            if not head.rstrip().endswith(":") or node.body[0].lineno <= node.lineno:
                continue
            indent = head[: len(head) - len(head.lstrip())]
            body = [l[len(indent):] if l.startswith(indent) else l.lstrip() for l in lines[node.lineno - 1 : node.end_lineno]]
            out.append({"file": rel, "line": node.lineno, "header": head.strip(), "source": "\n".join(body)})
    out.sort(key=lambda f: (f["file"], f["line"]))
    return out


def spread(items: list, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def trim_to_line(text: str) -> str:
    """Up to and including the last newline."""
    cut = text.rfind("\n")
    return text[: cut + 1] if cut >= 0 else ""


def parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


# -- 1. held-out loss --------------------------------------------------------------------------------

def heldout_metrics(model, tokenizer, corpus: Path, *, seq: int, max_tokens: int, batch: int = 8,
                    draft=None, mtp=None) -> dict[str, Any]:
    """Loss/perplexity/accuracy on non-overlapping ``seq``-token windows of the held-out stream."""
    ids: list[int] = []
    eos = int(tokenizer.eos_token_id)
    for _, text in read_split(corpus, "valid"):
        ids += [eos, *tokenizer.encode(text)]
    n_win = max(1, min(len(ids) // (seq + 1), max_tokens // seq))
    data = np.array(ids[: n_win * (seq + 1)], np.int32).reshape(n_win, seq + 1)
    sums = {k: [0.0, 0, 0] for k in ("target", "mtp", "draft")}  # nll, correct, count

    def add(key, logits, labels):
        lf = logits.astype(mx.float32)
        nll = mx.logsumexp(lf, axis=-1) - mx.take_along_axis(lf, labels[..., None], axis=-1)[..., 0]
        acc = (mx.argmax(lf, axis=-1) == labels).sum()
        sums[key][0] += float(nll.sum())
        sums[key][1] += int(acc)
        sums[key][2] += labels.size

    for s in range(0, n_win, batch):
        b = mx.array(data[s : s + batch])
        x, y = b[:, :-1], b[:, 1:]
        hidden = model.model(x)  # [B, T, D]
        add("target", model.lm_head(hidden), y)
        if mtp is not None:
            out = mtp(hidden[:, :-1], y[:, :-1], model)
            add("mtp", mtp.logits(out, model), y[:, 1:])
        if draft is not None:
            add("draft", draft(x), y)
    res = {"windows": n_win, "seq": seq}
    for k, (nll, acc, cnt) in sums.items():
        if cnt:
            res[k] = {"tokens": cnt, "loss": nll / cnt, "perplexity": float(np.exp(nll / cnt)), "accuracy": acc / cnt}
    return res


# -- 2. header continuations -------------------------------------------------------------------------

#: a new statement after a (dedented) function's body: the function has ended. The model often
#: writes the body as a method's (8 spaces), so the next method also ends it.
FUNCTION_END = ["\ndef ", "\nclass ", "\n@", "\nif __name__", "\n    def ", "\n    @"]


def header_parse_rate(model, tokenizer, funcs: list[dict], max_tokens: int) -> dict[str, Any]:
    """Greedy continuation of each header (until the function ends, EOS, or ``max_tokens``), trimmed
    to its last complete line, parsed with ``ast``."""
    rows = []
    for f in funcs:
        # no trailing newline: the BPE merges a newline with the next line's indentation, so a prompt
        # ending in a bare "\n" asks the model for a token boundary it never saw in training
        prompt = f["header"]
        g = moedec.generate(model, prompt, "single", max_tokens=max_tokens, tokenizer=tokenizer, stop=FUNCTION_END)
        done = g.stats.finish_reason in ("stop", "eos")  # the function (or the file) ended
        code = prompt + (g.text + "\n" if done else trim_to_line(g.text))
        rows.append({"file": f["file"], "line": f["line"], "ok": parses(code), "ended": done, "code": code})
    ok = sum(r["ok"] for r in rows)
    return {"cases": len(rows), "parsed": ok, "fraction": ok / max(1, len(rows)),
            "ended": sum(r["ended"] for r in rows), "max_tokens": max_tokens, "samples": rows[:5]}


# -- 3 & 4. strategies ---------------------------------------------------------------------------------

def strategy_options(model_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        "single": {},
        "mtp": {"checkpoint": str(model_dir)},
        "draft-model": {"draft_model": str(model_dir / "draft")},
        "eagle": {"head": str(model_dir / "eagle")},
        "prompt-lookup": {},
    }


#: extra runs beside each strategy's defaults: acceptance against draft depth
VARIANTS = (("mtp", {"num_draft": 2}), ("draft-model", {"num_draft": 2}), ("eagle", {"num_draft": 1}),
            ("eagle", {"num_draft": 5}))


def run_strategies(model, tokenizer, model_dir: Path, prompts: list[list[int]], max_tokens: int,
                   atol: float, variants=(), deadline: Optional[float] = None) -> dict[str, Any]:
    """Every registered strategy on every prompt (greedy, exactly ``max_tokens`` tokens), then
    ``variants`` (``(name, extra options)``) of registered ones."""
    from moedec.plugins import get_manager
    from moedec.testing import compare_greedy, oracle_greedy

    registered = sorted(get_manager().strategies)
    opts = strategy_options(model_dir)
    result: dict[str, Any] = {"registered": registered, "missing": [s for s in EXPECTED if s not in registered],
                              "prompts": len(prompts), "max_tokens": max_tokens, "results": {}}
    refs = [oracle_greedy(model, p, max_tokens) for p in prompts]
    singles = None
    runs = [(s, s, {}) for s in ["single", *[s for s in registered if s != "single"]] if s in registered]
    runs += [(f"{s} " + " ".join(f"{k}={v}" for k, v in o.items()), s, o) for s, o in variants if s in registered]
    for label, name, extra in runs:
        row: dict[str, Any] = {"options": {**opts.get(name, {}), **extra}}
        if deadline is not None and time.perf_counter() > deadline and name != "single":
            row["error"] = "skipped: past the evaluation's time budget"
            result["results"][label] = row
            continue
        try:
            gens = [moedec.generate(model, p, name, max_tokens=max_tokens, eos_token_ids=[], **row["options"])
                    for p in prompts]
        except Exception as e:  # a strategy that cannot run here (missing option, a bug): say so, go on
            row["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, MoedecError) else str(e)
            result["results"][label] = row
            continue
        drafted = sum(g.stats.drafted for g in gens)
        accepted = sum(g.stats.accepted for g in gens)
        gen = sum(g.stats.generated_tokens for g in gens)
        fwd = sum(g.stats.forwards for g in gens)
        row.update(drafted=drafted, accepted=accepted, acceptance=accepted / drafted if drafted else None,
                   tokens_per_forward=gen / max(1, fwd),
                   decode_tps=float(np.mean([g.stats.decode_tps for g in gens])))
        if singles is None:
            singles = [list(g.tokens) for g in gens]
        row["equal_to_single"] = sum(list(g.tokens) == s for g, s in zip(gens, singles))
        divs = [compare_greedy(r, g.tokens, atol) for r, g in zip(refs, gens)]
        row["oracle_identical"] = sum(d is None for d in divs)
        row["oracle_near_tie"] = sum(d is not None and d.near_tie for d in divs)
        row["oracle_failures"] = [d.describe() for d in divs if d is not None and not d.near_tie]
        row["lossless"] = not row["oracle_failures"]
        result["results"][label] = row
    return result


def edit_prompts(funcs: list[dict], tokenizer, max_prompt: int) -> list[str]:
    out = []
    for f in funcs:
        src = f["source"]
        prompt = EDIT_INTRO + src + EDIT_ASK + f["header"]  # no bare trailing newline (see above)
        if len(tokenizer.encode(prompt)) <= max_prompt:
            out.append(prompt)
    return out


def prompt_lookup_edit(model, tokenizer, prompts: list[str], max_tokens: int) -> Optional[dict[str, Any]]:
    from moedec.plugins import get_manager

    if "prompt-lookup" not in get_manager().strategies or not prompts:
        return None
    gens = [moedec.generate(model, p, "prompt-lookup", max_tokens=max_tokens, tokenizer=tokenizer, eos_token_ids=[])
            for p in prompts]
    singles = [moedec.generate(model, p, "single", max_tokens=max_tokens, tokenizer=tokenizer, eos_token_ids=[])
               for p in prompts]
    gen = sum(g.stats.generated_tokens for g in gens)
    fwd = sum(g.stats.forwards for g in gens)
    drafted = sum(g.stats.drafted for g in gens)
    return {"prompts": len(prompts), "tokens_per_forward": gen / max(1, fwd),
            "acceptance": sum(g.stats.accepted for g in gens) / drafted if drafted else None,
            "equal_to_single": sum(list(a.tokens) == list(b.tokens) for a, b in zip(gens, singles)),
            "sample": prompts[0] + gens[0].text}


# -- driver ---------------------------------------------------------------------------------------------

def evaluate(model_dir: Optional[Path], corpus: Path, *, quick: bool = False, atol: float = 1e-3,
             max_seconds: Optional[float] = None) -> dict[str, Any]:
    """All figures as a dict; a section that raises is recorded under ``errors`` and the rest run.
    Past ``max_seconds`` the remaining sections (and strategies) are skipped, and say so."""
    t0 = time.perf_counter()
    deadline = None if max_seconds is None else t0 + max_seconds
    model, tok = moedec.load(None if model_dir is None else str(model_dir))
    model_dir = Path(getattr(model, "moedec_path", "") or moedec.models.BUNDLED_DIR)
    n = dict(seq=128 if quick else 512, held_tokens=4096 if quick else 262144, headers=6 if quick else 50,
             header_tokens=32 if quick else 128, accept_prompts=3 if quick else 16, accept_tokens=24 if quick else 128,
             edit_prompts=2 if quick else 10, edit_tokens=32 if quick else 128, prompt_max=200 if quick else 320)
    res: dict[str, Any] = {"model": str(model_dir), "device": str(mx.default_device()), "settings": n, "errors": {}}

    def section(name: str, fn) -> None:
        if deadline is not None and time.perf_counter() > deadline:
            res["errors"][name] = f"skipped: past the evaluation's {max_seconds:.0f} s"
            return
        try:
            res[name] = fn()
        except Exception as e:  # keep the other figures: this runs once, on scarce GPU time
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"evaluation section {name!r} failed: {type(e).__name__}: {e}", flush=True)

    from mlx_lm.utils import load_model

    draft = load_model(model_dir / "draft")[0] if (model_dir / "draft" / "config.json").is_file() else None
    mtp = None
    try:
        from moedec.strategies.mtp_loader import load_mtp

        mtp = load_mtp(model, model_dir)[0]
    except (ImportError, MoedecError) as e:
        res["errors"]["mtp_load"] = str(e)
    section("heldout", lambda: heldout_metrics(model, tok, corpus, seq=n["seq"], max_tokens=n["held_tokens"],
                                               draft=draft, mtp=mtp))
    funcs = functions(corpus)
    res["functions_available"] = len(funcs)
    section("headers", lambda: header_parse_rate(model, tok, spread(funcs, n["headers"]), n["header_tokens"]))
    prompts = [tok.encode("\n".join(f["source"].splitlines()[:8]) + "\n")[: n["prompt_max"]]
               for f in spread(funcs, n["accept_prompts"])]
    section("strategies", lambda: run_strategies(model, tok, model_dir, prompts, n["accept_tokens"], atol,
                                                 variants=() if quick else VARIANTS, deadline=deadline))
    small = [f for f in funcs if 6 <= f["source"].count("\n") <= 24]
    edits = edit_prompts(spread(small, 4 * n["edit_prompts"]), tok, n["prompt_max"])[: n["edit_prompts"]]
    section("edit", lambda: prompt_lookup_edit(model, tok, edits, n["edit_tokens"]))
    section("fibonacci", lambda: "def fibonacci(n):" + moedec.generate(
        model, "def fibonacci(n):", "single", max_tokens=64, tokenizer=tok).text)
    res["seconds"] = time.perf_counter() - t0
    return res


def summary(res: dict[str, Any]) -> str:
    """The figures as text (sections that failed are named with their error)."""
    lines = []
    h = res.get("heldout")
    if h:
        t = h["target"]
        lines.append(f"held-out ({t['tokens']} tokens): loss {t['loss']:.3f}, perplexity {t['perplexity']:.2f}, "
                     f"next-token accuracy {t['accuracy']:.1%}")
        for k in ("mtp", "draft"):
            if k in h:
                lines.append(f"  {k}: loss {h[k]['loss']:.3f}, accuracy {h[k]['accuracy']:.1%}")
    hd = res.get("headers")
    if hd:
        lines.append(f"headers: {hd['parsed']}/{hd['cases']} greedy continuations parse ({hd['fraction']:.0%}; "
                     f"{hd['ended']} reached the function's end within {hd['max_tokens']} tokens)")
    st = res.get("strategies")
    if st:
        n = st["prompts"]
        lines.append(f"strategies, greedy, {n} held-out prompts x {st['max_tokens']} tokens:")
        for name, r in st["results"].items():
            if "error" in r:
                lines.append(f"  {name:24s} not run: {r['error']}")
                continue
            acc = "n/a" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
            lines.append(f"  {name:24s} acceptance {acc:>4s}  {r['tokens_per_forward']:.2f} tok/fwd  "
                         f"{r['decode_tps']:.0f} tok/s  equal to single {r['equal_to_single']}/{n}, "
                         f"lossless {'yes' if r['lossless'] else 'NO'}")
        if st["missing"]:
            lines.append(f"  missing strategies (not registered): {', '.join(st['missing'])}")
    e = res.get("edit")
    if e:
        lines.append(f"prompt-lookup on 'edit this code' prompts: {e['tokens_per_forward']:.2f} tokens/forward "
                     f"({e['prompts']} prompts, equal to single {e['equal_to_single']}/{e['prompts']})")
    for name, err in res.get("errors", {}).items():
        lines.append(f"FAILED {name}: {err}")
    if res.get("fibonacci"):
        lines.append("fibonacci:\n" + res["fibonacci"])
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="few prompts, short outputs (CPU smoke test)")
    ap.add_argument("--max-seconds", type=float, default=None, help="skip what remains after this long")
    a = ap.parse_args(argv)
    res = evaluate(a.model, a.corpus, quick=a.quick, max_seconds=a.max_seconds)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    print(summary(res))
    print(f"({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
