"""The plugin author's kit: check_strategy must pass correct strategies and fail broken ones with a
message that names the violated property; its statistics must be right."""

import random
import re
import subprocess
import sys
import textwrap

import attrs
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as hs

import moedec
from moedec import Acceptance, Draft, sampling
from moedec.forward import forward
from moedec.testing import (
    CHECKS, ConformanceError, assert_lossless, check_strategy, small_vocab_model, st, tiny_models,
)
from moedec.testing.distribution import rule_rows
from moedec.testing.stats import chi2_sf, pit, pit_uniformity, processed_probs


# -- strategies for the kit to judge -----------------------------------------------------------------


@attrs.define
class RepeatDrafter:
    """Correct: drafts the last token again (deterministic, no probs)."""

    name = "kit-repeat"
    num_draft: int = attrs.field(default=3, validator=moedec.in_range(1, 8))

    @moedec.hookimpl
    def draft(self, state):
        return [state.tokens[-1]] * min(self.num_draft, state.max_draft)


@attrs.define
class BigramSampler:
    """Correct: samples its draft from a fixed random bigram table and declares that q."""

    name = "kit-bigram-sampler"

    @moedec.hookimpl
    def draft(self, state):
        k = min(2, state.max_draft)
        table = mx.array(np.random.default_rng(5).normal(size=(state.vocab_size, state.vocab_size)).astype(np.float32))
        toks, qs, last = [], [], state.tokens[-1]
        for _ in range(k):
            logits = 2.0 * table[last]  # [V]
            if state.sampling.greedy:
                last = int(mx.argmax(logits).item())
            else:
                q = state.probs(logits)
                last = int(sampling.sample(q, state.next_key()).item())
                qs.append(q)
            toks.append(last)
        return Draft(toks, mx.stack(qs) if qs else None)


@attrs.define
class KeepAll(RepeatDrafter):
    """LOSSY: accepts every draft token."""

    name = "kit-keep-all"

    @moedec.hookimpl
    def accept(self, state, draft, verification):
        t = int(state.sample(verification.logits[len(draft)]).item())
        return Acceptance(tokens=list(draft.tokens) + [t], num_accepted=len(draft))


@attrs.define
class SelfDrafter:
    """Correct: drafts the target's own argmax, recomputed from scratch (a plausible draft, which
    makes accept-rule bugs visible quickly)."""

    name = "kit-self"

    @moedec.hookimpl
    def draft(self, state):
        logits, _ = forward(state.model, state.tokens, None)  # [T, V]
        return [int(mx.argmax(logits[-1]).item())]


@attrs.define
class ForgetResidual(SelfDrafter):
    """LOSSY at temperature > 0 only: after a rejection it samples from p, not the residual."""

    name = "kit-forget-residual"

    @moedec.hookimpl
    def accept(self, state, draft, verification):
        if state.sampling.greedy:
            return None
        p = state.probs(verification.logits)  # [K+1, V]
        n = 0
        while n < len(draft) and mx.random.uniform(key=state.next_key()).item() < p[n, draft.tokens[n]].item():
            n += 1
        y = int(sampling.sample(p[n], state.next_key()).item())
        return Acceptance(tokens=list(draft.tokens[:n]) + [y], num_accepted=n)


@attrs.define
class ArgmaxClaimsSample:
    """LOSSY at temperature > 0: declares q but drafts its argmax instead of sampling it."""

    name = "kit-argmax-q"

    @moedec.hookimpl
    def draft(self, state):
        logits = 2.0 * mx.array(np.random.default_rng(state.tokens[-1]).normal(size=state.vocab_size).astype(np.float32))
        q = None if state.sampling.greedy else state.probs(logits)[None]
        return Draft([int(mx.argmax(logits).item())], q)


@attrs.define
class UnnormalizedQ(BigramSampler):
    name = "kit-unnormalized-q"

    @moedec.hookimpl
    def draft(self, state):
        d = BigramSampler.draft(self, state)
        return d if d.probs is None else Draft(d.tokens, d.probs * 1.5)


@attrs.define
class CacheLeak(RepeatDrafter):
    """Broken: feeds the pending token into the target cache after every step."""

    name = "kit-cache-leak"

    @moedec.hookimpl
    def on_accept(self, state, acceptance):
        forward(state.model, state.tokens[-1:], state.cache)


@attrs.define
class IgnoresMaxDraft:
    name = "kit-ignores-max-draft"

    @moedec.hookimpl
    def draft(self, state):
        return [state.tokens[-1]] * 4


@attrs.define
class Unseeded(RepeatDrafter):
    """Broken: draws its draft length from Python's global RNG, not state.next_key()."""

    name = "kit-unseeded"
    _rng: random.Random = attrs.field(factory=random.Random, init=False)

    @moedec.hookimpl
    def draft(self, state):
        return [state.tokens[-1]] * self._rng.randint(0, 3)


