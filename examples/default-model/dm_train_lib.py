"""Training machinery shared by the default model's phases: token data, seeded batches, a resumable
phase runner with time-budget calibration, checkpoints and the loss log.

Reproducibility: the batch of step ``s`` of phase ``p`` is drawn from ``numpy.random.default_rng([seed,
p, s])``, parameters are initialised from ``mx.random.key(seed)``, and a step's other randomness
(EAGLE's feature noise) comes from a key fixed by seed, phase and step. A
phase's step count is either given or *calibrated*: the phase times steps ``[cal_start, cal_end)``
(all inside the learning-rate warm-up, which does not depend on the total) and fixes the total so the
phase fits its time budget. The resolved count is written to ``run.json``; passing it back
(``--target-steps``/``--heads-steps``) reproduces the run exactly. A killed phase resumes from its
last checkpoint with the same trajectory.
"""

from __future__ import annotations

import csv
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

PHASE_IDS = {"target": 1, "heads": 2, "valid": 99}


# -- data ----------------------------------------------------------------------------------------

def tokenize_split(tokenizer_dir: Path, corpus: Path, split: str, eos_id: int = 0) -> np.ndarray:
    """All files of ``split`` as one id stream, each file preceded by EOS (the document separator)."""
    from tokenizers import Tokenizer

    from build_corpus import read_split

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [t for _, t in read_split(corpus, split)]
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.append(np.array([eos_id], np.int32))
        out.append(np.asarray(enc.ids, np.int32))
    return np.concatenate(out)


def load_tokens(work: Path, tokenizer_dir: Path, corpus: Path) -> dict[str, np.ndarray]:
    """Token streams of both splits, cached as ``work/data/{split}.npy``."""
    data = {}
    for split in ("train", "valid"):
        p = work / "data" / f"{split}.npy"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, tokenize_split(tokenizer_dir, corpus, split))
        data[split] = np.load(p)
    return data


def batch_at(data: np.ndarray, seed: int, phase: str, step: int, batch: int, seq: int) -> mx.array:
    """Rows of ``seq + 1`` consecutive tokens at seeded random offsets ``[batch, seq + 1]``."""
    rng = np.random.default_rng([seed, PHASE_IDS[phase], step])
    starts = rng.integers(0, len(data) - seq - 1, size=batch)
    return mx.array(np.stack([data[s : s + seq + 1] for s in starts]))


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# -- the phase runner ----------------------------------------------------------------------------

