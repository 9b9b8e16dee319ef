"""moedec's test kit: tiny random MoE models, an independent oracle, and ``assert_lossless``.

Lossless at temperature 0 (DESIGN.md): a strategy's tokens equal the single-token greedy decode of
the same model, as produced by mlx-lm's own ``generate_step`` (independent of moedec's engine). At
the first difference the oracle's logits must show a near-tie: both tokens within ``atol`` of the
maximum logit; anything else is a bug.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import attrs
import mlx.core as mx
import numpy as np

from moedec.models import ARCHS, random_moe

__all__ = ["ARCHS", "tiny_moe", "tiny_models", "oracle_greedy", "Divergence", "compare_greedy",
           "assert_lossless", "default_prompts"]


def tiny_moe(arch: str = "glm4_moe", seed: int = 0, **overrides: Any):
    """A float32 random mlx-lm MoE model (``glm4_moe``, ``qwen3_moe`` or ``mixtral``), a few layers
    of width 64, 8 experts top-2, vocabulary 256; ``overrides`` set any config field."""
    return random_moe(arch, seed=seed, dtype=mx.float32, **overrides)


_MODEL_CACHE: dict[tuple, Any] = {}


def tiny_models(seed: int = 0) -> list:
    """One tiny model per architecture in :data:`ARCHS` (cached: they are read-only)."""
    out = []
    for arch in ARCHS:
        key = (arch, seed)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = tiny_moe(arch, seed)
        out.append(_MODEL_CACHE[key])
    return out


def default_prompts(vocab_size: int = 256) -> list[list[int]]:
    """Prompts that make drafters fire (repetition) and some that do not."""
    rng = np.random.default_rng(1234)
    rand = rng.integers(0, vocab_size, size=24).tolist()
    return [
        [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3],
        [7, 8, 7, 8, 7, 8, 7],
        rand[:5],
        rand,
        [42],
    ]


@attrs.frozen
class OracleRun:
    tokens: tuple[int, ...]
    logprobs: np.ndarray  # [N, V] the oracle's log-probabilities at each generated position


_ORACLE: dict[tuple, tuple[Any, OracleRun]] = {}


def oracle_greedy(model, prompt: Sequence[int], max_tokens: int) -> OracleRun:
    """mlx-lm's ``generate_step`` greedy decode (cached per model object, prompt and length)."""
    from mlx_lm.generate import generate_step

    key = (id(model), tuple(int(t) for t in prompt), max_tokens)
    hit = _ORACLE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    toks, lps = [], []
    for y, lp in generate_step(mx.array(list(prompt)), model, max_tokens=max_tokens):
        toks.append(int(y))
        lps.append(np.array(lp.astype(mx.float32)))
    run = OracleRun(tuple(toks), np.stack(lps) if lps else np.zeros((0, 0), np.float32))
    if len(_ORACLE) > 512:
        _ORACLE.clear()
    _ORACLE[key] = (model, run)
    return run


@attrs.frozen
class Divergence:
    """The first position where a strategy left the oracle's greedy path."""

    position: int
    expected: int
    got: Optional[int]  # None: the strategy stopped early
    margin: float  # max logit minus the logit of ``got`` (inf when it stopped early)
    near_tie: bool

    def describe(self) -> str:
        if self.got is None:
            return f"stopped after {self.position} tokens; the oracle continues with {self.expected}"
        kind = "near-tie (allowed)" if self.near_tie else "NOT a near-tie"
        return (
            f"first divergence at generated position {self.position}: expected token {self.expected}, "
            f"got {self.got}; logit margin {self.margin:.3g} ({kind})"
        )


def compare_greedy(reference: OracleRun, tokens: Sequence[int], atol: float = 1e-4) -> Optional[Divergence]:
    """``None`` if ``tokens`` follow the oracle, else the first :class:`Divergence`."""
    tokens = [int(t) for t in tokens]
    for i, expected in enumerate(reference.tokens):
        if i >= len(tokens):
            return Divergence(i, expected, None, float("inf"), False)
        got = tokens[i]
        if got != expected:
            row = reference.logprobs[i]
            top = float(row.max())
            margin = top - float(row[got])
            near = margin <= atol and top - float(row[expected]) <= atol
            return Divergence(i, expected, got, margin, near)
    if len(tokens) > len(reference.tokens):
        return Divergence(len(reference.tokens), -1, tokens[len(reference.tokens)], float("inf"), False)
    return None


def _describe_model(model) -> str:
    args = getattr(model, "args", None)
    return getattr(args, "model_type", type(model).__name__)


def assert_lossless(
    strategy: Any,
    *,
    model: Any = None,
    prompts: Optional[Iterable[Sequence[int]]] = None,
    max_tokens: int = 32,
    atol: float = 1e-4,
    **options: Any,
) -> None:
    """Greedy decode with ``strategy`` (a registered name or class) must equal the oracle.

    With no ``model`` it runs over :func:`tiny_models` (glm4_moe, qwen3_moe, mixtral); with no
    ``prompts`` over :func:`default_prompts`. ``options`` are the strategy's options. Raises an
    ``AssertionError`` that shows the model, the prompt, the first divergence, both tokens and
    the logit margin. A divergence at a near-tie (margin <= ``atol``) passes.
    """
    import moedec

    models = tiny_models() if model is None else [model]
    for m in models:
        vocab = m.args.vocab_size
        plist = default_prompts(vocab) if prompts is None else [list(p) for p in prompts]
        for prompt in plist:
            ref = oracle_greedy(m, prompt, max_tokens)
            got = moedec.generate(
                m, list(prompt), strategy, max_tokens=max_tokens, temperature=0.0,
                eos_token_ids=[], **options,
            )
            div = compare_greedy(ref, got.tokens, atol)
            if div is not None and not div.near_tie:
                name = strategy if isinstance(strategy, str) else getattr(strategy, "name", strategy)
                raise AssertionError(
                    f"strategy {name!r} is not lossless on {_describe_model(m)} for prompt {list(prompt)}: "
                    f"{div.describe()}\n  expected: {list(ref.tokens)}\n  got:      {list(got.tokens)}"
                )
