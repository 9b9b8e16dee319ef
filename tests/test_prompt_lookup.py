"""prompt-lookup: the n-gram index, lossless greedy decoding, stats, options, CLI."""

import json

import pytest
from hypothesis import given, settings, strategies as hs
from typer.testing import CliRunner

import moedec
from moedec.cli import app
from moedec.plugins import get_manager
from moedec.strategies.prompt_lookup import NgramIndex, PromptLookup
from moedec.testing import assert_lossless, tiny_models
from moedec.testing import st

from helpers import DraftRecorder


def brute_lookup(tokens, lo, hi, k):
    """Rescan the whole context: longest suffix n-gram first, its latest earlier occurrence."""
    size = len(tokens)
    for n in range(min(hi, size), lo - 1, -1):
        gram = tokens[size - n :]
        for j in range(size - 1, n - 1, -1):  # continuation position, latest first
            if tokens[j - n : j] == gram:
                out = []
                for i in range(k):
                    out.append(tokens[j + i] if j + i < size else out[j + i - size])
                return out, n
    return [], 0


@settings(max_examples=150, deadline=None)
@given(
    chunks=hs.lists(hs.lists(hs.integers(0, 5), min_size=1, max_size=6), min_size=1, max_size=8),
    lo=hs.integers(1, 3), extra=hs.integers(0, 2), k=hs.integers(1, 8),
)
def test_incremental_index_equals_a_full_rescan(chunks, lo, extra, k):
    index = NgramIndex(lo, lo + extra)
    seen = []
    for chunk in chunks:  # as prefill + on_accept deliver them
        index.extend(chunk)
        seen += chunk
        assert index.tokens == seen
        assert index.lookup(k) == brute_lookup(seen, lo, lo + extra, k)


def test_lookup_prefers_longest_ngram_then_most_recent():
    index = NgramIndex(1, 3)
    index.extend([5, 1, 2, 9, 7, 2, 8, 1, 2])
    # the 2-gram (1, 2) occurred at 1..2 (then 9) and is the longest match; the unigram 2 alone
    # would have matched more recently (then 8)
    assert index.lookup(2) == ([9, 7], 2)
    index = NgramIndex(1, 1)
    index.extend([3, 4, 3, 6, 3])
    assert index.lookup(1) == ([6], 1)  # most recent occurrence of 3 wins
    index = NgramIndex(2, 3)
    index.extend([1, 2, 3, 4, 2])
    assert index.lookup(3) == ([], 0)  # unigram matches are below min_ngram


def test_periodic_context_copy_continues_into_its_own_output():
    index = NgramIndex(1, 3)
    index.extend([1, 2, 3, 1, 2, 3])
    assert index.lookup(8) == ([1, 2, 3, 1, 2, 3, 1, 2], 3)


def test_registered_with_options():
    info = get_manager().strategy("prompt-lookup")
    assert info.cls is PromptLookup and info.plugin == "moedec.strategies.prompt_lookup"
    s = PromptLookup()
    assert (s.num_draft, s.max_ngram, s.min_ngram) == (8, 3, 1)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"num_draft": 0}, r"bad option num_draft=0: must be in \[1, 64\]"),
        ({"max_ngram": 0}, r"bad option max_ngram=0"),
        ({"min_ngram": 4}, r"bad option min_ngram=4: must be <= max_ngram \(3\)"),
        ({"ngram": 2}, r"has no option 'ngram'"),
    ],
)
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(moedec.MoedecError, match=match) as e:
        moedec.generate(tiny_models()[0], [1, 2], "prompt-lookup", max_tokens=2, **opts)
    assert "\n" not in str(e.value)


def test_lossless_on_the_three_archs_default_prompts():
    assert_lossless("prompt-lookup", max_tokens=24)


