"""Build a standalone CUDA-event timer of moedec's tensor-core expert kernels (no MLX on the GPU host).

Each variant is the kernel sources of ``moedec.kernels.tensor_cores`` at a git revision (or the
working tree) compiled the way MLX's ``cuda_kernel`` would (:func:`moedec.kernels.resources.kernel_source`)
with nvcc for sm_90a, plus a launcher; ``main.cu`` times gate/up, down and both, back to back, for
T = 1, 2, 4, 8, 16, against cudaMemcpy's and a copy kernel's bandwidth, side by side in one run; then
the dense kernel (``DENSE_MMA``) on the synthetic model's dense shapes: the working tree's with each
of :data:`SPLITS` warps per tile (``*``: the split ``dense_kernel`` picks), and each revision's with
the split and shared memory its own ``dense_kernel`` picks.

    python examples/kernel_harness/build.py [--rev HEAD~1 ...] [--probe loads ...] [-o DIR]   # nvcc here
    DIR/harness 200 1                                                                         # on the GPU host

Variants: ``work`` (the working tree), one per ``--rev``, and one per ``--probe`` (the working tree
with no work items, with loads and no arithmetic, or with those loads in another order: what bounds
the kernels; see PROBES). The
binary links the CUDA runtime statically, so the GPU host needs only a driver.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx

from moedec.kernels import cuda_source, fused, resources, tensor_cores

HERE = Path(__file__).resolve().parent
D, N, BITS, GROUP = 4096, 1536, 4, 64
SHAPES = {  # C++ expressions over Args a, for the inputs whose shapes a kernel reads
    "x": ["1", "a.T", "a.D"], "inds": ["1", "a.T", "a.K"], "scores": ["1", "a.T", "a.K"], "meta": ["3"],
    "wg": ["a.E", "a.N", "a.D*a.bits/32"], "act": ["a.P+a.T", "a.N"], "wd": ["a.E", "a.D", "a.N*a.bits/32"],
    "res": ["1", "a.T", "a.D"],
}
DENSE_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "mlp": (4096, 10944), "head": (4096, 32000)}  # din, nout
SPLITS = (1, 2, 4, 8)  # warps per tile; dense._split picks among 4, 2 and 1


# Probes: the working tree's expert kernels with a part taken out or changed, to see what bounds them
# (their outputs are wrong). "empty": no work items (launch, slot table, epilogue; but a kernel this
# short times the host's launch rate here: one with no code at all took as long, 4.4-5.5 us on an
# H200, so read its start from ncu's PM sampling instead); "loads": every
# slice streams through the ring but no MMA or fold runs; "contiguous": "loads" with each slice of a
# half tile (8 rows) read as one contiguous run instead of 8 row pieces (the same bytes of the same
# items, in another order: does the order of the row pieces cost DRAM efficiency?).
# Substitutions in (GATE_UP_MMA, DOWN_MMA, TENSOR_CORES).
_NO_ARITHMETIC = ([("moedec::item_slice<KS, GROUP, true, false, X, S>(ring[k % STAGES], sl, cnt, xr, sx, acc);", "acc[0][0] += 1.f;")],
                  [("moedec::item_slice<KS, GROUP, false, true, X, S>(ring[k % STAGES], sl, cnt, xr, none, acc);", "acc[0][0] += 1.f;")])
PROBES = {
    "empty": ([("int items = early != -1 ? first + 1 : 0;", "int items = 0;"), ("items = (s.n + meta[0]) * tiles;", "items = 0;")],
              [("int items = early != -1 ? warp + 1 : 0;", "int items = 0;"),
               ("items = (s.n + (SHARED ? 1 : 0)) * RG * KH;", "items = 0;")], []),
    "loads": (*_NO_ARITHMETIC, []),
    "contiguous": (*_NO_ARITHMETIC, [("reinterpret_cast<const uint4*>(w + (r & 7) * WORDS) + sl * CH + j",
                                      "reinterpret_cast<const uint4*>(w) + (sl * 8 + (r & 7)) * CH + j")]),
}


def sources_at(rev: str | None, probe: str | None = None) -> types.SimpleNamespace:
    """GATE_UP_MMA, DOWN_MMA and TENSOR_CORES of kernels/tensor_cores.py and SLOTS of
    kernels/cuda_source.py at ``rev`` (None: the working tree), with a probe's substitutions (see
    PROBES) applied."""
    if rev is None:
        ns = {k: getattr(tensor_cores, k) for k in ("GATE_UP_MMA", "DOWN_MMA", "TENSOR_CORES")}
        ns["SLOTS"] = cuda_source.SLOTS
    else:
        root = Path(tensor_cores.__file__).resolve().parents[1]
        ns = {}
        for module in ("tensor_cores", "cuda_source"):  # the kernels and their slot-table code
            src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:kernels/{module}.py"], capture_output=True,
                                 text=True, check=True).stdout
            exec(compile(src, f"{rev}:{module}.py", "exec"), ns)
    for key, subs in zip(("GATE_UP_MMA", "DOWN_MMA", "TENSOR_CORES"), PROBES[probe] if probe else ((), (), ())):
        for old, new in subs:
            if old not in ns[key]:
                raise SystemExit(f"probe {probe!r}: {key} no longer contains {old!r}")
            ns[key] = ns[key].replace(old, new)
    return types.SimpleNamespace(**{k: ns[k] for k in ("GATE_UP_MMA", "DOWN_MMA", "TENSOR_CORES", "SLOTS")})


def kernel_tu(name: str, prefix: str, template: list, dtypes: dict | None = None) -> tuple[str, list[str]]:
    """The kernel's translation unit, renamed ``prefix_name``, and its call arguments from Args a."""
    dtypes = {**resources.kernel_dtypes(mx.bfloat16), **(dtypes or {})}
    tu = resources.kernel_source(name, template, dtypes, include=False)  # one file of several kernels: inline
    tu = tu.replace(f"__global__ void {name}(", f"__global__ void {prefix}_{name}(")
    at = tu.index(f"{prefix}_{name}(") + len(f"{prefix}_{name}(")
    args = []
    for p in [q.strip() for q in tu[at:tu.index(") {\n", at)].split(",\n")]:
        pname = p.split()[-1]
        if pname.endswith("_shape"):
            args.append("shp({" + ", ".join(SHAPES[pname[:-6]]) + "})")
        elif pname.endswith("_ndim"):
            args.append(str(len(SHAPES[pname[:-5]])))
        elif pname.endswith("_strides"):
            raise SystemExit(f"{name}: strided inputs are not supported here")
        else:
            ctype = p.split("*")[0].replace("const", "").strip()
            args.append(f"({'const ' if 'const' in p else ''}{ctype}*)a.{pname}")
    return tu, args


