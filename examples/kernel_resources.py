"""Registers, spills and shared memory of the fused MoE kernels, without a GPU.

Builds each kernel's source the way ``mx.fast.cuda_kernel`` does (its generated signature, the
template constants, our header and body), compiles it with ``nvcc -Xptxas -v`` for sm_90a and
prints ptxas' resource report. Occupancy on an H100/H200 follows from it: 65536 registers and 228 KB
of shared memory per SM, at most 2048 threads (64 warps).

    python examples/kernel_resources.py [--cccl DIR] [--bits 4] [--d 4096] [--n 1536]

``--cccl``: CUDA's libcu++ headers (``cuda/std/array``); nvcc's own are used when omitted (MLX's
wheel ships a copy under ``mlx/include/cccl``).
"""

from __future__ import annotations

import argparse

from moedec.kernels.resources import occupancy, resources, variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cccl")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=77)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--show", help="print the generated source of this kernel")
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    for name, (source, dynamic) in variants(args.bits, args.d, args.n, args.experts, args.top_k, args.group).items():
        if args.show == name:
            print(source)
        report = resources(source, args.cccl)
        print(f"{name} (dynamic shared memory {dynamic} bytes):\n  " + report.replace("\n", "\n  ")
              + f"\n  {occupancy(report, dynamic=dynamic)}")


if __name__ == "__main__":
    main()
