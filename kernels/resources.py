"""What each fused MoE kernel costs in registers, spills and shared memory, found without a GPU.

:func:`kernel_source` builds a kernel's translation unit the way ``mx.fast.cuda_kernel`` does (its
generated signature and template constants around our header and body); :func:`resources`
compiles it with ``nvcc -Xptxas -v`` for sm_90a and returns ptxas' report; :func:`occupancy` turns
that into blocks per SM of an H100/H200 (65536 registers, 228 KB shared memory, 2048 threads).
``examples/kernel_resources.py`` prints it for the synthetic model's shapes.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx

from . import fused
from .dense import dense_kernel, dense_norm_kernel
from .jit import kernel_text
from .router import router_template

CUDA_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half", "int32": "int32_t",
              "uint32": "uint32_t"}

# What MLX's default header (mlx/backend/cuda/device/utils.cuh) brings in, and its Shape/Strides.
PRELUDE = """#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/complex>
#include <cuda/std/cstdint>
#include <cuda/std/limits>
#include <cuda/std/tuple>
#include <cuda/std/type_traits>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


def kernel_source(name: str, template: list, dtypes: dict[str, str], include: bool | None = None) -> str:
    """The translation unit MLX's ``cuda_kernel`` compiles for kernel ``name`` of
    :data:`fused.SIGNATURES` (see ``build_kernel`` in MLX's ``custom_kernel.cpp``): inputs and outputs
    typed by ``dtypes`` (name -> dtype; weights default to uint32), shape/strides/ndim parameters
    only for inputs whose ``<name>_shape`` etc. appear in the body, the template as constants;
    ``include``: the sources as :func:`.jit.kernel_text` hands them over (default: as MLX gets them)."""
    inputs, outputs, body, head = fused.SIGNATURES[name]
    head, body = kernel_text(name, inputs, head, body, include)
    params = []
    for n in inputs:
        params.append(f"const {CUDA_TYPES[dtypes.get(n, 'uint32')]}* {n}")
        for suffix, kind in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
            if f"{n}_{suffix}" in body:
                params.append(f"const __grid_constant__ {kind} {n}_{suffix}")
    params += [f"{CUDA_TYPES[dtypes[n]]}* {n}" for n in outputs]
    consts = []
    for k, v in template:
        if isinstance(v, bool):
            consts.append(f"  constexpr bool {k} = {'true' if v else 'false'};")
        elif isinstance(v, int):
            consts.append(f"  constexpr int {k} = {v};")
        else:  # an mx.Dtype
            consts.append(f"  using {k} = {CUDA_TYPES[str(v).rsplit('.', 1)[-1]]};")
    return (PRELUDE + head + "\nnamespace mlx::core::cu {\n__global__ void " + name + "(\n    "
            + ",\n    ".join(params) + ") {\n" + "\n".join(consts) + "\n" + body + "\n}\n}\n")


def kernel_dtypes(x_dtype=mx.bfloat16) -> dict[str, str]:
    """The dtype of each named kernel input and output (weights: uint32, the default of
    :func:`kernel_source`) for ``x_dtype`` activations and bf16 scales."""
    xt = str(x_dtype).rsplit(".", 1)[-1]
    halves = dict.fromkeys(["w", "bias", "sc", "bi", "sg", "bg", "su", "bu", "hsg", "hbg", "hsu", "hbu", "sd", "bd", "hsd", "hbd"],
                           "bfloat16")
    acts = ["x", "act", "y", "res", "r", "h", "n", "q", "k", "v", "kn", "vn", "o", "kc", "vc", "qkv"]
    return {**halves, **dict.fromkeys(acts, xt), "inds": "int32", "meta": "int32", "offset": "int32",
            **dict.fromkeys(["rsf", "scores", "logits", "scale", "rope", "eps"], "float32")}


