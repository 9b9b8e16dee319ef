"""The fused, expert-grouped MoE op on MLX's CUDA backend (``mx.fast.cuda_kernel``)."""

from __future__ import annotations

import functools

import mlx.core as mx

from .cuda_source import DOWN, GATE_UP, HEADER
from .grouping import sort_pairs

WARPS = 8  # warps per block: one output row each
THREADS = 32 * WARPS  # also the most pairs P a block can rank
MAX_TOKENS = 16  # decode sizes; larger forwards keep the stock path
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
SUPPORTED_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


@functools.lru_cache(maxsize=None)
def _kernels():
    gate_up = mx.fast.cuda_kernel(
        name="moedec_gate_up",
        input_names=["x", "sorted_e", "order", "wg", "sg", "bg", "wu", "su", "bu"],
        output_names=["act"],
        source=GATE_UP,
        header=HEADER,
    )
    down = mx.fast.cuda_kernel(
        name="moedec_down",
        input_names=["act", "sorted_e", "order", "wd", "sd", "bd"],
        output_names=["y"],
        source=DOWN,
        header=HEADER,
    )
    return gate_up, down


def why_not_fused(switch, x: mx.array, indices: mx.array) -> str | None:
    """``None`` if the fused kernel can run this call, else the reason it cannot."""
    layers = (switch.gate_proj, switch.up_proj, switch.down_proj)
    if not all(hasattr(l, "scales") for l in layers):
        return "expert weights are not quantized"
    if any(getattr(l, "mode", "affine") != "affine" for l in layers):
        return "only affine quantization is supported"
    if any("bias" in l for l in layers) or any("biases" not in l for l in layers):
        return "expert layers with a bias, or without quantization biases, are not supported"
    bits = {l.bits for l in layers}
    groups = {l.group_size for l in layers}
    if len(bits) != 1 or bits.pop() not in SUPPORTED_BITS:
        return f"bits must be one of {SUPPORTED_BITS}"
    if len(groups) != 1 or groups.pop() not in SUPPORTED_GROUPS:
        return f"group size must be one of {SUPPORTED_GROUPS}"
    if type(switch.activation).__name__ != "SwiGLU":
        return "activation is not SwiGLU"
    if x.dtype not in SUPPORTED_DTYPES or switch.gate_proj.scales.dtype != x.dtype:
        return "activations and scales must share a float dtype"
    t = indices.size // indices.shape[-1]
    if t > MAX_TOKENS or indices.size > THREADS:
        return f"more than {MAX_TOKENS} tokens (prefill keeps the stock path)"
    d = x.shape[-1]
    n = switch.gate_proj.weight.shape[1]
    if d % 128 or n % 128:
        return "hidden and expert widths must be multiples of 128"
    return None


def _maxc(t: int) -> int:
    return 1 << max(t - 1, 0).bit_length()  # next power of two >= t


def fused_switch_glu(switch, x: mx.array, indices: mx.array) -> mx.array:
    """``SwitchGLU(x, indices)`` with each active expert read once: ``[..., D], [..., K] -> [..., K, D]``."""
    gate_up, down = _kernels()
    k = indices.shape[-1]
    d = x.shape[-1]
    xt = x.reshape(-1, d)  # [T, D]
    t = xt.shape[0]
    p = t * k
    g, u, dn = switch.gate_proj, switch.up_proj, switch.down_proj
    e, n = g.weight.shape[0], g.weight.shape[1]
    slots = min(p, e)
    sorted_e, order = sort_pairs(indices)  # [P], [P]
    common = [("T", x.dtype), ("BITS", g.bits), ("GROUP", g.group_size), ("K", k), ("P", p),
              ("MAXC", _maxc(t)), ("WARPS", WARPS)]
    (act,) = gate_up(
        inputs=[xt, sorted_e, order, g.weight, g.scales, g.biases, u.weight, u.scales, u.biases],
        template=common + [("DIN", d), ("NOUT", n)],
        grid=(((n + WARPS - 1) // WARPS) * THREADS, slots, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(p, n)],
        output_dtypes=[mx.float32],
    )  # [P, N] in sorted-pair order
    (y,) = down(
        inputs=[act, sorted_e, order, dn.weight, dn.scales, dn.biases],
        template=common + [("DIN", n), ("NOUT", d)],
        grid=(((d + WARPS - 1) // WARPS) * THREADS, slots, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(p, d)],
        output_dtypes=[x.dtype],
    )  # [P, D] in original pair order
    return y.reshape(*indices.shape, d)