@contextlib.contextmanager
def kept_signatures():
    """``fused.SIGNATURES`` as it was before the block, whatever kernel sources the block swapped in."""
    saved = dict(fused.SIGNATURES)
    try:
        yield saved
    finally:
        fused.SIGNATURES.clear()
        fused.SIGNATURES.update(saved)


def variant(prefix: str, rev: str | None, probe: str | None = None) -> str:
    """One variant's .cu: both kernels of ``rev``'s sources (with ``probe``'s changes) and their launchers."""
    src, now = sources_at(rev, probe), sources_at(None)
    with kept_signatures():
        for name, code in (("gate_up_mma", src.GATE_UP_MMA), ("down_mma", src.DOWN_MMA)):
            i, o, _, head = fused.SIGNATURES[name]
            fused.SIGNATURES[name] = (i, o, code, head.replace(now.TENSOR_CORES, src.TENSOR_CORES).replace(now.SLOTS, src.SLOTS))
        # one gate/up kernel per row of GATE_UP_RING (the ring follows the token count), as fused_moe picks them
        rings = {t: fused.expert_kernels(mx.bfloat16, mx.bfloat16, BITS, D, N, GROUP, t) for t, *_ in fused.GATE_UP_RING}
        ek = rings[1]
        if ek.gate_up_name != "gate_up_mma":
            raise SystemExit("these shapes do not take the tensor-core kernels")
        gate_ups = {t: kernel_tu(e.gate_up_name, f"{prefix}{t}", e.gate_up) for t, e in rings.items()}
        tu2, a2 = kernel_tu(ek.down_name, prefix, ek.down)
    tus = [tu for tu, _ in gate_ups.values()]
    code = tus[0] + "".join("\n" + body(tu) for tu in tus[1:]) + "\n" + body(tu2) + PRELUDE
    for t, (_, args) in gate_ups.items():
        code += launcher(f"{prefix}_gate_up{t}", f"mlx::core::cu::{prefix}{t}_{ek.gate_up_name}", rings[t].gate_up_smem,
                         str(fused.GATE_UP_BLOCKS), args)
    pick = "".join(f"  if (a.T >= {t}) return {prefix}_gate_up{t}(a, st);\n" for t in sorted(rings, reverse=True))
    dn = f"mlx::core::cu::{prefix}_{ek.down_name}"
    return (code + f'extern "C" void {prefix}_gate_up(const Args& a, cudaStream_t st) {{\n{pick}}}\n'
            + launcher(f"{prefix}_down", dn, ek.down_smem, f"(a.D + {fused.ROWS - 1}) / {fused.ROWS}", a2))


