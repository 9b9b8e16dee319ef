"""``batched``: up to ``batch_size`` sequences per forward, with continuous refill.

On a bandwidth-bound MoE one load of an expert's weights serves every row routed to it, so total
tokens per second grow with the batch. Use it through :func:`moedec.generate_batch` or
``moedec generate --strategy batched --prompts FILE``; the decoder is :mod:`moedec.batch`.
"""

from __future__ import annotations

import attrs

import moedec


@attrs.define
class Batched:
    """Decode many prompts together: up to batch_size rows per forward, refilled as rows finish.

    Each row is lossless (its greedy tokens are the single-token decode of its prompt) and its
    sampled tokens depend only on its own seed, not on the rows that share its batch. On a single
    prompt (``moedec.generate``) it implements no hook, so the engine decodes one token per forward.
    """

    name = "batched"
    batch_size: int = attrs.field(default=8, validator=[attrs.validators.instance_of(int), moedec.in_range(1, 4096)])


@moedec.hookimpl
def register_strategies(register):
    register(Batched)
