"""Train the default model in MLX: phase 1 the glm4_moe target with its MTP layer (joint
DeepSeek-V3-style loss, auxiliary-loss-free expert balancing), phase 2 the draft model and the EAGLE
head on the frozen target's outputs. Seeded and resumable (see dm_train_lib); loss curves go to
``WORK/losses_target.csv`` and ``WORK/losses_heads.csv``, the resolved settings to ``WORK/run.json``.

    python examples/default-model/train.py --work /tmp/dm --corpus /tmp/dm/corpus \\
        --tokenizer /tmp/dm/tokenizer --size default --time-budget 270

``--time-budget S`` calibrates each phase's step count to fit (65% / 35% of S); ``--target-steps``
and ``--heads-steps`` fix them instead (run.json records the values a budgeted run chose).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mlx.core as mx  # noqa: E402

from dm_heads import HEADS_COLUMNS, Heads, heads_eagle_config, make_heads_loss  # noqa: E402
from dm_model import (  # noqa: E402
    SIZES, Target, draft_config, freeze_router_bias, init_params, rebalance, target_config, target_loss,
)
from dm_train_lib import Interrupted, Phase, load_tokens  # noqa: E402

HYPER = {
    # max_steps: ~6 epochs of the ~9.3M-token corpus at 32k tokens a step (if the GPU is that fast)
    "default": dict(lr=2e-3, heads_lr=2e-3, warmup=100, heads_warmup=60, cal=(5, 25), min_steps=100,
                    max_steps=1800, log_every=10, valid_points=6, ckpt_every_s=60.0),
    "tiny": dict(lr=3e-3, heads_lr=3e-3, warmup=20, heads_warmup=12, cal=(3, 10), min_steps=10,
                 max_steps=2000, log_every=5, valid_points=2, ckpt_every_s=30.0),
}
MTP_WEIGHT = 0.3  # DeepSeek-V3's lambda for the first 10T tokens
BALANCE_RATE = 1e-3  # DeepSeek-V3's bias update speed gamma
DISTILL = 0.5  # draft: weight of the KL to the target (the rest: data cross-entropy)
EAGLE_CE = 0.1  # EAGLE: classification weight next to the feature regression
EAGLE_NOISE = 0.1  # EAGLE: uniform feature noise half-width (on features of RMS ~1)


def build_target(size: str, vocab: int, seed: int) -> Target:
    t = Target(target_config(size, vocab))
    init_params(t, seed)
    freeze_router_bias(t)
    return t


def build_heads(size: str, vocab: int, seed: int) -> Heads:
    h = Heads(draft_config(size, vocab), heads_eagle_config(size, target_config(size, vocab)))
    init_params(h, seed + 1)
    return h


def vocab_of(tokenizer_dir: Path) -> int:
    return int(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"].__len__())


def train(work: Path, corpus: Path, tokenizer_dir: Path, *, size: str = "default", seed: int = 0,
          time_budget: float | None = None, target_steps: int | None = None, heads_steps: int | None = None,
          moe_impl: str = "dense", compile: bool = True, max_seconds: float | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    hp, dims = HYPER[size], SIZES[size]
    vocab = vocab_of(tokenizer_dir)
    t0 = time.perf_counter()
    data = load_tokens(work, tokenizer_dir, corpus)
    print(f"data: {len(data['train']) / 1e6:.2f}M train / {len(data['valid']) / 1e6:.3f}M valid tokens "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    run_file = work / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    if run.get("size", size) != size or run.get("seed", seed) != seed:
        raise SystemExit(f"{work} holds a run of size {run.get('size')} seed {run.get('seed')}; use another --work")
    run.update(size=size, seed=seed, vocab=vocab, moe_impl=moe_impl, compile=compile, time_budget_s=time_budget,
               device=str(mx.default_device()), mlx=mx.__version__, python=platform.python_version(),
               mtp_weight=MTP_WEIGHT, balance_rate=BALANCE_RATE, distill=DISTILL, eagle_ce=EAGLE_CE,
               eagle_noise=EAGLE_NOISE, batch=dims["batch"], seq=dims["seq"], hyper=hp,
               target_config=target_config(size, vocab), draft_config=draft_config(size, vocab),
               eagle_config=heads_eagle_config(size, target_config(size, vocab)))
    run.setdefault("phases", {})
    manifest = json.loads((corpus / "manifest.json").read_text())
    run["corpus"] = {k: v for k, v in manifest.items() if k not in ("train", "valid")}
    run["tokens"] = {k: int(len(v)) for k, v in data.items()}
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    common = dict(deadline=deadline, work=work, data=data, seed=seed, batch=dims["batch"], seq=dims["seq"], cal=hp["cal"],
                  min_steps=hp["min_steps"], max_steps=hp["max_steps"], compile=compile,
                  ckpt_every_s=hp["ckpt_every_s"], log_every=hp["log_every"], valid_points=hp["valid_points"])

    # phase 1: target + MTP
    target = build_target(size, vocab, seed)
    loss1 = partial(_target_loss, moe_impl=moe_impl)
    p1 = Phase("target", target, loss1, ["main_ce", "mtp_ce"], lr=hp["lr"], warmup=hp["warmup"],
               steps=target_steps, budget_s=None if time_budget is None else 0.65 * time_budget,
               after_step=lambda m, aux: rebalance(m, aux[2], BALANCE_RATE), **common)
    r1 = p1.run(work / "losses_target.csv")
    run["phases"]["target"] = r1
    run_file.write_text(json.dumps(run, indent=1))
    target.freeze()

    # phase 2: draft + EAGLE, distilled from the frozen target
    heads = build_heads(size, vocab, seed)
    loss2 = make_heads_loss(target, distill=DISTILL, eagle_ce=EAGLE_CE, noise=EAGLE_NOISE, moe_impl=moe_impl)
    left = None if time_budget is None else max(0.2 * time_budget, time_budget - r1["elapsed_s"])
    p2 = Phase("heads", heads, loss2, HEADS_COLUMNS, lr=hp["heads_lr"], warmup=hp["heads_warmup"],
               steps=heads_steps, budget_s=left, **common)
    r2 = p2.run(work / "losses_heads.csv")
    run["phases"]["heads"] = r2
    # run_all.py flags that replay this run (same interpreter's stdlib, same device kind)
    run["reproduce"] = (f"{'--tiny ' if size == 'tiny' else ''}--seed {seed} --target-steps {r1['step']} "
                        f"--heads-steps {r2['step']} --moe-impl {moe_impl}")
    run_file.write_text(json.dumps(run, indent=1))
    print(f"trained: target {r1['step']} steps ({r1['elapsed_s']:.0f} s), heads {r2['step']} steps "
          f"({r2['elapsed_s']:.0f} s); reproduce with {run['reproduce']}", flush=True)
    return run


def _target_loss(module, batch, key, moe_impl):
    return target_loss(module, batch, MTP_WEIGHT, moe_impl)


def load_trained(work: Path) -> tuple[Target, Heads, dict]:
    """The trained (float32) modules from ``work``'s checkpoints, with ``run.json``."""
    run = json.loads((work / "run.json").read_text())
    target = build_target(run["size"], run["vocab"], run["seed"])
    target.load_weights(str(work / "ckpt" / "target.safetensors"))
    heads = build_heads(run["size"], run["vocab"], run["seed"])
    heads.load_weights(str(work / "ckpt" / "heads.safetensors"))
    mx.eval(target.parameters(), heads.parameters())
    return target, heads, run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for both phases (calibrated)")
    ap.add_argument("--target-steps", type=int, default=None)
    ap.add_argument("--heads-steps", type=int, default=None)
    ap.add_argument("--moe-impl", choices=["dense", "switch"], default="dense")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="checkpoint and exit with status 75 after this long (run again to resume)")
    a = ap.parse_args(argv)
    if a.time_budget is None and (a.target_steps is None or a.heads_steps is None):
        ap.error("give --time-budget, or both --target-steps and --heads-steps")
    try:
        train(a.work, a.corpus, a.tokenizer, size=a.size, seed=a.seed, time_budget=a.time_budget,
              target_steps=a.target_steps, heads_steps=a.heads_steps, moe_impl=a.moe_impl,
              compile=not a.no_compile, max_seconds=a.max_seconds)
    except Interrupted as e:
        print(e, flush=True)
        raise SystemExit(75)


if __name__ == "__main__":
    main()
