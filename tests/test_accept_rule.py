"""The speculative accept rule, tested exactly on small vocabularies.

One speculative step with drafter distribution ``q`` and target ``p``: the draft token ``x ~ q`` is
accepted with probability ``a(x)``, otherwise the step emits a sample of the residual ``r``. The
first emitted token therefore has the distribution

    P(y) = q(y) a(y) + (sum_x q(x) (1 - a(x))) r(y)

which the rule must make equal to ``p`` exactly. We enumerate that with ``moedec.sampling``'s own
``acceptance_probability`` and ``residual`` and compare with ``p`` (<= 1e-6), for full ``q`` and for
the one-hot ``q`` of a deterministic draft; wrong rules must fail the same comparison.
"""

import mlx.core as mx
import numpy as np
from hypothesis import assume, given, settings, strategies as hs
from scipy import stats

from moedec import sampling
from moedec.sampling import SamplingParams, acceptance_probability, one_hot, residual, speculative_accept

TOL = 1e-6


def first_token_distribution(p, q, accept=acceptance_probability, resid=residual) -> np.ndarray:
    """Exact distribution of the first emitted token of one speculative step ``[V]``."""
    p = mx.array(np.asarray(p, np.float32))
    q = mx.array(np.asarray(q, np.float32))
    a = accept(p, q)  # [V]: acceptance probability of each possible draft token
    r = resid(p, q)  # [V]
    rejected = (q * (1.0 - a)).sum()
    return np.array(q * a + rejected * r, np.float64)


@hs.composite
def distributions(draw, vocab: int, zeros: bool = True):
    """A probability vector over ``vocab`` tokens; may contain exact zeros (as top-k/top-p make)."""
    w = draw(hs.lists(hs.floats(0.0, 1.0, allow_subnormal=False), min_size=vocab, max_size=vocab))
    if zeros:
        mask = draw(hs.lists(hs.booleans(), min_size=vocab, max_size=vocab))
        w = [0.0 if m else x for x, m in zip(w, mask)]
    w = np.array(w, np.float64)
    assume(w.sum() > 1e-3)
    return (w / w.sum()).astype(np.float32)


@hs.composite
def pairs(draw, zeros: bool = True):
    vocab = draw(hs.integers(2, 6))
    return draw(distributions(vocab, zeros)), draw(distributions(vocab, zeros))


@settings(max_examples=300, deadline=None)
@given(pq=pairs())
def test_first_emitted_token_is_distributed_as_p(pq):
    p, q = pq
    np.testing.assert_allclose(first_token_distribution(p, q), p, atol=TOL)


