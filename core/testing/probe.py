"""An observer that watches a generation hook by hook: it checks the cache invariant and records
every step (draft, the target's processed distribution, the acceptance) for the checks.

It attaches as a per-call plugin (``moedec.generate(..., plugins=[probe])``) and implements every
strategy-level hook as a ``wrapper=True`` hook, so it sees each call and its result without taking
part in the decision.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import numpy as np

import moedec
from moedec.forward import cache_length
from moedec.records import Draft


@attrs.frozen
class Step:
    """One decode step as the probe saw it (numpy copies).

    ``p``: ``[K+1, V]`` the target's processed probabilities from the verification logits (the
    engine's own processing; ``None`` when greedy). ``q``: ``[K, V]`` the draft's declared
    probabilities, or ``None`` (a deterministic draft). ``committed``: how many of the acceptance's
    tokens the engine committed (fewer at EOS or ``max_tokens``).
    """

    index: int
    position: int  # generated index of the first token this step commits
    draft: tuple[int, ...]
    q: Optional[np.ndarray]
    p: Optional[np.ndarray]
    tokens: tuple[int, ...]
    num_accepted: int
    committed: int


@attrs.define(eq=False)
class Probe:
    """Records steps and reports violations of the engine/strategy contract (it never raises)."""

    name = "moedec.testing.probe"
    record_probs: bool = True
    steps: list = attrs.field(factory=list)
    raw_drafts: list = attrs.field(factory=list)
    violations: list = attrs.field(factory=list)
    prefills: int = 0
    _before: Optional[tuple] = None  # (len(tokens), cache length) at the start of the step
    _tokens_after: Optional[list] = None  # state.tokens when the last step ended
    _pending: Optional[dict] = None

    def _violate(self, message: str) -> None:
        if len(self.violations) < 20:
            self.violations.append(message)

    def _check_cache(self, state, expected: int, when: str) -> None:
        got = cache_length(state.cache)
        if got is not None and got != expected:
            self._violate(
                f"{when}: the target cache holds {got} tokens, expected {expected} "
                f"(len(state.tokens) = {len(state.tokens)}; between steps the cache holds every "
                "committed token but the pending one)"
            )

    @moedec.hookimpl(wrapper=True)
    def prefill(self, state):
        result = yield
        self.prefills += 1
        self._check_cache(state, len(state.tokens) - 1, "after prefill (the strategy's prefill hook included)")
        self._tokens_after = list(state.tokens)
        return result

    @moedec.hookimpl(wrapper=True)
    def draft(self, state):
        step = len(self.steps)
        if self._tokens_after is not None and list(state.tokens) != self._tokens_after:
            self._violate(f"before step {step}: state.tokens was changed by a hook; only the engine commits tokens")
        self._check_cache(state, len(state.tokens) - 1, f"before step {step}")
        self._before = (len(state.tokens), cache_length(state.cache))
        raw = yield
        self.raw_drafts.append(raw)
        return raw

    @moedec.hookimpl(wrapper=True)
    def accept(self, state, draft: Draft, verification):
        p = None
        if self.record_probs and not state.sampling.greedy:
            p = np.array(state.probs(verification.logits), dtype=np.float64)  # [K+1, V]
        q = None if draft.probs is None or len(draft) == 0 else np.array(draft.probs, dtype=np.float64)
        acceptance = yield
        self._pending = dict(draft=tuple(draft.tokens), q=q, p=p, acceptance=acceptance)
        return acceptance

    @moedec.hookimpl(wrapper=True)
    def on_accept(self, state, acceptance):
        result = yield
        before_len, before_cache = self._before if self._before is not None else (None, None)
        step = len(self.steps)
        pend = self._pending or {}
        if before_len is not None:
            committed = len(state.tokens) - before_len
            if before_cache is not None:
                # the engine rewinds to (pending + accepted) and commits n + 1 tokens; EOS or
                # max_tokens may commit fewer, never feed fewer
                self._check_cache(state, before_cache + len(acceptance.tokens), f"after step {step}")
            self.steps.append(Step(
                index=step, position=before_len - state.prompt_length, draft=pend.get("draft", ()),
                q=pend.get("q"), p=pend.get("p"), tokens=tuple(acceptance.tokens),
                num_accepted=acceptance.num_accepted, committed=committed,
            ))
        self._tokens_after = list(state.tokens)
        self._pending = None
        return result


def implements_hooks(strategy: Any) -> bool:
    """Whether a strategy (class or instance) implements any strategy-level hook."""
    from moedec.plugins import strategy_hooks

    return bool(strategy_hooks(strategy))