def variants(bits: int, d: int, n: int, experts: int, top_k: int, group: int = 64,
             x_dtype=mx.bfloat16) -> dict[str, tuple[str, int]]:
    """Each kernel's (source, dynamic shared memory) for ``x_dtype`` activations, bf16 scales,
    ``bits``-bit experts ``d -> n`` in groups of ``group``."""
    xt = str(x_dtype).rsplit(".", 1)[-1]
    dtypes = kernel_dtypes(x_dtype)
    bf16 = mx.bfloat16
    ek = fused.expert_kernels(x_dtype, bf16, bits, d, n, group)
    many = fused.expert_kernels(x_dtype, bf16, bits, d, n, group, tokens=fused.MAX_TOKENS)  # the widest forward's ring
    dense = {}
    if bits == 4 and x_dtype != mx.float32:  # the dense kernel over rows of d inputs (weights of x's dtype)
        template, smem = dense_kernel(x_dtype, d, n, group)
        if smem:
            dense["dense"] = (kernel_source("dense_mma", template, {**dtypes, "w": "uint32", "sc": xt, "bi": xt}), smem)
        template, smem = dense_norm_kernel(x_dtype, d, n, group)
        if smem:
            dense["dense_norm"] = (kernel_source("dense_norm_mma", template, {**dtypes, "w": "uint32", "sc": xt, "bi": xt,
                                                                              "nw": xt, "eps": "float32"}), smem)
    return {
        **dense,
        "gate_up": (kernel_source(ek.gate_up_name, ek.gate_up, dtypes), ek.gate_up_smem),
        **({"gate_up_many": (kernel_source(many.gate_up_name, many.gate_up, dtypes), many.gate_up_smem)}
           if many.gate_up != ek.gate_up else {}),
        "down": (kernel_source(ek.down_name, ek.down, dtypes), ek.down_smem),
        "add_norm": (kernel_source("add_norm", [("X", x_dtype), ("D", d)], {**dtypes, "w": xt, "eps": "float32"}), 0),
        "router": (kernel_source("router", router_template(x_dtype, bf16, bf16, d, experts, top_k, 1, 1, True), dtypes), 0),
        "router_norm": (kernel_source("router_norm", router_template(x_dtype, bf16, bf16, d, experts, top_k, 1, 1, True),
                                      {**dtypes, "gw": xt}), 0),
        "embed": (kernel_source("embed", [("X", x_dtype), ("D", d), ("GROUP", group), ("BITS", bits)],
                                {**dtypes, "ids": "uint32", "w": "uint32", "sc": xt, "bi": xt, "out": xt}), 0),
    }


def resources(source: str, cccl: str | None = None) -> str:
    """ptxas' resource lines for ``source`` (or the compiler's errors), compiled for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "k.cu"
        cu.write_text(source)
        cmd = ["nvcc", "-arch=sm_90a", "-cubin", "-std=c++17", "-Xptxas", "-v", "-o", str(Path(tmp) / "k.cubin"), str(cu)]
        if cccl:
            cmd[1:1] = ["-I", cccl]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            return "compile failed:\n" + run.stderr[-3000:]
        lines = [l.split("ptxas info    : ")[-1] for l in run.stderr.splitlines() if "Used" in l or "spill" in l]
        return "\n".join(lines)


def occupancy(report: str, threads: int = fused.THREADS, dynamic: int = 0) -> str:
    """Blocks of ``threads`` per SM that the registers and (static, from ``report``, plus
    ``dynamic``) shared memory allow."""
    regs = re.search(r"Used (\d+) registers", report)
    smem = re.search(r"(\d+) bytes smem", report)
    if not regs:
        return ""
    r, s = int(regs.group(1)), (int(smem.group(1)) if smem else 0) + dynamic
    by_regs = 65536 // (((r + 7) // 8 * 8) * threads)
    by_smem = (228 * 1024) // max(s + 1024, 1)
    blocks = min(by_regs, by_smem, 2048 // threads)
    return f"-> {blocks} blocks of {threads} threads per SM ({blocks * threads // 32} warps): registers allow {by_regs}, shared memory {by_smem}"
