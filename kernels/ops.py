"""Small CUDA ops beside the expert kernels (sources in ``cuda_source`` and ``attention_source``;
signatures in :data:`moedec.kernels.fused.SIGNATURES`).

* :func:`add_rms_norm`: a residual add and the RMSNorm after it, in one kernel (a decoder layer's
  post-attention norm, :mod:`moedec.kernels.layer`).
* :func:`decode_attention`: one-token attention over a fixed-capacity cache whose valid length is
  an array (the compiled step's, :mod:`moedec.compiled`); :func:`decode_attention_write` also writes
  the new position into the cache (in place), and :func:`decode_attention_qkv` takes the joined q/k/v
  projection's output before RoPE and applies the RoPE itself.
* :func:`embed`: a quantized embedding's rows (mlx-lm's ``QuantizedEmbedding``) in one kernel
  instead of three gathers and a dequantize; :func:`patch_embeddings` gives a model's embeddings
  that call.
* :func:`copy` and :func:`spin`: for measuring copy bandwidth and GPU time (``examples/bench_kernel.py``).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .fused import FLOATS, THREADS, _kernel, _scalar


# -- residual add + RMSNorm ------------------------------------------------------------------------


def why_not_add_norm(x: mx.array, r: mx.array, weight: mx.array) -> str | None:
    """``None`` if :func:`add_rms_norm` can take these arrays, else why not."""
    d = x.shape[-1]
    if x.shape != r.shape or x.dtype != r.dtype or x.dtype not in FLOATS or weight.shape != (d,):
        return "x and r of one float dtype and shape, a weight as wide as their rows"
    if d % 8 or d > 32 * THREADS or weight.dtype != x.dtype:
        return "rows of a multiple of 8 values, at most 8192, and a weight of their dtype (else MLX's norm promotes)"
    return None


def add_rms_norm(x: mx.array, r: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """``(h, n)`` with ``h = x + r`` and ``n = mx.fast.rms_norm(h, weight, eps)``, in one kernel
    (check :func:`why_not_add_norm` first)."""
    d = x.shape[-1]
    h, n = _kernel("add_norm")(
        inputs=[x, r, weight, _scalar(float(eps))], template=[("X", x.dtype), ("D", d)],
        grid=(x.size // d * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype],
    )  # one block per row
    return h, n


# -- decode attention -------------------------------------------------------------------------------

ATTENTION_WARPS = 8  # per block (one block per (batch, head)) of the ATTENTION kernel


def why_not_decode_attention(queries: mx.array, keys: mx.array) -> str | None:
    """``None`` if :func:`decode_attention` can attend these one-token queries over ``keys``."""
    b, h, n, d = queries.shape
    if n != 1:
        return "one query position"
    return _why_not_heads(queries.dtype, b, h, d, keys)


def _why_not_heads(dtype, b: int, h: int, d: int, keys: mx.array) -> str | None:
    if dtype not in FLOATS or keys.dtype != dtype:
        return "float queries and keys of one dtype"
    if d not in (32, 64, 128, 256) or keys.shape[3] != d or keys.shape[0] != b or h % keys.shape[1]:
        return "head size 32, 64, 128 or 256 (a lane's part of a row is one aligned load), whole query heads per key/value head"
    return None


def attention_template(dtype, d: int, h: int, hkv: int) -> list:
    """The ATTENTION kernel's template arguments (what :mod:`moedec.kernels.resources` compiles too)."""
    return [("X", dtype), ("D", d), ("H", h), ("HKV", hkv), ("NW", ATTENTION_WARPS)]


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, offset: mx.array, scale: float) -> mx.array:
    """Softmax attention of ``queries [B, H, 1, D]`` over positions ``0..offset`` of ``keys`` /
    ``values [B, Hkv, C, D]`` (``offset``: an int32 array, its element 0 read, so the length can change
    without a new graph; one of 16 bytes or more stays in device memory, see :data:`.fused.SMALL`);
    check :func:`why_not_decode_attention` first."""
    (o,) = _attention("attention", [queries, keys, values, offset, _scalar(float(scale))], [queries.shape])
    return o


