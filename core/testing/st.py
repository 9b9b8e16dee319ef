"""Hypothesis strategies for moedec tests: prompts, tiny models, strategy option values."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as hs

from moedec.options import option_fields
from moedec.testing import ARCHS, tiny_models


@hs.composite
def prompts(draw, vocab_size: int = 256, min_size: int = 1, max_size: int = 24) -> list[int]:
    """Token-id prompts: random ones, and repetitive ones (a motif repeated) that make drafters fire."""
    token = hs.integers(0, vocab_size - 1)
    if draw(hs.booleans()):
        return draw(hs.lists(token, min_size=min_size, max_size=max_size))
    motif = draw(hs.lists(token, min_size=1, max_size=6))
    reps = draw(hs.integers(1, max(1, max_size // len(motif))))
    tail = draw(hs.lists(token, max_size=3))
    out = (motif * reps + tail)[:max_size]
    return out if len(out) >= min_size else out + [0] * (min_size - len(out))


def models(seed: int = 0):
    """One of the cached tiny models (glm4_moe, qwen3_moe, mixtral)."""
    return hs.sampled_from(range(len(ARCHS))).map(lambda i: tiny_models(seed)[i])


def option_values(cls: type) -> hs.SearchStrategy[dict[str, Any]]:
    """Valid option dicts for a strategy class: integers/floats within their ``in_range`` bounds
    (capped at 8 for ints so tests stay small), booleans; other types keep their defaults."""
    parts = {}
    for f in option_fields(cls):
        rng = None
        v = f.validator
        for val in getattr(v, "_validators", None) or ([v] if v else []):
            rng = getattr(val, "moedec_range", None) or rng
        lo, hi = rng if rng else (None, None)
        typ = f.type if not isinstance(f.type, str) else {"int": int, "float": float, "bool": bool}.get(f.type)
        if typ is int:
            lo = 0 if lo is None else int(lo)
            parts[f.name] = hs.integers(lo, min(int(hi) if hi is not None else lo + 8, lo + 8))
        elif typ is float:
            parts[f.name] = hs.floats(0.0 if lo is None else lo, 1.0 if hi is None else hi)
        elif typ is bool:
            parts[f.name] = hs.booleans()
    return hs.fixed_dictionaries(parts)
