"""Lossless in distribution (temperature > 0): the exact per-step test and the end-to-end test.

*Exact, per step* (small vocabulary): for every step of a real generation the probe recorded the
strategy's draft ``x`` (and its declared ``q``) and the target's processed ``p``. The engine's
accept rule (``moedec.sampling``) is then enumerated exactly: committed token ``j + 1`` given the
draft prefix follows ``D_j = a_j * onehot(x_j) + (1 - a_j) * residual(p_j, q_j)`` with
``a_j = min(1, p_j(x_j) / q_j(x_j))`` (``q`` one-hot when the draft is deterministic), and
``D_K = p_K`` after a full acceptance. Checked exactly: ``q`` is a distribution that gives the
drafted tokens positive probability, and ``sum_x q_j(x) D_j[x] = p_j`` (one step reproduces the
target). Checked statistically on the recorded outcomes: every committed token has positive
probability under ``D_j``; the PITs of committed tokens under ``D_j`` are uniform; committed
tokens equal drafted ones as often as ``D_j`` says; drafted tokens are distributed as declared.

*End to end*: every generated token is compared with the target distribution recomputed
independently (a fresh full forward of the mlx-lm model, numpy sampling transforms).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import attrs
import mlx.core as mx
import numpy as np

from moedec import sampling as rules
from moedec.sampling import SamplingParams

from .stats import ChiSquare, agreement, keep_mask, pit, pit_uniformity, processed_probs

EXACT_TOL = 2e-4  # float32 probabilities summed over a small vocabulary


@attrs.define
class Findings:
    """Violations found (one line each) and the statistical tests that were run."""

    violations: list = attrs.field(factory=list)
    tests: list = attrs.field(factory=list)

    def add(self, message: str) -> None:
        if len(self.violations) < 10:
            self.violations.append(message)

    def test(self, result: Optional[ChiSquare]) -> None:
        if result is None:
            return
        self.tests.append(result)
        if result.rejected:
            self.add(result.describe())


def rule_rows(p: np.ndarray, draft: Sequence[int], q: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The engine's accept rule, enumerated: ``D`` ``[K+1, V]`` (law of committed token ``j + 1``
    given the draft prefix) and ``marginal`` ``[K, V]`` (``D_j`` averaged over ``x_j ~ q_j``)."""
    k, vocab = len(draft), p.shape[-1]
    pm = mx.array(p.astype(np.float32))  # [K+1, V]
    qm = rules.one_hot(draft, vocab) if q is None else mx.array(q.astype(np.float32))  # [K, V]
    if k == 0:
        return p[:1].copy(), np.zeros((0, vocab))
    idx = mx.array(list(draft), dtype=mx.int32)
    rows = mx.arange(k)
    a = rules.acceptance_probability(pm[rows, idx], qm[rows, idx])  # [K]
    r = rules.residual(pm[:k], qm)  # [K, V]
    d = (1.0 - a)[:, None] * r + a[:, None] * rules.one_hot(draft, vocab)  # [K, V]
    a_all = rules.acceptance_probability(pm[:k], qm)  # [K, V] acceptance of every candidate x
    taken = qm * a_all  # [K, V]
    marginal = taken + (1.0 - taken.sum(axis=-1, keepdims=True)) * r
    D = np.concatenate([np.array(d, dtype=np.float64), p[k:k + 1]], axis=0)
    return D, np.array(marginal, dtype=np.float64)


