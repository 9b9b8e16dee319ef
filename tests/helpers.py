"""Test-only strategies and observers."""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx.nn as nn

import moedec
from moedec.forward import cache_length
from moedec.synthetic import quantizable
from moedec.testing import tiny_moe


def quantized_glm(**overrides):
    """A tiny float32 GLM-4.x MoE, quantized 4-bit g32 as the synthetic model is (router left alone)."""
    model = tiny_moe("glm4_moe", **overrides)
    nn.quantize(model, group_size=32, bits=4, class_predicate=quantizable)
    mx.eval(model.parameters())
    return model


@attrs.define
class PlannedDrafter:
    """Drafts, at step i, ``oracle[next : next + a_i] + tail_i``: a correct prefix of chosen length
    followed by arbitrary tokens. Any plan must leave the output unchanged."""

    name = "planned"
    oracle: list = attrs.field(factory=list)
    plan: list = attrs.field(factory=list)
    _step: int = 0

    @moedec.hookimpl
    def draft(self, state):
        if self._step >= len(self.plan):
            return None
        a, tail = self.plan[self._step]
        self._step += 1
        pos = len(state.generated)  # the oracle's index of the token after the pending one
        return list(self.oracle[pos : pos + a]) + list(tail)


@attrs.define
class CacheChecker:
    """Observer: after every step the cache holds every committed token but the pending one."""

    steps: int = 0
    lengths: list = attrs.field(factory=list)

    @moedec.hookimpl
    def prefill(self, state):
        assert cache_length(state.cache) == len(state.tokens) - 1

    @moedec.hookimpl
    def on_accept(self, state, acceptance):
        self.steps += 1
        if state.remaining > 0:  # the final step may be cut short by max_tokens
            self.lengths.append((cache_length(state.cache), len(state.tokens) - 1))
            assert cache_length(state.cache) == len(state.tokens) - 1


@attrs.define
class DraftRecorder:
    """Observer: every step's draft as the strategy returned it (a ``Draft``, or ``None``)."""

    drafts: list = attrs.field(factory=list)

    @moedec.hookimpl(wrapper=True)
    def draft(self, state):
        d = yield
        self.drafts.append(d)
        return d
