"""Meta-test: every hookspec is documented (when called, what it returns, what None means) and
exercised by a test in this suite."""

import inspect
from pathlib import Path

import pluggy

import moedec
from moedec import hookspecs


def spec_names():
    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "moedec_spec")]


def test_the_hook_set_is_the_designed_one():
    assert sorted(spec_names()) == sorted(["register_strategies", "draft", "verify", "accept", "prefill", "on_accept"])
    assert moedec.hookimpl is hookspecs.hookimpl and moedec.hookspec is hookspecs.hookspec
    assert isinstance(moedec.hookimpl, pluggy.HookimplMarker)


def test_every_hookspec_is_documented():
    for name in spec_names():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Called" in doc, f"{name}: say when it is called"
        assert "Return" in doc or "return" in doc, f"{name}: say what it returns"
        if name in ("draft", "verify", "accept"):
            assert "None" in doc, f"{name}: say what None means"


def test_every_hookspec_is_exercised_by_a_test():
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name)
    tests += (Path(__file__).parent / "helpers.py").read_text()
    for name in spec_names():
        assert f"def {name}(" in tests, f"no test implements hook {name!r}"


def test_firstresult_hooks():
    for name in ("draft", "verify", "accept"):
        assert getattr(hookspecs, name).moedec_spec["firstresult"]
