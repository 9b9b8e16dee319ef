"""``check_strategy``: the conformance suite every decoding strategy should pass.

Each check runs real generations on tiny random MoE models and reports what it saw; a failed check
says which property was violated and how. Seeds are fixed: the result is reproducible.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional, Sequence

import attrs
import numpy as np

import moedec
from moedec.errors import MoedecError
from moedec.sampling import SamplingParams

from . import agreeing_prefix, compare_greedy, default_prompts, describe_model, oracle_greedy, small_vocab_model, tiny_models
from .distribution import Sample, check_end_to_end, check_steps, drafted_by_position
from .probe import Probe, implements_hooks

CHECKS = ("lossless-greedy", "lossless-sampling", "draft-validity", "cache", "stopping", "determinism")


class ConformanceError(AssertionError):
    """``check_strategy`` found violations; ``report`` holds every check's result."""

    def __init__(self, report: "ConformanceReport"):
        super().__init__(report.failure_message())
        self.report = report


@attrs.frozen
class CheckResult:
    name: str
    violations: tuple[str, ...]
    notes: tuple[str, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.violations


@attrs.frozen
class ConformanceReport:
    """What ``check_strategy`` found: one :class:`CheckResult` per property."""

    strategy: str
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    def __getitem__(self, name: str) -> CheckResult:
        return next(r for r in self.results if r.name == name)

    def failure_message(self) -> str:
        bad = self.failures
        lines = [f"strategy {self.strategy!r} violates {len(bad)} of {len(self.results)} conformance "
                 f"properties: {', '.join(r.name for r in bad)}"]
        for r in bad:
            lines.append(f"  {r.name} VIOLATED:")
            lines += [f"    - {v}" for v in r.violations[:5]]
            if len(r.violations) > 5:
                lines.append(f"    - ... and {len(r.violations) - 5} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = [f"conformance of strategy {self.strategy!r}:"]
        for r in self.results:
            state = "ok  " if r.passed else "FAIL"
            lines.append(f"  {state} {r.name} ({r.seconds:.1f} s)" + (f": {'; '.join(r.notes)}" if r.notes else ""))
            lines += [f"       - {v}" for v in r.violations[:5]]
        return "\n".join(lines)


@attrs.define
class Setup:
    """Everything the checks share."""

    strategy: Any
    label: str
    models: list
    sampling_model: Any
    prompts: Optional[list]
    max_tokens: int
    temperature: float
    samples: int
    seed: int
    options: dict
    model_options: Optional[Callable[[Any], dict]]

    def opts(self, model) -> dict:
        extra = self.model_options(model) if self.model_options is not None else {}
        return {**self.options, **extra}

    def prompts_for(self, model) -> list[list[int]]:
        vocab = model.args.vocab_size
        if self.prompts is None:
            return default_prompts(vocab)
        return [[int(t) % vocab for t in p] for p in self.prompts]

    def run(self, model, prompt, *, probe: Optional[Probe] = None, **kw):
        kw.setdefault("eos_token_ids", [])
        return moedec.generate(model, list(prompt), self.strategy, plugins=[probe] if probe else (),
                               **kw, **self.opts(model))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# -- the checks ------------------------------------------------------------------------------------


def check_greedy(s: Setup, out: list, notes: list) -> None:
    """Temperature 0: tokens equal mlx-lm's greedy decode (near-ties allowed), on every model."""
    drafted = accepted = 0
    for m in s.models:
        for prompt in s.prompts_for(m):
            ref = oracle_greedy(m, prompt, s.max_tokens)
            g = s.run(m, prompt, max_tokens=s.max_tokens)
            drafted, accepted = drafted + g.stats.drafted, accepted + g.stats.accepted
            div = compare_greedy(ref, g.tokens)
            if div is not None and not div.near_tie:
                out.append(f"not lossless at temperature 0 on {describe_model(m)} for prompt {list(prompt)}: "
                           f"{div.describe()}")
    notes.append(f"drafted {drafted}, accepted {accepted}")


def _sampling_configs(s: Setup) -> list[SamplingParams]:
    t = s.temperature
    return [SamplingParams(temperature=t), SamplingParams(temperature=t * 0.8, top_p=0.9, top_k=6)]


def sample_runs(s: Setup, params: SamplingParams, n: int, salt: int, max_tokens: int = 16):
    """``n`` sampled generations on the small-vocabulary model, with the probe when it can see
    anything (a strategy without hooks runs on the engine's pipelined path, unobserved)."""
    m = s.sampling_model
    prompts = s.prompts_for(m)
    probed = implements_hooks(s.strategy if isinstance(s.strategy, type) else _cls(s.strategy))
    samples, steps = [], []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        probe = Probe() if probed else None
        g = s.run(m, prompt, probe=probe, max_tokens=max_tokens, temperature=params.temperature,
                  top_p=params.top_p, top_k=params.top_k, seed=s.seed * 100_003 + salt * 10_007 + i)
        if probe is not None:
            steps += probe.steps
            drafted = drafted_by_position(probe.steps, len(g.tokens))
        else:
            drafted = (-1,) * len(g.tokens)
        samples.append(Sample(tuple(prompt), tuple(g.tokens), drafted))
    return samples, steps


def check_sampling(s: Setup, out: list, notes: list) -> None:
    """Temperature > 0: the exact small-vocabulary step test and the end-to-end chi-square."""
    rng = np.random.default_rng(s.seed + 77)
    per = max(s.samples // 2, 1)
    total_steps = drafted = 0
    for salt, params in enumerate(_sampling_configs(s)):
        label = f"T={params.temperature:g} top_p={params.top_p:g} top_k={params.top_k}"
        samples, steps = sample_runs(s, params, per, salt)
        total_steps += len(steps)
        drafted += sum(len(st.draft) for st in steps)
        for f in (check_steps(steps, rng, f"exact step test ({label})"),
                  check_end_to_end(s.sampling_model, samples, params, rng, f"end-to-end ({label})")):
            out += f.violations
            notes += [f"{t.name.split(':', 1)[1].strip()} p={t.pvalue:.2g}" for t in f.tests]
    notes.insert(0, f"{total_steps} probed steps, {drafted} draft tokens")
    if drafted == 0:
        notes.insert(1, "the strategy drafted nothing here: only the end-to-end test applied")


def _probed_runs(s: Setup, runs: list, out: list, failed) -> Iterator[tuple[Any, list, Probe]]:
    """Run each ``(model, kwargs)`` of ``runs`` on its first two prompts with a fresh :class:`Probe`
    and yield ``(model, prompt, probe)``; at the first :class:`MoedecError` append
    ``failed(model, kwargs, prompt, error)`` to ``out`` (the check's own list) and stop."""
    for m, kw in runs:
        for prompt in s.prompts_for(m)[:2]:
            probe = Probe(record_probs=False)
            try:
                s.run(m, prompt, probe=probe, **kw)
            except MoedecError as e:
                out.append(failed(m, kw, prompt, e))
                return
            yield m, prompt, probe


def check_drafts(s: Setup, out: list, notes: list) -> None:
    """Drafts the engine accepts (ids in range, length <= state.max_draft, probs [K, V]), including
    under a small ``max_draft`` (a strategy must clamp to ``state.max_draft``)."""
    runs = [(m, dict(max_tokens=20)) for m in s.models]
    runs += [(m, dict(max_tokens=20, max_draft=2)) for m in s.models[:1]]
    runs += [(s.sampling_model, dict(max_tokens=16, max_draft=2, temperature=s.temperature, seed=s.seed))]

    def failed(m, kw, prompt, e):
        where = f"max_draft={kw['max_draft']}" if "max_draft" in kw else "default max_draft"
        return f"on {describe_model(m)} ({where}, prompt {prompt}): {_first_line(e)}"

    lengths = []
    for _, _, probe in _probed_runs(s, runs, out, failed):
        lengths += [len(st.draft) for st in probe.steps]
    if lengths and not out:  # no note after a failed run
        notes.append(f"{len(lengths)} steps, draft lengths {min(lengths)}..{max(lengths)}")


def check_cache(s: Setup, out: list, notes: list) -> None:
    """After prefill and after every step the target cache holds exactly len(tokens) - 1 tokens."""
    runs = [(m, dict(max_tokens=24)) for m in s.models]
    runs += [(s.sampling_model, dict(max_tokens=16, temperature=s.temperature, seed=s.seed + i)) for i in range(2)]

    def failed(m, kw, prompt, e):
        return f"on {describe_model(m)} (prompt {prompt}): the run failed: {_first_line(e)}"

    steps = 0
    for m, prompt, probe in _probed_runs(s, runs, out, failed):
        steps += len(probe.steps)
        if probe.violations:
            out += [f"on {describe_model(m)} (prompt {prompt}): {v}" for v in probe.violations[:3]]
            return
        if probe.prefills != 1:
            out.append(f"on {describe_model(m)}: the prefill notification ran {probe.prefills} times, expected once")
            return
    if not out:  # no note after a failed run
        notes.append(f"{steps} steps checked")


def check_stopping(s: Setup, out: list, notes: list) -> None:
    """Exactly ``max_tokens`` tokens (or fewer at EOS); EOS ends the output and is not returned,
    also when it falls inside an accepted draft; at temperature > 0 too. Compared with the
    strategy's own longer output, so that this check is about stopping, not losslessness."""
    m = s.models[0]
    prompt = s.prompts_for(m)[0]
    full = list(s.run(m, prompt, max_tokens=24).tokens)
    oracle = oracle_greedy(m, prompt, 24)

    def differs(got: list, expected: list) -> bool:
        if got == expected:
            return False
        div = compare_greedy(oracle, got)  # a float near-tie may flip one run and not the other
        return not (div is not None and div.near_tie)

    for n in (0, 1, 2, 3, 7):
        g = s.run(m, prompt, max_tokens=n)
        if len(g.tokens) != n or g.stats.finish_reason != "length" or differs(list(g.tokens), full[:n]):
            out.append(f"max_tokens={n}: got {len(g.tokens)} tokens {list(g.tokens)} (finish "
                       f"{g.stats.finish_reason!r}); expected the first {n} of its 24-token output {full[:n]}")
    for pos in (1, 4, 9):
        eos = full[pos]
        first = full.index(eos)
        try:
            g = s.run(m, prompt, max_tokens=24, eos_token_ids=[eos])
        except MoedecError as e:
            out.append(f"EOS {eos} (first at generated position {first}): the run failed: {_first_line(e)}")
            continue
        if g.stats.finish_reason != "eos" or differs(list(g.tokens), full[:first]):
            out.append(f"EOS {eos} (first at generated position {first} of its 24-token output): got "
                       f"{list(g.tokens)} (finish {g.stats.finish_reason!r}); expected {full[:first]} and finish 'eos'")
    sm = s.sampling_model
    sprompt = s.prompts_for(sm)[0]
    for i, (n, eos) in enumerate([(1, []), (2, []), (5, []), (16, [3]), (16, [5, 6])]):
        try:
            g = s.run(sm, sprompt, max_tokens=n, temperature=s.temperature, seed=s.seed + i, eos_token_ids=eos)
        except MoedecError as e:
            out.append(f"temperature {s.temperature:g}, max_tokens={n}, eos={eos}: the run failed: {_first_line(e)}")
            continue
        bad = [t for t in g.tokens if t in eos]
        reason = g.stats.finish_reason
        ok = not bad and ((reason == "length" and len(g.tokens) == n) or (reason == "eos" and len(g.tokens) < n))
        if not ok:
            out.append(f"temperature {s.temperature:g}, max_tokens={n}, eos={eos}: got {len(g.tokens)} tokens "
                       f"{list(g.tokens)} with finish {reason!r}")


def check_determinism(s: Setup, out: list, notes: list) -> None:
    """The same seed gives the same tokens and the same step counts (randomness comes only from
    ``state.next_key()``); temperature 0 is repeatable too."""
    cases = [(s.sampling_model, dict(temperature=s.temperature, seed=s.seed + 11, max_tokens=16)),
             (s.sampling_model, dict(temperature=s.temperature * 0.8, top_p=0.9, seed=s.seed + 12, max_tokens=16)),
             (s.models[0], dict(max_tokens=16))]
    for m, kw in cases:
        for prompt in s.prompts_for(m)[:2]:
            a, b = s.run(m, prompt, **kw), s.run(m, prompt, **kw)
            ka = (a.stats.forwards, a.stats.drafted, a.stats.accepted)
            kb = (b.stats.forwards, b.stats.drafted, b.stats.accepted)
            if a.tokens != b.tokens or ka != kb:
                where = agreeing_prefix(a.tokens, b.tokens)
                diff = (f"tokens first differ at position {where} ({a.tokens[where]} vs {b.tokens[where]})"
                        if where < min(len(a.tokens), len(b.tokens)) else f"(forwards, drafted, accepted) {ka} vs {kb}")
                setting = ", ".join(f"{k}={v}" for k, v in kw.items())
                out.append(f"two runs with {setting} on {describe_model(m)} (prompt {prompt}) differ: {diff}; "
                           "draw randomness only from state.next_key() and keep no state across generations")
                return


_CHECKS: dict[str, Callable[[Setup, list, list], None]] = {
    "lossless-greedy": check_greedy, "lossless-sampling": check_sampling, "draft-validity": check_drafts,
    "cache": check_cache, "stopping": check_stopping, "determinism": check_determinism,
}


def _cls(strategy: Any) -> type:
    from moedec.plugins import get_manager

    return get_manager().strategy(strategy).cls if isinstance(strategy, str) else strategy


def check_strategy(
    strategy: Any,
    *,
    models: Optional[Sequence[Any]] = None,
    sampling_model: Any = None,
    prompts: Optional[Sequence[Sequence[int]]] = None,
    max_tokens: int = 32,
    temperature: float = 1.0,
    samples: int = 64,
    seed: int = 0,
    model_options: Optional[Callable[[Any], dict]] = None,
    checks: Optional[Sequence[str]] = None,
    **options: Any,
) -> ConformanceReport:
    """Run the conformance suite on ``strategy`` (a registered name or a strategy class) with its
    ``options``; raise :class:`ConformanceError` naming every violated property, else return the
    :class:`ConformanceReport`.

    Properties (``checks`` selects a subset): ``lossless-greedy`` (equals mlx-lm's greedy decode on
    ``models``, default tiny glm4_moe, qwen3_moe and mixtral); ``lossless-sampling`` (at
    ``temperature`` and at a top-p/top-k setting: the exact step test of the strategy's drafts
    through the engine's accept rule on ``sampling_model``, default a vocabulary-16 glm4_moe, and
    the end-to-end chi-square; ``samples`` generations); ``draft-validity``; ``cache`` (cache length
    equals committed tokens after every step); ``stopping`` (``max_tokens`` and EOS);
    ``determinism`` (under a seed). ``model_options(model)`` adds options that depend on the model
    (e.g. a draft model with the same vocabulary). ``prompts`` are taken modulo each vocabulary.
    """
    if not (isinstance(strategy, str) or isinstance(strategy, type)):
        raise TypeError("check_strategy needs a registered strategy name or a strategy class "
                        "(it builds one instance per generation)")
    if temperature <= 0:
        raise ValueError("check_strategy's temperature must be > 0 (temperature 0 is always checked)")
    unknown = sorted(set(checks or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check {unknown[0]!r}; the checks are {', '.join(CHECKS)}")
    label = strategy if isinstance(strategy, str) else getattr(strategy, "name", strategy.__name__)
    setup = Setup(
        strategy=strategy, label=label, models=list(models) if models is not None else tiny_models(),
        sampling_model=sampling_model if sampling_model is not None else small_vocab_model(),
        prompts=[list(p) for p in prompts] if prompts is not None else None, max_tokens=max_tokens,
        temperature=float(temperature), samples=samples, seed=seed, options=dict(options),
        model_options=model_options,
    )
    _cls(strategy)  # an unknown name fails here, once, with the list of available strategies
    results = []
    for name in CHECKS:
        if checks is not None and name not in checks:
            continue
        out: list[str] = []
        notes: list[str] = []
        t0 = time.perf_counter()
        try:
            _CHECKS[name](setup, out, notes)
        except MoedecError as e:
            out.append(f"a run failed: {_first_line(e)}")
        results.append(CheckResult(name, tuple(out), tuple(notes), time.perf_counter() - t0))
    report = ConformanceReport(label, tuple(results))
    if not report.passed:
        raise ConformanceError(report)
    return report
