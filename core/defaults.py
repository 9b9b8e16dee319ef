"""The engine's own ``verify`` and ``accept``, registered ``trylast`` so any strategy can override."""

from __future__ import annotations

import mlx.core as mx

from . import sampling
from .forward import forward
from .hookspecs import hookimpl
from .records import Acceptance, Draft, Verification
from .state import DecodeState


class EngineDefaults:
    """Default hook implementations: one target forward, greedy or rejection-sampling accept."""

    @hookimpl(trylast=True)
    def verify(self, state: DecodeState, draft: Draft) -> Verification:
        inputs = [state.tokens[-1], *draft.tokens]  # T = K + 1
        logits, hidden = forward(state.model, inputs, state.cache)  # [T, V], [T, D]
        return Verification(logits=logits, hidden=hidden, inputs=inputs)

    @hookimpl(trylast=True)
    def accept(self, state: DecodeState, draft: Draft, verification: Verification) -> Acceptance:
        logits = verification.logits  # [T, V]
        if state.sampling.greedy:
            targets = mx.argmax(logits, axis=-1).tolist()  # [T]
            tokens, n = sampling.greedy_accept(draft.tokens, targets)
        else:
            p = state.probs(logits)  # [T, V]
            tokens, n = sampling.speculative_accept(p, draft.tokens, draft.probs, state.next_key())
        hidden = verification.hidden
        return Acceptance(tokens=tokens, num_accepted=n, hidden=None if hidden is None else hidden[: n + 1])

