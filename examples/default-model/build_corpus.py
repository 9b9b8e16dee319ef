"""Build the default model's corpus: the Python standard library source of the running interpreter.

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (minus ``site-packages``/``dist-packages``
and files that are not UTF-8 text) is copied, in sorted relative-path order, into ``OUT/train`` or
``OUT/valid``. The split is by file and depends only on the relative path (a SHA-256 of it), so a
file lands in the same split on every interpreter that has it. ``OUT/manifest.json`` records the
interpreter, the file lists, sizes and a digest of the whole corpus.

Licence: the CPython standard library is distributed under the Python Software Foundation License
(PSF-2.0, https://docs.python.org/3/license.html); a model trained on it is documented as such in
docs/default-model.md.

    python examples/default-model/build_corpus.py --out /tmp/dm/corpus [--valid-percent 3] [--max-files N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
MAX_FILE_BYTES = 400_000  # a few generated data tables (e.g. pydoc topics) are not code


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def is_valid(rel: str, percent: float) -> bool:
    """Held-out membership from the relative path alone (stable across interpreters)."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return (h % 10_000) < percent * 100


def list_sources(root: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, absolute path)`` of every stdlib ``.py`` file, sorted by path."""
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    out.sort(key=lambda x: x[0])
    return out


def read_text(p: Path) -> str | None:
    data = p.read_bytes()
    if not data.strip() or len(data) > MAX_FILE_BYTES or b"\0" in data:
        return None
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError:
        return None


def build(out: Path, valid_percent: float = 3.0, max_files: int | None = None) -> dict:
    """Write the corpus under ``out``; return the manifest."""
    root = stdlib_root()
    files = list_sources(root)
    if max_files is not None:
        # a spread-out subset (for smoke tests): every k-th file, still deterministic
        k = max(1, len(files) // max_files)
        files = files[::k][:max_files]
    if out.exists():
        shutil.rmtree(out)
    digest = hashlib.sha256()
    split = {"train": [], "valid": []}
    chars = {"train": 0, "valid": 0}
    for rel, p in files:
        text = read_text(p)
        if text is None:
            continue
        name = "valid" if is_valid(rel, valid_percent) else "train"
        dest = out / name / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        split[name].append(rel)
        chars[name] += len(text)
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
    if not split["train"] or not split["valid"]:
        raise SystemExit(f"corpus too small: {len(split['train'])} train / {len(split['valid'])} valid files")
    manifest = {
        "source": str(root),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "licence": "PSF-2.0 (Python Software Foundation License), https://docs.python.org/3/license.html",
        "valid_percent": valid_percent,
        "files": {k: len(v) for k, v in split.items()},
        "chars": chars,
        "sha256": digest.hexdigest(),
        "train": split["train"],
        "valid": split["valid"],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_split(corpus: Path, name: str) -> list[tuple[str, str]]:
    """``(relative path, text)`` of a split, in the manifest's (sorted) order."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    return [(rel, (corpus / name / rel).read_text(encoding="utf-8")) for rel in manifest[name]]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--valid-percent", type=float, default=3.0)
    ap.add_argument("--max-files", type=int, default=None, help="a deterministic subset (smoke tests)")
    a = ap.parse_args(argv)
    m = build(a.out, a.valid_percent, a.max_files)
    print(f"corpus: Python {m['python']} stdlib, {m['files']['train']} train / {m['files']['valid']} valid files, "
          f"{m['chars']['train'] / 1e6:.1f}M / {m['chars']['valid'] / 1e6:.2f}M chars, sha256 {m['sha256'][:12]}")


if __name__ == "__main__":
    main()
