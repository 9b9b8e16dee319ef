"""MoE kernels: the whole routed-expert block of a decode forward in a few fused ops.

``patch(model)`` changes the class (never the weights) of two kinds of mlx-lm module:

* every ``SwitchGLU`` becomes :class:`DispatchingSwitchGLU`. Called as mlx-lm does,
  ``switch(x, inds)`` returns ``[.., K, D]``; called with ``scores=`` (and ``shared=``) it also does
  the routing-weight combine (and adds the shared expert) and returns ``[.., D]``;
* every GLM-4.x / DeepSeek-V3 MoE block (``noaux_tc`` gate) gets a ``__call__`` that routes with
  the backend's router kernel and hands ``scores`` and the shared expert to its ``SwitchGLU``;

:func:`joined` (used while the compiled decode step is traced, :mod:`moedec.compiled`) also lets
every GLM-4.x attention layer compute its queries, keys and values in one quantized matmul and
their RoPE in one call (in the compiled step on CUDA: inside the attention kernel,
:mod:`moedec.kernels.attention`), and every GLM-4.x decoder layer join its
residual add and norm and hand its fused MoE block the residual (:mod:`moedec.kernels.layer`),
and on CUDA gives the 4-bit dense layers (attention projections, dense MLPs, LM head) the
tensor-core kernel of :mod:`moedec.kernels.dense`: fewer and faster kernels per step.

Each call goes to the device's backend when it fits (``why_not_*`` is ``None``), else to mlx-lm's
stock code, the reference. Backends live in :data:`BACKENDS`; a Metal one drops in by registering
``BACKENDS["metal"] = Backend(...)`` with the signatures of the CUDA one (:mod:`moedec.kernels.fused`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import attrs
import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU

from moedec.errors import MoedecError

from .attention import patch_attention
from .dense import patch_linears
from .layer import patch_layers
from .ops import patch_embeddings
from .patching import set_call

KERNELS = ("auto", "stock", "fused")


@attrs.frozen
class Backend:
    """One device's fused kernels. ``why_not*`` return ``None`` when the call fits, else a reason."""

    why_not: Callable  # (switch, x, inds) -> str | None
    switch_glu: Callable  # (switch, x, inds) -> [.., K, D]
    moe: Callable  # (switch, x, inds, scores, shared | None[, residual=]) -> [.., D] (+ residual)
    why_not_shared: Callable  # (switch, shared) -> str | None
    why_not_router: Callable  # (gate, x) -> str | None
    router: Callable  # (gate, x) -> (inds, scores)
    why_not_add_norm: Callable  # (x, r, weight) -> str | None
    add_norm: Callable  # (x, r, weight, eps) -> (x + r, rms_norm(x + r, weight, eps))
    #: (gate, x, r, weight) -> str | None, and (gate, x, r, weight, eps) -> (h, n, inds, scores): the
    #: add + norm and the router of norm's output in one op (optional: a backend may leave them out)
    why_not_add_norm_router: Optional[Callable] = None
    add_norm_router: Optional[Callable] = None


BACKENDS: dict[str, Backend] = {}

#: Backends that ``auto`` picks for the MoE blocks of :func:`moe_blocks`: measured faster than stock
#: end to end (H200, 2026-11-26, session 5: 581.5 vs 431.0 tok/s with the stock kernels on the plain
#: step, 630.4 with the compiled step; docs/benchmarks.md).
AUTO_BACKENDS: frozenset[str] = frozenset({"cuda"})


def _register_cuda() -> None:
    from . import fused, ops, router

    BACKENDS["cuda"] = Backend(fused.why_not_fused, fused.fused_switch_glu, fused.fused_moe,
                               fused.why_not_shared, router.why_not_router, router.fused_router,
                               ops.why_not_add_norm, ops.add_rms_norm,
                               router.why_not_add_norm_router, router.add_norm_router)


_register_cuda()


def device_backend() -> Optional[str]:
    """The GPU backend MLX runs on now (``"cuda"``, ``"metal"``), or ``None`` on the CPU."""
    if mx.default_device() != mx.gpu:
        return None
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


class DispatchingSwitchGLU(SwitchGLU):
    """A ``SwitchGLU`` whose call goes to the fused backend when it can, else to the stock path."""

    moedec_backend: Optional[str] = None  # set per instance by patch()

    def __call__(self, x: mx.array, indices: mx.array, scores: Optional[mx.array] = None, shared=None,
                 residual: Optional[mx.array] = None) -> mx.array:
        be = BACKENDS.get(self.moedec_backend or "")
        fits = be is not None and be.why_not(self, x, indices) is None
        if scores is None:
            return be.switch_glu(self, x, indices) if fits else SwitchGLU.__call__(self, x, indices)
        if fits and (shared is None or be.why_not_shared(self, shared) is None):
            if residual is None:
                return be.moe(self, x, indices, scores, shared)
            return be.moe(self, x, indices, scores, shared, residual=residual)
        if fits:
            y = be.moe(self, x, indices, scores, None)
        else:
            y = SwitchGLU.__call__(self, x, indices)  # mlx-lm's MoE combine, verbatim in effect
            y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
        y = y if shared is None else y + shared(x)
        return y if residual is None else residual + y


