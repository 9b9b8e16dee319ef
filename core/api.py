"""The Python API: :func:`generate` and :func:`stream_generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .engine import Decoder
from .errors import MoedecError
from .models import load
from .options import build_strategy
from .records import Chunk, Generation
from .sampling import SamplingParams


def resolve_strategy(strategy: Any, options: dict[str, Any]):
    """``(instance, label)`` from a registered name, a strategy class, or an instance."""
    from moedec.plugins import get_manager

    if isinstance(strategy, str):
        cls = get_manager().strategy(strategy).cls
    elif isinstance(strategy, type):
        cls = strategy
    else:
        if options:
            raise MoedecError(f"options {sorted(options)} given with an already-built strategy instance")
        return strategy, getattr(strategy, "name", type(strategy).__name__)
    return build_strategy(cls, options), getattr(cls, "name", cls.__name__)


def _eos_ids(tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return []
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        one = getattr(tokenizer, "eos_token_id", None)
        ids = [] if one is None else [one]
    return [int(i) for i in ids]


def _prepare(model, prompt, tokenizer):
    if model is None or isinstance(model, (str, Path)):
        model, loaded_tok = load(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    if isinstance(prompt, str):
        if tokenizer is None:
            raise MoedecError("a text prompt needs a tokenizer (pass tokenizer=, or a list of token ids)")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
    return model, ids, tokenizer


def stream_generate(
    model: Any,
    prompt: str | Sequence[int],
    strategy: Any = "single",
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    tokenizer: Any = None,
    stop: Sequence[str] = (),
    eos_token_ids: Optional[Sequence[int]] = None,
    max_draft: int = 32,
    plugins: Sequence[object] = (),
    kernel: str = "auto",
    compile_step: Optional[bool] = None,
    **options: Any,
) -> Decoder:
    """A :class:`~moedec.engine.Decoder`: iterate it for :class:`~moedec.Chunk` s as each step
    commits; afterwards ``.result`` is the :class:`~moedec.Generation`. Arguments as :func:`generate`."""
    from moedec.plugins import get_manager

    model, ids, tokenizer = _prepare(model, prompt, tokenizer)
    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    except ValueError as e:
        raise MoedecError(f"bad sampling setting: {e}") from None
    instance, label = resolve_strategy(strategy, options)
    from moedec.kernels import patch

    patch(model, kernel)  # the fused MoE kernel where it runs (CUDA), else mlx-lm's stock path
    observers = [*get_manager().observers(), *plugins]
    return Decoder(
        model, ids, instance, strategy_label=label, sampling=sampling, max_tokens=max_tokens,
        seed=seed, tokenizer=tokenizer, stop=stop,
        eos_token_ids=_eos_ids(tokenizer) if eos_token_ids is None else eos_token_ids,
        max_draft=max_draft, observers=observers, compile_step=compile_step,
    )


def generate(
    model: Any,
    prompt: str | Sequence[int],
    strategy: Any = "single",
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    tokenizer: Any = None,
    stop: Sequence[str] = (),
    eos_token_ids: Optional[Sequence[int]] = None,
    max_draft: int = 32,
    plugins: Sequence[object] = (),
    kernel: str = "auto",
    compile_step: Optional[bool] = None,
    **options: Any,
) -> Generation:
    """Generate from ``prompt`` with a decoding ``strategy``; returns a :class:`~moedec.Generation`.

    ``model``: an mlx-lm model object, a local model directory, or ``None`` for the built-in model.
    ``prompt``: text (needs a tokenizer, which a path brings along) or token ids.
    ``strategy``: a registered name (see ``moedec strategies``), a strategy class, or an instance;
    ``**options`` are its options (validated: an unknown or out-of-range one is an error).
    ``temperature`` 0 is greedy; ``top_p``/``top_k`` truncate; ``seed`` makes sampling repeatable.
    Generation stops at ``max_tokens``, an EOS id (the tokenizer's unless ``eos_token_ids`` is
    given; EOS itself is not returned) or a ``stop`` string (the text is cut before it).
    ``plugins``: extra observer objects for this call (e.g. ``wrapper=True`` hook implementations).
    ``kernel``: the MoE expert kernel, ``auto`` (fused where this device has it, else stock),
    ``stock`` (mlx-lm's ``SwitchGLU``) or ``fused`` (an error where unavailable).
    ``compile_step``: run the engine's plain single-token steps as one ``mx.compile`` d graph
    (:mod:`moedec.compiled`; same results). ``None`` (the default): on with MLX's CUDA backend,
    where it measured faster, off elsewhere.
    """
    dec = stream_generate(
        model, prompt, strategy, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=seed, tokenizer=tokenizer, stop=stop, eos_token_ids=eos_token_ids,
        max_draft=max_draft, plugins=plugins, kernel=kernel, compile_step=compile_step, **options,
    )
    for _ in dec:
        pass
    assert dec.result is not None
    return dec.result


def generate_batch(
    model: Any,
    prompts: Sequence[str | Sequence[int]],
    strategy: Any = "batched",
    *,
    max_tokens: int | Sequence[int] = 64,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    seed: Optional[int] | Sequence[int] = None,
    tokenizer: Any = None,
    stop: Sequence[str] = (),
    eos_token_ids: Optional[Sequence[int]] = None,
    max_draft: int = 32,
    plugins: Sequence[object] = (),
    kernel: str = "auto",
    on_result: Any = None,
    **options: Any,
) -> list[Generation]:
    """Generate from every prompt; returns one :class:`~moedec.Generation` per prompt, in order.

    With ``strategy="batched"`` (option ``batch_size``, default 8) up to ``batch_size`` prompts are
    decoded per forward and a finished row's place goes to the next waiting prompt. Any other
    strategy runs the prompts one after another. ``max_tokens``, ``temperature``, ``top_p``,
    ``top_k`` may be one value or one per prompt; ``seed`` an int (row ``i`` uses ``seed + i``), a
    list (one per row) or ``None``. A row's output depends only on its prompt and its own settings
    and seed, never on the rows that share its batch. ``on_result(index, generation)`` is called as
    each row finishes. Other arguments (``kernel`` included) as :func:`generate`.
    """
    from moedec.strategies.batched import Batched

    from .batch import BatchDecoder, check_prompt, make_rows
    from .engine import vocab_size_of

    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise MoedecError("prompts must be a list (of strings or of token-id lists)")
    if not prompts:
        return []
    instance, label = resolve_strategy(strategy, dict(options))
    model, first, tokenizer = _prepare(model, prompts[0], tokenizer)
    ids = [first] + [_prepare(model, p, tokenizer)[1] for p in prompts[1:]]
    rows = make_rows(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    eos = _eos_ids(tokenizer) if eos_token_ids is None else list(eos_token_ids)
    results: list[Optional[Generation]] = [None] * len(rows)
    if isinstance(instance, Batched):
        if plugins:
            raise MoedecError("strategy 'batched' calls no per-step hooks, so it cannot take plugins=")
        from moedec.kernels import patch

        patch(model, kernel)  # the fused MoE kernel where it runs (CUDA), else mlx-lm's stock path
        dec = BatchDecoder(model, rows, batch_size=instance.batch_size, label=label, tokenizer=tokenizer,
                           stop=stop, eos_token_ids=eos)
        for i, g in dec:
            results[i] = g
            if on_result is not None:
                on_result(i, g)
        return results  # type: ignore[return-value]
    for r in rows:
        check_prompt(r, vocab_size_of(model))
    for r in rows:
        g = generate(
            model, r.prompt, strategy, max_tokens=r.max_tokens, temperature=r.params.temperature,
            top_p=r.params.top_p, top_k=r.params.top_k, seed=r.seed, tokenizer=tokenizer, stop=stop,
            eos_token_ids=eos, max_draft=max_draft, plugins=plugins, kernel=kernel, **options,
        )
        results[r.index] = g
        if on_result is not None:
            on_result(r.index, g)
    return results  # type: ignore[return-value]


__all__ = ["generate", "generate_batch", "stream_generate", "load", "Chunk"]
