"""Dense 4-bit quantized linear layers of a decode forward on the tensor cores (``DENSE_MMA``).

A GLM-class decode step reads about a third of its bytes outside the experts: the attention
projections, the dense MLP of the first layers and the LM head. MLX's quantized matmul reads them
at about a fifth of the copy bandwidth on an H100/H200 at T <= 16 (docs/benchmarks.md); the
expert kernels' slices (a ``cp.async`` ring per warp, ``ldmatrix``, ``mma.sync``) read them
faster. :func:`qlinear` is ``mx.quantized_matmul(x, w, scales, biases, transpose=True)`` for
4-bit affine weights and bfloat16/float16 activations, float32 sums rounded once; :func:`patch_linears`
gives a model's ``QuantizedLinear`` layers a call that uses it where it fits and MLX's otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional

import attrs
import mlx.core as mx
import mlx.nn as nn

from .fused import (GATE_UP_BLOCKS, MAX_TOKENS, OPT_IN, SMEM_BUDGET, SUPPORTED_GROUPS, THREADS, WARPS, _kernel,
                    _mma_slice, _plan, _scalar, _stages, mma_stage, refresh)
from .patching import set_call

DENSE_SLICE, DENSE_STAGES = 256, 2  # inputs per ring stage, stages per warp
# Warps that split one tile's inputs: 4, 2 or 1 (of those that divide the slices), by _split's cost.
# An H200 (docs/benchmarks.md): 4 beat 2 and 8 for the o projection (256 tiles), 2 matched 4 for the
# q/k/v projection (384), 4 beat 2 for the dense MLP's gate or up (684), 1 beat 2 and 4 for the LM head
# (2000 tiles: 250 blocks instead of 1000).
DENSE_SPLIT = 4
DENSE_SMS = GATE_UP_BLOCKS // 2  # SMs of an H100/H200 (only the split choice depends on it)
BLOCK_ROWS = 7  # a block's fixed cost (launch, x, sum-x table, epilogue) in rows' worth of weight bytes
MAX_DIN = 16384  # the block's sum-x table is 16 x DIN / GROUP floats of static shared memory
NORM_TOKENS = 4  # most tokens of qlinear_norm: each block keeps their RMSNorm in shared memory
X_TOKENS = 4  # most tokens whose inputs DENSE_MMA copies into shared memory first (more: read in place)
X_SMEM = 96 * 1024  # ... while the ring and those inputs fit in this much (two blocks per SM)


def why_not_dense(x: mx.array, weight: mx.array, scales: mx.array, biases: Optional[mx.array], bits: int,
                  group_size: int, mode: str = "affine") -> str | None:
    """``None`` if :func:`qlinear` can compute ``x @ dequantize(weight).T``, else why not."""
    if mode != "affine" or bits != 4 or biases is None:
        return "only 4-bit affine weights"
    if x.dtype not in (mx.bfloat16, mx.float16) or scales.dtype != x.dtype or biases.dtype != x.dtype:
        return "bfloat16 or float16 activations, scales and biases of one dtype"
    if group_size not in SUPPORTED_GROUPS:
        return f"group size must be one of {SUPPORTED_GROUPS}"
    din, nout = x.shape[-1], weight.shape[0]
    if weight.ndim != 2 or weight.dtype != mx.uint32 or weight.shape[1] * 8 != din:
        return "a 2-d packed weight as wide as the activations"
    if x.size // max(din, 1) > MAX_TOKENS or x.size == 0:
        return f"1 to {MAX_TOKENS} tokens (prefill keeps MLX's matmul)"
    if nout % 16 or din > MAX_DIN or not dense_kernel(x.dtype, din, nout, group_size)[1]:
        return "rows a multiple of 16, inputs a multiple of 256 up to 16384"
    from . import device_backend  # the package imports this module: looked up at call time

    if device_backend() != "cuda":
        return "needs MLX's CUDA backend"
    return None


@functools.lru_cache(maxsize=64)
def dense_kernel(x_dtype, din: int, nout: int, group: int, split: Optional[int] = None) -> tuple[list, int]:
    """(template, dynamic shared memory) of ``DENSE_MMA`` for ``din -> nout``; 0 bytes: no fit.
    ``split``: warps per tile (the next that divides the slices), else chosen by :func:`_split`."""
    ks = _mma_slice(din, DENSE_SLICE, group, x_dtype.size)
    if not ks:
        return [], 0
    slices = din // ks
    if split is None:
        split = _split(slices, nout)
    else:  # as asked, or the next that divides the slices
        split = next(s for s in (split, 8, 4, 2, 1) if s <= WARPS and slices % s == 0)
    stage = mma_stage(ks, x_dtype.size)
    stages, smem = _stages(stage, DENSE_STAGES)
    ring = stages * WARPS * stage
    xt = next((t for t in (X_TOKENS, 2, 1) if ring + t * din * x_dtype.size <= X_SMEM), 0) if smem else 0
    return ([("X", x_dtype), ("S", x_dtype), ("DIN", din), ("NOUT", nout), ("GROUP", group), ("KS", ks),
             ("STAGES", stages), ("SPLIT", split), ("XT", xt)], smem and max(ring + xt * din * x_dtype.size, OPT_IN))


def _split(slices: int, nout: int) -> int:
    """Warps per 16-row tile, of DENSE_SPLIT, 2 and 1 that divide the slices: the one whose busiest SM
    has the least to do, in rows of weights, its blocks' fixed costs included (the first of a tie)."""
    def busiest(s: int) -> int:
        rows = 16 * (WARPS // s)  # per block
        blocks = -(-nout // rows)
        return -(-blocks // DENSE_SMS) * (rows + BLOCK_ROWS)  # blocks per SM (rounded up) x their cost
    return min((s for s in (DENSE_SPLIT, 2, 1) if slices % s == 0), key=busiest)


def qlinear(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int,
            split: Optional[int] = None, shape: Optional[tuple] = None) -> mx.array:
    """``x [.., DIN] -> [.., NOUT]``: ``mx.quantized_matmul(x, weight, scales, biases, transpose=True,
    group_size=group_size, bits=4)`` (check :func:`why_not_dense` first); ``shape``: the result in that
    shape (of as many values) as the kernel's own output, with no reshape after it."""
    din, nout = x.shape[-1], weight.shape[0]
    template, smem = dense_kernel(x.dtype, din, nout, group_size, split)
    return _launch("dense_mma", smem, template, [x, weight, scales, biases], shape or (*x.shape[:-1], nout))


def dense_norm_kernel(x_dtype, din: int, nout: int, group: int) -> tuple[list, int]:
    """(template, dynamic shared memory) of ``DENSE_NORM_MMA``: ``DENSE_MMA``'s ring plus the
    normalised activations of up to :data:`NORM_TOKENS` tokens; 0 bytes: no fit."""
    return _with_tokens(x_dtype, din, nout, group, NORM_TOKENS)


@functools.lru_cache(maxsize=64)
def _with_tokens(x_dtype, din: int, nout: int, group: int, tokens: int) -> tuple[list, int]:
    """``dense_kernel``'s template, and its ring plus ``tokens`` rows of ``din`` activations in shared memory."""
    template, smem = dense_kernel(x_dtype, din, nout, group)
    if not smem:
        return [], 0
    t = dict(template)
    ring = t["STAGES"] * WARPS * mma_stage(t["KS"], x_dtype.size)  # as dense_kernel sized it
    smem = max(ring + tokens * din * x_dtype.size, OPT_IN)
    return (template, smem) if smem <= SMEM_BUDGET else ([], 0)


# -- rows that are not a whole number of slices ------------------------------------------------------

PAD_TOKENS = 2  # most tokens of the padded kernel (their padded inputs sit in the block's shared memory)


def padded_width(din: int) -> int:
    """``din`` rounded up to whole slices for each of the DENSE_SPLIT warps of a tile (10944 -> 11264:
    44 slices, 11 per warp; 43 slices would leave one warp per tile)."""
    step = DENSE_SLICE * DENSE_SPLIT
    return -(-din // step) * step


@attrs.frozen
class PaddedPlan:
    """A 4-bit ``QuantizedLinear`` whose rows are not whole slices: a copy of its weights padded with
    zero words, scales and biases to :func:`padded_width` inputs (``reason``: why not)."""

    reason: Optional[str]
    weight: Optional[mx.array] = None
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None


def padded_plan(layer) -> PaddedPlan:
    w, sc, bi = layer.weight, layer.scales, layer.get("biases")
    if getattr(layer, "mode", "affine") != "affine" or layer.bits != 4 or bi is None or "bias" in layer:
        return PaddedPlan("only 4-bit affine weights without a bias")
    din = w.shape[1] * 8
    if din % DENSE_SLICE == 0 or din % layer.group_size or din % 8 or layer.group_size not in SUPPORTED_GROUPS:
        return PaddedPlan("rows of whole slices, or not of whole groups")
    dinp = padded_width(din)
    w = mx.pad(w, [(0, 0), (0, (dinp - din) // 8)])
    sc, bi = (mx.pad(a, [(0, 0), (0, (dinp - din) // layer.group_size)]) for a in (sc, bi))
    mx.eval(w, sc, bi)
    return PaddedPlan(None, w, sc, bi)


def why_not_padded(layer, x: mx.array) -> str | None:
    """``None`` if :func:`qlinear_padded` can compute ``layer(x)``, else why not."""
    if not isinstance(layer, nn.QuantizedLinear):
        return "not a QuantizedLinear"
    plan = _plan(layer, padded_plan)
    if plan.reason:
        return plan.reason
    if x.dtype not in (mx.bfloat16, mx.float16) or plan.scales.dtype != x.dtype:
        return "bfloat16 or float16 activations and scales of one dtype"
    if x.shape[-1] != layer.weight.shape[1] * 8 or x.size // x.shape[-1] > PAD_TOKENS:
        return f"1 to {PAD_TOKENS} tokens as wide as the rows"
    if not _with_tokens(x.dtype, plan.weight.shape[1] * 8, plan.weight.shape[0], layer.group_size, PAD_TOKENS)[1]:
        return "the padded activations do not fit the block's shared memory"
    from . import device_backend

    return None if device_backend() == "cuda" else "needs MLX's CUDA backend"


def qlinear_padded(layer, x: mx.array) -> mx.array:
    """``layer(x)`` for a 4-bit ``QuantizedLinear`` whose rows are not whole slices, on the dense kernel
    over its padded copy (check :func:`why_not_padded` first)."""
    plan = _plan(layer, padded_plan)
    dinp, nout = plan.weight.shape[1] * 8, plan.weight.shape[0]
    template, smem = _with_tokens(x.dtype, dinp, nout, layer.group_size, PAD_TOKENS)
    return _launch("dense_pad_mma", smem, template + [("DX", x.shape[-1])], [x, plan.weight, plan.scales, plan.biases],
                   (*x.shape[:-1], nout))


def why_not_dense_norm(x: mx.array, norm, weight: mx.array, scales: mx.array, biases: Optional[mx.array], bits: int,
                       group_size: int, mode: str = "affine") -> str | None:
    """``None`` if :func:`qlinear_norm` can compute ``norm(x) @ dequantize(weight).T`` (``norm`` an
    ``nn.RMSNorm``), else why not."""
    reason = why_not_dense(x, weight, scales, biases, bits, group_size, mode)
    if reason:
        return reason
    if not isinstance(norm, nn.RMSNorm) or norm.weight.shape != (x.shape[-1],) or norm.weight.dtype != x.dtype:
        return "the norm must be an RMSNorm with a weight of the activations' width and dtype"
    if x.size // x.shape[-1] > NORM_TOKENS:
        return f"more than {NORM_TOKENS} tokens"
    if not dense_norm_kernel(x.dtype, x.shape[-1], weight.shape[0], group_size)[1]:
        return "the normalised activations do not fit the block's shared memory"
    return None


def qlinear_norm(x: mx.array, norm, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                 shape: Optional[tuple] = None) -> mx.array:
    """:func:`qlinear` of ``norm(x)`` (``norm`` an ``nn.RMSNorm``; check :func:`why_not_dense_norm`
    first), the norm computed in the same kernel and rounded as ``mx.fast.rms_norm`` rounds it."""
    din, nout = x.shape[-1], weight.shape[0]
    template, smem = dense_norm_kernel(x.dtype, din, nout, group_size)
    return _launch("dense_norm_mma", smem, template, [x, weight, scales, biases, norm.weight, _scalar(norm.eps)],
                   shape or (*x.shape[:-1], nout))


def _launch(name: str, smem: int, template: list, inputs: list, shape: tuple) -> mx.array:
    """One dense kernel over ``inputs[1]``'s rows (its template's SPLIT warps per 16-row tile), its
    output ``shape`` in the activations' dtype."""
    tiles, nout = WARPS // dict(template)["SPLIT"], inputs[1].shape[0]
    (y,) = _kernel(name, smem)(
        inputs=inputs, template=template, grid=(-(-nout // (16 * tiles)) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1), output_shapes=[shape], output_dtypes=[inputs[0].dtype],
    )
    return y


def quantized_matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: Optional[mx.array], group_size: int,
                     bits: int, mode: str = "affine", shape: Optional[tuple] = None) -> mx.array:
    """``mx.quantized_matmul(x, weight, scales, biases, transpose=True, ...)`` (reshaped to ``shape`` if
    given): through :func:`qlinear` where it fits, else MLX's."""
    if why_not_dense(x, weight, scales, biases, bits, group_size, mode) is None:
        return qlinear(x, weight, scales, biases, group_size, shape=shape)
    y = mx.quantized_matmul(x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size,
                            bits=bits, mode=mode)
    return y if shape is None else y.reshape(shape)


def _linear_call(self, x: mx.array) -> mx.array:
    """``QuantizedLinear.__call__`` through :func:`quantized_matmul`, or :func:`qlinear_padded` for
    rows that are not whole slices."""
    if self.weight.shape[1] * 8 % DENSE_SLICE and why_not_padded(self, x) is None:
        return qlinear_padded(self, x)
    y = quantized_matmul(x, self.weight, self.scales, self.get("biases"), self.group_size, self.bits,
                         getattr(self, "mode", "affine"))
    return y + self["bias"] if "bias" in self else y


def quantized_linears(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]


def patch_linears(model, on: bool) -> int:
    """Give ``model``'s ``QuantizedLinear`` layers the dense kernel's call (``on``) or MLX's back;
    returns how many layers have it."""
    layers = quantized_linears(model)
    for m in layers:
        set_call(m, _linear_call, "_moedec_dense", on)
        if on:  # a padded copy is made now (once per weights), not in the first call's trace
            refresh(m)
            _plan(m, padded_plan)
    return len(layers) if on else 0
