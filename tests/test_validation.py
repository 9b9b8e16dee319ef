"""The engine validates what hooks return and names the strategy and hook in every error."""

import attrs
import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache

import moedec
from moedec import Acceptance, Draft, Verification
from moedec.errors import MoedecError, PluginError
from moedec.testing import tiny_models


def strat(**hooks):
    cls = type("S", (), {"name": "bad", **{k: moedec.hookimpl(v) for k, v in hooks.items()}})
    return cls()


@pytest.fixture
def model():
    return tiny_models()[0]


@pytest.mark.parametrize(
    "draft, match",
    [
        (lambda self, state: [999], r"strategy 'bad' drafted token 999 in hook 'draft', outside the vocabulary \[0, 256\)"),
        (lambda self, state: [1] * 40, r"strategy 'bad' returned 40 tokens from hook 'draft'; max_draft is 32"),
        (lambda self, state: "abc", r"strategy 'bad' returned str from hook 'draft'"),
        (lambda self, state: [1.5], r"strategy 'bad' returned list from hook 'draft'"),
        (lambda self, state: Draft([1, 2], probs=mx.zeros((3, 256))), r"Draft.probs of shape \(3, 256\).*expected \(2, 256\)"),
        (lambda self, state: 1 / 0, r"strategy 'bad' failed in hook 'draft': ZeroDivisionError"),
    ],
)
def test_bad_drafts(model, draft, match):
    with pytest.raises(PluginError, match=match):
        moedec.generate(model, [1, 2], strat(draft=draft), max_tokens=8)


def test_draft_accepts_arrays_and_draft_objects(model):
    ref = moedec.generate(model, [1, 2], max_tokens=8).tokens
    for d in (mx.array([3, 4]), Draft((3, 4)), (3, 4)):
        g = moedec.generate(model, [1, 2], strat(draft=lambda self, state, d=d: d), max_tokens=8)
        assert g.tokens == ref


def test_verify_must_feed_pending_plus_draft(model):
    def verify(self, state, draft):
        from moedec.forward import forward

        logits, hidden = forward(state.model, [state.tokens[-1]] * (len(draft) + 2), state.cache)
        return Verification(logits, hidden, [state.tokens[-1]] * (len(draft) + 2))

    with pytest.raises(PluginError, match=r"strategy 'bad' fed 2 tokens into the cache in hook 'verify'; expected 1"):
        moedec.generate(model, [1, 2], strat(verify=verify), max_tokens=8)


def test_verify_none_falls_back_to_default(model):
    g = moedec.generate(model, [1, 2], strat(verify=lambda self, state, draft: None), max_tokens=8)
    assert g.tokens == moedec.generate(model, [1, 2], max_tokens=8).tokens


@pytest.mark.parametrize(
    "accept, match",
    [
        (lambda self, state, draft, verification: Acceptance((1, 2), 0), r"invalid Acceptance.*num_accepted=0 with 2 tokens"),
        (lambda self, state, draft, verification: Acceptance((9, 1), 1), r"not the draft's prefix"),
        (lambda self, state, draft, verification: Acceptance((300,), 0), r"outside the vocabulary"),
        (lambda self, state, draft, verification: [1], r"returned list from hook 'accept', expected Acceptance"),
    ],
)
def test_bad_acceptances(model, accept, match):
    s = strat(draft=lambda self, state: [5], accept=accept)
    with pytest.raises(PluginError, match=r"strategy 'bad'.*" + match):
        moedec.generate(model, [1, 2], s, max_tokens=8)


def test_non_trimmable_cache_is_refused_for_speculative_strategies(model, monkeypatch):
    import moedec.engine as engine

    monkeypatch.setattr(engine, "new_cache", lambda m: [RotatingKVCache(max_size=4, keep=0) for _ in m.layers])
    # single never drafts: fine even with a rotating cache
    moedec.generate(model, [1, 2], max_tokens=3)
    with pytest.raises(MoedecError, match=r"strategy 'bad' drafts tokens, but the model's cache \(RotatingKVCache\) cannot be rewound"):
        moedec.generate(model, list(range(10)), strat(draft=lambda self, state: [1]), max_tokens=8)


def test_python_api_rejects_unknown_options_and_bad_sampling(model):
    with pytest.raises(MoedecError, match="strategy 'single' has no option 'num_draft'"):
        moedec.generate(model, [1], "single", num_draft=3)
    with pytest.raises(MoedecError, match="bad sampling setting"):
        moedec.generate(model, [1], temperature=-1)
    with pytest.raises(MoedecError, match="outside the vocabulary"):
        moedec.generate(model, [1000])
    with pytest.raises(MoedecError, match="needs a tokenizer"):
        moedec.generate(model, "text")
    with pytest.raises(MoedecError, match="unknown strategy 'nope'; available: .*single"):
        moedec.generate(model, [1], "nope")


@attrs.define
class RejectAll:
    """Drafts, then rejects every draft token: slower, still lossless."""

    name = "reject-all"

    @moedec.hookimpl
    def draft(self, state):
        return [state.tokens[-1]] * 3

    @moedec.hookimpl
    def accept(self, state, draft, verification):
        if len(state.generated) % 2:  # None falls back to the engine's default accept
            return None
        return Acceptance((int(mx.argmax(verification.logits[0]).item()),), 0)


def test_strategy_accept_overrides_and_falls_back(model):
    from moedec.testing import assert_lossless

    assert_lossless(RejectAll, model=model)
    g = moedec.generate(model, [1, 2, 3], RejectAll, max_tokens=12)
    assert g.stats.drafted > 0 and g.stats.accepted <= g.stats.drafted
