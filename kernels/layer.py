"""A GLM-4.x decoder layer of a decode forward in fewer kernels.

mlx-lm's ``DecoderLayer`` adds the attention output to the residual stream, normalises the sum
for the MLP, and adds the MLP's output. Here the first add and the norm are one kernel (the
backend's ``add_norm``), and a fused MoE block adds its output to the stream inside its last
kernel; a dense MLP keeps its own add. Each op rounds as mlx-lm's do, so results match up to the
order of float32 sums (tests/test_kernels.py, on the GPU).

With :data:`JOIN_ROUTER`, where the backend has it, the add, the norm and the MoE block's router
are one kernel (:func:`moedec.kernels.moe_after_add_norm`). With :data:`JOIN_INPUT_NORM` the input
norm goes to the joined attention (:mod:`.attention`), whose q/k/v kernel computes it where it fits
(``dense.qlinear_norm``).

Forwards of more than :data:`MAX_TOKENS` tokens (prefill) keep mlx-lm's call.
"""

from __future__ import annotations

import functools
from typing import Optional

import mlx.core as mx

from .attention import MAX_TOKENS
from .patching import set_call

JOIN_ROUTER = True  # the add + norm and the MoE router in one kernel where the backend has it
JOIN_INPUT_NORM = True  # the input norm in the joined q/k/v projection's kernel where it fits


def _layer_call(self, x: mx.array, mask: Optional[mx.array] = None, cache=None) -> mx.array:
    """``glm4_moe.DecoderLayer.__call__`` with the add + norm joined and the MoE's add in its kernel."""
    from . import BACKENDS

    be = BACKENDS.get(self.moedec_backend or "")
    if be is None or x.shape[1] > MAX_TOKENS:
        return self._moedec_stock_call(x, mask=mask, cache=cache)
    if JOIN_INPUT_NORM and getattr(type(self.self_attn), "_moedec_fused_attention", False):
        r = self.self_attn(x, mask, cache, norm=self.input_layernorm)  # the norm in the q/k/v kernel: [B, L, D]
    else:
        r = self.self_attn(self.input_layernorm(x), mask, cache)  # [B, L, D]
    norm = self.post_attention_layernorm
    if JOIN_ROUTER and getattr(type(self.mlp), "_moedec_fused_block", False):
        from . import moe_after_add_norm

        y = moe_after_add_norm(self.mlp, x, r, norm)  # add, norm and router in one kernel
        if y is not None:
            return y
    if be.why_not_add_norm(x, r, norm.weight) is not None:
        h = x + r
        return h + self.mlp(norm(h))
    h, n = be.add_norm(x, r, norm.weight, norm.eps)  # h = x + r, n = norm(h)
    if getattr(type(self.mlp), "_moedec_fused_block", False):
        return self.mlp(n, residual=h)
    return h + self.mlp(n)


@functools.lru_cache(maxsize=None)
def layer_classes() -> tuple[type, ...]:
    from mlx_lm.models import glm4_moe

    return (glm4_moe.DecoderLayer,)


def decoder_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, layer_classes())]


def patch_layers(model, backend: Optional[str]) -> int:
    """Give ``model``'s GLM-4.x decoder layers the joined call on ``backend``, or (``None``) mlx-lm's
    call back; returns how many layers use the joined call."""
    layers = decoder_layers(model)
    for m in layers:
        set_call(m, _layer_call, "_moedec_fused_layer", backend is not None, backend)
    return len(layers) if backend is not None else 0