@attrs.define
class AssumesAllCommitted(RepeatDrafter):
    """Broken at EOS: assumes every accepted token was committed."""

    name = "kit-eos-blind"

    @moedec.hookimpl
    def on_accept(self, state, acceptance):
        assert tuple(state.tokens[-len(acceptance.tokens):]) == acceptance.tokens, "acceptance not committed"


# -- check_strategy: correct strategies pass ---------------------------------------------------------


def test_a_correct_deterministic_drafter_passes_every_check():
    report = check_strategy(RepeatDrafter, num_draft=3)
    assert report.passed and [r.name for r in report.results] == list(CHECKS)
    assert "drafted" in str(report) and "ok" in str(report)


def test_a_correct_sampling_drafter_passes():
    report = check_strategy(BigramSampler, checks=["lossless-greedy", "lossless-sampling"])
    notes = "; ".join(report["lossless-sampling"].notes)
    assert "declared Draft.probs" in notes  # its q was tested, not skipped


def test_names_and_classes_both_work_and_bad_arguments_are_refused(register_strategy):
    register_strategy(RepeatDrafter)
    assert check_strategy("kit-repeat", checks=["stopping"]).passed
    with pytest.raises(TypeError, match="name or a strategy class"):
        check_strategy(RepeatDrafter(), checks=["stopping"])
    with pytest.raises(ValueError, match="unknown check 'speed'"):
        check_strategy(RepeatDrafter, checks=["speed"])
    with pytest.raises(moedec.MoedecError, match="unknown strategy 'nope'"):
        check_strategy("nope")


# -- check_strategy: broken strategies fail, and the message says what was violated ----------------


def test_the_lossy_keep_all_strategy_fails_check_strategy():
    with pytest.raises(ConformanceError) as err:
        check_strategy(KeepAll)
    msg = str(err.value)
    assert msg.startswith("strategy 'kit-keep-all' violates")
    assert "lossless-greedy VIOLATED" in msg and "not lossless at temperature 0" in msg and "NOT a near-tie" in msg
    assert "lossless-sampling VIOLATED" in msg and "committed == drafted token" in msg
    failed = {r.name for r in err.value.report.failures}
    assert {"lossless-greedy", "lossless-sampling"} <= failed
    assert "cache" not in failed and "determinism" not in failed  # it is lossy, not broken otherwise


def test_forgetting_the_residual_is_lossless_greedy_but_fails_in_distribution():
    with pytest.raises(ConformanceError) as err:
        check_strategy(ForgetResidual, checks=["lossless-greedy", "lossless-sampling"], samples=32)
    assert [r.name for r in err.value.report.failures] == ["lossless-sampling"]
    assert "committed == drafted token, vs the accept rule" in str(err.value)
    assert check_strategy(SelfDrafter, checks=["lossless-sampling"], samples=32).passed  # same drafts, right rule


def test_a_draft_not_sampled_from_its_declared_probs_fails():
    with pytest.raises(ConformanceError, match=r"lossless-sampling VIOLATED:[\s\S]*drafted tokens vs their declared Draft.probs"):
        check_strategy(ArgmaxClaimsSample, checks=["lossless-greedy", "lossless-sampling"], samples=16)


def test_unnormalized_draft_probs_fail():
    with pytest.raises(ConformanceError, match="Draft.probs rows are not probability distributions"):
        check_strategy(UnnormalizedQ, checks=["lossless-sampling"], samples=8)


def test_a_cache_leak_fails_the_cache_check():
    with pytest.raises(ConformanceError) as err:
        check_strategy(CacheLeak, checks=["cache"])
    assert "cache VIOLATED" in str(err.value)
    assert "after step 0: the target cache holds" in str(err.value)


def test_ignoring_max_draft_fails_draft_validity():
    with pytest.raises(ConformanceError, match=r"draft-validity VIOLATED:[\s\S]*max_draft=2.*returned 4 tokens from hook 'draft'; max_draft is 2"):
        check_strategy(IgnoresMaxDraft, checks=["draft-validity"])


def test_randomness_outside_the_seed_fails_determinism():
    with pytest.raises(ConformanceError, match=r"determinism VIOLATED:[\s\S]*draw randomness only from state.next_key\(\)"):
        check_strategy(Unseeded, checks=["determinism"])


def test_mishandling_eos_fails_stopping():
    with pytest.raises(ConformanceError) as err:
        check_strategy(AssumesAllCommitted, checks=["stopping", "lossless-greedy"])
    assert [r.name for r in err.value.report.failures] == ["stopping"]
    assert re.search(r"EOS \d+ \(first at generated position \d+\): the run failed: PluginError: strategy "
                     r"'kit-eos-blind' failed in hook 'on_accept': AssertionError: acceptance not committed", str(err.value))


