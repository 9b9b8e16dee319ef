"""End to end at temperature 1.0: speculative strategies sample the target's distribution.

A tiny model with a 32-token vocabulary (its head scaled so that the distributions are peaked enough
for a few thousand runs to resolve them). For each strategy, the joint distribution of the first two
generated tokens, and the marginal of the third, over seeded runs must match ``single`` (chi-square,
fixed seeds, disjoint seed ranges). With ``max_tokens=4`` the first speculative step drafts two
tokens, so the second and third tokens come from its accept rule (accepted draft, residual, or
bonus). A deliberately wrong accept rule (accept every draft token) must fail the same test.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten
from scipy import stats

import moedec
from moedec import sampling
from moedec.testing import oracle_greedy, tiny_moe

VOCAB = 32
RUNS = 1000  # per strategy
WRONG_RUNS = 300
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, moe_intermediate_size=16, intermediate_size=32, num_experts=4)


def _model(head_scale: float, noise: float = 0.0):
    m = tiny_moe("qwen3_moe", 0, **SMALL)
    w = m.lm_head.weight * head_scale
    if noise:
        w = w + noise * mx.random.normal(w.shape, key=mx.random.key(3))
    m.update(tree_unflatten([("lm_head.weight", w)]))
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def setup():
    target = _model(3.0)
    drafter = _model(3.0, noise=0.3)  # agrees with the target about half the time
    # every token occurs in the prompt (prompt lookup always drafts), then the target's own greedy
    # chain (the most recent matches, so its drafts are often plausible)
    prompt = list(range(VOCAB)) + list(oracle_greedy(target, [0], 40).tokens)
    return target, drafter, prompt


def sample_runs(target, prompt, strategy, runs, first_seed, **options):
    """``(pairs, thirds, accepted, drafted)`` over ``runs`` seeded generations."""
    pairs, thirds, accepted, drafted = [], [], 0, 0
    for seed in range(first_seed, first_seed + runs):
        g = moedec.generate(target, prompt, strategy, max_tokens=4, temperature=1.0, seed=seed,
                            eos_token_ids=[], **options)
        pairs.append(g.tokens[0] * VOCAB + g.tokens[1])
        thirds.append(g.tokens[2])
        accepted += g.stats.accepted
        drafted += g.stats.drafted
    return np.array(pairs), np.array(thirds), accepted, drafted


def two_sample_pvalue(a: np.ndarray, b: np.ndarray, min_count: int = 10) -> float:
    """Chi-square test that the categorical samples ``a`` and ``b`` share one distribution; cells
    with fewer than ``min_count`` pooled observations are merged into one."""
    cells = np.union1d(a, b)
    ca = np.array([(a == c).sum() for c in cells])
    cb = np.array([(b == c).sum() for c in cells])
    big = ca + cb >= min_count
    table = np.stack([np.append(ca[big], ca[~big].sum()), np.append(cb[big], cb[~big].sum())])
    table = table[:, table.sum(0) > 0]
    return float(stats.chi2_contingency(table).pvalue)


@pytest.fixture(scope="module")
def reference(setup):
    target, _, prompt = setup
    return sample_runs(target, prompt, "single", RUNS, first_seed=0)


def _options(name, drafter):
    return {"draft_model": drafter, "num_draft": 2} if name == "draft-model" else {}


@pytest.mark.parametrize("name", ["prompt-lookup", "draft-model"])
def test_first_tokens_match_single(setup, reference, name):
    target, drafter, prompt = setup
    pairs, thirds, accepted, drafted = sample_runs(target, prompt, name, RUNS, 10**6, **_options(name, drafter))
    assert drafted >= RUNS and 0.1 * drafted < accepted < drafted  # both outcomes are exercised
    assert same_distribution(pairs, thirds, reference)


def same_distribution(pairs, thirds, reference, alpha=1e-3) -> bool:
    """The test: neither the (first, second) joint nor the third token's marginal differs from single's."""
    return min(two_sample_pvalue(pairs, reference[0]), two_sample_pvalue(thirds, reference[1])) > alpha


@pytest.mark.parametrize("name", ["prompt-lookup", "draft-model"])
def test_a_wrong_accept_rule_fails_the_same_test(setup, reference, name, monkeypatch):
    target, drafter, prompt = setup
    monkeypatch.setattr(sampling, "acceptance_probability", lambda p_x, q_x: mx.ones_like(p_x))
    pairs, thirds, accepted, drafted = sample_runs(target, prompt, name, WRONG_RUNS, 2 * 10**6, **_options(name, drafter))
    assert accepted == drafted  # the wrong rule is in force
    assert not same_distribution(pairs, thirds, reference, alpha=1e-6)  # fails, by a wide margin
