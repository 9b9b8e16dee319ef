"""docs/plugins.md is the plugin author's contract: every hookspec is documented there with its exact
signature and has a test here (``test_hook_<name>_*``) of what the page says it does; the tutorial's
plugin, taken from the page, installs with ``pip install -e``, is listed, runs and conforms."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import mlx.core as mx
import pytest

import moedec
from moedec import Acceptance, Verification, hookspecs
from moedec.errors import PluginError
from moedec.forward import cache_length, forward
from moedec.plugins import build_host
from moedec.testing import oracle_greedy, tiny_models

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"


def spec_names():
    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "moedec_spec")]


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    return text.replace("( ", "(").replace(" )", ")").replace(",)", ")")


def declaration(name: str) -> str:
    """The hookspec's decorator and ``def`` line(s), verbatim from core/hookspecs.py."""
    src = inspect.getsource(getattr(hookspecs, name))
    return normalize(re.match(r"(@.*?\n)?def .*?\):?.*?:\n", src, re.S).group(0)).strip()


def section(name: str) -> str:
    doc = DOC.read_text()
    start = doc.index(f"### `{name}`")
    nxt = doc.find("\n### ", start + 1)
    return doc[start : nxt if nxt > 0 else len(doc)]


# -- the meta-tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", spec_names())
def test_every_hookspec_is_documented_with_its_exact_signature(name):
    text = section(name)
    decl = declaration(name)
    assert decl in normalize(text), f"docs/plugins.md: the `{name}` section must show `{decl}`"
    assert "Called" in text or "called" in text, f"{name}: say when it is called"
    assert "Return" in text or "return" in text, f"{name}: say what it returns"
    if getattr(hookspecs, name).moedec_spec["firstresult"]:
        assert "None" in text, f"{name}: say what None means"


def test_every_hookspec_has_a_test_of_its_documented_behaviour():
    tests = {n for n, f in globals().items() if n.startswith("test_hook_") and callable(f)}
    for name in spec_names():
        assert any(t.startswith(f"test_hook_{name}_") for t in tests), f"no test_hook_{name}_* in {__file__}"


def test_the_documented_hooks_are_exactly_the_declared_ones():
    documented = set(re.findall(r"^### `(\w+)`", DOC.read_text(), re.M))
    assert documented == set(spec_names())
    for word in ("MOEDEC_LOAD_PLUGINS", "failed to load", "--verbose", "check_strategy", "assert_lossless",
                 "-p moedec.testing", "pytest11"):
        assert word in DOC.read_text()


# -- one test per hook, of what the page says -----------------------------------------------------


def strategy(**hooks):
    return type("Doc", (), {"name": "doc", **{k: moedec.hookimpl(v) for k, v in hooks.items()}})()


@pytest.fixture
def model():
    return tiny_models()[0]