def check_steps(steps: Sequence[Any], rng: np.random.Generator, label: str) -> Findings:
    """The exact per-step test over probe-recorded steps (temperature > 0)."""
    f = Findings()
    outcome_u, hits, hit_p, draft_u = [], [], [], []
    for s in steps:
        if s.p is None:
            continue
        k = len(s.draft)
        if s.q is not None:
            q = s.q
            if not np.all(np.isfinite(q)) or (q < -1e-7).any() or np.abs(q.sum(-1) - 1).max() > 1e-3:
                f.add(f"{label} step {s.index}: Draft.probs rows are not probability distributions "
                      f"(row sums {np.round(q.sum(-1), 4).tolist()}); give the processed distribution each "
                      "draft token was sampled from (state.probs(logits))")
                continue
            zero = [j for j, x in enumerate(s.draft) if q[j, x] <= 0]
            if zero:
                j = zero[0]
                f.add(f"{label} step {s.index}: drafted token {s.draft[j]} at draft position {j} has declared "
                      "probability q = 0, so it was not sampled from Draft.probs")
                continue
            for j, x in enumerate(s.draft):
                draft_u.append(pit(q[j], x, rng.random()))
        D, marginal = rule_rows(s.p, s.draft, s.q)
        if k:
            err = np.abs(marginal - s.p[:k]).max(axis=-1)
            if err.max() > EXACT_TOL:
                j = int(err.argmax())
                f.add(f"{label} step {s.index}: one speculative step through the engine's accept rule does not "
                      f"reproduce the target at draft position {j}: max |sum_x q(x) P(y | x) - p(y)| = {err.max():.3g}")
        for j, c in enumerate(s.tokens[: s.committed]):
            if j > k:
                break
            prob = D[j, c]
            if prob <= 0:
                kind = "the drafted token" if j < k and c == s.draft[j] else f"token {c}"
                f.add(f"{label} step {s.index}: accept committed {kind} at draft position {j}, an outcome the "
                      f"lossless accept rule gives probability 0 (target p = {s.p[j, c]:.3g})")
                continue
            first = s.draft[j] if j < k else None
            outcome_u.append(pit(D[j], c, rng.random(), first=first))
            if j < k:
                hits.append(c == s.draft[j])
                hit_p.append(float(D[j, s.draft[j]]))
    f.test(pit_uniformity(f"{label}: committed tokens vs the exact one-step law of the accept rule", outcome_u))
    f.test(agreement(f"{label}: committed == drafted token, vs the accept rule", hits, hit_p))
    f.test(pit_uniformity(f"{label}: drafted tokens vs their declared Draft.probs", draft_u))
    return f


@attrs.frozen
class Sample:
    """One sampled generation: its prompt, tokens and (if probed) the draft token proposed for
    each generated position (``-1``: none, or a draft with declared ``q``, which is random)."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    drafted: tuple[int, ...]


def drafted_by_position(steps: Sequence[Any], n: int) -> tuple[int, ...]:
    """For each generated position, the deterministic draft token its step proposed there."""
    out = [-1] * n
    for s in steps:
        if s.q is not None:
            continue
        for j, x in enumerate(s.draft[: s.committed]):
            if s.position + j < n:
                out[s.position + j] = x
    return tuple(out)


def reference_probs(model: Any, prompt: Sequence[int], tokens: Sequence[int], params: SamplingParams):
    """``(probs, logits)`` ``[N, V]`` of the target for each generated token, from one full
    forward of the mlx-lm model (no cache, no engine)."""
    seq = list(prompt) + list(tokens)
    logits = model(mx.array([seq[:-1]]))[0].astype(mx.float32)  # [P+N-1, V]
    rows = np.array(logits, dtype=np.float64)[len(prompt) - 1:]  # [N, V]
    return processed_probs(rows, params.temperature, params.top_p, params.top_k), rows


def check_end_to_end(model: Any, samples: Sequence[Sample], params: SamplingParams,
                     rng: np.random.Generator, label: str) -> Findings:
    """Every generated token against the independently recomputed target distribution."""
    f = Findings()
    us, hits, hit_p = [], [], []
    for si, smp in enumerate(samples):
        if not smp.tokens:
            continue
        probs, logits = reference_probs(model, smp.prompt, smp.tokens, params)
        base = np.exp(logits - logits.max(-1, keepdims=True))
        base /= base.sum(-1, keepdims=True)
        allowed = keep_mask(base, logits, params.top_p, params.top_k, slack=1e-4)
        for i, c in enumerate(smp.tokens):
            if not allowed[i, c]:
                f.add(f"{label}: sample {si} (prompt {list(smp.prompt)}) generated token {c} at position {i}, "
                      f"which top_p={params.top_p}/top_k={params.top_k} exclude (target p = 0)")
                continue
            if probs[i, c] <= 0:
                continue  # a float-boundary token admitted by the slack above
            us.append(pit(probs[i], c, rng.random()))
            x = smp.drafted[i] if i < len(smp.drafted) else -1
            if x >= 0 and i > 0:
                hits.append(c == x)
                hit_p.append(float(probs[i, x]))
    f.test(pit_uniformity(f"{label}: generated tokens vs the target distribution", us))
    f.test(agreement(f"{label}: generated == drafted token, vs the target distribution", hits, hit_p))
    return f