class Phase:
    """One resumable training phase over ``module``'s trainable parameters.

    ``loss_fn(module, batch, key) -> (loss, aux)`` (``key``: a PRNG key fixed by seed, phase and
    step) where ``aux`` is a tuple of arrays; ``columns`` names
    the scalar entries of ``aux`` written to the log (a non-scalar entry is passed to ``after_step``
    but not logged). ``after_step(module, aux)`` runs outside the compiled step (e.g. router bias
    updates).
    """

    def __init__(self, name: str, module: nn.Module, loss_fn: Callable, columns: list[str], *,
                 work: Path, data: dict[str, np.ndarray], seed: int, batch: int, seq: int,
                 lr: float, warmup: int, steps: Optional[int], budget_s: Optional[float],
                 min_steps: int, max_steps: int, cal: tuple[int, int] = (5, 25),
                 after_step: Optional[Callable] = None, compile: bool = True,
                 ckpt_every_s: float = 60.0, log_every: int = 10, valid_points: int = 0,
                 weight_decay: float = 0.1, clip: float = 1.0, deadline: Optional[float] = None):
        self.name, self.module, self.loss_fn, self.columns = name, module, loss_fn, columns
        self.work, self.data, self.seed, self.batch, self.seq = work, data, seed, batch, seq
        self.lr, self.warmup, self.steps, self.budget_s = lr, warmup, steps, budget_s
        self.min_steps, self.max_steps, self.cal = min_steps, max_steps, cal
        self.after_step, self.compile, self.ckpt_every_s = after_step, compile, ckpt_every_s
        self.log_every, self.valid_points, self.clip = log_every, valid_points, clip
        self.deadline = deadline  # time.perf_counter() value: checkpoint and stop (Interrupted) past it
        if steps is None and budget_s is None:
            raise ValueError(f"phase {name}: give steps or a time budget")
        if steps is None and cal[1] >= warmup:
            raise ValueError(f"phase {name}: calibration must end inside the warm-up ({cal} vs {warmup})")
        self.opt = optim.AdamW(learning_rate=lr, betas=[0.9, 0.95], weight_decay=weight_decay)
        self.ckpt = work / "ckpt"
        self.meta_path = self.ckpt / f"{name}.json"

    def key(self, step: int) -> mx.array:
        return mx.random.key(self.seed * 1_000_003 + PHASE_IDS[self.name] * 100_000_007 + step)

    # checkpoints -------------------------------------------------------------------------------
    def save(self, step: int, total: Optional[int], elapsed: float, done: bool = False) -> None:
        self.ckpt.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(self.ckpt / f"{self.name}.safetensors"), dict(tree_flatten(self.module.parameters())))
        if not done:
            mx.save_safetensors(str(self.ckpt / f"{self.name}.opt.safetensors"), dict(tree_flatten(self.opt.state)))
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "total": total, "elapsed_s": elapsed, "done": done}))
        tmp.replace(self.meta_path)

    def restore(self) -> dict[str, Any]:
        if not self.meta_path.exists():
            return {"step": 0, "total": None, "elapsed_s": 0.0, "done": False}
        meta = json.loads(self.meta_path.read_text())
        self.module.load_weights(str(self.ckpt / f"{self.name}.safetensors"))
        if not meta["done"]:
            self.opt.init(self.module.trainable_parameters())
            state = mx.load(str(self.ckpt / f"{self.name}.opt.safetensors"))
            self.opt.state = tree_unflatten(list(state.items()))
            self.opt.init(self.module.trainable_parameters())  # marks it initialised; keeps the state
        mx.eval(self.module.parameters())
        return meta

    # the loop ----------------------------------------------------------------------------------
    def valid_loss(self, n_batches: int = 4) -> list[float]:
        vals = []
        for i in range(n_batches):
            b = batch_at(self.data["valid"], self.seed, "valid", i, self.batch, self.seq)
            loss, aux = self.loss_fn(self.module, b, self.key(10**9 + i))
            vals.append([float(loss)] + [float(a) for a in aux if a.ndim == 0])
        return np.mean(np.array(vals), axis=0).tolist()

    def run(self, log: Path) -> dict[str, Any]:
        meta = self.restore()
        if meta["done"]:
            print(f"[{self.name}] already trained ({meta['step']} steps); skipping", flush=True)
            return meta
        if meta["step"] == 0:
            self.opt.init(self.module.trainable_parameters())
        step, total = meta["step"], meta["total"] if meta["total"] is not None else self.steps
        loss_and_grad = nn.value_and_grad(self.module, self.loss_fn)

        def raw_step(b, key):
            (loss, aux), grads = loss_and_grad(self.module, b, key)
            if self.clip:
                grads, _ = optim.clip_grad_norm(grads, self.clip)
            self.opt.update(self.module, grads)
            return loss, aux

        state = [self.module.state, self.opt.state]
        fn = partial(mx.compile, inputs=state, outputs=state)(raw_step) if self.compile else raw_step
        header = ["phase", "step", "lr", "loss", *self.columns, "tokens", "elapsed_s", "split"]
        rows = _read_log(log, step)
        f = open(log, "w", newline="")
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
        t_start, base_elapsed = time.perf_counter(), meta["elapsed_s"]
        last_ckpt, t_cal = time.perf_counter(), None
        while total is None or step < total:
            self.opt.learning_rate = mx.array(lr_at(step, total or 10**9, self.lr, self.warmup))
            b = batch_at(self.data["train"], self.seed, self.name, step, self.batch, self.seq)
            first = fn is not raw_step and step == meta["step"]
            if first:  # arrays are immutable: keeping references is a snapshot
                snap = (self.module.parameters(), tree_map(lambda a: a, self.opt.state))
            try:
                loss, aux = fn(b, self.key(step))
                mx.eval(loss, aux)
            except (RuntimeError, ValueError) as e:
                if not first:
                    raise
                # a backend that cannot compile this graph: restore, and the same math uncompiled
                print(f"[{self.name}] compiled step failed ({type(e).__name__}: {str(e)[:200]}); "
                      "continuing uncompiled", flush=True)
                self.module.update(snap[0])
                self.opt.state = snap[1]
                self.opt.init(self.module.trainable_parameters())
                fn = raw_step
                loss, aux = fn(b, self.key(step))
                mx.eval(loss, aux)
            if self.after_step is not None:
                self.after_step(self.module, aux)
            step += 1
            elapsed = base_elapsed + time.perf_counter() - t_start
            if total is None and step == self.cal[0]:
                t_cal = time.perf_counter()
            if total is None and step == self.cal[1]:
                dt = (time.perf_counter() - t_cal) / (self.cal[1] - self.cal[0])
                left = self.budget_s - elapsed
                total = int(min(self.max_steps, max(self.min_steps, step + left / dt)))
                print(f"[{self.name}] {dt * 1000:.1f} ms/step, {self.batch * self.seq / dt / 1e3:.0f}k tok/s: "
                      f"{total} steps fit the {self.budget_s:.0f} s budget", flush=True)
            if step % self.log_every == 0 or step == total:
                scal = [float(a) for a in aux if a.ndim == 0]
                w.writerow([self.name, step, f"{lr_at(step - 1, total or 10**9, self.lr, self.warmup):.3e}",
                            f"{float(loss):.4f}", *[f"{v:.4f}" for v in scal],
                            step * self.batch * self.seq, f"{elapsed:.1f}", "train"])
                f.flush()
            if step % (self.log_every * 10) == 0 or step == total:
                print(f"[{self.name}] step {step}/{total or '?'} loss {float(loss):.4f} "
                      f"({elapsed:.0f} s)", flush=True)
            if self.valid_points and total and (step % max(1, total // self.valid_points) == 0 or step == total):
                v = self.valid_loss()
                w.writerow([self.name, step, "", f"{v[0]:.4f}", *[f"{x:.4f}" for x in v[1:]],
                            step * self.batch * self.seq, f"{elapsed:.1f}", "valid"])
                f.flush()
            if time.perf_counter() - last_ckpt > self.ckpt_every_s and step != total:
                self.save(step, total, elapsed)
                last_ckpt = time.perf_counter()
            if self.deadline is not None and time.perf_counter() > self.deadline and step != total:
                self.save(step, total, elapsed)
                f.close()
                raise Interrupted(f"[{self.name}] stopped at step {step}/{total or '?'} (deadline); "
                                  "run the same command again to resume")
        f.close()
        elapsed = base_elapsed + time.perf_counter() - t_start
        self.save(step, total, elapsed, done=True)
        return {"step": step, "total": total, "elapsed_s": elapsed, "done": True}


class Interrupted(Exception):
    """A phase stopped at its deadline after writing a checkpoint."""


def _read_log(log: Path, upto: int) -> list[list[str]]:
    """Rows of this phase's existing log to keep on a restart from step ``upto``."""
    if not log.exists() or upto == 0:
        return []
    with open(log, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r for r in rows if int(r[1]) <= upto]
