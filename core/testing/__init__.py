"""moedec's test kit for strategy authors: tiny random MoE models, an independent oracle,
``assert_lossless`` and the conformance suite ``check_strategy``.

Lossless at temperature 0 (DESIGN.md): a strategy's tokens equal the single-token greedy decode of
the same model, as produced by mlx-lm's own ``generate_step`` (independent of moedec's engine). At
the first difference the oracle's logits must show a near-tie: both tokens within ``atol`` of the
maximum logit; anything else is a bug. At temperature > 0 lossless means the output *distribution*
equals the target's; :mod:`moedec.testing.distribution` tests it exactly per step and end to end.

Also a pytest plugin, loaded only when asked: ``pytest -p moedec.testing`` (or
``addopts = "-p moedec.testing"``) adds the fixtures of :mod:`moedec.testing.pytest_plugin`.
Hypothesis strategies are in :mod:`moedec.testing.st`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import attrs
import mlx.core as mx
import numpy as np

from moedec.models import ARCHS, random_moe

__all__ = ["ARCHS", "tiny_moe", "tiny_models", "small_vocab_model", "oracle_greedy", "Divergence",
           "compare_greedy", "assert_lossless", "default_prompts", "check_strategy", "ConformanceError",
           "ConformanceReport", "CHECKS"]


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


#: Vocabulary of :func:`small_vocab_model`, the model of the temperature > 0 checks.
SMALL_VOCAB = 16


def small_vocab_model(arch: str = "glm4_moe", seed: int = 0, vocab_size: int = SMALL_VOCAB):
    """A tiny model with a small vocabulary (cached): drafts match often and each token's
    probability is large, which makes the distribution tests sharp."""
    key = (arch, seed, "vocab", vocab_size)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = tiny_moe(arch, seed, vocab_size=vocab_size)
    return _MODEL_CACHE[key]


def default_prompts(vocab_size: int = 256) -> list[list[int]]:
    """Prompts that make drafters fire (repetition) and some that do not (ids taken modulo
    ``vocab_size``)."""
    rng = np.random.default_rng(1234)
    rand = rng.integers(0, vocab_size, size=24).tolist()
    fixed = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 7, 8, 7, 8, 7]]
    return [[t % vocab_size for t in p] for p in fixed] + [rand[:5], rand, [42 % vocab_size]]


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


def agreeing_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading positions ``a`` and ``b`` agree on (the index of their first difference)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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


def describe_model(model) -> str:
    """``glm4_moe`` (or ``glm4_moe, vocab 16`` for a non-default vocabulary)."""
    args = getattr(model, "args", None)
    kind = getattr(args, "model_type", type(model).__name__)
    vocab = getattr(args, "vocab_size", 256)
    return kind if vocab == 256 else f"{kind}, vocab {vocab}"


_describe_model = describe_model


def _label(strategy: Any) -> str:
    return strategy if isinstance(strategy, str) else getattr(strategy, "name", strategy)


def assert_lossless(
    strategy: Any,
    *,
    model: Any = None,
    prompts: Optional[Iterable[Sequence[int]]] = None,
    max_tokens: int = 32,
    temperature: float = 0.0,
    atol: float = 1e-4,
    top_p: float = 1.0,
    top_k: int = 0,
    samples: int = 32,
    seed: int = 0,
    **options: Any,
) -> None:
    """``strategy`` (a registered name or class, with its ``options``) must be lossless.

    With no ``model`` it runs over :func:`tiny_models` (glm4_moe, qwen3_moe, mixtral); with no
    ``prompts`` over :func:`default_prompts`. At ``temperature`` 0 the tokens must equal the oracle
    (mlx-lm's greedy ``generate_step``); the ``AssertionError`` shows the model, the prompt, the
    first divergence, both tokens and the logit margin; a divergence at a near-tie (margin <=
    ``atol``) passes. At ``temperature`` > 0 (with ``top_p``/``top_k``) the check is statistical:
    ``samples`` seeded generations per model; every generated token is tested against the target
    distribution recomputed independently (chi-square of probability integral transforms, tokens
    outside top-p/top-k, how often drafted tokens are committed), and every speculative step
    against the exact law of the engine's accept rule. Fixed seeds: the outcome is reproducible.
    """
    import moedec

    models = tiny_models() if model is None else [model]
    if temperature > 0:
        _assert_lossless_sampling(strategy, models, prompts, max_tokens, temperature, top_p, top_k,
                                  samples, seed, options)
        return
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
                raise AssertionError(
                    f"strategy {_label(strategy)!r} is not lossless on {describe_model(m)} for prompt {list(prompt)}: "
                    f"{div.describe()}\n  expected: {list(ref.tokens)}\n  got:      {list(got.tokens)}"
                )


def _assert_lossless_sampling(strategy, models, prompts, max_tokens, temperature, top_p, top_k,
                              samples, seed, options) -> None:
    import moedec
    from moedec.sampling import SamplingParams

    from .distribution import Sample, check_end_to_end, check_steps, drafted_by_position
    from .probe import Probe, implements_hooks

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    from moedec.plugins import get_manager

    cls = get_manager().strategy(strategy).cls if isinstance(strategy, str) else strategy
    probed = implements_hooks(cls)
    rng = np.random.default_rng(seed + 991)
    problems = []
    for m in models:
        plist = default_prompts(m.args.vocab_size) if prompts is None else [list(p) for p in prompts]
        runs, steps = [], []
        for i in range(samples):
            prompt = plist[i % len(plist)]
            probe = Probe() if probed else None
            g = moedec.generate(m, list(prompt), strategy, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed * 7919 + i, eos_token_ids=[],
                                plugins=[probe] if probe else (), **options)
            drafted = drafted_by_position(probe.steps, len(g.tokens)) if probe else (-1,) * len(g.tokens)
            runs.append(Sample(tuple(prompt), tuple(g.tokens), drafted))
            steps += probe.steps if probe else []
        label = describe_model(m)
        for f in (check_steps(steps, rng, f"{label}, exact step test"),
                  check_end_to_end(m, runs, params, rng, f"{label}, end-to-end")):
            problems += f.violations
    if problems:
        raise AssertionError(
            f"strategy {_label(strategy)!r} is not lossless in distribution at temperature {temperature:g} "
            f"(top_p={top_p:g}, top_k={top_k}):\n  - " + "\n  - ".join(problems)
        )


def pytest_configure(config) -> None:
    """``pytest -p moedec.testing``: register the kit's fixtures (nothing happens unless asked)."""
    from . import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "moedec.testing.pytest_plugin")


from .conformance import CHECKS, ConformanceError, ConformanceReport, check_strategy  # noqa: E402
