"""How kernel sources reach ``mx.fast.cuda_kernel`` (:mod:`moedec.kernels.jit`): MLX hashes the whole
source on every launch, so each kernel's text goes once into a content-named file and MLX gets an
``#include`` of it and one macro. CPU only: what is written and handed over; that it compiles to
the same code is checked by the nvcc tests in test_kernels.py and on the GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moedec.kernels import fused, jit


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDEC_KERNEL_DIR", str(tmp_path / "cuda"))
    monkeypatch.setattr(jit, "INCLUDE", True)
    jit._written.cache_clear()
    yield tmp_path / "cuda"
    jit._written.cache_clear()


@pytest.mark.parametrize("name", sorted(fused.SIGNATURES))
def test_each_kernel_reaches_mlx_as_an_include_and_a_macro(kernel_dir, name):
    inputs, _, body, header = fused.SIGNATURES[name]
    head, code = jit.kernel_text(name, inputs, header, body)
    path = Path(re.fullmatch(r'#include "(.+)"\n', head).group(1))
    assert path.parent == kernel_dir.resolve() and path.name.startswith(f"moedec_{name}_")
    assert len(head) + len(code) < 400  # what MLX hashes per launch, against 4-14 KB inline
    text = path.read_text()
    assert text == f"{jit.minify(header)}\n#define {jit.BODY} {jit.one_line(jit.minify(body))}\n"
    # MLX passes <input>_shape / _strides / _ndim only when the body it gets names them: exactly those used
    full = jit.minify(body)
    for n in inputs:
        for s in ("shape", "strides", "ndim"):
            assert (f"{n}_{s}" in code) == (f"{n}_{s}" in full), f"{n}_{s}"
    assert code.split()[0] == jit.BODY


def test_a_file_is_named_by_its_content(kernel_dir):
    inputs, _, body, header = fused.SIGNATURES["add_norm"]
    a = jit.kernel_text("add_norm", inputs, header, body)
    jit._written.cache_clear()
    assert jit.kernel_text("add_norm", inputs, header, body) == a  # found, not written again
    b = jit.kernel_text("add_norm", inputs, header, body + "\n  int changed = 0;\n")
    assert b[0] != a[0] and len(list(kernel_dir.iterdir())) == 2
    assert not list(kernel_dir.glob("*.tmp"))


def test_one_line_turns_pragmas_into_operators():
    src = "#pragma unroll\nfor (int i = 0; i < 4; ++i) {  // a loop\n  x += i;\n}\n#pragma unroll 11\nfor (;;) {}\n"
    assert jit.one_line(jit.minify(src)) == '_Pragma("unroll") for(int i=0;i<4;++i){ x+=i; } _Pragma("unroll 11") for(;;){}'
    with pytest.raises(ValueError, match="#if"):
        jit.one_line(jit.minify("#if A\nx;\n#endif\n"))


@pytest.mark.parametrize("where,why", [("file/cuda", "cannot use kernel source file .*MOEDEC_KERNEL_DIR"),
                                       ('a"b', "#include cannot name")])
def test_without_a_usable_directory_the_text_goes_inline(tmp_path, monkeypatch, where, why):
    """A directory that cannot be made (under a file) or named in an ``#include`` (a quote in its
    path): a warning, MLX gets the text itself (as with INCLUDE off), and nothing is created."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MOEDEC_KERNEL_DIR", str(tmp_path / where))
    monkeypatch.setattr(jit, "INCLUDE", True)
    jit._written.cache_clear()
    inputs, _, body, header = fused.SIGNATURES["router"]
    with pytest.warns(UserWarning, match=why):
        got = jit.kernel_text("router", inputs, header, body)
    jit._written.cache_clear()
    assert got == (jit.minify(header), jit.minify(body)) and not (tmp_path / where).exists()
    monkeypatch.setattr(jit, "INCLUDE", False)
    assert jit.kernel_text("router", inputs, header, body) == got


def test_the_default_directory_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEDEC_KERNEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jit.source_dir() == tmp_path / "moedec" / "cuda"
