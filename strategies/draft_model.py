"""``draft-model``: a smaller model with the same vocabulary drafts ``num_draft`` tokens per step.

The drafter keeps its own KV cache. Between steps it holds ``self._fed`` committed tokens, a prefix
of ``state.tokens`` that excludes at least the pending one. A draft step feeds every committed
token it lacks (the pending token, plus the last draft token after an all-accepted step, which the
drafter proposed but never consumed) in one forward, then samples ``K`` tokens one forward each; the
last one is not fed. ``on_accept`` trims the fed draft tokens that were not committed, so the cache
is rewound by exactly what was rejected.

At temperature > 0 every draft token is sampled from the drafter's processed distribution ``q``
(``state.probs``: the same temperature/top-p/top-k as the target's ``p``) and the draft carries
``q`` as ``Draft.probs``; the engine's accept then runs full speculative rejection sampling
(accept with ``min(1, p/q)``, resample from ``max(p - q, 0)``). At temperature 0 it drafts argmaxes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NewType, Optional

import attrs
import mlx.core as mx

import moedec
from moedec.engine import PREFILL_STEP, vocab_size_of
from moedec.errors import MoedecError
from moedec.forward import cache_length, forward, new_cache, rewind

NAME = "draft-model"

#: the type of the ``draft_model`` option, as ``moedec strategies`` shows it (required; no default)
ModelRef = NewType("path_or_model", object)


def load_drafter(path: str | Path):
    """The model in the local mlx-lm directory ``path`` (config.json + safetensors; no tokenizer
    needed). Errors are one-line :class:`MoedecError` s."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MoedecError(f"strategy {NAME!r}: draft model path {str(path)!r} does not exist (moedec only loads local models)")
    if not (p / "config.json").is_file():
        raise MoedecError(f"strategy {NAME!r}: draft model path {str(path)!r} has no config.json; is it an mlx-lm model directory?")
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(p)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise MoedecError(f"strategy {NAME!r}: could not load the draft model from {str(path)!r}: {type(e).__name__}: {first}") from e
    return model


def _untrimmable(cache: list) -> list[str]:
    return sorted({type(c).__name__ for c in cache if not c.is_trimmable()})


def _short(value: Any) -> str:
    if value is None or isinstance(value, (str, Path)):
        return repr(value)
    return f"<{type(value).__name__} model>"


@attrs.define(eq=False)
class DraftModel:
    """Speculative decoding with a separate draft model (same vocabulary as the target)."""

    name = NAME
    #: a local mlx-lm model directory (str/Path), or an already-built model object (Python API)
    draft_model: ModelRef = attrs.field(default=None, repr=_short)
    num_draft: int = attrs.field(default=4, converter=int, validator=moedec.in_range(1, 64))
    _model: Any = attrs.field(default=None, init=False, repr=False)
    _cache: Optional[list] = attrs.field(default=None, init=False, repr=False)
    _fed: int = attrs.field(default=0, init=False, repr=False)  # committed tokens in the drafter cache
    _in_cache: list = attrs.field(factory=list, init=False, repr=False)  # draft ids fed after them

    def __attrs_post_init__(self) -> None:
        if self.draft_model is None or (isinstance(self.draft_model, str) and not self.draft_model.strip()):
            raise MoedecError(
                f"strategy {NAME!r} needs the option draft_model: a local model directory "
                "(-o draft_model=PATH) or, from Python, a model object"
            )
        if isinstance(self.draft_model, (str, Path)):
            self._model = load_drafter(self.draft_model)
        elif callable(self.draft_model):
            self._model = self.draft_model
        else:
            raise MoedecError(
                f"strategy {NAME!r}: draft_model must be a model directory or a model object, "
                f"got {type(self.draft_model).__name__}"
            )

    # -- notifications ---------------------------------------------------------------------------

    @moedec.hookimpl
    def prefill(self, state) -> None:
        """Check the drafter against the target, then feed it the prompt (all but the pending token)."""
        dv = vocab_size_of(self._model)
        if dv != state.vocab_size:
            raise MoedecError(
                f"strategy {NAME!r}: the draft model's vocabulary size ({dv}) differs from the "
                f"target's ({state.vocab_size}); they must share a tokenizer"
            )
        self._cache = new_cache(self._model)
        self._check_trimmable()
        ctx = state.tokens[:-1]
        t0 = time.perf_counter()
        for start in range(0, len(ctx), PREFILL_STEP):
            forward(self._model, ctx[start : start + PREFILL_STEP], self._cache)
            mx.eval([c.state for c in self._cache])
        self._fed, self._in_cache = len(ctx), []
        self._check_trimmable()  # e.g. a rotating cache that the prompt already filled
        state.extra.update(draft_forwards=0, draft_prefill_time=time.perf_counter() - t0, draft_time=0.0)

    @moedec.hookimpl
    def on_accept(self, state, acceptance) -> None:
        """Keep the fed draft tokens that were committed; trim the rest off the drafter's cache."""
        fed = self._in_cache
        if not fed:
            return
        committed = state.tokens[self._fed : self._fed + len(fed)]
        keep = 0
        while keep < len(fed) and keep < len(committed) and fed[keep] == committed[keep]:
            keep += 1
        drop = len(fed) - keep
        if drop:
            self._check_trimmable()
            rewind(self._cache, drop)
        self._fed += keep
        self._in_cache = []

    # -- drafting --------------------------------------------------------------------------------

    @moedec.hookimpl
    def draft(self, state):
        k = min(self.num_draft, state.max_draft, state.remaining - 1)
        if k <= 0:
            return None
        if self._cache is None:  # driven without a prefill notification
            self.prefill(state)
        t0 = time.perf_counter()
        model, cache = self._model, self._cache
        logits, _ = forward(model, state.tokens[self._fed :], cache)  # [F, V]: F >= 1 tokens it lacks
        self._fed = len(state.tokens)
        logits = logits[-1]  # [V]
        tokens, qs = [], []
        for i in range(k):  # stays lazy: one evaluation for the whole draft
            t, q = state.draw(logits)  # q: [V] processed like the target's p (None when greedy)
            if q is not None:
                qs.append(q)
            tokens.append(t)
            if i < k - 1:
                logits, _ = forward(model, t.reshape(1), cache)  # [1, V]
                logits = logits[-1]
        drafted = mx.stack(tokens)  # [K]
        probs = mx.stack(qs) if qs else None  # [K, V]
        mx.eval(drafted, *([probs] if probs is not None else []))
        ids = drafted.tolist()
        self._in_cache = ids[: k - 1]
        state.extra["draft_forwards"] = state.extra.get("draft_forwards", 0) + k
        state.extra["draft_time"] = state.extra.get("draft_time", 0.0) + time.perf_counter() - t0
        return moedec.Draft(ids, probs)

    # -- helpers ---------------------------------------------------------------------------------

    def _check_trimmable(self) -> None:
        bad = _untrimmable(self._cache)
        if bad:
            raise MoedecError(
                f"strategy {NAME!r}: the draft model's cache ({', '.join(bad)}) cannot be rewound; "
                "a draft model needs a trimmable KV cache"
            )

    def cache_length(self) -> Optional[int]:
        """Tokens in the drafter's cache (committed ``_fed`` plus any fed draft ids); for tests."""
        return None if self._cache is None else cache_length(self._cache)


@moedec.hookimpl
def register_strategies(register):
    register(DraftModel)
