"""Grouping (token, expert) pairs by expert, and the grouped reference computation.

:func:`grouped_switch_glu` is the CPU model of the CUDA kernels: group the ``P = T*K`` pairs into
*slots* (one per distinct expert), compute each slot's expert once for all its tokens, and write each
result back at its original pair index. Here the slots come from sorting the pairs by expert; the
kernels number them by first occurrence instead (``build_slots`` in ``cuda_source``), which changes
no result: every pair's value is computed on its own.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def sort_pairs(indices: mx.array) -> tuple[mx.array, mx.array]:
    """``indices`` ``[..., K]`` -> ``(sorted_e [P], order [P])`` with ``sorted_e = flat[order]``."""
    flat = indices.reshape(-1).astype(mx.int32)  # [P]
    order = mx.argsort(flat).astype(mx.int32)  # [P]
    return flat[order], order


def slot_table(sorted_e) -> list[tuple[int, int, int]]:
    """``[(expert, start, end)]`` per slot: what each kernel block finds with its ballot scan."""
    s = np.asarray(sorted_e).tolist()
    out = []
    for i, e in enumerate(s):
        if i == 0 or s[i - 1] != e:
            if out:
                out[-1] = (out[-1][0], out[-1][1], i)
            out.append((e, i, len(s)))
    return out


def grouped_switch_glu(switch, x: mx.array, indices: mx.array) -> mx.array:
    """mlx-lm ``SwitchGLU`` computed slot by slot (each expert's weights used once per forward).

    ``x`` ``[..., D]``, ``indices`` ``[..., K]`` -> ``[..., K, D]``. Works for quantized and plain
    ``SwitchLinear`` projections; runs anywhere (it is the CPU model of the CUDA kernel).
    """
    k = indices.shape[-1]
    d = x.shape[-1]
    xt = x.reshape(-1, d)  # [T, D]
    sorted_e, order = sort_pairs(indices)
    order_l = order.tolist()
    out = [None] * len(order_l)
    for expert, start, end in slot_table(sorted_e):
        pairs = order_l[start:end]
        toks = mx.array([p // k for p in pairs])
        xs = xt[toks]  # [c, D]
        g = _expert_linear(switch.gate_proj, expert, xs)  # [c, N]
        u = _expert_linear(switch.up_proj, expert, xs)
        a = switch.activation(u, g)  # SwiGLU(x_up, x_gate) as SwitchGLU calls it
        y = _expert_linear(switch.down_proj, expert, a)  # [c, D]
        for i, p in enumerate(pairs):
            out[p] = y[i]
    return mx.stack(out).reshape(*indices.shape, d)


def _expert_linear(layer, expert: int, xs: mx.array) -> mx.array:
    if hasattr(layer, "scales"):  # QuantizedSwitchLinear
        w = mx.dequantize(
            layer.weight[expert], layer.scales[expert], layer.get("biases")[expert] if "biases" in layer else None,
            group_size=layer.group_size, bits=layer.bits, mode=getattr(layer, "mode", "affine"),
        )
    else:
        w = layer.weight[expert]
    y = xs @ w.T
    if "bias" in layer:
        y = y + layer.bias[expert]
    return y.astype(xs.dtype)
