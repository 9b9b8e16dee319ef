"""``single``: one token per forward, no draft. The baseline every strategy is compared to."""

from __future__ import annotations

import attrs

import moedec


@attrs.define
class Single:
    """Plain autoregressive decoding.

    It implements no hook: with nothing drafted, the engine's default ``verify`` (one forward over
    the pending token) and ``accept`` (argmax, or a sample at temperature > 0) make each step. Since
    nobody else takes part, the engine pipelines the steps as mlx-lm's ``generate_step`` does.
    """

    name = "single"


@moedec.hookimpl
def register_strategies(register):
    register(Single)