def test_hook_register_strategies_registers_by_name_and_refuses_duplicates(tmp_path, monkeypatch):
    code = """
import attrs, moedec
@attrs.define
class A:
    name = "doc-a"
    n: int = attrs.field(default=2, validator=moedec.in_range(1, 4))
@moedec.hookimpl
def register_strategies(register):
    register(A)
"""
    (tmp_path / "doc_plug_a.py").write_text(code)
    (tmp_path / "doc_plug_b.py").write_text(code)
    (tmp_path / "doc_plug_boom.py").write_text("import moedec\n@moedec.hookimpl\ndef register_strategies(register):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    host = build_host(load_entry_points=False, extra_plugins=("doc_plug_a", "doc_plug_boom"))
    assert host.strategy("doc-a").plugin == "doc_plug_a" and "single" in host.strategies
    (failure,) = host.failures
    assert failure.plugin == "doc_plug_boom" and "register_strategies raised RuntimeError: boom" in failure.error
    with pytest.raises(PluginError, match="duplicate strategy name 'doc-a'.*doc_plug_a.*doc_plug_b"):
        build_host(load_entry_points=False, extra_plugins=("doc_plug_a", "doc_plug_b"))


def test_hook_draft_none_or_empty_is_a_plain_step_and_drafts_are_validated_and_cut(model):
    ref = oracle_greedy(model, [1, 2, 3], 10).tokens
    for result in (None, [], ()):
        g = moedec.generate(model, [1, 2, 3], strategy(draft=lambda self, state, r=result: r), max_tokens=10)
        assert g.tokens == ref and g.stats.drafted == 0 and g.stats.forwards == 9
    seen = []

    def verify(self, state, draft):
        seen.append((len(draft), state.remaining))

    g = moedec.generate(model, [1, 2, 3], strategy(draft=lambda self, state: [1] * 8, verify=verify), max_tokens=10)
    assert len(g.tokens) == 10 and all(k <= rem - 1 for k, rem in seen)  # cut to remaining - 1
    with pytest.raises(PluginError, match=r"strategy 'doc' drafted token 256 in hook 'draft'"):
        moedec.generate(model, [1], strategy(draft=lambda self, state: [256]), max_tokens=4)
    with pytest.raises(PluginError, match=r"strategy 'doc' returned 3 tokens from hook 'draft'; max_draft is 2"):
        moedec.generate(model, [1], strategy(draft=lambda self, state: [1, 1, 1]), max_tokens=8, max_draft=2)


def test_hook_verify_none_falls_back_a_replacement_must_feed_pending_plus_draft_and_a_wrapper_reads(model):
    draft = lambda self, state: [state.tokens[-1]] * 2  # noqa: E731
    ref = moedec.generate(model, [4, 5], strategy(draft=draft), max_tokens=12)
    g = moedec.generate(model, [4, 5], strategy(draft=draft, verify=lambda self, state, draft: None), max_tokens=12)
    assert g.tokens == ref.tokens

    def own_verify(self, state, draft):
        inputs = [state.tokens[-1], *draft.tokens]
        logits, hidden = forward(state.model, inputs, state.cache)
        return Verification(logits, hidden, inputs)

    assert moedec.generate(model, [4, 5], strategy(draft=draft, verify=own_verify), max_tokens=12).tokens == ref.tokens

    def short_verify(self, state, draft):
        logits, hidden = forward(state.model, [state.tokens[-1]], state.cache)
        return Verification(logits, hidden, [state.tokens[-1]])

    with pytest.raises(PluginError, match=r"fed 1 tokens into the cache in hook 'verify'; expected 3"):
        moedec.generate(model, [4, 5], strategy(draft=draft, verify=short_verify), max_tokens=12)

    shapes = []

    @attrs.define
    class Reader:
        name = "reader"

        @moedec.hookimpl
        def draft(self, state):
            return [state.tokens[-1]] * 2

        @moedec.hookimpl(wrapper=True)
        def verify(self, state, draft):
            v = yield
            shapes.append((tuple(v.logits.shape), len(v.inputs), len(draft)))
            return v

    assert moedec.generate(model, [4, 5], Reader(), max_tokens=12).tokens == ref.tokens
    assert shapes and all(t == (k + 1, 256) and n == k + 1 for t, n, k in shapes)


def test_hook_accept_none_falls_back_and_an_acceptance_must_be_prefix_plus_one(model):
    draft = lambda self, state: [state.tokens[-1]] * 3  # noqa: E731
    ref = moedec.generate(model, [6, 7], strategy(draft=draft), max_tokens=12)
    for temp in (0.0, 0.9):
        a = moedec.generate(model, [6, 7], strategy(draft=draft), max_tokens=12, temperature=temp, seed=2)
        b = moedec.generate(model, [6, 7], strategy(draft=draft, accept=lambda self, state, draft, verification: None),
                            max_tokens=12, temperature=temp, seed=2)
        assert a.tokens == b.tokens

    def greedy(self, state, draft, verification):
        targets = mx.argmax(verification.logits, axis=-1).tolist()
        n = 0
        while n < len(draft) and draft.tokens[n] == targets[n]:
            n += 1
        return Acceptance(tokens=list(draft.tokens[:n]) + [targets[n]], num_accepted=n)

    assert moedec.generate(model, [6, 7], strategy(draft=draft, accept=greedy), max_tokens=12).tokens == ref.tokens
    bad = lambda self, state, draft, verification: Acceptance(tokens=[1, 2], num_accepted=0)  # noqa: E731
    with pytest.raises(PluginError, match=r"invalid Acceptance from hook 'accept'.*need 0 <= n <= 3 and n \+ 1 tokens"):
        moedec.generate(model, [6, 7], strategy(draft=draft, accept=bad), max_tokens=12)


def test_hook_prefill_is_called_once_before_the_first_draft(model):
    events = []

    @attrs.define
    class Watch:
        name = "watch"

        @moedec.hookimpl
        def prefill(self, state):
            events.append(("prefill", list(state.tokens), cache_length(state.cache), state.prompt_hidden.shape,
                           state.hidden.shape))

        @moedec.hookimpl
        def draft(self, state):
            events.append(("draft",))

    g = moedec.generate(model, [9, 8, 7], Watch(), max_tokens=4)
    first = g.tokens[0]
    assert events[0] == ("prefill", [9, 8, 7, first], 3, (3, 64), (64,))
    assert [e[0] for e in events] == ["prefill", "draft", "draft", "draft"]
    events.clear()
    moedec.generate(model, [9, 8, 7], Watch(), max_tokens=0)
    assert events == []  # not called when max_tokens is 0


def test_hook_on_accept_sees_committed_tokens_and_a_rewound_cache(model):
    ref = list(oracle_greedy(model, [1, 2, 3], 16).tokens)
    seen = []

    @attrs.define
    class Watch:
        name = "watch"

        @moedec.hookimpl
        def draft(self, state):
            pos = len(state.generated)
            return ref[pos : pos + 3] + [0]  # three right tokens then a wrong one

        @moedec.hookimpl
        def on_accept(self, state, acceptance):
            seen.append((list(acceptance.tokens), list(state.tokens), cache_length(state.cache)))

    moedec.generate(model, [1, 2, 3], Watch(), max_tokens=16)
    for acc, tokens, cache in seen:
        assert tokens[-len(acc):] == acc and cache == len(tokens) - 1
    # EOS inside an accepted draft: fewer tokens committed than accepted
    seen.clear()
    eos = ref[5]
    g = moedec.generate(model, [1, 2, 3], Watch(), max_tokens=16, eos_token_ids=[eos])
    acc, tokens, _ = seen[-1]
    assert eos in acc and tokens[3:] == list(g.tokens) and eos not in tokens[3:]


# -- the tutorial, as written -----------------------------------------------------------------------


def tutorial_files() -> dict[str, str]:
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)\n```", DOC.read_text(), re.S)
    return {path: text + "\n" for path, text in blocks}


def write_tutorial(root: Path) -> Path:
    files = tutorial_files()
    assert {"moedec-bigram/pyproject.toml", "moedec-bigram/moedec_bigram.py", "moedec-bigram/tests/test_bigram.py"} <= set(files)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "moedec-bigram"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MOEDEC_LOAD_PLUGINS", "PYTHONPATH", "MOEDEC_DEBUG")}
    env.update(extra)
    return env


def test_the_tutorial_plugin_installs_appears_runs_and_passes_check_strategy(tmp_path):
    pkg = write_tutorial(tmp_path)
    venv = tmp_path / "venv"  # sees this environment's packages (moedec, mlx) but installs into itself
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    env = clean_env()
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(pkg)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert pip.returncode == 0, pip.stderr

    def cli(*args, **kw):
        return subprocess.run([py, "-m", "moedec.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                              env=clean_env(**kw), timeout=300)

    r = cli("strategies", "--verbose", "--json")
    assert r.returncode == 0, r.stderr
    row = next(x for x in json.loads(r.stdout) if x["name"] == "bigram")
    assert (row["package"], row["version"], row["plugin"]) == ("moedec-bigram", "0.1.0", "bigram")
    assert row["hooks"] == ["draft", "prefill", "on_accept"] and row["options"] == ["num_draft: int = 4 [1, 16]"]
    r = cli("generate", "abc abc abc", "--strategy", "bigram", "-o", "num_draft=6", "--max-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])["stats"]
    assert stats["strategy"] == "bigram" and stats["generated_tokens"] == 24 and stats["drafted"] > 0
    r = cli("generate", "x", "-s", "bigram", "-o", "num_draft=0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] in DOC.read_text()  # the error line the page shows
    # the tutorial's own tests: check_strategy("bigram") and a fixture of -p moedec.testing
    t = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=pkg,
                       env=env, timeout=600)
    assert t.returncode == 0 and "4 passed" in t.stdout, t.stdout[-3000:] + t.stderr[-2000:]


def test_the_documented_loading_rules(tmp_path):
    """MOEDEC_LOAD_PLUGINS and a broken plugin behave as docs/plugins.md says (dist-info on a path)."""
    site = tmp_path / "site"
    site.mkdir()

    def dist(name, module, code, ep):
        (site / f"{module}.py").write_text(code)
        info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(f"[moedec]\n{ep} = {module}\n")

    dist("moedec-bigram", "moedec_bigram", tutorial_files()["moedec-bigram/moedec_bigram.py"], "bigram")
    dist("moedec-broken", "moedec_broken", "import not_a_module_anywhere\n", "broken")

    def strategies(**env):
        r = subprocess.run([sys.executable, "-m", "moedec.cli", "strategies", "--json"], capture_output=True, text=True,
                           cwd=tmp_path, env=clean_env(PYTHONPATH=str(site), **env), timeout=300)
        names = {x["name"] for x in json.loads(r.stdout)} if r.returncode == 0 else set()
        return r, names

    r, names = strategies()
    assert r.returncode == 0 and {"bigram", "single"} <= names
    assert ("moedec: warning: plugin 'broken' (package moedec-broken) failed to load: ModuleNotFoundError"
            in r.stderr)
    r, names = strategies(MOEDEC_LOAD_PLUGINS="moedec-bigram")
    assert "bigram" in names and "warning" not in r.stderr
    r, names = strategies(MOEDEC_LOAD_PLUGINS="")
    assert "bigram" not in names and "single" in names and "warning" not in r.stderr
    dist("moedec-bigram2", "moedec_bigram2", tutorial_files()["moedec-bigram/moedec_bigram.py"], "bigram2")
    r, _ = strategies(MOEDEC_LOAD_PLUGINS="bigram,bigram2")
    assert r.returncode == 2 and r.stderr.startswith("moedec: error: duplicate strategy name 'bigram'")
    assert "Traceback" not in r.stderr


def test_ci_runs_the_readme_command_which_installs_and_tests_the_example_plugin():
    import tomllib

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    ci = [x for x in (ROOT / ".ci" / "run").read_text().splitlines() if x and not x.startswith(("#", "set ", "cd "))]
    assert ci == [block[1]]
    assert "-e examples/moedec-lookahead" in block[1]
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "examples/moedec-lookahead/tests" in ini["testpaths"] and "-p moedec.testing" in ini["addopts"]
    example = tomllib.loads((ROOT / "examples" / "moedec-lookahead" / "pyproject.toml").read_text())["project"]
    assert example["entry-points"]["moedec"] == {"lookahead": "moedec_lookahead"}
