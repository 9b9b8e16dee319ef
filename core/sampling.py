"""Sampling settings, the processed target distribution, and the speculative accept rules.

Temperature, top-p and top-k are applied with mlx-lm's own sampler utilities, identically to the
target's logits (``p``) and to a drafter's logits (``q``). The accept rules are split into small
pure functions so that tests can enumerate their outcome distribution exactly.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import attrs
import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from .options import in_range


@attrs.frozen
class SamplingParams:
    """``temperature`` 0 means greedy; ``top_p`` 1.0 and ``top_k`` 0 mean no truncation."""

    temperature: float = attrs.field(default=0.0, converter=float, validator=in_range(0.0, None))
    top_p: float = attrs.field(default=1.0, converter=float, validator=in_range(0.0, 1.0))
    top_k: int = attrs.field(default=0, converter=int, validator=in_range(0, None))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Processed log-probabilities ``[..., V]``: top-p, top-k, then temperature (as mlx-lm's
    ``make_sampler`` does), renormalised. At temperature 0 this is the plain log-softmax."""
    x = logits.astype(mx.float32)
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    if params.greedy:
        return x
    if 0.0 < params.top_p < 1.0:
        x = apply_top_p(x, params.top_p)
    if 0 < params.top_k < x.shape[-1]:  # top_k >= V keeps everything (mlx-lm would raise)
        x = apply_top_k(x, params.top_k)
    x = x * (1.0 / params.temperature)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Processed probabilities ``[..., V]`` (see :func:`logprobs`)."""
    return mx.exp(logprobs(logits, params))


def fresh_seed() -> int:
    """A random seed for a generation that was given none."""
    return int.from_bytes(os.urandom(7), "little")


def sample(p: mx.array, key: mx.array) -> mx.array:
    """One categorical draw per row of the probability table ``p`` ``[..., V]``."""
    return mx.random.categorical(mx.log(p), key=key)


# -- greedy ---------------------------------------------------------------------------------------


def greedy_accept(draft: Sequence[int], targets: Sequence[int]) -> tuple[list[int], int]:
    """Longest prefix of ``draft`` equal to the target argmaxes, plus the target's next token.

    ``targets[i]`` is the argmax after input ``i`` (``len(targets) == len(draft) + 1``).
    """
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return list(draft[:n]) + [int(targets[n])], n


# -- speculative sampling -------------------------------------------------------------------------


def acceptance_probability(p_x: mx.array, q_x: mx.array) -> mx.array:
    """``min(1, p(x) / q(x))``; a token the drafter gave probability 0 is accepted iff ``p(x) > 0``."""
    safe_q = mx.where(q_x > 0, q_x, 1.0)
    ratio = mx.where(q_x > 0, p_x / safe_q, mx.where(p_x > 0, 1.0, 0.0))
    return mx.minimum(ratio, 1.0)


def residual(p: mx.array, q: mx.array) -> mx.array:
    """The distribution to sample after a rejection: ``max(p - q, 0)`` renormalised ``[V]``.

    If it is all zero (``q >= p`` everywhere, which means ``p == q`` and no rejection could have
    happened up to rounding) fall back to ``p``.
    """
    r = mx.maximum(p - q, 0.0)
    total = r.sum(axis=-1, keepdims=True)
    return mx.where(total > 0, r / mx.where(total > 0, total, 1.0), p)


def one_hot(tokens: Sequence[int], vocab: int) -> mx.array:
    """``[K, V]`` one-hot rows: the ``q`` of a deterministic draft."""
    idx = mx.array(list(tokens), dtype=mx.int32)
    return (mx.arange(vocab)[None, :] == idx[:, None]).astype(mx.float32)


def speculative_accept(
    p: mx.array, draft: Sequence[int], q: Optional[mx.array], key: mx.array
) -> tuple[list[int], int]:
    """Speculative rejection sampling, lossless in distribution.

    ``p``: ``[K+1, V]`` processed target probabilities; ``draft``: ``K`` ids; ``q``: ``[K, V]`` the
    drafter's processed probabilities, or ``None`` for a deterministic draft (one-hot ``q``: accept
    ``x`` with probability ``p(x)``, on rejection sample from ``p`` with ``x`` removed). Accept draft
    token ``i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection sample from
    :func:`residual`; if all are accepted sample a bonus token from ``p_K``.
    Returns ``(tokens, num_accepted)``.
    """
    k = len(draft)
    if k == 0:  # a plain step: the same draw as the engine's single-token path
        return [int(sample(p[0], key).item())], 0
    k_u, k_s = mx.random.split(key)
    vocab = p.shape[-1]
    q = one_hot(draft, vocab) if q is None else mx.array(q).astype(mx.float32).reshape(k, vocab)
    idx = mx.array(list(draft), dtype=mx.int32)
    rows = mx.arange(k)
    a = acceptance_probability(p[rows, idx], q[rows, idx])  # [K]
    u = mx.random.uniform(shape=(k,), key=k_u)
    accepted = (u < a).tolist()
    n = 0
    while n < k and accepted[n]:
        n += 1
    dist = p[k] if n == k else residual(p[n], q[n])
    return list(draft[:n]) + [int(sample(dist, k_s).item())], n
