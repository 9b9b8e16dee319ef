"""The fused MoE block on MLX's CUDA backend (``mx.fast.cuda_kernel``; source in ``cuda_source``).

* :func:`fused_router`: mlx-lm's ``noaux_tc`` gate in one kernel -> ``(inds [.., K] int32, scores
  [.., K] float32)``.
* :func:`fused_moe`: ``sum_k scores[.., k] * expert_k(x) (+ shared(x))`` in two kernels, each
  active expert's weights read once per forward however many tokens route to it.
* :func:`fused_switch_glu`: ``SwitchGLU(x, indices) -> [.., K, D]`` through the same kernels (each
  (token, expert) pair is its own row with weight 1).

Each ``why_not_*`` returns ``None`` when the kernel can run the call, else the reason it cannot;
callers fall back to mlx-lm's stock path.
"""

from __future__ import annotations

import functools

import attrs
import mlx.core as mx

from .cuda_source import COPY, DOWN, GATE_UP, HEADER, ROUTER

THREADS = 256  # 8 warps; also the most (token, expert) pairs one forward may have
WARPS = THREADS // 32
MAX_PAIRS = THREADS
MAX_TOKENS = 16  # decode and verify sizes; prefill keeps the stock path
MAX_EXPERTS = 1024
ROWS = 16  # output rows per block of the down kernel (its shared memory holds P x ROWS dots)
R = 4  # down rows per warp item (they share each activation load)
TB = 2  # tokens per pass over a slot's weight row
CHUNK_UNROLL = 0  # unroll of the kernels' loop over a row's chunks (0: full; fewer registers below that)
GATE_UP_BLOCKS = 528  # blocks of the gate/up kernel; their warps stride over the (slot, row) items
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
FLOATS = (mx.bfloat16, mx.float16, mx.float32)


#: kernel -> (input names, output names, body)
SIGNATURES = {
    "router": (["x", "w", "bias", "rsf"], ["inds", "scores"], ROUTER),
    "gate_up": (["x", "inds", "meta", "wg", "sg", "bg", "wu", "su", "bu", "hg", "hsg", "hbg", "hu", "hsu", "hbu"],
                ["act"], GATE_UP),
    "down": (["act", "inds", "scores", "meta", "wd", "sd", "bd", "hd", "hsd", "hbd"], ["y"], DOWN),
    "copy": (["src"], ["dst"], COPY),
}


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    inputs, outputs, source = SIGNATURES[name]
    return mx.fast.cuda_kernel(name=f"moedec_{name}", input_names=inputs, output_names=outputs,
                               source=_minify(source), header=_minify(HEADER))


def _minify(src: str) -> str:
    """Source without comments and indentation: MLX hashes the whole source on every launch."""
    lines = (l.split("//")[0].strip() for l in src.splitlines())
    return "\n".join(l for l in lines if l)


# -- experts ---------------------------------------------------------------------------------------


def _layers(switch):
    return switch.gate_proj, switch.up_proj, switch.down_proj


def _why_not_quant(layers) -> str | None:
    if not all(hasattr(l, "scales") for l in layers):
        return "expert weights are not quantized"
    if any(getattr(l, "mode", "affine") != "affine" for l in layers):
        return "only affine quantization is supported"
    if any("bias" in l for l in layers) or any("biases" not in l for l in layers):
        return "expert layers with a bias, or without quantization biases, are not supported"
    if len({l.bits for l in layers}) != 1 or layers[0].bits not in SUPPORTED_BITS:
        return f"bits must be one of {SUPPORTED_BITS}"
    if len({l.group_size for l in layers}) != 1 or layers[0].group_size not in SUPPORTED_GROUPS:
        return f"group size must be one of {SUPPORTED_GROUPS}"
    if len({l.scales.dtype for l in layers}) != 1 or layers[0].scales.dtype not in FLOATS:
        return "scales must share one float dtype"
    return None


def _plan(module, build):
    """``build(module)``, computed on the first call and kept on the module (its weights and
    structure do not change between calls; :func:`forget` drops it, and ``patch()`` calls that)."""
    plan = module.__dict__.get("_moedec_plan")
    if plan is None:
        plan = module.__dict__["_moedec_plan"] = build(module)
    return plan


def forget(module) -> None:
    module.__dict__.pop("_moedec_plan", None)


@attrs.frozen
class _SwitchPlan:
    reason: str | None  # why the weights cannot go to the kernels, or None
    arrays: tuple = ()  # gate (w, scales, biases), up (...), down (...)
    scales: object = None  # the scales' dtype
    bits: int = 0
    experts: int = 0
    width: int = 0  # N, the expert's intermediate width


