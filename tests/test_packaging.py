"""The wheel installs one import package, ``moedec``, and works in a fresh virtual environment."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (whl,) = out.glob("moedec-*.whl")
    return whl


def test_wheel_holds_only_the_moedec_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"moedec", next(t for t in tops if t.endswith(".dist-info"))}
    for sub in ("moedec/__init__.py", "moedec/hookspecs.py", "moedec/strategies/single.py",
                "moedec/plugins/__init__.py", "moedec/kernels/__init__.py", "moedec/testing/__init__.py"):
        assert sub in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "moedec = moedec.cli:main" in meta


def test_wheel_imports_and_runs_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    # system site-packages provide mlx & co. (no network); moedec itself comes from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import moedec, sys; print(moedec.__file__); import moedec.strategies.single, moedec.plugins"
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert str(venv) in p.stdout
    p = subprocess.run([str(venv / "bin" / "moedec"), "generate", "hi", "-n", "4", "--json"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0 and '"generated_tokens": 4' in p.stdout, p.stderr
