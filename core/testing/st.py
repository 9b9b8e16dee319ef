"""Hypothesis strategies for moedec tests: prompts, tiny models, sampling settings, strategy
option values."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as hs

from moedec.options import option_fields
from moedec.sampling import SamplingParams
from moedec.testing import ARCHS, SMALL_VOCAB, small_vocab_model, tiny_models


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


def small_vocab_models(vocab_size: int = SMALL_VOCAB, seed: int = 0):
    """One of the tiny architectures with a small vocabulary (cached), for distribution tests."""
    return hs.sampled_from(ARCHS).map(lambda arch: small_vocab_model(arch, seed, vocab_size))


def sampling_params(vocab_size: int = 256, greedy: bool | None = None) -> hs.SearchStrategy[SamplingParams]:
    """Valid :class:`~moedec.SamplingParams`: temperature 0 (when ``greedy`` is not False) or in
    [0.3, 2], top-p in (0, 1], top-k 0 (off) or below ``vocab_size``."""
    sampled = hs.builds(
        SamplingParams,
        temperature=hs.floats(0.3, 2.0),
        top_p=hs.one_of(hs.just(1.0), hs.floats(0.5, 1.0)),
        top_k=hs.one_of(hs.just(0), hs.integers(1, max(1, vocab_size - 1))),
    )
    if greedy is True:
        return hs.just(SamplingParams())
    if greedy is False:
        return sampled
    return hs.one_of(hs.just(SamplingParams()), sampled)


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