def _switch_plan(switch) -> _SwitchPlan:
    layers = _layers(switch)
    reason = _why_not_quant(layers)
    if reason is None and type(switch.activation).__name__ != "SwiGLU":
        reason = "activation is not SwiGLU"
    if reason:
        return _SwitchPlan(reason)
    g = layers[0]
    experts, n = g.weight.shape[:2]
    if experts > MAX_EXPERTS:
        return _SwitchPlan(f"more than {MAX_EXPERTS} experts")
    if n % 128:
        return _SwitchPlan("the expert width must be a multiple of 128")
    arrays = tuple(a for l in layers for a in (l.weight, l.scales, l.biases))
    return _SwitchPlan(None, arrays, g.scales.dtype, g.bits, experts, n)


def expert_templates(x_dtype, scales_dtype, bits: int, d: int, n: int) -> tuple[list, list]:
    """Template arguments of the gate/up and down kernels for experts ``d -> n`` (what
    :mod:`moedec.kernels.resources` compiles too). Few variants: each is JIT-compiled."""
    common = [("X", x_dtype), ("S", scales_dtype), ("BITS", bits), ("TB", TB), ("CHUNK_UNROLL", CHUNK_UNROLL)]
    return common + [("DIN", d), ("NOUT", n)], common + [("DIN", n), ("NOUT", d), ("ROWS", ROWS), ("R", R)]


def why_not_fused(switch, x: mx.array, indices: mx.array) -> str | None:
    """``None`` if :func:`fused_moe` / :func:`fused_switch_glu` can run this call, else why not."""
    plan = _plan(switch, _switch_plan)
    if plan.reason:
        return plan.reason
    if x.dtype not in FLOATS:
        return "activations must be bfloat16, float16 or float32"
    tokens = x.size // x.shape[-1]
    if tokens > MAX_TOKENS or indices.size > MAX_PAIRS:
        return f"more than {MAX_TOKENS} tokens or {MAX_PAIRS} (token, expert) pairs (prefill keeps the stock path)"
    if indices.size // indices.shape[-1] != tokens:
        return "indices and activations disagree on the number of tokens"
    if x.shape[-1] % 128:
        return "the hidden width must be a multiple of 128"
    return None


@attrs.frozen
class _SharedPlan:
    switch: int  # id() of the SwitchGLU the shared expert was checked against
    reason: str | None
    arrays: tuple = ()


def why_not_shared(switch, shared) -> str | None:
    """``None`` if the shared expert MLP can be fused as one more slot of ``switch``."""
    return "no shared expert" if shared is None else _shared_plan_of(switch, shared).reason


def _shared_plan_of(switch, shared) -> _SharedPlan:
    plan = _plan(shared, lambda m: _shared_plan(switch, m))
    if plan.switch != id(switch):  # checked against another switch: check again
        forget(shared)
        plan = _plan(shared, lambda m: _shared_plan(switch, m))
    return plan


def _shared_plan(switch, shared) -> _SharedPlan:
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(hasattr(shared, a) for a in names):
        return _SharedPlan(id(switch), "no gate/up/down shared expert")
    if type(shared).__call__ not in _swiglu_mlp_calls():
        return _SharedPlan(id(switch), "shared expert is not one of mlx-lm's SwiGLU MLPs")
    hl, rl = [getattr(shared, a) for a in names], _layers(switch)
    reason = _why_not_quant(hl) or _why_not_quant(rl)
    if not reason and (hl[0].bits, hl[0].group_size, hl[0].scales.dtype) != (rl[0].bits, rl[0].group_size, rl[0].scales.dtype):
        reason = "shared and routed experts are quantized differently"
    if not reason and (hl[0].weight.shape != rl[0].weight.shape[1:] or hl[2].weight.shape != rl[2].weight.shape[1:]):
        reason = "shared and routed experts have different widths"
    if reason:
        return _SharedPlan(id(switch), reason)
    return _SharedPlan(id(switch), None, tuple(a for l in hl for a in (l.weight, l.scales, l.biases)))


@functools.lru_cache(maxsize=None)
def _swiglu_mlp_calls() -> frozenset:
    """``__call__`` of mlx-lm's shared-expert MLPs that compute ``down(silu(gate(x)) * up(x))``."""
    from mlx_lm.models import deepseek_v3, glm4_moe

    return frozenset({glm4_moe.MLP.__call__, deepseek_v3.DeepseekV3MLP.__call__})


