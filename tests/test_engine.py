import attrs
import mlx.core as mx
import pytest
from hypothesis import given, strategies as hs

import moedec
import moedec.models
from moedec.testing import ARCHS, assert_lossless, compare_greedy, oracle_greedy, tiny_models
from moedec.testing import st
from tests.helpers import CacheChecker, PlannedDrafter


@pytest.mark.parametrize("idx", range(len(ARCHS)), ids=ARCHS)
def test_single_equals_mlx_lm_generate_step(idx):
    model = tiny_models()[idx]
    for prompt in ([1, 2, 3], [5] * 9, list(range(40, 80))):
        ref = oracle_greedy(model, prompt, 24)
        got = moedec.generate(model, prompt, "single", max_tokens=24)
        assert list(got.tokens) == list(ref.tokens)
        assert got.stats.forwards == 23 and got.stats.tokens_per_forward == 1.0


def test_assert_lossless_single_battery():
    assert_lossless("single")


def test_pipelined_and_plain_loops_agree():
    """An observer disables pipelining; the tokens (greedy and seeded sampling) must not change."""
    model = tiny_models()[0]
    for temp in (0.0, 0.9):
        a = moedec.generate(model, [3, 4, 5], max_tokens=20, temperature=temp, seed=7)
        b = moedec.generate(model, [3, 4, 5], max_tokens=20, temperature=temp, seed=7, plugins=[CacheChecker()])
        assert a.tokens == b.tokens


@given(
    model=st.models(),
    prompt=st.prompts(max_size=16),
    max_tokens=hs.integers(1, 20),
    plan=hs.lists(
        hs.tuples(hs.integers(0, 6), hs.lists(hs.integers(0, 255), max_size=5)), max_size=25
    ),
)
def test_any_draft_leaves_greedy_output_unchanged(model, prompt, max_tokens, plan):
    ref = oracle_greedy(model, prompt, max_tokens)
    drafter = PlannedDrafter(oracle=list(ref.tokens), plan=plan)
    checker = CacheChecker()
    got = moedec.generate(model, prompt, drafter, max_tokens=max_tokens, eos_token_ids=[], plugins=[checker])
    div = compare_greedy(ref, got.tokens)
    assert div is None or div.near_tie, div.describe()
    assert got.stats.accepted <= got.stats.drafted
    assert checker.steps == got.stats.forwards


def test_correct_drafts_are_accepted_and_counted():
    model = tiny_models()[1]
    ref = oracle_greedy(model, [9, 9, 9], 17)
    drafter = PlannedDrafter(oracle=list(ref.tokens), plan=[(4, [])] * 10)
    got = moedec.generate(model, [9, 9, 9], drafter, max_tokens=17)
    assert list(got.tokens) == list(ref.tokens)
    assert got.stats.acceptance_rate == 1.0
    assert got.stats.forwards == 4  # 1 (prefill) + 4 steps x 4 tokens = 17
    assert got.stats.tokens_per_forward == 4.0


def test_sampling_is_deterministic_under_seed_and_varies_without():
    model = tiny_models()[0]
    a = moedec.generate(model, [1, 2], max_tokens=16, temperature=1.0, seed=3)
    b = moedec.generate(model, [1, 2], max_tokens=16, temperature=1.0, seed=3)
    c = moedec.generate(model, [1, 2], max_tokens=16, temperature=1.0, seed=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    k = moedec.generate(model, [1, 2], max_tokens=16, temperature=1.0, top_k=1, seed=5)
    assert list(k.tokens) == list(oracle_greedy(model, [1, 2], 16).tokens)  # top-k 1 is greedy


def test_sampled_speculative_steps_keep_invariants():
    model = tiny_models()[2]
    ref = oracle_greedy(model, [4, 5, 6], 30)
    drafter = PlannedDrafter(oracle=list(ref.tokens), plan=[(2, [1, 2])] * 30)
    checker = CacheChecker()
    g = moedec.generate(model, [4, 5, 6], drafter, max_tokens=30, temperature=0.7, top_p=0.9, seed=1, plugins=[checker])
    assert len(g.tokens) == 30 and checker.steps == g.stats.forwards


def test_eos_and_max_tokens_stop():
    model = tiny_models()[0]
    ref = list(oracle_greedy(model, [1, 2, 3], 12).tokens)
    eos = ref[5]
    first = ref.index(eos)
    g = moedec.generate(model, [1, 2, 3], max_tokens=12, eos_token_ids=[eos])
    assert list(g.tokens) == ref[:first] and g.stats.finish_reason == "eos"
    g = moedec.generate(model, [1, 2, 3], max_tokens=0)
    assert g.tokens == () and g.stats.finish_reason == "length"
    # EOS inside an accepted draft: generation stops there too
    drafter = PlannedDrafter(oracle=ref, plan=[(8, [])] * 4)
    g = moedec.generate(model, [1, 2, 3], drafter, max_tokens=12, eos_token_ids=[eos])
    assert list(g.tokens) == ref[:first]


def test_stop_strings_cut_the_text():
    model, tok = moedec.models.default_model()  # the random byte-level model: never hits EOS early
    full = moedec.generate(model, "hello", max_tokens=24, tokenizer=tok)
    text = full.text
    assert text
    probe = text[3:5]
    cut = text.find(probe)
    g = moedec.generate(model, "hello", max_tokens=24, tokenizer=tok, stop=[probe])
    assert g.text == text[:cut] and g.stats.finish_reason == "stop"


def test_streaming_yields_tokens_as_they_commit():
    model, tok = moedec.models.default_model()
    dec = moedec.stream_generate(model, "hi", max_tokens=10, tokenizer=tok)
    chunks = list(dec)
    assert sum(len(c.tokens) for c in chunks) == 10 and len(chunks) == 10
    assert "".join(c.text for c in chunks) == dec.result.text


def test_state_hidden_is_the_last_position_hidden():
    model = tiny_models()[0]
    seen = []

    @attrs.define
    class Peek:
        name = "peek"

        @moedec.hookimpl
        def draft(self, state):
            # the hidden state that produced the pending token, recomputed from scratch
            from moedec.forward import forward

            _, h = forward(state.model, state.tokens[:-1], None)
            seen.append(float(mx.abs(h[-1] - state.hidden).max()))
            return None

    moedec.generate(model, [1, 2, 3], Peek(), max_tokens=6)
    assert len(seen) == 5 and max(seen) < 1e-4