PRELUDE = ('\n#include "args.h"\n'
           "static mlx::core::cu::Shape shp(std::initializer_list<int> v) { mlx::core::cu::Shape s{}; int i = 0; "
           "for (int x : v) s[i++] = x; return s; }\n")


def body(tu: str) -> str:
    """A translation unit without the header part that the first kernel of a file already brought."""
    return tu[tu.index("namespace mlx::core::cu {\n__global__"):]


def launcher(name: str, fn: str, smem: int, blocks: str, args: list[str]) -> str:
    return (f'extern "C" void {name}(const Args& a, cudaStream_t st) {{\n'
            f"  static bool init = false;\n"
            f"  if (!init) {{ cudaFuncSetAttribute({fn}, cudaFuncAttributeMaxDynamicSharedMemorySize, {smem}); init = true; }}\n"
            f"  {fn}<<<{blocks}, {fused.THREADS}, {smem}, st>>>({', '.join(args)});\n}}\n")


def dense_at(rev: str | None) -> tuple[str, str, object] | None:
    """``DENSE_MMA``, its header and ``dense_kernel`` at ``rev`` (None: the working tree's; None back:
    the revision has no ``kernels/dense_source.py``). A revision's ``kernels/dense.py`` runs as a module
    of the installed package (its relative imports are the working tree's ``fused`` and the like); its
    header is the working tree's with the revision's TENSOR_CORES."""
    import importlib.util

    from moedec.kernels import dense

    head = fused.SIGNATURES["dense_mma"][3]
    if rev is None:
        return fused.SIGNATURES["dense_mma"][2], head, dense.dense_kernel
    root = Path(tensor_cores.__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{rev}:kernels/dense_source.py"],
                      capture_output=True).returncode:
        return None
    def show(f: str) -> str:
        git = ["git", "-C", str(root), "show", f"{rev}:kernels/{f}"]
        return subprocess.run(git, capture_output=True, text=True, check=True).stdout

    ns: dict = {}
    exec(compile(show("dense_source.py"), f"{rev}:dense_source.py", "exec"), ns)
    spec = importlib.util.spec_from_loader(f"moedec.kernels._dense_at_{abs(hash(rev))}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "moedec.kernels"
    try:
        exec(compile(show("dense.py"), f"{rev}:dense.py", "exec"), mod.__dict__)
    except ImportError as e:
        raise SystemExit(f"{rev}:kernels/dense.py does not import next to the working tree's kernels: {e}")
    return ns["DENSE_MMA"], head.replace(tensor_cores.TENSOR_CORES, sources_at(rev).TENSOR_CORES), mod.dense_kernel


def dense_file(revs: dict) -> tuple[str, list[tuple[str, str, int, int, int]]]:
    """The dense kernel for each of DENSE_SHAPES: the working tree's with each of SPLITS, each of ``revs``'
    (prefix -> revision) as that revision picks it; with launchers, and the (name, tag, din, nout, split)
    of each."""
    parts, launchers, table = [], [], []
    with kept_signatures() as saved:
        for who, rev in {"work": None, **revs}.items():
            found = dense_at(rev)
            if found is None:
                print(f"{who} ({rev}): no kernels/dense_source.py, no dense kernel timed")
                continue
            code, head, dense_kernel = found
            inputs, outputs, _, _ = saved["dense_mma"]
            fused.SIGNATURES["dense_mma"] = (inputs, outputs, code, head)
            for shape, (din, nout) in DENSE_SHAPES.items():
                picked = dict(dense_kernel(mx.bfloat16, din, nout, GROUP)[0])["SPLIT"]
                for split in SPLITS if rev is None else (None,):
                    template, smem = dense_kernel(mx.bfloat16, din, nout, GROUP, *([split] if split else []))
                    s = dict(template)["SPLIT"]
                    name, tag = f"dense_{shape}_{who}_s{s}", f"{who} s{s}{'*' if rev is None and s == picked else ''}"
                    if any(n == name for n, *_ in table):
                        continue  # a split that fell back to one already built
                    tu, args = kernel_tu("dense_mma", name, template, {"w": "uint32"})
                    parts.append(tu if not parts else body(tu))
                    blocks = -(-nout // (16 * (fused.WARPS // s)))
                    launchers.append(launcher(name, f"mlx::core::cu::{name}_dense_mma", smem, str(blocks), args))
                    table.append((name, tag, din, nout, s))
    table.sort(key=lambda r: list(DENSE_SHAPES.values()).index((r[2], r[3])))  # one shape after another
    return "\n".join(parts) + PRELUDE + "".join(launchers), table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", action="append", default=[], help="a git revision to compare with the working tree")
    ap.add_argument("--probe", action="append", default=[], choices=sorted(PROBES),
                    help="also build the working tree's kernels with a part taken out (outputs wrong)")
    ap.add_argument("-o", "--out", default=str(HERE / "bin"))
    opts = ap.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    names = {f"r{i}": rev for i, rev in enumerate(opts.rev)} | {"work": None}
    objs = []
    for name, rev, probe in [(n, rev, None) for n, rev in names.items()] + [(p, None, p) for p in opts.probe]:
        cu = out / f"{name}.cu"
        cu.write_text(variant(name, rev, probe))
        objs.append((name, cu, out / f"{name}.o"))
    names |= {p: f"probe {p}" for p in opts.probe}
    dense_cu, dense = dense_file({f"r{i}": rev for i, rev in enumerate(opts.rev)})
    (out / "dense.cu").write_text(dense_cu)
    objs.append(("dense", out / "dense.cu", out / "dense.o"))
    procs = [subprocess.Popen(["nvcc", "-O3", "-std=c++17", "-arch=sm_90a", "-I", str(HERE), "-c", str(cu), "-o", str(obj),
                               "-Xptxas", "-v"], stderr=subprocess.PIPE, text=True) for _, cu, obj in objs]
    for (name, _, _), p in zip(objs, procs):
        err = p.communicate()[1]
        if p.returncode:
            sys.exit(f"{name}: nvcc failed\n{err[-3000:]}")
        usage = [l.split("ptxas info    : ")[-1] for l in err.splitlines() if "Used" in l]
        print(f"{name} ({names.get(name) or 'working tree'}): {'; '.join(usage)}")
    decls = "\n".join([f'extern "C" void {n}_gate_up(const Args&, cudaStream_t); extern "C" void {n}_down(const Args&, cudaStream_t);'
                        for n in names] + [f'extern "C" void {n}(const Args&, cudaStream_t);' for n, *_ in dense])
    table = ",\n".join(f'  {{"{n}", {n}_gate_up, {n}_down}}' for n in names)
    dtable = ",\n".join(f'  {{"{n}", "{tag}", {din}, {nout}, {split}, {n}}}' for n, tag, din, nout, split in dense)
    (out / "variants.inc").write_text(f"{decls}\nstatic Variant VARIANTS[] = {{\n{table}\n}};\n"
                                      f"static DenseVariant DENSE[] = {{\n{dtable}\n}};\n")
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-arch=sm_90a", "-I", str(HERE), "-I", str(out), str(HERE / "main.cu"),
                    *[str(o) for _, _, o in objs], "-o", str(out / "harness")], check=True)
    print("built", out / "harness")


if __name__ == "__main__":
    main()