@settings(max_examples=30, deadline=None)
@given(
    model=st.models(), prompt=st.prompts(max_size=20), num_draft=hs.integers(1, 8),
    min_ngram=hs.integers(1, 3), span=hs.integers(0, 2),
)
def test_lossless_property(model, prompt, num_draft, min_ngram, span):
    assert_lossless(
        "prompt-lookup", model=model, prompts=[prompt], max_tokens=20,
        num_draft=num_draft, min_ngram=min_ngram, max_ngram=min_ngram + span,
    )


def test_drafts_on_repetitive_context_and_counts():
    model = tiny_models()[0]
    prompt = [1, 2, 3, 4, 5] * 4
    g = moedec.generate(model, prompt, "prompt-lookup", max_tokens=24, num_draft=5)
    s = g.stats
    assert s.drafted >= 5 and 0 <= s.accepted <= s.drafted
    looked = s.extra["lookup_hits"] + s.extra["lookup_misses"]  # no lookup when only 1 token is left
    assert s.extra["lookup_hits"] >= 1 and s.forwards - 1 <= looked <= s.forwards
    assert s.tokens_per_forward == pytest.approx((s.generated_tokens - 1) / s.forwards)
    assert s.acceptance_rate == pytest.approx(s.accepted / s.drafted)
    # the first draft is the continuation of the last 3-gram (3, 4, 5)'s previous occurrence
    # extended periodically; it depends only on the prompt and the first generated token
    first = g.tokens[0]
    idx = NgramIndex(1, 3)
    idx.extend(prompt + [first])
    expected, _ = idx.lookup(5)
    spy = DraftRecorder()
    moedec.generate(model, prompt, "prompt-lookup", max_tokens=24, num_draft=5, plugins=[spy])
    first = spy.drafts[0]
    assert (tuple(first.tokens) if first is not None else ()) == tuple(expected)


def test_temperature_sampling_uses_deterministic_drafts():
    model = tiny_models()[1]
    spy = DraftRecorder()
    prompt = list(range(256)) + [9, 8, 7, 6] * 3  # every token has occurred: every step drafts
    g1 = moedec.generate(model, prompt, "prompt-lookup", max_tokens=20, temperature=0.8, top_p=0.9, seed=3, plugins=[spy])
    seen = spy.drafts
    g2 = moedec.generate(model, prompt, "prompt-lookup", max_tokens=20, temperature=0.8, top_p=0.9, seed=3)
    assert g1.tokens == g2.tokens and len(g1.tokens) == 20  # seeded: repeatable
    drafts = [d for d in seen if d is not None]
    assert len(drafts) >= len(seen) - 1 and all(isinstance(d, moedec.Draft) and d.probs is None for d in drafts)


def test_respects_max_tokens_and_max_draft():
    model = tiny_models()[2]
    for n in (1, 2, 3, 7):
        g = moedec.generate(model, [4, 4, 4, 4], "prompt-lookup", max_tokens=n, max_draft=2)
        assert len(g.tokens) == n


def test_cli_generate_and_listing():
    runner = CliRunner()
    r = runner.invoke(app, ["generate", "abcabcabcabc", "--strategy", "prompt-lookup", "-o", "num_draft=4",
                            "-o", "max_ngram=2", "--max-tokens", "24", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    assert out["stats"]["strategy"] == "prompt-lookup" and out["stats"]["generated_tokens"] == 24
    assert out["stats"]["drafted"] > 0 and "lookup_hits" in out["stats"]["extra"]
    r = runner.invoke(app, ["strategies", "--json"])
    row = next(x for x in json.loads(r.stdout) if x["name"] == "prompt-lookup")
    assert row["options"] == ["num_draft: int = 8 [1, 64]", "max_ngram: int = 3 [1, 16]", "min_ngram: int = 1 [1, 16]"]
    r = runner.invoke(app, ["generate", "hi", "--strategy", "prompt-lookup", "-o", "min_ngram=5"])
    assert r.exit_code == 2 and "bad option min_ngram='5': must be <= max_ngram (3)" in r.output