def fused_moe(switch, x: mx.array, inds: mx.array, scores: mx.array, shared=None) -> mx.array:
    """``x [.., D]``, ``inds``/``scores [.., K]`` -> ``[.., D]`` in ``x.dtype``: the routed experts
    combined with ``scores`` (float32 sums in pair order), plus ``shared(x)`` if given (fused: check
    :func:`why_not_fused` and :func:`why_not_shared` first)."""
    plan = _plan(switch, _switch_plan)
    wg, sg, bg, wu, su, bu, wd, sd, bd = plan.arrays
    h = _shared_plan_of(switch, shared).arrays if shared is not None else plan.arrays
    d, e, n = x.shape[-1], plan.experts, plan.width
    p = inds.size
    t = p // inds.shape[-1]
    if inds.dtype not in (mx.int32, mx.uint32):
        inds = inds.astype(mx.int32)
    if scores.dtype != mx.float32:
        scores = scores.astype(mx.float32)
    meta = _int(int(shared is not None))
    slots = min(p, e) + (shared is not None)
    gate_up_template, down_template = expert_templates(x.dtype, plan.scales, plan.bits, d, n)
    (act,) = _kernel("gate_up")(
        inputs=[x, inds, meta, wg, sg, bg, wu, su, bu, *h[:6]],
        template=gate_up_template,
        grid=(min(GATE_UP_BLOCKS, -(-slots * n // (2 * WARPS))) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(p + t * (shared is not None), n)],
        output_dtypes=[mx.float32],
    )  # [P (+T), N]: row p = pair p, row P + t = token t's shared expert
    (y,) = _kernel("down")(
        inputs=[act, inds, scores, meta, wd, sd, bd, *h[6:]],
        template=down_template,
        grid=(-(-d // ROWS) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )  # [.., D]
    return y


def fused_switch_glu(switch, x: mx.array, indices: mx.array) -> mx.array:
    """``SwitchGLU(x, indices)``: ``[.., D], [.., K] -> [.., K, D]``, each active expert read once."""
    k, d = indices.shape[-1], x.shape[-1]
    pairs = indices.reshape(-1, 1)  # [P, 1]: every pair its own row
    xp = mx.repeat(x.reshape(-1, d), k, axis=0)  # [P, D]
    y = fused_moe(switch, xp, pairs, mx.ones(pairs.shape, mx.float32))  # [P, D]
    return y.reshape(*indices.shape, d)


# -- router ----------------------------------------------------------------------------------------


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


def router_template(x_dtype, w_dtype, bias_dtype, d: int, experts: int, top_k: int, groups: int,
                    top_groups: int, norm: bool) -> list:
    """Template arguments of the router kernel (what :mod:`moedec.kernels.resources` compiles too)."""
    logit = x_dtype if x_dtype == w_dtype else mx.float32  # dtype of mlx-lm's x @ w.T
    return [("X", x_dtype), ("R", logit), ("W", w_dtype), ("B", bias_dtype), ("DIN", d), ("NE", experts),
            ("K", top_k), ("NG", groups), ("TG", top_groups), ("NORM", norm)]


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
    return None


@functools.lru_cache(maxsize=64)
def _scalar(v: float) -> mx.array:
    return mx.array([v], mx.float32)


@functools.lru_cache(maxsize=8)
def _int(v: int) -> mx.array:
    return mx.array([v], mx.int32)


def fused_router(gate, x: mx.array) -> tuple[mx.array, mx.array]:
    """mlx-lm's ``MoEGate(x)`` in one kernel: ``x [.., D]`` -> ``inds [.., K] int32``, ``scores [.., K] float32``."""
    plan = _plan(gate, _gate_plan)
    inds, scores = _kernel("router")(
        inputs=[x, *plan.inputs],
        template=router_template(x.dtype, *plan.spec),
        grid=(x.size // plan.width * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(*x.shape[:-1], plan.top_k)] * 2,
        output_dtypes=[mx.int32, mx.float32],
    )
    return inds, scores


def copy(src: mx.array) -> mx.array:
    """A uint4-wide device copy of a uint32 array (for measuring copy bandwidth)."""
    n = src.size // 4
    (dst,) = _kernel("copy")(
        inputs=[src], template=[], grid=(min(n, 132 * 2048 * 4) // THREADS * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1), output_shapes=[src.shape], output_dtypes=[src.dtype],
    )
    return dst
