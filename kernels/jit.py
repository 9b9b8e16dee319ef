"""How a kernel's CUDA source reaches ``mx.fast.cuda_kernel``: short, because MLX pays for its length
on every launch.

MLX hashes a custom kernel's whole generated source (its header, signature and body) on the host at
every launch, to find the compiled module: ~0.24 µs per KB on an H100's host (docs/benchmarks.md),
and a compiled decode step launches ~70 of our kernels of 4–14 KB each. So each kernel's text goes
once into a file named by its content hash under :func:`source_dir`, and what MLX gets is a
one-line ``#include`` of that file as the header and one macro as the body: ~100 bytes a launch.
The file's name changes with its content, so MLX's module name (which hashes the source) and its
on-disk PTX cache change with it. Where no file can be written, MLX gets the text itself.

:func:`minify` makes the text itself small too (comments and spaces C++ does not need), which also
keeps the fallback cheap.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path

#: Kernel texts go into files that each launch includes (see the module docstring); off: inline.
INCLUDE = True
BODY = "MOEDEC_BODY"  # the macro that stands for a kernel's body

_WORD = re.compile(r"[A-Za-z0-9_]")
_OPERATOR = set("+-*/%&|^<>=!:.")  # two of these with a space between may not touch (a - -b, a / *p, > >)


def minify(src: str) -> str:
    """Source without comments and without the whitespace C++ does not need. Preprocessor lines keep
    lines of their own; string literals (inline assembly) are left as they are."""
    out = []
    for line in (l.split("//")[0].strip() for l in src.splitlines()):
        if not line:
            continue
        if line.startswith("#"):
            out.append("\n" + line + "\n")
            continue
        out.append(" " + "".join(_squeeze(p) if i % 2 == 0 else f'"{p}"' for i, p in enumerate(line.split('"'))))
    return "".join(out).strip().replace("\n ", "\n")


def _squeeze(code: str) -> str:
    """``code`` (no string literals) with a space kept only between two identifier characters or two
    operator characters."""
    code = " ".join(code.split())
    keep = [c != " " or (_WORD.match(code[i - 1]) and _WORD.match(code[i + 1])) or
            (code[i - 1] in _OPERATOR and code[i + 1] in _OPERATOR) for i, c in enumerate(code)]
    return "".join(c for c, k in zip(code, keep) if k)


def one_line(code: str) -> str:
    """A :func:`minify`-ed body as one line, for a macro: ``#pragma X`` lines become ``_Pragma("X")``;
    any other preprocessor line is an error (a macro cannot hold it)."""
    parts = []
    for line in code.splitlines():
        if line.startswith("#pragma "):
            parts.append('_Pragma("' + line[len("#pragma "):].strip().replace('"', '\\"') + '")')
        elif line.startswith("#"):
            raise ValueError(f"a kernel body cannot hold the preprocessor line {line!r} in a macro")
        else:
            parts.append(line)
    return " ".join(parts)


def source_dir() -> Path:
    """Where the kernel files go: ``$MOEDEC_KERNEL_DIR``, else ``$XDG_CACHE_HOME/moedec/cuda`` (by
    default ``~/.cache/moedec/cuda``)."""
    if os.environ.get("MOEDEC_KERNEL_DIR"):
        return Path(os.environ["MOEDEC_KERNEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moedec" / "cuda"


def kernel_text(name: str, inputs: list[str], header: str, body: str, include: bool | None = None) -> tuple[str, str]:
    """``(header, body)`` to hand ``mx.fast.cuda_kernel`` for kernel ``name`` with ``inputs``: with
    ``include`` (default :data:`INCLUDE`), an ``#include`` of the file holding both and the body's
    macro (followed by a comment naming the ``<input>_shape`` / ``_strides`` / ``_ndim`` the body
    uses: MLX passes those only when it finds them in the body), else the minified texts."""
    head, code = minify(header), minify(body)
    if not (INCLUDE if include is None else include):
        return head, code
    path = _written(name, f"{head}\n#define {BODY} {one_line(code)}\n")
    if path is None:
        return head, code
    used = [f"{n}_{s}" for n in inputs for s in ("shape", "strides", "ndim") if f"{n}_{s}" in code]
    return f'#include "{path}"\n', BODY + (f" /* {' '.join(used)} */" if used else "")


@functools.lru_cache(maxsize=None)
def _written(name: str, text: str) -> str | None:
    """The path of a file holding ``text`` (written now if it is not there), or ``None`` where it
    cannot be written (a warning says so, once per kernel)."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    d = source_dir().resolve()
    path = d / f"moedec_{name}_{digest}.cuh"
    why = "its path has a character an #include cannot name" if any(c in str(path) for c in '"\\\n') else None
    if why is None and not (path.is_file() and path.read_text() == text):
        tmp = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)  # whole, whatever another process writes at the same time
        except OSError as e:
            why = str(e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    if why is not None:
        warnings.warn(f"moedec: cannot use kernel source file {path} ({why}); kernels get their source inline, "
                      "which costs the host more per launch (set MOEDEC_KERNEL_DIR)", stacklevel=3)
        return None
    return str(path)
