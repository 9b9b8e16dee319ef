"""mlx-lm's ``noaux_tc`` MoE gate (GLM-4.x, DeepSeek-V3) on MLX's CUDA backend, in one kernel
(:mod:`.router_source`): :func:`fused_router` gives ``(inds [.., K] int32, scores [.., K] float32)``
as ``MoEGate(x)`` does; :func:`why_not_router` says when it cannot.
"""

from __future__ import annotations

import functools

import attrs
import mlx.core as mx

from .fused import FLOATS, MAX_EXPERTS, MAX_TOKENS, SMALL, _kernel, _plan, _scalar

ROUTER_WARPS = 4  # warps per block of the router kernel (one per (token, expert) logit)


@functools.lru_cache(maxsize=None)
def _noaux_gates() -> tuple[type, ...]:
    from mlx_lm.models import deepseek_v3, glm4_moe

    return glm4_moe.MoEGate, deepseek_v3.MoEGate


@attrs.frozen
class _GatePlan:
    reason: str | None
    inputs: tuple = ()  # weight, correction bias, scaling factor
    spec: tuple = ()  # router_template's arguments after x's dtype

    @property
    def width(self) -> int:
        return self.spec[2]

    @property
    def top_k(self) -> int:
        return self.spec[4]


@functools.lru_cache(maxsize=64)
def router_template(x_dtype, w_dtype, bias_dtype, d: int, experts: int, top_k: int, groups: int,
                    top_groups: int, norm: bool) -> list:
    """Template arguments of the router kernel (what :mod:`moedec.kernels.resources` compiles too)."""
    logit = x_dtype if x_dtype == w_dtype else mx.float32  # dtype of mlx-lm's x @ w.T
    return [("X", x_dtype), ("R", logit), ("W", w_dtype), ("B", bias_dtype), ("DIN", d), ("NE", experts),
            ("K", top_k), ("NG", groups), ("TG", top_groups), ("NORM", norm), ("NW", ROUTER_WARPS)]


def _gate_plan(gate) -> _GatePlan:
    if not isinstance(gate, _noaux_gates()) or type(gate).__call__ not in {c.__call__ for c in _noaux_gates()}:
        return _GatePlan("not mlx-lm's noaux_tc MoE gate")
    w, bias = gate.weight, gate.e_score_correction_bias
    if "scales" in gate or w.ndim != 2 or w.dtype not in FLOATS or bias.dtype not in FLOATS:
        return _GatePlan("router weight must be a plain float matrix")
    e, d = w.shape
    k, ng, tg = gate.top_k, gate.n_group, gate.topk_group
    if e > MAX_EXPERTS or not 1 <= k <= min(32, e):
        return _GatePlan(f"at most {MAX_EXPERTS} experts and 1 <= top_k <= 32")
    if not 1 <= ng <= 64 or e % ng or not 1 <= tg <= ng:
        return _GatePlan("unsupported expert grouping")
    if d % 8:
        return _GatePlan("the hidden width must be a multiple of 8")
    spec = (w.dtype, bias.dtype, d, e, k, ng, tg, bool(gate.norm_topk_prob))
    return _GatePlan(None, (w, bias, _scalar(float(gate.routed_scaling_factor))), spec)


def why_not_router(gate, x: mx.array) -> str | None:
    """``None`` if :func:`fused_router` can compute this gate's routing of ``x``, else why not."""
    plan = _plan(gate, _gate_plan)
    if plan.reason:
        return plan.reason
    if x.shape[-1] != plan.width or x.dtype not in FLOATS:
        return "activations must be float, as wide as the router"
    if x.size // plan.width > MAX_TOKENS:  # one block selects for every token
        return f"more than {MAX_TOKENS} tokens (prefill keeps the stock path)"
    return None


def fused_router(gate, x: mx.array) -> tuple[mx.array, mx.array]:
    """mlx-lm's ``MoEGate(x)`` in one kernel: ``x [.., D]`` -> ``inds [.., K] int32``, ``scores [.., K] float32``.
    Each call also zeroes the kernel's block counter (a fill that depends on nothing, so the GPU
    runs it off the step's path): MLX runs kernels that share no array at the same time, so two
    routings in one graph each need their own. (Under ``mx.compile`` the zeros may become one
    constant that the layers' launches share one after another; the kernel leaves it at zero.)"""
    plan = _plan(gate, _gate_plan)
    w, bias, rsf = plan.inputs
    experts, tokens = w.shape[0], x.size // plan.width
    done = mx.zeros((SMALL,), mx.uint32)  # this launch's own: MLX may run routings that share no array at once
    _, inds, scores = _kernel("router")(
        inputs=[x, w, bias, rsf, done], template=router_template(x.dtype, *plan.spec),
        grid=(-(-tokens * experts // ROUTER_WARPS) * 32 * ROUTER_WARPS, 1, 1), threadgroup=(32 * ROUTER_WARPS, 1, 1),
        output_shapes=[(tokens, experts), (*x.shape[:-1], plan.top_k), (*x.shape[:-1], plan.top_k)],
        output_dtypes=[mx.float32, mx.int32, mx.float32],
    )  # one warp per logit; the last block to finish selects, one warp per token
    return inds, scores
