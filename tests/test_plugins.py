"""Plugin loading: entry points, broken plugins, duplicate names, MOEDEC_LOAD_PLUGINS."""

import sys
import textwrap

import pytest

import moedec
from moedec.errors import MoedecError, PluginError
from moedec.plugins import DEFAULT_PLUGINS, build_host, get_manager, reset_manager
from moedec.testing import tiny_models


def make_dist(root, dist, module, code, ep_name=None):
    """A minimal installed distribution (dist-info + module) under ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[moedec]\n{ep_name or dist} = {module}\n")


REPEAT = """
import attrs, moedec

@attrs.define
class RepeatLast:
    \"\"\"Draft the last token again, num_draft times.\"\"\"
    name = "repeat-last"
    num_draft: int = attrs.field(default=3, validator=moedec.in_range(1, 16))

    @moedec.hookimpl
    def draft(self, state):
        return [state.tokens[-1]] * self.num_draft

@moedec.hookimpl
def register_strategies(register):
    register(RepeatLast)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MOEDEC_LOAD_PLUGINS", raising=False)
    reset_manager()
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("plug_")]:
        del sys.modules[mod]
    reset_manager()


def test_builtins_register_through_the_hook():
    host = build_host(load_entry_points=False)
    assert "moedec.strategies.single" in DEFAULT_PLUGINS
    info = host.strategy("single")
    assert info.plugin == "moedec.strategies.single" and info.package == "moedec"


def test_entry_point_plugin_loads_and_runs(site):
    make_dist(site, "moedec-repeat", "plug_repeat", REPEAT, ep_name="repeat")
    host = get_manager()
    info = host.strategy("repeat-last")
    assert (info.package, info.version, info.plugin) == ("moedec-repeat", "1.2.3", "repeat")
    model = tiny_models()[0]
    g = moedec.generate(model, [1, 2, 3], "repeat-last", max_tokens=12, num_draft=4)
    ref = moedec.generate(model, [1, 2, 3], "single", max_tokens=12)
    assert g.tokens == ref.tokens and g.stats.drafted > 0
    with pytest.raises(MoedecError, match=r"bad option num_draft=0: must be in \[1, 16\]"):
        moedec.generate(model, [1], "repeat-last", num_draft=0)


def test_broken_plugin_is_reported_and_others_still_load(site):
    make_dist(site, "moedec-repeat", "plug_repeat", REPEAT)
    make_dist(site, "moedec-broken", "plug_broken", "import not_a_module_anywhere\n")
    with pytest.warns(RuntimeWarning, match="moedec-broken"):
        host = get_manager()
    assert "repeat-last" in host.strategies and "single" in host.strategies
    (failure,) = host.failures
    assert failure.plugin == "moedec-broken" and "ModuleNotFoundError" in failure.error


def test_duplicate_strategy_name_names_both_sources(site):
    make_dist(site, "moedec-repeat", "plug_repeat", REPEAT)
    make_dist(site, "moedec-again", "plug_again", REPEAT)
    with pytest.raises(PluginError, match="duplicate strategy name 'repeat-last'.*moedec-repeat.*moedec-again|duplicate strategy name 'repeat-last'.*moedec-again.*moedec-repeat"):
        build_host()


def test_duplicate_of_a_builtin(site):
    make_dist(site, "moedec-single", "plug_single", REPEAT.replace('"repeat-last"', '"single"'))
    with pytest.raises(PluginError, match="'single'.*moedec.strategies.single.*moedec-single"):
        build_host()


def test_moedec_load_plugins_restricts_entry_points(site, monkeypatch):
    make_dist(site, "moedec-repeat", "plug_repeat", REPEAT)
    make_dist(site, "moedec-broken", "plug_broken", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("MOEDEC_LOAD_PLUGINS", "moedec-repeat")
    host = build_host()
    assert "repeat-last" in host.strategies and not host.failures
    monkeypatch.setenv("MOEDEC_LOAD_PLUGINS", "")
    host = build_host()
    assert set(host.strategies) == {"single"} or "repeat-last" not in host.strategies
    assert not host.failures


def test_module_level_strategy_hook_must_be_a_wrapper(site):
    code = """
import moedec
@moedec.hookimpl
def draft(state):
    return [1]
"""
    make_dist(site, "moedec-rogue", "plug_rogue", code)
    host = build_host()
    (failure,) = host.failures
    assert "module level" in failure.error and failure.plugin == "moedec-rogue"


def test_unknown_hook_is_reported(site):
    code = """
import moedec
@moedec.hookimpl
def register_strategy(register):  # typo: no such hook
    pass
"""
    make_dist(site, "moedec-typo", "plug_typo", code)
    host = build_host()
    assert any(f.plugin == "moedec-typo" and "unknown hook" in f.error for f in host.failures)


def test_wrapper_observer_plugin_sees_every_verify(site):
    code = """
import moedec
CALLS = []
@moedec.hookimpl(wrapper=True)
def verify(state, draft):
    result = yield
    CALLS.append(len(draft))
    return result
"""
    make_dist(site, "moedec-watch", "plug_watch", code)
    get_manager()
    g = moedec.generate(tiny_models()[0], [1, 2], max_tokens=5)
    assert sys.modules["plug_watch"].CALLS == [0, 0, 0, 0]
    assert g.stats.forwards == 4