def _moe_call(self, x: mx.array, residual: Optional[mx.array] = None, routing: Optional[tuple] = None) -> mx.array:
    """A GLM-4.x / DeepSeek-V3 MoE block: route, then experts + combine + shared in the switch
    (``residual + block(x)`` if a residual is given: the decoder layer's add, in the same kernel;
    ``routing``, ``(inds, scores)`` of ``x`` if already routed: :func:`moe_after_add_norm`)."""
    if self.sharding_group is not None or not isinstance(self.switch_mlp, DispatchingSwitchGLU):
        y = self._moedec_stock_call(x)
        return y if residual is None else residual + y
    be = BACKENDS.get(self.moedec_backend or "")
    if routing is not None:
        inds, scores = routing
    elif be is not None and be.why_not_router(self.gate, x) is None:
        inds, scores = be.router(self.gate, x)
    else:
        inds, scores = self.gate(x)
    shared = self.shared_experts if self.config.n_shared_experts is not None else None
    return self.switch_mlp(x, inds, scores=scores, shared=shared, residual=residual)


def moe_after_add_norm(block, x: mx.array, r: mx.array, norm) -> Optional[mx.array]:
    """``h + block(norm(h))`` with ``h = x + r`` (a decoder layer's second half), with the add, the
    norm and the block's router in one kernel of the backend; ``None`` where that does not fit."""
    be = BACKENDS.get(block.moedec_backend or "")
    if (be is None or be.add_norm_router is None or block.sharding_group is not None
            or not isinstance(block.switch_mlp, DispatchingSwitchGLU)
            or be.why_not_add_norm_router(block.gate, x, r, norm.weight) is not None):
        return None
    h, n, inds, scores = be.add_norm_router(block.gate, x, r, norm.weight, norm.eps)
    return block(n, residual=h, routing=(inds, scores))


@functools.lru_cache(maxsize=None)
def _moe_block_classes() -> tuple[type, ...]:
    from mlx_lm.models import deepseek_v3, glm4_moe

    return glm4_moe.MoE, deepseek_v3.DeepseekV3MoE


def switch_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, SwitchGLU)]


def moe_blocks(model) -> list:
    """The model's MoE blocks whose whole call the fused kernels can take over."""
    return [m for _, m in model.named_modules()
            if isinstance(m, _moe_block_classes()) and isinstance(getattr(m, "switch_mlp", None), SwitchGLU)]


def patch(model, kernel: str = "auto") -> int:
    """Route the model's MoE layers through ``kernel`` (``auto``/``stock``/``fused``).

    ``auto``: where this device has a backend in :data:`AUTO_BACKENDS`, the fused kernels take over
    what they were measured faster on, the whole MoE blocks of GLM-4.x / DeepSeek-V3 models
    (:func:`moe_blocks`); every other layer keeps mlx-lm's stock path. ``fused``: every
    ``SwitchGLU`` layer as well (an error on a device without a backend). Returns how many expert
    layers dispatch to a fused backend. Idempotent; ``patch(model, "stock")`` undoes it.
    """
    if kernel not in KERNELS:
        raise MoedecError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    backend = device_backend()
    if kernel == "fused" and backend not in BACKENDS:
        raise MoedecError(
            f"the fused MoE kernel needs MLX's CUDA backend (this device: {backend or 'cpu'}); use --kernel stock"
        )
    use = backend if kernel == "fused" or (kernel == "auto" and backend in AUTO_BACKENDS) else None
    from .fused import refresh

    for _, m in model.named_modules():  # weights may have changed since the last patch
        refresh(m)
    layers = switch_layers(model)
    if kernel == "fused" and not layers:
        raise MoedecError("this model has no SwitchGLU expert layers for the fused kernel")
    blocks = moe_blocks(model)
    in_blocks = {id(b.switch_mlp) for b in blocks}
    fused = 0
    for m in layers:
        target = use if kernel == "fused" or id(m) in in_blocks else None
        if target is None:
            if isinstance(m, DispatchingSwitchGLU):
                m.__class__ = SwitchGLU
                m.__dict__.pop("moedec_backend", None)
        else:
            m.__class__ = DispatchingSwitchGLU
            m.moedec_backend = target
            fused += 1
    for b in blocks:
        set_call(b, _moe_call, "_moedec_fused_block", use is not None, use)
    return fused


@contextlib.contextmanager
def joined(model):
    """While open: ``model``'s GLM-4.x attention layers join their q/k/v projections and RoPEs, and
    its decoder layers, where the MoE blocks dispatch to a backend, join the residual add and norm
    and pass the residual into the block's last kernel; on CUDA its 4-bit ``QuantizedLinear`` layers
    (and the joined q/k/v) use the dense tensor-core kernel where it fits (:mod:`.dense`), and its
    quantized embeddings one kernel (:func:`.ops.embed`). Same
    results up to the order of float32 sums; fewer, faster kernels per step. The compiled step
    traces under it: there the joins measured faster, while on the plain step the extra Python per
    layer cost more than the kernels saved (docs/benchmarks.md)."""
    backend = next((b.moedec_backend for b in moe_blocks(model) if getattr(b, "moedec_backend", None)), None)
    patch_attention(model, True)
    patch_layers(model, backend)
    patch_linears(model, backend == "cuda")  # the dense kernel is CUDA's
    patch_embeddings(model, backend == "cuda")  # and the embedding kernel
    try:
        yield
    finally:
        patch_embeddings(model, False)
        patch_linears(model, False)
        patch_layers(model, None)
        patch_attention(model, False)