def decode_attention_write(queries: mx.array, keys: mx.array, values: mx.array, new_keys: mx.array,
                           new_values: mx.array, offset: mx.array, scale: float) -> tuple[mx.array, mx.array, mx.array]:
    """:func:`decode_attention` with the new token's ``new_keys`` / ``new_values [B, Hkv, 1, D]`` at
    position ``offset`` (the cache holds ``0..offset-1``), in one kernel that also writes them at
    ``offset`` of ``keys`` / ``values`` **in place**: ``(output, keys, values)``, the very arrays,
    their other rows untouched. Only for buffers that nothing else reads or will read as they were
    (the compiled step's own, row-contiguous: MLX would copy any other and the write would be lost);
    the kernel's later readers must depend on its output (MLX does not know of the write). No copy
    of the cache per step. Check :func:`why_not_decode_attention` first."""
    (o,) = _attention("attention_write", [queries, keys, values, new_keys, new_values, offset, _scalar(float(scale))],
                      [queries.shape])
    return o, keys, values


def rope_spec(rope) -> tuple[int, bool, float, float] | None:
    """``(dims, traditional, base, scale)`` of a plain ``mlx.nn.RoPE`` (what :func:`decode_attention_qkv`
    applies), else ``None`` (a RoPE with its own frequencies or scaling rule)."""
    if type(rope) is not nn.RoPE:
        return None
    return int(rope.dims), bool(rope.traditional), float(rope.base), float(rope.scale)


def why_not_attention_qkv(qkv: mx.array, keys: mx.array, heads: int, rope: tuple | None) -> str | None:
    """``None`` if :func:`decode_attention_qkv` can take this joined ``qkv [B, 1, H + 2 Hkv, D]`` row,
    ``keys [B, Hkv, C, D]`` and ``rope`` (:func:`rope_spec`), else why not."""
    if rope is None:
        return "not a plain mlx.nn.RoPE"
    b, n, rows, d = qkv.shape
    hkv = keys.shape[1]
    if n != 1 or rows != heads + 2 * hkv or keys.shape[0] != b:
        return "one position of query, key and value heads, as many key/value heads as the cache"
    dims = rope[0]
    if dims % 2 or not 0 < dims <= d:
        return "an even number of rotated dimensions, at most the head size"
    return _why_not_heads(qkv.dtype, b, heads, d, keys)


def decode_attention_qkv(qkv: mx.array, keys: mx.array, values: mx.array, offset: mx.array, scale: float, heads: int,
                         rope: tuple) -> tuple[mx.array, mx.array, mx.array]:
    """:func:`decode_attention_write` from the joined projection's output ``qkv [B, 1, H + 2 Hkv, D]``
    (query, key, value heads) before RoPE: the kernel rotates the query and the new key at position
    ``offset`` as ``mlx.nn.RoPE(*rope)`` does (``rope``: :func:`rope_spec`). ``(output [B, 1, H * D],
    keys, values)``, the new key and value written in place as there; check
    :func:`why_not_attention_qkv` first."""
    b, _, _, d = qkv.shape
    dims, traditional, base, rope_scale = rope
    # log2 of the float32 base, rounded to float32, as MLX's host code computes it (std::log2(float));
    # numpy's float32 log2 differs in the last bit for ~0.4 % of bases, this for ~0.01 %
    log2_base = float(np.float32(math.log2(float(np.float32(base)))))
    inputs = [qkv, keys, values, offset, _scalar(float(scale)), _scalar(log2_base, rope_scale)]
    (o,) = _attention("attention_qkv", inputs, [(b, 1, heads * d)], heads, [("R", dims), ("TRAD", traditional)])
    return o, keys, values


