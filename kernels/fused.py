"""The fused MoE experts on MLX's CUDA backend (``mx.fast.cuda_kernel``; sources in ``cuda_source``,
``tensor_cores`` and ``cuda_cores``).

* :func:`fused_moe`: ``sum_k scores[.., k] * expert_k(x) (+ shared(x))`` in two kernels, each
  active expert's weights read once per forward however many tokens route to it.
* :func:`fused_switch_glu`: ``SwitchGLU(x, indices) -> [.., K, D]`` through the same kernels (every
  (token, expert) pair's output, no combine).

The router is in :mod:`.router`, the dense layers' kernel in :mod:`.dense`, the smaller ops (add +
RMSNorm, decode attention, copy, spin) in :mod:`.ops`; every kernel's signature is in
:data:`SIGNATURES` here.

Each ``why_not_*`` returns ``None`` when the kernel can run the call, else the reason it cannot;
callers fall back to mlx-lm's stock path.
"""

from __future__ import annotations

import functools

import attrs
import mlx.core as mx

from .cuda_cores import CUDA_CORES, DOWN, GATE_UP
from .attention_source import ATTENTION_QKV, ATTENTION_READ, ATTENTION_WRITE, ROPE
from .cuda_source import ADD_NORM, ASYNC, BASE, COPY, EMBED, MAD, RMS, SLOTS, SPIN, header
from .dense_source import DENSE_MMA, DENSE_NORM_MMA, DENSE_PAD_MMA
from .jit import kernel_text
from .router_source import ROUTER, ROUTER_NORM, SELECT
from .tensor_cores import DOWN_MMA, GATE_UP_MMA
from .tensor_cores import TENSOR_CORES as TENSOR_CORE_CODE

THREADS = 256  # 8 warps; also the most (token, expert) pairs one forward may have
WARPS = THREADS // 32
MAX_PAIRS = THREADS
MAX_TOKENS = 16  # decode and verify sizes; prefill keeps the stock path
MAX_EXPERTS = 1024
ROWS = 16  # output rows per block of the down kernels (their shared memory holds (P + T) x ROWS dots)
# The tensor-core kernels (4-bit experts, 16-bit activations): inputs per ring stage (512 or 256) and
# ring depth per warp; measured on an H200 (docs/benchmarks.md).
TENSOR_CORES = True  # else every expert layer runs on the CUDA-core kernels
# The gate/up ring by the forward's token count, (from this many tokens, slice, stages): from 4 tokens on,
# narrower slices in a deeper ring measured 1.06-1.25x faster (H200, T = 4..16) and 2-6 % slower at T = 1, 2.
GATE_UP_RING = ((1, 512, 2), (4, 256, 3))
DOWN_SLICE, DOWN_STAGES = 256, 2
GATE_UP_BLOCKS = 264  # blocks of the gate/up kernels (two per SM of an H100/H200); warps stride over the items
# The CUDA-core kernels (8-bit experts or float32 activations).
RT_GATE_UP = 1  # expert rows n per warp item of the gate/up kernel (each a gate and an up row)
RT_DOWN = 4  # down rows per warp item (they share each activation load)
TB = 2  # tokens per pass over an item's rows
STAGES = 3  # ring depth (fewer when the rows are wide)
SMEM_BUDGET = 160 * 1024  # dynamic shared memory per block for the rings (static: <= 48 KB)
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
FLOATS = (mx.bfloat16, mx.float16, mx.float32)


