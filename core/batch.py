"""Batched decoding: up to ``batch_size`` sequences per forward, with continuous refill.

Read top to bottom: a :class:`Row` is one prompt and its settings; :class:`BatchDecoder` keeps the
active rows in one batch. Each new row is prefilled alone (one single-row forward, as the
single-token path does), its KV cache is merged into the batch's left-padded batch cache (mlx-lm's
``BatchKVCache``: per-row offsets and left-padding masks), and from then on every step feeds the
``B`` pending tokens as one ``[B, 1]`` forward. A row that finishes (EOS, ``max_tokens``, a stop
string) is filtered out of the batch and the next waiting prompt takes its place; the other rows'
caches and keys are only re-indexed, so their outputs do not change.

Like the single-token engine path, the loop keeps one step in flight: step ``t + 1``'s forward is
built on the still-lazy tokens of step ``t`` and queued (``mx.async_eval``) before step ``t`` is read
back, so graph building overlaps the device. Per step there is one ``[B]`` read-back and a short
Python loop over the rows (append, EOS and length checks); stop strings add text work only when set.

Sampling: each row carries its own PRNG key chain (``mx.random.key(seed)``, split once per sampled
token, exactly as :class:`~moedec.DecodeState` does), and the keys of all rows are split and used in
one vectorised call (``mx.vmap``), so a row's draws never depend on which rows share its batch.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterator, Optional, Sequence

import attrs
import mlx.core as mx

from . import sampling
from .engine import PREFILL_STEP, vocab_size_of
from .errors import MoedecError
from .forward import head_of, new_cache
from .records import Generation, GenerationStats
from .sampling import SamplingParams, fresh_seed
from .text import TextStream

_split_rows = mx.vmap(lambda k: mx.random.split(k))  # [B, 2] keys -> [B, 2, 2]
_sample_rows = mx.vmap(sampling.sample)  # ([B, V] probs, [B, 2] keys) -> [B]


@attrs.define(eq=False)
class Row:
    """One prompt of a batch job, its settings, and its progress."""

    index: int  # position in the caller's prompt list
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int
    tokens: list[int] = attrs.field(factory=list)  # generated ids (EOS excluded)
    sampled: int = 0  # tokens drawn for this row (EOS included)
    finish: str = "running"
    text: Optional[TextStream] = None  # only while stop strings are being watched
    held: str = ""  # streamed text that may begin a stop string
    pieces: list[str] = attrs.field(factory=list)
    prefill_time: float = 0.0
    started: float = 0.0

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.tokens)


class BatchDecoder:
    """Decodes ``rows`` with up to ``batch_size`` per forward. Iterate it: it yields
    ``(index, Generation)`` as each row finishes (completion order). ``steps``, ``prefill_time``,
    ``wall_time`` and ``decode_tokens`` describe the whole job afterwards."""

    def __init__(
        self,
        model: Any,
        rows: Sequence[Row],
        *,
        batch_size: int,
        label: str = "batched",
        tokenizer: Any = None,
        stop: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
    ):
        if batch_size < 1:
            raise MoedecError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.rows = list(rows)
        self.batch_size = batch_size
        self.label = label
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        if self.stop and tokenizer is None:
            raise MoedecError("stop strings need a tokenizer")
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.vocab = vocab_size_of(model)
        for r in self.rows:
            check_prompt(r, self.vocab)
        self.head = head_of(model)
        self.sampling = any(not r.params.greedy for r in self.rows)
        self.cache: Optional[list] = None  # per layer: the batch cache of the active rows
        self.row_keys: Optional[mx.array] = None  # [B, 2] per-row PRNG keys (only when sampling)
        self.plan: list[tuple[SamplingParams, Optional[mx.array]]] = []
        self.steps = 0
        self.prefill_time = 0.0
        self.wall_time = 0.0
        self.decode_tokens = 0  # tokens produced by batch forwards (not by prefills)

    # -- the loop --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, Generation]]:
        t0 = time.perf_counter()
        waiting = deque()
        for r in self.rows:
            if r.max_tokens <= 0:
                r.finish = "length"
                r.started = t0
                yield r.index, self._result(r)
            else:
                waiting.append(r)
        active: list[Row] = []
        y: Optional[mx.array] = None  # [B] pending tokens, aligned with ``active``
        while waiting or active:
            if waiting and len(active) < self.batch_size:
                if y is not None:
                    mx.eval(y)  # let the step in flight finish so prefill time is its own
                y = self._admit(waiting, active, y)
            nxt = None
            if any(r.remaining > 1 for r in active):  # someone needs another token: queue it
                logits = self.model(y[:, None], cache=self.cache)[:, -1, :]  # [B, V]
                nxt = self._sample(logits)  # [B]
                mx.async_eval([nxt] if self.row_keys is None else [nxt, self.row_keys])
                self.steps += 1
            toks = y.tolist()
            keep, done = [], []
            for i, (r, t) in enumerate(zip(active, toks)):
                self.decode_tokens += r.sampled > 0  # its first token came from the prefill
                (keep if self._commit(r, t) else done).append(i)
            finished = [active[i] for i in done]
            if done:
                active = [active[i] for i in keep]
                nxt = self._filter(keep, nxt)
                self._replan(active)
            y = nxt
            for r in finished:
                yield r.index, self._result(r)
        self.cache, self.row_keys = None, None
        self.wall_time = time.perf_counter() - t0

    # -- admission: prefill new rows and merge them into the batch --------------------------------

    def _admit(self, waiting: deque, active: list[Row], y: Optional[mx.array]) -> mx.array:
        n = min(self.batch_size - len(active), len(waiting))
        new = [waiting.popleft() for _ in range(n)]
        firsts, caches, keys = [], [], []
        for r in new:
            t = time.perf_counter()
            cache = new_cache(self.model)
            logits = self._prefill(r.prompt, cache)  # [V]
            key = mx.random.key(r.seed)
            if r.params.greedy:
                first = mx.argmax(logits, axis=-1)
            else:
                key, sub = mx.random.split(key)
                first = sampling.sample(sampling.probs(logits, r.params), sub)
            mx.eval(first, key)
            r.prefill_time = time.perf_counter() - t
            r.started = time.perf_counter()
            self.prefill_time += r.prefill_time
            firsts.append(first.astype(mx.int32))
            caches.append(cache)
            keys.append(key)
        merged = [_merge([c[i] for c in caches]) for i in range(len(caches[0]))]
        if self.cache is None:
            self.cache = merged
        else:
            for mine, theirs in zip(self.cache, merged):
                mine.extend(theirs)
        first = mx.stack(firsts)  # [n]
        y = first if y is None else mx.concatenate([y.astype(mx.int32), first])
        if self.sampling:
            new_keys = mx.stack(keys)  # [n, 2]
            self.row_keys = new_keys if self.row_keys is None else mx.concatenate([self.row_keys, new_keys])
        active.extend(new)
        self._replan(active)
        return y

    def _prefill(self, prompt: list[int], cache: list) -> mx.array:
        """Feed the prompt (in chunks) into a fresh single-row cache; logits of the last position."""
        for start in range(0, len(prompt), PREFILL_STEP):
            x = mx.array(prompt[start : start + PREFILL_STEP], dtype=mx.int32)[None]  # [1, T]
            if self.head is not None:
                hidden = self.model.model(x, cache)  # [1, T, D]
                logits = self.head(hidden[:, -1:])[0, -1]  # [V]
            else:
                logits = self.model(x, cache=cache)[0, -1]
            mx.eval([c.state for c in cache])
        return logits

    def _filter(self, keep: list[int], nxt: Optional[mx.array]) -> Optional[mx.array]:
        """Drop finished rows from the batch cache, the pending tokens and the keys."""
        if not keep:
            self.cache, self.row_keys = None, None
            return None
        idx = mx.array(keep, dtype=mx.int32)
        for c in self.cache:
            c.filter(idx)
        if self.row_keys is not None:
            self.row_keys = self.row_keys[idx]
        return None if nxt is None else nxt[idx]

    # -- sampling ---------------------------------------------------------------------------------

    def _replan(self, active: list[Row]) -> None:
        """Group the active rows by sampling settings: ``[(params, mask [B] | None)]``; an empty plan
        means every row is greedy, a single ``None`` mask that every row shares one setting."""
        groups = dict.fromkeys(r.params for r in active)  # distinct settings, in order
        sampled = [p for p in groups if not p.greedy]
        if len(groups) == 1 and sampled:
            self.plan = [(sampled[0], None)]
        else:
            self.plan = [(p, mx.array([r.params == p for r in active])) for p in sampled]

    def _sample(self, logits: mx.array) -> mx.array:
        """One token per row ``[B]`` from ``logits`` ``[B, V]``; sampled rows use their own keys."""
        greedy = mx.argmax(logits, axis=-1)
        if not self.plan:
            return greedy
        split = _split_rows(self.row_keys)  # [B, 2, 2]
        self.row_keys, subs = split[:, 0], split[:, 1]
        out = greedy
        for params, mask in self.plan:
            drawn = _sample_rows(sampling.probs(logits, params), subs).astype(greedy.dtype)
            out = drawn if mask is None else mx.where(mask, drawn, out)
        return out

    # -- committing tokens, stop conditions, results ----------------------------------------------

    def _commit(self, r: Row, t: int) -> bool:
        """Append ``t`` to row ``r``; False when the row has finished."""
        r.sampled += 1
        if t in self.eos:
            r.finish = "eos"
        else:
            r.tokens.append(t)
            if len(r.tokens) >= r.max_tokens:
                r.finish = "length"
            if self.stop:
                self._watch_stop(r, t)
        return r.finish == "running"

    def _watch_stop(self, r: Row, t: int) -> None:
        """Stream the row's text; cut at the first stop string, holding back a tail that may still
        become one (as the single-sequence engine does)."""
        if r.text is None:
            r.text = TextStream(self.tokenizer)
        buf = r.held + r.text.add([t])
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            r.finish, r.held = "stop", ""
            r.pieces.append(buf[: min(hits)])
            return
        hold = max((n for s in self.stop for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
        r.held = buf[len(buf) - hold :] if hold else ""
        r.pieces.append(buf[: len(buf) - hold])

    def _text(self, r: Row) -> Optional[str]:
        if self.tokenizer is None:
            return None
        if r.text is None:  # no stop strings watched: detokenise once
            stream = TextStream(self.tokenizer)
            return stream.add(r.tokens) + stream.flush()
        if r.finish != "stop":
            r.pieces.append(r.held + r.text.flush())
        return "".join(r.pieces)

    def _result(self, r: Row) -> Generation:
        stats = GenerationStats(
            strategy=self.label, prompt_tokens=len(r.prompt), generated_tokens=len(r.tokens),
            forwards=max(r.sampled - 1, 0), drafted=0, accepted=0, prefill_time=r.prefill_time,
            decode_time=time.perf_counter() - r.started, finish_reason=r.finish,
            extra={"batch_size": self.batch_size},
        )
        return Generation(tokens=r.tokens, text=self._text(r), stats=stats)

    def summary(self) -> dict[str, float]:
        """Whole-job figures: decode tok/s counts tokens made by batch forwards over the wall time
        minus the prefills (as mlx-lm's ``BatchStats.generation_tps``)."""
        decode = max(self.wall_time - self.prefill_time, 0.0)
        return {
            "steps": self.steps, "decode_tokens": self.decode_tokens, "prefill_seconds": self.prefill_time,
            "wall_seconds": self.wall_time, "decode_seconds": decode,
            "decode_tok_s": self.decode_tokens / decode if decode > 0 else 0.0,
        }


def _merge(layer_caches: list) -> Any:
    cls = type(layer_caches[0])
    if not hasattr(cls, "merge"):
        raise MoedecError(f"strategy 'batched' needs a KV cache that can be batched; {cls.__name__} cannot")
    return cls.merge(layer_caches)


def check_prompt(r: Row, vocab: int) -> None:
    if not r.prompt:
        raise MoedecError(f"prompt {r.index} is empty")
    bad = [t for t in r.prompt if not 0 <= t < vocab]
    if bad:
        raise MoedecError(f"prompt {r.index}: token {bad[0]} is outside the vocabulary [0, {vocab})")
    if r.max_tokens < 0:
        raise MoedecError(f"prompt {r.index}: max_tokens must be >= 0, got {r.max_tokens}")


# -- building rows from per-call or per-row settings --------------------------------------------------


def per_row(name: str, value: Any, n: int) -> list:
    """``value`` for each of ``n`` rows: a scalar repeats; a sequence must have one entry a row."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise MoedecError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def row_seeds(seed: Any, n: int) -> list[int]:
    """Row ``i`` gets ``seed + i`` for an int seed, ``seed[i]`` for a list, else a random seed."""
    if isinstance(seed, (list, tuple)):
        seeds = per_row("seed", seed, n)
    elif seed is None:
        seeds = [None] * n
    else:
        seeds = [int(seed) + i for i in range(n)]
    return [fresh_seed() if s is None else int(s) for s in seeds]


def make_rows(prompts: Sequence[list[int]], *, max_tokens, temperature, top_p, top_k, seed) -> list[Row]:
    n = len(prompts)
    temps, tps, tks = per_row("temperature", temperature, n), per_row("top_p", top_p, n), per_row("top_k", top_k, n)
    rows = []
    for i, (p, m, s) in enumerate(zip(prompts, per_row("max_tokens", max_tokens, n), row_seeds(seed, n))):
        try:
            params = SamplingParams(temperature=temps[i], top_p=tps[i], top_k=tks[i])
        except (ValueError, TypeError) as e:
            raise MoedecError(f"bad sampling setting for prompt {i}: {e}") from None
        rows.append(Row(index=i, prompt=list(p), params=params, max_tokens=int(m), seed=s))
    return rows


from .batch_bench import bench_batch_sizes  # noqa: E402  (re-exported: ``moedec.batch.bench_batch_sizes``)
