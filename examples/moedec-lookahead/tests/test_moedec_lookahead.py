"""moedec-lookahead's tests, written with moedec's test kit (fixtures from ``-p moedec.testing``)."""

import json

import pytest
from hypothesis import given, settings
from typer.testing import CliRunner

import moedec
from moedec.cli import app
from moedec.plugins import get_manager
from moedec.testing import assert_lossless, check_strategy, oracle_greedy, st

from moedec_lookahead import Lookahead, NgramPool


def test_the_entry_point_registers_lookahead():
    info = get_manager().strategy("lookahead")
    assert info.cls is Lookahead and info.package == "moedec-lookahead" and info.plugin == "lookahead"


def test_lookahead_passes_the_conformance_suite():
    report = check_strategy("lookahead")
    assert report.passed, report


def test_small_windows_and_bigram_pools_conform_too():
    check_strategy(Lookahead, window=1, ngram=2, pool_size=1, checks=["lossless-greedy", "lossless-sampling", "cache"])


@given(options=st.option_values(Lookahead), prompt=st.prompts(max_size=16))
@settings(max_examples=12, deadline=None)
def test_lossless_greedy_for_any_options(options, prompt):
    assert_lossless(Lookahead, prompts=[prompt], max_tokens=16, **options)


def test_lossless_in_distribution(sampling_model):
    assert_lossless("lookahead", model=sampling_model, temperature=0.9, top_p=0.95, max_tokens=16, samples=24)


def test_jacobi_guesses_and_pool_both_draft_and_get_accepted(tiny_model):
    prompt = [11, 12, 13, 14] * 4
    g = moedec.generate(tiny_model, prompt, "lookahead", max_tokens=96)
    assert list(g.tokens) == list(oracle_greedy(tiny_model, prompt, 96).tokens)
    extra = g.stats.extra
    assert extra["lookahead_pool_drafts"] > 0 and extra["lookahead_jacobi_drafts"] > 0
    assert extra["lookahead_pool_ngrams"] > 0
    assert g.stats.accepted > 0 and g.stats.tokens_per_forward > 1.0


def test_ngram_pool():
    pool = NgramPool(n=3, capacity=2)
    pool.add([1, 2, 3])
    pool.add([3, 4, 5])
    assert pool.lookup(1) == (2, 3) and pool.chain(1, 4) == [2, 3, 4, 5] and pool.chain(1, 3) == [2, 3, 4]
    pool.add([1, 7, 8])
    pool.add([1, 2, 3])  # seen again: most recent
    assert pool.lookup(1) == (2, 3)
    pool.add([1, 9, 9])  # capacity 2 drops the least recent, (7, 8)
    assert pool.lookup(1) == (9, 9) and len(pool) == 3
    assert pool.chain(42, 5) == []
    with pytest.raises(ValueError, match="expected a 3-gram"):
        pool.add([1, 2])


def test_options_are_validated():
    with pytest.raises(moedec.MoedecError, match=r"bad option window=0: must be in \[1, 32\]"):
        moedec.generate(None, [1, 2], "lookahead", window=0)


def test_cli_runs_it():
    r = CliRunner().invoke(app, ["generate", "abcabcabc", "-s", "lookahead", "-o", "window=3", "-n", "24", "--json"])
    assert r.exit_code == 0, r.output
    line = [x for x in r.stdout.splitlines() if x.startswith("{")][-1]
    stats = json.loads(line)["stats"]
    assert stats["strategy"] == "lookahead" and stats["generated_tokens"] == 24
    assert "lookahead_pool_drafts" in stats["extra"]
