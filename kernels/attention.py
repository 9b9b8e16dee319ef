"""GLM-4.x attention of a decode forward in fewer kernels: one quantized matmul for the queries,
keys and values, one RoPE for the queries and keys.

A decode step on a GPU pays per kernel: MLX encodes each one on the host, and on the GPU each
dependent kernel costs several microseconds beyond its work (docs/benchmarks.md). mlx-lm's
``glm4_moe.Attention`` runs three quantized matmuls and two RoPEs per layer. Here the q/k/v
weights are concatenated once (each projection then keeps a view of its rows, so no memory is
added) and one ``quantized_matmul`` computes every output row as before; RoPE acts on each head
alone, so one call over the query and key heads gives what two did. Each row of the result is the
same dot product, so outputs are unchanged (tests/test_attention.py).

Under the compiled step on CUDA a one-token forward goes further: its cache (``attend_qkv``) takes
the joined output before RoPE, and one kernel applies the RoPE, attends and writes the new position
(:func:`moedec.kernels.ops.decode_attention_qkv`).

Forwards of more than :data:`MAX_TOKENS` tokens (prefill) and layers whose projections are not
quantized alike keep mlx-lm's call.
"""

from __future__ import annotations

import functools
from typing import Optional

import attrs
import mlx.core as mx
import mlx.nn as nn

from .dense import qlinear_norm, quantized_matmul, why_not_dense_norm
from .fused import MAX_TOKENS, _plan
from .patching import set_call


@attrs.frozen
class QKVPlan:
    reason: Optional[str]  # why this layer keeps mlx-lm's call, or None
    weight: Optional[mx.array] = None  # [Nq + 2 Nkv, D * bits / 32]: the three projections' rows
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None  # quantization biases (affine)
    bias: Optional[mx.array] = None  # the projections' own bias, if any
    group_size: int = 0
    bits: int = 0
    mode: str = "affine"

    def project(self, x: mx.array, shape: Optional[tuple] = None, norm=None) -> mx.array:
        """``x [.., D] -> [.., Nq + 2 Nkv]`` (or ``shape``, e.g. split into heads): what ``q_proj``,
        ``k_proj`` and ``v_proj`` give, side by side; of ``norm(x)`` if ``norm`` is given (in the
        projection's kernel where the dense kernel takes it)."""
        if norm is not None:
            if self.bias is None and why_not_dense_norm(x, norm, self.weight, self.scales, self.biases, self.bits,
                                                        self.group_size, self.mode) is None:
                return qlinear_norm(x, norm, self.weight, self.scales, self.biases, self.group_size, shape)
            x = norm(x)
        if self.bias is not None:
            y = quantized_matmul(x, self.weight, self.scales, self.biases, self.group_size, self.bits, self.mode) + self.bias
            return y if shape is None else y.reshape(shape)
        return quantized_matmul(x, self.weight, self.scales, self.biases, self.group_size, self.bits, self.mode, shape)


def _joined(layers, name: str) -> Optional[mx.array]:
    parts = [l.get(name) for l in layers]
    return None if parts[0] is None else mx.concatenate(parts, axis=0)


def qkv_plan(attn) -> QKVPlan:
    """Concatenate ``attn``'s q/k/v weights (once) and point each projection at its rows of them."""
    layers = attn.q_proj, attn.k_proj, attn.v_proj
    if not all(isinstance(l, nn.QuantizedLinear) for l in layers):
        return QKVPlan("q/k/v projections are not quantized")
    spec = {(l.bits, l.group_size, l.mode, l.weight.shape[1], tuple(sorted((k, v.dtype) for k, v in l.items())))
            for l in layers}  # the same arrays of the same dtypes: joining promotes nothing
    if len(spec) != 1:
        return QKVPlan("q/k/v projections are quantized differently")
    joined = {name: _joined(layers, name) for name in ("weight", "scales", "biases", "bias")}
    mx.eval([a for a in joined.values() if a is not None])
    start = 0
    for l in layers:  # views of the joined arrays: the separate copies are freed
        rows = l.weight.shape[0]
        for name, a in joined.items():
            if a is not None:
                l[name] = a[start : start + rows]
        start += rows
    mx.eval([l.parameters() for l in layers])
    q = layers[0]
    return QKVPlan(None, joined["weight"], joined["scales"], joined["biases"], joined["bias"], q.group_size, q.bits,
                   q.mode)


def _attention_call(self, x: mx.array, mask: Optional[mx.array] = None, cache=None, norm=None) -> mx.array:
    """``glm4_moe.Attention.__call__`` with the q/k/v projections and the RoPEs joined; of ``norm(x)``
    if ``norm`` is given (the decoder layer's input norm, joined with the projection where it fits)."""
    B, L, _ = x.shape
    plan = _plan(self, qkv_plan)
    if plan.reason or L > MAX_TOKENS:
        return self._moedec_stock_call(x if norm is None else norm(x), mask=mask, cache=cache)
    H, HK = self.n_heads, self.n_kv_heads
    qkv = plan.project(x, (B, L, H + 2 * HK, plan.weight.shape[0] // (H + 2 * HK)), norm)  # [B, L, H + 2 HK, Dh]
    attend = getattr(cache, "attend_qkv", None)  # the compiled step's cache: RoPE, attention, write in one kernel
    if L == 1 and not self.use_qk_norm and attend is not None:
        out = attend(qkv, H, self.rope, self.scale)  # [B, 1, H * Dh], or None
        if out is not None:
            return self.o_proj(out)
    offset = cache.offset if cache is not None else 0
    if self.use_qk_norm:  # the norms come between projection and RoPE: two RoPEs, as mlx-lm
        queries = self.rope(self.q_norm(qkv[:, :, :H]).transpose(0, 2, 1, 3), offset=offset)  # [B, H, L, Dh]
        keys = self.rope(self.k_norm(qkv[:, :, H : H + HK]).transpose(0, 2, 1, 3), offset=offset)  # [B, HK, L, Dh]
    else:
        qk = self.rope(qkv[:, :, : H + HK].transpose(0, 2, 1, 3), offset=offset)  # [B, H + HK, L, Dh]
        queries, keys = qk[:, :H], qk[:, H:]
    values = qkv[:, :, H + HK :].transpose(0, 2, 1, 3)  # [B, HK, L, Dh]
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    sdpa = self._moedec_module.scaled_dot_product_attention  # looked up now: the compiled step patches it
    output = sdpa(queries, keys, values, cache=cache, scale=self.scale, mask=mask)  # [B, H, L, Dh]
    return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


@functools.lru_cache(maxsize=None)
def attention_classes() -> tuple[type, ...]:
    from mlx_lm.models import glm4_moe

    return (glm4_moe.Attention,)


def attention_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, attention_classes())]


def patch_attention(model, on: bool) -> int:
    """Join the q/k/v projections and RoPEs of ``model``'s GLM-4.x attention layers (``on``), or
    give them mlx-lm's call back; returns how many layers are joined."""
    n = 0
    for m in attention_layers(model):
        set_call(m, _attention_call, "_moedec_fused_attention", on)
        if on:  # joined now, not on a first call that may be under mx.compile
            _plan(m, qkv_plan)
        n += on
    return n