@settings(max_examples=200, deadline=None)
@given(data=hs.data(), vocab=hs.integers(2, 6))
def test_deterministic_draft_one_hot_q(data, vocab):
    p = data.draw(distributions(vocab))
    x = data.draw(hs.integers(0, vocab - 1))
    q = np.array(one_hot([x], vocab))[0]
    got = first_token_distribution(p, q)
    np.testing.assert_allclose(got, p, atol=TOL)
    # the rule spelt out: accept x with probability p(x); else sample p without x, renormalised
    a = float(acceptance_probability(mx.array(p[x]), mx.array(1.0)).item())
    assert abs(a - p[x]) <= TOL
    r = np.array(residual(mx.array(p), mx.array(q)))
    if p[x] < 1 - 1e-6:
        rest = p.astype(np.float64).copy()
        rest[x] = 0
        np.testing.assert_allclose(r, rest / rest.sum(), atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(data=hs.data(), vocab=hs.integers(2, 8), temperature=hs.floats(0.2, 2.0),
       top_p=hs.sampled_from([1.0, 0.9, 0.6]), top_k=hs.integers(0, 4))
def test_exact_with_processed_target_and_drafter_distributions(data, vocab, temperature, top_p, top_k):
    """p and q as the engine makes them: the same temperature/top-p/top-k applied to both."""
    logits = data.draw(hs.lists(hs.floats(-4, 4), min_size=2 * vocab, max_size=2 * vocab))
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    both = sampling.probs(mx.array(np.array(logits, np.float32).reshape(2, vocab)), params)  # [2, V]
    p, q = np.array(both[0]), np.array(both[1])
    np.testing.assert_allclose(first_token_distribution(p, q), p, atol=TOL)


# -- wrong rules fail the same comparison ----------------------------------------------------------


def _far_apart(p, q) -> bool:
    return 0.5 * np.abs(p.astype(np.float64) - q).sum() > 0.05


@settings(max_examples=100, deadline=None)
@given(pq=pairs())
def test_accepting_always_is_caught(pq):
    p, q = pq
    assume(_far_apart(p, q))
    always = lambda p_x, q_x: mx.ones_like(p_x)  # noqa: E731
    assert np.abs(first_token_distribution(p, q, accept=always) - p).max() > 10 * TOL


@settings(max_examples=100, deadline=None)
@given(pq=pairs(zeros=False))  # with exact zeros most pairs barely overlap and the filter below drops them
def test_resampling_from_p_instead_of_the_residual_is_caught(pq):
    p, q = pq
    # the wrong rule emits min(p, q) + TV(p, q) p: it is right only when min(p, q) is proportional to p
    overlap = np.minimum(p, q).astype(np.float64)
    assume(overlap.sum() > 0.05 and np.abs(overlap / overlap.sum() - p).max() > 0.05)
    wrong = first_token_distribution(p, q, resid=lambda p, q: p)
    assert np.abs(wrong - p).max() > 10 * TOL


def test_one_hot_rule_that_keeps_x_on_rejection_is_caught():
    p = np.array([0.5, 0.3, 0.2], np.float32)
    q = np.array(one_hot([0], 3))[0]
    wrong = first_token_distribution(p, q, resid=lambda p, q: p)  # forgot to remove x
    assert abs(wrong[0] - (0.5 + 0.5 * 0.5)) < 1e-6 and np.abs(wrong - p).max() > 0.2


# -- the whole function, sampled -------------------------------------------------------------------


def _run_steps(p, q, runs, seed):
    """``runs`` calls of ``speculative_accept`` with drafts sampled from ``q``: the emitted tokens by
    position (first; second when the first draft token was accepted; bonus when all were)."""
    rng = np.random.default_rng(seed)
    vocab = p.shape[-1]
    qn = np.array(q, np.float64)
    first, second, bonus = [], [], []
    keys = mx.random.split(mx.random.key(seed), runs)
    for i in range(runs):
        draft = [int(rng.choice(vocab, p=qn[j] / qn[j].sum())) for j in range(q.shape[0])]
        tokens, n = speculative_accept(p, draft, q, keys[i])
        assert len(tokens) == n + 1 and tokens[:n] == draft[:n]
        first.append(tokens[0])
        if n >= 1:
            second.append(tokens[1])
        if n == 2:
            bonus.append(tokens[2])
    return first, second, bonus


def _pvalue(seen, dist):
    counts = np.bincount(seen, minlength=dist.shape[0])
    return stats.chisquare(counts, dist / dist.sum() * len(seen)).pvalue


def test_speculative_accept_samples_p_at_every_position(monkeypatch):
    """``speculative_accept`` itself (K = 2): the first emitted token follows ``p_0``; given the first
    draft token was accepted, the second follows ``p_1``; a full acceptance draws the bonus from ``p_2``."""
    rng = np.random.default_rng(0)
    vocab = 5
    p = mx.array(rng.dirichlet(np.ones(vocab), size=3).astype(np.float32))  # [3, V]
    q = mx.array(rng.dirichlet(np.ones(vocab), size=2).astype(np.float32))  # [2, V]
    pn = np.array(p, np.float64)
    for row, seen in enumerate(_run_steps(p, q, 3000, seed=1)):
        assert len(seen) > 200
        assert _pvalue(seen, pn[row]) > 1e-3, (row, np.bincount(seen, minlength=vocab), pn[row])
    # the same harness catches a wrong rule: always accepting emits q_0, not p_0
    monkeypatch.setattr(sampling, "acceptance_probability", lambda p_x, q_x: mx.ones_like(p_x))
    first, _, _ = _run_steps(p, q, 600, seed=2)
    assert _pvalue(first, pn[0]) < 1e-6
