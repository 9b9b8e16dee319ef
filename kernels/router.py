"""mlx-lm's ``noaux_tc`` MoE gate (GLM-4.x, DeepSeek-V3) on MLX's CUDA backend, in one kernel
(:mod:`.router_source`): :func:`fused_router` gives ``(inds [.., K] int32, scores [.., K] float32)``
as ``MoEGate(x)`` does; :func:`why_not_router` says when it cannot. :func:`add_norm_router` also
does the decoder layer's residual add and norm before it, in the same kernel.
"""

from __future__ import annotations

import functools

import attrs
import mlx.core as mx

from .fused import FLOATS, MAX_TOKENS, SMALL, _kernel, _plan, _scalar
from .ops import why_not_add_norm

ROUTER_WARPS = 8  # warps per block of the router kernels (one block per expert; its warps split the row)
#: Most experts the router kernels take: each of a block's warps keeps two float tables of every
#: expert's scores in shared memory (32 KB at 512 experts, within a kernel's 48 KB of static memory).
ROUTER_MAX_EXPERTS = 512


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
            ("K", top_k), ("NG", groups), ("TG", top_groups), ("NORM", norm), ("NW", ROUTER_WARPS), ("MT", MAX_TOKENS)]


def _gate_plan(gate) -> _GatePlan:
    if not isinstance(gate, _noaux_gates()) or type(gate).__call__ not in {c.__call__ for c in _noaux_gates()}:
        return _GatePlan("not mlx-lm's noaux_tc MoE gate")
    w, bias = gate.weight, gate.e_score_correction_bias
    if "scales" in gate or w.ndim != 2 or w.dtype not in FLOATS or bias.dtype not in FLOATS:
        return _GatePlan("router weight must be a plain float matrix")
    e, d = w.shape
    k, ng, tg = gate.top_k, gate.n_group, gate.topk_group
    if e > ROUTER_MAX_EXPERTS or not 1 <= k <= min(32, e):
        return _GatePlan(f"at most {ROUTER_MAX_EXPERTS} experts and 1 <= top_k <= 32")
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
    _, inds, scores = _launch("router", gate, x, [x], [])
    return inds, scores


def _launch(name: str, gate, x: mx.array, inputs: list, outputs: list) -> list:
    """Router kernel ``name`` on ``inputs`` and then the gate's weight, correction bias, scaling
    factor and a block counter of its own; its outputs are ``outputs`` ((shape, dtype) pairs) and then
    the logits, inds and scores. One block per expert; the last block to finish selects, all its
    threads sharing the tokens' experts."""
    plan = _plan(gate, _gate_plan)
    w, bias, rsf = plan.inputs
    experts, tokens = w.shape[0], x.size // plan.width
    done = mx.zeros((SMALL,), mx.uint32)  # this launch's own: MLX may run routings that share no array at once
    picks = (*x.shape[:-1], plan.top_k)
    return _kernel(name)(
        inputs=[*inputs, w, bias, rsf, done], template=router_template(x.dtype, *plan.spec),
        grid=(experts * 32 * ROUTER_WARPS, 1, 1), threadgroup=(32 * ROUTER_WARPS, 1, 1),
        output_shapes=[shape for shape, _ in outputs] + [(tokens, experts), picks, picks],
        output_dtypes=[dtype for _, dtype in outputs] + [mx.float32, mx.int32, mx.float32],
    )


#: Most tokens :func:`add_norm_router` takes: every block finds each token's norm and forms the
#: values of n itself, which measured slower than the two kernels for 8 tokens (32.5 against 26.5 us
#: in chained launches) and faster for one (18.0 against 6.4 + 14.6 us, ncu), both on an H100.
ADD_NORM_ROUTER_TOKENS = 1


def why_not_add_norm_router(gate, x: mx.array, r: mx.array, weight: mx.array) -> str | None:
    """``None`` if :func:`add_norm_router` can take these arrays, else why not."""
    if x.size // max(x.shape[-1], 1) > ADD_NORM_ROUTER_TOKENS:
        return f"more than {ADD_NORM_ROUTER_TOKENS} token(s): the add + norm and router kernels apart are faster"
    return why_not_add_norm(x, r, weight) or why_not_router(gate, x)


def add_norm_router(gate, x: mx.array, r: mx.array, weight: mx.array, eps: float):
    """``(h, n, inds, scores)``: ``h = x + r``, ``n = mx.fast.rms_norm(h, weight, eps)`` (as
    :func:`moedec.kernels.ops.add_rms_norm`) and ``fused_router(gate, n)``, in one kernel (check
    :func:`why_not_add_norm_router` first)."""
    h, n, _, inds, scores = _launch("router_norm", gate, x, [x, r, weight, _scalar(float(eps))],
                                    [(x.shape, x.dtype), (x.shape, x.dtype)])  # every block also finds each token's norm
    return h, n, inds, scores
