"""``lookahead``: Jacobi iteration with an n-gram pool (lookahead decoding), as one linear draft.

Every verify forward over ``[pending] + draft`` also predicts, at each row past the first rejected
draft token, the token after a *guessed* prefix. Jacobi decoding keeps those predictions as the next
step's guesses: iterated, a guess becomes right once everything before it is. Lookahead decoding
(Fu et al., 2024) adds a pool: every ``(n-1)`` tokens of a verify input followed by the target's
prediction after them form an n-gram, stored under its first token. When the pool knows a
continuation of the pending token, the draft follows the pool; otherwise it is the Jacobi guess.

This is the linear variant: one candidate per step, verified by the engine's ordinary forward (no
tree attention, no extra lookahead branch: the Jacobi rows come free with the verify). Drafts are
deterministic (no ``probs``), so the engine's accept is lossless at any temperature; the guesses
and n-grams use the target's argmax.
"""

from __future__ import annotations

from typing import Optional

import attrs
import mlx.core as mx

import moedec

from .pool import NgramPool


@attrs.define
class Lookahead:
    """Lookahead decoding: Jacobi guesses from the verify forward, plus an n-gram pool."""

    name = "lookahead"
    window: int = attrs.field(default=5, converter=int, validator=moedec.in_range(1, 32))
    ngram: int = attrs.field(default=3, converter=int, validator=moedec.in_range(2, 8))
    pool_size: int = attrs.field(default=4, converter=int, validator=moedec.in_range(1, 64))
    _pool: Optional[NgramPool] = attrs.field(default=None, init=False, repr=False)
    _guess: list = attrs.field(factory=list, init=False, repr=False)  # Jacobi guesses after the pending token
    _context: list = attrs.field(factory=list, init=False, repr=False)  # n-2 tokens before the last verify's inputs
    _inputs: list = attrs.field(factory=list, init=False, repr=False)  # [T] the last verify's inputs
    _preds: Optional[mx.array] = attrs.field(default=None, init=False, repr=False)  # [T] its argmaxes

    @moedec.hookimpl
    def prefill(self, state):
        self._pool = NgramPool(self.ngram, self.pool_size)
        self._guess = _seed(state, self.window)
        for key in ("lookahead_pool_drafts", "lookahead_jacobi_drafts"):
            state.extra[key] = 0

    @moedec.hookimpl
    def draft(self, state):
        k = min(self.window, state.max_draft)
        if k == 0 or self._pool is None:
            return None
        pooled = self._pool.chain(state.tokens[-1], k)
        state.extra["lookahead_pool_drafts" if pooled else "lookahead_jacobi_drafts"] += 1
        return pooled + self._guess[len(pooled):k]

    @moedec.hookimpl(wrapper=True)
    def verify(self, state, draft):
        verification = yield  # the engine's forward (or another strategy hook's); we only read it
        end = len(state.tokens) - 1  # the pending token's index
        self._context = state.tokens[max(0, end - (self.ngram - 2)):end]
        self._inputs = list(verification.inputs)
        self._preds = mx.argmax(verification.logits, axis=-1)  # [T]
        return verification

    @moedec.hookimpl
    def on_accept(self, state, acceptance):
        if self._preds is None:
            return
        preds = self._preds.tolist()  # [T]: row i is the target's next token after inputs[: i + 1]
        seq = self._context + self._inputs
        off = len(self._context)
        for i, g in enumerate(preds):
            start = off + i - (self.ngram - 2)
            if start >= 0:
                self._pool.add(seq[start : off + i + 1] + [g])
        # Jacobi: rows past the first rejection predicted the tokens after the new pending one
        guess = preds[acceptance.num_accepted + 1 :]
        if len(guess) < self.window:
            guess += _seed(state, self.window - len(guess))
        self._guess = guess[: self.window]
        self._preds = None
        state.extra["lookahead_pool_ngrams"] = len(self._pool)


def _seed(state, k: int) -> list[int]:
    """Initial Jacobi guesses for ``k`` fresh positions: recent context tokens (any guess works;
    iteration corrects it)."""
    return list(state.tokens[-k:])[:k] if k > 0 else []
