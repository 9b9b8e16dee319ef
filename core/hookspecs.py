"""Every hook moedec calls, in one typed module (the plugin author's reference).

Two kinds of plugin implement these:

* **plugin modules** (built-ins in :data:`moedec.plugins.DEFAULT_PLUGINS`, third parties through the
  ``moedec`` entry-point group) implement :func:`register_strategies`, and may *observe* the
  strategy-level hooks with ``@moedec.hookimpl(wrapper=True)`` (metrics, expert accounting);
* **strategy instances**, one per generation, implement the strategy-level hooks ``draft``,
  ``verify``, ``accept``, ``prefill`` and ``on_accept``.

The engine's own ``verify`` and ``accept`` are registered ``trylast``: a strategy that implements
one of them overrides the default, and may return ``None`` to fall back to it. ``draft``,
``verify`` and ``accept`` are ``firstresult`` hooks: the first non-``None`` result wins.

A decode step is ``draft -> verify -> accept -> (engine commits, rewinds the cache) -> on_accept``.
Invariant between steps: ``state.cache`` holds every committed token except the last one (the
*pending* token, which has been sampled but not yet fed to the model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import pluggy

if TYPE_CHECKING:
    from .records import Acceptance, Draft, Verification
    from .state import DecodeState

PROJECT = "moedec"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_strategies(register: Callable[[type], None]) -> None:
    """Register the strategy classes a plugin provides.

    Called once per plugin module when the plugin manager is built (at the first use of
    :func:`moedec.plugins.get_manager`). Call ``register(cls)`` for each class; ``cls.name`` is what
    ``--strategy`` selects and its attrs fields are the options (``-o key=value``). Registering a
    name twice is an error that names both sources. Returns nothing.
    """


@hookspec(firstresult=True)
def draft(state: "DecodeState") -> Optional[Union["Draft", Sequence[int]]]:
    """Propose tokens to follow ``state.tokens``.

    Called at the start of every decode step, before the target forward. Return a
    :class:`~moedec.Draft` (with ``probs`` for lossless sampling at temperature > 0) or a plain
    sequence of token ids (deterministic draft). ``None`` or an empty sequence means a plain
    single-token step. The engine validates the result (ids in ``[0, vocab_size)``, length at most
    ``state.max_draft``) and names the strategy in any error.
    """


@hookspec(firstresult=True)
def verify(state: "DecodeState", draft: "Draft") -> Optional["Verification"]:
    """Run the target model over the pending token followed by the draft.

    Called once per step after ``draft``. Must feed exactly ``1 + len(draft)`` tokens into
    ``state.cache`` (the engine checks) and return a :class:`~moedec.Verification` with ``[T, V]``
    logits (and ``[T, D]`` hidden states where available). ``None`` means "not mine": the next
    implementation (ultimately the engine's default forward) runs.
    """


@hookspec(firstresult=True)
def accept(
    state: "DecodeState", draft: "Draft", verification: "Verification"
) -> Optional["Acceptance"]:
    """Decide which draft tokens to keep and sample the target's next token.

    Called once per step after ``verify``. Return an :class:`~moedec.Acceptance` whose ``tokens``
    are the accepted draft prefix plus exactly one target token. The default is greedy
    longest-prefix matching at temperature 0 and speculative rejection sampling at temperature > 0
    (lossless in distribution). ``None`` falls back to the default. The engine then commits the
    tokens and rewinds the cache by the rejected count.
    """


@hookspec
def prefill(state: "DecodeState") -> None:
    """Notification: the prompt has been fed to the target and the first token sampled.

    Called once per generation, for every implementation (strategy and observers), before the first
    ``draft``. ``state.tokens`` holds the prompt plus that first token; ``state.hidden`` is the
    target hidden state that produced it. A draft model prefills its own cache here. Return value
    ignored.
    """


@hookspec
def on_accept(state: "DecodeState", acceptance: "Acceptance") -> None:
    """Notification: a step's tokens were committed and the target cache was rewound.

    Called after every step, for every implementation. ``state.tokens`` already ends with
    ``acceptance.tokens``. A draft model rewinds its own cache here; an n-gram index updates.
    Return value ignored.
    """


#: Hooks that a strategy instance may implement (and a plugin module may only wrap).
STRATEGY_HOOKS = ("draft", "verify", "accept", "prefill", "on_accept")
#: Hooks a plugin module implements.
PLUGIN_HOOKS = ("register_strategies",)
