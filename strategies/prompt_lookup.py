"""``prompt-lookup``: draft by copying what followed the most recent earlier match of the context's
last n-gram (prompt + generated tokens). No draft model; the drafts are deterministic.

The index maps every n-gram (``min_ngram <= n <= max_ngram``) to the position right after its most
recent occurrence. It is filled in ``prefill`` and extended in ``on_accept`` with the newly committed
tokens only, so a draft costs ``O(max_ngram + num_draft)`` however long the context is.

At temperature > 0 the draft carries no ``probs`` (``q`` is one-hot): the engine's accept then takes
draft token ``x`` with probability ``p(x)`` and, on rejection, samples from ``p`` with ``x`` removed and
renormalised, which is lossless in distribution.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs

import moedec
from moedec.options import OptionError


@attrs.define
class NgramIndex:
    """Most recent continuation position of every n-gram of ``tokens``, ``lo <= n <= hi``.

    ``maps[n - lo][gram] = j`` means ``tokens[j - n : j] == gram`` and ``j`` is the largest such
    position with ``j < len(tokens)`` (so a continuation ``tokens[j]`` exists).
    """

    lo: int
    hi: int
    tokens: list = attrs.field(factory=list)
    maps: list = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.maps = [{} for _ in range(self.hi - self.lo + 1)]

    def extend(self, new: Sequence[int]) -> None:
        """Append ``new`` tokens; index every n-gram that now has a continuation."""
        toks = self.tokens
        for t in new:
            j = len(toks)  # the n-grams ending just before position j gain continuation tokens[j]
            toks.append(int(t))
            for n in range(self.lo, min(self.hi, j) + 1):
                self.maps[n - self.lo][tuple(toks[j - n : j])] = j

    def lookup(self, k: int) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching
        suffix n-gram, and that ``n`` (``([], 0)`` when nothing matches).

        When the match runs into the end of the context, the copy continues into its own output
        (the repeat period is ``len(tokens) - j``), so a periodic context yields a full draft.
        """
        toks = self.tokens
        size = len(toks)
        for n in range(min(self.hi, size), self.lo - 1, -1):
            j = self.maps[n - self.lo].get(tuple(toks[size - n :]))
            if j is None:
                continue
            out: list[int] = []
            for i in range(k):
                pos = j + i
                out.append(toks[pos] if pos < size else out[pos - size])
            return out, n
        return [], 0


@attrs.define
class PromptLookup:
    """Prompt lookup decoding: draft by n-gram match over prompt + generated tokens."""

    name = "prompt-lookup"
    num_draft: int = attrs.field(default=8, converter=int, validator=moedec.in_range(1, 64))
    max_ngram: int = attrs.field(default=3, converter=int, validator=moedec.in_range(1, 16))
    min_ngram: int = attrs.field(default=1, converter=int, validator=moedec.in_range(1, 16))
    _index: Optional[NgramIndex] = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.min_ngram > self.max_ngram:
            raise OptionError("min_ngram", f"must be <= max_ngram ({self.max_ngram})")

    @moedec.hookimpl
    def prefill(self, state) -> None:
        self._index = NgramIndex(self.min_ngram, self.max_ngram)
        self._index.extend(state.tokens)
        state.extra.update(lookup_hits=0, lookup_misses=0)

    @moedec.hookimpl
    def on_accept(self, state, acceptance) -> None:
        index = self._index
        if index is not None:  # only the newly committed tokens are indexed
            index.extend(state.tokens[len(index.tokens) :])

    @moedec.hookimpl
    def draft(self, state):
        index = self._index
        if index is None:  # driven without a prefill notification: build the index now
            self.prefill(state)
            index = self._index
        elif len(index.tokens) != len(state.tokens):  # committed tokens we were not told about
            index.extend(state.tokens[len(index.tokens) :])
        k = min(self.num_draft, state.max_draft, state.remaining - 1)
        if k <= 0:
            return None
        tokens, n = index.lookup(k)
        key = "lookup_hits" if tokens else "lookup_misses"
        state.extra[key] = state.extra.get(key, 0) + 1
        return moedec.Draft(tokens) if tokens else None


@moedec.hookimpl
def register_strategies(register):
    register(PromptLookup)
