"""A GLM-4.x decoder layer of a decode forward in fewer kernels.

mlx-lm's ``DecoderLayer`` adds the attention output to the residual stream, normalises the sum
for the MLP, and adds the MLP's output. Here the first add and the norm are one kernel (the
backend's ``add_norm``), and a fused MoE block adds its output to the stream inside its last
kernel; a dense MLP keeps its own add. Each op rounds as mlx-lm's do, so results match up to the
order of float32 sums (tests/test_kernels.py, on the GPU).

Forwards of more than :data:`MAX_TOKENS` tokens (prefill) keep mlx-lm's call.
"""

from __future__ import annotations

import functools
from typing import Optional

import mlx.core as mx

from .attention import MAX_TOKENS


def _layer_call(self, x: mx.array, mask: Optional[mx.array] = None, cache=None) -> mx.array:
    """``glm4_moe.DecoderLayer.__call__`` with the add + norm joined and the MoE's add in its kernel."""
    from . import BACKENDS

    be = BACKENDS.get(self.moedec_backend or "")
    if be is None or x.shape[1] > MAX_TOKENS:
        return self._moedec_stock_call(x, mask=mask, cache=cache)
    r = self.self_attn(self.input_layernorm(x), mask, cache)  # [B, L, D]
    norm = self.post_attention_layernorm
    if be.why_not_add_norm(x, r, norm.weight) is not None:
        h = x + r
        return h + self.mlp(norm(h))
    h, n = be.add_norm(x, r, norm.weight, norm.eps)  # h = x + r, n = norm(h)
    if getattr(type(self.mlp), "_moedec_fused_block", False):
        return self.mlp(n, residual=h)
    return h + self.mlp(n)


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {"__call__": _layer_call, "_moedec_stock_call": cls.__call__,
                                       "_moedec_fused_layer": True, "moedec_backend": None,
                                       "__module__": cls.__module__})


@functools.lru_cache(maxsize=None)
def layer_classes() -> tuple[type, ...]:
    from mlx_lm.models import glm4_moe

    return (glm4_moe.DecoderLayer,)


def decoder_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, layer_classes())]


def patch_layers(model, backend: Optional[str]) -> int:
    """Give ``model``'s GLM-4.x decoder layers the joined call on ``backend``, or (``None``) mlx-lm's
    call back; returns how many layers use the joined call."""
    n = 0
    for m in decoder_layers(model):
        fused = getattr(type(m), "_moedec_fused_layer", False)
        if backend is None:
            if fused:
                m.__class__ = type(m).__mro__[1]
                m.__dict__.pop("moedec_backend", None)
            continue
        if not fused:
            m.__class__ = _fused_class(type(m))
        m.moedec_backend = backend
        n += 1
    return n
