"""Build the default model end to end: corpus -> tokenizer -> training -> export -> evaluation.

GPU run (MLX CUDA; one H100 or H200), from the repository root (about 5 min of corpus, tokenizer
and training, then at most 2.5 min of evaluation)::

    python examples/default-model/run_all.py --work /tmp/dm --time-budget 270 --max-seconds 390 \
        --eval-max-seconds 150 --pack $OUT

CPU smoke test (minutes, tiny model, a subset of the corpus)::

    python examples/default-model/run_all.py --tiny --work /tmp/dm-tiny

Every stage reuses what ``--work`` already holds (training resumes from its checkpoints), so a run
stopped by ``--max-seconds`` (exit status 75) continues when the same command is run again.
``--pack DIR`` writes ``default_model.tar.NN`` (parts under 15 MiB; unpack with
``cat DIR/default_model.tar.* | tar -xf - -C core/``) and ``logs.tar`` (run.json, loss curves,
eval.json, eval.txt). ``--install DIR`` copies the exported model to ``DIR`` (e.g. core/default_model).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PART_BYTES = 15 << 20


def stage(name: str, t0: float) -> None:
    print(f"== {name} (t={time.perf_counter() - t0:.0f} s)", flush=True)


def pack(export_dir: Path, work: Path, dest: Path) -> list[Path]:
    """``default_model.tar.NN`` parts (the model as ``default_model/...``) and ``logs.tar``."""
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(export_dir.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=f"default_model/{p.relative_to(export_dir).as_posix()}")
    data = buf.getvalue()
    out = []
    for i in range(0, len(data), PART_BYTES):
        part = dest / f"default_model.tar.{i // PART_BYTES:02d}"
        part.write_bytes(data[i : i + PART_BYTES])
        out.append(part)
    with tarfile.open(dest / "logs.tar", mode="w") as tar:
        for name in ("run.json", "losses_target.csv", "losses_heads.csv", "eval.json", "eval.txt"):
            if (work / name).exists():
                tar.add(work / name, arcname=name)
    out.append(dest / "logs.tar")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (corpus, checkpoints, logs)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, corpus subset, short run")
    ap.add_argument("--time-budget", type=float, default=None, help="training seconds, both phases (calibrated)")
    ap.add_argument("--target-steps", type=int, default=None)
    ap.add_argument("--heads-steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--bits", type=int, default=8, choices=[0, 4, 8])
    ap.add_argument("--moe-impl", choices=["dense", "switch"], default="dense")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop training (resumable) after this long")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--eval-max-seconds", type=float, default=None, help="skip the evaluation's rest after this long")
    ap.add_argument("--pack", type=Path, default=None, help="write default_model.tar.NN + logs.tar here")
    ap.add_argument("--install", type=Path, default=None, help="copy the exported model here")
    a = ap.parse_args(argv)

    import build_corpus
    import train_tokenizer
    from export import export
    from train import train
    from dm_train_lib import Interrupted

    t0 = time.perf_counter()
    size = "tiny" if a.tiny else "default"
    vocab = a.vocab or (512 if a.tiny else 4096)
    budget = a.time_budget
    if budget is None and (a.target_steps is None or a.heads_steps is None):
        budget = 75.0 if a.tiny else 270.0
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok = work / "corpus", work / "tokenizer"

    stage("corpus", t0)
    if not (corpus / "manifest.json").exists():
        m = build_corpus.build(corpus, max_files=150 if a.tiny else None)
    else:
        m = json.loads((corpus / "manifest.json").read_text())
    print(f"Python {m['python']} stdlib: {m['files']['train']} train / {m['files']['valid']} valid files, "
          f"sha256 {m['sha256'][:12]}", flush=True)
    stage("tokenizer", t0)
    if not (tok / "tokenizer.json").exists():
        train_tokenizer.train(corpus, tok, vocab)
    stage("training", t0)
    try:
        train(work, corpus, tok, size=size, seed=a.seed, time_budget=budget, target_steps=a.target_steps,
              heads_steps=a.heads_steps, moe_impl=a.moe_impl, compile=not a.no_compile, max_seconds=a.max_seconds)
    except Interrupted as e:
        print(e, flush=True)
        raise SystemExit(75)
    stage("export", t0)
    export_dir = work / "default_model"
    export(work, export_dir, tok, bits=a.bits)
    if a.pack:  # the model first: whatever happens in the evaluation, it comes back
        pack(export_dir, work, a.pack)
    if not a.skip_eval:
        stage("evaluation", t0)
        try:
            from evaluate import evaluate, summary

            res = evaluate(export_dir, corpus, quick=a.tiny, max_seconds=a.eval_max_seconds)
            res["run"] = json.loads((work / "run.json").read_text()).get("reproduce")
            (work / "eval.json").write_text(json.dumps(res, indent=1))
            text = summary(res)
        except Exception:
            import traceback

            text = "evaluation failed:\n" + traceback.format_exc()
        (work / "eval.txt").write_text(text + "\n")
        print(text, flush=True)
    if a.install:
        if a.install.exists():
            shutil.rmtree(a.install)
        shutil.copytree(export_dir, a.install)
        print(f"installed to {a.install}")
    if a.pack:
        files = pack(export_dir, work, a.pack)
        print("packed: " + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in files))
    stage("done", t0)


if __name__ == "__main__":
    main()
