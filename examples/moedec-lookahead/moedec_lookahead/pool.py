"""The n-gram pool: n-grams seen in Jacobi trajectories, keyed by their first token."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import attrs


@attrs.define
class NgramPool:
    """For every first token, the ``capacity`` most recently seen distinct continuations
    (``n - 1`` tokens each). Adding a continuation again makes it the most recent."""

    n: int
    capacity: int
    _grams: dict = attrs.field(factory=dict, init=False)

    def add(self, gram: Sequence[int]) -> None:
        if len(gram) != self.n:
            raise ValueError(f"expected a {self.n}-gram, got {len(gram)} tokens")
        conts = self._grams.setdefault(int(gram[0]), OrderedDict())
        cont = tuple(int(t) for t in gram[1:])
        conts.pop(cont, None)
        conts[cont] = None
        while len(conts) > self.capacity:
            conts.popitem(last=False)

    def lookup(self, token: int) -> Optional[tuple[int, ...]]:
        """The most recent continuation of ``token``, or ``None``."""
        conts = self._grams.get(int(token))
        return next(reversed(conts)) if conts else None

    def chain(self, token: int, k: int) -> list[int]:
        """Up to ``k`` tokens: the continuation of ``token``, then of that continuation's last token,
        and so on while the pool knows one."""
        out: list[int] = []
        last = token
        while len(out) < k:
            cont = self.lookup(last)
            if cont is None:
                break
            out.extend(cont)
            last = out[-1]
        return out[:k]

    def __len__(self) -> int:
        return sum(len(c) for c in self._grams.values())
