"""The values passed between the engine and the strategy hooks, and the results it returns.

Shapes: ``T`` tokens in a verify forward (the pending token plus ``K`` draft tokens, ``T = K + 1``),
``V`` the vocabulary, ``D`` the hidden size.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import attrs


def _as_int_tuple(tokens: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(t) for t in tokens)


@attrs.frozen
class Draft:
    """Tokens a strategy proposes to follow the committed sequence.

    ``probs`` is the drafter's (already temperature/top-p/top-k processed) distribution for each
    draft position, ``[K, V]`` (an ``mx.array`` or anything array-like); ``None`` means the draft is
    deterministic (a one-hot ``q``), as for prompt lookup. Only needed for lossless sampling at
    temperature > 0.
    """

    tokens: tuple[int, ...] = attrs.field(converter=_as_int_tuple)
    probs: Any = None

    def __len__(self) -> int:
        return len(self.tokens)


@attrs.frozen
class Verification:
    """What the target model said about ``[pending] + draft``.

    ``logits``: ``[T, V]`` target logits, row ``i`` predicts the token after input ``i``.
    ``hidden``: ``[T, D]`` the target's final (normed) hidden states, or ``None`` if the model's
    structure does not expose them.
    ``inputs``: the ``T`` token ids that were fed (the pending token first).
    """

    logits: Any
    hidden: Any
    inputs: tuple[int, ...] = attrs.field(converter=_as_int_tuple)


@attrs.frozen
class Acceptance:
    """The outcome of one step.

    ``tokens``: the ids to commit, in order (the accepted draft prefix plus one token sampled from
    the target: ``len(tokens) == num_accepted + 1``).
    ``num_accepted``: how many draft tokens were accepted (``0 <= num_accepted <= K``).
    ``hidden``: ``[len(tokens), D]`` target hidden states of the positions that produced each
    committed token (row ``i`` produced ``tokens[i]``), or ``None``.
    """

    tokens: tuple[int, ...] = attrs.field(converter=_as_int_tuple)
    num_accepted: int
    hidden: Any = None


@attrs.frozen
class GenerationStats:
    """Counters and timings of one generation.

    ``forwards`` counts decode (verify) forwards, not the prefill. ``drafted``/``accepted`` count
    draft tokens. ``decode_tps`` is generated tokens per second of decode wall time (prefill
    excluded); ``wall_time`` includes the prefill.
    """

    strategy: str
    prompt_tokens: int
    generated_tokens: int
    forwards: int
    drafted: int
    accepted: int
    prefill_time: float
    decode_time: float
    finish_reason: str
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        # the first generated token comes from the prefill forward
        decoded = max(self.generated_tokens - 1, 0)
        return decoded / self.forwards if self.forwards else 0.0

    @property
    def wall_time(self) -> float:
        return self.prefill_time + self.decode_time

    @property
    def decode_tps(self) -> float:
        decoded = max(self.generated_tokens - 1, 0)
        return decoded / self.decode_time if self.decode_time > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["extra"] = dict(self.extra)
        for name in ("acceptance_rate", "tokens_per_forward", "wall_time", "decode_tps", "tokens_per_second"):
            d[name] = getattr(self, name)
        return d


@attrs.frozen
class Generation:
    """The result of :func:`moedec.generate`: ``tokens`` (prompt excluded), ``text`` (``None``
    without a tokenizer) and ``stats``."""

    tokens: tuple[int, ...] = attrs.field(converter=_as_int_tuple)
    text: Optional[str]
    stats: GenerationStats

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "text": self.text, "stats": self.stats.as_dict()}


@attrs.frozen
class Chunk:
    """One streamed piece of output: the ``tokens`` committed by one step and the ``text`` they
    completed (may be empty while a multi-byte character is still incomplete)."""

    tokens: tuple[int, ...] = attrs.field(converter=_as_int_tuple)
    text: str
