"""MoE expert kernels: one op for gate+up projection, SwiGLU and down projection, grouped by expert.

``patch(model)`` swaps every mlx-lm ``SwitchGLU`` of a model for :class:`DispatchingSwitchGLU`
(same parameters, same weights: only the class changes), which picks per call:

* ``fused``: the expert-grouped CUDA kernel (:mod:`moedec.kernels.fused`) when MLX runs on CUDA and
  the call fits it (affine 4/8-bit, group 32/64/128, SwiGLU, decode-sized forwards);
* ``stock``: mlx-lm's own ``SwitchGLU`` (``mx.gather_qmm``) everywhere else — the reference.

Backends live in :data:`BACKENDS`: a Metal version drops in by registering
``BACKENDS["metal"] = (why_not, run)`` with the same signatures as the CUDA one.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU

from moedec.errors import MoedecError

KERNELS = ("auto", "stock", "fused")

#: Backends that ``auto`` picks. Empty until a fused backend is measured faster than stock end to
#: end: on an H200 (2026-11-25) the CUDA kernel ran the T=1 MoE layer in 209 us against stock's
#: 168 us (docs/benchmarks.md), so ``auto`` keeps the stock path and ``fused`` must be asked for.
AUTO_BACKENDS: frozenset[str] = frozenset()

# backend name -> (why_not(switch, x, indices) -> reason | None, run(switch, x, indices) -> y)
BACKENDS: dict[str, tuple[Callable, Callable]] = {}


def _register_cuda() -> None:
    from .fused import fused_switch_glu, why_not_fused

    BACKENDS["cuda"] = (why_not_fused, fused_switch_glu)


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

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        entry = BACKENDS.get(self.moedec_backend or "")
        if entry is not None and entry[0](self, x, indices) is None:
            return entry[1](self, x, indices)
        return SwitchGLU.__call__(self, x, indices)


def switch_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, SwitchGLU)]


def patch(model, kernel: str = "auto") -> int:
    """Route the model's ``SwitchGLU`` calls through ``kernel`` (``auto``/``stock``/``fused``).

    ``auto``: fused where this device has a fused backend measured faster than stock
    (:data:`AUTO_BACKENDS`), else stock. ``fused`` on a device without one is an error. Returns how many layers dispatch to a fused backend. Idempotent;
    ``patch(model, "stock")`` undoes it.
    """
    if kernel not in KERNELS:
        raise MoedecError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    backend = device_backend()
    if kernel == "fused" and backend not in BACKENDS:
        raise MoedecError(
            f"the fused MoE kernel needs MLX's CUDA backend (this device: {backend or 'cpu'}); use --kernel stock"
        )
    if kernel == "fused":
        use = backend
    elif kernel == "auto" and backend in AUTO_BACKENDS:
        use = backend
    else:
        use = None
    layers = switch_layers(model)
    if kernel == "fused" and not layers:
        raise MoedecError("this model has no SwitchGLU expert layers for the fused kernel")
    for m in layers:
        if use is None:
            if isinstance(m, DispatchingSwitchGLU):
                m.__class__ = SwitchGLU
                m.__dict__.pop("moedec_backend", None)
        else:
            m.__class__ = DispatchingSwitchGLU
            m.moedec_backend = use
    return len(layers) if use else 0