# -- assert_lossless at temperature > 0 ------------------------------------------------------------


def test_assert_lossless_sampled_passes_a_correct_strategy_and_fails_a_lossy_one():
    m = small_vocab_model()
    assert_lossless(SelfDrafter, model=m, temperature=0.8, max_tokens=16, samples=16)
    assert_lossless(RepeatDrafter, model=m, temperature=1.0, top_k=5, max_tokens=16, samples=16, num_draft=2)
    with pytest.raises(AssertionError, match=r"not lossless in distribution at temperature 0.8[\s\S]*committed == drafted"):
        assert_lossless(ForgetResidual, model=m, temperature=0.8, max_tokens=16, samples=16)
    with pytest.raises(AssertionError, match=r"is not lossless on glm4_moe for prompt .*first divergence"):
        assert_lossless(KeepAll, model=tiny_models()[0], max_tokens=8)  # greedy: unchanged behaviour


# -- the statistics ----------------------------------------------------------------------------------


def test_chi2_sf_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 9, 30):
        for stat in (0.01, 0.5, 3.0, 9.0, 25.0, 60.0, 200.0):
            assert chi2_sf(stat, df) == pytest.approx(scipy_stats.chi2.sf(stat, df), rel=1e-9, abs=1e-300)


@given(params=st.sampling_params(vocab_size=16, greedy=False), seed=hs.integers(0, 2**16))
@settings(max_examples=12)
def test_independent_processing_matches_the_engines(params, seed):
    logits = np.random.default_rng(seed).normal(scale=2.0, size=(3, 16)).astype(np.float32)
    mine = processed_probs(logits, params.temperature, params.top_p, params.top_k)
    engine = np.array(sampling.probs(mx.array(logits), params))
    assert np.abs(mine - engine).max() < 1e-5


@given(seed=hs.integers(0, 2**16), k=hs.integers(0, 3), deterministic=hs.booleans())
@settings(max_examples=60)
def test_the_enumerated_accept_rule_reproduces_p(seed, k, deterministic):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(8, 0.5), size=k + 1)  # [K+1, V]
    q = None if deterministic else rng.dirichlet(np.full(8, 0.5), size=k)  # [K, V]
    draft = [int(rng.integers(0, 8)) for _ in range(k)]
    D, marginal = rule_rows(p, draft, q)
    assert np.allclose(D.sum(-1), 1.0, atol=1e-5) and (D >= 0).all()
    assert marginal.shape == (k, 8) and (k == 0 or np.abs(marginal - p[:k]).max() < 1e-5)


def test_pit_is_uniform_under_the_null_and_not_otherwise():
    rng = np.random.default_rng(0)
    good, bad = [], []
    for _ in range(3000):
        d = rng.dirichlet(np.ones(8))
        good.append(pit(d, int(rng.choice(8, p=d)), rng.random()))
        bad.append(pit(d, int(rng.integers(0, 8)), rng.random()))  # uniform tokens, not d
    assert not pit_uniformity("null", good).rejected
    assert pit_uniformity("alt", bad).rejected


# -- hypothesis strategies and the pytest plugin ---------------------------------------------------


@given(opts=st.option_values(RepeatDrafter), prompt=st.prompts(vocab_size=16, max_size=8),
       model=st.small_vocab_models())
@settings(max_examples=10)
def test_st_strategies_produce_valid_inputs(opts, prompt, model):
    g = moedec.generate(model, prompt, RepeatDrafter, max_tokens=4, **opts)
    assert len(g.tokens) == 4 and 1 <= opts["num_draft"] <= 8


PLUGIN_TEST = """
    def test_fixtures(tiny_model, sampling_model, conformance, register_strategy):
        assert tiny_model.args.vocab_size == 256 and sampling_model.args.vocab_size == 16
        assert conformance.__name__ == "check_strategy"
"""


def test_pytest_plugin_is_opt_in(tmp_path):
    (tmp_path / "test_x.py").write_text(textwrap.dedent(PLUGIN_TEST))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py")]
    on = subprocess.run(base + ["-p", "moedec.testing"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert on.returncode == 0 and "3 passed" in on.stdout, on.stdout + on.stderr
    off = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert off.returncode != 0 and "fixture 'tiny_model' not found" in off.stdout


def test_agreeing_prefix_is_the_index_of_the_first_difference():
    from moedec.testing import agreeing_prefix

    assert agreeing_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert agreeing_prefix([1, 2], [1, 2, 3]) == 2  # one a prefix of the other: the shorter length
    assert agreeing_prefix([5], [6]) == 0 and agreeing_prefix([], []) == 0
