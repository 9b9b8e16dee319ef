"""The decode loop: prefill, then draft -> verify -> accept -> commit/rewind -> on_accept.

Read top to bottom: :class:`Decoder` owns one generation. Each step feeds the pending token plus the
draft to the target (``T = K + 1`` tokens), keeps the accepted prefix plus one target token, and
trims the rejected ``K - n`` tokens off the KV cache, so that between steps the cache holds every
committed token but the last.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional, Sequence

import mlx.core as mx
import pluggy

from . import hookspecs
from .compiled import CompiledSteps, why_not_compiled
from .defaults import EngineDefaults
from .errors import MoedecError, PluginError
from .forward import cache_length, forward, new_cache, require_trimmable, rewind
from .records import Acceptance, Chunk, Draft, Generation, GenerationStats, Verification
from .sampling import SamplingParams, fresh_seed
from .state import DecodeState
from .text import TextStream

PREFILL_STEP = 2048


def vocab_size_of(model) -> int:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None) or getattr(model, "vocab_size", None)
    if v is None:
        raise MoedecError(f"cannot tell the vocabulary size of {type(model).__name__}")
    return int(v)


class Decoder:
    """One generation. Iterate it for :class:`Chunk` s; ``result`` holds the :class:`Generation`."""

    def __init__(
        self,
        model: Any,
        prompt: Sequence[int],
        strategy: Any,
        *,
        strategy_label: str,
        sampling: SamplingParams,
        max_tokens: int,
        seed: Optional[int],
        tokenizer: Any = None,
        stop: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
        max_draft: int = 32,
        observers: Sequence[object] = (),
        compile_step: Optional[bool] = None,
    ):
        self.model = model
        self.compile_step = compile_step
        self.compile_reason: Optional[str] = None  # why the last pipelined run was not compiled
        self.strategy = strategy
        self.label = strategy_label
        self.vocab = vocab_size_of(model)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise MoedecError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise MoedecError(f"prompt token {bad[0]} is outside the vocabulary [0, {self.vocab})")
        if max_tokens < 0:
            raise MoedecError(f"max_tokens must be >= 0, got {max_tokens}")
        self.prompt = prompt
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.stop = tuple(s for s in stop if s)
        if self.stop and tokenizer is None:
            raise MoedecError("stop strings need a tokenizer")
        self.text = TextStream(tokenizer) if tokenizer is not None else None
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(EngineDefaults(), name="moedec.engine")
        self.pm.register(strategy, name=f"strategy:{strategy_label}")
        for i, obs in enumerate(observers):
            if not self.pm.is_registered(obs):
                self.pm.register(obs, name=f"observer:{getattr(obs, '__name__', type(obs).__name__)}:{i}")
        key = mx.random.key(seed if seed is not None else fresh_seed())
        self.state = DecodeState(
            model=model, cache=new_cache(model), tokens=list(prompt), prompt_length=len(prompt),
            vocab_size=self.vocab, sampling=sampling, max_tokens=max_tokens, max_draft=max_draft,
            strategy_name=strategy_label, key=key,
        )
        self.forwards = self.drafted = self.accepted = 0
        self.finish_reason = "length"
        self.pieces: list[str] = []
        self.held = ""  # streamed text held back because it may begin a stop string
        self.result: Optional[Generation] = None
        self._trim_checked = False

    # -- hooks, with errors that name the plugin -------------------------------------------------

    def _who(self, plugin: object) -> str:
        if plugin is self.strategy:
            return f"strategy {self.label!r}"
        if isinstance(plugin, EngineDefaults):
            return "the engine's default"
        return f"plugin {self.pm.get_name(plugin)!r}"

    def _call(self, hook: str, **kwargs):
        caller = getattr(self.pm.hook, hook)
        try:
            return caller(**kwargs)
        except MoedecError:
            raise
        except Exception as e:
            culprit = _culprit(caller, e)
            who = self._who(culprit) if culprit is not None else f"strategy {self.label!r}"
            raise PluginError(f"{who} failed in hook {hook!r}: {type(e).__name__}: {e}") from e

    def _owner(self, hook: str) -> str:
        impls = [i for i in getattr(self.pm.hook, hook).get_hookimpls() if not (i.wrapper or i.hookwrapper)]
        return self._who(impls[-1].plugin) if impls else "the engine"

    # -- the loop --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Chunk]:
        st = self.state
        t0 = time.perf_counter()
        if st.max_tokens == 0:
            self._finish(t0, t0)
            return
        first = self._prefill()  # lazy [] token id
        if self._pipelinable():
            mx.async_eval(first)
            t1 = time.perf_counter()
            st.prompt_hidden = None
            yield from self._pipelined(first)
        else:
            first = int(first.item())
            t1 = time.perf_counter()
            chunk = self._commit([first])
            self._call("prefill", state=st)
            st.prompt_hidden = None
            if chunk is not None:
                yield chunk
        while self.finish_reason == "running":
            acceptance = self._step()
            chunk = self._commit(list(acceptance.tokens))
            self._call("on_accept", state=st, acceptance=acceptance)
            if chunk is not None:
                yield chunk
        self._finish(t0, t1)

    def _prefill(self) -> int:
        st = self.state
        hiddens = []
        for start in range(0, len(self.prompt), PREFILL_STEP):
            logits, hidden = forward(self.model, self.prompt[start : start + PREFILL_STEP], st.cache)
            if hidden is not None:
                hiddens.append(hidden)
            mx.eval([c.state for c in st.cache] + hiddens[-1:])
        if hiddens:
            st.prompt_hidden = mx.concatenate(hiddens, axis=0) if len(hiddens) > 1 else hiddens[0]  # [P, D]
            st.hidden = st.prompt_hidden[-1]
        self.finish_reason = "running"
        return st.sample(logits[-1])

    def _pipelinable(self) -> bool:
        """True when only the engine's defaults take part: no strategy or observer implements any
        strategy-level hook. Then, as mlx-lm does, the next forward is built
        on the still-lazy token and queued before this one is read back, hiding graph-building time.
        Results are identical to the plain loop (same forwards, same sampling key sequence)."""
        for hook in hookspecs.STRATEGY_HOOKS:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if not isinstance(impl.plugin, EngineDefaults):
                    return False
        return True

    def _compile_wanted(self) -> bool:
        """``compile_step``, or where it is ``None`` (the default): on with MLX's CUDA backend, where
        the compiled step measured faster than the plain one (docs/benchmarks.md), off elsewhere."""
        if self.compile_step is not None:
            return bool(self.compile_step)
        from moedec.kernels import device_backend

        return device_backend() == "cuda"

    def _pipelined(self, y: mx.array) -> Iterator[Chunk]:
        """Single-token decoding with one step in flight (see :meth:`_pipelinable`), through the
        compiled step (:mod:`moedec.compiled`) where ``compile_step`` allows it."""
        st = self.state
        steps = None
        self.compile_reason = why_not_compiled(self.model, st.cache) if self._compile_wanted() else "compile_step is off"
        if self.compile_reason is None:
            steps = CompiledSteps(self.model, st.cache, reuse=True)  # the step traced by an earlier generation, if any
        try:
            while True:
                nxt = None
                if st.remaining > 1:  # another token will be needed: queue its forward now
                    logits = None
                    if steps is not None:
                        try:
                            logits = steps(y.reshape(1, 1))  # [1, V]
                        except Exception as e:  # the model does not trace: go on with the plain step
                            steps.write_back()
                            steps, self.compile_reason = None, f"tracing failed: {type(e).__name__}: {e}"
                    if logits is None:
                        logits, _ = forward(self.model, y.reshape(1), st.cache)  # [1, V], [1, D]
                    nxt = st.sample(logits[-1])
                    mx.async_eval(nxt)
                    self.forwards += 1
                chunk = self._commit([int(y.item())])
                if chunk is not None:
                    yield chunk
                if self.finish_reason != "running":
                    return
                y = nxt
        finally:
            if steps is not None:
                steps.close()

    def _step(self) -> Acceptance:
        st = self.state
        draft = self._draft()
        k = len(draft)
        before = cache_length(st.cache)
        verification = self._call("verify", state=st, draft=draft)
        if not isinstance(verification, Verification):
            raise PluginError(f"{self._owner('verify')} returned {type(verification).__name__} from hook 'verify', expected Verification")
        after = cache_length(st.cache)
        if before is not None and after is not None and after - before != k + 1:
            raise PluginError(
                f"{self._owner('verify')} fed {after - before} tokens into the cache in hook 'verify'; expected {k + 1} (pending + draft)"
            )
        self.forwards += 1
        acceptance = self._call("accept", state=st, draft=draft, verification=verification)
        self._check_acceptance(acceptance, draft)
        n = acceptance.num_accepted
        rewind(st.cache, k - n)
        self.drafted += k
        self.accepted += n
        if acceptance.hidden is not None:
            st.hidden = acceptance.hidden[-1]
        return acceptance

    def _draft(self) -> Draft:
        st = self.state
        raw = self._call("draft", state=st)
        who = self._owner("draft")
        draft = _as_draft(raw, who)
        k = len(draft)
        if k > st.max_draft:
            raise PluginError(f"{who} returned {k} tokens from hook 'draft'; max_draft is {st.max_draft}")
        bad = [t for t in draft.tokens if not 0 <= t < self.vocab]
        if bad:
            raise PluginError(f"{who} drafted token {bad[0]} in hook 'draft', outside the vocabulary [0, {self.vocab})")
        if k and draft.probs is not None:
            shape = tuple(getattr(draft.probs, "shape", ()))
            if shape != (k, self.vocab):
                raise PluginError(f"{who} returned Draft.probs of shape {shape} from hook 'draft'; expected {(k, self.vocab)}")
        if k and not self._trim_checked:
            require_trimmable(st.cache, who)
            self._trim_checked = True
        room = st.remaining - 1  # the step always adds one target token: never draft past max_tokens
        if k > room:
            draft = Draft(draft.tokens[: max(room, 0)], None if draft.probs is None else draft.probs[: max(room, 0)])
        return draft

    def _check_acceptance(self, acc: Any, draft: Draft) -> None:
        who = self._owner("accept")
        if not isinstance(acc, Acceptance):
            raise PluginError(f"{who} returned {type(acc).__name__} from hook 'accept', expected Acceptance")
        n, k = acc.num_accepted, len(draft)
        if not 0 <= n <= k or len(acc.tokens) != n + 1:
            raise PluginError(
                f"{who} returned an invalid Acceptance from hook 'accept': num_accepted={n} with "
                f"{len(acc.tokens)} tokens for a draft of {k} (need 0 <= n <= {k} and n + 1 tokens)"
            )
        if tuple(acc.tokens[:n]) != tuple(draft.tokens[:n]):
            raise PluginError(f"{who} returned accepted tokens from hook 'accept' that are not the draft's prefix")
        if not all(0 <= t < self.vocab for t in acc.tokens):
            raise PluginError(f"{who} returned a token outside the vocabulary from hook 'accept'")

    def _commit(self, tokens: list[int]) -> Optional[Chunk]:
        """Append tokens, stopping at EOS, ``max_tokens`` or a stop string."""
        st = self.state
        emitted = []
        for t in tokens:
            if t in self.eos:
                self.finish_reason = "eos"
                break
            st.tokens.append(t)
            emitted.append(t)
            if st.remaining <= 0:
                self.finish_reason = "length"
                break
        text = ""
        if self.text is not None and emitted:
            text = self.text.add(emitted)
            if self.stop:
                text = self._apply_stop(text)
        if self.finish_reason in ("eos", "length") and self.text is not None:
            text += self.held + self.text.flush()
            self.held = ""
        if text:
            self.pieces.append(text)
        return Chunk(tokens=emitted, text=text) if emitted or text else None

    def _apply_stop(self, new_text: str) -> str:
        """Cut at the first stop string; hold back a tail that may still become one."""
        buf = self.held + new_text
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.finish_reason = "stop"
            self.held = ""
            return buf[: min(hits)]
        hold = max((n for s in self.stop for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
        self.held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def _finish(self, t0: float, t1: float) -> None:
        st = self.state
        if self.text is not None and self.finish_reason == "running":  # stopped by the consumer
            tail = self.held + self.text.flush()
            if tail:
                self.pieces.append(tail)
        if self.finish_reason == "running":
            self.finish_reason = "length"
        end = time.perf_counter()
        stats = GenerationStats(
            strategy=self.label, prompt_tokens=len(self.prompt), generated_tokens=len(st.generated),
            forwards=self.forwards, drafted=self.drafted, accepted=self.accepted,
            prefill_time=t1 - t0, decode_time=end - t1, finish_reason=self.finish_reason, extra=dict(st.extra),
        )
        text = "".join(self.pieces) if self.text is not None else None
        self.result = Generation(tokens=st.generated, text=text, stats=stats)


def _as_draft(raw: Any, who: str) -> Draft:
    if raw is None:
        return Draft(())
    if isinstance(raw, Draft):
        return raw
    if isinstance(raw, mx.array):
        raw = raw.tolist()
    try:
        tokens = list(raw)
        if any(isinstance(t, bool) or not float(t).is_integer() for t in tokens):
            raise TypeError
        return Draft(tuple(int(t) for t in tokens))
    except (TypeError, ValueError):
        raise PluginError(
            f"{who} returned {type(raw).__name__} from hook 'draft'; expected a Draft, a sequence of token ids, or None"
        ) from None


def _culprit(caller, exc: BaseException) -> Optional[object]:
    """The plugin whose hook implementation raised ``exc`` (deepest matching frame)."""
    codes = {}
    for impl in caller.get_hookimpls():
        fn = getattr(impl.function, "__func__", impl.function)
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes[code] = impl.plugin
    found = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            found = codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return found
