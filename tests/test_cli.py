"""The CLI: thin wrappers, one-line errors, no tracebacks."""

import json
import re
import subprocess
import sys

from typer.testing import CliRunner

from moedec.cli import app, strategy_rows

runner = CliRunner()


def test_strategies_lists_single_with_its_source():
    r = runner.invoke(app, ["strategies"])
    assert r.exit_code == 0 and "single" in r.output and "moedec" in r.output
    rows = strategy_rows(verbose=True)
    single = next(x for x in rows if x["name"] == "single")
    assert single["package"] == "moedec" and single["plugin"] == "moedec.strategies.single"
    r = runner.invoke(app, ["strategies", "--json"])
    assert any(x["name"] == "single" for x in json.loads(r.output))


def test_generate_streams_and_reports():
    r = runner.invoke(app, ["generate", "def add(a, b):", "--max-tokens", "16"])
    assert r.exit_code == 0, r.output
    assert "[model: " in r.output and ("bundled default model" in r.output or "built-in random MoE" in r.output)
    assert re.search(r"\[single\] 1?\d tokens, ", r.output)


def test_generate_json():
    r = runner.invoke(app, ["generate", "def add(a, b):", "--max-tokens", "8", "--json"])
    assert r.exit_code == 0
    line = [l for l in r.stdout.splitlines() if l.startswith("{")][-1]
    out = json.loads(line)
    assert len(out["tokens"]) == 8 and isinstance(out["text"], str)
    assert out["stats"]["generated_tokens"] == 8 and out["stats"]["forwards"] == 7
    assert {"tokens_per_forward", "decode_tps", "wall_time"} <= set(out["stats"])


def test_prompt_from_stdin():
    import moedec

    _, tok = moedec.load()
    r = runner.invoke(app, ["generate", "--max-tokens", "4", "--json"], input="hi there")
    assert r.exit_code == 0
    assert json.loads(r.stdout.splitlines()[-1])["stats"]["prompt_tokens"] == len(tok.encode("hi there"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moedec.cli", *args], capture_output=True, text=True, timeout=120)


def test_errors_are_one_line_without_traceback():
    cases = [
        (["generate", "hi", "--strategy", "nope"], "unknown strategy 'nope'; available: "),
        (["generate", "hi", "-o", "num_draft=3"], "strategy 'single' has no option 'num_draft'"),
        (["generate", "hi", "-o", "oops"], "expected key=value"),
        (["generate", "hi", "--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["generate", "hi", "--temp", "-1"], "bad sampling setting"),
    ]
    for args, msg in cases:
        p = run_cli(*args)
        assert p.returncode != 0, args
        assert "Traceback" not in p.stderr, p.stderr
        errors = [l for l in p.stderr.splitlines() if l.startswith("moedec: error:")]
        assert len(errors) == 1 and msg in errors[0], p.stderr
    assert "single" in run_cli("generate", "hi", "--strategy", "nope").stderr
