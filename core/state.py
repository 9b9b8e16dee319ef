"""The per-generation decode state every hook receives."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import mlx.core as mx

from . import sampling
from .sampling import SamplingParams


@attrs.define(eq=False)
class DecodeState:
    """What a strategy can see (and the engine mutates) during one generation.

    Invariant between steps: ``cache`` holds ``len(tokens) - 1`` tokens; ``tokens[-1]`` is the
    *pending* token, committed but not yet fed to the model.
    """

    model: Any  # the target, an mlx-lm model
    cache: list  # the target's KV cache (mlx-lm cache objects, one per layer)
    tokens: list[int]  # prompt + committed ids
    prompt_length: int
    vocab_size: int
    sampling: SamplingParams
    max_tokens: int
    max_draft: int
    strategy_name: str
    key: mx.array  # the generation's PRNG key; use next_key()
    #: [D] target hidden state that produced ``tokens[-1]`` (None if the model does not expose it)
    hidden: Optional[mx.array] = None
    #: [P, D] hidden states of every prompt position; set only during the ``prefill`` notification
    prompt_hidden: Optional[mx.array] = None
    #: strategy-specific counters; they appear in ``GenerationStats.extra``
    extra: dict = attrs.field(factory=dict)

    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @property
    def generated(self) -> list[int]:
        """Committed ids after the prompt."""
        return self.tokens[self.prompt_length:]

    @property
    def remaining(self) -> int:
        """Tokens still allowed by ``max_tokens``."""
        return self.max_tokens - len(self.generated)

    def next_key(self) -> mx.array:
        """A fresh PRNG key split from the generation's key (deterministic under ``seed``)."""
        self.key, sub = mx.random.split(self.key)
        return sub

    def probs(self, logits: mx.array) -> mx.array:
        """Processed probabilities with this generation's temperature/top-p/top-k ``[..., V]``;
        use it for a drafter's ``Draft.probs`` so that ``p`` and ``q`` are processed alike."""
        return sampling.probs(logits, self.sampling)

    def sample(self, logits: mx.array) -> mx.array:
        """Sample from ``logits`` ``[..., V]`` with this generation's settings (argmax when greedy)."""
        return self.draw(logits)[0]

    def draw(self, logits: mx.array) -> tuple[mx.array, Optional[mx.array]]:
        """``(token, q)``: :meth:`sample`'s token and the processed distribution it was drawn from
        (``None`` when greedy) — what a drafter reports as ``Draft.probs``. Lazy."""
        if self.sampling.greedy:
            return mx.argmax(logits, axis=-1), None
        q = self.probs(logits)
        return sampling.sample(q, self.next_key()), q
