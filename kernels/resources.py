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

from . import cuda_source as src
from . import fused

CUDA_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half", "int32": "int32_t",
              "uint32": "uint32_t"}

PRELUDE = """#include <cuda/std/array>
#include <cstdint>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


def kernel_source(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], template: list,
                  body: str, header: str) -> str:
    """The translation unit MLX's ``cuda_kernel`` compiles (see ``build_kernel`` in MLX's
    ``custom_kernel.cpp``): shapes/strides/ndim parameters only for inputs whose ``<name>_shape`` etc.
    appear in the body."""
    params = []
    for n, t in inputs:
        params.append(f"const {CUDA_TYPES[t]}* {n}")
        if f"{n}_shape" in body:
            params.append(f"const __grid_constant__ Shape {n}_shape")
        if f"{n}_strides" in body:
            params.append(f"const __grid_constant__ Strides {n}_strides")
        if f"{n}_ndim" in body:
            params.append(f"const __grid_constant__ int {n}_ndim")
    params += [f"{CUDA_TYPES[t]}* {n}" for n, t in outputs]
    consts = []
    for k, v in template:
        if isinstance(v, bool):
            consts.append(f"  constexpr bool {k} = {'true' if v else 'false'};")
        elif isinstance(v, int):
            consts.append(f"  constexpr int {k} = {v};")
        else:
            consts.append(f"  using {k} = {CUDA_TYPES[v]};")
    return (PRELUDE + fused._minify(header) + "\nnamespace mlx::core::cu {\n__global__ void " + name + "(\n    "
            + ",\n    ".join(params) + ") {\n" + "\n".join(consts) + "\n" + fused._minify(body) + "\n}\n}\n")


def variants(bits: int, d: int, n: int, experts: int, top_k: int) -> dict[str, str]:
    """The three kernels' sources for bf16 activations and scales, ``bits``-bit experts ``d -> n``."""
    common = [("X", "bfloat16"), ("S", "bfloat16"), ("BITS", bits), ("TB", fused.TB)]
    gate_up_in = [("x", "bfloat16"), ("inds", "int32"), ("meta", "int32"),
                  ("wg", "uint32"), ("sg", "bfloat16"), ("bg", "bfloat16"), ("wu", "uint32"), ("su", "bfloat16"),
                  ("bu", "bfloat16"), ("hg", "uint32"), ("hsg", "bfloat16"), ("hbg", "bfloat16"), ("hu", "uint32"),
                  ("hsu", "bfloat16"), ("hbu", "bfloat16")]
    down_in = [("act", "float32"), ("inds", "int32"), ("scores", "float32"), ("meta", "int32"),
               ("wd", "uint32"), ("sd", "bfloat16"), ("bd", "bfloat16"), ("hd", "uint32"), ("hsd", "bfloat16"),
               ("hbd", "bfloat16")]
    router_in = [("x", "bfloat16"), ("w", "bfloat16"), ("bias", "bfloat16"), ("rsf", "float32")]
    return {
        "gate_up": kernel_source("gate_up", gate_up_in, [("act", "float32")],
                                 common + [("DIN", d), ("NOUT", n)], src.GATE_UP, src.HEADER),
        "down": kernel_source("down", down_in, [("y", "bfloat16")],
                              common + [("DIN", n), ("NOUT", d), ("ROWS", fused.ROWS), ("R", fused.R)], src.DOWN, src.HEADER),
        "router": kernel_source("router", router_in, [("inds", "int32"), ("scores", "float32")],
                                [("X", "bfloat16"), ("R", "bfloat16"), ("W", "bfloat16"), ("B", "bfloat16"), ("DIN", d),
                                 ("NE", experts), ("K", top_k), ("NG", 1), ("TG", 1), ("NORM", True)], src.ROUTER, src.HEADER),
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


def occupancy(report: str, threads: int = fused.THREADS) -> str:
    """Blocks of ``threads`` per SM that the registers and shared memory in ``report`` allow."""
    regs = re.search(r"Used (\d+) registers", report)
    smem = re.search(r"(\d+) bytes smem", report)
    if not regs:
        return ""
    r, s = int(regs.group(1)), int(smem.group(1)) if smem else 0
    by_regs = 65536 // (((r + 7) // 8 * 8) * threads)
    by_smem = (228 * 1024) // max(s + 1024, 1)
    blocks = min(by_regs, by_smem, 2048 // threads)
    return f"-> {blocks} blocks of {threads} threads per SM ({blocks * threads // 32} warps): registers allow {by_regs}, shared memory {by_smem}"
