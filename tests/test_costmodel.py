"""The cost model's arithmetic on hand-built cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from moedec import MoedecError
from moedec.accounting import ForwardRecord, LayerUse
from moedec.inventory import ExpertLayer, ModelBytes
from moedec.costmodel import (
    ForwardCost, acceptance_to_break_even, break_even_tokens, bytes_per_token, expected_tokens_per_forward,
    predicted_speedup, random_union, strategy_prediction,
)


def _inv() -> ModelBytes:
    layers = (ExpertLayer("l0", 8, 100), ExpertLayer("l1", 8, 200, fixed_bytes=7))
    return ModelBytes(model_type="hand", layers=layers, top_k=2, attention=1000, shared_experts=300, dense=50,
                      embedding=640, embedding_row=10, lm_head=640, tied=False, total=0)


def test_forward_bytes_by_hand():
    inv = _inv()
    assert inv.fixed == 1000 + 300 + 50 + 640 + 7
    # single token, k=2 in both layers: 2*100 + 2*200 expert bytes, one embedding row, 64 KV bytes
    assert inv.forward_bytes([2, 2], 1, kv=64) == 1997 + 10 + 600 + 64
    # 4 tokens (3 distinct), union 5 and 3: 500 + 600 expert bytes
    assert inv.forward_bytes([5, 3], 3) == 1997 + 30 + 1100
    with pytest.raises(MoedecError):
        inv.expert_read([1])


def _rec(tokens, union, pair, uni):
    layers = tuple(LayerUse(i, tokens, 2 * tokens, union) for i in range(2))
    return ForwardRecord(tokens=tokens, distinct_tokens=tokens, layers=layers, kv_bytes=0, bytes_pair=pair, bytes_union=uni)


def test_forward_cost_means_and_bytes_per_token():
    recs = [_rec(1, 2, 100, 100), _rec(3, 4, 300, 140)]
    c = ForwardCost.from_records(recs)
    assert (c.forwards, c.tokens, c.union, c.selections) == (2, 2.0, 3.0, 4.0)
    assert (c.bytes("pair"), c.bytes("union")) == (200.0, 120.0)
    assert bytes_per_token(recs, 5, "pair") == 80.0 and bytes_per_token(recs, 5, "union") == 48.0
    with pytest.raises(MoedecError):
        c.bytes("gather")
    with pytest.raises(MoedecError):
        ForwardCost.from_records([])


def test_predicted_speedup_by_hand():
    single = ForwardCost(forwards=10, tokens=1, union=2, selections=2, bytes_pair=100, bytes_union=100)
    verify = ForwardCost(forwards=4, tokens=5, union=6, selections=10, bytes_pair=250, bytes_union=150)
    assert predicted_speedup(2.5, verify, single, "pair") == pytest.approx(1.0)
    assert predicted_speedup(2.5, verify, single, "union") == pytest.approx(5 / 3)
    assert strategy_prediction(1.0, single, single) == {"pair": 1.0, "union": 1.0}
    # the design's practitioners' case: T=8 verify reading 2.07x a step needs > 2.07 tokens/forward
    assert break_even_tokens(2.07, 1.0) == pytest.approx(2.07)
    with pytest.raises(MoedecError):
        break_even_tokens(1.0, 0.0)


def test_expected_tokens_per_forward():
    assert expected_tokens_per_forward(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens_per_forward(0.0, 5) == 1.0
    assert expected_tokens_per_forward(1.0, 5) == 6.0
    assert expected_tokens_per_forward(0.7, 0) == 1.0
    with pytest.raises(MoedecError):
        expected_tokens_per_forward(1.5, 3)


@settings(max_examples=60)
@given(hs.floats(0.0, 0.999), hs.integers(1, 16))
def test_acceptance_to_break_even_inverts_expected_tokens(alpha, k):
    tau = expected_tokens_per_forward(alpha, k)
    found = acceptance_to_break_even(tau, k)
    assert found is not None
    assert expected_tokens_per_forward(found, k) == pytest.approx(tau, abs=1e-6)


def test_acceptance_to_break_even_edges():
    assert acceptance_to_break_even(1.0, 4) == 0.0
    assert acceptance_to_break_even(5.0, 4) == pytest.approx(1.0, abs=1e-6)
    assert acceptance_to_break_even(5.5, 4) is None  # more than K+1 tokens: impossible
    assert acceptance_to_break_even(1.5, 1) == pytest.approx(0.5, abs=1e-6)


def test_random_union_formula_and_simulation():
    assert random_union(1, 2, 8) == pytest.approx(2.0)
    assert random_union(2, 2, 8) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert random_union(50, 8, 8) == pytest.approx(8.0)
    rng = np.random.default_rng(0)
    sims = [len({e for _ in range(4) for e in rng.choice(16, 3, replace=False)}) for _ in range(4000)]
    assert np.mean(sims) == pytest.approx(random_union(4, 3, 16), abs=0.08)
    assert not math.isnan(random_union(3, 0, 8))