#: kernel -> (input names, output names, body, header)
_GATE_UP_IO = (["x", "inds", "meta", "wg", "sg", "bg", "wu", "su", "bu", "hg", "hsg", "hbg", "hu", "hsu", "hbu"], ["act"])
_DOWN_IO = (["act", "inds", "scores", "meta", "wd", "sd", "bd", "hd", "hsd", "hbd", "res"], ["y"])
SIGNATURES = {
    "router": (["x", "w", "bias", "rsf", "done"], ["logits", "inds", "scores"], ROUTER, header(BASE, SELECT)),
    "router_norm": (["x", "r", "gw", "eps", "w", "bias", "rsf", "done"], ["h", "n", "logits", "inds", "scores"],
                    ROUTER_NORM, header(BASE, RMS, SELECT)),
    "gate_up": (*_GATE_UP_IO, GATE_UP, header(BASE, ASYNC, CUDA_CORES, SLOTS)),
    "down": (*_DOWN_IO, DOWN, header(BASE, ASYNC, CUDA_CORES, SLOTS)),
    "gate_up_mma": (*_GATE_UP_IO, GATE_UP_MMA, header(BASE, ASYNC, TENSOR_CORE_CODE, SLOTS)),
    "down_mma": (*_DOWN_IO, DOWN_MMA, header(BASE, ASYNC, TENSOR_CORE_CODE, SLOTS)),
    "dense_mma": (["x", "w", "sc", "bi"], ["y"], DENSE_MMA, header(BASE, ASYNC, TENSOR_CORE_CODE)),
    "dense_norm_mma": (["x", "w", "sc", "bi", "nw", "eps"], ["y"], DENSE_NORM_MMA, header(BASE, RMS, ASYNC, TENSOR_CORE_CODE)),
    "dense_pad_mma": (["x", "w", "sc", "bi"], ["y"], DENSE_PAD_MMA, header(BASE, ASYNC, TENSOR_CORE_CODE)),
    "attention": (["q", "k", "v", "offset", "scale"], ["o"], ATTENTION_READ, header(BASE)),
    "attention_write": (["q", "k", "v", "kn", "vn", "offset", "scale"], ["o"], ATTENTION_WRITE, header(BASE)),
    "attention_qkv": (["qkv", "k", "v", "offset", "scale", "rope"], ["o"], ATTENTION_QKV, header(BASE, ROPE)),
    "add_norm": (["x", "r", "w", "eps"], ["h", "n"], ADD_NORM, header(BASE, RMS)),
    "embed": (["ids", "w", "sc", "bi"], ["out"], EMBED, header(BASE, MAD)),
    "copy": (["src"], ["dst"], COPY, ""),
    "spin": (["ns"], ["out"], SPIN, ""),
}


@functools.lru_cache(maxsize=None)
def _kernel(name: str, shared_memory: int = 0):
    """Kernel ``name`` of :data:`SIGNATURES`, its source handed over as :func:`.jit.kernel_text` does."""
    inputs, outputs, source, head = SIGNATURES[name]
    head, body = kernel_text(name, inputs, head, source)
    return mx.fast.cuda_kernel(name=f"moedec_{name}", input_names=inputs, output_names=outputs, source=body,
                               header=head, shared_memory=shared_memory)


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
    """``build(module)``, computed on the first call and kept on the module with the arrays it was
    built from (the module's parameters once built); :func:`refresh` drops it when they change,
    and ``patch()`` calls that, :func:`forget` drops it in any case."""
    plan = module.__dict__.get("_moedec_plan")
    if plan is None:
        plan = module.__dict__["_moedec_plan"] = build(module)
        module.__dict__["_moedec_plan_of"] = _arrays(module)
    return plan


def _arrays(module) -> tuple:
    from mlx.utils import tree_flatten

    return tuple(a for _, a in tree_flatten(module.parameters()))


def forget(module) -> None:
    module.__dict__.pop("_moedec_plan", None)
    module.__dict__.pop("_moedec_plan_of", None)


def refresh(module) -> None:
    """Drop ``module``'s plan if its parameters are no longer the arrays the plan was built from
    (a plan that joined weights, as the q/k/v one, is then not built twice over the same weights)."""
    built = module.__dict__.get("_moedec_plan_of")
    if built is None:
        return
    now = _arrays(module)
    if len(now) != len(built) or any(a is not b for a, b in zip(now, built)):
        forget(module)


@attrs.frozen
class _SwitchPlan:
    reason: str | None  # why the weights cannot go to the kernels, or None
    arrays: tuple = ()  # gate (w, scales, biases), up (...), down (...)
    scales: object = None  # the scales' dtype
    bits: int = 0
    group: int = 0
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
    return _SwitchPlan(None, arrays, g.scales.dtype, g.bits, g.group_size, experts, n)


@attrs.frozen
class ExpertKernels:
    """Which gate/up and down kernels run experts of one shape, with their template arguments and
    dynamic shared memory (bytes; 0: a warp's ring does not fit)."""

    gate_up_name: str
    gate_up: list
    gate_up_smem: int
    down_name: str
    down: list
    down_smem: int

    @property
    def fits(self) -> bool:
        return self.gate_up_smem > 0 and self.down_smem > 0


