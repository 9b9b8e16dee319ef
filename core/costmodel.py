"""The bandwidth cost model (DESIGN.md, "Expert accounting and the cost model").

Decode on a large MoE is memory-bandwidth bound: a forward takes time proportional to the bytes it
reads. A strategy that commits ``tau`` tokens per verify forward of ``B_verify`` bytes, against
single-token decoding at ``B_single`` bytes per token, is predicted to run::

    speedup = tau * B_single / B_verify

times faster than ``single``. ``B`` depends on the kernel: the per-pair kernel (stock gather) reads
one expert slice per (token, expert) pair, ``T·k`` per layer; the union kernel reads each active
expert once, ``U`` per layer. A ``T``-token forward therefore needs ``tau >= B(T) / B(1)`` to win
(the break-even tokens per forward). Drafting costs are not part of the model: for a drafter that
reads memory itself (a draft model) the prediction is an upper bound.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import attrs

from .accounting import ForwardRecord
from .inventory import KERNELS
from .errors import MoedecError


def _kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise MoedecError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    return kernel


@attrs.frozen
class ForwardCost:
    """The mean forward of a run: ``tokens`` fed, mean union and selections per expert layer, and
    bytes read under each kernel."""

    forwards: int
    tokens: float
    union: float
    selections: float
    bytes_pair: float
    bytes_union: float

    def bytes(self, kernel: str) -> float:
        return self.bytes_pair if _kernel(kernel) == "pair" else self.bytes_union

    @classmethod
    def from_records(cls, records: Sequence[ForwardRecord]) -> "ForwardCost":
        n = len(records)
        if n == 0:
            raise MoedecError("no forwards were recorded")
        mean = lambda xs: sum(xs) / n  # noqa: E731
        return cls(
            forwards=n,
            tokens=mean([r.tokens for r in records]),
            union=mean([r.mean_union for r in records]),
            selections=mean([r.mean_selections for r in records]),
            bytes_pair=mean([r.bytes_pair for r in records]),
            bytes_union=mean([r.bytes_union for r in records]),
        )


def predicted_speedup(tokens_per_forward: float, verify: ForwardCost, single: ForwardCost, kernel: str) -> float:
    """``tau * B_single / B_verify`` under ``kernel``."""
    b = verify.bytes(kernel)
    if b <= 0:
        raise MoedecError("a forward that reads no bytes cannot be costed")
    return tokens_per_forward * single.bytes(kernel) / b


def bytes_per_token(records: Sequence[ForwardRecord], committed_tokens: int, kernel: str) -> float:
    """Total bytes read by ``records`` per committed token."""
    if committed_tokens <= 0:
        raise MoedecError("no tokens were committed")
    return sum(r.bytes(_kernel(kernel)) for r in records) / committed_tokens


def break_even_tokens(verify_bytes: float, single_bytes: float) -> float:
    """Tokens a forward of ``verify_bytes`` must commit to match single-token decoding."""
    if single_bytes <= 0:
        raise MoedecError("a single step that reads no bytes cannot be a baseline")
    return verify_bytes / single_bytes


def expected_tokens_per_forward(acceptance: float, num_draft: int) -> float:
    """Tokens committed per forward when each of ``num_draft`` drafted tokens is accepted with
    probability ``acceptance``, independently, until the first rejection (plus the target's own
    token): ``(1 - a^(K+1)) / (1 - a)``."""
    if not 0.0 <= acceptance <= 1.0:
        raise MoedecError(f"acceptance must be in [0, 1], got {acceptance}")
    if num_draft < 0:
        raise MoedecError(f"num_draft must be >= 0, got {num_draft}")
    if acceptance == 1.0:
        return float(num_draft + 1)
    return (1.0 - acceptance ** (num_draft + 1)) / (1.0 - acceptance)


def acceptance_to_break_even(tokens_needed: float, num_draft: int, tol: float = 1e-9) -> Optional[float]:
    """The per-token acceptance rate at which ``num_draft`` drafted tokens commit ``tokens_needed``
    per forward on average; ``None`` when even full acceptance cannot (``tokens_needed > K + 1``)."""
    if tokens_needed <= 1.0:
        return 0.0
    if tokens_needed > num_draft + 1 + tol:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(200):  # expected_tokens_per_forward is increasing in the acceptance rate
        mid = (lo + hi) / 2
        if expected_tokens_per_forward(mid, num_draft) < tokens_needed:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return hi


def random_union(tokens: int, k: int, num_experts: int) -> float:
    """Expected distinct experts when ``tokens`` tokens each pick ``k`` of ``num_experts`` uniformly
    at random: ``E (1 - (1 - k/E)^T)`` — the no-locality reference for measured unions."""
    if num_experts <= 0 or k <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - min(k, num_experts) / num_experts) ** tokens)


def strategy_prediction(
    tokens_per_forward: float, verify: ForwardCost, single: ForwardCost
) -> dict[str, float]:
    """``{kernel: predicted speedup}`` for both kernels."""
    return {k: predicted_speedup(tokens_per_forward, verify, single, k) for k in KERNELS}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, or ``None`` when either is missing or ``b`` is 0 (for measured/predicted gaps)."""
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