def _attention(name: str, inputs: list, output_shapes: list, heads: int | None = None, extra: list = ()) -> list:
    """Launch attention kernel ``name`` on ``inputs``: the queries ``[B, H, 1, D]`` (or, with ``heads``,
    the joined ``qkv [B, 1, H + 2 Hkv, D]``), the keys ``[B, Hkv, C, D]``, then the rest. One block of
    ATTENTION_WARPS warps per (batch, query head); template: :func:`attention_template`'s arguments,
    then ``extra``; outputs in the first input's dtype."""
    first, keys = inputs[0], inputs[1]
    b, d = first.shape[0], first.shape[3]
    h = first.shape[1] if heads is None else heads
    return _kernel(name)(
        inputs=inputs, template=attention_template(first.dtype, d, h, keys.shape[1]) + list(extra),
        grid=(b * h * 32 * ATTENTION_WARPS, 1, 1),
        threadgroup=(32 * ATTENTION_WARPS, 1, 1), output_shapes=output_shapes,
        output_dtypes=[first.dtype] * len(output_shapes),
    )


# -- quantized embedding ---------------------------------------------------------------------------


def why_not_embed(emb, ids: mx.array) -> str | None:
    """``None`` if :func:`embed` can look ``ids`` up in the ``nn.QuantizedEmbedding`` ``emb``."""
    if getattr(emb, "mode", "affine") != "affine" or emb.bits not in (4, 8) or "biases" not in emb:
        return "4- or 8-bit affine quantization with biases"
    d = emb.weight.shape[-1] * 32 // emb.bits
    if emb.scales.dtype not in FLOATS or emb.biases.dtype != emb.scales.dtype or d % emb.group_size:
        return "float scales and biases of one dtype over whole groups"
    if ids.dtype not in (mx.int32, mx.uint32) or ids.size == 0:
        return "int32 or uint32 ids"
    return None


def embed(emb, ids: mx.array) -> mx.array:
    """``emb(ids)`` for an ``nn.QuantizedEmbedding`` (check :func:`why_not_embed` first): ``[.., D]``
    in the scales' dtype, each row dequantized as ``mx.dequantize`` does."""
    d = emb.weight.shape[-1] * 32 // emb.bits
    (out,) = _kernel("embed")(
        inputs=[ids, emb.weight, emb.scales, emb.biases],
        template=[("X", emb.scales.dtype), ("D", d), ("GROUP", emb.group_size), ("BITS", emb.bits)],
        grid=(ids.size * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(*ids.shape, d)], output_dtypes=[emb.scales.dtype],
    )  # one block per id
    return out


def _embed_call(self, x: mx.array) -> mx.array:
    """``QuantizedEmbedding.__call__`` through :func:`embed` where it fits."""
    return embed(self, x) if why_not_embed(self, x) is None else self._moedec_stock_call(x)


def patch_embeddings(model, on: bool) -> int:
    """Give ``model``'s ``QuantizedEmbedding`` layers :func:`embed`'s call (``on``, CUDA only) or
    mlx-lm's back; returns how many have it."""
    from .patching import set_call

    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedEmbedding)]
    for m in layers:
        set_call(m, _embed_call, "_moedec_embed", on)
    return len(layers) if on else 0


def copy(src: mx.array, blocks: int | None = None) -> mx.array:
    """A uint4-wide device copy of a uint32 array (for measuring copy bandwidth): ``blocks`` blocks
    of THREADS threads stride over it (default: up to 4 full SMs' worth per SM of a 132-SM GPU)."""
    n = src.size // 4
    threads = min(n, 132 * 2048 * 4) // THREADS * THREADS if blocks is None else blocks * THREADS
    (dst,) = _kernel("copy")(
        inputs=[src], template=[], grid=(threads, 1, 1),
        threadgroup=(THREADS, 1, 1), output_shapes=[src.shape], output_dtypes=[src.dtype],
    )
    return dst


def spin(ns: int) -> mx.array:
    """One GPU thread busy for ``ns`` nanoseconds (for timing the GPU work queued behind it)."""
    (out,) = _kernel("spin")(inputs=[mx.array([ns], mx.int64)], template=[], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                             output_shapes=[(1,)], output_dtypes=[mx.float32])
    return out