# MLX lets a kernel use more than 48 KB of shared memory (static + dynamic) only when its dynamic
# request is above 48000 bytes; the expert kernels' static tables plus their rings exceed 48 KB.
OPT_IN = 48 * 1024 + 16


def mma_stage(ks: int, scale_bytes: int) -> int:
    """Bytes of one ring stage of the tensor-core kernels (``MStage``): 16 packed 4-bit rows of ``ks``
    inputs, and their scales and biases (``ks / 32`` of each per row, ``scale_bytes`` each)."""
    return 8 * ks + ks * scale_bytes


def _stages(stage: int, most: int) -> tuple[int, int]:
    """(stages, dynamic shared memory bytes) of a block's rings: WARPS warps of up to ``most``
    stages of ``stage`` bytes within SMEM_BUDGET; 0 bytes when not even one stage fits."""
    stages = min(most, SMEM_BUDGET // (WARPS * stage))
    return max(stages, 1), stages and max(stages * WARPS * stage, OPT_IN)


def _mma_slice(din: int, most: int, group: int, scale_bytes: int) -> int:
    """Inputs per ring stage of a tensor-core kernel over rows of ``din`` inputs (0: unsuitable):
    whole groups per slice, and each row's scales of a slice copied in aligned units."""
    for ks in (512, 256):
        sb = ks // group * scale_bytes  # a row's scale bytes per slice
        if ks <= most and din % ks == 0 and (din // group * scale_bytes) % min(16, sb) == 0:
            return ks
    return 0


def expert_kernels(x_dtype, scales_dtype, bits: int, d: int, n: int, group: int, tokens: int = 1) -> ExpertKernels:
    """The gate/up and down kernels for experts ``d -> n`` in a forward of ``tokens`` tokens and their
    launch constants (what :mod:`moedec.kernels.resources` compiles too). Few variants: each is
    JIT-compiled (the token count only picks a row of GATE_UP_RING).

    4-bit experts with bfloat16/float16 activations run on the tensor cores (``*_mma``); the rest
    (8-bit, float32) on the CUDA cores, both reading each active expert once per forward."""
    ring = max(r for r in GATE_UP_RING if r[0] <= max(tokens, 1))
    return _expert_kernels(x_dtype, scales_dtype, bits, d, n, group, ring[1:])


@functools.lru_cache(maxsize=64)
def _expert_kernels(x_dtype, scales_dtype, bits: int, d: int, n: int, group: int, gate_up_ring: tuple) -> ExpertKernels:
    sb = scales_dtype.size
    base = [("X", x_dtype), ("S", scales_dtype)]
    gks, dks = _mma_slice(d, gate_up_ring[0], group, sb), _mma_slice(n, DOWN_SLICE, group, sb)
    if TENSOR_CORES and bits == 4 and x_dtype in (mx.bfloat16, mx.float16) and gks and dks and d % ROWS == 0:
        (gs, gb), (ds, db) = _stages(mma_stage(gks, sb), gate_up_ring[1]), _stages(mma_stage(dks, sb), DOWN_STAGES)
        return ExpertKernels(
            "gate_up_mma", base + [("DIN", d), ("NOUT", n), ("GROUP", group), ("KS", gks), ("STAGES", gs)], gb,
            "down_mma", base + [("DIN", n), ("NOUT", d), ("GROUP", group), ("KS", dks), ("STAGES", ds), ("ROWS", ROWS)],
            db,
        )

    def ring(rows: int, din: int) -> int:  # one stage of the CUDA-core kernels (see Stage)
        return rows * -(-(din * bits // 128) // 32) * 32 * (17 + 4 * sb)

    (gs, gb), (ds, db) = _stages(ring(2 * RT_GATE_UP, d), STAGES), _stages(ring(RT_DOWN, n), STAGES)
    common = base + [("BITS", bits), ("TB", TB)]
    return ExpertKernels(
        "gate_up", common + [("DIN", d), ("NOUT", n), ("RT", RT_GATE_UP), ("STAGES", gs)], gb,
        "down", common + [("DIN", n), ("NOUT", d), ("RT", RT_DOWN), ("STAGES", ds), ("ROWS", ROWS)], db,
    )


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
    if not expert_kernels(x.dtype, plan.scales, plan.bits, x.shape[-1], plan.width, plan.group, tokens).fits:
        return "expert rows too wide for the kernels' shared-memory rings"
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


def fused_moe(switch, x: mx.array, inds: mx.array, scores: mx.array, shared=None, per_pair: bool = False,
              residual: mx.array | None = None) -> mx.array:
    """``x [.., D]``, ``inds``/``scores [.., K]`` -> ``[.., D]`` in ``x.dtype``: the routed experts
    combined with ``scores`` (float32 sums in pair order), plus ``shared(x)`` if given (fused: check
    :func:`why_not_fused` and :func:`why_not_shared` first), plus ``residual`` (``[.., D]``, added to
    the rounded sum, as ``residual + moe(x)``) if given. ``per_pair``: no combine, ``[P, D]`` with
    every (token, expert) pair's expert output (``scores`` unused)."""
    plan = _plan(switch, _switch_plan)
    wg, sg, bg, wu, su, bu, wd, sd, bd = plan.arrays
    h = _shared_plan_of(switch, shared).arrays if shared is not None else plan.arrays
    d, n = x.shape[-1], plan.width
    p = inds.size
    t = p // inds.shape[-1]
    if inds.dtype not in (mx.int32, mx.uint32):
        inds = inds.astype(mx.int32)
    if scores.dtype != mx.float32:
        scores = scores.astype(mx.float32)
    meta = _meta(shared is not None, per_pair, residual is not None)
    ek = expert_kernels(x.dtype, plan.scales, plan.bits, d, n, plan.group, t)
    (act,) = _kernel(ek.gate_up_name, ek.gate_up_smem)(
        inputs=[x, inds, meta, wg, sg, bg, wu, su, bu, *h[:6]],
        template=ek.gate_up,
        grid=(GATE_UP_BLOCKS * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(p + t * (shared is not None), n)],
        output_dtypes=[x.dtype],
    )  # [P (+T), N]: row p = pair p, row P + t = token t's shared expert
    (y,) = _kernel(ek.down_name, ek.down_smem)(
        inputs=[act, inds, scores, meta, wd, sd, bd, *h[6:], x if residual is None else residual],
        template=ek.down,
        grid=(-(-d // ROWS) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(p, d) if per_pair else x.shape],
        output_dtypes=[x.dtype],
    )  # [.., D] ([P, D] per pair)
    return y


def fused_switch_glu(switch, x: mx.array, indices: mx.array) -> mx.array:
    """``SwitchGLU(x, indices)``: ``[.., D], [.., K] -> [.., K, D]``, each active expert read once."""
    d = x.shape[-1]
    y = fused_moe(switch, x, indices, _ones(indices.shape), per_pair=True)  # [P, D]
    return y.reshape(*indices.shape, d)


#: Elements of a kernel's small input arrays (scalars, the offset, the router's counter): MLX keeps
#: arrays of at most 8 bytes in one unified-memory pool that the host reads too (every token id), so
#: a kernel may reach them across the bus (atomics on one cost ~1 us each: docs/benchmarks.md); 16
#: bytes get memory of their own, which stays on the GPU once a kernel has touched it.
SMALL = 4


@functools.lru_cache(maxsize=64)
def _scalar(*values: float) -> mx.array:
    """A kernel's small float32 input (``values`` from element 0), padded to :data:`SMALL` elements;
    made once per value (a new array from the host would be paged over to the GPU on every call)."""
    assert 1 <= len(values) <= SMALL
    return mx.array(list(values) + [0.0] * (SMALL - len(values)), mx.float32)


@functools.lru_cache(maxsize=8)
def _meta(shared: bool, per_pair: bool, residual: bool = False) -> mx.array:
    """The expert kernels' flags: fuse the shared expert; write every pair's output (no combine);
    add the residual input."""
    return mx.array([int(shared), int(per_pair), int(residual)], mx.int32)


@functools.lru_cache(maxsize=16)
def _ones(shape: tuple) -> mx.array:
    return mx.ones(shape, mx.float32)
