"""Statistics for the distribution checks: processed target probabilities computed independently
of the engine (numpy), randomized probability integral transforms, and chi-square tests.

Every test here works on *sequential* draws: draw ``i`` has a known conditional law ``D_i`` given
everything before it. Then the randomized PIT ``u_i = D_i(tokens ranked before c_i) + U * D_i(c_i)``
(``U`` uniform, independent) is exactly i.i.d. uniform on [0, 1) under the null hypothesis, so
binning the ``u_i`` gives a valid Pearson chi-square test however the ``D_i`` vary.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import attrs
import numpy as np

#: Significance level of every statistical check. Seeds are fixed, so a given strategy either
#: always passes or always fails; a correct one fails with probability about this.
ALPHA = 1e-6
PIT_BINS = 10


# -- the chi-square distribution ------------------------------------------------------------------


def _gamma_p_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its power series (good for x < a + 1)."""
    term = total = 1.0 / a
    n = a
    for _ in range(10_000):
        n += 1.0
        term *= x / n
        total += term
        if abs(term) < abs(total) * 1e-15:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_q_fraction(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by its continued fraction (modified Lentz;
    good for x >= a + 1)."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h * math.exp(-x + a * math.log(x) - math.lgamma(a))


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square with ``df`` degrees of freedom."""
    if stat <= 0:
        return 1.0
    a, x = df / 2.0, stat / 2.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gamma_p_series(a, x))
    return _gamma_q_fraction(a, x)


# -- target probabilities, independently of moedec.sampling ---------------------------------------


def processed_probs(logits: np.ndarray, temperature: float, top_p: float = 1.0, top_k: int = 0) -> np.ndarray:
    """``[..., V]`` probabilities as mlx-lm's sampler defines them: top-p then top-k on the
    untempered distribution, then temperature. Written in numpy, apart from the engine."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    keep = keep_mask(p, x, top_p, top_k)
    z = np.where(keep, x / temperature, -np.inf)
    z -= z.max(axis=-1, keepdims=True)
    out = np.exp(z)
    return out / out.sum(axis=-1, keepdims=True)


def keep_mask(p: np.ndarray, logits: np.ndarray, top_p: float, top_k: int, slack: float = 0.0) -> np.ndarray:
    """Tokens that survive top-p / top-k truncation (``slack`` widens both cut-offs, in
    probability mass for top-p and in logits for top-k, to absorb float rounding)."""
    keep = np.ones(p.shape, dtype=bool)
    if 0.0 < top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of strictly likelier tokens
        keep_sorted = mass_before < top_p + slack
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
    if top_k > 0 and top_k < p.shape[-1]:
        kth = -np.sort(-logits, axis=-1)[..., top_k - 1 : top_k]  # the k-th largest logit
        keep &= logits >= kth - slack
    return keep


# -- randomized PIT ---------------------------------------------------------------------------------


def pit(dist: np.ndarray, token: int, u: float, first: Optional[int] = None) -> float:
    """Randomized PIT of ``token`` under ``dist`` ``[V]``: tokens ranked by probability
    (descending, ties by id), with ``first`` (e.g. the drafted token) moved to the front."""
    order = np.lexsort((np.arange(dist.shape[0]), -dist))
    if first is not None:
        order = np.concatenate([[first], order[order != first]])
    rank = int(np.nonzero(order == token)[0][0])
    below = float(dist[order[:rank]].sum())
    return min(below + u * float(dist[token]), 1.0 - 1e-12)


@attrs.frozen
class ChiSquare:
    """A chi-square test result: statistic, degrees of freedom, p-value, and a short account."""

    name: str
    stat: float
    df: int
    pvalue: float
    n: int
    detail: str

    @property
    def rejected(self) -> bool:
        return self.pvalue < ALPHA

    def describe(self) -> str:
        return (f"{self.name}: chi-square {self.stat:.1f} with {self.df} df over {self.n} draws, "
                f"p-value {self.pvalue:.2g} (< {ALPHA:g}); {self.detail}")


def pit_uniformity(name: str, us: Sequence[float], bins: int = PIT_BINS) -> Optional[ChiSquare]:
    """Pearson chi-square of binned PIT values against uniform; ``None`` with too few draws."""
    us = np.asarray(list(us), dtype=np.float64)
    n = us.size
    if n < 5 * bins:
        return None
    counts = np.bincount(np.minimum((us * bins).astype(int), bins - 1), minlength=bins)
    expected = n / bins
    stat = float(((counts - expected) ** 2 / expected).sum())
    shares = ", ".join(f"{c / n:.2f}" for c in counts)
    return ChiSquare(name, stat, bins - 1, chi2_sf(stat, bins - 1), n,
                     f"PIT decile shares [{shares}] (each should be about {1 / bins:.2f})")


def agreement(name: str, hits: Iterable[bool], probs: Iterable[float]) -> Optional[ChiSquare]:
    """How often the committed token equals the drafted one, against its exact probability at each
    draw: ``(sum(hit - pi))^2 / sum(pi (1 - pi))`` is chi-square with 1 df (martingale CLT)."""
    hits = np.asarray(list(hits), dtype=np.float64)
    probs = np.asarray(list(probs), dtype=np.float64)
    var = float((probs * (1 - probs)).sum())
    if hits.size < 30 or var < 5.0:
        return None
    stat = float((hits - probs).sum() ** 2 / var)
    return ChiSquare(name, stat, 1, chi2_sf(stat, 1), int(hits.size),
                     f"the committed token equalled the drafted one {int(hits.sum())} times; "
                     f"expected {probs.sum():.1f} +- {math.sqrt(var):.1f}")
